"""The OCI runtime's state directory: one directory per container under ``--root``, holding
``state.json`` (what ``sifpy oci state`` prints, plus what sifpy needs to find the
processes again) and ``exec.fifo`` (the gate ``start`` opens; see :mod:`.oci`).

The status is never stored: it is read from the processes themselves, so a container whose
processes died (even SIGKILLed with their monitor) reads ``stopped``, as in runc. A pid is
identified with its start time (``/proc/PID/stat`` field 22), so a reused pid is not taken
for the container.
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any

from sifpy.errors import RuntimeSetupError, UsageError

OCI_VERSION = "1.0.2"
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,199}")


def default_root() -> str:
    """``$XDG_RUNTIME_DIR/sifpy/oci`` (or ``/tmp/sifpy-UID/oci``): the caller's own."""
    from sifpy.runtime.sharens import runtime_dir

    path = os.path.join(runtime_dir(), "oci")
    os.makedirs(path, 0o700, exist_ok=True)
    return path


def check_root(root: str, create: bool = False) -> str:
    """The state directory: a directory of the caller's (root may read any user's: Slurm's
    step daemon queries, kills and deletes as root), not a symlink. ``create``: make it if
    missing (only create and run do: a query as root must not make a user's directory)."""
    root = os.path.abspath(root)
    try:
        if create:
            os.makedirs(root, 0o700, exist_ok=True)
        st = os.lstat(root)
    except FileNotFoundError:
        return root  # nothing was created there: every id is unknown
    except OSError as exc:
        raise RuntimeSetupError(f"can't use state directory: {root}: {exc.strerror}") from exc
    uid = os.getuid()
    if not os.path.isdir(root) or os.path.islink(root) or (uid != 0 and st.st_uid != uid):
        raise RuntimeSetupError(
            f"can't use state directory: {root}: not a directory of uid {uid}",
            "give --root a directory of your own",
        )
    return root


def check_id(cid: str) -> str:
    if not _ID.fullmatch(cid):
        raise UsageError(
            f"can't use container id: {cid!r}: invalid",
            "use letters, digits and . _ + - (not starting with a punctuation mark)",
        )
    return cid


def container_dir(root: str, cid: str) -> str:
    return os.path.join(root, check_id(cid))


def make(root: str, cid: str) -> str:
    """The new container's directory; an id in use is an error (runc's rule)."""
    path = container_dir(root, cid)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        raise RuntimeSetupError(
            f"can't create container: {cid}: the id is in use",
            f"delete it first ('sifpy oci delete {cid}') or choose another id",
        ) from None
    return path


def start_time(pid: int) -> int | None:
    """The start time of ``pid`` (clock ticks since boot), None if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def alive(pid: int, started: int | None) -> bool:
    return pid > 0 and started is not None and start_time(pid) == started


def write(path: str, state: dict[str, Any]) -> None:
    """Write ``state.json`` atomically (a reader sees the old or the new one)."""
    tmp = os.path.join(path, "state.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(state, f)
    os.replace(tmp, os.path.join(path, "state.json"))


def read(root: str, cid: str) -> dict[str, Any]:
    path = os.path.join(container_dir(root, cid), "state.json")
    try:
        with open(path, encoding="utf-8") as f:
            state: dict[str, Any] = json.load(f)
    except FileNotFoundError:
        raise RuntimeSetupError(
            f"can't find container: {cid}: no such container",
            "'sifpy oci list' shows the containers (of this --root)",
        ) from None
    except (OSError, ValueError) as exc:
        raise RuntimeSetupError(f"can't read container state: {path}: {exc}") from exc
    return state


def status(state: dict[str, Any]) -> str:
    """``created`` (waiting for start), ``running`` or ``stopped``."""
    if not alive(state["pid"], state.get("pidStart")):
        return "stopped"
    return "running" if state.get("started") else "created"


def public(state: dict[str, Any]) -> dict[str, Any]:
    """What ``state`` prints: the runtime spec's fields (runtime.md "State"), and runc's
    ``rootfs``, ``created`` and ``owner``."""
    now = status(state)
    return {
        "ociVersion": OCI_VERSION,
        "id": state["id"],
        "pid": state["pid"] if now != "stopped" else 0,
        "status": now,
        "bundle": state["bundle"],
        "rootfs": state["rootfs"],
        "created": state["created"],
        "owner": state.get("owner", ""),
        "annotations": state.get("annotations", {}),
    }


def listing(root: str) -> list[dict[str, Any]]:
    out = []
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        try:
            out.append(public(read(root, name)))
        except (RuntimeSetupError, UsageError):
            continue  # being created or deleted right now
    return out


def lock(path: str) -> int:
    """An exclusive lock on the container's directory (held until the fd is closed):
    start, kill and delete of one container do not interleave."""
    import fcntl

    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def wait_gone(pid: int, started: int | None, timeout: float = 10.0) -> bool:
    """Wait until ``pid`` has ended; False if it still runs after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while alive(pid, started):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def timestamp() -> str:
    """RFC 3339 in UTC with nanoseconds, as runc writes ``created``."""
    ns = time.time_ns()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns // 10**9)) + f".{ns % 10**9:09d}Z"

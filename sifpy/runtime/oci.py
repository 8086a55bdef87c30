"""sifpy as an OCI runtime (runtime-spec 1.0's operations, with runc's command line):
create, start, state, kill, delete, run, exec, over the same launch as ``sifpy exec``.

Processes of a created container (https://github.com/opencontainers/runtime-spec/blob/main/runtime.md)::

    sifpy oci create         loads config.json, forks the daemon, waits until the container
    │                        is created, writes state.json, exits 0
    └─ daemon (setsid)       process.launch's caller: relays signals, outlives create
       └─ monitor            namespaces, image, FUSE servers; hooks; reaps the container
          └─ container       root built and entered; blocked reading exec.fifo (the gate)

``start`` writes one byte to ``exec.fifo``: the container execs ``process.args`` (runc's
``exec.fifo`` does the same). ``run`` is create and start in one process that stays in the
foreground as the daemon would, returns the command's status and deletes the container.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from sifpy.errors import ExitStatus, RuntimeSetupError, SifpyError
from sifpy.runtime import bundle as bundle_
from sifpy.runtime import ocistate

_FIFO = "exec.fifo"


def create(
    root: str,
    cid: str,
    bundle: str,
    pid_file: str | None = None,
    console_socket: str | None = None,
    hooks_dirs: tuple[list[str], list[str]] = ([], []),
) -> int:
    """Create container ``cid`` from ``bundle``; return its pid (still waiting for start).
    ``hooks_dirs``: the hooks.d directories to read, and those of them that must exist."""
    b = bundle_.load(bundle, *hooks_dirs)
    tty = _terminal(b, console_socket, detached=True)
    path = ocistate.make(root, cid)
    try:
        fifo = os.path.join(path, _FIFO)
        os.mkfifo(fifo, 0o600)
        # Read-write: opening never blocks, and the container's read waits for start's byte.
        gate = os.open(fifo, os.O_RDWR | os.O_CLOEXEC)
        ready_r, ready_w = os.pipe()
        first = os.fork()
        if first == 0:  # its own session, and a parent that exits now: it outlives create
            try:
                os.close(ready_r)
                os.setsid()
                if os.fork() != 0:
                    os._exit(0)
                _daemon(b, cid, (ready_w, gate), tty)
            finally:
                os._exit(ExitStatus.LAUNCH_FAILED)
        os.close(ready_w)
        os.close(gate)
        if tty >= 0:
            os.close(tty)
        os.waitpid(first, 0)
        pid, monitor = _await_created(ready_r)
        _record(path, cid, b, pid, monitor, pid_file)
    except BaseException:
        _remove(path)
        raise
    return pid


def start(root: str, cid: str) -> None:
    """Let the created container run its process."""
    path = ocistate.container_dir(root, cid)
    lock = ocistate.lock(path) if os.path.isdir(path) else -1
    try:
        state = ocistate.read(root, cid)
        now = ocistate.status(state)
        if now != "created":
            raise RuntimeSetupError(f"can't start container: {cid}: it is {now}, not created")
        fd = os.open(os.path.join(path, _FIFO), os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            os.write(fd, b"s")
        finally:
            os.close(fd)
        state["started"] = True
        ocistate.write(path, state)
    finally:
        if lock >= 0:
            os.close(lock)


def kill(root: str, cid: str, sig: int) -> None:
    state = ocistate.read(root, cid)
    now = ocistate.status(state)
    if now == "stopped":
        raise RuntimeSetupError(f"can't kill container: {cid}: it is stopped")
    try:
        os.kill(state["pid"], sig)
    except ProcessLookupError:
        raise RuntimeSetupError(f"can't kill container: {cid}: it is stopped") from None


def delete(root: str, cid: str, force: bool = False) -> None:
    """Delete a stopped (or created; ``force``: any) container: its processes are gone,
    its monitor has run the poststop hooks and unmounted the image, its state is removed."""
    path = ocistate.container_dir(root, cid)
    state = ocistate.read(root, cid)
    lock = ocistate.lock(path)
    try:
        now = ocistate.status(state)
        if now == "running" and not force:
            raise RuntimeSetupError(
                f"can't delete container: {cid}: it is running",
                f"stop it first ('sifpy oci kill {cid} KILL'), or delete with --force",
            )
        if now != "stopped":  # created (never started), or forced: as runc, SIGKILL
            with contextlib.suppress(ProcessLookupError):
                os.kill(state["pid"], 9)
        for pid, started in (
            (state["pid"], state.get("pidStart")),
            (state["monitor"], state.get("monitorStart")),
        ):
            if not ocistate.wait_gone(pid, started):
                raise RuntimeSetupError(f"can't delete container: {cid}: process {pid} is left")
        _remove(path)
    finally:
        os.close(lock)


def run(
    root: str,
    cid: str,
    bundle: str,
    pid_file: str | None = None,
    console_socket: str | None = None,
    keep: bool = False,
    hooks_dirs: tuple[list[str], list[str]] = ([], []),
) -> int:
    """Create and start ``cid`` in the foreground; return the command's exit status. The
    state is kept while it runs (``state``, ``kill`` work), and deleted after unless
    ``keep``."""
    from sifpy.runtime.process import launch

    b = bundle_.load(bundle, *hooks_dirs)
    tty = _terminal(b, console_socket, detached=False)
    path = ocistate.make(root, cid)
    try:
        ready_r, ready_w = os.pipe()
        gate_r, gate_w = os.pipe()
        helper = os.fork()
        if helper == 0:  # records the state once created, then lets the container go
            code = 1
            try:
                os.close(ready_w)
                os.close(gate_r)
                pid, monitor = _await_created(ready_r)
                _record(path, cid, b, pid, monitor, pid_file, started=True)
                os.write(gate_w, b"s")
                code = 0
            except BaseException:
                pass
            finally:
                os._exit(code)
        os.close(ready_r)
        os.close(gate_w)
        if tty >= 0:
            _use_terminal(tty)
        spec, poststop = _without_poststop(b)
        opts = spec.options.replace(gate=(ready_w, gate_r), oci_id=cid, oci_bundle=b.path)
        old_umask = os.umask(b.umask) if b.umask is not None else None
        try:
            # The monitor is forked (not inline): this process keeps the host's namespaces
            # to remove the state after, and relays the signals it gets (Slurm's) as exec's.
            code = launch(spec.replace(options=opts), inline=False)
            _post_stop(b, cid, poststop)
            return code
        finally:
            if old_umask is not None:
                os.umask(old_umask)
            os.close(ready_w)
            os.close(gate_r)
            os.waitpid(helper, 0)
    finally:
        if not keep:
            _remove(path)


def exec_in(
    root: str, cid: str, argv: list[str], env: dict[str, str] | None, cwd: str | None
) -> int:
    """Run ``argv`` in the running container (its namespaces and root); return its status."""
    from sifpy.runtime import ns, process

    state = ocistate.read(root, cid)
    if ocistate.status(state) != "running":
        raise RuntimeSetupError(f"can't exec in container: {cid}: it is not running")
    b = bundle_.load(state["bundle"])
    pid = state["pid"]
    fds = {}
    # Only the namespaces the container has of its own (setns to one's own is refused for
    # the user namespace); compared before any join changes what /proc shows.
    for name, flag in (
        ("user", ns.CLONE_NEWUSER),
        ("mnt", ns.CLONE_NEWNS),
        ("ipc", ns.CLONE_NEWIPC),
        ("uts", ns.CLONE_NEWUTS),
        ("net", ns.CLONE_NEWNET),
        ("pid", ns.CLONE_NEWPID),
    ):
        try:
            if os.readlink(f"/proc/self/ns/{name}") == os.readlink(f"/proc/{pid}/ns/{name}"):
                continue
            fds[name] = (os.open(f"/proc/{pid}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC), flag)
        except OSError as exc:
            raise RuntimeSetupError(f"can't exec in container: {cid}: {exc.strerror}") from exc
    if not ocistate.alive(pid, state.get("pidStart")):  # the pid was not reused meanwhile
        raise RuntimeSetupError(f"can't exec in container: {cid}: it is not running")
    for name, (fd, flag) in fds.items():
        try:
            ns.setns(fd, flag, f"the container's {name} namespace")
        finally:
            os.close(fd)
    child = os.fork()  # a new PID namespace takes only children
    if child == 0:
        try:
            os.chdir(cwd or b.spec.cwd)
        except OSError:
            os.chdir("/")
        process.exec_joined(argv, env if env is not None else b.spec.env)
    _, status = os.waitpid(child, 0)
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


# --- helpers ------------------------------------------------------------------------------


def _daemon(b: bundle_.Bundle, cid: str, gate: tuple[int, int], tty: int) -> None:
    """The created container's daemon (see the module docstring); exits."""
    from sifpy.runtime.process import launch

    ready = gate[0]
    os.write(ready, f"m{os.getpid()}\n".encode())
    os.chdir("/")  # the caller's directory is not kept busy while the container lives
    code: int = ExitStatus.LAUNCH_FAILED
    try:
        if tty >= 0:
            _use_terminal(tty)
        if b.umask is not None:
            os.umask(b.umask)
        spec, poststop = _without_poststop(b)
        opts = spec.options.replace(gate=gate, oci_id=cid, oci_bundle=b.path)
        code = launch(spec.replace(options=opts), inline=False)
        _post_stop(b, cid, poststop)
    except SifpyError as exc:
        msg = f"{exc.message}\0{exc.hint or ''}".replace("\n", " ")
        os.write(ready, f"e{msg}\n".encode(errors="replace")[:3500])
    except BaseException as exc:
        msg = f"can't create container: {exc!r}".replace("\n", " ")
        os.write(ready, f"e{msg}\n".encode(errors="replace")[:3500])
    os._exit(code)


def _without_poststop(b: bundle_.Bundle) -> tuple[Any, list[dict[str, object]]]:
    """The launch less its ``poststop`` hooks, which run here once it returned: in the
    runtime's namespaces, as the spec asks, with the bundle's own path. The monitor can't
    run them with a PID namespace: once its init has died, the namespace takes no new
    process (fork fails with ENOMEM, pid_namespaces(7))."""
    inject = b.spec.options.inject
    if inject is None or not any(h["stage"] == "poststop" for h in inject.hooks):
        return b.spec, []
    from sifpy.runtime.gpu import Injection

    rest = Injection()
    rest.tmpfs = list(inject.tmpfs)
    rest.hooks = [h for h in inject.hooks if h["stage"] != "poststop"]
    poststop = [h for h in inject.hooks if h["stage"] == "poststop"]
    keep = rest if rest.hooks or rest.tmpfs else None
    return b.spec.replace(options=b.spec.options.replace(inject=keep)), poststop


def _post_stop(b: bundle_.Bundle, cid: str, poststop: list[dict[str, object]]) -> None:
    if poststop:  # failures are warnings (runtime-spec): the container has ended anyway
        from sifpy.runtime import hooks

        # The pid the container had is gone; the state's pid is then 0 (runc's, too).
        state = hooks.state(b.path, "stopped", b.annotations, 0, cid)
        hooks.run_logged(poststop, hooks.AFTER_STOP, state)


def _await_created(fd: int) -> tuple[int, int]:
    """Read the reports, one line each, until the container is created (``r``): the
    daemon's pid (``m``), the container's (``p``, from the monitor), or an error (``e``,
    then every writer is gone). Returns the container's pid and the daemon's."""
    data = b""
    try:
        while b"r" not in data.split(b"\n")[:-1]:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
    lines = data.split(b"\n")
    for ln in lines:
        if ln.startswith(b"e"):
            message, _, hint = ln[1:].decode(errors="replace").partition("\0")
            raise RuntimeSetupError(message, hint or None)
    fields = {ln[:1]: ln[1:] for ln in lines if ln}
    if b"r" not in fields or b"p" not in fields:
        raise RuntimeSetupError("can't create container: it ended before it was created")
    return int(fields[b"p"]), int(fields.get(b"m") or 0)


def _record(
    path: str,
    cid: str,
    b: bundle_.Bundle,
    pid: int,
    monitor: int,
    pid_file: str | None,
    started: bool = False,
) -> None:
    import pwd

    try:
        owner = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        owner = str(os.getuid())
    state: dict[str, Any] = {
        "id": cid,
        "pid": pid,
        "pidStart": ocistate.start_time(pid),
        "monitor": monitor or pid,
        "monitorStart": ocistate.start_time(monitor or pid),
        "bundle": b.path,
        "rootfs": b.spec.image.path,
        "created": ocistate.timestamp(),
        "owner": owner,
        "annotations": b.annotations,
        "started": started,
    }
    ocistate.write(path, state)
    if pid_file:
        tmp = f"{pid_file}.tmp"
        with open(tmp, "w") as f:
            f.write(str(pid))
        os.replace(tmp, pid_file)


def _remove(path: str) -> None:
    for name in (_FIFO, "state.json", "state.json.tmp"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(path, name))
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(path)


def _terminal(b: bundle_.Bundle, console_socket: str | None, detached: bool) -> int:
    """``process.terminal``: a new pseudo-terminal whose master goes to ``console_socket``
    (runc's protocol: one SCM_RIGHTS message); returns the slave (-1: none). In the
    foreground without a socket, the caller's own terminal is used."""
    if not b.terminal:
        if console_socket:
            raise RuntimeSetupError(
                "can't use --console-socket: process.terminal is false in config.json"
            )
        return -1
    if not console_socket:
        if detached or not os.isatty(0):
            raise RuntimeSetupError(
                "can't allocate a terminal: process.terminal is true but there is no "
                "--console-socket" + ("" if detached else " and stdin is not a terminal"),
                "give --console-socket, or set process.terminal to false in config.json",
            )
        return -1
    import socket

    master, slave = os.openpty()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(console_socket)
            socket.send_fds(sock, [b"/dev/ptmx"], [master])
    except OSError as exc:
        os.close(slave)
        raise RuntimeSetupError(f"can't use --console-socket: {console_socket}: {exc}") from exc
    finally:
        os.close(master)
    return slave


def _use_terminal(tty: int) -> None:
    """Make ``tty`` the standard streams and the controlling terminal (a session leader's:
    the daemon's, after setsid; in the foreground the process keeps its own session)."""
    import fcntl
    import termios

    for fd in (0, 1, 2):
        os.dup2(tty, fd)
    os.close(tty)
    # Not a session leader (run in the foreground): the streams are enough.
    with contextlib.suppress(OSError):
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

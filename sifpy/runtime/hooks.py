"""OCI hooks (from CDI specs and from hooks.d directories), run at the stage they name.

The OCI runtime spec (https://github.com/opencontainers/runtime-spec/blob/main/config.md,
"POSIX-platform Hooks") gives each hook the container's state as JSON on stdin: ``ociVersion``,
``id``, ``status``, ``pid``, ``bundle`` (a directory whose ``config.json`` has
``root.path``), ``annotations``. Hooks such as ``nvidia-ctk hook update-ldcache`` read the
root from there.

sifpy's stages: ``createRuntime``, ``createContainer`` and ``prestart`` run once the root is
assembled, before ``pivot_root``, in the container's mount namespace (the root at its
session path, the host's paths around it); ``startContainer`` runs inside the container
(after ``pivot_root``), just before the command. A hook that fails (non-zero status, or its
timeout) stops the start, as in runc, with its status and stderr in the error;
``poststart`` and ``poststop`` failures are warnings (:func:`run_logged`).

A hook runs as the user who starts the container, in the container's user namespace (it can
do what that user can), with exactly the environment its definition gives (none by
default), in a session of its own: at its timeout the whole session is killed, so a shell
hook's children do not outlive it.
"""

from __future__ import annotations

import json
import os
import signal

from sifpy.errors import RuntimeSetupError, ToolError
from sifpy.util.proc import PIPE, Popen, TimeoutExpired, popen

# The runtime spec's hook stages, in the order a container meets them (runtime.md,
# "Lifecycle"); sifpy runs them all, within a stage in the order the hooks were given.
STAGES = (
    "prestart",
    "createRuntime",
    "createContainer",
    "startContainer",
    "poststart",
    "poststop",
)
BEFORE_PIVOT = ("prestart", "createRuntime", "createContainer")
AFTER_START = ("poststart",)
AFTER_STOP = ("poststop",)
OCI_VERSION = "1.0.2"


def write_bundle(
    bundle: str,
    root: str,
    argv: list[str],
    env: dict[str, str],
    annotations: dict[str, str] | None = None,
) -> None:
    """A minimal OCI bundle: ``config.json`` with the root path, the process and the
    annotations."""
    os.makedirs(bundle, mode=0o700, exist_ok=True)
    config = {
        "ociVersion": OCI_VERSION,
        "root": {"path": root, "readonly": True},
        "process": {"args": argv, "env": [f"{k}={v}" for k, v in env.items()], "cwd": "/"},
        "annotations": annotations or {},
    }
    with open(os.path.join(bundle, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)


def run_logged(hooks: list[dict[str, object]], stages: tuple[str, ...], state_: str) -> None:
    """:func:`run` for ``poststart`` and ``poststop``, whose failures the runtime spec
    makes warnings: the container has started (or ended) whatever they say."""
    from sifpy.util import log

    for hook in hooks:
        if hook["stage"] in stages:
            try:
                run([hook], stages, state_)
            except RuntimeSetupError as exc:
                log.warn(exc.message)


def state(
    bundle: str,
    status: str,
    annotations: dict[str, str] | None = None,
    pid: int | None = None,
    cid: str | None = None,
) -> str:
    """The runtime spec's state of this container, as a hook reads it on stdin. ``cid``:
    the container's id (an OCI runtime's); ``sifpy exec`` names it after the pid."""
    return json.dumps(
        {
            "ociVersion": OCI_VERSION,
            "id": cid or f"sifpy-{os.getpid() if pid is None else pid}",
            "status": status,
            "pid": os.getpid() if pid is None else pid,
            "bundle": bundle,
            "annotations": annotations or {},
        }
    )


def run(hooks: list[dict[str, object]], stages: tuple[str, ...], state_: str) -> None:
    """Run the hooks of ``stages``, in order, each with ``state_`` (:func:`state`) on stdin;
    the first that fails raises :class:`RuntimeSetupError` with its status and stderr."""
    for stage in stages:
        for hook in hooks:
            if hook["stage"] == stage:
                _run_one(hook, state_)


def _run_one(hook: dict[str, object], text: str) -> None:
    path = str(hook["path"])
    stage = hook["stage"]
    argv = [str(a) for a in hook["args"]]  # type: ignore[attr-defined]
    env = dict(e.partition("=")[::2] for e in hook["env"])  # type: ignore[attr-defined]
    timeout = hook.get("timeout")  # seconds; None: no limit (the runtime spec's default)
    source = hook.get("source")
    hint = f"the hook is defined in {source}" if source else None
    try:
        proc = popen(
            argv,
            f"run {stage} hook",
            executable=path,
            stdin=PIPE,
            stdout=PIPE,
            stderr=PIPE,
            env=env,
            # Its own session: at the timeout, its children go with it (killpg).
            start_new_session=True,
            text=True,
        )
    except ToolError as exc:
        why = exc.message.rsplit(": ", 1)[-1]  # not found, permission denied, ...
        raise RuntimeSetupError(f"can't run {stage} hook: {path}: {why}", hint) from exc
    try:
        _, err = proc.communicate(text, timeout=None if timeout is None else float(str(timeout)))
    except TimeoutExpired as exc:
        _kill(proc)
        raise RuntimeSetupError(
            f"can't run {stage} hook: {path}: timed out after {timeout} s (stopped)", hint
        ) from exc
    except BaseException:
        _kill(proc)
        raise
    if proc.returncode != 0:
        how = (
            f"killed by signal {-proc.returncode}"
            if proc.returncode < 0
            else f"exit status {proc.returncode}"
        )
        tail = err.strip()[-_TAIL:]
        message = f"can't run {stage} hook: {path}: {how}"
        raise RuntimeSetupError(f"{message}: {tail}" if tail else message, hint)


_TAIL = 1500  # characters of a hook's stderr an error keeps


def _kill(proc: Popen[str]) -> None:
    """Kill the hook's session (its process group: start_new_session made it the leader)
    and reap all of it: this process adopts the hook's children as they are orphaned
    (subreaper), so none is left running, nor as a zombie of the host's init."""
    from sifpy.runtime import ns

    ns.set_child_subreaper(True)
    try:
        try:  # gone, or setuid
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
        while True:  # the group's other members, now ours
            try:
                os.waitpid(-proc.pid, 0)
            except ChildProcessError:
                break
    finally:
        ns.set_child_subreaper(False)

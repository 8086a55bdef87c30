"""Wait for a container and relay signals to it: the loop the caller, the monitor and the
``--pid`` init share (:func:`supervise`), the exit status it becomes (:func:`exit_code`),
the ``--timeout``/instance start deadline (:class:`Start`), the init itself
(:func:`run_init`), and the report pipe's format (:func:`report_error`).
"""

from __future__ import annotations

import gc
import os
import time as _time

from sifpy import TYPE_CHECKING
from sifpy.errors import ExitStatus, RuntimeSetupError

if TYPE_CHECKING:
    import signal
    from typing import NoReturn

    from sifpy.runtime.spec import LaunchSpec
else:
    # The public signal module builds enums: +2.8 ms to exec's imports (python -X importtime
    # -I -S, 2-CPU Xeon); _signal has the same functions and constants as ints.
    import _signal as signal


# Signals relayed to the container. Those a terminal generates (si_code SI_KERNEL) already
# reach the whole foreground process group, container included, and are not relayed twice.
FORWARDED = frozenset(
    {
        signal.SIGINT,
        signal.SIGTERM,
        signal.SIGHUP,
        signal.SIGQUIT,
        signal.SIGUSR1,
        signal.SIGUSR2,
        signal.SIGWINCH,
    }
)


SI_KERNEL = 0x80


WAITED = FORWARDED | {signal.SIGCHLD}


def exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


# --- --runscript-timeout ---------------------------------------------------------------
#
# ``--runscript-timeout``: the action script's time limit, as Apptainer's.
#
# Apptainer runs the action script (the image's ``/.singularity.d/env/*.sh``, the injected
# variables, a Docker runscript's evaluation) in an interpreter under a deadline, one minute
# unless ``--runscript-timeout`` says otherwise; a command those scripts run that is still
# going at the deadline is killed (SIGKILL) and Apptainer fails with ``command "CMD" was
# killed after 1m0s timeout``. The command the script finally execs is not bounded. See
# runActionScript in https://github.com/apptainer/apptainer/blob/main/internal/pkg/runtime/
# engine/apptainer/process_linux.go and defaultExecHandler in
# https://github.com/apptainer/apptainer/blob/main/internal/pkg/util/shell/interpreter/
# interpreter.go.
#
# sifpy's action script is the image's own ``/bin/sh``: the monitor waits until the deadline
# (nothing at all is done before it), then looks whether the container's process still runs
# the action script (its command line is still ``spec.argv``, unchanged until its final
# exec). If it does, that shell and everything it started are killed.


def _cmdline(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return raw.decode(errors="replace").split("\0")[:-1]


def _children(pid: int) -> list[int]:
    """The children of ``pid`` (every thread's list; CONFIG_PROC_CHILDREN)."""
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(p) for p in f.read().split()]
        except (OSError, ValueError):
            continue
    return out


def _expire(main: int, argv: list[str]) -> str | None:
    """At the deadline: if the container's process (``main``, or its child under sifpy's
    init) still runs the action script ``argv``, kill it and all it started, and return
    the command it was running (as Apptainer names it: its arguments joined by spaces; ""
    when the script itself was busy). None when the script had already exec'd."""
    shell = main if _cmdline(main) == argv else None
    if shell is None:
        shell = next((c for c in _children(main) if _cmdline(c) == argv), None)
    if shell is None:
        return None
    tree: list[int] = []
    todo = _children(shell)
    while todo:
        pid = todo.pop(0)
        tree.append(pid)
        todo += _children(pid)
    # The command: the first descendant that is not the shell itself (a `$(...)` subshell
    # carries the same command line).
    cmd = next((c for c in map(_cmdline, tree) if c is not None and c != argv), None)
    # The shell first, so that it starts nothing more; then what it started.
    for pid in [shell, *tree]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return " ".join(cmd) if cmd else ""


def _go_duration(seconds: float) -> str:
    """``seconds`` as Go's time.Duration prints it (``1m0s``, ``1.5s``, ``1h0m0s``)."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{secs:.9f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{int(hours)}h{int(minutes)}m{text}"
    if minutes:
        return f"{int(minutes)}m{text}"
    return text


class Start:
    """The action script's deadline (``LaunchOptions.start_timeout``) and, once it passed
    with the script still running, the command that was killed (``killed``)."""

    def __init__(self, seconds: float, argv: list[str]) -> None:
        self.seconds, self.argv = seconds, argv
        self.killed: str | None = None

    def error(self) -> RuntimeSetupError:
        what = "the action script"
        if self.killed:  # quoted as Go's %q, as Apptainer prints it
            quoted = self.killed.replace("\\", "\\\\").replace('"', '\\"')
            what = f'command "{quoted}"'
        return RuntimeSetupError(
            f"can't start container: {what} was killed after {_go_duration(self.seconds)} timeout",
            "the image's environment scripts ran past --runscript-timeout (default 1m): "
            "give it more time, e.g. --runscript-timeout 5m",
        )


def start_of(spec: LaunchSpec) -> Start | None:
    seconds = spec.options.start_timeout
    return None if seconds is None else Start(seconds, list(spec.argv))


def supervise(main: int, forward_to: int, reap_all: bool, start: Start | None = None) -> int:
    """Wait until ``main`` ends, relaying signals to ``forward_to``; return its wait status.

    The waited signals are blocked (inherited across fork, so none is lost in the window
    before this loop) and taken synchronously with sigwaitinfo: no handler ever runs, and the
    si_code tells a terminal's signal from a kill(2). With ``start``, the wait until its
    deadline is a sigtimedwait, after which the action script is killed if still running.
    """
    gc.enable()  # paused while the container started (sifpy.cli.entry); this may wait long
    deadline = None if start is None else _time.monotonic() + start.seconds
    while True:
        if deadline is None:
            info = signal.sigwaitinfo(WAITED)
        else:
            timed = signal.sigtimedwait(WAITED, max(0.0, deadline - _time.monotonic()))
            if timed is None:
                assert start is not None
                deadline = None
                start.killed = _expire(main, start.argv)
                continue
            info = timed
        if info.si_signo != signal.SIGCHLD:
            if info.si_code != SI_KERNEL:
                try:
                    os.kill(forward_to, info.si_signo)
                except ProcessLookupError:
                    pass
            continue
        while True:
            try:
                pid, status = os.waitpid(-1 if reap_all else main, os.WNOHANG)
            except ChildProcessError:
                pid, status = 0, 0
            if pid == 0:
                break
            if pid == main:
                return status


def report_error(fd: int, code: int, message: str, hint: str | None = None) -> None:
    # One write below PIPE_BUF is atomic, so a report is never interleaved.
    data = f"{code}\0{message[:3000]}\0{(hint or '')[:800]}".encode(errors="replace")
    try:
        os.write(fd, data)
    except OSError:
        pass


def run_init(child: int) -> NoReturn:
    """PID 1 of the container's PID namespace (tini's job): reap every zombie (orphans are
    re-parented to us), relay the signals the monitor forwards (they arrive from outside the
    namespace) to the command, and exit with its status (128+N if signal N killed it).

    The relayed signals are still blocked here (inherited), so sigwaitinfo takes them: the
    kernel would otherwise drop a signal that PID 1 does not handle. A terminal's signals
    reach the command directly (same process group) and are not relayed twice. When we
    exit, the kernel kills whatever is left in the namespace.
    """
    try:
        status = supervise(child, child, reap_all=True)
    except BaseException:
        os._exit(ExitStatus.LAUNCH_FAILED)
    os._exit(exit_code(status))

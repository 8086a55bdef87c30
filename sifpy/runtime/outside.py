"""A helper that runs the ``poststart`` and ``poststop`` hooks outside the container's PID
namespace.

The monitor makes the PID namespace with ``unshare(CLONE_NEWPID)``: every child it forks
afterwards is born *in* that namespace. A hook started there dies with the container's
init (the kernel kills the namespace's every process when its PID 1 ends: a ``poststart``
hook of a short command is killed mid-run), and once that init has died the namespace
takes no new process at all: ``fork`` fails with ENOMEM (pid_namespaces(7)), so no
``poststop`` hook could start. The runtime spec runs these hooks in the runtime's
namespace anyway. So, when a start has such hooks and a PID namespace, the monitor forks
this helper just before the unshare: it shares the monitor's mount namespace (the session,
the bundle) but not the new PID namespace, and runs each stage's hooks when asked.
"""

from __future__ import annotations

import contextlib
import os
import signal
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

# This process's helper: (pid, request write end, reply read end); None when there is none.
_helper: tuple[int, int, int] | None = None


def start(run: Callable[[str, int], None]) -> None:
    """Fork the helper; it calls ``run(stage, pid)`` for each :func:`ask`, in order, and
    exits when this process closes its end (:func:`stop`) or dies."""
    global _helper
    from sifpy.runtime import mount, ns

    req_r, req_w = os.pipe()
    rep_r, rep_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            ns.set_parent_death_signal(signal.SIGKILL)
            # Only the two pipe ends: a copy of the monitor's report pipe or gate would keep
            # its reader waiting for an end of file that comes only when this exits.
            low, high = sorted((req_r, rep_w))
            os.closerange(3, low)
            os.closerange(low + 1, high)
            os.closerange(high + 1, mount.max_fd())
            with os.fdopen(req_r, "rb", buffering=0) as requests:
                for line in requests:
                    stage, _, container = line.decode().strip().partition(" ")
                    try:
                        run(stage, int(container))
                    finally:
                        os.write(rep_w, b"d")
        finally:
            os._exit(0)
    os.close(req_r)
    os.close(rep_w)
    _helper = (pid, req_w, rep_r)


def ask(stage: str, pid: int) -> bool:
    """Have the helper run ``stage``'s hooks (the container's ``pid`` in their state) and
    wait until it has; False when there is no helper (the caller runs them itself)."""
    if _helper is None:
        return False
    _, req_w, rep_r = _helper
    try:
        os.write(req_w, f"{stage} {pid}\n".encode())
        os.read(rep_r, 1)
    except OSError:  # the helper is gone: its hooks can't run any more
        pass
    return True


def stop() -> None:
    """End the helper (once the last stage has run) and reap it."""
    global _helper
    if _helper is None:
        return
    pid, req_w, rep_r = _helper
    _helper = None
    os.close(req_w)
    os.close(rep_r)
    with contextlib.suppress(ChildProcessError):  # already reaped (it reaps every child)
        os.waitpid(pid, 0)

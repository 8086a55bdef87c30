"""The container's first process: build its root (:mod:`.assemble`), run the OCI hooks
due before and after ``pivot_root``, pivot, drop privileges, then exec the command with a
clean process state (or become the ``--pid`` init and run it as a child); each failure
reported over the report pipe (:func:`sifpy.runtime.supervise.report_error`).
"""

from __future__ import annotations

import os

from sifpy import TYPE_CHECKING
from sifpy.errors import ExitStatus, SifpyError
from sifpy.runtime import mount, ns, seccomp
from sifpy.runtime.assemble import assemble, enter_cwd
from sifpy.runtime.spec import BUNDLE, DOCKER_CAPS, all_hooks
from sifpy.runtime.start import DEFAULT_PATH, Identity
from sifpy.runtime.supervise import report_error, run_init

if TYPE_CHECKING:
    import signal
    from collections.abc import Sequence
    from typing import NoReturn

    from sifpy.runtime import plan as plan_
    from sifpy.runtime.spec import LaunchSpec
else:
    # The public signal module builds enums: +2.8 ms to exec's imports (python -X importtime
    # -I -S, 2-CPU Xeon); _signal has the same functions and constants as ints.
    import _signal as signal


def not_started(started: int) -> None:
    """Tell the monitor (:func:`sifpy.runtime.posthooks.post_start`) that the command will
    not run."""
    if started >= 0:
        try:
            os.write(started, b"f")
        except OSError:
            pass


def first_process(
    spec: LaunchSpec,
    ident: Identity,
    plan: list[plan_.Mount],
    cwd_fd: int,
    report: int,
    parent: int,
    keeper: int = -1,
    started: int = -1,
) -> NoReturn:
    """The container's first process: build the root, pivot_root, exec. Never returns.

    ``keeper`` (a pipe's write end): instead of exec'ing, write ``k`` to it once the root is
    entered and wait until the parent dies (PDEATHSIG): this process then only keeps the
    container's mount namespace, which other processes join (:mod:`sifpy.runtime.sharens`).
    """
    try:
        ns.set_parent_death_signal(signal.SIGKILL)
        # In a new PID namespace our parent is outside it and getppid() says 0.
        if os.getppid() not in (parent, 0):
            os._exit(ExitStatus.LAUNCH_FAILED)
        root = assemble(spec, ident, plan, cwd_fd)
        hooks = all_hooks(spec)
        annotations = dict(spec.options.annotations)
        cid, bundle = spec.options.oci_id, spec.options.oci_bundle
        if hooks:  # OCI hooks (runtime.hooks): the root is complete, not yet entered
            from sifpy.runtime import hooks as hooks_

            # The pid as the host sees it (the state's, as runc gives it): the host's /proc
            # is still mounted here, whatever PID namespace this process is in.
            try:
                host_pid = int(os.readlink("/proc/self"))
            except (OSError, ValueError):
                host_pid = os.getpid()
            if bundle is None:
                hooks_.write_bundle(BUNDLE, root, spec.argv, spec.env, annotations)
            state = hooks_.state(bundle or BUNDLE, "creating", annotations, host_pid, cid)
            hooks_.run(hooks, hooks_.BEFORE_PIVOT, state)
        # A mount namespace of our own (a copy, binds included) before pivot_root, which
        # re-roots *every* process of the namespace that shares the old root: the monitor
        # and its FUSE servers must keep the host's root (fuse-overlayfs reaches its layers
        # through /proc/self/fd, which the container's own /proc would not resolve).
        ns.unshare(ns.CLONE_NEWNS)
        # pivot_root(".", "."): the old root ends up mounted on top of the new one; the
        # lazy unmount then drops it (and with it every host mount) from this namespace.
        # The image mount and session go with it; the binds made from them stay.
        os.chdir(root)
        ns.pivot_root(".", ".")
        ns.umount2(".", ns.MNT_DETACH)
        os.chdir("/")
        if spec.options.masked_paths or spec.options.readonly_paths:
            from sifpy.runtime import ocipaths  # imported before the session covered /tmp

            ocipaths.make_readonly(spec.options.readonly_paths)  # runc's order
            ocipaths.mask(spec.options.masked_paths)
        cwd = enter_cwd(spec, ident)
        if hooks:
            state = hooks_.state(bundle or "/", "created", annotations, host_pid, cid)
            hooks_.run(hooks, ("startContainer",), state)
        if keeper >= 0:
            os.write(keeper, b"k")
            os.close(keeper)
            os.closerange(3, mount.max_fd())
            while True:  # PDEATHSIG (SIGKILL) ends it with the holder
                signal.sigwaitinfo({signal.SIGUSR1})
        ns.set_no_new_privs()
        # The hostname and limits first: they need capabilities the bounding set may drop.
        if spec.options.hostname is not None:
            ns.set_hostname(spec.options.hostname)
        for res, soft, hard in spec.options.rlimits:
            ns.set_rlimit(res, soft, hard)
        if spec.options.confine:
            ns.limit_caps(DOCKER_CAPS)
        elif spec.options.caps is not None:
            ns.limit_caps(spec.options.caps)
        # Last, once the runtime's own mounts are made: TIOCSTI/TIOCLINUX refused (flatpak's
        # rule, see seccomp), so nothing in the image can type into the caller's terminal.
        seccomp.install_payload_filter(spec.options.confine)
        if spec.options.gate[0] >= 0:
            _await_start(spec.options.gate)
    except SifpyError as exc:
        not_started(started)
        report_error(report, ExitStatus.LAUNCH_FAILED, exc.message, exc.hint)
        os._exit(ExitStatus.LAUNCH_FAILED)
    except BaseException as exc:
        not_started(started)
        report_error(report, ExitStatus.LAUNCH_FAILED, f"can't set up container: {exc!r}")
        os._exit(ExitStatus.LAUNCH_FAILED)
    del cwd
    opts = spec.options
    init = opts.pid_ns and not opts.no_init
    exec_command(spec.argv, spec.env, report, init, opts.pass_fds, started)


def _await_start(gate: tuple[int, int]) -> None:
    """The OCI ``created`` state: say so, then wait for ``start`` (see LaunchOptions.gate).
    The fds are closed by the exec (keep_only)."""
    ready, wait = gate
    os.write(ready, b"r\n")
    if os.read(wait, 1) != b"s":  # the runtime went away without a start: never run
        os._exit(ExitStatus.LAUNCH_FAILED)


def exec_command(
    argv: list[str],
    env: dict[str, str],
    report: int,
    init: bool = False,
    pass_fds: Sequence[int] = (),
    started: int = -1,
) -> NoReturn:
    """Exec the command with a clean process state, or report why not (126/127).

    It gets 0, 1, 2 and ``pass_fds``; every other fd is closed. With ``init`` (``--pid``),
    fork first: this process stays PID 1 of the new namespace
    (:func:`sifpy.runtime.supervise.run_init`) and the command runs as its child.
    """
    try:
        for fd in (0, 1, 2):  # the command gets exactly 0, 1, 2: open them if the caller didn't
            try:
                os.fstat(fd)
            except OSError:
                os.dup2(os.open("/dev/null", os.O_RDWR), fd)
        # The report pipe and ``started`` stay open until the exec closes them.
        pass_fds = keep_only(pass_fds, [report, *([started] if started >= 0 else [])])
        child = os.fork() if init else 0
        if child != 0:
            for fd in pass_fds:  # only the command holds them (see LaunchOptions.pass_fds)
                os.close(fd)
            if started >= 0:  # the command's exec closes it (poststart), not init's life
                os.close(started)
            run_init(child)
        default_signals()
    except BaseException as exc:
        not_started(started)
        report_error(report, ExitStatus.LAUNCH_FAILED, f"can't prepare exec: {exc!r}")
        os._exit(ExitStatus.LAUNCH_FAILED)
    code, message = execvpe(argv, env)
    not_started(started)
    report_error(report, code, message)
    os._exit(code)


def keep_only(pass_fds: Sequence[int], close_on_exec: Sequence[int] = ()) -> list[int]:
    """Close every fd above 2 but ``pass_fds`` (made inheritable: the command gets them) and
    ``close_on_exec`` (closed by the exec itself); return the passed fds above 2. PEP 446
    does not cover fds that C code or set_inheritable() made inheritable; closerange uses
    close_range(2), one call per gap."""
    passed = [fd for fd in pass_fds if fd > 2]
    low = 3
    for fd in sorted({*passed, *close_on_exec}):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, mount.max_fd())
    for fd in passed:
        os.set_inheritable(fd, True)
    return passed


def default_signals() -> None:
    """Default dispositions and an empty mask for the command: Python ignores SIGPIPE (and
    SIG_IGN survives execve), so `yes | head` would spin."""
    for sig in range(1, signal.NSIG):
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            try:
                signal.signal(sig, signal.SIG_DFL)
            except (OSError, ValueError):
                pass
    ns.reset_reserved_signals()
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def execvpe(argv: list[str], env: dict[str, str]) -> tuple[int, str]:
    """``execvpe`` with ``env``'s PATH; returns only when it failed: the status (127 not
    found, 126 not executable) and the message."""
    cmd = argv[0]
    error: OSError | None = None
    cands = (
        [cmd]
        if "/" in cmd
        else [f"{d or '.'}/{cmd}" for d in env.get("PATH", DEFAULT_PATH).split(":")]
    )
    for cand in cands:
        try:
            os.execve(cand, argv, env)
        except (FileNotFoundError, NotADirectoryError) as exc:
            error = error if isinstance(error, PermissionError) else exc
        except OSError as exc:  # EACCES, ENOEXEC, ...: keep looking like execvp, remember it
            error = exc
    code = ExitStatus.NOT_FOUND
    reason = "command not found" if "/" not in cmd else "No such file or directory"
    if error is not None and not isinstance(error, (FileNotFoundError, NotADirectoryError)):
        code, reason = ExitStatus.NOT_EXECUTABLE, error.strerror or str(error)
    elif error is not None and "/" in cmd:
        reason = error.strerror or reason
    return code, f"can't execute: {cmd}: {reason}"

"""Run a command in a container: the one entry point both ``sifpy exec`` and the build's
``%post`` use.

Process structure (Charliecloud's order; one box per process)::

    caller (launch)          host namespaces; blocks the relayed signals, forwards those
    │                        sent by other processes, returns the container's status
    └─ monitor               unshare(user+mount), maps uid->uid (0 with fakeroot), sets
       │                     no_new_privs, pins every host path by fd, mounts the session
       │                     tmpfs and the image, then waits and relays like the caller
       ├─ squashfuse_ll -f   the FUSE server; PDEATHSIG=SIGKILL, own process group
       └─ container          builds the root (underlay + binds), pivot_root, exec(argv)

Why a monitor instead of unsharing the caller: ``unshare(CLONE_NEWUSER)`` fails in a threaded
process, and a build must keep its own namespaces between ``%post`` runs. ``sifpy exec`` is
neither, so there the caller does the monitor's work itself (``launch(inline=True)``: one
Python process less per start), except for real root, whose identity map must be written
from outside the new namespace. Why the monitor stays instead of exec'ing: the FUSE server
must live exactly as long as the container, and the container's exit status (or why it
could not start) must reach the caller.

Lifetimes: every mount lives only in the monitor's private mount namespace, which dies with
its last process; no directory is created on the host (the session is a tmpfs mounted over
``/tmp`` inside that namespace, after every host path the container needs has been opened).
If the caller is SIGKILLed, PDEATHSIG takes the monitor, which takes the server and the
container's first process.

Status: the command's exit status, 128+N if a signal N killed it, 127 (not found) or 126 (not
executable) when ``execve`` failed; those and set-up failures travel over a close-on-exec
pipe, which the successful ``execve`` closes.
"""

from __future__ import annotations

import os
import sys

from sifpy import TYPE_CHECKING
from sifpy.errors import ExitStatus, RuntimeSetupError, SifpyError
from sifpy.runtime import drivers, mount, ns, seccomp
from sifpy.runtime import plan as plan_
from sifpy.runtime.container import default_signals, execvpe, keep_only
from sifpy.runtime.session import own_by_root, set_up, stop_servers
from sifpy.runtime.spec import has_hooks, overlay_layers
from sifpy.runtime.start import Identity, Served, SifPartition, host_identity
from sifpy.runtime.supervise import WAITED, exit_code, report_error, start_of, supervise

if TYPE_CHECKING:
    import signal
    from collections.abc import Sequence
    from typing import Any, NoReturn

    from sifpy.runtime.spec import LaunchOptions, LaunchSpec
else:
    # The public signal module builds enums: +2.8 ms to exec's imports (python -X importtime
    # -I -S, 2-CPU Xeon); _signal has the same functions and constants as ints.
    import _signal as signal


# --- the caller ---------------------------------------------------------------------------


def launch(spec: LaunchSpec, inline: bool = False, served: Served | None = None) -> int:
    """Run ``spec.argv`` in the container and return its exit status.

    Raises :class:`RuntimeSetupError` (exit status 125) when the container could not be set
    up, :class:`ToolError` when squashfuse is missing. For 126/127 a one-line ``error:``
    message is written to stderr (the command's own stderr), as a shell would.

    ``inline``: the caller becomes the monitor (one process less on every start) and is left
    in the container's user and mount namespaces: only for a single-threaded process that
    exits right after, such as ``sifpy exec``. Real root's identity map still needs a
    process outside the namespace, so there the monitor is forked as usual.

    ``served``: the image, already served by the starter (which entered the namespaces,
    :func:`sifpy.runtime.start.adopt`); only with ``inline``, a SIF partition and the same
    ``fakeroot``.
    """
    if not spec.argv:
        raise RuntimeSetupError("can't execute: empty command")
    opts = spec.options
    if served is not None and not (
        inline
        and isinstance(spec.image, SifPartition)
        and served.fakeroot == opts.fakeroot
        and served.offset == spec.image.offset
        and not opts.subid
    ):
        raise RuntimeSetupError("can't start container: the served image does not match")
    ident = opts.identity or host_identity()
    driver = drivers.Driver("sandbox")
    if served is not None:
        driver = drivers.Driver("squashfuse")
    elif isinstance(spec.image, SifPartition):
        driver = drivers.choose(opts.mount_driver, opts.squashfuse)
        if driver.program:  # before the session covers /tmp, where it may be installed
            mount.preopen(driver.program)
    elif not os.path.isdir(spec.image.path):
        raise RuntimeSetupError(f"can't use sandbox: {spec.image.path}: not a directory")
    _prepare_dirs(opts)
    # Real root, as uid 0 inside: map every id to itself, so the image's other owners (e.g.
    # Debian's _apt) stay real owners. Only a process still in the parent namespace may
    # write such a map, so the monitor unshares and waits while we write it (handshake).
    identity_map = served is None and os.getuid() == 0 and (opts.fakeroot or ident.uid == 0)
    identity_map = identity_map and ns.in_initial_userns()
    subids = None
    if opts.subid and opts.fakeroot and not identity_map:
        from sifpy.runtime import subid

        subids = subid.ranges(ident.name, ident.uid, ident.gid)
    sync = (*os.pipe(), *os.pipe()) if identity_map or subids else None
    read_end, write_end = os.pipe()  # both close-on-exec (PEP 446)
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, WAITED)
    try:
        if inline and sync is None:
            status = _monitor_inline(spec, ident, driver, write_end, served)
        else:
            caller = os.getpid()
            pid = os.fork()
            if pid == 0:
                os.close(read_end)
                _monitor(spec, ident, driver, write_end, caller, sync)
            os.close(write_end)
            if inline:  # this process only waits now: the command alone holds them
                for fd in opts.pass_fds:
                    if fd > 2:
                        os.close(fd)
            if sync is not None:
                _write_id_maps(pid, sync, ident, subids)
            status = supervise(pid, pid, reap_all=False)
        report = b""
        while chunk := os.read(read_end, 65536):
            report += chunk
    finally:
        os.close(read_end)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    if report:
        code_s, message, hint = report.decode(errors="replace").split("\0", 2)
        if int(code_s) == ExitStatus.LAUNCH_FAILED:
            raise RuntimeSetupError(message, hint or None)
        sys.stderr.write(f"error: {message}\n")
        sys.stderr.flush()
        return int(code_s)
    return exit_code(status)


def _write_id_maps(pid: int, sync: tuple[int, int, int, int], ident: Identity, subids: Any) -> None:
    """The caller's half of the handshake: wait for the monitor's new user namespace, write
    its id maps (real root: all ids to themselves; with subordinate ids: through the setuid
    newuidmap/newgidmap), let it go on. A monitor that failed first sends nothing."""
    unshared_r, unshared_w, mapped_r, mapped_w = sync
    os.close(unshared_w)
    os.close(mapped_r)
    try:
        if os.read(unshared_r, 1) == b"u":
            error = None
            if subids is not None:
                from sifpy.runtime import subid

                error = subid.write_maps(pid, ident.uid, ident.gid, subids)
            else:
                try:
                    for name in ("uid_map", "gid_map"):
                        with open(f"/proc/{pid}/{name}", "w") as f:
                            f.write("0 0 4294967295\n")
                except OSError as exc:
                    error = f"/proc/{pid}/{name}: {exc.strerror}"
            os.write(mapped_w, b"m" if error is None else b"e" + error.encode()[:1000])
    except OSError:
        pass
    finally:
        os.close(unshared_r)
        os.close(mapped_w)


def _prepare_dirs(opts: LaunchOptions) -> None:
    """Check the options that name host directories; create what they need (as the caller,
    before any namespace: these are the user's own directories)."""
    bad = [n for n in opts.no_mount if n not in plan_.NO_MOUNT and not n.startswith("/")]
    if bad:
        raise RuntimeSetupError(
            f"can't skip mount: {', '.join(bad)}: unknown",
            f"use {', '.join(sorted(plan_.NO_MOUNT))} or an absolute path",
        )
    layers = overlay_layers(opts)
    if opts.writable and (opts.writable_tmpfs or layers):
        raise RuntimeSetupError("can't use --writable with --writable-tmpfs or --overlay")
    if sum(w for _, w in layers) > 1:
        raise RuntimeSetupError(
            "can't use overlays: more than one is writable", "add :ro to all but one --overlay"
        )
    subdirs: list[tuple[str | None, tuple[str, ...]]] = [
        (path, ("upper", "work")) for path, w in layers if w and os.path.isdir(path)
    ]
    if opts.contain:
        subdirs.append((opts.workdir, ("tmp", "var_tmp", "home")))
    for base, names in subdirs:
        if base is None:
            continue
        if not os.path.isdir(base):
            raise RuntimeSetupError(f"can't use directory: {base}: not a directory")
        for name in names:
            try:
                os.makedirs(os.path.join(base, name), 0o700, exist_ok=True)
            except OSError as exc:
                raise RuntimeSetupError(f"can't create: {base}/{name}: {exc.strerror}") from exc


# --- the monitor --------------------------------------------------------------------------


def _monitor(
    spec: LaunchSpec,
    ident: Identity,
    driver: drivers.Driver,
    report: int,
    caller: int,
    sync: tuple[int, int, int, int] | None = None,
) -> NoReturn:
    """The monitor process (see the module docstring); never returns."""
    servers: list[int] = []  # FUSE servers (image, overlay), killed when the container ends
    started: list[int] = []
    try:
        # If the caller is SIGKILLed, the kernel kills us, which kills the FUSE server
        # and the container (both set PDEATHSIG on us in turn).
        ns.set_parent_death_signal(signal.SIGKILL)
        if os.getppid() != caller:
            os._exit(ExitStatus.LAUNCH_FAILED)
        pid, own_fd = set_up(spec, ident, driver, report, servers, sync, started=started)
        if started:  # poststart hooks (runtime.posthooks, imported by set_up)
            from sifpy.runtime import posthooks

            posthooks.post_start(spec, started, pid)
    except SifpyError as exc:
        report_error(report, ExitStatus.LAUNCH_FAILED, exc.message, exc.hint)
        stop_servers(servers)
        os._exit(ExitStatus.LAUNCH_FAILED)
    except BaseException as exc:
        report_error(report, ExitStatus.LAUNCH_FAILED, f"can't start container: {exc!r}")
        stop_servers(servers)
        os._exit(ExitStatus.LAUNCH_FAILED)
    status, late = _wait_and_stop(spec, pid, servers, own_fd)
    if late is not None:
        report_error(report, ExitStatus.LAUNCH_FAILED, late.message, late.hint)
        os._exit(ExitStatus.LAUNCH_FAILED)
    os._exit(exit_code(status))


def _wait_and_stop(
    spec: LaunchSpec, pid: int, servers: list[int], own_fd: int
) -> tuple[int, RuntimeSetupError | None]:
    """The monitor's end, forked or inline: wait for the container (relaying signals), run
    the poststop hooks, stop the servers, give a writable sandbox back to root; return the
    wait status and, if --runscript-timeout killed the action script, its error."""
    start = start_of(spec)
    status = supervise(pid, pid, reap_all=True, start=start)
    if has_hooks(spec.options):
        from sifpy.runtime import posthooks

        posthooks.post_stop(spec, pid)
    stop_servers(servers)
    if own_fd >= 0:
        own_by_root(own_fd)
    return status, (start.error() if start is not None and start.killed is not None else None)


def _monitor_inline(
    spec: LaunchSpec,
    ident: Identity,
    driver: drivers.Driver,
    report: int,
    served: Served | None = None,
) -> int:
    """The monitor's work in the caller itself (``launch(inline=True)``); returns the
    container's wait status. Set-up errors are raised, not reported; the report pipe's write
    end is closed here, once the container holds its own copy."""
    servers: list[int] = []
    started: list[int] = []
    try:
        pid, own_fd = set_up(spec, ident, driver, report, servers, None, served, started=started)
    except SifpyError:
        stop_servers(servers)
        raise
    except Exception as exc:  # as the forked monitor reports it: never a traceback
        stop_servers(servers)
        raise RuntimeSetupError(f"can't start container: {exc!r}") from exc
    finally:
        os.close(report)
    if started:  # poststart hooks (runtime.posthooks, imported by set_up)
        from sifpy.runtime import posthooks

        posthooks.post_start(spec, started, pid)
    status, late = _wait_and_stop(spec, pid, servers, own_fd)
    if late is not None:
        raise late
    return status


def set_up_keeper(
    spec: LaunchSpec,
    ident: Identity,
    driver: drivers.Driver,
    report: int,
    servers: list[int],
    keeper: int,
) -> int:
    """Set up a container whose first process keeps it instead of running a command (see
    :func:`sifpy.runtime.container.first_process`'s ``keeper``), in this process as its
    monitor; return its pid. The image's servers go to ``servers``."""
    _prepare_dirs(spec.options)
    pid, _own = set_up(spec, ident, driver, report, servers, None, keeper=keeper)
    return pid


# --- joining a container -----------------------------------------------------------------


def exec_joined(argv: list[str], env: dict[str, str], pass_fds: Sequence[int] = ()) -> NoReturn:
    """Become ``argv`` in a container this process joined (:mod:`sifpy.runtime.sharens`):
    the same clean process state as a container's command (0, 1, 2 and ``pass_fds`` only,
    default signals, no_new_privs, the payload's seccomp filter); on failure, the error on
    stderr and exit 126 or 127, as a shell would."""
    try:
        ns.set_no_new_privs()
        seccomp.install_payload_filter(False)
        keep_only(pass_fds)
        default_signals()
    except BaseException as exc:
        os.write(2, f"error: can't prepare exec: {exc!r}\n".encode(errors="replace"))
        os._exit(ExitStatus.LAUNCH_FAILED)
    code, message = execvpe(argv, env)
    os.write(2, f"error: {message}\n".encode(errors="replace"))
    os._exit(code)

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

import gc
import os
import stat
import sys
import time as _time

from sifpy import TYPE_CHECKING
from sifpy.errors import ExitStatus, RuntimeSetupError, SifpyError
from sifpy.runtime import drivers, mount, ns, seccomp
from sifpy.runtime import plan as plan_
from sifpy.runtime.start import (
    DEFAULT_PATH,
    FUSE_SINGLE_THREAD,
    SERVER,
    SQUASHFUSE,
    Identity,
    Sandbox,
    Served,
    SifPartition,
    enter,
    host_identity,
)
from sifpy.util import log
from sifpy.util.record import Record

if TYPE_CHECKING:
    import signal
    from collections.abc import Sequence
    from typing import Any, NoReturn

    from sifpy.runtime import overlays
    from sifpy.runtime.gpu import Injection
    from sifpy.runtime.mpibind import HostMpi
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
_SI_KERNEL = 0x80
_WAITED = FORWARDED | {signal.SIGCHLD}

# Inside the monitor's mount namespace: a tmpfs over /tmp holds the image mount, the
# container root and generated files. /tmp always exists, and host /tmp is pinned first.
_SESSION = "/tmp"
_BUNDLE = f"{_SESSION}/bundle"  # the OCI bundle CDI hooks are given (runtime.hooks)
_IMAGE = f"{_SESSION}/image"
_ROOT = f"{_SESSION}/root"
_FILES = f"{_SESSION}/files"
_RW = f"{_SESSION}/rw"  # --writable-tmpfs: a size-capped tmpfs; --overlay: DIR bound here
_OVERLAY = f"{_SESSION}/overlay"  # the overlay root: lower = _IMAGE, upper = _RW/upper

# What a confined payload (a build's %post) keeps: Docker's default capability set (moby
# oci/caps/defaults.go) less CAP_NET_RAW, as Podman leaves it out (raw sockets on the host
# network a build shares; ping uses ICMP sockets). Enough for dpkg and apt (chown, setuid to
# _apt, mknod of FIFOs...); none of CAP_SYS_ADMIN (mount, remount), CAP_NET_ADMIN,
# CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH. The bounding set is cut to it too (runc's rule).
DOCKER_CAPS = sum(
    1 << cap
    for cap in (
        0,  # CAP_CHOWN
        1,  # CAP_DAC_OVERRIDE
        3,  # CAP_FOWNER
        4,  # CAP_FSETID
        5,  # CAP_KILL
        6,  # CAP_SETGID
        7,  # CAP_SETUID
        8,  # CAP_SETPCAP
        10,  # CAP_NET_BIND_SERVICE
        18,  # CAP_SYS_CHROOT
        27,  # CAP_MKNOD
        29,  # CAP_AUDIT_WRITE
        31,  # CAP_SETFCAP
    )
)


class LaunchOptions(Record):
    """How much of the host the container sees, and as whom it runs."""

    __slots__ = (
        "fakeroot",
        "contain",
        "pid_ns",
        "no_init",
        "ipc_ns",
        "writable",
        "home",
        "home_dest",
        "no_home",
        "writable_tmpfs",
        "overlay",
        "overlays",
        "overlay_driver",
        "tmpfs_size_mb",
        "no_mount",
        "workdir",
        "mount_driver",
        "squashfuse",
        "fuse_single_thread",
        "identity",
        "passwd",
        "subid",
        "own_root_after",
        "prefetch",
        "confine",
        "inject",
        "hooks",
        "annotations",
        "mpi",
        "pass_fds",
        "pwd",
        "uts_ns",
        "net_ns",
        "hostname",
        "rlimits",
        "caps",
        "gate",
        "oci_id",
        "oci_bundle",
        "masked_paths",
        "readonly_paths",
        "start_timeout",
    )

    def __init__(
        self,
        fakeroot: bool = False,  # uid/gid 0 inside (mapped to the caller's)
        contain: bool = False,  # minimal /dev, private tmpfs /tmp, /var/tmp and $HOME
        pid_ns: bool = False,  # new PID namespace (fresh /proc) with an init as PID 1
        no_init: bool = False,  # with pid_ns: the command itself is PID 1 (no reaping init)
        ipc_ns: bool = False,  # new IPC namespace
        writable: bool = False,  # sandbox only: the root is the sandbox itself, read-write
        home: str | None = None,  # host home to bind (default: the caller's from passwd)
        home_dest: str | None = None,  # where it appears (default: same path)
        no_home: bool = False,
        writable_tmpfs: bool = False,  # overlay with a tmpfs upper layer (gone after the run)
        overlay: str | None = None,  # overlay with DIR/upper, DIR/work on the host (persistent)
        # Every --overlay in order (runtime.overlays): (a directory or an ext3 image, writable);
        # ``overlay`` above is one more writable directory, after these.
        overlays: tuple[tuple[str, bool], ...] = (),
        overlay_driver: str = "auto",  # auto | kernel | fuse (fuse-overlayfs)
        tmpfs_size_mb: int = 64,  # the --writable-tmpfs cap (Apptainer's sessiondir max size)
        no_mount: tuple[str, ...] = (),  # default mounts to skip: plan.NO_MOUNT names, system binds
        workdir: str
        | None = None,  # with contain: /tmp, /var/tmp, home from DIR/{tmp,var_tmp,home}
        mount_driver: str = "auto",  # auto | squashfuse | kernel | python | unsquash
        squashfuse: str = SQUASHFUSE,
        fuse_single_thread: bool = FUSE_SINGLE_THREAD,
        identity: Identity | None = None,  # default: looked up with host_identity()
        passwd: bool = True,  # bind generated /etc/passwd and /etc/group (builds: the image's own)
        subid: bool = False,  # with fakeroot: map ids 1..N to the user's /etc/subuid range if any
        own_root_after: bool = False,  # writable sandbox: afterwards, chown every file to root
        prefetch: tuple[str, ...] = (),  # programs to read ahead on a FUSE mount (mount.prefetch)
        # A build's %post: Docker's default capabilities, no new user namespace, /sys read-only,
        # copies of the host's /etc files instead of binds (see DOCKER_CAPS, seccomp, plan).
        confine: bool = False,
        inject: Injection | None = None,  # GPU/CDI devices and driver files (runtime.gpu)
        # OCI hooks from hooks.d directories (runtime.hooksd.matching), run after the CDI ones,
        # and the annotations the hooks' state and bundle carry.
        hooks: tuple[dict[str, object], ...] = (),
        annotations: tuple[tuple[str, str], ...] = (),
        mpi: HostMpi | None = None,  # --mpi: the host's MPI to bind over the image's (mpibind)
        # fds above 2 the command inherits at the same numbers (subprocess's pass_fds): the
        # caller's, such as an MPI launcher's PMI socket. Every other fd is closed at exec, and
        # the monitor closes its copies once the container has them (a pipe's reader then sees
        # end-of-file when the command closes it).
        pass_fds: tuple[int, ...] = (),
        # --pwd/--cwd: the working directory inside the container; it must exist there (an
        # error, as Apptainer's "failed to set working directory", not a fallback to home).
        pwd: str | None = None,
        # What an OCI bundle's config.json may ask for (runtime.bundle): new UTS and network
        # namespaces, a hostname (needs the UTS one), resource limits as (RLIMIT_*, soft, hard).
        uts_ns: bool = False,
        net_ns: bool = False,
        hostname: str | None = None,
        rlimits: tuple[tuple[int, int, int], ...] = (),
        caps: int | None = None,  # a capability bounding set for the command (a mask)
        # An OCI runtime's create/start split (runtime.oci): (ready, gate) fds. The monitor
        # writes ``p<pid>\n`` (the container's pid) to ``ready``; the container, once its root
        # is entered and nothing but the exec is left, writes ``r\n`` and blocks reading ``gate``
        # until ``start`` writes to it (end of file instead: it was deleted, it exits).
        gate: tuple[int, int] = (-1, -1),
        # An OCI runtime's container: its id and bundle directory, which the hooks' state gives
        # instead of sifpy exec's (an id from the pid, a bundle the runtime writes).
        oci_id: str | None = None,
        oci_bundle: str | None = None,
        # config.json's linux.maskedPaths and linux.readonlyPaths (runtime.ocipaths).
        masked_paths: tuple[str, ...] = (),
        readonly_paths: tuple[str, ...] = (),
        # --runscript-timeout in seconds (Apptainer's default: 60): the action script
        # (``argv``) must have exec'd its command by then, else it is killed (_expire).
        start_timeout: float | None = None,
    ) -> None:
        self.fakeroot = fakeroot
        self.contain = contain
        self.pid_ns = pid_ns
        self.no_init = no_init
        self.ipc_ns = ipc_ns
        self.writable = writable
        self.home = home
        self.home_dest = home_dest
        self.no_home = no_home
        self.writable_tmpfs = writable_tmpfs
        self.overlay = overlay
        self.overlays = overlays
        self.overlay_driver = overlay_driver
        self.tmpfs_size_mb = tmpfs_size_mb
        self.no_mount = no_mount
        self.workdir = workdir
        self.mount_driver = mount_driver
        self.squashfuse = squashfuse
        self.fuse_single_thread = fuse_single_thread
        self.identity = identity
        self.passwd = passwd
        self.subid = subid
        self.own_root_after = own_root_after
        self.prefetch = prefetch
        self.confine = confine
        self.inject = inject
        self.hooks = hooks
        self.annotations = annotations
        self.mpi = mpi
        self.pass_fds = pass_fds
        self.pwd = pwd
        self.uts_ns = uts_ns
        self.net_ns = net_ns
        self.hostname = hostname
        self.rlimits = rlimits
        self.caps = caps
        self.gate = gate
        self.oci_id = oci_id
        self.oci_bundle = oci_bundle
        self.masked_paths = masked_paths
        self.readonly_paths = readonly_paths
        self.start_timeout = start_timeout


DEFAULT_OPTIONS = LaunchOptions()  # shared: records are never changed in place (replace)


class LaunchSpec(Record):
    """Everything :func:`launch` needs; ``env`` is the command's final environment."""

    __slots__ = ("image", "argv", "env", "cwd", "binds", "options")

    def __init__(
        self,
        image: SifPartition | Sandbox,
        argv: list[str],
        env: dict[str, str],
        cwd: str,
        binds: Sequence[tuple[str, str, bool]] = (),
        options: LaunchOptions = DEFAULT_OPTIONS,
    ) -> None:
        self.image = image
        self.argv = argv
        self.env = env
        self.cwd = cwd
        self.binds = binds
        self.options = options


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
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _WAITED)
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
            status = _supervise(pid, pid, reap_all=False)
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
    return _exit_code(status)


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
    layers = _layers(opts)
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


def _layers(opts: LaunchOptions) -> tuple[tuple[str, bool], ...]:
    return (*opts.overlays, (opts.overlay, True)) if opts.overlay else opts.overlays


def _exit_code(status: int) -> int:
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


class _Start:
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


def _start_of(spec: LaunchSpec) -> _Start | None:
    seconds = spec.options.start_timeout
    return None if seconds is None else _Start(seconds, list(spec.argv))


def _supervise(main: int, forward_to: int, reap_all: bool, start: _Start | None = None) -> int:
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
            info = signal.sigwaitinfo(_WAITED)
        else:
            timed = signal.sigtimedwait(_WAITED, max(0.0, deadline - _time.monotonic()))
            if timed is None:
                assert start is not None
                deadline = None
                start.killed = _expire(main, start.argv)
                continue
            info = timed
        if info.si_signo != signal.SIGCHLD:
            if info.si_code != _SI_KERNEL:
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


def _report(fd: int, code: int, message: str, hint: str | None = None) -> None:
    # One write below PIPE_BUF is atomic, so a report is never interleaved.
    data = f"{code}\0{message[:3000]}\0{(hint or '')[:800]}".encode(errors="replace")
    try:
        os.write(fd, data)
    except OSError:
        pass


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
        pid, own_fd = _set_up(spec, ident, driver, report, servers, sync, started=started)
        _post_start(spec, started, pid)
    except SifpyError as exc:
        _report(report, ExitStatus.LAUNCH_FAILED, exc.message, exc.hint)
        _stop(servers)
        os._exit(ExitStatus.LAUNCH_FAILED)
    except BaseException as exc:
        _report(report, ExitStatus.LAUNCH_FAILED, f"can't start container: {exc!r}")
        _stop(servers)
        os._exit(ExitStatus.LAUNCH_FAILED)
    start = _start_of(spec)
    status = _supervise(pid, pid, reap_all=True, start=start)
    _post_stop(spec, pid)
    _stop(servers)
    if own_fd >= 0:
        _own_by_root(own_fd)
    if start is not None and start.killed is not None:
        late = start.error()
        _report(report, ExitStatus.LAUNCH_FAILED, late.message, late.hint)
        os._exit(ExitStatus.LAUNCH_FAILED)
    os._exit(_exit_code(status))


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
        pid, own_fd = _set_up(spec, ident, driver, report, servers, None, served, started=started)
    except SifpyError:
        _stop(servers)
        raise
    except Exception as exc:  # as the forked monitor reports it: never a traceback
        _stop(servers)
        raise RuntimeSetupError(f"can't start container: {exc!r}") from exc
    finally:
        os.close(report)
    _post_start(spec, started, pid)
    start = _start_of(spec)
    status = _supervise(pid, pid, reap_all=True, start=start)
    _post_stop(spec, pid)
    _stop(servers)
    if own_fd >= 0:
        _own_by_root(own_fd)
    if start is not None and start.killed is not None:
        raise start.error()
    return status


def _all_hooks(spec: LaunchSpec) -> list[dict[str, object]]:
    """Every OCI hook of this start: the CDI devices' first, then the hooks.d ones."""
    inj = spec.options.inject
    cdi = inj.hooks if inj is not None else []
    return [*cdi, *spec.options.hooks] if spec.options.hooks else cdi


def _hooks(spec: LaunchSpec, stage: str) -> list[dict[str, object]]:
    """The hooks of ``stage`` this start runs (see :mod:`.hooks`)."""
    return [h for h in _all_hooks(spec) if h["stage"] == stage]


def _post_start(spec: LaunchSpec, started: list[int], pid: int) -> None:
    """The runtime spec's ``poststart`` hooks, once the command was exec'd (its exec closed
    the pipe's last write end), in this monitor's mount namespace, where the bundle and the
    container's root are (as for ``createContainer``). A container that failed before its
    exec wrote to the pipe (:func:`_not_started`): it never started, nothing runs."""
    failed = False
    for fd in started:
        try:
            while os.read(fd, 64):
                failed = True
        finally:
            os.close(fd)
    if started and not failed:
        _after(spec, "poststart", pid)


def _post_stop(spec: LaunchSpec, pid: int) -> None:
    """The runtime spec's ``poststop`` hooks, once the container has ended, before its
    image is unmounted."""
    if _hooks(spec, "poststop"):
        _after(spec, "poststop", pid)
    if spec.options.pid_ns and _hooks_after(spec):
        from sifpy.runtime import outside

        outside.stop()


def _hooks_after(spec: LaunchSpec) -> bool:
    return bool(_hooks(spec, "poststart") or _hooks(spec, "poststop"))


def _after(spec: LaunchSpec, stage: str, pid: int) -> None:
    """Run ``stage`` (poststart or poststop): through the helper outside the PID namespace
    when there is one (:mod:`.outside`), else here."""
    if spec.options.pid_ns:
        from sifpy.runtime import outside

        if outside.ask(stage, pid):
            return
    _run_after(spec, stage, pid)


def _run_after(spec: LaunchSpec, stage: str, pid: int) -> None:
    from sifpy.runtime import hooks as hooks_

    hooks_.run_logged(
        _hooks(spec, stage),
        (stage,),
        spec.options.oci_bundle or _BUNDLE,
        "running" if stage == "poststart" else "stopped",
        dict(spec.options.annotations),
        pid,
        spec.options.oci_id,
    )


def _not_started(started: int) -> None:
    """Tell the monitor's :func:`_post_start` that the command will not run."""
    if started >= 0:
        try:
            os.write(started, b"f")
        except OSError:
            pass


def _set_up(
    spec: LaunchSpec,
    ident: Identity,
    driver: drivers.Driver,
    report: int,
    servers: list[int],
    sync: tuple[int, int, int, int] | None,
    served: Served | None = None,
    keeper: int = -1,
    started: list[int] | None = None,
) -> tuple[int, int]:
    """Enter the namespaces (unless ``served`` did), mount the image (its servers go to
    ``servers``) and fork the container; return its pid and, for ``own_root_after``, the
    sandbox's fd (else -1). ``keeper``: the container keeps its root instead of running
    ``spec.argv`` (see :func:`_container`)."""
    opts = spec.options
    image = spec.image
    # Namespaces besides user and mount, made with them (the container's own).
    flags = ns.CLONE_NEWIPC if opts.ipc_ns else 0
    flags |= (ns.CLONE_NEWUTS if opts.uts_ns else 0) | (ns.CLONE_NEWNET if opts.net_ns else 0)
    image_fd = kernel_fd = -1
    if served is not None:
        if flags:
            ns.unshare(flags)
    else:
        image_fd = _open_image(image) if isinstance(image, SifPartition) else -1
        # Real root: the kernel mounts the squashfs now, detached, in the initial user
        # namespace (no user namespace may mount a block device); attached below.
        if isinstance(image, SifPartition) and driver.name == "kernel":
            kernel_fd = drivers.kernel_squashfs(image_fd, image.offset, image.size)

        handshake = None if sync is None else lambda: _await_id_maps(sync)
        enter(opts.fakeroot, flags, handshake)
    # Pin every host path now: bind sources must be opened in *this* mount namespace
    # (the kernel refuses to bind from a mount of another one), and before /tmp is
    # covered by the session tmpfs. Likewise the Python FUSE server imports its modules.
    own_fd = -1
    if isinstance(image, Sandbox):
        image_fd = plan_.pin(image.path, "sandbox")
        if opts.own_root_after and opts.writable:
            own_fd = os.open(image.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    cwd_fd = plan_.pin(spec.cwd, "cwd") if os.path.isdir(spec.cwd) else -1
    plan = plan_.plan(spec, ident)
    seccomp.prepare_payload_filter(opts.confine)  # here, not in the forked container (~0.3 ms)
    if opts.rlimits:  # used by the container after pivot_root (ns.set_rlimit)
        import resource  # noqa: F401
    if opts.mpi is not None:  # its files, and the module itself (see hooks below)
        from sifpy.runtime import mpibind

        mpibind.pin(opts.mpi)
    if opts.hooks or (opts.inject is not None and opts.inject.hooks):
        # Imported now: the session tmpfs may cover the package's directory (under /tmp).
        from sifpy.runtime import hooks  # noqa: F401

        if opts.pid_ns and _hooks_after(spec):
            from sifpy.runtime import outside
    if opts.masked_paths or opts.readonly_paths:  # used after pivot_root
        from sifpy.runtime import ocipaths  # noqa: F401
    # An OCI runtime's bundle under /tmp: shown again over the session (for its hooks).
    bundle_fd = plan_.pin(opts.oci_bundle, "bundle") if opts.oci_bundle else -1
    if bundle_fd >= 0:
        from sifpy.runtime import ocimount  # before the session covers the package
    layers: list[overlays.Layer] = []
    if _layers(opts):
        # Imported here, before the session covers /tmp (sifpy may be installed there).
        from sifpy.runtime import overlays

        layers = overlays.open_layers(_layers(opts), opts.fakeroot)
    if isinstance(image, SifPartition) and driver.name == "python":
        serve = drivers.python_server(image_fd, image.offset)
    ns.mount("tmpfs", _SESSION, "tmpfs", ns.MS_NOSUID | ns.MS_NODEV, "mode=0700", "session")
    # Unbindable: a recursive bind of a host directory above it (host /tmp, or a user's
    # bind of /) prunes the session instead of copying it into the container.
    ns.mount(None, _SESSION, None, ns.MS_UNBINDABLE, what="session (make unbindable)")
    os.mkdir(_IMAGE)
    os.mkdir(_FILES)
    # The generated files are bind sources, so they need a mount that is not unbindable.
    ns.mount("tmpfs", _FILES, "tmpfs", ns.MS_NOSUID | ns.MS_NODEV, "mode=0755", "files")
    if bundle_fd >= 0:
        taken = {os.path.basename(p) for p in (_BUNDLE, _IMAGE, _ROOT, _FILES, _RW, _OVERLAY)}
        ocimount.show_bundle(bundle_fd, str(opts.oci_bundle), _SESSION, taken)
        os.close(bundle_fd)
    if served is not None:
        servers.append(_attach_served(served))
    elif not isinstance(image, SifPartition):
        mount.bind(mount.fd_path(image_fd), _IMAGE, readonly=not opts.writable, what="sandbox")
    elif driver.name == "kernel":
        ns.move_mount(kernel_fd, _IMAGE)
        os.close(kernel_fd)
    elif driver.name == "python":
        servers.append(mount.fuse_mount(_IMAGE, "sifpy-squashfs", [image_fd], serve, True))
    elif driver.name == "unsquash":
        drivers.extract(image_fd, image.offset, _IMAGE, driver.program)
    else:
        servers.append(
            mount.mount_squashfs(
                image_fd,
                image.offset,
                _IMAGE,
                driver.program,
                opts.fuse_single_thread and driver.program != SERVER,  # sifpy's own: threads
            )
        )
    if image_fd >= 0:
        os.close(image_fd)
    if opts.writable_tmpfs or layers:
        try:
            _mount_overlay(opts, layers, servers)
        finally:
            if layers:
                overlays.close(layers)  # a served image stays locked by its server
    # Before unshare(CLONE_NEWPID): after it, this process can't start threads.
    if opts.prefetch and driver.name in ("squashfuse", "python") and served is None:
        root_fd = os.open(_IMAGE, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        mount.prefetch(root_fd, opts.prefetch, spec.env.get("PATH", DEFAULT_PATH))
    if opts.pid_ns:
        if _hooks_after(spec):  # see runtime.outside: they can't run in the new namespace
            from sifpy.runtime import outside

            outside.start(lambda stage, pid: _run_after(spec, stage, pid))
        ns.unshare(ns.CLONE_NEWPID)  # our next child is PID 1 of a new namespace
    me = os.getpid()
    # poststart hooks: a pipe whose write end the command's exec closes (started).
    start_r, start_w = os.pipe() if started is not None and _hooks(spec, "poststart") else (-1, -1)
    pid = os.fork()
    if pid == 0:
        if start_r >= 0:
            os.close(start_r)
        _container(spec, ident, plan, cwd_fd, report, me, keeper, start_w)
    if opts.gate[0] >= 0:
        os.write(opts.gate[0], f"p{pid}\n".encode())
    if start_w >= 0:
        os.close(start_w)
        assert started is not None
        started.append(start_r)
    # Close what only the container needed; keep the report pipe until it is done.
    for fd in [m.fd for m in plan] + [cwd_fd]:
        if fd >= 0:
            os.close(fd)
    if opts.mpi is not None:
        mpibind.close(opts.mpi)
    for fd in opts.pass_fds:
        if fd > 2:
            os.close(fd)
    return pid, own_fd


def set_up_keeper(
    spec: LaunchSpec,
    ident: Identity,
    driver: drivers.Driver,
    report: int,
    servers: list[int],
    keeper: int,
) -> int:
    """Set up a container whose first process keeps it instead of running a command (see
    :func:`_container`'s ``keeper``), in this process as its monitor; return its pid. The
    image's servers go to ``servers``."""
    _prepare_dirs(spec.options)
    pid, _own = _set_up(spec, ident, driver, report, servers, None, keeper=keeper)
    return pid


def report_error(fd: int, code: int, message: str, hint: str | None = None) -> None:
    """Write a set-up failure to a report pipe (:func:`launch` reads the same format)."""
    _report(fd, code, message, hint)


def enter_cwd(spec: LaunchSpec, ident: Identity) -> str:
    """Change to the command's working directory inside the container, or to its fallback
    (home, then /); return it."""
    return _enter_cwd(spec, ident)


def _await_id_maps(sync: tuple[int, int, int, int]) -> None:
    """The monitor's half of the handshake (:func:`_write_id_maps`), right after unshare."""
    unshared_r, unshared_w, mapped_r, mapped_w = sync
    os.close(unshared_r)
    os.close(mapped_w)
    os.write(unshared_w, b"u")
    answer = os.read(mapped_r, 1024)
    if answer != b"m" or os.getuid() != 0:
        why = answer[1:].decode(errors="replace") or "the caller did not map them"
        raise RuntimeSetupError(f"can't map user ids: {why}")
    os.close(unshared_w)
    os.close(mapped_r)


def _attach_served(served: Served) -> int:
    """Attach the image the starter mounted (detached) on _IMAGE and
    wait until its server answers; return the server's pid."""
    mount_fd, pid = served.take()
    try:
        ns.move_mount(mount_fd, _IMAGE)
    except BaseException:
        mount.stop_server(pid)
        raise
    finally:
        os.close(mount_fd)
    try:
        mount.wait_served(_IMAGE, "squashfuse", pid)
    except RuntimeSetupError as exc:
        raise mount.squashfs_error(served.offset, exc) from exc
    return pid


def _own_by_root(root_fd: int) -> None:
    """Chown every entry of the sandbox to container root and make it owner-accessible.

    After a build step with subordinate ids, files owned by other container ids belong to
    the user's subordinate range on the host, where the user can neither read them (to
    pack the squashfs) nor delete them. Inside the namespace, root may change that. Walks
    by descriptor, never follows symlinks, never leaves the sandbox's file system.
    """
    dev = os.fstat(root_fd).st_dev
    for _dirpath, dirnames, filenames, dirfd in os.fwalk(".", dir_fd=root_fd):
        st = os.fstat(dirfd)
        if st.st_uid != 0 or st.st_gid != 0:
            os.fchown(dirfd, 0, 0)
        os.fchmod(dirfd, stat.S_IMODE(st.st_mode) | 0o700)
        for name in list(dirnames) + filenames:
            try:
                est = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
                if est.st_dev != dev:
                    if name in dirnames:
                        dirnames.remove(name)
                    continue
                if est.st_uid != 0 or est.st_gid != 0:
                    os.chown(name, 0, 0, dir_fd=dirfd, follow_symlinks=False)
                if stat.S_ISREG(est.st_mode):
                    os.chmod(name, stat.S_IMODE(est.st_mode) | 0o600, dir_fd=dirfd)
            except OSError:
                pass
    os.close(root_fd)


def _stop(servers: list[int]) -> None:
    for pid in reversed(servers):  # the overlay's server first: it reads the image
        if pid in _FLUSHED:
            from sifpy.runtime import overlays  # imported already (_set_up)

            overlays.stop([pid])
        else:
            mount.stop_server(pid)


def _open_image(image: SifPartition) -> int:
    try:
        image_fd = os.open(image.path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise RuntimeSetupError(f"can't open: {image.path}: {exc.strerror}") from exc
    if image.offset < 0 or image.offset + image.size > os.fstat(image_fd).st_size:
        raise RuntimeSetupError(
            f"can't mount: {image.path}: partition {image.offset}+{image.size} "
            "lies outside the file"
        )
    return image_fd


def _mount_overlay(opts: LaunchOptions, layers: list[overlays.Layer], servers: list[int]) -> None:
    """Mount the overlay on _OVERLAY: lower = the read-only --overlay layers (top first)
    over the image; upper and work in the writable --overlay (a directory or an ext3
    image, runtime.overlays), else in a size-capped tmpfs (--writable-tmpfs, or read-only
    layers only: the root is made read-only once assembled). Each server is added to
    ``servers`` as soon as it runs, so that an error later still stops it."""
    lowers: list[str] = []
    base = None
    fuse_layers = False
    if layers:
        from sifpy.runtime import overlays

        first = len(servers)
        try:
            lowers, base = overlays.mount_layers(layers, _SESSION, servers)
        finally:
            _FLUSHED.update(servers[first:])
        fuse_layers = len(servers) > first
    if base is None:
        base = _RW
        os.mkdir(_RW)
        data = f"mode=0755,size={opts.tmpfs_size_mb}m"
        ns.mount("tmpfs", _RW, "tmpfs", ns.MS_NOSUID | ns.MS_NODEV, data, "--writable-tmpfs")
    for name, mode in (("upper", 0o755), ("work", 0o700)):
        # An ext3 image with a plain file system gets them, as in Apptainer.
        if not os.path.isdir(f"{base}/{name}"):
            try:
                os.mkdir(f"{base}/{name}", mode)
            except OSError as exc:
                raise RuntimeSetupError(f"can't create: overlay {name}/: {exc.strerror}") from exc
    os.mkdir(_OVERLAY)
    owner = None if opts.fakeroot or os.getuid() == 0 else (os.getuid(), os.getgid())
    lower = ":".join([*lowers, _IMAGE])
    # Layers served by fuse2fs: not under the kernel's overlayfs, which refuses or breaks on
    # FUSE layers (Apptainer skips it likewise when a writable overlay sits on FUSE).
    driver = "fuse" if fuse_layers and opts.overlay_driver == "auto" else opts.overlay_driver
    pid = drivers.mount_overlay(
        lower, f"{base}/upper", f"{base}/work", _OVERLAY, driver, owner, noacl=fuse_layers
    )
    if pid:
        servers.append(pid)


# fuse2fs servers (runtime.overlays): stopped with SIGTERM, so that they write the image out.
_FLUSHED: set[int] = set()


# --- the container ------------------------------------------------------------------------


def _container(
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
        root = _assemble(spec, ident, plan, cwd_fd)
        hooks = _all_hooks(spec)
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
                hooks_.write_bundle(_BUNDLE, root, spec.argv, spec.env, annotations)
            stages = hooks_.BEFORE_PIVOT
            hooks_.run(hooks, stages, bundle or _BUNDLE, "creating", annotations, host_pid, cid)
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
        cwd = _enter_cwd(spec, ident)
        if hooks:
            hooks_.run(
                hooks, ("startContainer",), bundle or "/", "created", annotations, host_pid, cid
            )
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
        _not_started(started)
        _report(report, ExitStatus.LAUNCH_FAILED, exc.message, exc.hint)
        os._exit(ExitStatus.LAUNCH_FAILED)
    except BaseException as exc:
        _not_started(started)
        _report(report, ExitStatus.LAUNCH_FAILED, f"can't set up container: {exc!r}")
        os._exit(ExitStatus.LAUNCH_FAILED)
    del cwd
    opts = spec.options
    _exec(spec.argv, spec.env, report, opts.pid_ns and not opts.no_init, opts.pass_fds, started)


def _await_start(gate: tuple[int, int]) -> None:
    """The OCI ``created`` state: say so, then wait for ``start`` (see LaunchOptions.gate).
    The fds are closed by the exec (_keep_only)."""
    ready, wait = gate
    os.write(ready, b"r\n")
    if os.read(wait, 1) != b"s":  # the runtime went away without a start: never run
        os._exit(ExitStatus.LAUNCH_FAILED)


def _enter_cwd(spec: LaunchSpec, ident: Identity) -> str:
    # Inside the new root every lookup is confined by the kernel; fall back like Apptainer
    # (cwd not shared with --contain): home, then /. A --pwd has no fallback.
    home = spec.options.home_dest or spec.options.home or ident.home
    pwd = spec.options.pwd
    for cand in (pwd,) if pwd else (spec.cwd, home, "/"):
        try:
            os.chdir(cand)
        except OSError as exc:
            if pwd:
                raise RuntimeSetupError(
                    f"can't chdir: {pwd}: {exc.strerror}",
                    "give --pwd a directory that exists in the container",
                ) from exc
            continue
        # runc verifyCwd (CVE-2024-21626): the cwd must be reachable from the new root. A
        # path through an open directory fd (--pwd /proc/self/fd/N) can chdir outside it;
        # glibc's getcwd then fails with ENOENT (the kernel says "(unreachable)").
        try:
            inside = os.getcwd().startswith("/")
        except OSError:
            inside = False
        if not inside:
            raise RuntimeSetupError(
                f"can't chdir: {cand}: outside the container",
                "give a working directory inside the container (--pwd)",
            )
        return cand
    raise RuntimeSetupError(f"can't chdir: {spec.cwd}: not reachable in the container")


def _under(path: str, dest: str) -> bool:
    p, d = [c for c in path.split("/") if c], [c for c in dest.split("/") if c]
    return p[: len(d)] == d


def _assemble(spec: LaunchSpec, ident: Identity, plan: list[plan_.Mount], cwd_fd: int) -> str:
    """Build the container root under the session; return its path."""
    opts = spec.options
    image_fd = os.open(_IMAGE, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    if opts.mpi is not None:  # the image's libraries decide where the host's go
        from sifpy.runtime import mpibind

        plan += mpibind.mounts(opts.mpi, image_fd)
    # The cwd is shared unless --contain, or it is already visible (under another mount),
    # or the image has it (image content wins: a host cwd of /usr must not cover /usr).
    shown = any(_under(spec.cwd, m.dest) for m in plan if m.kind in ("bind", "tmpfs"))
    # With --writable the cwd is not shared where the sandbox lacks it (Apptainer skips the
    # mount rather than leave a directory behind in the sandbox).
    share_cwd = not opts.contain and "cwd" not in opts.no_mount and not opts.writable
    if cwd_fd >= 0 and share_cwd and spec.cwd != "/" and not shown:
        res = mount.resolve(image_fd, spec.cwd, reserved_stop=True)
        res.close()
        if res.missing:
            plan.append(plan_.Mount(spec.cwd, "bind", cwd_fd))
    if opts.writable:
        _stage_home(image_fd, spec, ident, plan)
    overlay = opts.writable_tmpfs or bool(_layers(opts))
    # Only read-only layers: the tmpfs upper takes the mount points, then the root is made
    # read-only like the underlay's (Apptainer's overlay without an upper layer).
    writable_root = opts.writable_tmpfs or any(w for _, w in _layers(opts))
    if opts.writable:
        root = _IMAGE
    elif overlay:
        root = _OVERLAY
        _reserve_dirs(root)
    else:
        root = _ROOT
        os.mkdir(root)
        ns.mount("tmpfs", root, "tmpfs", ns.MS_NOSUID | ns.MS_NODEV, "mode=0755", "root")
        nofollow = tuple(m.dest for m in plan if m.nofollow)
        expand = mount.expansions(image_fd, [m.dest for m in plan], nofollow)
        mount.build_underlay(_IMAGE, root, expand)
    _write_files(image_fd, ident, opts, plan)
    os.close(image_fd)
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    writable = {mount.mount_id(root_fd)}
    # Replacing an image's entry is for roots that vanish with the container (the tmpfs
    # underlay, --writable-tmpfs), not for the user's sandbox or --overlay directory.
    ephemeral = not opts.writable and not any(w for _, w in _layers(opts))
    # A --writable sandbox is the user's: a missing destination of theirs is an error, one
    # of the runtime's optional files is skipped (Apptainer's mountGeneric: "destination
    # doesn't exist in container", "Skipping mount"), nothing is created in it for them.
    sandbox = next(iter(writable)) if opts.writable else None
    user = frozenset(d for _, d, _ in spec.binds)
    host_dirs: set[int] = set()
    for m in plan:
        _apply(root_fd, m, writable, ephemeral, host_dirs, sandbox, m.dest in user)
    os.close(root_fd)
    if not opts.writable and not writable_root:
        mount.remount(root, readonly=True, what="container root")
    return root


def _stage_home(image_fd: int, spec: LaunchSpec, ident: Identity, plan: list[plan_.Mount]) -> None:
    """The home of a ``--writable`` sandbox, as Apptainer mounts it without a layer (its
    addHomeNoLayer, https://github.com/apptainer/apptainer/blob/main/internal/pkg/runtime/
    engine/apptainer/container_linux.go): a staging directory replaces the home's top-level
    directory, which the sandbox must have ("destination ... doesn't exist in container");
    nothing is created in the sandbox. Only when the home itself is missing there: an
    existing one is bound directly, hiding nothing else under its top-level directory."""
    opts = spec.options
    if opts.no_home or "home" in opts.no_mount:
        return
    dest = opts.home_dest or opts.home or ident.home
    at = next((i for i, m in enumerate(plan) if m.dest == dest), -1)
    if at < 0 or dest == "/":
        return
    res = mount.resolve(image_fd, dest)
    res.close()
    if not res.missing:
        return
    top = "/" + dest.strip("/").split("/", 1)[0]
    res = mount.resolve(image_fd, top)
    res.close()
    if res.missing and not (opts.home or opts.home_dest):
        # The caller's own home where the sandbox has no /home at all (a minimal root):
        # left out, where Apptainer fails; a --home asked for is an error as there.
        log.verbose(f"note: no {top} in the --writable sandbox: the home is not mounted")
        del plan[at]
        return
    if res.missing:
        raise RuntimeSetupError(
            f"can't mount home: {dest}: destination {top} doesn't exist in the container",
            f"with --writable sifpy can't create it: create {top} in the sandbox, or run "
            "without --writable",
        )
    plan.insert(at, plan_.Mount(top, "tmpfs", data="mode=0755"))


def _reserve_dirs(root: str) -> None:
    """In a writable root (the overlay), make the names the runtime always provides real
    directories: an image's ``/proc -> /etc`` or ``/dev -> /host/path`` symlink is replaced
    in the upper layer, never followed (runc refuses such images; this root is writable)."""
    for name in sorted(mount.RESERVED):
        path = f"{root}/{name}"
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        if st is None or not stat.S_ISDIR(st.st_mode):
            try:
                if st is not None:
                    os.unlink(path)
                os.mkdir(path, 0o755)
            except OSError as exc:
                raise RuntimeSetupError(
                    f"can't create mount point: /{name} in the overlay: {exc.strerror}",
                    "the image's / is not writable by you: use --fakeroot, or install "
                    "fuse-overlayfs",
                ) from exc


# What Apptainer skips, rather than fail, when its destination is missing in a --writable
# sandbox (the system binds, the generated files, /tmp and /var/tmp).
_OPTIONAL_IN_SANDBOX = frozenset(
    {"/etc/hosts", "/etc/localtime", "/etc/resolv.conf", "/etc/passwd", "/etc/group"}
    | {"/tmp", "/var/tmp"}
)


def _host_dir_bind(m: plan_.Mount) -> bool:
    """A writable bind of a host directory other than the kernel's (/dev, /proc, /sys): a
    missing mount point under it is created there, on the host, as the user (Apptainer
    creates one in a nested bind, a custom --home, --workdir's /tmp and /var/tmp)."""
    if m.kind != "bind" or not m.is_dir or m.readonly or not m.harden:
        return False
    return not any(_under(m.dest, d) for d in ("/dev", "/proc", "/sys"))


def _apply(
    root_fd: int,
    m: plan_.Mount,
    writable: set[int],
    ephemeral: bool = True,
    host_dirs: set[int] | None = None,
    sandbox: int | None = None,
    user: bool = False,
) -> None:
    """Make one mount of the plan, its destination resolved inside the root.

    A ``nofollow`` destination that is a symlink in the image is replaced by an empty file
    (in a writable, ``ephemeral`` root) and the mount lands on that, never on the target.
    Missing mount points are created in the container's own mounts (``writable``) and in
    host directories bound writable (``host_dirs``, to which a bind of one is added); in the
    ``--writable`` sandbox (mount id ``sandbox``) only for the runtime's own mounts."""
    host_dirs = set() if host_dirs is None else host_dirs
    allowed = frozenset(writable)
    if sandbox is not None and (user or m.dest in _OPTIONAL_IN_SANDBOX):
        probe = mount.resolve(root_fd, m.dest, follow_last=not m.nofollow)
        try:
            in_sandbox = bool(probe.missing) and mount.mount_id(probe.parent_fd) == sandbox
        finally:
            probe.close()
        if in_sandbox and not user:
            return
        if in_sandbox:
            raise RuntimeSetupError(
                f"can't mount: {m.dest}: destination doesn't exist in the container",
                f"sifpy never creates mount points in a --writable sandbox: create {m.dest} "
                "in it first, or run without --writable",
            )
    if m.kind == "symlink":
        parent, name = m.dest.rsplit("/", 1)
        res = mount.resolve(root_fd, parent or "/", "dir", frozenset(writable))
        try:
            where = (
                res.parent_fd
                if not res.name
                else os.open(
                    res.name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=res.parent_fd
                )
            )
            os.symlink(m.data, name, dir_fd=where)
        finally:
            res.close()
        return
    kind = "dir" if m.is_dir else "file"
    res = mount.resolve(
        root_fd, m.dest, kind, allowed, follow_last=not m.nofollow, host_mounts=frozenset(host_dirs)
    )
    try:
        if not res.name:
            raise RuntimeSetupError(f"can't mount: {m.dest}: that is the container root")
        if m.nofollow:
            _replace_symlink(res, m.dest, writable, ephemeral)
        tfd = os.open(res.name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=res.parent_fd)
        try:
            if stat.S_ISDIR(os.fstat(tfd).st_mode) != m.is_dir:
                kind = "a directory" if m.is_dir else "a file"
                raise RuntimeSetupError(
                    f"can't mount: {m.dest}: the source is {kind} but the destination is not"
                )
            target = mount.fd_path(tfd)
            over = mount.fd_path(res.parent_fd, res.name)  # crosses into the new mount
            if m.kind == "bind":
                mount.bind(
                    mount.fd_path(m.fd), target, m.readonly, m.harden, m.dest, over, not m.devices
                )
                if m.readonly and m.recursive:
                    # Without mount_setattr (Linux < 5.12) only the top is read-only; a
                    # confined payload still can't remount (no CAP_SYS_ADMIN).
                    ns.set_readonly_recursive(over, m.dest)
            elif m.kind == "file":
                mount.bind(f"{_FILES}/{m.data}", target, m.readonly, True, m.dest, over)
            elif m.kind == "tmpfs":
                ns.mount("tmpfs", target, "tmpfs", ns.MS_NOSUID | ns.MS_NODEV, m.data, m.dest)
            elif m.kind == "proc":
                flags = ns.MS_NOSUID | ns.MS_NODEV | ns.MS_NOEXEC
                ns.mount("proc", target, "proc", flags, what=m.dest)
            elif m.kind == "devpts":
                try:
                    flags = ns.MS_NOSUID | ns.MS_NOEXEC
                    ns.mount("devpts", target, "devpts", flags, "newinstance,ptmxmode=0666")
                except RuntimeSetupError:
                    mount.bind(mount.fd_path(m.fd), target, harden=False, what=m.dest)
            if m.kind in ("tmpfs", "devpts") or _host_dir_bind(m):
                new = os.open(res.name, os.O_PATH | os.O_NOFOLLOW, dir_fd=res.parent_fd)
                (writable if m.kind != "bind" else host_dirs).add(mount.mount_id(new))
                os.close(new)
        finally:
            os.close(tfd)
    finally:
        res.close()


def _replace_symlink(res: mount.Resolved, dest: str, writable: set[int], ephemeral: bool) -> None:
    """If ``res`` names a symlink, replace it with an empty regular file."""
    st = os.stat(res.name, dir_fd=res.parent_fd, follow_symlinks=False)
    if not stat.S_ISLNK(st.st_mode):
        return
    if not ephemeral or mount.mount_id(res.parent_fd) not in writable:
        raise RuntimeSetupError(
            f"can't mount: {dest}: it is a symlink in the image",
            "make it a regular file in the image: sifpy never mounts over a symlink's target",
        )
    os.unlink(res.name, dir_fd=res.parent_fd)
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    os.close(os.open(res.name, flags, 0o644, dir_fd=res.parent_fd))


def _init(child: int) -> NoReturn:
    """PID 1 of the container's PID namespace (tini's job): reap every zombie (orphans are
    re-parented to us), relay the signals the monitor forwards (they arrive from outside the
    namespace) to the command, and exit with its status (128+N if signal N killed it).

    The relayed signals are still blocked here (inherited), so sigwaitinfo takes them: the
    kernel would otherwise drop a signal that PID 1 does not handle. A terminal's signals
    reach the command directly (same process group) and are not relayed twice. When we
    exit, the kernel kills whatever is left in the namespace.
    """
    try:
        status = _supervise(child, child, reap_all=True)
    except BaseException:
        os._exit(ExitStatus.LAUNCH_FAILED)
    os._exit(_exit_code(status))


def _read_image_file(image_fd: int, path: str) -> str | None:
    fd = mount.open_in_root(image_fd, path)
    if fd is None:
        return None
    with os.fdopen(fd, "rb") as f:
        return f.read(1 << 20).decode(errors="replace")


def _write_files(
    image_fd: int, ident: Identity, opts: LaunchOptions, plan: list[plan_.Mount]
) -> None:
    """Generate /etc/passwd and /etc/group: the image's, plus the caller's entries; copy the
    host files the plan shows as copies (``file`` mounts with a pinned source)."""
    for m in plan:
        if m.kind == "file" and m.fd >= 0:
            with open(mount.fd_path(m.fd), "rb") as src, open(f"{_FILES}/{m.data}", "wb") as f:
                f.write(src.read(1 << 20))
            os.chmod(f"{_FILES}/{m.data}", 0o644)
    passwd = _read_image_file(image_fd, "/etc/passwd")
    group = _read_image_file(image_fd, "/etc/group")
    home = opts.home_dest or opts.home or ident.home
    pw_lines = (passwd or "").splitlines()
    gr_lines = (group or "").splitlines()
    if opts.fakeroot:
        uid, gid, entry = 0, 0, "root:x:0:0:root:/root:/bin/sh"
        gentry = "root:x:0:"
    else:
        uid, gid = ident.uid, ident.gid
        entry = f"{ident.name}:x:{uid}:{gid}:{ident.gecos}:{home}:{ident.shell}"
        gentry = f"{ident.group}:x:{gid}:{ident.name}"
    # Apptainer's rule: the caller's entry replaces a line with the same uid (uid 0 is kept).
    pw_lines = [ln for ln in pw_lines if _field(ln, 2) != str(uid) or uid == 0]
    if not any(_field(ln, 2) == str(uid) for ln in pw_lines):
        pw_lines.append(entry)
    if not any(_field(ln, 2) == str(gid) for ln in gr_lines):
        gr_lines.append(gentry)
    for name, lines in (("passwd", pw_lines), ("group", gr_lines)):
        with open(f"{_FILES}/{name}", "w") as f:
            f.write("".join(f"{ln}\n" for ln in lines))
        os.chmod(f"{_FILES}/{name}", 0o644)


def _field(line: str, i: int) -> str:
    parts = line.split(":")
    return parts[i] if len(parts) > i else ""


def _exec(
    argv: list[str],
    env: dict[str, str],
    report: int,
    init: bool = False,
    pass_fds: Sequence[int] = (),
    started: int = -1,
) -> NoReturn:
    """Exec the command with a clean process state, or report why not (126/127).

    It gets 0, 1, 2 and ``pass_fds``; every other fd is closed. With ``init`` (``--pid``),
    fork first: this process stays PID 1 of the new namespace (:func:`_init`) and the
    command runs as its child.
    """
    try:
        for fd in (0, 1, 2):  # the command gets exactly 0, 1, 2: open them if the caller didn't
            try:
                os.fstat(fd)
            except OSError:
                os.dup2(os.open("/dev/null", os.O_RDWR), fd)
        # The report pipe and ``started`` stay open until the exec closes them.
        pass_fds = _keep_only(pass_fds, [report, *([started] if started >= 0 else [])])
        child = os.fork() if init else 0
        if child != 0:
            for fd in pass_fds:  # only the command holds them (see LaunchOptions.pass_fds)
                os.close(fd)
            if started >= 0:  # the command's exec closes it (poststart), not init's life
                os.close(started)
            _init(child)
        _default_signals()
    except BaseException as exc:
        _not_started(started)
        _report(report, ExitStatus.LAUNCH_FAILED, f"can't prepare exec: {exc!r}")
        os._exit(ExitStatus.LAUNCH_FAILED)
    code, message = _execvpe(argv, env)
    _not_started(started)
    _report(report, code, message)
    os._exit(code)


def _keep_only(pass_fds: Sequence[int], close_on_exec: Sequence[int] = ()) -> list[int]:
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


def _default_signals() -> None:
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


def _execvpe(argv: list[str], env: dict[str, str]) -> tuple[int, str]:
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


def exec_joined(argv: list[str], env: dict[str, str], pass_fds: Sequence[int] = ()) -> NoReturn:
    """Become ``argv`` in a container this process joined (:mod:`sifpy.runtime.sharens`):
    the same clean process state as a container's command (0, 1, 2 and ``pass_fds`` only,
    default signals, no_new_privs, the payload's seccomp filter); on failure, the error on
    stderr and exit 126 or 127, as a shell would."""
    try:
        ns.set_no_new_privs()
        seccomp.install_payload_filter(False)
        _keep_only(pass_fds)
        _default_signals()
    except BaseException as exc:
        os.write(2, f"error: can't prepare exec: {exc!r}\n".encode(errors="replace"))
        os._exit(ExitStatus.LAUNCH_FAILED)
    code, message = _execvpe(argv, env)
    os.write(2, f"error: {message}\n".encode(errors="replace"))
    os._exit(code)

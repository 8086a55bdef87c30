"""Mount an image (a squashfs partition inside a SIF, or a sandbox directory) and assemble a
container root from it.

Everything here runs inside the container's private user+mount namespace (see
:mod:`sifpy.runtime.process` for the process structure), so every mount disappears when the
namespace's last process exits: nothing is ever unmounted by hand and nothing can leak to the
host's mount table.

**The container root is an "underlay"** (Apptainer's name; Charliecloud's ``ch-run`` does the
same for read-only images): a small tmpfs into which each top-level entry of the read-only
image is bind-mounted (directories and files) or copied (symlinks). Bind destinations that do
not exist in the image, such as ``/home/alice`` or ``/etc/localtime``, are created in that
tmpfs; when the missing path lies deeper (``/home`` exists in the image), that image directory
is *expanded*: replaced in the tmpfs by a directory whose entries are again binds of the
image's entries. We chose this over an overlay because it needs no second FUSE process
(fuse-overlayfs) nor a kernel that allows unprivileged overlayfs, keeps the image read-only,
and costs one bind per top-level entry (about 20 mounts for a typical image).

**Bind destinations are resolved inside the root**, component by component with ``openat``
and ``O_NOFOLLOW``: a symlink's target is re-rooted (an absolute target restarts at the
container root, ``..`` stops at it), so an image whose ``/data`` points to ``/etc`` or whose
``/tmp`` points to ``/home/user`` cannot make a mount or a ``mkdir`` land on the host. Missing
components are created only on mounts the runtime made itself (checked by mount id), never
on the image or a host directory.
"""

from __future__ import annotations

import os
import stat

from sifpy import TYPE_CHECKING
from sifpy.errors import RuntimeSetupError, ToolError
from sifpy.runtime import ns

if TYPE_CHECKING:
    import signal
    from collections.abc import Callable
    from typing import NoReturn
else:
    # The public signal module builds enums: +2.8 ms to exec's imports (python -X importtime
    # -I -S, 2-CPU Xeon); _signal has the same functions and constants as ints.
    import _signal as signal


def fd_path(fd: int, name: str | None = None) -> str:
    """The ``/proc/self/fd/N[/name]`` path that reaches an open file for path-based calls."""
    return f"/proc/self/fd/{fd}" if name is None else f"/proc/self/fd/{fd}/{name}"


# --- the image ----------------------------------------------------------------------------


# Helpers (squashfuse_ll, unsquashfs, fuse-overlayfs) are looked up in the system
# directories first, then in the absolute entries of $PATH; they run with this environment
# only: nothing of the caller's (LD_PRELOAD, LD_LIBRARY_PATH, PATH) or the image's reaches
# them (CVE-2025-23266 is the same mistake in a GPU hook).
SYSTEM_DIRS = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
HELPER_ENV = {"PATH": ":".join(SYSTEM_DIRS), "LC_ALL": "C"}


def find_program(name: str, path: str | None = None, hint: str | None = None) -> str:
    """Find the helper ``name`` (an absolute path, or searched as above) or raise
    :class:`ToolError`.

    Written out instead of ``shutil.which`` to keep ``shutil`` off the ``sifpy exec`` path.
    """
    if "/" in name:
        if os.access(name, os.X_OK):
            return os.path.abspath(name)
        raise ToolError(f"can't find: {name}: not an executable file")
    dirs = (path if path is not None else os.environ.get("PATH", "")).split(":")
    for d in [*SYSTEM_DIRS, *dirs]:
        if not d.startswith("/"):  # "", ".": never the current directory
            continue
        cand = os.path.join(d, name)
        if os.access(cand, os.X_OK) and not os.path.isdir(cand):
            return cand
    raise ToolError(
        f"can't find: {name}: not in {':'.join(SYSTEM_DIRS)} nor on PATH",
        hint
        or "install squashfuse (Debian: apt-get install squashfuse), or unpack the image "
        "into a sandbox directory",
    )


def max_fd() -> int:
    """An upper bound for ``os.closerange``: it uses close_range(2), so a high bound is free;
    without it (Linux < 5.9) CPython loops, so stay near the fd limit."""
    return max(os.sysconf("SC_OPEN_MAX"), 65536)


def _move_fds(fds: list[int]) -> None:
    """Make ``fds[i]`` available as fd ``3 + i``, inheritable, whatever their current numbers."""
    # First park every fd above the target range, so that no dup2 overwrites a source.
    high = [os.dup(fd) for fd in fds]
    high = [fd if fd >= 3 + len(fds) else os.dup(fd) for fd in high]
    for i, fd in enumerate(high):
        os.dup2(fd, 3 + i, inheritable=True)


def exec_helper(argv: list[str], unprivileged: bool = False, program_fd: int = -1) -> NoReturn:
    """Exec a helper by absolute path with :data:`HELPER_ENV` only (in a forked child);
    ``unprivileged``: with no capability at all (``ns.limit_caps(0)``). ``program_fd``:
    exec the file open there (``O_PATH``) instead of looking ``argv[0]`` up again, for a
    helper whose path the parent may cover meanwhile (see :func:`mount_squashfs`)."""
    try:
        if unprivileged:
            ns.limit_caps(0)
        if program_fd >= 0:
            os.set_inheritable(program_fd, False)  # the helper itself does not keep it
            os.execve(program_fd, argv, HELPER_ENV)
        os.execve(argv[0], argv, HELPER_ENV)
    except OSError as exc:
        os.write(2, f"error: can't execute: {argv[0]}: {exc.strerror}\n".encode())
    except RuntimeSetupError as exc:
        os.write(2, f"error: {exc.message}\n".encode())
    os._exit(127)


def fork_helper(fds: list[int], run: Callable[[], NoReturn], output: int = -1) -> int:
    """Fork a helper process: PDEATHSIG SIGKILL (it never outlives us), its own process
    group (a terminal's Ctrl-C does not reach it), ``fds`` as 3, 4, ..., stdin and stdout
    on /dev/null (stdout and stderr on ``output`` if given), default signal mask; then
    ``run()``."""
    parent = os.getpid()
    pid = os.fork()
    if pid != 0:
        return pid
    try:
        ns.set_parent_death_signal(signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(1)
        os.setpgid(0, 0)
        os.chdir("/")
        _move_fds([*fds, output] if output >= 0 else fds)
        devnull = os.open("/dev/null", os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        if output >= 0:
            os.dup2(3 + len(fds), 1)
            os.dup2(3 + len(fds), 2)
        os.closerange(3 + len(fds), max_fd())
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        run()
    except BaseException as exc:
        os.write(2, f"error: can't start helper: {exc}\n".encode())
    os._exit(127)


def _open_fuse() -> int:
    try:
        return os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise RuntimeSetupError(
            f"can't open: /dev/fuse: {exc.strerror}",
            "the FUSE device must exist and be readable and writable by you (mode 0666)",
        ) from exc


def _fuse_options(fuse_fd: int) -> tuple[tuple[str, str], ...]:
    uid, gid = os.getuid(), os.getgid()
    return (
        ("fd", str(fuse_fd)),
        ("rootmode", "40000"),
        ("user_id", str(uid)),
        ("group_id", str(gid)),
    )


_PREOPENED: dict[str, int] = {}


def preopen(program: str) -> None:
    """Open ``program`` (``O_PATH``) now, for :func:`squashfuse` to exec later through the
    fd: by then the container's session may cover the directory it is in (``/tmp``)."""
    if program in _PREOPENED:
        return
    try:
        fd = os.open(program, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return  # squashfuse() tries again, and reports it
    _PREOPENED[program] = fd


def fuse_mount(
    mountpoint: str,
    name: str,
    fds: list[int],
    run: Callable[[], NoReturn],
    readonly: bool,
    extra: tuple[int, ...] = (),
) -> int:
    """Mount a FUSE file system on ``mountpoint`` and start its server; return its pid.

    The caller must hold ``CAP_SYS_ADMIN`` in a user namespace that owns its mount namespace.
    We do the ``mount(2)`` ourselves and hand the server the connection as the fd after
    ``fds`` (3 + len(fds); ``/dev/fd/N`` for libfuse >= 3.3, which then skips its own mount;
    Apptainer does the same): this needs no ``fusermount3`` and no ambient capabilities for
    the server, lets us pick the flags (nosuid, nodev, read-only), and makes readiness
    trivial (:func:`wait_served`). The server is a :func:`fork_helper` child.
    """
    fuse_fd = _open_fuse()
    try:
        opts = ",".join(f"{k}={v}" for k, v in _fuse_options(fuse_fd))
        flags = ns.MS_NOSUID | ns.MS_NODEV | (ns.MS_RDONLY if readonly else 0)
        ns.mount(name, mountpoint, f"fuse.{name}", flags, opts, what=f"{name} on {mountpoint}")
        pid = fork_helper([*fds, fuse_fd, *extra], run)
    finally:
        # Only the server may hold the connection: if it dies, the kernel aborts the
        # connection and wait_served() fails instead of hanging.
        os.close(fuse_fd)
    wait_served(mountpoint, name, pid)
    return pid


def wait_served(path: str, name: str, pid: int) -> None:
    """Wait until the FUSE server ``pid`` answers for its mount at ``path`` (a ``stat`` of
    the root blocks until then, or fails with ENOTCONN once the server died); stop it and
    raise if it can't serve."""
    try:
        st = os.stat(path)
    except OSError as exc:
        stop_server(pid)
        raise RuntimeSetupError(f"can't mount: {name}: {exc.strerror}") from exc
    if not stat.S_ISDIR(st.st_mode):
        stop_server(pid)
        raise RuntimeSetupError(f"can't mount: {name}: root is no directory")


def squashfuse_argv(squashfuse: str, offset: int, single_thread: bool) -> list[str]:
    """squashfuse_ll's command line for the partition at ``offset`` of fd 3, served on fd 4.

    squashfuse_ll is multithreaded unless ``-s`` is given (squashfuse >= 0.1.104; its help
    lists ``-s`` and ``max_threads``).
    """
    argv = [squashfuse, "-f", "-o", f"offset={offset}"]
    if single_thread:
        argv.append("-s")
    return [*argv, fd_path(3), "/dev/fd/4"]


def squashfs_error(offset: int, exc: RuntimeSetupError) -> RuntimeSetupError:
    """The error for a squashfs partition squashfuse could not serve."""
    return RuntimeSetupError(
        f"can't mount: squashfs at offset {offset}: {exc.message.rsplit(': ', 1)[-1]}",
        "squashfuse_ll could not read the partition; is it a valid squashfs "
        "(try: unsquashfs -o OFFSET -s FILE)?",
    )


def mount_squashfs(
    image_fd: int,
    offset: int,
    mountpoint: str,
    squashfuse: str,
    single_thread: bool = False,
) -> int:
    """Mount the squashfs at byte ``offset`` of ``image_fd`` on ``mountpoint`` with
    ``squashfuse`` (see :func:`fuse_mount`); return the server's pid."""
    argv = squashfuse_argv(squashfuse, offset, single_thread)
    # Exec'd through an fd (3: image, 4: FUSE, 5: the program) opened before the session
    # covered /tmp (:func:`preopen`): a server installed beside sifpy may live there.
    program_fd = os.dup(_PREOPENED[squashfuse]) if squashfuse in _PREOPENED else -1
    if program_fd < 0:
        program_fd = os.open(squashfuse, os.O_PATH | os.O_CLOEXEC)
    try:
        return fuse_mount(
            mountpoint,
            "squashfuse",
            [image_fd],
            lambda: exec_helper(argv, True, 5),
            True,
            (program_fd,),
        )
    except RuntimeSetupError as exc:
        raise squashfs_error(offset, exc) from exc
    finally:
        os.close(program_fd)


def stop_server(pid: int) -> None:
    """Kill the FUSE server and reap it (the image is read-only: nothing to flush)."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def bind(
    source: str,
    target: str,
    readonly: bool = False,
    harden: bool = True,
    what: str = "",
    mounted: str | None = None,
    nodev: bool = True,
) -> None:
    """Recursively bind ``source`` on ``target``; then, if ``harden``, remount it nosuid,
    nodev (without ``nodev``: keeping device access) and read-only if asked.

    Both may be ``/proc/self/fd/N`` paths. Recursive because, in a user namespace, the kernel
    refuses a non-recursive bind of a tree with locked submounts. The remount must repeat every
    flag the kernel locked on the source mount (noexec, atime flags...) or it fails with EPERM,
    so those are read back with ``statvfs`` first. Submounts of the source stay writable
    (recursive read-only needs ``mount_setattr``).

    When ``target`` is a ``/proc/self/fd/N`` path, it names the *covered* directory, so the
    remount needs ``mounted``: a path whose lookup crosses into the new mount
    (``/proc/self/fd/PARENT/name``).
    """
    ns.mount(source, target, None, ns.MS_BIND | ns.MS_REC, what=what or target)
    if harden:
        remount(mounted or target, readonly, what or target, nodev)


def remount(path: str, readonly: bool, what: str = "", nodev: bool = True) -> None:
    """Remount the mount at ``path`` nosuid, nodev (unless not ``nodev``: device nodes such
    as /dev/infiniband/* or /dev/nvidia* stay usable) and read-only if asked, keeping every
    flag the kernel may have locked on it."""
    flags = ns.MS_BIND | ns.MS_REMOUNT | ns.MS_NOSUID | (ns.MS_NODEV if nodev else 0)
    have = os.statvfs(path).f_flag
    for st_flag, ms_flag in (
        (os.ST_NODEV, ns.MS_NODEV),
        (os.ST_RDONLY, ns.MS_RDONLY),
        (os.ST_NOEXEC, ns.MS_NOEXEC),
        (os.ST_NOATIME, ns.MS_NOATIME),
        (os.ST_NODIRATIME, ns.MS_NODIRATIME),
        (os.ST_RELATIME, ns.MS_RELATIME),
    ):
        if have & st_flag:
            flags |= ms_flag
    if readonly:
        flags |= ns.MS_RDONLY
    ns.mount(None, path, None, flags, what=f"{what or path} (remount)")

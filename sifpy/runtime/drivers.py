"""How the image's squashfs becomes a directory, and how an overlay goes over it.

Four mount drivers, chosen by :func:`choose` (``LaunchOptions.mount_driver``):

``squashfuse``  sifpy's own server (``serve/sqfs_serve.c``, libsquashfuse's code) where it
                was built, else ``squashfuse_ll``, at the partition's offset (the default;
                :func:`.start.server_program`, :mod:`.mount`).
``kernel``      the kernel's squashfs on a read-only loop device at the offset, when running
                as real root (euid 0 in the initial user namespace). The monitor creates it
                *before* entering its user namespace, as a detached mount (fsopen/fsmount),
                and attaches it in the session with move_mount; the loop device has
                LO_FLAGS_AUTOCLEAR, so it goes away with the mount, i.e. with the namespace.
``python``      a pure-Python FUSE server (:mod:`.fuse_py`, pyfuse3 + PySquashfsImage) when
                squashfuse is missing.
``unsquash``    ``unsquashfs -o OFFSET`` into a tmpfs in the session: the last resort
                (``--unsquash``). The tmpfs lives in the monitor's mount namespace, so the
                copy disappears with it even when the caller is SIGKILLed; the price is
                memory (the tmpfs is charged to the user like any page cache).

Every helper runs by absolute path with :data:`mount.HELPER_ENV` only.
"""

from __future__ import annotations

import errno
import os

from sifpy import TYPE_CHECKING
from sifpy.errors import RuntimeSetupError, ToolError
from sifpy.runtime import mount, ns
from sifpy.runtime.start import DRIVERS, server_program
from sifpy.util import log
from sifpy.util.record import Record

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import NoReturn


# include/uapi/linux/loop.h
_LOOP_CTL_GET_FREE = 0x4C82
_LOOP_CONFIGURE = 0x4C0A
_LO_FLAGS_READ_ONLY, _LO_FLAGS_AUTOCLEAR = 1, 4
# struct loop_info64 (232 bytes) inside struct loop_config (fd, block_size, info, 64 spare)
_LOOP_INFO64 = "=QQQQQIIII64s64s32sQQ"

_PYFUSE_HINT = (
    "install squashfuse (Debian: apt-get install squashfuse), or pyfuse3 for the pure-Python "
    "mount (Debian: python3-pyfuse3; PyPI: pip install pyfuse3, needs libfuse3-dev)"
)


class Driver(Record):
    """A chosen mount driver and the absolute path of its helper program (if any)."""

    __slots__ = ("name", "program")

    def __init__(
        self,
        name: str,
        program: str = "",
    ) -> None:
        self.name = name
        self.program = program


def real_root() -> bool:
    """True for euid 0 in the initial user namespace (a kernel mount needs that)."""
    return os.geteuid() == 0 and ns.in_initial_userns()


def _have_pyfuse3() -> bool:
    from importlib.util import find_spec  # only on a fallback path

    return find_spec("pyfuse3") is not None and find_spec("PySquashfsImage") is not None


def choose(requested: str, squashfuse: str) -> Driver:
    """Pick the driver for a SIF image: ``requested`` if not ``auto`` (raising when it can't
    work here), else the first that can: kernel (as real root), squashfuse, python, unsquash.
    A fallback is announced with one line on stderr."""
    if requested not in DRIVERS:
        raise RuntimeSetupError(
            f"can't mount: unknown mount driver {requested!r}", f"use one of {', '.join(DRIVERS)}"
        )
    if requested == "kernel" or (
        requested == "auto" and real_root() and os.access("/dev/loop-control", os.W_OK)
    ):
        if not real_root():
            raise RuntimeSetupError(
                "can't mount: kernel squashfs: needs root in the initial user namespace",
                "use --mount-driver auto",
            )
        log.verbose("note: running as root: mounting the image with the kernel squashfs driver")
        return Driver("kernel")
    if requested == "squashfuse":
        return Driver("squashfuse", server_program(squashfuse))
    if requested == "python":
        if not _have_pyfuse3():
            raise ToolError("can't mount: pure-Python FUSE: pyfuse3 is not installed", _PYFUSE_HINT)
        return Driver("python")
    if requested == "unsquash":
        return Driver("unsquash", _unsquashfs())
    fuse_ok = os.access("/dev/fuse", os.R_OK | os.W_OK)
    if fuse_ok:
        try:
            return Driver("squashfuse", server_program(squashfuse))
        except ToolError:
            if _have_pyfuse3():
                log.warn(f"{squashfuse} not found: mounting with sifpy's Python FUSE (slower)")
                return Driver("python")
    why = f"{squashfuse} not found" if fuse_ok else "/dev/fuse is not usable"
    log.warn(f"{why}: extracting the image to a temporary sandbox (slower start)")
    return Driver("unsquash", _unsquashfs())


def _unsquashfs() -> str:
    return mount.find_program(
        "unsquashfs",
        hint="install squashfuse (Debian: apt-get install squashfuse) or squashfs-tools "
        "(for --unsquash)",
    )


# --- kernel squashfs ------------------------------------------------------------------------


def kernel_squashfs(image_fd: int, offset: int, size: int) -> int:
    """Attach ``size`` bytes at ``offset`` of ``image_fd`` to a free read-only, autoclear loop
    device and create a detached squashfs mount of it (read-only, nosuid, nodev); return the
    mount's fd for :func:`ns.move_mount`. Must run as real root."""
    import fcntl  # only as root
    import struct

    try:
        ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise RuntimeSetupError(f"can't open: /dev/loop-control: {exc.strerror}") from exc
    try:
        for _ in range(20):  # another process may take the free device first: EBUSY, retry
            num = fcntl.ioctl(ctl, _LOOP_CTL_GET_FREE)
            dev = f"/dev/loop{num}"
            loop = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
            try:
                info = struct.pack(
                    _LOOP_INFO64,
                    *(0, 0, 0, offset, size, 0, 0, 0),
                    _LO_FLAGS_READ_ONLY | _LO_FLAGS_AUTOCLEAR,
                    *(b"sifpy", b"", b"", 0, 0),
                )
                config = struct.pack("=II", image_fd, 0) + info + bytes(64)
                try:
                    fcntl.ioctl(loop, _LOOP_CONFIGURE, config)
                except OSError as exc:
                    if exc.errno == errno.EBUSY:
                        continue
                    raise RuntimeSetupError(
                        f"can't attach: {dev}: {exc.strerror}", "LOOP_CONFIGURE needs Linux 5.8"
                    ) from exc
                # With AUTOCLEAR the device is released when its last user goes: the mount
                # (from here on) or, if mounting fails, the close below.
                attrs = ns.MOUNT_ATTR_RDONLY | ns.MOUNT_ATTR_NOSUID | ns.MOUNT_ATTR_NODEV
                return ns.detached_mount("squashfs", dev, True, attrs)
            finally:
                os.close(loop)
        raise RuntimeSetupError("can't attach: loop device: all busy")
    finally:
        os.close(ctl)


# --- pure-Python FUSE -------------------------------------------------------------------------


def python_server(image_fd: int, offset: int) -> Callable[[], NoReturn]:
    """Import and prepare the Python FUSE server (before ``/tmp`` is covered); return the
    function its forked process runs (image as fd 3, FUSE connection as fd 4)."""
    try:
        from sifpy.runtime import fuse_py

        server = fuse_py.Server(image_fd, offset)
    except ImportError as exc:
        raise ToolError(f"can't mount: pure-Python FUSE: {exc}", _PYFUSE_HINT) from exc
    except Exception as exc:
        raise RuntimeSetupError(f"can't read: squashfs at offset {offset}: {exc}") from exc
    return lambda: server.serve(3, 4)


# --- extraction ---------------------------------------------------------------------------


def run_helper(argv: list[str], fds: list[int]) -> tuple[int, str]:
    """Run a helper to completion (stdout and stderr captured); return (status, output)."""
    read_end, write_end = os.pipe()
    try:
        pid = mount.fork_helper(fds, lambda: mount.exec_helper(argv), output=write_end)
    finally:
        os.close(write_end)
    out = b""
    with os.fdopen(read_end, "rb") as f:
        while chunk := f.read(65536):
            out = (out + chunk)[-8192:]
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace")


def extract(image_fd: int, offset: int, dest: str, unsquashfs: str) -> None:
    """Extract the squashfs into ``dest`` (a fresh tmpfs), then make that read-only."""
    log.verbose("note: extracting the image into a temporary sandbox")
    ns.mount("tmpfs", dest, "tmpfs", ns.MS_NOSUID | ns.MS_NODEV, "mode=0755", "sandbox tmpfs")
    argv = [unsquashfs, "-f", "-no-progress", "-no-xattrs", "-ignore-errors"]
    argv += ["-o", str(offset), "-d", dest, mount.fd_path(3)]
    code, out = run_helper(argv, [image_fd])
    if code == 2:  # non-fatal: device nodes or ownership an unprivileged user can't create
        log.verbose(f"note: unsquashfs skipped some files: {out.strip().splitlines()[-1:]}")
    elif code != 0:
        tail = " ".join(out.strip().splitlines()[-2:])
        raise RuntimeSetupError(f"can't extract: squashfs at offset {offset}: {tail}")
    flags = ns.MS_REMOUNT | ns.MS_RDONLY | ns.MS_NOSUID | ns.MS_NODEV
    ns.mount(None, dest, None, flags, what="sandbox tmpfs (remount read-only)")


# --- overlay ------------------------------------------------------------------------------


def mount_overlay(
    lower: str,
    upper: str,
    work: str,
    target: str,
    driver: str,
    owner: tuple[int, int] | None,
    noacl: bool = False,
) -> int:
    """Mount an overlay of ``upper`` on ``lower`` at ``target``; return the pid of its FUSE
    server, or 0 for the kernel's overlayfs.

    The kernel's overlayfs works in a user namespace since Linux 5.11 (with ``userxattr``:
    whiteouts and opaque marks go in ``user.overlay.*`` xattrs, which tmpfs supports since
    6.6). But it checks permissions against the image's owners, and an unprivileged user's
    namespace does not map root: the image's root-owned ``/etc`` stays unwritable. So with
    ``owner`` (uid, gid: the container's user when it is not root) ``auto`` prefers
    ``fuse-overlayfs -o squash_to_uid,squash_to_gid``, where every file is the user's, as
    Apptainer's squashfuse ``-o uid,gid`` does; the kernel's is the fallback, and the choice
    for (fake)root. ``noacl``: fuse-overlayfs without POSIX ACLs, for an upper layer that
    has none (fuse2fs answers EOPNOTSUPP, which fuse-overlayfs >= 1.8 passes on to every
    lookup; Apptainer always gives it noacl).
    """
    opts = f"lowerdir={lower},upperdir={upper},workdir={work}"
    fuse = ""
    if driver == "fuse" or (driver == "auto" and owner is not None):
        try:
            fuse = mount.find_program("fuse-overlayfs", hint=_OVERLAY_HINT)
        except ToolError:
            pass
        if driver == "fuse" and not fuse:
            mount.find_program("fuse-overlayfs", hint=_OVERLAY_HINT)  # raises
    if not fuse:
        if driver == "auto" and owner is not None:
            log.verbose("note: no fuse-overlayfs: the image's root-owned files stay read-only")
        try:
            flags = ns.MS_NOSUID | ns.MS_NODEV
            ns.mount("overlay", target, "overlay", flags, opts + ",userxattr", "overlay")
            return 0
        except RuntimeSetupError as exc:
            if driver == "kernel":
                raise
            try:
                fuse = mount.find_program("fuse-overlayfs", hint=_OVERLAY_HINT)
            except ToolError:
                pass
            if not fuse:
                exc.hint = _OVERLAY_HINT
                raise
            log.verbose(f"note: kernel overlayfs refused ({exc.message}): using fuse-overlayfs")
    if owner is not None:
        opts += f",squash_to_uid={owner[0]},squash_to_gid={owner[1]}"
    if noacl:
        opts += ",noacl"
    argv = [fuse, "-f", "-o", opts, "/dev/fd/3"]
    return mount.fuse_mount(target, "fuse-overlayfs", [], lambda: mount.exec_helper(argv), False)


_OVERLAY_HINT = "install fuse-overlayfs (Debian: apt-get install fuse-overlayfs)"

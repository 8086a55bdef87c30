"""``--overlay``: the layers stacked over the image, as Apptainer stacks them.

Each ``--overlay`` is a directory or an ext3 image (``sifpy overlay create``'s, or
Apptainer's: ``upper/`` and ``work/`` at its root), writable unless ``:ro``. The read-only
ones become lower layers above the image, a later one above an earlier one (``upper/`` if
the layer has one, else its root); the one writable layer holds the upper and work
directories (Apptainer's addOverlay in
https://github.com/apptainer/apptainer/blob/main/internal/pkg/runtime/engine/apptainer/
container_linux.go).

An ext3 image is served by ``fuse2fs`` inside the container's user namespace, as the
user: its files keep their owners as the namespace maps them (the user's files stay the
user's, where a server outside the namespace would show them as ``nobody``). ``fuse2fs``
is built on libfuse 2, which mounts by itself: it gets ``CAP_SYS_ADMIN`` across its exec
(ambient), and ``-o fakeroot`` so that it lets the user reach every file of the image
(the overlay's ``work/``), as Apptainer runs it. The image is locked while it is served
(an open-file-description lock on its whole length: a write lock when writable, a read
lock when not), so that two runs never write one image at once, nor one writes what
another reads (Apptainer's lockSection, with byte-range locks). At the end ``fuse2fs``
gets SIGTERM, on which libfuse ends its loop and fuse2fs writes out and closes the file
system; SIGKILL only if that takes too long.
"""

from __future__ import annotations

import os
import struct
import time

from sifpy import TYPE_CHECKING
from sifpy.errors import RuntimeSetupError
from sifpy.runtime import mount, ns

if TYPE_CHECKING:
    import signal
    from collections.abc import Sequence
    from typing import NoReturn
else:
    # The public signal module builds enums: +2.8 ms to exec's imports (python -X importtime
    # -I -S, 2-CPU Xeon); _signal has the same functions and constants as ints.
    import _signal as signal

_EXT_MAGIC_AT, _EXT_MAGIC = 1024 + 56, b"\x53\xef"  # the superblock's s_magic, 0xEF53
_F_OFD_SETLK = 37  # fcntl.h, Linux 3.15
_F_RDLCK, _F_WRLCK = 0, 1
_FUSE2FS_HINT = "install fuse2fs (Debian: apt-get install fuse2fs)"
_STOP_WAIT_S = 20.0  # a big write-back on a slow disk, before SIGKILL


class Layer:
    """One ``--overlay``: ``kind`` "dir" (``fd`` an O_PATH pin) or "ext3" (``fd`` the
    image, opened read-write when ``writable``, and locked)."""

    __slots__ = ("fd", "kind", "path", "writable")

    def __init__(self, path: str, writable: bool, kind: str, fd: int) -> None:
        self.path, self.writable, self.kind, self.fd = path, writable, kind, fd


def open_layers(specs: Sequence[tuple[str, bool]], fakeroot: bool = False) -> list[Layer]:
    """Open every overlay (before the session covers /tmp: they are the user's paths) and
    lock the images; on an error, close what was opened."""
    layers: list[Layer] = []
    try:
        for path, writable in specs:
            layers.append(_open(path, writable))
            if fakeroot and layers[-1].kind == "ext3":
                # The namespace maps only root: the user's own files in the image would
                # show as nobody, and fuse2fs refuses every write there.
                raise RuntimeSetupError(
                    f"can't use overlay: {path}: ext3 images with --fakeroot are not supported yet",
                    "use an overlay directory with --fakeroot, or run without --fakeroot",
                )
    except BaseException:
        close(layers)
        raise
    return layers


def _open(path: str, writable: bool) -> Layer:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError as exc:
        raise RuntimeSetupError(f"can't use overlay: {path}: {exc.strerror}") from exc
    import stat

    if stat.S_ISDIR(os.fstat(fd).st_mode):
        return Layer(path, writable, "dir", fd)
    os.close(fd)
    try:
        fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
    except OSError as exc:
        hint = "add :ro to use it read-only" if writable and exc.errno == 13 else None
        raise RuntimeSetupError(f"can't use overlay: {path}: {exc.strerror}", hint) from exc
    try:
        if os.pread(fd, 2, _EXT_MAGIC_AT) != _EXT_MAGIC:
            raise RuntimeSetupError(
                f"can't use overlay: {path}: neither a directory nor an ext3 image",
                "make one with `sifpy overlay create IMAGE`, or use a directory",
            )
        _lock(fd, path, writable)
    except BaseException:
        os.close(fd)
        raise
    return Layer(path, writable, "ext3", fd)


def _lock(fd: int, path: str, writable: bool) -> None:
    import fcntl

    # struct flock: l_type, l_whence, l_start, l_len (0: to the end), l_pid (0 for OFD).
    lock = struct.pack("@hhqqi4x", _F_WRLCK if writable else _F_RDLCK, 0, 0, 0, 0)
    try:
        fcntl.fcntl(fd, _F_OFD_SETLK, lock)
    except OSError as exc:
        if exc.errno not in (11, 13):  # EAGAIN, EACCES: held by another
            raise RuntimeSetupError(f"can't lock overlay: {path}: {exc.strerror}") from exc
        why = "in use by another container" if writable else "written by another container"
        raise RuntimeSetupError(
            f"can't use overlay: {path}: {why}",
            "an overlay image is written by one container at a time: wait for it, or "
            "give the others IMAGE:ro (all read-only then)",
        ) from exc


def close(layers: Sequence[Layer]) -> None:
    """Close this process's fds of the layers (a served image stays locked by its server's)."""
    for layer in layers:
        if layer.fd >= 0:
            os.close(layer.fd)
            layer.fd = -1


def mount_layers(
    layers: Sequence[Layer], session: str, servers: list[int]
) -> tuple[list[str], str | None]:
    """Mount each layer under ``session``; return the lower directories (top first, the
    image not included) and the writable layer's mount (or None). Each fuse2fs pid is
    added to ``servers`` as soon as it serves, for the caller to stop even on an error."""
    lowers: list[str] = []
    upper: str | None = None
    for i, layer in enumerate(layers):
        dst = f"{session}/ov{i}"
        os.mkdir(dst)
        if layer.kind == "dir":
            mount.bind(mount.fd_path(layer.fd), dst, not layer.writable, what="--overlay directory")
        else:
            servers.append(_fuse2fs(layer, dst, f"{session}/ov{i}.log"))
        if layer.writable:
            upper = dst
            if layer.kind == "ext3":
                _check_owner(layer, dst)
        else:
            lowers.insert(0, f"{dst}/upper" if os.path.isdir(f"{dst}/upper") else dst)
    return lowers, upper


def _check_owner(layer: Layer, dst: str) -> None:
    """A writable image's upper/ and work/ must be the user's: made by root (Apptainer's
    ``overlay create`` as root), they belong to no one in this namespace, and
    fuse-overlayfs can't use them."""
    if os.getuid() == 0:
        return
    for name in ("upper", "work"):
        try:
            owner = os.stat(f"{dst}/{name}").st_uid
        except FileNotFoundError:
            continue  # created by the caller, as the user
        if owner != os.getuid():
            raise RuntimeSetupError(
                f"can't use overlay: {layer.path}: its {name}/ is not yours",
                "an overlay image made by root is writable by root only: use it with "
                ":ro, or make your own with `sifpy overlay create`",
            )


def _fuse2fs(layer: Layer, dst: str, log_path: str) -> int:
    program = mount.find_program("fuse2fs", hint=_FUSE2FS_HINT)
    opts = "allow_other" + ("" if layer.writable else ",ro")
    if os.getuid() != 0:
        opts += ",fakeroot"
    argv = [program, mount.fd_path(3), dst, "-f", "-o", opts]
    out = os.open(log_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def run() -> NoReturn:
        ns.keep_caps_across_exec((ns.CAP_SYS_ADMIN,))
        mount.exec_helper(argv)

    try:
        pid = mount.fork_helper([layer.fd], run, output=out)
    finally:
        os.close(out)
    base = os.stat(os.path.dirname(dst)).st_dev
    deadline = time.monotonic() + 30.0
    while True:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            with open(log_path, errors="replace") as f:
                lines = [ln for ln in f.read().splitlines() if ln.strip()]
            why = lines[-1] if lines else "it exited"
            raise RuntimeSetupError(f"can't mount overlay: {layer.path}: fuse2fs: {why}")
        if os.stat(dst).st_dev != base:
            return pid
        if time.monotonic() > deadline:
            stop([pid])
            raise RuntimeSetupError(f"can't mount overlay: {layer.path}: fuse2fs did not start")
        time.sleep(0.002)


def stop(servers: Sequence[int]) -> None:
    """End the fuse2fs servers so that they write the file system out (SIGTERM), and reap
    them; SIGKILL one that takes longer than a few seconds."""
    for pid in servers:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + _STOP_WAIT_S
    for pid in servers:
        while True:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                break
            if done:
                break
            if time.monotonic() > deadline:
                mount.stop_server(pid)
                break
            time.sleep(0.005)

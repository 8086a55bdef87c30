"""Atomic files and whole-file copies, for every SIF write.

The new image is written to an unnamed file (``O_TMPFILE``) in the destination directory
and linked over the final name only once complete and synced. A crash, a kill or a full
disk leaves the old image (or nothing) under the final name, and a SIGKILL leaves no
stray temporary file. Modifications clone the image first (``FICLONE`` reflink where the
filesystem can, else ``copy_file_range``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os

from sifpy.errors import ImageError

FICLONE = 0x40049409  # _IOW(0x94, 9, int), linux/fs.h


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def copy_fd(in_fd: int, out_fd: int, offset: int) -> int:
    """Copy all of ``in_fd`` into ``out_fd`` at ``offset``, kernel-side when possible."""
    total = 0
    try:
        while n := os.copy_file_range(in_fd, out_fd, 1 << 30, total, offset + total):
            total += n
        return total
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
    while chunk := os.pread(in_fd, 1 << 20, total):
        pwrite_all(out_fd, chunk, offset + total)
        total += len(chunk)
    return total


class AtomicFile:
    """A file that appears under ``path`` only when :meth:`commit` succeeds.

    Written as an unnamed ``O_TMPFILE`` in the destination directory (so nothing is left
    if the process dies), then linked under a temporary name and renamed over ``path``.
    Where ``O_TMPFILE`` is unsupported, a named temporary file is used and removed on error.
    """

    def __init__(self, path: str | os.PathLike[str], mode: int = 0o755) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.dir = os.path.dirname(self.path)
        self.mode = mode
        self.named: str | None = None
        self.fd = -1

    def __enter__(self) -> AtomicFile:
        try:
            self.fd = os.open(self.dir, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, self.mode)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise dest_error(self.path, exc) from exc
            self.named = self._temp_name()
            try:
                self.fd = os.open(
                    self.named, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, self.mode
                )
            except OSError as exc2:
                raise dest_error(self.path, exc2) from exc2
        return self

    def _temp_name(self) -> str:
        return os.path.join(
            self.dir, f".{os.path.basename(self.path)}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
        )

    def commit(self, like: os.stat_result | None = None) -> None:
        """Sync and move into place; ``like`` copies mode (and, as root, ownership)."""
        if like is not None:
            os.fchmod(self.fd, like.st_mode & 0o7777)
            if os.geteuid() == 0:
                os.fchown(self.fd, like.st_uid, like.st_gid)
        os.fsync(self.fd)
        dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if self.named is None:
                tmp = self._temp_name()
                # linkat(AT_SYMLINK_FOLLOW) on /proc/self/fd names the O_TMPFILE. Passing
                # dst_dir_fd makes Python call linkat (plain link() would not follow).
                os.link(f"/proc/self/fd/{self.fd}", os.path.basename(tmp), dst_dir_fd=dfd)
                self.named = tmp
            os.replace(self.named, self.path)
            self.named = None
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def __exit__(self, *exc: object) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.named is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.named)


def dest_error(path: str, exc: OSError) -> ImageError:
    hint = "check that the directory exists and is writable" if exc.errno != errno.ENOSPC else None
    return ImageError(f"can't write SIF: {path}: {exc.strerror}", hint=hint)


def clone(src_fd: int, dst_fd: int) -> None:
    """Copy a whole file, sharing blocks (reflink) when the filesystem allows."""
    try:
        fcntl.ioctl(dst_fd, FICLONE, src_fd)
        return
    except OSError:
        pass
    copy_fd(src_fd, dst_fd, 0)

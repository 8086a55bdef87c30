"""Apply OCI/Docker layer tars onto a root directory, safely.

What each entry means (whiteouts, hardlinks, names, modes, the hostile-entry table) is
decided by :mod:`sifpy.rootfs.entries`, the rules every layer engine shares; this module
applies those decisions to a directory.

Nothing is ever written outside ``rootfs``. Each path is opened component by component
from a descriptor of the rootfs with ``O_NOFOLLOW`` (see :mod:`sifpy.util.paths`);
a symlink met on the way is resolved by us with chroot semantics, so ``l -> /etc``
planted by this or any earlier layer leads to ``rootfs/etc``, never to the host's.
``tarfile.extractall`` and its filters are not used: they are not the boundary.

Ownership: as real root (euid 0 in the initial user namespace) numeric uid and gid are
applied (never names: no NSS lookups, CVE-2019-14271), and modes are kept exactly (keep
such a rootfs inside a 0700 directory); unprivileged, ownership is ignored silently and
modes are mapped as :func:`sifpy.rootfs.entries.mode` says. Directory mtimes are set
after the whole layer, deepest first.
"""

from __future__ import annotations

import gzip
import os
import shutil
import stat
import tarfile
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from sifpy.errors import RootfsError
from sifpy.rootfs import entries
from sifpy.rootfs.compress import open_tar_stream
from sifpy.rootfs.entries import DIR, FIFO, HIDE, LINK, NODE, REG, ROOT, SYM, BadEntry, Key
from sifpy.rootfs.limits import Budget
from sifpy.util.paths import PathError, lstat_at, open_dir

_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def apply_layers(rootfs: str | Path, layers: Iterable[str | Path | BinaryIO]) -> None:
    """Apply each layer onto ``rootfs`` in order (lowest first), all within one
    :class:`~sifpy.rootfs.limits.Budget`."""
    budget = Budget(rootfs)
    for layer in layers:
        apply_layer(rootfs, layer, budget=budget)


def apply_layer(
    rootfs: str | Path,
    layer: str | Path | BinaryIO,
    *,
    compression: str = "auto",
    budget: Budget | None = None,
) -> None:
    """Apply one layer tar (a path or a binary stream) onto the directory ``rootfs``.

    ``compression`` is ``"auto"`` (magic bytes decide), ``"gzip"``, ``"zstd"`` or
    ``"none"``. ``budget``: the image's, shared by its layers (else this layer's own);
    every entry's uncompressed bytes count against it before they are written (see
    :mod:`sifpy.rootfs.limits`). Raises :class:`~sifpy.errors.RootfsError` for a malformed,
    hostile or too large layer; entries already applied stay applied (build into a scratch
    directory).
    """
    budget = budget or Budget(rootfs)
    label = str(layer) if isinstance(layer, str | Path) else getattr(layer, "name", "<stream>")
    root_fd = os.open(rootfs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    entry = "<header>"
    try:
        with (
            open_tar_stream(layer, compression) as stream,
            tarfile.open(fileobj=stream, mode="r|") as tar,
        ):
            applier = _Applier(root_fd, tar, privileged=entries.real_root())
            pos = 0  # the uncompressed tar read so far, headers and data
            for member in tar:
                entry = member.name
                end = member.offset_data + member.size
                budget.add(end - pos, label)
                pos = end
                applier.apply(member)
            entry = "<end>"
            applier.finish()
    except (BadEntry, PathError) as exc:
        raise entries.layer_error(label, entry, exc) from exc
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise RootfsError(f"can't read layer: {label}: {exc}", entries.HINT) from exc
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise RootfsError(f"can't apply layer: {label}: {entries.show(entry)}: {reason}") from exc
    finally:
        os.close(root_fd)


def _remove(dir_fd: int, name: str) -> None:
    """Remove ``name`` in ``dir_fd`` whatever it is; a directory goes with its tree."""
    st = lstat_at(dir_fd, name)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        # rmtree's fd-based walk (dir_fd, Python 3.11) never follows symlinks inside.
        shutil.rmtree(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)


class _Disk:
    """The rootfs on disk as :func:`sifpy.rootfs.entries.hide_lower` walks it: directory
    descriptors, each opened ``O_NOFOLLOW`` relative to its parent's."""

    def names(self, d: int) -> list[str]:
        return os.listdir(d)

    def subdir(self, d: int, name: str) -> int | None:
        st = lstat_at(d, name)
        if st is None or not stat.S_ISDIR(st.st_mode):
            return None
        return os.open(name, _DIR_FLAGS, dir_fd=d)

    def release(self, d: int) -> None:
        os.close(d)

    def remove(self, d: int, name: str) -> None:
        _remove(d, name)


class _Applier:
    """The state of one layer being applied: what it touched, directory mtimes."""

    def __init__(self, root_fd: int, tar: tarfile.TarFile, *, privileged: bool) -> None:
        self.root_fd = root_fd
        self.tar = tar
        self.privileged = privileged
        self.touched = entries.Touched()
        self.dir_mtimes: dict[Key, float] = {}

    def apply(self, m: tarfile.TarInfo) -> None:
        e = entries.classify(m.name, m.type, m.mtime, m.linkname)
        if e.action == ROOT:
            self._meta_fd(self.root_fd, m, is_dir=True)
            self.dir_mtimes[()] = m.mtime
        elif e.action == HIDE:
            self._hide(e.parent, e.name)
        elif e.action == NODE:
            assert e.name is not None
            self._node(m, e, e.name)

    def _node(self, m: tarfile.TarInfo, e: entries.Entry, name: str) -> None:
        pfd, real = open_dir(self.root_fd, e.parent, create=True)
        try:
            key = (*real, name)
            if e.kind == LINK:
                self._hardlink(m, e.link, pfd, name, key)
            elif e.kind == DIR:
                self._dir(m, pfd, name, key)
            else:
                _remove(pfd, name)
                if e.kind == REG:
                    self._file(m, pfd, name)
                elif e.kind == SYM:
                    self._symlink(m, pfd, name)
                else:
                    assert e.kind == FIFO
                    self._fifo(m, pfd, name)
            self.touched.add(key)
        finally:
            os.close(pfd)

    def finish(self) -> None:
        """Set directory mtimes, deepest first, now that nothing more is written."""
        for key in sorted(self.dir_mtimes, key=len, reverse=True):
            times = (self.dir_mtimes[key], self.dir_mtimes[key])
            if not key:
                os.utime(self.root_fd, times)
                continue
            try:
                pfd, _ = open_dir(self.root_fd, key[:-1], create=False)
            except (FileNotFoundError, PathError):
                continue
            try:
                st = lstat_at(pfd, key[-1])
                if st is not None and stat.S_ISDIR(st.st_mode):
                    os.utime(key[-1], times, dir_fd=pfd, follow_symlinks=False)
            finally:
                os.close(pfd)

    # -- entry types ------------------------------------------------------------------

    def _dir(self, m: tarfile.TarInfo, pfd: int, name: str, key: Key) -> None:
        st = lstat_at(pfd, name)
        if st is None or not stat.S_ISDIR(st.st_mode):
            _remove(pfd, name)
            os.mkdir(name, 0o700, dir_fd=pfd)
        fd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
        try:
            self._meta_fd(fd, m, is_dir=True)
        finally:
            os.close(fd)
        self.dir_mtimes[key] = m.mtime

    def _file(self, m: tarfile.TarInfo, pfd: int, name: str) -> None:
        src = self.tar.extractfile(m)
        assert src is not None  # isreg() members always have a data reader
        # O_EXCL|O_NOFOLLOW: the name was just removed, so anything there now is a race.
        fd = os.open(name, _FILE_FLAGS, 0o600, dir_fd=pfd)
        with open(fd, "wb", closefd=True) as out:
            shutil.copyfileobj(src, out, 1 << 20)
            out.flush()
            self._meta_fd(fd, m, is_dir=False)

    def _symlink(self, m: tarfile.TarInfo, pfd: int, name: str) -> None:
        os.symlink(m.linkname, name, dir_fd=pfd)
        if self.privileged:
            os.chown(name, m.uid, m.gid, dir_fd=pfd, follow_symlinks=False)
        os.utime(name, (m.mtime, m.mtime), dir_fd=pfd, follow_symlinks=False)

    def _fifo(self, m: tarfile.TarInfo, pfd: int, name: str) -> None:
        os.mkfifo(name, 0o600, dir_fd=pfd)
        if self.privileged:
            os.chown(name, m.uid, m.gid, dir_fd=pfd, follow_symlinks=False)
        # chmod follows, but the name is the FIFO we made a moment ago in a directory
        # only we write to; opening a FIFO for fchmod would block.
        mode = entries.mode(m.mode, is_dir=False, privileged=self.privileged)
        os.chmod(name, mode, dir_fd=pfd)
        os.utime(name, (m.mtime, m.mtime), dir_fd=pfd, follow_symlinks=False)

    def _hardlink(self, m: tarfile.TarInfo, tparts: Key, pfd: int, name: str, key: Key) -> None:
        try:
            tfd, treal = open_dir(self.root_fd, tparts[:-1], create=False)
        except FileNotFoundError:
            raise entries.missing_link(m.linkname) from None
        try:
            st = lstat_at(tfd, tparts[-1])
            found = None if st is None else DIR if stat.S_ISDIR(st.st_mode) else REG
            if not entries.check_link(found, m.linkname, (*treal, tparts[-1]), key):
                return  # a link to itself: already there
            _remove(pfd, name)
            # follow_symlinks=False: linkat without AT_SYMLINK_FOLLOW links a symlink
            # itself, never what it points to (cpython#151558, #157190). The inode's
            # metadata belongs to its first entry; a hardlink entry changes none.
            os.link(tparts[-1], name, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
        finally:
            os.close(tfd)

    # -- whiteouts --------------------------------------------------------------------

    def _hide(self, parent: Key, name: str | None) -> None:
        """A whiteout (``name``) or an opaque marker (None) in ``parent``."""
        try:
            fd, real = open_dir(self.root_fd, parent, create=False)
        except FileNotFoundError:
            return  # nothing below to hide
        try:
            entries.hide_lower(_Disk(), fd, real, None if name is None else [name], self.touched)
        finally:
            os.close(fd)

    # -- metadata ---------------------------------------------------------------------

    def _meta_fd(self, fd: int, m: tarfile.TarInfo, *, is_dir: bool) -> None:
        if self.privileged:
            os.fchown(fd, m.uid, m.gid)  # before chmod: chown clears setuid/setgid
        os.fchmod(fd, entries.mode(m.mode, is_dir=is_dir, privileged=self.privileged))
        if not is_dir:
            os.utime(fd, (m.mtime, m.mtime))

"""Apply OCI/Docker layer tars onto a root directory, safely.

Semantics follow the OCI image-spec layer changesets (image-spec ``layer.md``):
``.wh.<name>`` deletes ``<name>`` from lower layers, ``.wh..wh..opq`` empties a
directory of lower content, and whiteouts never touch what the same layer adds,
whatever the order of entries. A later entry for a path replaces the earlier one (a
directory over a directory only updates its metadata; anything else over a directory
removes the directory tree). Symlinks are stored as they are and never followed while
writing; hardlinks link to an entry already in the rootfs (this or an earlier layer).

Nothing is ever written outside ``rootfs``. Each path is opened component by component
from a descriptor of the rootfs with ``O_NOFOLLOW`` (see :mod:`sifpy.util.paths`);
a symlink met on the way is resolved by us with chroot semantics, so ``l -> /etc``
planted by this or any earlier layer leads to ``rootfs/etc``, never to the host's.
``tarfile.extractall`` and its filters are not used: they are not the boundary
(the attack table is in docs/security.md).

The rule for hostile or odd entries: what legitimate tools emit in another spelling
is normalised; what only an attacker or a corrupt archive produces fails the whole
layer with :class:`~sifpy.errors.RootfsError`; what is legitimate but can't be made
safely is skipped with a warning.

=====================================================  ==================================
entry                                                  outcome
=====================================================  ==================================
absolute name ``/etc/x``, ``./x``, ``a//b``            normalised to ``etc/x``, ``x``, ``a/b``
``..`` anywhere in a name (``../x``, ``a/../../x``)    RootfsError
NUL in a name or link target; component > 255 bytes;   RootfsError
name > 4096 bytes; empty or > 4095-byte symlink target
non-directory entry for the root (``.``, ``/``, ``""``)  RootfsError (CVE-2021-29136)
parent component is a symlink (any target, any layer)  resolved inside the rootfs
parent component is a file                             RootfsError
symlink chain longer than 40 links                     RootfsError
symlink entry with any target (``/``, ``../../..``)    stored as-is, never followed
hardlink with ``..``; missing or directory target      RootfsError
hardlink to a symlink                                  links the symlink itself
hardlink through a symlinked directory                 resolved inside the rootfs
whiteout ``.wh.``, ``.wh..``, ``.wh...``               RootfsError
whiteout through a symlinked parent                    resolved inside the rootfs
``.wh.`` prefix on a directory component               RootfsError
aufs metadata ``.wh..wh.<other>``                      skipped silently (Docker does too)
character or block device                              skipped with a warning
FIFO                                                   created with mkfifo
unknown entry type                                     skipped with a warning
malformed tar or compressed stream                     RootfsError
more than ``$SIFPY_MAX_UNPACKED``; disk nearly full    RootfsError (:mod:`.limits`)
=====================================================  ==================================

Ownership and modes: as real root (euid 0 in the initial user namespace) numeric uid
and gid are applied (never names: no NSS lookups, CVE-2019-14271) and modes are kept
exactly, setuid/setgid included, as in the image; keep such a rootfs inside a 0700
directory. Unprivileged, ownership is ignored silently, setuid/setgid bits are
stripped from non-directories (a setuid-to-the-builder file on a shared filesystem
would let other users act as the builder; the runtime mounts ``nosuid`` anyway), and
directories get owner ``rwx`` added so later entries and layers can be written and
removed (what umoci's rootless mode and Apptainer's ``--fix-perms`` also do).
Directory mtimes are set after the whole layer, deepest first.
"""

from __future__ import annotations

import functools
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
from sifpy.rootfs.compress import open_tar_stream
from sifpy.rootfs.limits import Budget
from sifpy.util import log
from sifpy.util.paths import PathError, lstat_at, open_dir

WHITEOUT = ".wh."
OPAQUE = ".wh..opq"  # what follows WHITEOUT in ".wh..wh..opq"
NAME_MAX = 255
PATH_MAX = 4096
_HINT = "the layer is corrupt or malicious; get the image from a trusted source"
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

Key = tuple[str, ...]  # a real path below the rootfs, as components


class _BadEntry(Exception):
    """An entry that fails the layer; turned into RootfsError with the layer's name."""


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
            applier = _Applier(root_fd, tar, privileged=_real_root())
            pos = 0  # the uncompressed tar read so far, headers and data
            for member in tar:
                entry = member.name
                end = member.offset_data + member.size
                budget.add(end - pos, label)
                pos = end
                applier.apply(member)
            entry = "<end>"
            applier.finish()
    except (_BadEntry, PathError) as exc:
        raise RootfsError(f"can't apply layer: {label}: {_show(entry)}: {exc}", _HINT) from exc
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise RootfsError(f"can't read layer: {label}: {exc}", _HINT) from exc
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise RootfsError(f"can't apply layer: {label}: {_show(entry)}: {reason}") from exc
    finally:
        os.close(root_fd)


@functools.cache
def _real_root() -> bool:
    """True for euid 0 with the identity uid map, i.e. not root of a user namespace.

    Root of a user namespace can't chown to unmapped ids, so it is treated like any
    unprivileged user.
    """
    if os.geteuid() != 0:
        return False
    try:
        with open("/proc/self/uid_map") as f:
            return f.read().split() == ["0", "0", "4294967295"]
    except OSError:
        return True


def _show(name: str, limit: int = 120) -> str:
    """A tar name fit for a message: control characters escaped, long names cut."""
    shown = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in name)
    return shown if len(shown) <= limit else shown[:limit] + "..."


def _clean(name: str, what: str = "name") -> Key:
    """Split a tar name into components: drop ``/`` and ``.``, refuse ``..`` and NUL."""
    if "\0" in name:
        raise _BadEntry(f"NUL byte in {what}")
    if len(os.fsencode(name)) > PATH_MAX:
        raise _BadEntry(f"{what} longer than {PATH_MAX} bytes")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise _BadEntry(f"'..' in {what}: {_show(name)}")
    if any(len(os.fsencode(p)) > NAME_MAX for p in parts):
        raise _BadEntry(f"component of {what} longer than {NAME_MAX} bytes")
    return parts


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


class _Applier:
    """The state of one layer being applied: what it touched, directory mtimes."""

    def __init__(self, root_fd: int, tar: tarfile.TarFile, *, privileged: bool) -> None:
        self.root_fd = root_fd
        self.tar = tar
        self.privileged = privileged
        # Real paths this layer wrote, with all their ancestors: whiteouts and opaque
        # markers only remove what is not in here (lower layers' content).
        self.touched: set[Key] = {()}
        self.dir_mtimes: dict[Key, float] = {}

    def apply(self, m: tarfile.TarInfo) -> None:
        # A PAX mtime is any decimal ("-1e400", "nan"): utime() would raise OverflowError
        # or ValueError. 2**62 s is far inside time_t and far beyond any real date.
        if not abs(m.mtime) < 2**62:
            raise _BadEntry(f"timestamp out of range: {m.mtime}")
        parts = _clean(m.name)
        if not parts:
            self._root(m)
            return
        *parent, name = parts
        if any(p.startswith(WHITEOUT) for p in parent):
            raise _BadEntry("whiteout prefix on a directory component")
        if name.startswith(WHITEOUT):
            self._whiteout(parent, name[len(WHITEOUT) :])
            return
        if m.ischr() or m.isblk():
            # Never mknod on the host; the runtime mounts nodev anyway.
            log.tally("device nodes in layers skipped (the runtime provides /dev)", _show(m.name))
            return
        if not (m.isreg() or m.isdir() or m.issym() or m.islnk() or m.isfifo()):
            log.warn(f"skipping entry of unknown type {m.type!r} in layer: {_show(m.name)}")
            return
        pfd, real = open_dir(self.root_fd, parent, create=True)
        try:
            key = (*real, name)
            if m.islnk():
                self._hardlink(m, pfd, name, key)
            elif m.isdir():
                self._dir(m, pfd, name, key)
            else:
                _remove(pfd, name)
                if m.isreg():
                    self._file(m, pfd, name)
                elif m.issym():
                    self._symlink(m, pfd, name)
                else:
                    self._fifo(m, pfd, name)
            self._touch(key)
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

    def _root(self, m: tarfile.TarInfo) -> None:
        if not m.isdir():
            # CVE-2021-29136: a symlink at '.' would re-point every later entry.
            raise _BadEntry("refusing to change the type of the root directory")
        self._meta_fd(self.root_fd, m, is_dir=True)
        self.dir_mtimes[()] = m.mtime

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
        target = m.linkname
        if not target or "\0" in target or len(os.fsencode(target)) >= PATH_MAX:
            raise _BadEntry("symlink target is empty, too long or has a NUL byte")
        os.symlink(target, name, dir_fd=pfd)
        if self.privileged:
            os.chown(name, m.uid, m.gid, dir_fd=pfd, follow_symlinks=False)
        os.utime(name, (m.mtime, m.mtime), dir_fd=pfd, follow_symlinks=False)

    def _fifo(self, m: tarfile.TarInfo, pfd: int, name: str) -> None:
        os.mkfifo(name, 0o600, dir_fd=pfd)
        if self.privileged:
            os.chown(name, m.uid, m.gid, dir_fd=pfd, follow_symlinks=False)
        # chmod follows, but the name is the FIFO we made a moment ago in a directory
        # only we write to; opening a FIFO for fchmod would block.
        os.chmod(name, self._mode(m.mode, is_dir=False), dir_fd=pfd)
        os.utime(name, (m.mtime, m.mtime), dir_fd=pfd, follow_symlinks=False)

    def _hardlink(self, m: tarfile.TarInfo, pfd: int, name: str, key: Key) -> None:
        tparts = _clean(m.linkname, "hardlink target")
        if not tparts:
            raise _BadEntry("hardlink to the root directory")
        try:
            tfd, treal = open_dir(self.root_fd, tparts[:-1], create=False)
        except FileNotFoundError:
            raise _BadEntry(f"hardlink target not in the rootfs: {_show(m.linkname)}") from None
        try:
            st = lstat_at(tfd, tparts[-1])
            if st is None:
                raise _BadEntry(f"hardlink target not in the rootfs: {_show(m.linkname)}")
            if stat.S_ISDIR(st.st_mode):
                raise _BadEntry(f"hardlink target is a directory: {_show(m.linkname)}")
            if (*treal, tparts[-1]) == key:
                return  # a link to itself: already there
            _remove(pfd, name)
            # follow_symlinks=False: linkat without AT_SYMLINK_FOLLOW links a symlink
            # itself, never what it points to (cpython#151558, #157190). The inode's
            # metadata belongs to its first entry; a hardlink entry changes none.
            os.link(tparts[-1], name, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
        finally:
            os.close(tfd)

    # -- whiteouts --------------------------------------------------------------------

    def _whiteout(self, parent: list[str], target: str) -> None:
        if target == OPAQUE:
            self._opaque(parent)
            return
        if target.startswith(WHITEOUT):
            log.debug(f"skipping aufs metadata entry {WHITEOUT}{target}")
            return
        if target in ("", ".", ".."):
            raise _BadEntry("invalid whiteout name")
        try:
            pfd, real = open_dir(self.root_fd, parent, create=False)
        except FileNotFoundError:
            return  # nothing below to hide
        try:
            if lstat_at(pfd, target) is not None:
                self._remove_lower(pfd, target, (*real, target))
        finally:
            os.close(pfd)

    def _opaque(self, parent: list[str]) -> None:
        try:
            fd, real = open_dir(self.root_fd, parent, create=False)
        except FileNotFoundError:
            return
        try:
            for child in os.listdir(fd):
                self._remove_lower(fd, child, (*real, child))
        finally:
            os.close(fd)

    def _remove_lower(self, dir_fd: int, name: str, key: Key) -> None:
        """Remove ``name`` unless this layer wrote it; descend where it wrote inside."""
        if key not in self.touched:
            _remove(dir_fd, name)
            return
        st = lstat_at(dir_fd, name)
        if st is None or not stat.S_ISDIR(st.st_mode):
            return
        fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        try:
            for child in os.listdir(fd):
                self._remove_lower(fd, child, (*key, child))
        finally:
            os.close(fd)

    # -- metadata ---------------------------------------------------------------------

    def _touch(self, key: Key) -> None:
        for i in range(len(key) + 1):
            self.touched.add(key[:i])

    def _mode(self, mode: int, *, is_dir: bool) -> int:
        mode &= 0o7777
        if self.privileged:
            return mode
        if is_dir:
            return mode | stat.S_IRWXU
        return mode & ~(stat.S_ISUID | stat.S_ISGID)

    def _meta_fd(self, fd: int, m: tarfile.TarInfo, *, is_dir: bool) -> None:
        if self.privileged:
            os.fchown(fd, m.uid, m.gid)  # before chmod: chown clears setuid/setgid
        os.fchmod(fd, self._mode(m.mode, is_dir=is_dir))
        if not is_dir:
            os.utime(fd, (m.mtime, m.mtime))

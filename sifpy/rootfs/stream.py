"""Layers to squashfs with no rootfs on disk: merge in memory, stream one tar to tar2sqfs.

When nothing has to run inside the image (a pull, a build without ``%post``), the layers
are merged into one sanitised tar stream that ``tar2sqfs`` (squashfs-tools-ng) packs
directly. Two passes over the layer blobs:

1. **Index** (headers only, layers in parallel threads): every entry's name, type, mode,
   mtime and link target. The entries are then applied in layer order to an in-memory
   tree of names and inodes (no contents) with exactly the rules of
   :mod:`sifpy.rootfs.unpack`: whiteouts and opaque directories hide only lower content,
   a later entry replaces an earlier one, a parent symlink is resolved inside the tree
   with chroot semantics (at most 40 links), hardlinks name an inode already in the tree,
   and everything that fails or is skipped there fails or is skipped here, with the same
   messages (``..``, NUL, over-long names, bad whiteouts, a non-directory root, device
   nodes skipped). Apptainer's metadata (:func:`sifpy.rootfs.imageconfig.metadata_files`) is then
   applied the way :func:`~sifpy.rootfs.imageconfig.config_to_metadata` writes it.
2. **Stream**: the root, every directory (parents first), symlink, FIFO and metadata file
   come from the tree; then each layer is read again in order and the regular files that
   survived are copied through, each followed by hardlink entries for its other names.
   A layer is read only as far as its last surviving file.

The stream tar2sqfs sees is canonical: relative names of real paths only (no ``..``, no
absolute names, no symlink ever in a parent position), every parent directory listed
before its children, hardlinks only to a name already written, no device nodes, no
xattrs, everything owned by 0:0 (as ``mksquashfs -all-root``), modes as the unpack path
would leave them (exact as real root; setuid/setgid dropped and directories ``u+rwx``
otherwise). tar2sqfs stores a hardlinked symlink as one inode with two names (mksquashfs
4.5.1 sometimes stored two symlinks).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import struct
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO, NamedTuple, cast

from sifpy.errors import RootfsError, ToolError
from sifpy.rootfs.compress import grow_pipe, open_tar_stream
from sifpy.rootfs.imageconfig import META_DIRS, MOUNT_POINTS, metadata_files
from sifpy.rootfs.limits import Budget
from sifpy.rootfs.rawtar import NotPlain, RawTar, pipe_fd
from sifpy.rootfs.unpack import (
    _HINT,
    NAME_MAX,
    OPAQUE,
    PATH_MAX,
    WHITEOUT,
    _BadEntry,
    _clean,
    _real_root,
    _show,
)
from sifpy.squashfs.pack import compression_args, default_compression, parse_compression
from sifpy.util import log
from sifpy.util.paths import MAX_SYMLINKS, PathError
from sifpy.util.proc import DEVNULL, PIPE, failure, popen

DIR, REG, SYM, FIFO = "d", "f", "l", "p"
READ_BUF = 1 << 20
_TAR_BUF = 1 << 16
_BLOCK = tarfile.BLOCKSIZE


class TarStream:
    """A layer already uncompressed, readable once, front to back (a pipe): only
    :func:`single_pass` can take it."""

    def __init__(self, stream: BinaryIO, name: str) -> None:
        self.stream = stream
        self.name = name


LayerSource = str | os.PathLike[str] | BinaryIO  # a stream is read twice: seekable
Key = tuple[str, ...]


class Rec(NamedTuple):
    """One tar header of a layer, as indexed in pass 1 (no contents)."""

    ordinal: int
    name: str
    type: bytes
    mode: int
    mtime: int
    linkname: str
    kind: str  # DIR, REG, SYM, FIFO, "h" (hardlink), "c" (device), "?" (unknown)


class _Node:
    """An inode of the merged tree. Directories hold their children by name; a hardlinked
    file is one node under several names."""

    __slots__ = ("children", "kind", "link", "mode", "mtime", "src")

    def __init__(self, kind: str, mode: int, mtime: int, link: str = "") -> None:
        self.kind = kind
        self.mode = mode
        self.mtime = mtime
        self.link = link
        # A regular file's data: (layer, ordinal) in the layer blobs, or bytes (metadata).
        self.src: tuple[int, int] | bytes | None = None
        self.children: dict[str, _Node] | None = {} if kind == DIR else None


# A member's kind by its type byte, for tarfile's members and rawtar's alike (tarfile's
# REGULAR_TYPES: regular, old regular, contiguous, GNU sparse); "?" for any other type.
_KINDS = {b"0": REG, b"\0": REG, b"7": REG, b"S": REG, b"5": DIR, b"2": SYM, b"1": "h"}
_KINDS.update({b"6": FIFO, b"3": "c", b"4": "c"})


class _Forward:
    """A stream (a pipe, a decompressor) as the random-access file tarfile's ``r:`` mode
    wants, for a reader that only moves forward: a seek ahead reads and drops the bytes, a
    seek back fails. Cheaper per member than the ``r|`` mode's own buffering (it copies
    what is left of its buffer on every header)."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._pos = 0

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self._pos += len(data)
        return data

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence == 1:
            pos += self._pos
        if whence == 2 or pos < self._pos:
            raise io.UnsupportedOperation("a layer is read front to back")
        while self._pos < pos:
            if not self.read(min(pos - self._pos, READ_BUF)):
                break  # past the end: the next read says so
        return self._pos


def _open_tar(stream: BinaryIO) -> tarfile.TarFile:
    return tarfile.TarFile(fileobj=_Forward(stream), mode="r")  # type: ignore[arg-type]


@contextlib.contextmanager
def _layer_tar(layer: LayerSource) -> Iterator[tarfile.TarFile]:
    if not isinstance(layer, str | os.PathLike):
        layer.seek(0)
    with open_tar_stream(layer, "auto") as stream, _open_tar(stream) as tar:
        yield tar


def _label(layer: LayerSource | TarStream) -> str:
    if isinstance(layer, TarStream):
        return layer.name
    if isinstance(layer, str | os.PathLike):
        return str(layer)
    return str(getattr(layer, "name", "<stream>"))


def _next(tar: tarfile.TarFile) -> tarfile.TarInfo | None:
    m = tar.next()
    tar.members = []  # type: ignore[attr-defined]  # stream mode keeps every header
    return m


def index_layer(layer: LayerSource, budget: Budget | None = None) -> list[Rec]:
    """Pass 1 for one layer blob: its headers, in order; its uncompressed bytes count
    against ``budget`` as they are read (the whole layer is decompressed here)."""
    recs: list[Rec] = []
    pos, label = 0, _label(layer)
    try:
        with _layer_tar(layer) as tar:
            while (m := _next(tar)) is not None:
                if budget is not None:
                    end = m.offset_data + m.size
                    budget.add(end - pos, label)
                    pos = end
                recs.append(
                    Rec(
                        len(recs),
                        m.name,
                        m.type,
                        m.mode,
                        int(m.mtime),
                        m.linkname,
                        _KINDS.get(m.type, "?"),
                    )
                )
    except (tarfile.TarError, EOFError, OSError, ValueError, OverflowError) as exc:
        # OverflowError: int() of an infinite PAX mtime ("-1e400").
        raise RootfsError(f"can't read layer: {_label(layer)}: {exc}", _HINT) from exc
    return recs


class _Everything:
    """The ``touched`` set of a one-layer image: its whiteouts can only hide what the same
    layer wrote, which they never do, so every key counts as touched (and none is stored)."""

    def __contains__(self, key: object) -> bool:
        return True


class Merger:
    """The in-memory tree of names and inodes that the layers build (pass 1)."""

    def __init__(self, *, privileged: bool | None = None, now: int | None = None) -> None:
        self.privileged = _real_root() if privileged is None else privileged
        self.now = int(time.time()) if now is None else now
        self.root = _Node(DIR, 0o755, self.now)

    # -- paths ----------------------------------------------------------------------

    def resolve(self, parts: Sequence[str], *, create: bool) -> tuple[_Node, Key]:
        """The directory at ``parts``, symlinks resolved inside the tree (chroot semantics,
        as :func:`sifpy.util.paths.open_dir`); missing directories made (0755) when
        ``create``, else :class:`FileNotFoundError`."""
        stack: list[tuple[_Node, str]] = [(self.root, "")]
        todo = list(reversed(parts))
        followed = 0
        while todo:
            comp = todo.pop()
            if comp in ("", "."):
                continue
            if comp == "..":
                if len(stack) > 1:
                    stack.pop()
                continue
            children = stack[-1][0].children
            assert children is not None
            child = children.get(comp)
            if child is None:
                if not create:
                    raise FileNotFoundError(comp)
                if "\0" in comp or len(os.fsencode(comp)) > NAME_MAX:
                    raise PathError(f"{_show(comp)}: file name too long")
                child = children[comp] = _Node(DIR, 0o755, self.now)
            elif child.kind == SYM:
                followed += 1
                if followed > MAX_SYMLINKS:
                    raise PathError("too many levels of symbolic links")
                if child.link.startswith("/"):
                    del stack[1:]
                todo.extend(reversed(child.link.split("/")))
                continue
            elif child.kind != DIR:
                raise PathError(f"{_show(comp)}: not a directory")
            stack.append((child, comp))
        return stack[-1][0], tuple(name for _, name in stack[1:])

    def _mode(self, mode: int, *, is_dir: bool) -> int:
        mode &= 0o7777
        if self.privileged:
            return mode
        if is_dir:
            return mode | 0o700
        return mode & ~0o6000

    # -- layers ---------------------------------------------------------------------

    def apply_layer(self, index: int, recs: Sequence[Rec], label: str) -> None:
        """Apply one indexed layer (number ``index`` in the image) to the tree."""
        touched: set[Key] = {()}
        for rec in recs:
            try:
                self._apply(index, rec, touched)
            except (_BadEntry, PathError) as exc:
                raise RootfsError(
                    f"can't apply layer: {label}: {_show(rec.name)}: {exc}", _HINT
                ) from exc

    def _apply(
        self, index: int, rec: Rec, touched: set[Key] | _Everything
    ) -> tuple[Key, _Node, Key] | None:
        """Apply one entry; for an entry that names a node: its cleaned name, the
        directory it went into and its real key (symlinks resolved), else None."""
        parts = _clean(rec.name)
        if not parts:
            if rec.kind != DIR:
                raise _BadEntry("refusing to change the type of the root directory")
            self.root.mode = self._mode(rec.mode, is_dir=True)
            self.root.mtime = rec.mtime
            return None
        *parent, name = parts
        if any(p.startswith(WHITEOUT) for p in parent):
            raise _BadEntry("whiteout prefix on a directory component")
        if name.startswith(WHITEOUT):
            self._whiteout(parent, name[len(WHITEOUT) :], touched)
            return None
        if rec.kind == "c":
            log.warn(f"skipping device node in layer: {_show(rec.name)}")
            return None
        if rec.kind == "?":
            log.warn(f"skipping entry of unknown type {rec.type!r} in layer: {_show(rec.name)}")
            return None
        pdir, real = self.resolve(parent, create=True)
        children = pdir.children
        assert children is not None
        key = (*real, name)
        if rec.kind == "h":
            self._hardlink(rec, children, name, key)
        elif rec.kind == DIR:
            node = children.get(name)
            if node is None or node.kind != DIR:
                node = children[name] = _Node(DIR, 0, 0)
            node.mode = self._mode(rec.mode, is_dir=True)
            node.mtime = rec.mtime
        elif rec.kind == SYM:
            target = rec.linkname
            if not target or "\0" in target or len(os.fsencode(target)) >= PATH_MAX:
                raise _BadEntry("symlink target is empty, too long or has a NUL byte")
            children[name] = _Node(SYM, 0o777, rec.mtime, target)
        else:  # REG or FIFO
            node = children[name] = _Node(rec.kind, self._mode(rec.mode, is_dir=False), rec.mtime)
            if rec.kind == REG:
                node.src = (index, rec.ordinal)
        if not isinstance(touched, _Everything):
            for i in range(len(key) + 1):
                touched.add(key[:i])
        return parts, pdir, key

    def _hardlink(self, rec: Rec, children: dict[str, _Node], name: str, key: Key) -> bool:
        """Link ``name`` to the inode at the entry's target; False: it already is it."""
        shown = _show(rec.linkname)
        tparts = _clean(rec.linkname, "hardlink target")
        if not tparts:
            raise _BadEntry("hardlink to the root directory")
        try:
            tdir, treal = self.resolve(tparts[:-1], create=False)
        except FileNotFoundError:
            raise _BadEntry(f"hardlink target not in the rootfs: {shown}") from None
        assert tdir.children is not None
        target = tdir.children.get(tparts[-1])
        if target is None:
            raise _BadEntry(f"hardlink target not in the rootfs: {shown}")
        if target.kind == DIR:
            raise _BadEntry(f"hardlink target is a directory: {shown}")
        tkey = (*treal, tparts[-1])
        if tkey == key:
            return True  # a link to itself: already there (still "touched")
        old = children.get(name)
        if old is not None and old.kind == DIR and tkey[: len(key)] == key:
            # Replacing the directory removes the target with it (unpack: ENOENT).
            raise _BadEntry(f"hardlink target not in the rootfs: {shown}")
        children[name] = target
        return True

    def _whiteout(self, parent: list[str], target: str, touched: set[Key] | _Everything) -> None:
        if target == OPAQUE:
            try:
                d, real = self.resolve(parent, create=False)
            except FileNotFoundError:
                return
            assert d.children is not None
            for child in list(d.children):
                self._remove_lower(d, child, (*real, child), touched)
            return
        if target.startswith(WHITEOUT):
            log.debug(f"skipping aufs metadata entry {WHITEOUT}{target}")
            return
        if target in ("", ".", ".."):
            raise _BadEntry("invalid whiteout name")
        try:
            d, real = self.resolve(parent, create=False)
        except FileNotFoundError:
            return
        assert d.children is not None
        if target in d.children:
            self._remove_lower(d, target, (*real, target), touched)

    @staticmethod
    def _remove_lower(d: _Node, name: str, key: Key, touched: set[Key] | _Everything) -> None:
        """Remove ``name`` unless this layer wrote it; descend where it wrote inside."""
        todo = [(d, name, key)]
        while todo:
            parent, n, k = todo.pop()
            assert parent.children is not None
            if k not in touched:
                parent.children.pop(n, None)
                continue
            node = parent.children.get(n)
            if node is not None and node.kind == DIR:
                assert node.children is not None
                todo.extend((node, c, (*k, c)) for c in node.children)

    # -- metadata -------------------------------------------------------------------

    def add_metadata(self, config: dict[str, Any]) -> None:
        """Apptainer's metadata, as :func:`~sifpy.rootfs.imageconfig.config_to_metadata` writes."""
        for mp in MOUNT_POINTS:
            try:
                self.resolve(mp.split("/"), create=True)
            except PathError as exc:
                log.warn(f"can't create mount point /{mp} in the image: {exc}")
        try:
            meta, _ = self.resolve([".singularity.d"], create=True)
            subs = {"": meta}
            for sub in META_DIRS:
                subs[sub] = self.resolve([".singularity.d", sub], create=True)[0]
        except PathError as exc:
            raise RootfsError(f"can't write image metadata: {exc}") from exc
        for sub, name, text, mode in metadata_files(config):
            children = subs[sub].children
            assert children is not None
            old = children.get(name)
            if old is not None and old.kind == DIR:
                raise RootfsError(f"can't write /.singularity.d/{name}: a directory is in the way")
            node = children[name] = _Node(REG, mode, self.now)
            node.src = text.encode()
        meta.mode = 0o755

    # -- the plan for pass 2 --------------------------------------------------------

    def plan(self) -> Plan:
        """Walk the final tree: directories parents first, every inode with its names."""
        dirs: list[tuple[str, _Node]] = []
        names: dict[int, list[str]] = {}
        nodes: dict[int, _Node] = {}
        todo: list[tuple[str, _Node]] = [("", self.root)]
        while todo:
            path, d = todo.pop()
            assert d.children is not None
            for cname in sorted(d.children, reverse=True):
                child = d.children[cname]
                cpath = f"{path}/{cname}" if path else cname
                if child.kind == DIR:
                    todo.append((cpath, child))
                else:
                    names.setdefault(id(child), []).append(cpath)
                    nodes[id(child)] = child
            if path:
                dirs.append((path, d))
        dirs.sort(key=lambda item: item[0].split("/"))
        by_src: dict[tuple[int, int], tuple[_Node, list[str]]] = {}
        others: list[tuple[_Node, list[str]]] = []
        for ident, node in nodes.items():
            paths = sorted(names[ident], key=lambda p: p.split("/"))
            if node.kind == REG and isinstance(node.src, tuple):
                by_src[node.src] = (node, paths)
            else:
                others.append((node, paths))
        others.sort(key=lambda item: item[1][0].split("/"))
        return Plan(self.root, dirs, others, by_src)


@dataclass
class Plan:
    """What pass 2 writes: the root, directories, content-less inodes, layer files."""

    root: _Node
    dirs: list[tuple[str, _Node]]
    others: list[tuple[_Node, list[str]]]
    layer_files: dict[tuple[int, int], tuple[_Node, list[str]]]


# --- pass 2: the tar stream -------------------------------------------------------------


_USTAR = struct.Struct("100s8s8s8s12s12s8s1s100s8s32s32s8s8s155s12x")
_ZERO7 = b"0000000\0"


def _ustar(name: str, kind: bytes, mode: int, mtime: int, size: int, link: str) -> bytes | None:
    """The header ``tarfile`` writes in PAX format when no PAX record is needed (ASCII
    names that fit, numbers that fit), built directly: tarfile's general path costs
    ~30 us a header, a third of the one-pass stream's own time. None: use tarfile."""
    if not (name.isascii() and link.isascii() and len(name) <= 100 and len(link) <= 100):
        return None
    if not (0 <= mode < 0o7777777 and size < 0o77777777777 and mtime < 0o77777777777):
        return None
    head = _USTAR.pack(
        name.encode(),
        b"%07o\0" % mode,
        _ZERO7,
        _ZERO7,
        b"%011o\0" % size,
        b"%011o\0" % mtime,
        b"        ",
        kind,
        link.encode(),
        tarfile.POSIX_MAGIC,
        b"",  # uname
        b"",  # gname
        b"",  # devmajor, devminor: empty for anything but devices (none here)
        b"",
        b"",  # prefix
    )
    chksum = b"%06o\0" % sum(head)
    return head[:148] + chksum + head[155:]


class TarWriter:
    """Writes canonical PAX headers and data to a binary stream (no seeking)."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out

    def header(
        self, name: str, kind: bytes, mode: int, mtime: int, size: int = 0, link: str = ""
    ) -> None:
        mtime = max(0, mtime)
        full = name + "/" if kind == tarfile.DIRTYPE and not name.endswith("/") else name
        fast = _ustar(full, kind, mode, mtime, size, link)
        if fast is not None:
            self.out.write(fast)
            return
        ti = tarfile.TarInfo(name)
        ti.type = kind
        ti.mode = mode
        ti.mtime = max(0, mtime)
        ti.size = size
        ti.linkname = link
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = ""
        self.out.write(ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))

    def pad(self, size: int) -> None:
        """The zeros after ``size`` bytes of data, up to the next block."""
        if size % _BLOCK:
            self.out.write(b"\0" * (_BLOCK - size % _BLOCK))

    def data(self, src: IO[bytes] | bytes, size: int) -> None:
        if isinstance(src, bytes):
            self.out.write(src)
        else:
            left = size
            while left:
                buf = src.read(min(left, READ_BUF))
                if not buf:
                    raise RootfsError("can't read layer: unexpected end of data", _HINT)
                self.out.write(buf)
                left -= len(buf)
        if size % _BLOCK:
            self.out.write(b"\0" * (_BLOCK - size % _BLOCK))

    def inode(
        self, node: _Node, paths: list[str], src: IO[bytes] | bytes | None, size: int = 0
    ) -> None:
        """One inode: its first name with its content, the others as hardlinks."""
        first = paths[0]
        if node.kind == REG:
            self.header(first, tarfile.REGTYPE, node.mode, node.mtime, size)
            assert src is not None
            self.data(src, size)
        elif node.kind == SYM:
            self.header(first, tarfile.SYMTYPE, 0o777, node.mtime, link=node.link)
        else:
            self.header(first, tarfile.FIFOTYPE, node.mode, node.mtime)
        for other in paths[1:]:
            self.header(other, tarfile.LNKTYPE, node.mode, node.mtime, link=first)

    def close(self) -> None:
        self.out.write(b"\0" * (2 * _BLOCK))
        self.out.flush()


def write_plan(plan: Plan, layers: Sequence[LayerSource], out: IO[bytes]) -> None:
    """Pass 2: write the merged tar for ``plan`` to ``out``, reading ``layers`` again."""
    w = TarWriter(out)
    w.header("./", tarfile.DIRTYPE, plan.root.mode, plan.root.mtime)
    for path, d in plan.dirs:
        w.header(path, tarfile.DIRTYPE, d.mode, d.mtime)
    for node, paths in plan.others:
        data = node.src if isinstance(node.src, bytes) else None
        w.inode(node, paths, data, len(data or b""))
    wanted: dict[int, dict[int, tuple[_Node, list[str]]]] = {}
    for (li, num), item in plan.layer_files.items():
        wanted.setdefault(li, {})[num] = item
    for li, layer in enumerate(layers):
        todo = wanted.get(li)
        if not todo:
            continue
        try:
            with _layer_tar(layer) as tar:
                ordinal = -1
                while todo and (m := _next(tar)) is not None:
                    ordinal += 1
                    if ordinal not in todo:
                        continue
                    node, paths = todo.pop(ordinal)
                    if not m.isreg():
                        raise RootfsError(f"can't read layer: {_label(layer)}: changed")
                    src = tar.extractfile(m)
                    assert src is not None
                    w.inode(node, paths, src, m.size)
                if todo:
                    raise RootfsError(f"can't read layer: {_label(layer)}: changed")
        except (tarfile.TarError, EOFError, ValueError) as exc:
            raise RootfsError(f"can't read layer: {_label(layer)}: {exc}", _HINT) from exc
    w.close()


# --- one layer, one pass ----------------------------------------------------------------


class _FdOut:
    """Unbuffered writes to a pipe, so that they stay in order with spliced data."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]
        return len(data)

    def flush(self) -> None:
        pass


@contextlib.contextmanager
def _raw_layer(layer: LayerSource | TarStream) -> Iterator[RawTar]:
    if isinstance(layer, TarStream):
        yield RawTar(layer.stream)
        return
    if not isinstance(layer, str | os.PathLike):
        layer.seek(0)
    with open_tar_stream(layer, "auto") as stream:
        yield RawTar(stream)


class NeedsMerge(Exception):
    """The layer needs the two-pass merge (raised by :func:`single_pass`)."""


def _sig(node: _Node) -> tuple[int, str, int, int, str]:
    return (id(node), node.kind, node.mode, node.mtime, node.link)


def single_pass(
    layer: LayerSource | TarStream,
    out: IO[bytes],
    config: dict[str, Any] | None = None,
    *,
    privileged: bool | None = None,
    budget: Budget | None = None,
) -> None:
    """Stream a one-layer image in a single read of its blob, when the layer is already in
    the shape the merge would produce (the usual case: a tar of a real tree).

    Every header goes through the same :class:`Merger` rules as the two-pass path, and an
    entry is written at once when nothing can change it later: its parents are plain
    directories (no symlink on the way), it is new, and for a hardlink the target was
    written. Anything else (a duplicate name, a write through a symlink, a directory entry
    after its children, metadata in the way) raises :class:`NeedsMerge`, and the caller
    starts over with the two-pass merge; what was written must then be discarded. At the
    end the final tree (after Apptainer's metadata) is checked against everything written,
    and what is missing (metadata, mount points) is written, then the root entry (last:
    tars such as mmdebstrap's list ``./`` after ``./dev``). Each member's bytes count
    against ``budget`` before they are copied.
    """
    merger = Merger(privileged=privileged)
    out.flush()
    out_fd = pipe_fd(out)  # a pipe (tar2sqfs): write it directly, and splice file data in
    w = TarWriter(cast(IO[bytes], _FdOut(out_fd)) if out_fd >= 0 else out)
    written: dict[Key, tuple[int, str, int, int, str]] = {}
    first_path: dict[int, str] = {}  # inode -> the name it was written under
    touched = _Everything()
    label = _label(layer)

    def put(key: Key, node: _Node, src: IO[bytes] | RawTar | None = None, size: int = 0) -> None:
        path = "/".join(key)
        if node.kind == DIR:
            w.header(path if key else "./", tarfile.DIRTYPE, node.mode, node.mtime)
        elif id(node) in first_path:
            w.header(path, tarfile.LNKTYPE, node.mode, node.mtime, link=first_path[id(node)])
        elif node.kind == REG:
            if src is None:
                raise NeedsMerge(f"{path}: content not in this layer")
            w.header(path, tarfile.REGTYPE, node.mode, node.mtime, size)
            if isinstance(src, RawTar):
                src.copy_data(size, w.out, out_fd)
                w.pad(size)
            else:
                w.data(src, size)
        elif node.kind == SYM:
            w.header(path, tarfile.SYMTYPE, 0o777, node.mtime, link=node.link)
        else:
            w.header(path, tarfile.FIFOTYPE, node.mode, node.mtime)
        written[key] = _sig(node)
        first_path.setdefault(id(node), path)

    def put_parents(key: Key) -> None:
        for i in range(1, len(key)):
            if key[:i] not in written:
                d, _ = merger.resolve(list(key[:i]), create=False)
                put(key[:i], d)

    try:
        with _raw_layer(layer) as raw:
            ordinal = -1
            while (m := raw.next()) is not None:
                ordinal += 1
                if budget is not None:
                    budget.add(_BLOCK + m.size, label)
                kind = _KINDS.get(m.type, "?")
                rec = Rec(ordinal, m.name, m.type, m.mode, m.mtime, m.linkname, kind)
                try:
                    applied = merger._apply(0, rec, touched)
                except (_BadEntry, PathError) as exc:
                    raise RootfsError(
                        f"can't apply layer: {label}: {_show(rec.name)}: {exc}", _HINT
                    ) from exc
                # None: the root (written last, with its final attributes), a whiteout
                # (nothing below it in a one-layer image) or a skipped device node.
                if applied is None:
                    continue
                parts, pdir, key = applied
                if key != parts:
                    raise NeedsMerge(f"{rec.name}: through a symlink")
                if key in written:
                    raise NeedsMerge(f"{rec.name}: written twice")
                assert pdir.children is not None
                node = pdir.children[key[-1]]
                if rec.kind == "h" and id(node) not in first_path:
                    raise NeedsMerge(f"{rec.name}: link to an entry not written")
                put_parents(key)
                put(key, node, raw if rec.kind == REG else None, m.size if rec.kind == REG else 0)
    except NotPlain as exc:
        raise NeedsMerge(f"{label}: {exc}") from exc
    if config is not None:
        merger.add_metadata(config)
    plan = merger.plan()
    final: dict[Key, _Node] = {}
    final.update((tuple(p.split("/")), d) for p, d in plan.dirs)
    for node, paths in [*plan.others, *plan.layer_files.values()]:
        final.update((tuple(p.split("/")), node) for p in paths)
    for key, sig in written.items():
        if key not in final or _sig(final[key]) != sig:
            raise NeedsMerge(f"/{'/'.join(key)}: changed after it was written")
    for key in sorted(final):
        if key not in written:
            node = final[key]
            data = node.src if isinstance(node.src, bytes) else None
            if node.kind == REG and data is None and id(node) not in first_path:
                raise NeedsMerge(f"/{'/'.join(key)}: content not written")
            put_parents(key)
            put(key, node, io.BytesIO(data) if data is not None else None, len(data or b""))
    put((), plan.root)  # tar2sqfs takes a late "./" for the root's mode and mtime
    w.close()


def merge(
    layers: Sequence[LayerSource],
    config: dict[str, Any] | None = None,
    *,
    privileged: bool | None = None,
    threads: int = 4,
    budget: Budget | None = None,
) -> Plan:
    """Pass 1: index ``layers`` (in parallel) and merge them, with metadata for ``config``;
    all their bytes count against ``budget``."""
    merger = Merger(privileged=privileged)
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(layers)))) as pool:
        futures = [pool.submit(index_layer, layer, budget) for layer in layers]
        for i, (layer, fut) in enumerate(zip(layers, futures, strict=True)):
            merger.apply_layer(i, fut.result(), _label(layer))
    if config is not None:
        merger.add_metadata(config)
    return merger.plan()


def merged_tar(
    layers: Sequence[LayerSource],
    out: IO[bytes],
    config: dict[str, Any] | None = None,
    *,
    privileged: bool | None = None,
) -> None:
    """Write the one sanitised tar for ``layers`` (+ metadata for ``config``) to ``out``.

    One layer goes through :func:`single_pass` (into a buffer, since it may have to start
    over), the others through the two-pass merge. Capped as :mod:`sifpy.rootfs.limits`
    says (the temporary buffer's file system keeps its reserve)."""
    if len(layers) == 1:
        with tempfile.TemporaryFile() as buf:
            try:
                budget = Budget(tempfile.gettempdir())
                single_pass(layers[0], buf, config, privileged=privileged, budget=budget)
            except NeedsMerge as exc:
                log.debug(f"two-pass merge: {exc}")
            else:
                buf.seek(0)
                shutil.copyfileobj(buf, out, READ_BUF)
                return
    budget = Budget(tempfile.gettempdir(), expands=False)
    write_plan(merge(layers, config, privileged=privileged, budget=budget), layers, out)


# --- tar2sqfs ---------------------------------------------------------------------------


def tar2sqfs_path() -> str | None:
    return shutil.which("tar2sqfs")


def _jobs(compression: str) -> int:
    """tar2sqfs's compressor threads. A fast compressor (lz4, zstd up to level 5) keeps up
    with one or two, and more only take CPU from the decompressor and the merge that feed
    it (2 CPUs, zstd:3: 1.15 s with one, 1.29 s with two); a slow one gets every CPU
    (zstd:15: 8.4 s with two, 14.4 s with one)."""
    try:
        cpus = max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    name, level = parse_compression(compression)
    fast = name == "lz4" or (name == "zstd" and level is not None and level <= 5)
    return min(2, max(1, cpus - 1)) if fast else cpus


def tar2sqfs_argv(exe: str, dest: str | os.PathLike[str]) -> list[str]:
    """tar2sqfs options matching the unpack path's ``mksquashfs -all-root`` with the same
    compression (:func:`sifpy.squashfs.pack.default_compression`)."""
    compression = default_compression()
    return [
        exe,
        "--quiet",
        "--no-skip",  # a record it can't read fails the pack, never silently dropped
        "--no-xattr",  # the unpack path keeps none either
        *compression_args(compression, "tar2sqfs"),
        "--defaults",
        "uid=0,gid=0,mode=0755",
        "--num-jobs",
        str(_jobs(compression)),
        "--force",
        str(dest),
    ]


@contextlib.contextmanager
def _tar2sqfs(dest: Path) -> Iterator[IO[bytes]]:
    exe = tar2sqfs_path()
    if exe is None:
        raise ToolError("can't pack the image: tar2sqfs not found", "install squashfs-tools-ng")
    with tempfile.TemporaryFile() as err:
        proc = popen(
            tar2sqfs_argv(exe, dest),
            "pack the image",
            stdin=PIPE,
            stdout=DEVNULL,
            stderr=err,
            bufsize=READ_BUF,
        )
        assert proc.stdin is not None
        grow_pipe(proc.stdin.fileno())
        broken = False
        try:
            yield proc.stdin
        except BrokenPipeError:
            broken = True  # tar2sqfs went away; its status and stderr say why
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
        rc = proc.wait()
        if rc != 0 or broken:
            err.seek(0)
            if rc != 0:
                raise failure("pack the image", [exe], rc, err.read())
            tail = err.read().decode(errors="replace").strip()[-800:]
            raise ToolError(f"can't pack the image: tar2sqfs stopped reading: {tail}")
    with open(dest, "rb") as f:
        if f.read(4) != b"hsqs":
            raise ToolError("can't pack the image: tar2sqfs wrote no squashfs superblock")


def _squashfs_budget(dest: str | os.PathLike[str]) -> Budget:
    """The budget of a squashfs written to ``dest``: compressed, so only its file system's
    reserve is checked, with the cap on the uncompressed bytes (which also bounds the CPU
    time spent on them: reading stops at the cap)."""
    return Budget(os.path.dirname(os.path.abspath(dest)), expands=False)


def tar_to_squashfs(
    layer: LayerSource | TarStream,
    dest: str | os.PathLike[str],
    config: dict[str, Any] | None = None,
    *,
    privileged: bool | None = None,
) -> None:
    """One layer, read once, into the squashfs ``dest``; raises :class:`NeedsMerge`
    (``dest`` then unusable) if it needs the two-pass merge. Capped as
    :mod:`sifpy.rootfs.limits` says (the squashfs's file system keeps its reserve)."""
    budget = _squashfs_budget(dest)
    with _tar2sqfs(Path(dest)) as pipe:
        single_pass(layer, pipe, config, privileged=privileged, budget=budget)


def layers_to_squashfs(
    layers: Sequence[LayerSource],
    dest: str | os.PathLike[str],
    config: dict[str, Any] | None = None,
    *,
    privileged: bool | None = None,
    on_indexed: Callable[[], None] | None = None,
) -> None:
    """Merge ``layers`` (lowest first, compressed or not) plus the Apptainer metadata for
    the image ``config`` into the squashfs ``dest``, with no rootfs on disk.

    A single layer is tried in one pass (:func:`single_pass`) straight into tar2sqfs; if
    it turns out to need the merge, that tar2sqfs is killed and the two passes run."""
    if len(layers) == 1:
        try:
            if on_indexed is not None:
                on_indexed()
            tar_to_squashfs(layers[0], dest, config, privileged=privileged)
            return
        except NeedsMerge as exc:
            log.debug(f"two-pass merge: {exc}")
            on_indexed = None
    plan = merge(layers, config, privileged=privileged, budget=_squashfs_budget(dest))
    if on_indexed is not None:
        on_indexed()
    with _tar2sqfs(Path(dest)) as pipe:
        write_plan(plan, layers, pipe)

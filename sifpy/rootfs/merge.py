"""The first pass of a streamed pull: index every layer's headers and merge them in memory.

Each layer's entries (name, type, mode, mtime, link target; no contents) are read in
parallel threads and applied in layer order to an in-memory tree of names and inodes with
exactly the rules of :mod:`sifpy.rootfs.unpack`: whiteouts and opaque directories hide
only lower content, a later entry replaces an earlier one, a parent symlink is resolved
inside the tree with chroot semantics (at most 40 links), hardlinks name an inode already
in the tree, and everything that fails or is skipped there fails or is skipped here, with
the same messages. The result is a :class:`Plan` that :mod:`sifpy.rootfs.tarwrite` turns
into one canonical tar stream (see :mod:`sifpy.rootfs.stream`).
"""

from __future__ import annotations

import contextlib
import io
import os
import tarfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, NamedTuple

from sifpy.errors import RootfsError
from sifpy.rootfs.compress import open_tar_stream
from sifpy.rootfs.imageconfig import META_DIRS, MOUNT_POINTS, metadata_files
from sifpy.rootfs.limits import Budget
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
from sifpy.util import log
from sifpy.util.paths import MAX_SYMLINKS, PathError

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
            log.tally("device nodes in layers skipped (the runtime provides /dev)", _show(rec.name))
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

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
from sifpy.rootfs import entries
from sifpy.rootfs.compress import open_tar_stream
from sifpy.rootfs.entries import (
    DIR,
    HIDE,
    LINK,
    NAME_MAX,
    NODE,
    REG,
    ROOT,
    SYM,
    BadEntry,
    Key,
    Touched,
    show,
)
from sifpy.rootfs.imageconfig import META_DIRS, MOUNT_POINTS, metadata_files
from sifpy.rootfs.limits import Budget
from sifpy.util import log
from sifpy.util.paths import MAX_SYMLINKS, PathError

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


class Rec(NamedTuple):
    """One tar header of a layer, as indexed in pass 1 (no contents)."""

    ordinal: int
    name: str
    type: bytes
    mode: int
    mtime: float  # as the tar says: the rules refuse what is out of range
    linkname: str


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
                recs.append(Rec(len(recs), m.name, m.type, m.mode, m.mtime, m.linkname))
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise RootfsError(f"can't read layer: {_label(layer)}: {exc}", entries.HINT) from exc
    return recs


class _Tree:
    """The merged tree as :func:`sifpy.rootfs.entries.hide_lower` walks it."""

    def names(self, d: _Node) -> list[str]:
        assert d.children is not None
        return list(d.children)

    def subdir(self, d: _Node, name: str) -> _Node | None:
        assert d.children is not None
        child = d.children.get(name)
        return child if child is not None and child.kind == DIR else None

    def release(self, d: _Node) -> None:
        pass

    def remove(self, d: _Node, name: str) -> None:
        assert d.children is not None
        d.children.pop(name, None)


class Merger:
    """The in-memory tree of names and inodes that the layers build (pass 1)."""

    def __init__(self, *, privileged: bool | None = None, now: int | None = None) -> None:
        self.privileged = entries.real_root() if privileged is None else privileged
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
                    raise PathError(f"{show(comp)}: file name too long")
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
                raise PathError(f"{show(comp)}: not a directory")
            stack.append((child, comp))
        return stack[-1][0], tuple(name for _, name in stack[1:])

    def _mode(self, mode: int, *, is_dir: bool) -> int:
        return entries.mode(mode, is_dir=is_dir, privileged=self.privileged)

    # -- layers ---------------------------------------------------------------------

    def apply_layer(self, index: int, recs: Sequence[Rec], label: str) -> None:
        """Apply one indexed layer (number ``index`` in the image) to the tree."""
        touched = Touched()
        for rec in recs:
            try:
                self.apply(index, rec, touched)
            except (BadEntry, PathError) as exc:
                raise entries.layer_error(label, rec.name, exc) from exc

    def apply(self, index: int, rec: Rec, touched: Touched) -> tuple[Key, _Node, Key] | None:
        """Apply one entry; for an entry that names a node: its cleaned name, the
        directory it went into and its real key (symlinks resolved), else None."""
        e = entries.classify(rec.name, rec.type, rec.mtime, rec.linkname)
        mtime = int(rec.mtime)
        if e.action == ROOT:
            self.root.mode = self._mode(rec.mode, is_dir=True)
            self.root.mtime = mtime
            return None
        if e.action == HIDE:
            self._hide(e.parent, e.name, touched)
            return None
        if e.action != NODE:
            return None  # skipped (and logged) by the rules
        name = e.name
        assert name is not None
        pdir, real = self.resolve(e.parent, create=True)
        children = pdir.children
        assert children is not None
        key = (*real, name)
        if e.kind == LINK:
            self._hardlink(rec.linkname, e.link, children, name, key)
        elif e.kind == DIR:
            node = children.get(name)
            if node is None or node.kind != DIR:
                node = children[name] = _Node(DIR, 0, 0)
            node.mode = self._mode(rec.mode, is_dir=True)
            node.mtime = mtime
        elif e.kind == SYM:
            children[name] = _Node(SYM, 0o777, mtime, rec.linkname)
        else:  # REG or FIFO
            node = children[name] = _Node(e.kind, self._mode(rec.mode, is_dir=False), mtime)
            if e.kind == REG:
                node.src = (index, rec.ordinal)
        touched.add(key)
        return (*e.parent, name), pdir, key

    def _hardlink(
        self, linkname: str, tparts: Key, children: dict[str, _Node], name: str, key: Key
    ) -> None:
        """Link ``name`` to the inode at the entry's target."""
        try:
            tdir, treal = self.resolve(tparts[:-1], create=False)
        except FileNotFoundError:
            raise entries.missing_link(linkname) from None
        assert tdir.children is not None
        target = tdir.children.get(tparts[-1])
        found = None if target is None else target.kind
        if not entries.check_link(found, linkname, (*treal, tparts[-1]), key):
            return  # a link to itself: already there (still "touched")
        assert target is not None
        children[name] = target

    def _hide(self, parent: Key, name: str | None, touched: Touched) -> None:
        """A whiteout (``name``) or an opaque marker (None) in ``parent``."""
        try:
            d, real = self.resolve(parent, create=False)
        except FileNotFoundError:
            return
        entries.hide_lower(_Tree(), d, real, None if name is None else [name], touched)

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

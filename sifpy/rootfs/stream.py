"""Layers to squashfs with no rootfs on disk: merge in memory, stream one tar to tar2sqfs.

When nothing has to run inside the image (a pull, a build without ``%post``), the layers
are merged into one sanitised tar stream that ``tar2sqfs`` (squashfs-tools-ng) packs
directly. Two passes over the layer blobs (the first in :mod:`sifpy.rootfs.merge`, the
writer of the second in :mod:`sifpy.rootfs.tarwrite`; this module runs them, the one-pass
shortcut and tar2sqfs):

1. **Index** (headers only, layers in parallel threads): every entry's name, type, mode,
   mtime and link target. The entries are then applied in layer order to an in-memory
   tree of names and inodes (no contents) with the rules of :mod:`sifpy.rootfs.entries`,
   the same that :mod:`sifpy.rootfs.unpack` applies: whiteouts and opaque directories
   hide only lower content, a later entry replaces an earlier one, a parent symlink is
   resolved inside the tree with chroot semantics (at most 40 links), hardlinks name an
   inode already in the tree, and everything that fails or is skipped there fails or is
   skipped here, with the same messages. Apptainer's metadata
   (:func:`sifpy.rootfs.imageconfig.metadata_files`) is then applied the way
   :func:`~sifpy.rootfs.imageconfig.config_to_metadata` writes it.
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
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any, cast

from sifpy.errors import ToolError
from sifpy.rootfs import entries
from sifpy.rootfs.compress import grow_pipe, open_tar_stream
from sifpy.rootfs.entries import DIR, LINK, REG, SYM, BadEntry, Key, Touched
from sifpy.rootfs.limits import Budget
from sifpy.rootfs.merge import (
    _BLOCK,
    READ_BUF,
    LayerSource,
    Merger,
    Plan,
    Rec,
    TarStream,
    _label,
    _Node,
    index_layer,
)
from sifpy.rootfs.rawtar import NotPlain, RawTar, pipe_fd
from sifpy.rootfs.tarwrite import TarWriter, write_plan
from sifpy.squashfs.pack import compression_args, default_compression, parse_compression
from sifpy.util import log
from sifpy.util.paths import PathError
from sifpy.util.proc import DEVNULL, PIPE, failure, popen


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
    touched = Touched(everything=True)
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
                rec = Rec(ordinal, m.name, m.type, m.mode, m.mtime, m.linkname)
                try:
                    applied = merger.apply(0, rec, touched)
                except (BadEntry, PathError) as exc:
                    raise entries.layer_error(label, rec.name, exc) from exc
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
                kind = entries.kind(m.type)
                if kind == LINK and id(node) not in first_path:
                    raise NeedsMerge(f"{rec.name}: link to an entry not written")
                put_parents(key)
                put(key, node, raw if kind == REG else None, m.size if kind == REG else 0)
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

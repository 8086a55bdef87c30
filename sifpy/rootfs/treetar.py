"""An image's tree as one OCI layer: a reproducible tar, gzip-compressed, with its digests.

The same tree gives the same bytes: entries in the walk's order (byte order of names,
depth first), PAX headers only where ustar can't hold a field, no user or group names,
the image's own times, and a gzip header without a name or a time. A hard-linked inode is
stored once, under its first name, and its other names are tar hard links to it, as
the OCI image spec's "Hardlinks" section asks. Sockets can't be stored in a tar and are
left out (a warning says so). The root directory itself has no entry: an unpacker makes
it, and umoci and skopeo's layers do the same.
"""

from __future__ import annotations

import gzip
import hashlib
import stat
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import IO

from sifpy.errors import ImageError
from sifpy.squashfs.tree import Entry
from sifpy.util import log

_BLOCK = tarfile.BLOCKSIZE
ReadFn = Callable[[Entry], Iterable[bytes]]
_KINDS = {
    stat.S_IFDIR: tarfile.DIRTYPE,
    stat.S_IFREG: tarfile.REGTYPE,
    stat.S_IFLNK: tarfile.SYMTYPE,
    stat.S_IFCHR: tarfile.CHRTYPE,
    stat.S_IFBLK: tarfile.BLKTYPE,
    stat.S_IFIFO: tarfile.FIFOTYPE,
}


@dataclass(frozen=True)
class LayerDigests:
    """The compressed blob's digest and size, and the uncompressed tar's (the diff id)."""

    digest: str
    size: int
    diff_id: str


class _Hashing:
    """A write-only stream that counts and hashes what passes through to ``out``."""

    def __init__(self, out: IO[bytes] | None) -> None:
        self.out = out
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        if self.out is not None:
            self.out.write(data)
        return len(data)

    def flush(self) -> None:
        pass


def _header(e: Entry, kind: bytes, link: str = "") -> bytes:
    ti = tarfile.TarInfo(e.path + "/" if kind == tarfile.DIRTYPE else e.path)
    ti.type = kind
    ti.mode = e.mode
    ti.uid, ti.gid = e.uid, e.gid
    ti.uname = ti.gname = ""
    ti.mtime = max(0, e.mtime)
    ti.size = e.size if kind == tarfile.REGTYPE else 0
    ti.linkname = link or e.link
    ti.devmajor, ti.devminor = e.rdev
    return ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def tar_stream(entries: Iterable[Entry], read: ReadFn) -> Iterator[bytes]:
    """The tar of ``entries`` in pieces; ``read(entry)`` yields a regular file's content."""
    first_name: dict[int, str] = {}
    for e in entries:
        if not e.path:
            continue  # the root: see the module's docstring
        kind = _KINDS.get(e.kind)
        if kind is None:
            log.warn(f"/{e.path}: a socket can't be stored in an OCI layer, left out")
            continue
        if kind != tarfile.DIRTYPE and e.nlink > 1:
            if e.inode in first_name:
                yield _header(e, tarfile.LNKTYPE, first_name[e.inode])
                continue
            first_name[e.inode] = e.path
        yield _header(e, kind)
        if kind == tarfile.REGTYPE:
            done = 0
            for chunk in read(e):
                done += len(chunk)
                yield chunk
            if done != e.size:
                raise ImageError(f"can't read /{e.path} from the image: {done} of {e.size} bytes")
            if e.size % _BLOCK:
                yield b"\0" * (_BLOCK - e.size % _BLOCK)
    yield b"\0" * (2 * _BLOCK)


def write_layer(entries: Iterable[Entry], read: ReadFn, out: IO[bytes]) -> LayerDigests:
    """Write the gzip-compressed tar of ``entries`` to ``out``; return its digests."""
    blob = _Hashing(out)
    tar = _Hashing(None)
    # mtime=0 and no file name: the gzip header carries nothing of this run.
    with gzip.GzipFile(filename="", mode="wb", fileobj=blob, mtime=0, compresslevel=6) as gz:
        for piece in tar_stream(entries, read):
            tar.write(piece)
            gz.write(piece)
    return LayerDigests(
        "sha256:" + blob.sha.hexdigest(), blob.size, "sha256:" + tar.sha.hexdigest()
    )

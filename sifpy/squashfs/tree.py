"""Walk every entry of a squashfs (inside a SIF, at an offset) without mounting it.

``sifpy export`` turns an image's tree into an OCI layer with this; reading in Python
(PySquashfsImage) needs no FUSE, no namespace and no extraction to disk, and sees what the
image holds (owners, modes, device numbers) rather than what an unprivileged unpack could
recreate.
"""

from __future__ import annotations

import stat
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sifpy.errors import ImageError
from sifpy.squashfs.read import open_squashfs

# The kinds an entry can be (the S_IFMT bits, as tarfile and os.stat name them).
DIR, REG, SYMLINK, CHR, BLK, FIFO, SOCK = (
    stat.S_IFDIR,
    stat.S_IFREG,
    stat.S_IFLNK,
    stat.S_IFCHR,
    stat.S_IFBLK,
    stat.S_IFIFO,
    stat.S_IFSOCK,
)


@dataclass(frozen=True)
class Entry:
    """One name in the tree; ``path`` is relative (no leading ``/``), ``""`` for the root."""

    path: str
    kind: int
    mode: int  # permission bits, setuid/setgid/sticky included
    uid: int
    gid: int
    mtime: int
    size: int
    link: str  # a symlink's target
    inode: int  # the squashfs inode number: names sharing one are hard links
    nlink: int
    rdev: tuple[int, int]  # a device's (major, minor)
    node: Any  # the library's file object, for :meth:`SquashfsTree.chunks`


class SquashfsTree:
    """The squashfs at ``offset`` of ``path``; iterate with :meth:`walk`."""

    def __init__(self, path: str, offset: int) -> None:
        self.path = path
        self._img = open_squashfs(path, offset)

    def close(self) -> None:
        self._img.close()

    def __enter__(self) -> SquashfsTree:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def walk(self) -> Iterator[Entry]:
        """Every entry, the root first, then each directory's names in byte order (the
        order squashfs stores them), depth first: the same tree gives the same order."""
        try:
            yield self._entry("", self._img.root)
            yield from self._children(self._img.root, "")
        except ImageError:
            raise
        except Exception as exc:  # a corrupt image: the library's own exception types
            raise ImageError(f"can't read the squashfs in {self.path}: {exc}") from exc

    def _children(self, directory: Any, prefix: str) -> Iterator[Entry]:
        # Byte order of the names (the library's files compare by their raw names). A name
        # that is not UTF-8 already fails when the library opens the image: an ImageError.
        for child in sorted(directory.iterdir()):
            name = child.name
            if name in ("", ".", "..") or "/" in name:
                raise ImageError(f"can't read the squashfs in {self.path}: bad name {name!r}")
            path = prefix + name
            yield self._entry(path, child)
            if child.is_dir:
                yield from self._children(child, path + "/")

    def _entry(self, path: str, node: Any) -> Entry:
        ino = node.inode
        mode = int(ino.mode)
        link = ""
        rdev = (0, 0)
        if node.is_symlink:
            target = node.readlink()
            link = (
                target.decode("utf-8", "surrogateescape") if isinstance(target, bytes) else target
            )
        if node.is_char_device or node.is_block_device:
            rdev = (int(node.major), int(node.minor))
        return Entry(
            path=path,
            kind=stat.S_IFMT(mode),
            mode=stat.S_IMODE(mode),
            uid=int(node.uid),
            gid=int(node.gid),
            mtime=int(node.time),
            size=int(node.size) if node.is_file else 0,
            link=link,
            inode=int(ino.inode_number),
            nlink=int(getattr(ino, "nlink", 1)),
            rdev=rdev,
            node=node,
        )

    def chunks(self, entry: Entry) -> Iterator[bytes]:
        """A regular file's content, block by block."""
        try:
            yield from entry.node.iter_bytes()
        except Exception as exc:
            raise ImageError(f"can't read /{entry.path} from {self.path}: {exc}") from exc

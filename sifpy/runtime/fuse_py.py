"""A read-only FUSE server for a squashfs partition in pure Python (pyfuse3 + PySquashfsImage).

The fallback mount for machines without squashfuse . It runs like
squashfuse: a child of the monitor, handed the image fd and an already-mounted FUSE
connection (``/dev/fd/N``, which libfuse >= 3.3 takes as is), killed when the container ends.

:class:`Server` is created in the monitor *before* the session tmpfs covers ``/tmp``: it
imports pyfuse3, trio and PySquashfsImage (whose files may live under ``/tmp``, as in the
tests) and reads the squashfs directory tree, so that a bad image fails early with a clear
message and the forked server never needs to import anything. pyfuse3 and PySquashfsImage
are reached through ``importlib`` because neither ships type information; this module is
imported only on this path, never by ``sifpy exec`` otherwise.

Inode numbers: the squashfs root is FUSE's ``ROOT_INODE`` (1); every other file is its
squashfs inode number + 1 (squashfs numbers start at 1, so the two never meet).
"""

from __future__ import annotations

import errno
import importlib
import os
import stat
from typing import Any, NoReturn

_TIMEOUT = 3600.0  # the image never changes: let the kernel cache entries and attributes
_COMPRESSED_BIT = 1 << 24  # squashfs_fs.h SQUASHFS_COMPRESSED_BIT_BLOCK


class _PreadFile:
    """The file object PySquashfsImage reads through, over ``pread``; ``fd`` may be changed
    after a fork (the server gets the image as fd 3)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.pos = 0

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        self.pos = pos if whence == os.SEEK_SET else self.pos + pos
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            size = 1 << 20
        data = os.pread(self.fd, size, self.pos)
        self.pos += len(data)
        return data

    def close(self) -> None:
        pass


class Server:
    """The squashfs at ``offset`` in ``image_fd``, parsed and ready to serve."""

    def __init__(self, image_fd: int, offset: int) -> None:
        self.pyfuse3: Any = importlib.import_module("pyfuse3")
        self.trio: Any = importlib.import_module("trio")
        squashfs: Any = importlib.import_module("PySquashfsImage")
        self.file = _PreadFile(image_fd)
        self.image: Any = squashfs.SquashFsImage(self.file, offset=offset, closefd=False)

    def serve(self, image_fd: int, fuse_fd: int) -> NoReturn:
        """Serve the connection ``fuse_fd`` until it is aborted; never returns."""
        self.file.fd = image_fd
        ops = _operations(self.pyfuse3, self.image)
        code = 0
        try:
            self.pyfuse3.init(ops, f"/dev/fd/{fuse_fd}", set())
            self.trio.run(self.pyfuse3.main)
        except BaseException as exc:
            os.write(2, f"error: sifpy FUSE server: {exc!r}\n".encode())
            code = 1
        os._exit(code)


def _operations(pyfuse3: Any, image: Any) -> Any:
    """The pyfuse3 ``Operations`` for ``image`` (a class made here: pyfuse3 is imported late)."""
    fuse_error = pyfuse3.FUSEError
    block_size: int = image.sblk.block_size
    root = image.root

    class Ops(pyfuse3.Operations):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.nodes: dict[int, Any] = {pyfuse3.ROOT_INODE: root}
            self.files: dict[int, tuple[Any, list[int], list[int]]] = {}
            self.next_fh = 1

        def _ino(self, node: Any) -> int:
            ino = pyfuse3.ROOT_INODE if node is root else node.inode.inode_number + 1
            self.nodes[ino] = node
            return int(ino)

        def _node(self, ino: int) -> Any:
            try:
                return self.nodes[ino]
            except KeyError:
                raise fuse_error(errno.ENOENT) from None

        def _attr(self, node: Any) -> Any:
            inode = node.inode
            attr = pyfuse3.EntryAttributes()
            attr.st_ino = self._ino(node)
            attr.st_mode = node.mode
            attr.st_nlink = getattr(inode, "nlink", 1)
            attr.st_uid, attr.st_gid = node.uid, node.gid
            kind = stat.S_IFMT(node.mode)
            if kind in (stat.S_IFREG, stat.S_IFLNK, stat.S_IFDIR):
                attr.st_size = len(_target(node)) if kind == stat.S_IFLNK else inode.data
            attr.st_rdev = getattr(inode, "rdev", 0) if kind in (stat.S_IFCHR, stat.S_IFBLK) else 0
            attr.st_blksize = block_size
            attr.st_blocks = (attr.st_size + 511) // 512
            attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = node.time * 1_000_000_000
            attr.entry_timeout = attr.attr_timeout = _TIMEOUT
            return attr

        async def getattr(self, inode: int, ctx: Any = None) -> Any:
            return self._attr(self._node(inode))

        async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
            parent = self._node(parent_inode)
            if not parent.is_dir:
                raise fuse_error(errno.ENOTDIR)
            if name == b".":
                return self._attr(parent)
            if name == b"..":
                return self._attr(parent.parent or root)
            child = parent.children.get(name.decode(errors="surrogateescape"))
            if child is None:
                raise fuse_error(errno.ENOENT)
            return self._attr(child)

        async def readlink(self, inode: int, ctx: Any) -> bytes:
            node = self._node(inode)
            if not node.is_symlink:
                raise fuse_error(errno.EINVAL)
            return _target(node)

        async def opendir(self, inode: int, ctx: Any) -> int:
            if not self._node(inode).is_dir:
                raise fuse_error(errno.ENOTDIR)
            return inode

        async def readdir(self, fh: int, start_id: int, token: Any) -> None:
            children = list(self._node(fh).children.values())
            for i in range(start_id, len(children)):
                child = children[i]
                if not pyfuse3.readdir_reply(token, bytes(child._name), self._attr(child), i + 1):
                    break

        async def open(self, inode: int, flags: int, ctx: Any) -> Any:
            node = self._node(inode)
            if flags & (os.O_WRONLY | os.O_RDWR):
                raise fuse_error(errno.EROFS)
            if not node.is_file:
                raise fuse_error(errno.EINVAL)
            ino = node.inode
            blocks: list[int] = []
            if ino.blocks:
                blocks = image._read_block_list(ino.block_start, ino.block_offset, ino.blocks)
            starts, pos = [], ino.start
            for b in blocks:
                starts.append(pos)
                pos += b & ~_COMPRESSED_BIT
            fh = self.next_fh
            self.next_fh += 1
            self.files[fh] = (node, blocks, starts)
            return pyfuse3.FileInfo(fh=fh, keep_cache=True)

        async def read(self, fh: int, off: int, size: int) -> bytes:
            node, blocks, starts = self.files[fh]
            ino = node.inode
            end = min(off + size, ino.data)
            out: list[bytes] = []
            pos = off
            while pos < end:
                i = pos // block_size
                if i < len(blocks):
                    if blocks[i]:
                        data = image._read_data_block(starts[i], blocks[i])
                    else:  # a sparse block
                        data = b"\0" * min(block_size, ino.data - i * block_size)
                elif ino.frag_bytes:
                    start, fsize = image._read_fragment(ino.fragment)
                    frag = image._read_data_block(start, fsize)
                    data = frag[ino.offset : ino.offset + ino.frag_bytes]
                else:
                    break
                chunk = data[pos - i * block_size : end - i * block_size]
                if not chunk:
                    break
                out.append(chunk)
                pos += len(chunk)
            return b"".join(out)

        async def release(self, fh: int) -> None:
            self.files.pop(fh, None)

        async def releasedir(self, fh: int) -> None:
            pass

        async def statfs(self, ctx: Any) -> Any:
            st = pyfuse3.StatvfsData()
            st.f_bsize = st.f_frsize = block_size
            st.f_blocks = (image.size + block_size - 1) // block_size
            st.f_bfree = st.f_bavail = 0
            st.f_files = image.sblk.inodes
            st.f_ffree = st.f_favail = 0
            st.f_namemax = 256
            return st

    # An unexpected exception would end pyfuse3's main loop (and so the container's root):
    # answer EIO for that one request instead.
    for name in ("getattr", "lookup", "readlink", "opendir", "readdir", "open", "read", "statfs"):
        setattr(Ops, name, _eio(getattr(Ops, name), fuse_error))
    return Ops()


def _target(node: Any) -> bytes:
    raw = getattr(node.inode, "_symlink", None)  # the bytes as stored (any encoding)
    if isinstance(raw, bytes):
        return raw
    target = node.inode.symlink
    return os.fsencode(target) if isinstance(target, str) else bytes(target)


def _eio(method: Any, fuse_error: Any) -> Any:
    async def wrapped(*args: Any) -> Any:
        try:
            return await method(*args)
        except fuse_error:
            raise
        except Exception as exc:
            os.write(2, f"sifpy FUSE server: {method.__name__}: {exc!r}\n".encode())
            raise fuse_error(errno.EIO) from exc

    return wrapped

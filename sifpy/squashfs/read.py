"""Read files out of an image without mounting it: a SIF's squashfs, or a sandbox.

``inspect`` and the builder's ``localimage`` history use this; the runtime never does (it
mounts). Reading a squashfs in Python (PySquashfsImage) needs no FUSE, no namespace and
no temporary extraction, so it works anywhere, even where user namespaces are off.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

from sifpy.errors import ImageError


class ImageFiles(Protocol):
    """Read-only access to files in an image's root file system."""

    def read(self, path: str, limit: int = 16 << 20) -> bytes | None:
        """The file's content, or None when it does not exist (or is not a file)."""

    def listdir(self, path: str) -> list[str]:
        """Names in a directory; empty when it does not exist."""

    def close(self) -> None: ...


def open_squashfs(path: str, offset: int) -> Any:
    """PySquashfsImage's image of the squashfs at ``offset`` of ``path``; ImageError when
    the module is missing or the bytes are no squashfs it can read."""
    try:
        from PySquashfsImage import SquashFsImage  # type: ignore[import-untyped]
    except ImportError as exc:
        raise ImageError(
            "can't read squashfs images: the PySquashfsImage module is missing",
            hint="install sifpy with its dependencies (pip install sifpy)",
        ) from exc
    try:
        return SquashFsImage.from_file(path, offset=offset)
    except Exception as exc:  # the library raises bare ValueErrors/IOErrors on bad input
        raise ImageError(f"can't read the squashfs in {path}: {exc}") from exc


class SquashfsFiles:
    """Files of the squashfs at ``offset`` in ``path`` (a SIF's primary partition)."""

    def __init__(self, path: str, offset: int) -> None:
        self._img = open_squashfs(path, offset)

    def _node(self, path: str) -> Any:
        try:
            node = self._img.select(path)
            for _ in range(8):  # follow a few symlinks, inside the image only
                if node is None or not node.is_symlink:
                    return node
                target = node.readlink()
                base = os.path.dirname(node.path) if not target.startswith("/") else "/"
                node = self._img.select(os.path.normpath(os.path.join(base, target)))
        except Exception as exc:
            raise ImageError(f"can't read {path} from the image: {exc}") from exc
        return None

    def read(self, path: str, limit: int = 16 << 20) -> bytes | None:
        node = self._node(path)
        if node is None or not node.is_file:
            return None
        if node.size > limit:
            raise ImageError(f"{path} in the image is larger than {limit} bytes")
        try:
            data: bytes = node.read_bytes()
        except Exception as exc:
            raise ImageError(f"can't read {path} from the image: {exc}") from exc
        return data

    def listdir(self, path: str) -> list[str]:
        node = self._node(path)
        if node is None or not node.is_dir:
            return []
        return sorted(child.name for child in node)

    def close(self) -> None:
        self._img.close()


class DirectoryFiles:
    """Files of a sandbox directory, resolved inside it (symlinks can't lead out)."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)

    def _resolve(self, path: str) -> str | None:
        cur = ""
        parts = [p for p in path.split("/") if p not in ("", ".")]
        hops = 0
        while parts:
            part = parts.pop(0)
            if part == "..":
                cur = os.path.dirname(cur)
                continue
            candidate = f"{cur}/{part}"
            full = self.root + candidate
            if os.path.islink(full):
                hops += 1
                if hops > 40:
                    return None
                target = os.readlink(full)
                parts = [p for p in target.split("/") if p not in ("", ".")] + parts
                if target.startswith("/"):
                    cur = ""
                continue
            cur = candidate
        return self.root + cur

    def read(self, path: str, limit: int = 16 << 20) -> bytes | None:
        full = self._resolve(path)
        if full is None or not os.path.isfile(full):
            return None
        if os.path.getsize(full) > limit:
            raise ImageError(f"{path} in the image is larger than {limit} bytes")
        with open(full, "rb") as f:
            return f.read()

    def listdir(self, path: str) -> list[str]:
        full = self._resolve(path)
        if full is None or not os.path.isdir(full):
            return []
        return sorted(os.listdir(full))

    def close(self) -> None:
        pass


def open_image_files(path: str) -> tuple[ImageFiles, bytes | None]:
    """Files of the image at ``path``, and its stored definition file (SIF only)."""
    if os.path.isdir(path):
        return DirectoryFiles(path), None
    from sifpy.sif import SifImage
    from sifpy.sif import format as F
    from sifpy.sif.ocisif import rootfs

    with SifImage.open(path) as img:
        part = rootfs(img)  # the primary partition, or an OCI-SIF's squashfs layer
        defs = img.find(F.DataType.DEFFILE)
        deffile = img.read(defs[0]) if defs else None
        offset = part.offset
    return SquashfsFiles(path, offset), deffile

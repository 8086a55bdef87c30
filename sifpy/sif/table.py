"""The header and descriptor table of a SIF open for writing: adding, deleting and
promoting objects, in the byte layout of the reference.

Byte layout and rules follow the reference (sylabs/sif ``pkg/sif/create.go``): objects
are written in order at the first offset past the data end that meets their alignment
(4096 for partitions, none otherwise), ids are slot index + 1 and the first free slot is
reused, deletion clears the descriptor but leaves the data unless compacting the last
object.
"""

from __future__ import annotations

import os

from sifpy.errors import ImageError, ObjectNotFoundError, UsageError
from sifpy.sif import format as F
from sifpy.sif.atomic import copy_fd, pwrite_all
from sifpy.sif.image import SifImage
from sifpy.sif.objects import ObjectInput, Source

_ZERO_CHUNK = bytes(1 << 20)


class Writer:
    """Header and descriptor table of an image open for writing on ``fd``."""

    def __init__(self, fd: int, header: F.Header, slots: list[F.RawDescriptor]) -> None:
        self.fd = fd
        self.h = header
        self.slots = slots

    @classmethod
    def load(cls, fd: int, path: str) -> Writer:
        img = SifImage.from_fd(fd, path)
        if img.inconsistent_free:
            raise ImageError(
                f"can't modify SIF: {path}: header's free descriptor count disagrees "
                "with the descriptor table",
                hint="the image is corrupt; rebuild it",
            )
        return cls(fd, img.header, list(img.slots))

    def used(self) -> list[F.RawDescriptor]:
        return [d for d in self.slots if d.used]

    def index_of(self, object_id: int) -> int:
        for i, d in enumerate(self.slots):
            if d.used and d.id == object_id:
                return i
        raise ObjectNotFoundError(f"no object with id {object_id}")

    def add(self, obj: ObjectInput, t: int) -> int:
        slot = next((i for i, d in enumerate(self.slots) if not d.used), None)
        if slot is None:
            raise ImageError(
                f"no free descriptor: the image holds at most {len(self.slots)} objects",
                hint="delete an object, or create the image with a larger capacity",
            )
        h = self.h
        if obj.data_type == F.DataType.PARTITION:
            part = F.PartitionExtra.unpack(obj.extra.ljust(F.DESCR_EXTRA_LEN, b"\x00"))
            if part.parttype == F.PartType.PRIMSYS:
                if any(_is_primsys(d) for d in self.slots):
                    raise ImageError("image already contains a primary partition")
                h = h.replace(arch=part.arch)
        name = obj.name.encode("utf-8")
        _check_fields(obj, name)
        alignment = obj.alignment
        if alignment is None:
            alignment = 4096 if obj.data_type == F.DataType.PARTITION else 0
        unaligned = h.data_offset + h.data_size
        offset = _next_aligned(unaligned, alignment)
        size = _write_source(self.fd, obj.data, offset)
        created = t if obj.created_at is None else obj.created_at
        group = obj.group_id | F.DESCR_GROUP_MASK
        link = obj.linked_id | (F.DESCR_GROUP_MASK if obj.link_to_group else 0)
        self.slots[slot] = F.RawDescriptor(
            data_type=obj.data_type,
            used=1,
            id=slot + 1,
            group_id=group,
            linked_id=link,
            offset=offset,
            size=size,
            size_with_padding=offset - unaligned + size,
            created_at=created,
            modified_at=created,
            uid=0,
            gid=0,
            name=name,
            extra=obj.extra,
        )
        self.h = h.replace(
            descriptors_free=h.descriptors_free - 1,
            data_size=h.data_size + offset - unaligned + size,
        )
        return slot + 1

    def delete(self, object_id: int, zero: bool, compact: bool) -> None:
        i = self.index_of(object_id)
        d = self.slots[i]
        if compact and any(o.offset + o.size > d.offset + d.size for o in self.used()):
            raise ImageError(
                f"can't compact: object {object_id} is not the last object in the file",
                hint="delete without compacting",
            )
        if zero:
            pos, end = d.offset, d.offset + d.size
            while pos < end:
                pos += os.pwrite(self.fd, _ZERO_CHUNK[: min(len(_ZERO_CHUNK), end - pos)], pos)
        h = self.h
        if compact:
            os.ftruncate(self.fd, d.offset + d.size - d.size_with_padding)
            h = h.replace(data_size=h.data_size - d.size_with_padding)
        if _is_primsys(d):
            h = h.replace(arch=F.ARCH_UNKNOWN)
        self.h = h.replace(descriptors_free=h.descriptors_free + 1)
        self.slots[i] = F.EMPTY_DESCRIPTOR

    def set_primary(self, object_id: int) -> bool:
        """Make a System partition the primary one; False when it already is."""
        i = self.index_of(object_id)
        d = self.slots[i]
        if d.data_type != F.DataType.PARTITION:
            raise ImageError(f"object {object_id} is not a partition")
        part = F.PartitionExtra.unpack(d.extra)
        if part.parttype == F.PartType.PRIMSYS:
            return False
        if part.parttype != F.PartType.SYSTEM:
            raise ImageError(
                f"object {object_id} is not a system partition",
                hint="only a System partition can become the primary one",
            )
        for j, old in enumerate(self.slots):
            if _is_primsys(old):
                oldp = F.PartitionExtra.unpack(old.extra)
                self.slots[j] = old.replace(extra=oldp.replace(parttype=F.PartType.SYSTEM).pack())
        arch = part.arch if part.arch in F.ARCH_NAMES else F.ARCH_UNKNOWN
        self.slots[i] = d.replace(extra=part.replace(parttype=F.PartType.PRIMSYS).pack())
        self.h = self.h.replace(arch=arch)
        return True

    def flush(self) -> None:
        table = b"".join(d.pack() for d in self.slots)
        pwrite_all(self.fd, table, self.h.descriptors_offset)
        pwrite_all(self.fd, self.h.pack(), 0)


def _is_primsys(d: F.RawDescriptor) -> bool:
    return (
        bool(d.used)
        and d.data_type == F.DataType.PARTITION
        and F.PartitionExtra.unpack(d.extra).parttype == F.PartType.PRIMSYS
    )


def _check_fields(obj: ObjectInput, name: bytes) -> None:
    if len(name) > F.DESCR_NAME_LEN:
        raise UsageError(f"object name longer than {F.DESCR_NAME_LEN} bytes: {obj.name!r}")
    if len(obj.extra) > F.DESCR_EXTRA_LEN:
        raise UsageError(f"descriptor extra data longer than {F.DESCR_EXTRA_LEN} bytes")
    for what, value in (("group id", obj.group_id), ("linked id", obj.linked_id)):
        if not 0 <= value < F.DESCR_GROUP_MASK:
            raise UsageError(f"{what} out of range: {value}")
    if obj.alignment is not None and obj.alignment < 0:
        raise UsageError(f"negative alignment: {obj.alignment}")
    if obj.link_to_group and obj.linked_id == 0:
        raise UsageError("a link to a group needs a group id above 0")


def _next_aligned(offset: int, alignment: int) -> int:
    if alignment and offset % alignment:
        return offset + alignment - offset % alignment
    return offset


def _write_source(fd: int, src: Source, offset: int) -> int:
    """Write an object's data at ``offset``; returns its size. Streams, never slurps."""
    if isinstance(src, bytes | bytearray | memoryview):
        pwrite_all(fd, src, offset)
        return len(src)
    if isinstance(src, str | os.PathLike):
        try:
            in_fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise ImageError(f"can't read object data: {os.fspath(src)}: {exc.strerror}") from exc
        try:
            return copy_fd(in_fd, fd, offset)
        finally:
            os.close(in_fd)
    total = 0
    while chunk := src.read(1 << 20):
        pwrite_all(fd, chunk, offset + total)
        total += len(chunk)
    return total

"""Writing SIF files: create, add an object, delete an object, set the primary partition.

Byte layout and rules follow the reference (sylabs/sif ``pkg/sif/create.go``): objects
are written in order at the first offset past the data end that meets their alignment
(4096 for partitions, none otherwise), ids are slot index + 1 and the first free slot is
reused, deletion clears the descriptor but leaves the data unless compacting the last
object. Deterministic mode (nil UUID, Go's zero time) gives byte-exact golden files.

Every write is atomic: the new image is written to an unnamed file (``O_TMPFILE``) in the
destination directory and linked over the final name only once complete and synced. A
crash, a kill or a full disk leaves the old image (or nothing) under the final name, and
a SIGKILL leaves no stray temporary file. Modifications clone the image first
(``FICLONE`` reflink where the filesystem can, else ``copy_file_range``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time as _time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import BinaryIO

from sifpy.errors import ImageError, ObjectNotFoundError, UsageError
from sifpy.sif import format as F
from sifpy.sif.image import SifImage

FICLONE = 0x40049409  # _IOW(0x94, 9, int), linux/fs.h
_ZERO_CHUNK = bytes(1 << 20)

Source = bytes | str | os.PathLike[str] | BinaryIO


@dataclass
class ObjectInput:
    """A data object to add: its bytes (or a file, or a stream) and descriptor fields.

    ``group_id`` 0 means no group; ``linked_id`` is an object id, or a group id when
    ``link_to_group``. ``alignment`` None picks the reference default.
    """

    data_type: int
    data: Source
    group_id: int = F.DEFAULT_OBJECT_GROUP
    linked_id: int = 0
    link_to_group: bool = False
    alignment: int | None = None
    name: str = ""
    extra: bytes = b""
    created_at: int | None = None

    @classmethod
    def partition(
        cls, data: Source, fstype: int, parttype: int, arch: str, **kw: object
    ) -> ObjectInput:
        """A partition object; ``arch`` is a Go architecture name such as ``amd64``."""
        if arch not in F.ARCH_CODES:
            raise UsageError(
                f"unknown architecture: {arch}",
                hint="one of: " + ", ".join(F.ARCH_CODES),
            )
        extra = F.PartitionExtra(fstype, parttype, F.ARCH_CODES[arch]).pack()
        return cls(F.DataType.PARTITION, data, extra=extra, **kw)  # type: ignore[arg-type]

    @classmethod
    def signature(
        cls, data: Source, hashtype: int, entity: bytes = b"", **kw: object
    ) -> ObjectInput:
        """A signature object; ``entity`` is the signer's 20-byte PGP fingerprint or empty."""
        if len(entity) > F.DESCR_ENTITY_LEN:
            raise UsageError(f"signing entity longer than {F.DESCR_ENTITY_LEN} bytes")
        extra = F.SignatureExtra(hashtype, entity).pack()
        return cls(F.DataType.SIGNATURE, data, extra=extra, **kw)  # type: ignore[arg-type]

    @classmethod
    def crypto_message(
        cls, data: Source, formattype: int, messagetype: int, **kw: object
    ) -> ObjectInput:
        extra = F.CryptoMessageExtra(formattype, messagetype).pack()
        return cls(F.DataType.CRYPTO_MESSAGE, data, extra=extra, **kw)  # type: ignore[arg-type]

    @classmethod
    def sbom(cls, data: Source, fmt: int, **kw: object) -> ObjectInput:
        extra = F.SBOMExtra(fmt).pack()
        return cls(F.DataType.SBOM, data, extra=extra, **kw)  # type: ignore[arg-type]

    @classmethod
    def oci(cls, data: Source, digest: str, root_index: bool = False, **kw: object) -> ObjectInput:
        """An OCI.Blob (or OCI.RootIndex) object carrying its ``sha256:<hex>`` digest."""
        dt = F.DataType.OCI_ROOT_INDEX if root_index else F.DataType.OCI_BLOB
        return cls(dt, data, extra=digest.encode("ascii"), **kw)  # type: ignore[arg-type]


def now() -> int:
    return int(_time.time())


# --- the in-memory image being written ---------------------------------------------------


class _Writer:
    """Header and descriptor table of an image open for writing on ``fd``."""

    def __init__(self, fd: int, header: F.Header, slots: list[F.RawDescriptor]) -> None:
        self.fd = fd
        self.h = header
        self.slots = slots

    @classmethod
    def load(cls, fd: int, path: str) -> _Writer:
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
        _pwrite_all(self.fd, table, self.h.descriptors_offset)
        _pwrite_all(self.fd, self.h.pack(), 0)


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


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _write_source(fd: int, src: Source, offset: int) -> int:
    """Write an object's data at ``offset``; returns its size. Streams, never slurps."""
    if isinstance(src, bytes | bytearray | memoryview):
        _pwrite_all(fd, src, offset)
        return len(src)
    if isinstance(src, str | os.PathLike):
        try:
            in_fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise ImageError(f"can't read object data: {os.fspath(src)}: {exc.strerror}") from exc
        try:
            return _copy_fd(in_fd, fd, offset)
        finally:
            os.close(in_fd)
    total = 0
    while chunk := src.read(1 << 20):
        _pwrite_all(fd, chunk, offset + total)
        total += len(chunk)
    return total


def _copy_fd(in_fd: int, out_fd: int, offset: int) -> int:
    """Copy all of ``in_fd`` into ``out_fd`` at ``offset``, kernel-side when possible."""
    total = 0
    try:
        while n := os.copy_file_range(in_fd, out_fd, 1 << 30, total, offset + total):
            total += n
        return total
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
    while chunk := os.pread(in_fd, 1 << 20, total):
        _pwrite_all(out_fd, chunk, offset + total)
        total += len(chunk)
    return total


# --- atomic files ------------------------------------------------------------------------


class AtomicFile:
    """A file that appears under ``path`` only when :meth:`commit` succeeds.

    Written as an unnamed ``O_TMPFILE`` in the destination directory (so nothing is left
    if the process dies), then linked under a temporary name and renamed over ``path``.
    Where ``O_TMPFILE`` is unsupported, a named temporary file is used and removed on error.
    """

    def __init__(self, path: str | os.PathLike[str], mode: int = 0o755) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.dir = os.path.dirname(self.path)
        self.mode = mode
        self.named: str | None = None
        self.fd = -1

    def __enter__(self) -> AtomicFile:
        try:
            self.fd = os.open(self.dir, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, self.mode)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise _dest_error(self.path, exc) from exc
            self.named = self._temp_name()
            try:
                self.fd = os.open(
                    self.named, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, self.mode
                )
            except OSError as exc2:
                raise _dest_error(self.path, exc2) from exc2
        return self

    def _temp_name(self) -> str:
        return os.path.join(
            self.dir, f".{os.path.basename(self.path)}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
        )

    def commit(self, like: os.stat_result | None = None) -> None:
        """Sync and move into place; ``like`` copies mode (and, as root, ownership)."""
        if like is not None:
            os.fchmod(self.fd, like.st_mode & 0o7777)
            if os.geteuid() == 0:
                os.fchown(self.fd, like.st_uid, like.st_gid)
        os.fsync(self.fd)
        dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if self.named is None:
                tmp = self._temp_name()
                # linkat(AT_SYMLINK_FOLLOW) on /proc/self/fd names the O_TMPFILE. Passing
                # dst_dir_fd makes Python call linkat (plain link() would not follow).
                os.link(f"/proc/self/fd/{self.fd}", os.path.basename(tmp), dst_dir_fd=dfd)
                self.named = tmp
            os.replace(self.named, self.path)
            self.named = None
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def __exit__(self, *exc: object) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.named is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.named)


def _dest_error(path: str, exc: OSError) -> ImageError:
    hint = "check that the directory exists and is writable" if exc.errno != errno.ENOSPC else None
    return ImageError(f"can't write SIF: {path}: {exc.strerror}", hint=hint)


def clone(src_fd: int, dst_fd: int) -> None:
    """Copy a whole file, sharing blocks (reflink) when the filesystem allows."""
    try:
        fcntl.ioctl(dst_fd, FICLONE, src_fd)
        return
    except OSError:
        pass
    _copy_fd(src_fd, dst_fd, 0)


# --- public operations ---------------------------------------------------------------


def _times(deterministic: bool, t: int | None) -> int:
    if t is not None:
        return t
    return F.ZERO_TIME if deterministic else now()


def create(
    path: str | os.PathLike[str],
    objects: Iterable[ObjectInput] = (),
    *,
    launch_script: str = "",
    deterministic: bool = False,
    image_id: bytes | None = None,
    t: int | None = None,
    capacity: int = F.DEFAULT_DESCRIPTOR_CAPACITY,
    descriptors_offset: int = F.DEFAULT_DESCRIPTORS_OFFSET,
    mode: int = 0o755,
) -> None:
    """Create a SIF at ``path`` holding ``objects``, atomically (replacing any old file)."""
    script = launch_script.encode("utf-8")
    if len(script) >= F.HDR_LAUNCH_LEN:
        raise UsageError(f"launch script too large (at most {F.HDR_LAUNCH_LEN - 1} bytes)")
    if not 0 <= capacity <= 1 << 16:
        raise UsageError(f"descriptor capacity out of range: {capacity}")
    if image_id is None:
        image_id = bytes(16) if deterministic else _random_uuid()
    if len(image_id) != 16:
        raise UsageError("an image id is 16 bytes")
    when = _times(deterministic, t)
    size = capacity * F.RawDescriptor.SIZE
    header = F.Header(
        launch_script=script,
        magic=F.HDR_MAGIC,
        version=F.HDR_VERSION,
        arch=F.ARCH_UNKNOWN,
        id=image_id,
        created_at=when,
        modified_at=when,
        descriptors_free=capacity,
        descriptors_total=capacity,
        descriptors_offset=descriptors_offset,
        descriptors_size=size,
        data_offset=descriptors_offset + size,
        data_size=0,
    )
    with AtomicFile(path, mode) as out:
        try:
            w = _Writer(out.fd, header, [F.EMPTY_DESCRIPTOR] * capacity)
            for obj in objects:
                w.add(obj, when)
            w.flush()
            out.commit()
        except OSError as exc:
            raise _dest_error(os.fspath(path), exc) from exc


def _random_uuid() -> bytes:
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40  # version 4
    b[8] = (b[8] & 0x3F) | 0x80  # RFC 4122 variant
    return bytes(b)


def _modify(path: str | os.PathLike[str], change: Callable[[_Writer], bool]) -> None:
    """Apply ``change`` to a clone of the image and swap it in atomically.

    ``change`` returns False when nothing changed (then the original stays untouched).
    """
    p = os.fspath(path)
    with SifImage.open(p) as img:
        st = os.fstat(img.fd)
        with AtomicFile(p, st.st_mode & 0o7777) as out:
            try:
                clone(img.fd, out.fd)
                w = _Writer.load(out.fd, p)
                if not change(w):
                    return
                w.flush()
                out.commit(like=st)
            except OSError as exc:
                raise _dest_error(p, exc) from exc


def add_object(
    path: str | os.PathLike[str],
    obj: ObjectInput,
    *,
    deterministic: bool = False,
    t: int | None = None,
) -> int:
    """Add ``obj`` to the image at ``path``; returns the new object's id."""
    when = _times(deterministic, t)
    new_id = 0

    def change(w: _Writer) -> bool:
        nonlocal new_id
        new_id = w.add(obj, when)
        w.h = w.h.replace(modified_at=when)
        return True

    _modify(path, change)
    return new_id


def delete_object(
    path: str | os.PathLike[str],
    object_id: int,
    *,
    zero: bool = False,
    compact: bool = False,
    deterministic: bool = False,
    t: int | None = None,
) -> None:
    """Delete an object: clear its descriptor; ``zero`` its data; ``compact`` if last."""
    when = _times(deterministic, t)

    def change(w: _Writer) -> bool:
        w.delete(object_id, zero, compact)
        w.h = w.h.replace(modified_at=when)
        return True

    _modify(path, change)


def set_primary(
    path: str | os.PathLike[str],
    object_id: int,
    *,
    deterministic: bool = False,
    t: int | None = None,
) -> None:
    """Make the System partition ``object_id`` the primary one (the old one becomes System)."""
    when = _times(deterministic, t)

    def change(w: _Writer) -> bool:
        if not w.set_primary(object_id):
            return False
        w.h = w.h.replace(modified_at=when)
        return True

    _modify(path, change)

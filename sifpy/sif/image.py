"""Reading SIF files: load with validation, look up objects, stream their data.

A SIF can hold tens of GB, so nothing here reads a whole partition into memory: objects are
read by offset (``os.pread``) in chunks, or copied kernel-side. The loader validates
everything a later stage relies on (magic, version, table bounds, every object inside the
file, no overlaps, no duplicate ids) and reports the first problem as a
:class:`~sifpy.errors.SifFormatError`, never a Python exception from deep inside.

Writing lives in :mod:`sifpy.sif.write`.
"""

from __future__ import annotations

import itertools
import os
import stat

from sifpy import TYPE_CHECKING
from sifpy.errors import ImageError, ObjectNotFoundError, SifFormatError
from sifpy.sif import format as F
from sifpy.util.record import Record

if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import BinaryIO

# A descriptor table is 585 bytes a slot; Apptainer writes 48. Anything above this is
# corrupt, not big: refuse it before allocating.
MAX_DESCRIPTORS = 1 << 16
CHUNK = 1 << 20


class Descriptor(Record):
    """One used descriptor, decoded: what ``siftool info`` shows.

    A record (:mod:`sifpy.util.record`), not a dataclass: ``sifpy exec`` reads descriptors
    on every start.
    """

    __slots__ = ("raw", "slot")

    def __init__(
        self,
        raw: F.RawDescriptor,
        slot: int,  # index in the descriptor table
    ) -> None:
        self.raw = raw
        self.slot = slot

    @property
    def id(self) -> int:
        return self.raw.id

    @property
    def data_type(self) -> int:
        return self.raw.data_type

    @property
    def group_id(self) -> int:
        """The group, 0 when the object is in no group."""
        return self.raw.group_id & ~F.DESCR_GROUP_MASK & 0xFFFFFFFF

    @property
    def linked_id(self) -> int:
        """The linked object or group id (see :attr:`links_group`), 0 for none."""
        return self.raw.linked_id & ~F.DESCR_GROUP_MASK & 0xFFFFFFFF

    @property
    def links_group(self) -> bool:
        return self.raw.linked_id & F.DESCR_GROUP_MASK == F.DESCR_GROUP_MASK

    @property
    def offset(self) -> int:
        return self.raw.offset

    @property
    def size(self) -> int:
        return self.raw.size

    @property
    def created_at(self) -> int:
        return self.raw.created_at

    @property
    def modified_at(self) -> int:
        return self.raw.modified_at

    @property
    def name(self) -> str:
        return self.raw.name.rstrip(b"\x00").decode("utf-8", "replace")

    @property
    def type_name(self) -> str:
        return F.DATA_TYPE_NAMES.get(self.data_type, "Unknown")

    def partition(self) -> F.PartitionExtra:
        """Partition metadata (fstype, parttype, arch code); raises if not a partition."""
        self._expect(F.DataType.PARTITION)
        return F.PartitionExtra.unpack(self.raw.extra)

    def signature(self) -> F.SignatureExtra:
        self._expect(F.DataType.SIGNATURE)
        return F.SignatureExtra.unpack(self.raw.extra)

    def crypto_message(self) -> F.CryptoMessageExtra:
        self._expect(F.DataType.CRYPTO_MESSAGE)
        return F.CryptoMessageExtra.unpack(self.raw.extra)

    def sbom(self) -> F.SBOMExtra:
        self._expect(F.DataType.SBOM)
        return F.SBOMExtra.unpack(self.raw.extra)

    def oci_digest(self) -> str:
        """The ``sha256:<hex>`` digest text of an OCI.RootIndex or OCI.Blob object."""
        if self.data_type not in (F.DataType.OCI_ROOT_INDEX, F.DataType.OCI_BLOB):
            raise ImageError(f"object {self.id} is not an OCI blob or root index")
        return self.raw.extra.split(b"\x00", 1)[0].decode("ascii", "replace")

    def is_primary_partition(self) -> bool:
        return (
            self.data_type == F.DataType.PARTITION
            and self.partition().parttype == F.PartType.PRIMSYS
        )

    def _expect(self, dt: int) -> None:
        if self.data_type != dt:
            raise ImageError(f"object {self.id} is {self.type_name}, not {F.DATA_TYPE_NAMES[dt]}")


class SifImage:
    """An open, validated SIF file.

    Open it with :meth:`open` (a path) or :meth:`from_fd` (a descriptor the caller keeps
    using, so that the file verified is the file mounted). Use as a context manager.
    """

    def __init__(self, fd: int, path: str, *, owns_fd: bool) -> None:
        self.fd = fd
        self.path = path
        self._owns_fd = owns_fd
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ImageError(f"can't read SIF: {path}: is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise ImageError(f"can't read SIF: {path}: not a regular file")
        self.file_size = st.st_size
        self.inconsistent_free = False
        self.header = self._load_header()
        self.slots = self._load_descriptors()
        self.descriptors = [Descriptor(raw, i) for i, raw in enumerate(self.slots) if raw.used]
        self._validate_objects()

    # --- opening ---------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike[str], writable: bool = False) -> SifImage:
        """Open and validate the SIF file at ``path``."""
        p = os.fspath(path)
        try:
            fd = os.open(p, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        except OSError as exc:
            raise ImageError(f"can't open SIF: {p}: {exc.strerror}", hint=_open_hint(exc)) from exc
        try:
            return cls(fd, p, owns_fd=True)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def from_fd(cls, fd: int, path: str = "<fd>") -> SifImage:
        """Load from an open descriptor; the caller keeps ownership of ``fd``."""
        return cls(fd, path, owns_fd=False)

    def close(self) -> None:
        if self._owns_fd and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> SifImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- validation --------------------------------------------------------------------

    def _fail(self, msg: str, hint: str | None = None) -> SifFormatError:
        return SifFormatError(self.path, msg, hint)

    def _pread(self, size: int, offset: int) -> bytes:
        try:
            data = os.pread(self.fd, size, offset)
        except OSError as exc:
            raise ImageError(f"can't read SIF: {self.path}: {exc.strerror}") from exc
        return data

    def _load_header(self) -> F.Header:
        if self.file_size < F.Header.SIZE:
            raise self._fail(
                f"file too small for a SIF header ({self.file_size} bytes, need {F.Header.SIZE})",
                hint="the file is empty or truncated; copy or build it again",
            )
        raw = self._pread(F.Header.SIZE, 0)
        if len(raw) < F.Header.SIZE:
            raise self._fail("short read of the global header")
        h = F.Header.unpack(raw)
        if h.magic != F.HDR_MAGIC:
            raise self._fail("bad magic: not a SIF file", hint="is this a SIF image?")
        if h.version != F.HDR_VERSION:
            found = h.version.rstrip(b"\x00").decode("ascii", "replace")
            raise self._fail(f"unsupported SIF version {found!r} (only 01 is known)")
        if not 0 <= h.descriptors_total <= MAX_DESCRIPTORS:
            raise self._fail(f"absurd descriptor count: {h.descriptors_total}")
        if not 0 <= h.descriptors_free <= h.descriptors_total:
            raise self._fail(
                f"free descriptor count {h.descriptors_free} outside 0..{h.descriptors_total}"
            )
        if h.descriptors_size != h.descriptors_total * F.RawDescriptor.SIZE:
            raise self._fail(
                f"descriptor table size {h.descriptors_size} does not match "
                f"{h.descriptors_total} descriptors of {F.RawDescriptor.SIZE} bytes"
            )
        end = h.descriptors_offset + h.descriptors_size
        if h.descriptors_offset < F.Header.SIZE or end > self.file_size:
            raise self._fail(
                f"descriptor table at {h.descriptors_offset}-{end} lies outside the file "
                f"(size {self.file_size})",
                hint="the file is truncated or corrupt",
            )
        if h.data_offset < 0 or h.data_size < 0 or h.data_offset + h.data_size > self.file_size:
            raise self._fail(
                f"data section {h.data_offset}+{h.data_size} lies outside the file "
                f"(size {self.file_size})",
                hint="the file is truncated or corrupt",
            )
        return h

    def _load_descriptors(self) -> list[F.RawDescriptor]:
        h = self.header
        table = self._pread(h.descriptors_size, h.descriptors_offset)
        if len(table) != h.descriptors_size:
            raise self._fail("short read of the descriptor table")
        size = F.RawDescriptor.SIZE
        return [F.RawDescriptor.unpack(table, i * size) for i in range(h.descriptors_total)]

    def _validate_objects(self) -> None:
        h = self.header
        seen: set[int] = set()
        table = (h.descriptors_offset, h.descriptors_offset + h.descriptors_size)
        spans: list[tuple[int, int, int]] = []
        for d in self.descriptors:
            if d.raw.used != 1:
                raise self._fail(f"descriptor {d.slot + 1}: bad 'used' flag {d.raw.used}")
            if d.id == 0:
                raise self._fail(f"descriptor {d.slot + 1}: object id 0 is reserved")
            if d.id in seen:
                raise self._fail(f"duplicate object id {d.id}")
            seen.add(d.id)
            if d.offset < 0 or d.size < 0 or d.offset + d.size > self.file_size:
                raise self._fail(
                    f"object {d.id}: data {d.offset}+{d.size} lies outside the file "
                    f"(size {self.file_size})",
                    hint="the file is truncated or corrupt",
                )
            if d.size == 0:
                continue
            start, end = d.offset, d.offset + d.size
            if start < F.Header.SIZE or (start < table[1] and table[0] < end):
                raise self._fail(f"object {d.id}: data overlaps the header or descriptor table")
            spans.append((start, end, d.id))
        spans.sort()
        for (_, end_a, id_a), (start_b, _, id_b) in itertools.pairwise(spans):
            if start_b < end_a:
                raise self._fail(f"objects {id_a} and {id_b} overlap")
        # The reference keeps `free` in step with the table; a mismatch means a
        # hand-edited or torn header. Readers cope, so only writers refuse it.
        self.inconsistent_free = len(self.descriptors) != h.descriptors_total - h.descriptors_free

    # --- header accessors ----------------------------------------------------------------

    @property
    def launch_script(self) -> str:
        return self.header.launch_script.rstrip(b"\x00").decode("utf-8", "replace")

    @property
    def version(self) -> str:
        return self.header.version.rstrip(b"\x00").decode("ascii", "replace")

    @property
    def primary_arch(self) -> str:
        """The Go name of the header's architecture, ``unknown`` when unset."""
        return F.ARCH_NAMES.get(self.header.arch, "unknown")

    @property
    def uuid(self) -> str:
        x = self.header.id.hex()
        return f"{x[:8]}-{x[8:12]}-{x[12:16]}-{x[16:20]}-{x[20:]}"

    # --- objects ---------------------------------------------------------------------

    def get(self, object_id: int) -> Descriptor:
        """The descriptor with this id; :class:`ObjectNotFoundError` when there is none."""
        for d in self.descriptors:
            if d.id == object_id:
                return d
        raise ObjectNotFoundError(
            f"no object with id {object_id} in {self.path}",
            hint=f"'sifpy sif list {self.path}' shows the objects",
        )

    def find(self, data_type: int | None = None, group_id: int | None = None) -> list[Descriptor]:
        return [
            d
            for d in self.descriptors
            if (data_type is None or d.data_type == data_type)
            and (group_id is None or d.group_id == group_id)
        ]

    def primary_partition(self) -> Descriptor:
        """The unique primary system partition (the container's root filesystem)."""
        prims = [d for d in self.descriptors if d.is_primary_partition()]
        if not prims:
            raise ObjectNotFoundError(
                f"{self.path} has no primary system partition",
                hint="a runnable image needs a squashfs marked primary ('sifpy sif setprim')",
            )
        if len(prims) > 1:
            raise self._fail(f"{len(prims)} primary partitions (at most one allowed)")
        return prims[0]

    def iter_data(self, d: Descriptor, chunk: int = CHUNK) -> Iterator[bytes]:
        """Yield an object's data in chunks, never holding more than ``chunk`` bytes."""
        pos, end = d.offset, d.offset + d.size
        while pos < end:
            data = self._pread(min(chunk, end - pos), pos)
            if not data:
                raise self._fail(f"object {d.id}: file shrank while reading")
            pos += len(data)
            yield data

    def read(self, d: Descriptor, limit: int = 64 << 20) -> bytes:
        """An object's data as bytes, for small objects (def file, JSON, signatures)."""
        if d.size > limit:
            raise ImageError(
                f"object {d.id} is {d.size} bytes, more than the {limit} bytes read in memory",
                hint="stream it with iter_data() or 'sifpy sif dump'",
            )
        return b"".join(self.iter_data(d))

    def copy_data(self, d: Descriptor, out: BinaryIO | int) -> None:
        """Copy an object's data to a file or file descriptor, kernel-side where possible."""
        if not isinstance(out, int):
            out.flush()
            out = out.fileno()
        pos, end = d.offset, d.offset + d.size
        try:
            while pos < end:
                # sendfile works to pipes, ttys and files alike (Linux >= 2.6.33).
                n = os.sendfile(out, self.fd, pos, min(end - pos, 1 << 30))
                if n == 0:
                    raise self._fail(f"object {d.id}: file shrank while reading")
                pos += n
        except OSError as exc:
            if exc.errno not in (22, 95):  # EINVAL/EOPNOTSUPP: fall back to read/write
                raise
            for chunk in self.iter_data(
                Descriptor(d.raw.replace(offset=pos, size=end - pos), d.slot)
            ):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(out, view) :]


def _open_hint(exc: OSError) -> str | None:
    if exc.errno == 13:
        return "check the file's permissions"
    if exc.errno == 2:
        return "check the path"
    if exc.errno == 21:
        return "give the path of a SIF file, not a directory"
    return None

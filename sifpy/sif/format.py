"""SIF (Singularity Image Format, spec version 01) declared as data: layouts and enums.

Names follow the reference implementation (sylabs/sif ``pkg/sif``: sif.go, descriptor.go,
arch.go). Everything is little-endian and packed, as Go's ``encoding/binary`` writes it.
Logic lives in :mod:`sifpy.sif.image`; this module only declares.

The layouts use :mod:`struct` rather than construct: ``sifpy exec`` reads the header and
descriptors on every start, and importing construct alone costs ~37 ms there. For the same
reason the reference's enums are classes of int constants (``DataType.PARTITION`` is the
int 0x4004), each with a table of the names the reference prints (``DATA_TYPE_NAMES``),
not :class:`enum.IntEnum` (~3.3 ms to import, ``python -X importtime -I -S``).
"""

from __future__ import annotations

import struct

from sifpy import TYPE_CHECKING
from sifpy.util.record import Record

if TYPE_CHECKING:
    from typing import ClassVar, Self


class Packed(Record):
    """A fixed-size packed record: its fields (``__slots__``) in the order of its
    :mod:`struct` format, given where the class is declared:
    ``class Header(Packed, fmt="<32s...")``."""

    __slots__ = ()
    STRUCT: ClassVar[struct.Struct]
    SIZE: ClassVar[int]

    def __init_subclass__(cls, fmt: str) -> None:
        super().__init_subclass__()
        cls.STRUCT = struct.Struct(fmt)
        cls.SIZE = cls.STRUCT.size
        if len(cls.__slots__) != len(cls.STRUCT.unpack(bytes(cls.SIZE))):
            raise AssertionError(f"{cls.__name__}: fields and format disagree")

    @classmethod
    def unpack(cls, data: bytes, offset: int = 0) -> Self:
        return cls(*cls.STRUCT.unpack_from(data, offset))

    def pack(self) -> bytes:
        return self.STRUCT.pack(*self)


# --- global header (sif.go: header), 128 bytes ---------------------------------------

HDR_LAUNCH_LEN = 32
HDR_MAGIC = b"SIF_MAGIC\x00"
HDR_VERSION = b"01\x00"  # CurrentVersion
# What Apptainer builds write; the SIF library itself (and `siftool new`) writes none.
DEFAULT_LAUNCH_SCRIPT = "#!/usr/bin/env run-singularity\n"
DEFAULT_DESCRIPTORS_OFFSET = 4096
DEFAULT_DESCRIPTOR_CAPACITY = 48
# Go's zero time.Time as Unix seconds: what deterministic images store (not 0).
ZERO_TIME = -62135596800


class Header(Packed, fmt="<32s10s3s3s16sqqqqqqqq"):
    __slots__ = (
        "launch_script",
        "magic",
        "version",
        "arch",
        "id",
        "created_at",
        "modified_at",
        "descriptors_free",
        "descriptors_total",
        "descriptors_offset",
        "descriptors_size",
        "data_offset",
        "data_size",
    )

    def __init__(
        self,
        launch_script: bytes,  # [32]byte, NUL padded
        magic: bytes,  # [10]byte "SIF_MAGIC\0"
        version: bytes,  # [3]byte "01\0"
        arch: bytes,  # [3]byte arch code "02\0"
        id: bytes,  # [16]byte UUID
        created_at: int,
        modified_at: int,
        descriptors_free: int,
        descriptors_total: int,
        descriptors_offset: int,
        descriptors_size: int,
        data_offset: int,
        data_size: int,
    ) -> None:
        self.launch_script = launch_script
        self.magic = magic
        self.version = version
        self.arch = arch
        self.id = id
        self.created_at = created_at
        self.modified_at = modified_at
        self.descriptors_free = descriptors_free
        self.descriptors_total = descriptors_total
        self.descriptors_offset = descriptors_offset
        self.descriptors_size = descriptors_size
        self.data_offset = data_offset
        self.data_size = data_size


# --- descriptor (descriptor.go: rawDescriptor), 585 bytes -------------------------------

DESCR_GROUP_MASK = 0xF0000000  # groups are stored as id | mask; links to groups too
DESCR_NAME_LEN = 128
DESCR_EXTRA_LEN = 384
DESCR_ENTITY_LEN = 256
DEFAULT_OBJECT_GROUP = 1


class RawDescriptor(Packed, fmt="<iBIIIqqqqqqq128s384s"):
    __slots__ = (
        "data_type",
        "used",
        "id",
        "group_id",
        "linked_id",
        "offset",
        "size",
        "size_with_padding",
        "created_at",
        "modified_at",
        "uid",
        "gid",
        "name",
        "extra",
    )

    def __init__(
        self,
        data_type: int,  # DataType, int32
        used: int,  # bool
        id: int,  # uint32
        group_id: int,  # uint32, id | DESCR_GROUP_MASK (mask alone = no group)
        linked_id: int,  # uint32: object id, or group id | DESCR_GROUP_MASK, 0 = none
        offset: int,
        size: int,
        size_with_padding: int,
        created_at: int,
        modified_at: int,
        uid: int,  # deprecated, 0
        gid: int,  # deprecated, 0
        name: bytes,  # [128]byte
        extra: bytes,  # [384]byte, type-specific (below)
    ) -> None:
        self.data_type = data_type
        self.used = used
        self.id = id
        self.group_id = group_id
        self.linked_id = linked_id
        self.offset = offset
        self.size = size
        self.size_with_padding = size_with_padding
        self.created_at = created_at
        self.modified_at = modified_at
        self.uid = uid
        self.gid = gid
        self.name = name
        self.extra = extra


EMPTY_DESCRIPTOR = RawDescriptor.unpack(bytes(RawDescriptor.SIZE))


class DataType:
    DEFFILE = 0x4001
    ENVVAR = 0x4002
    LABELS = 0x4003
    PARTITION = 0x4004
    SIGNATURE = 0x4005
    GENERIC_JSON = 0x4006
    GENERIC = 0x4007
    CRYPTO_MESSAGE = 0x4008
    SBOM = 0x4009
    OCI_ROOT_INDEX = 0x400A
    OCI_BLOB = 0x400B


# How the reference prints each type (DataType.String()).
DATA_TYPE_NAMES: dict[int, str] = {
    DataType.DEFFILE: "Def.FILE",
    DataType.ENVVAR: "Env.Vars",
    DataType.LABELS: "JSON.Labels",
    DataType.PARTITION: "FS",
    DataType.SIGNATURE: "Signature",
    DataType.GENERIC_JSON: "JSON.Generic",
    DataType.GENERIC: "Generic/Raw",
    DataType.CRYPTO_MESSAGE: "Cryptographic Message",
    DataType.SBOM: "SBOM",
    DataType.OCI_ROOT_INDEX: "OCI.RootIndex",
    DataType.OCI_BLOB: "OCI.Blob",
}


class FSType:
    SQUASH = 1
    EXT3 = 2
    IMMUOBJ = 3
    RAW = 4
    ENCRYPTED_SQUASHFS = 5
    GOCRYPTFS_SQUASHFS = 6


FS_TYPE_NAMES: dict[int, str] = {
    FSType.SQUASH: "Squashfs",
    FSType.EXT3: "Ext3",
    FSType.IMMUOBJ: "Archive",
    FSType.RAW: "Raw",
    FSType.ENCRYPTED_SQUASHFS: "Encrypted squashfs",
    FSType.GOCRYPTFS_SQUASHFS: "Gocryptfs squashfs",
}


class PartType:
    SYSTEM = 1
    PRIMSYS = 2
    DATA = 3
    OVERLAY = 4


PART_TYPE_NAMES: dict[int, str] = {
    PartType.SYSTEM: "System",
    PartType.PRIMSYS: "*System",
    PartType.DATA: "Data",
    PartType.OVERLAY: "Overlay",
}


class HashType:
    SHA256 = 1
    SHA384 = 2
    SHA512 = 3
    BLAKE2S_256 = 4
    BLAKE2B_256 = 5


HASH_TYPE_NAMES: dict[int, str] = {
    HashType.SHA256: "SHA-256",
    HashType.SHA384: "SHA-384",
    HashType.SHA512: "SHA-512",
    HashType.BLAKE2S_256: "BLAKE2s-256",
    HashType.BLAKE2B_256: "BLAKE2b-256",
}


class FormatType:
    OPENPGP = 1
    PEM = 2


FORMAT_TYPE_NAMES: dict[int, str] = {FormatType.OPENPGP: "OpenPGP", FormatType.PEM: "PEM"}


class MessageType:
    CLEAR_SIGNATURE = 0x100
    RSA_OAEP = 0x200


MESSAGE_TYPE_NAMES: dict[int, str] = {
    MessageType.CLEAR_SIGNATURE: "Clear Signature",
    MessageType.RSA_OAEP: "RSA-OAEP",
}


class SBOMFormat:
    CYCLONEDX_JSON = 1
    CYCLONEDX_XML = 2
    GITHUB_JSON = 3
    SPDX_JSON = 4
    SPDX_RDF = 5
    SPDX_TAG_VALUE = 6
    SPDX_YAML = 7
    SYFT_JSON = 8


SBOM_FORMAT_NAMES: dict[int, str] = {
    SBOMFormat.CYCLONEDX_JSON: "cyclonedx-json",
    SBOMFormat.CYCLONEDX_XML: "cyclonedx-xml",
    SBOMFormat.GITHUB_JSON: "github-json",
    SBOMFormat.SPDX_JSON: "spdx-json",
    SBOMFormat.SPDX_RDF: "spdx-rdf",
    SBOMFormat.SPDX_TAG_VALUE: "spdx-tag-value",
    SBOMFormat.SPDX_YAML: "spdx-yaml",
    SBOMFormat.SYFT_JSON: "syft-json",
}

# --- architectures (arch.go): header/partition code <-> Go arch name ----------------------

ARCH_UNKNOWN = b"00\x00"
ARCH_CODES: dict[str, bytes] = {
    name: f"{n:02d}".encode() + b"\x00"
    for n, name in enumerate(
        [
            "386", "amd64", "arm", "arm64", "ppc64", "ppc64le", "mips", "mipsle",
            "mips64", "mips64le", "s390x", "riscv64", "loong64",
        ],
        start=1,
    )
}  # fmt: skip
ARCH_NAMES: dict[bytes, str] = {code: name for name, code in ARCH_CODES.items()}
# What Python's platform.machine() calls each Go architecture.
MACHINE_TO_ARCH = {
    "x86_64": "amd64",
    "i686": "386",
    "i386": "386",
    "aarch64": "arm64",
    "armv7l": "arm",
    "ppc64le": "ppc64le",
    "ppc64": "ppc64",
    "s390x": "s390x",
    "riscv64": "riscv64",
    "loongarch64": "loong64",
    "mips64": "mips64",
}

# --- descriptor extras (descriptor.go: partition, signature, cryptoMessage, sbom) ---------


class PartitionExtra(Packed, fmt="<ii3s"):
    __slots__ = ("fstype", "parttype", "arch")

    def __init__(
        self,
        fstype: int,
        parttype: int,
        arch: bytes,  # [3]byte arch code
    ) -> None:
        self.fstype = fstype
        self.parttype = parttype
        self.arch = arch


class SignatureExtra(Packed, fmt="<i256s"):
    __slots__ = ("hashtype", "entity")

    def __init__(
        self,
        hashtype: int,
        entity: bytes,  # [256]byte; first 20 bytes = PGP v4 fingerprint, zeros for DSSE
    ) -> None:
        self.hashtype = hashtype
        self.entity = entity


class CryptoMessageExtra(Packed, fmt="<ii"):
    __slots__ = ("formattype", "messagetype")

    def __init__(
        self,
        formattype: int,
        messagetype: int,
    ) -> None:
        self.formattype = formattype
        self.messagetype = messagetype


class SBOMExtra(Packed, fmt="<i"):
    __slots__ = ("format",)

    def __init__(
        self,
        format: int,
    ) -> None:
        self.format = format


# OCI.RootIndex / OCI.Blob extras hold the digest text "sha256:<hex>", NUL terminated.

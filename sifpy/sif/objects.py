"""What a SIF writer is given: one data object (its bytes, a file or a stream) and its
descriptor fields, with a constructor per kind of object."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import BinaryIO

from sifpy.errors import UsageError
from sifpy.sif import format as F

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

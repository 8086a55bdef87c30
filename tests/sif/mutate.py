"""Byte-level SIF mutators for bad-input tests: each returns a broken copy of an image."""

from __future__ import annotations

import struct

from sifpy.sif import format as F

# Offsets of header fields and descriptor fields (sylabs/sif pkg/sif/sif.go).
H_FREE, H_TOTAL, H_DOFF, H_DSIZE, H_DATAOFF, H_DATASIZE = 80, 88, 96, 104, 112, 120
D_ID, D_OFFSET, D_SIZE = 5, 17, 25
# A partition's type codes, in the descriptor's extra field (201): fstype, then parttype.
D_FSTYPE, D_PARTTYPE = 201, 205


def set_q(data: bytes, off: int, value: int) -> bytes:
    b = bytearray(data)
    struct.pack_into("<q", b, off, value)
    return bytes(b)


def set_u32(data: bytes, off: int, value: int) -> bytes:
    b = bytearray(data)
    struct.pack_into("<I", b, off, value)
    return bytes(b)


def descr_off(slot: int, field: int) -> int:
    return F.DEFAULT_DESCRIPTORS_OFFSET + slot * F.RawDescriptor.SIZE + field

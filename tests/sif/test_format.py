"""Round trips of every layout in sifpy.sif.format: parse(build(x)) == x, build(parse(b)) == b."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from sifpy.sif import format as F

LAYOUTS = {
    "header": (F.Header, 128),
    "descriptor": (F.RawDescriptor, 585),
    "partition": (F.PartitionExtra, 11),
    "signature": (F.SignatureExtra, 260),
    "crypto_message": (F.CryptoMessageExtra, 8),
    "sbom": (F.SBOMExtra, 4),
}


def test_fixed_sizes() -> None:
    for name, (layout, size) in LAYOUTS.items():
        assert size == layout.SIZE, name
    # The extras must fit the descriptor's 384-byte Extra field.
    for layout, _ in LAYOUTS.values():
        if layout is not F.Header and layout is not F.RawDescriptor:
            assert layout.SIZE <= F.DESCR_EXTRA_LEN


def _field_strategy(code: str) -> st.SearchStrategy[object]:
    if code.endswith("s"):
        return st.binary(min_size=int(code[:-1]), max_size=int(code[:-1]))
    bits = struct.calcsize(code) * 8
    if code.islower():
        return st.integers(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return st.integers(0, 2**bits - 1)


def _codes(layout: type[F.Packed]) -> list[str]:
    import re

    return re.findall(r"\d*[a-zA-Z]", layout.STRUCT.format.lstrip("<"))


@given(st.data())
def test_build_then_parse(data: st.DataObject) -> None:
    for layout, _ in LAYOUTS.values():
        values = [data.draw(_field_strategy(c)) for c in _codes(layout)]
        record = layout(*values)
        packed = record.pack()
        assert len(packed) == layout.SIZE
        assert layout.unpack(packed) == record


@given(st.data())
def test_parse_then_build(data: st.DataObject) -> None:
    for layout, _ in LAYOUTS.values():
        raw = data.draw(st.binary(min_size=layout.SIZE, max_size=layout.SIZE))
        assert layout.unpack(raw).pack() == raw


def test_known_header_bytes() -> None:
    """Field offsets as in the reference (sylabs/sif pkg/sif/sif.go): magic at 32, version at 42."""
    h = F.Header(b"#!x", F.HDR_MAGIC, F.HDR_VERSION, F.ARCH_CODES["amd64"], bytes(16),
                 1, 2, 3, 4, 5, 6, 7, 8)  # fmt: skip
    raw = h.pack()
    assert raw[32:42] == b"SIF_MAGIC\x00"
    assert raw[42:45] == b"01\x00"
    assert raw[45:48] == b"02\x00"
    assert struct.unpack_from("<8q", raw, 64) == (1, 2, 3, 4, 5, 6, 7, 8)


def test_arch_codes_follow_reference() -> None:
    assert F.ARCH_CODES["386"] == b"01\x00"
    assert F.ARCH_CODES["riscv64"] == b"12\x00"
    assert F.ARCH_CODES["loong64"] == b"13\x00"
    assert F.DataType.OCI_BLOB == 0x400B

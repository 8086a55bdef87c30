"""Deterministic SIF images built by sifpy, compared byte for byte with golden files.

Two sets: ``REFERENCE_CASES`` rebuild the reference implementation's own golden files
(sylabs/sif ``pkg/sif/testdata``, shipped by Debian's golang-github-sylabs-sif-dev);
``OWN_CASES`` are sifpy's, committed under ``tests/sif/golden/`` and rewritten only by
``make golden`` (``python -m tests.sif.golden --write``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from sifpy.sif import ObjectInput, add_object, create, delete_object, set_primary
from sifpy.sif import format as F

GOLDEN_DIR = Path(__file__).parent / "golden"
T = 946702800  # 2000-01-01 05:00:00 UTC, the reference tests' fixed time
FA, FE = b"\xfa\xce", b"\xfe\xed"
SQ, RAW, EXT3 = F.FSType.SQUASH, F.FSType.RAW, F.FSType.EXT3
PRIM, SYS, DATA = F.PartType.PRIMSYS, F.PartType.SYSTEM, F.PartType.DATA
Case = Callable[[Path], None]


def gen(data: bytes, **kw: object) -> ObjectInput:
    return ObjectInput(F.DataType.GENERIC, data, **kw)  # type: ignore[arg-type]


def part(data: bytes, fs: int, pt: int, arch: str, **kw: object) -> ObjectInput:
    return ObjectInput.partition(data, fs, pt, arch, **kw)


def steps(*fns: Case) -> Case:
    def run(p: Path) -> None:
        for fn in fns:
            fn(p)

    return run


def new(*objs: ObjectInput, **kw: object) -> Case:
    return lambda p: create(p, list(objs), deterministic=True, **kw)  # type: ignore[arg-type]


REFERENCE_CASES: dict[str, Case] = {
    "TestCreateContainer/Empty": new(),
    "TestCreateContainer/EmptyLaunchScript": new(launch_script="#!/usr/bin/env launch-script\n"),
    "TestCreateContainer/EmptyWithID": new(
        image_id=bytes.fromhex("de170c4336ab44a8bca91ea1a070a274")
    ),
    "TestCreateContainer/EmptyWithTime": new(t=T),
    "TestCreateContainer/EmptyDescriptorLimitedCapacity": new(capacity=1),
    "TestCreateContainer/OneDescriptor": new(gen(FA)),
    "TestCreateContainer/TwoDescriptors": new(gen(FA), part(FE, SQ, PRIM, "386")),
    "TestCreateContainer/TwoDescriptorsNotAligned": new(
        gen(FA, alignment=0), part(FE, SQ, PRIM, "386", alignment=0)
    ),
    "TestCreateContainer/TwoDescriptorsAligned": new(
        gen(FA, alignment=4), part(FE, SQ, PRIM, "386", alignment=4)
    ),
    "TestAddObject/WithTime": steps(new(), lambda p: add_object(p, gen(FA), t=T)),
    "TestAddObject/Empty": steps(new(), lambda p: add_object(p, gen(FA), deterministic=True)),
    "TestAddObject/EmptyNotAligned": steps(
        new(), lambda p: add_object(p, gen(FA, alignment=0), deterministic=True)
    ),
    "TestAddObject/EmptyAligned": steps(
        new(), lambda p: add_object(p, gen(FA, alignment=128), deterministic=True)
    ),
    "TestAddObject/NotEmpty": steps(
        new(gen(FA)), lambda p: add_object(p, part(FE, SQ, PRIM, "386"), deterministic=True)
    ),
    "TestAddObject/NotEmptyNotAligned": steps(
        new(gen(FA)),
        lambda p: add_object(p, part(FE, SQ, PRIM, "386", alignment=0), deterministic=True),
    ),
    "TestAddObject/NotEmptyAligned": steps(
        new(gen(FA)),
        lambda p: add_object(p, part(FE, SQ, PRIM, "386", alignment=128), deterministic=True),
    ),
    "TestDeleteObject/Zero": steps(
        new(gen(FA)), lambda p: delete_object(p, 1, zero=True, deterministic=True)
    ),
    "TestDeleteObject/Compact": steps(
        new(gen(FA)), lambda p: delete_object(p, 1, compact=True, deterministic=True)
    ),
    "TestDeleteObject/ZeroCompact": steps(
        new(gen(FA)), lambda p: delete_object(p, 1, zero=True, compact=True, deterministic=True)
    ),
    "TestDeleteObject/WithTime": steps(new(gen(FA)), lambda p: delete_object(p, 1, t=T)),
    "TestDeleteObject/PrimaryPartition": steps(
        new(part(FA, SQ, PRIM, "386")), lambda p: delete_object(p, 1, deterministic=True)
    ),
    # setprim: see SETPRIM_ARCH_FIX below for the one field where sifpy departs on purpose.
    "TestSetPrimPart/WithTime": steps(
        new(part(FA, RAW, SYS, "386")), lambda p: set_primary(p, 1, t=T)
    ),
    "TestSetPrimPart/One": steps(
        new(part(FA, RAW, SYS, "386")), lambda p: set_primary(p, 1, deterministic=True)
    ),
    "TestSetPrimPart/Two": steps(
        new(part(FA, RAW, PRIM, "386"), part(FE, RAW, SYS, "amd64")),
        lambda p: set_primary(p, 2, deterministic=True),
    ),
}

# The reference's SetPrimPart copies the architecture's *name* ("386", "amd") into the
# partition's 3-byte arch code field, so siftool then shows the new primary partition's
# arch as "unknown". sifpy writes the proper code. Offset of that field per case:
# descriptor table 4096 + 585 * slot + 201 (Extra) + 8 (fstype, parttype).
SETPRIM_ARCH_FIX = {
    "TestSetPrimPart/WithTime": (4096 + 209, b"386", b"01\x00"),
    "TestSetPrimPart/One": (4096 + 209, b"386", b"01\x00"),
    "TestSetPrimPart/Two": (4096 + 585 + 209, b"amd", b"02\x00"),
}

BIG = bytes(range(256)) * 20  # 5 KiB, crosses an alignment boundary

OWN_CASES: dict[str, Case] = {
    # One object of every data type, in two groups, with links of both kinds and names.
    "all-types.sif": new(
        ObjectInput(F.DataType.DEFFILE, b"Bootstrap: scratch\n", name="def"),
        ObjectInput(F.DataType.ENVVAR, b"A=1\n"),
        ObjectInput(F.DataType.LABELS, b'{"a":"b"}'),
        part(BIG, SQ, PRIM, "amd64"),
        part(FA, EXT3, DATA, "arm64", group_id=2),
        ObjectInput.signature(
            b"sig", F.HashType.SHA256, bytes(range(20)), group_id=0, linked_id=1, link_to_group=True
        ),
        ObjectInput(F.DataType.GENERIC_JSON, b"{}", name="inspect-metadata.json"),
        gen(FE, linked_id=4),
        ObjectInput.crypto_message(b"msg", F.FormatType.PEM, F.MessageType.RSA_OAEP, linked_id=4),
        ObjectInput.sbom(b"{}", F.SBOMFormat.SPDX_JSON, group_id=2),
        ObjectInput.oci(b"{}", "sha256:" + "ab" * 32, root_index=True, group_id=3),
        ObjectInput.oci(FA, "sha256:" + "cd" * 32, group_id=3),
        launch_script=F.DEFAULT_LAUNCH_SCRIPT,
    ),
    # Deleting in the middle, then adding: the free slot is reused, data goes at the end.
    "delete-then-add.sif": steps(
        new(gen(FA), part(BIG, SQ, PRIM, "amd64"), gen(FE, group_id=2)),
        lambda p: delete_object(p, 2, zero=True, deterministic=True),
        lambda p: add_object(p, part(FA, SQ, SYS, "386"), deterministic=True),
    ),
    # A new primary partition: the old one becomes System, the header arch follows.
    "setprim.sif": steps(
        new(part(BIG, SQ, PRIM, "amd64"), part(FA, SQ, SYS, "arm64", group_id=2)),
        lambda p: set_primary(p, 2, deterministic=True),
    ),
    "compact-last.sif": steps(
        new(gen(FA), gen(BIG)),
        lambda p: delete_object(p, 2, compact=True, deterministic=True),
    ),
}


def build(case: Case, path: Path) -> bytes:
    case(path)
    return path.read_bytes()


def write_all() -> None:
    import tempfile

    GOLDEN_DIR.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, case in OWN_CASES.items():
            data = build(case, Path(tmp) / name)
            (GOLDEN_DIR / name).write_bytes(data)
            print(f"wrote {GOLDEN_DIR / name} ({len(data)} bytes)")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python -m tests.sif.golden --write")
    write_all()

"""sifpy and the reference siftool agree, in both directions.

- every reference test image: ``sifpy sif list/header/info/dump`` == ``siftool ...``;
- images written by sifpy are read by siftool with exactly what sifpy says;
- images changed by ``siftool add/del/setprim`` are read back by sifpy the same way.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sifpy.sif import ObjectInput, SifImage, add_object, create, delete_object, set_primary
from sifpy.sif import format as F
from tests.conftest import need_tool, reference_images

IMAGES = reference_images()


def run(argv: list[str]) -> bytes:
    return subprocess.run(argv, check=True, capture_output=True).stdout


def sifpy(*args: str) -> bytes:
    return run([sys.executable, "-m", "sifpy", "sif", *args])


def siftool(*args: str) -> bytes:
    return run([need_tool("siftool"), *args])


def object_ids(path: Path) -> list[int]:
    with SifImage.open(path) as img:
        return [d.id for d in img.descriptors]


def assert_agree(path: Path) -> None:
    for cmd in ("header", "list"):
        assert sifpy(cmd, str(path)).decode() == siftool(cmd, str(path)).decode(), cmd
    for i in object_ids(path):
        assert (
            sifpy("info", str(i), str(path)).decode() == siftool("info", str(i), str(path)).decode()
        )
        assert sifpy("dump", str(i), str(path)) == siftool("dump", str(i), str(path))


def test_reference_images_installed() -> None:
    need_tool("siftool")
    assert len(IMAGES) == 17, [p.name for p in IMAGES]


@pytest.mark.parametrize("image", IMAGES, ids=[p.name for p in IMAGES])
def test_reference_image_agrees(image: Path) -> None:
    need_tool("siftool")
    assert_agree(image)


BIG = bytes(range(256)) * 64  # 16 KiB


def test_sifpy_written_images_read_by_siftool(tmp_path: Path) -> None:
    need_tool("siftool")
    p = tmp_path / "a.sif"
    objs = [
        ObjectInput(F.DataType.DEFFILE, b"Bootstrap: scratch\n"),
        ObjectInput(F.DataType.ENVVAR, b"A=1\n", name="env"),
        ObjectInput(F.DataType.LABELS, b'{"a":"b"}'),
        ObjectInput.partition(BIG, F.FSType.SQUASH, F.PartType.PRIMSYS, "amd64"),
        ObjectInput.partition(b"x" * 100, F.FSType.EXT3, F.PartType.SYSTEM, "arm64", group_id=2),
        ObjectInput.partition(b"y", F.FSType.RAW, F.PartType.OVERLAY, "riscv64", group_id=2),
        ObjectInput.signature(
            b"sig",
            F.HashType.SHA384,
            bytes(range(1, 21)),
            group_id=0,
            linked_id=2,
            link_to_group=True,
        ),
        ObjectInput(F.DataType.GENERIC_JSON, b"{}", name="inspect-metadata.json"),
        ObjectInput(F.DataType.GENERIC, b"raw", linked_id=4, alignment=512),
        ObjectInput.crypto_message(b"m", F.FormatType.OPENPGP, F.MessageType.CLEAR_SIGNATURE),
        ObjectInput.sbom(b"{}", F.SBOMFormat.SYFT_JSON, group_id=7),
    ]
    create(p, objs, launch_script=F.DEFAULT_LAUNCH_SCRIPT)
    assert_agree(p)
    # Data comes back exactly as written, through the reference tool.
    for i, obj in enumerate(objs, start=1):
        assert siftool("dump", str(i), str(p)) == obj.data
    # Then modify with sifpy and check again after each step.
    delete_object(p, 3)
    assert_agree(p)
    add_object(p, ObjectInput(F.DataType.GENERIC, b"reuses slot 3", group_id=3))
    assert_agree(p)
    set_primary(p, 5)  # the Ext3 System partition becomes primary; the squashfs becomes System
    assert_agree(p)
    header = siftool("header", str(p)).decode()
    assert "Primary Architecture: arm64" in header
    assert "FS (Ext3/*System/arm64)" in siftool("list", str(p)).decode()
    delete_object(p, 11, zero=True)
    assert_agree(p)


def test_siftool_modified_images_read_by_sifpy(tmp_path: Path) -> None:
    need_tool("siftool")
    p, data = tmp_path / "b.sif", tmp_path / "data"
    siftool("new", str(p))
    assert_agree(p)
    steps = [
        ["--datatype", "1"],
        ["--datatype", "4", "--partfs", "1", "--parttype", "2", "--partarch", "2", "--groupid", "1"],
        ["--datatype", "4", "--partfs", "2", "--parttype", "1", "--partarch", "4", "--groupid", "2"],
        ["--datatype", "5", "--signhash", "2", "--signentity", "12045C8C0B1004D058DE4BEDA20C27EE7FF7BA84",
         "--link", "1"],
        ["--datatype", "6", "--filename", "inspect-metadata.json", "--groupid", "1"],
        ["--datatype", "7", "--alignment", "64", "--groupid", "3"],
        ["--datatype", "8", "--groupid", "1"],
        ["--datatype", "9", "--sbomformat", "spdx-yaml", "--groupid", "1"],
    ]  # fmt: skip
    for n, flags in enumerate(steps):
        data.write_bytes(bytes([n]) * (1000 + n))
        siftool("add", *flags, str(p), str(data))
        assert_agree(p)
    siftool("del", "3", str(p))
    assert_agree(p)
    siftool("del", "2", str(p))
    assert_agree(p)
    with SifImage.open(p) as img:
        assert img.primary_arch == "unknown"  # deleting the primary partition clears it
    data.write_bytes(b"Z" * 10)
    before = set(object_ids(p))
    siftool("add", "--datatype", "4", "--partfs", "1", "--parttype", "1", "--partarch", "2",
            str(p), str(data))  # fmt: skip
    (new_id,) = set(object_ids(p)) - before
    assert new_id == 2  # the reference reuses the first free slot
    siftool("setprim", str(new_id), str(p))
    assert_agree(p)


def test_oci_objects(tmp_path: Path) -> None:
    """OCI.RootIndex / OCI.Blob (newer SIF types; Debian's siftool shows them as Unknown)."""
    need_tool("siftool")
    p = tmp_path / "oci.sif"
    digest = "sha256:" + "ab" * 32
    create(p, [ObjectInput.oci(b"{}", digest, root_index=True), ObjectInput.oci(b"b", digest)])
    listing = sifpy("list", str(p)).decode()
    assert "|OCI.RootIndex" in listing and "|OCI.Blob" in listing
    assert "Digest:" in sifpy("info", "2", str(p)).decode()
    assert digest in sifpy("info", "2", str(p)).decode()
    # siftool agrees on everything else: positions, groups, data.
    theirs = siftool("list", str(p)).decode().replace("|Unknown", "")
    ours = listing.replace("|OCI.RootIndex", "").replace("|OCI.Blob", "")
    assert ours == theirs
    assert siftool("dump", "2", str(p)) == b"b"

"""OCI-SIF layout: what sifpy writes it reads back (blobs in order, the root index last,
digests in the extras), the same input gives the same bytes, and a damaged or
unrunnable layout is refused by name."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from sifpy.errors import ImageError
from sifpy.sif import format as F
from sifpy.sif import ocisif
from sifpy.sif.image import SifImage


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _image(layers: list[tuple[str, bytes]]) -> tuple[list[ocisif.Blob], bytes]:
    config = json.dumps({"config": {"Env": ["A=1"]}}).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": ocisif.OCI_MANIFEST,
            "config": {"digest": _digest(config), "size": len(config)},
            "layers": [{"mediaType": m, "digest": _digest(d), "size": len(d)} for m, d in layers],
        }
    ).encode()
    index = json.dumps(
        {"manifests": [{"mediaType": ocisif.OCI_MANIFEST, "digest": _digest(manifest)}]}
    ).encode()
    blobs = [ocisif.Blob(_digest(d), d) for _, d in layers]
    blobs += [ocisif.Blob(_digest(config), config), ocisif.Blob(_digest(manifest), manifest)]
    return blobs, index


def test_write_then_read(tmp_path: Path) -> None:
    layer = b"hsqs" + bytes(1000)
    blobs, index = _image([(ocisif.SQUASHFS_LAYER, layer)])
    out = tmp_path / "a.sif"
    ocisif.write(out, blobs, index)
    with SifImage.open(out) as img:
        types = [d.data_type for d in img.descriptors]
        assert types == [F.DataType.OCI_BLOB] * 3 + [F.DataType.OCI_ROOT_INDEX]
        assert [d.oci_digest() for d in img.descriptors[:3]] == [b.digest for b in blobs]
        assert len(img.slots) == 4 + ocisif.SPARE_DESCRIPTORS
        assert ocisif.is_ocisif(img)
        part = ocisif.rootfs(img)
        assert img.read(part) == layer
        assert ocisif.read_image(img).config["config"]["Env"] == ["A=1"]
    again = tmp_path / "b.sif"
    ocisif.write(again, blobs, index)
    assert again.read_bytes() == out.read_bytes()


def test_two_layers_refused(tmp_path: Path) -> None:
    blobs, index = _image([(ocisif.SQUASHFS_LAYER, b"one"), (ocisif.SQUASHFS_LAYER, b"two")])
    ocisif.write(tmp_path / "a.sif", blobs, index)
    with SifImage.open(tmp_path / "a.sif") as img, pytest.raises(ImageError, match="2 layers"):
        ocisif.rootfs(img)


def test_wrong_digest_refused(tmp_path: Path) -> None:
    blobs, index = _image([(ocisif.SQUASHFS_LAYER, b"layer")])
    config = blobs[1]
    blobs[1] = ocisif.Blob(config.digest, b'{"config":{"Env":["A=2"]}}')  # changed bytes
    ocisif.write(tmp_path / "a.sif", blobs, index)
    with SifImage.open(tmp_path / "a.sif") as img, pytest.raises(ImageError, match="digest"):
        ocisif.read_image(img)

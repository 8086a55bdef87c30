"""Integrity metadata: reproduces the reference's JSON and digests; refuses weak digests."""

from __future__ import annotations

import json

import pytest

from sifpy.sif import SifImage
from sifpy.sign import digest as D
from sifpy.sign.pgp import parse_clearsigned
from tests.conftest import reference_dir, require


def test_integrity_byte_lengths() -> None:
    images = reference_dir() / "test" / "images"
    with SifImage.open(images / "one-group.sif") as img:
        assert len(D.header_integrity_bytes(img)) == 61
        assert len(D.descriptor_integrity_bytes(img.descriptors[0], 0)) == 557


@pytest.mark.parametrize("name", ["one-group-signed.sif", "two-groups-signed.sif"])
def test_metadata_json_matches_reference(name: str) -> None:
    """Our metadata for the unsigned twin is byte-identical to what the reference signed."""
    images = reference_dir() / "test" / "images"
    unsigned = name.replace("-signed", "")
    with SifImage.open(images / name) as ref, SifImage.open(images / unsigned) as img:
        sigs = [d for d in ref.descriptors if d.type_name == "Signature"]
        require(None if sigs else "reference image has no signature")
        for sig in sigs:
            signed_text = parse_clearsigned(ref.read(sig)).text
            group = sig.linked_id
            objs = [d for d in img.descriptors if d.group_id == group]
            ours = D.image_metadata(img, group, objs).to_json()
            assert ours == signed_text
            assert D.ImageMetadata.from_json(signed_text).to_json() == signed_text


def _doc(alg: str = "sha256", n: int = 32) -> bytes:
    dig = f"{alg}:{'ab' * n}"
    return json.dumps(
        {"version": 1, "header": {"digest": dig},
         "objects": [{"relativeId": 0, "descriptorDigest": dig, "objectDigest": dig}]}
    ).encode()  # fmt: skip


@pytest.mark.parametrize(
    ("alg", "n"),
    [
        ("sha224", 28),
        ("sha256", 32),
        ("sha384", 48),
        ("sha512", 64),
        ("sha512_224", 28),
        ("sha512_256", 32),
    ],
)
def test_allowed_digests(alg: str, n: int) -> None:
    assert D.ImageMetadata.from_json(_doc(alg, n)).header.alg == alg


@pytest.mark.parametrize(("alg", "n"), [("sha1", 20), ("md5", 16), ("md4", 16), ("blake2b", 32)])
def test_refused_digests(alg: str, n: int) -> None:
    with pytest.raises(D.MetadataError, match=f"digest algorithm '{alg}' is not allowed"):
        D.ImageMetadata.from_json(_doc(alg, n))


@pytest.mark.parametrize(
    "doc",
    [
        _doc("sha256", 31),
        _doc().replace(b'"version": 1', b'"version": 2'),
        _doc().replace(b'"version": 1', b'"version": true'),
        b"[]",
        b"not json",
        _doc().replace(b"sha256:", b"sha256::"),
        _doc().replace(b'"relativeId": 0', b'"relativeId": -1'),
    ],
)
def test_malformed_metadata(doc: bytes) -> None:
    with pytest.raises(D.MetadataError):
        D.ImageMetadata.from_json(doc)

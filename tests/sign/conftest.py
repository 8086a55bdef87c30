"""Fixtures for signing tests: small signed images and byte-level mutators."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from sifpy.sif import ObjectInput, SifImage, create
from sifpy.sif import format as F
from sifpy.sign.sign import DsseSigner, sign_image
from sifpy.sign.verify import TrustedKeys

PART = bytes(range(256)) * 40  # not a real squashfs: the signer does not care


def make_image(path: Path, image_id: bytes | None = None) -> Path:
    """Group 1: a JSON object and the primary partition; group 2: a data partition."""
    create(
        path,
        [
            ObjectInput(F.DataType.GENERIC_JSON, b'{"a":1}', name="inspect-metadata.json"),
            ObjectInput.partition(PART, F.FSType.SQUASH, F.PartType.PRIMSYS, "amd64"),
            ObjectInput.partition(
                b"data" * 100, F.FSType.RAW, F.PartType.DATA, "amd64", group_id=2
            ),
        ],
        launch_script="#!/usr/bin/env run-singularity\n",
        image_id=image_id,
    )
    return path


@pytest.fixture
def dsse_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture
def trusted(dsse_key: ed25519.Ed25519PrivateKey) -> TrustedKeys:
    return TrustedKeys(dsse=(dsse_key.public_key(),))


@pytest.fixture
def signed(tmp_path: Path, dsse_key: ed25519.Ed25519PrivateKey) -> Path:
    """A two-group image signed (DSSE, Ed25519) in both groups."""
    p = make_image(tmp_path / "signed.sif")
    sign_image(p, DsseSigner([dsse_key]))
    return p


def slot_of(path: Path, object_id: int) -> int:
    with SifImage.open(path) as img:
        return img.get(object_id).slot


def rewrite_descriptor(path: Path, object_id: int, **fields: object) -> None:
    """Change fields of one descriptor in place (a tampering attacker's edit)."""
    with SifImage.open(path) as img:
        d = img.get(object_id)
        off = img.header.descriptors_offset + d.slot * F.RawDescriptor.SIZE
        raw = d.raw.replace(**fields)
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(raw.pack())


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def copy(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)
    return dst


Mutator = Callable[[Path], None]

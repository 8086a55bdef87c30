"""Tampering, one mutation per test: each is detected with a specific message.

Images are DSSE-signed here (fast, no gpg); the checks after the signature are the same
for OpenPGP (integration/sign covers PGP-specific ones).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from sifpy.errors import SignatureError
from sifpy.sif import ObjectInput, SifImage, add_object, delete_object
from sifpy.sif import format as F
from sifpy.sign import digest as D
from sifpy.sign import dsse
from sifpy.sign.sign import DsseSigner, sign_image
from sifpy.sign.verify import TrustedKeys, verify_fd, verify_image
from tests.sign.conftest import make_image, patch, rewrite_descriptor


def failures(path: Path, keys: TrustedKeys, **kw: object) -> list[str]:
    with SifImage.open(path) as img:
        res = verify_image(img, keys, **kw)  # type: ignore[arg-type]
    assert not res.ok
    return res.failures()


def assert_fails(path: Path, keys: TrustedKeys, expected: str) -> None:
    msgs = failures(path, keys)
    assert any(expected in m for m in msgs), msgs
    assert_exec_refuses(path, keys)


def assert_exec_refuses(path: Path, keys: TrustedKeys) -> None:
    """``sifpy exec --verify-key`` opens the image through the same code: it must refuse
    before anything is mounted (exit status 125)."""
    from cryptography.hazmat.primitives import serialization

    from sifpy.cli.exec_image import open_image

    pem = path.with_suffix(".pub.pem")
    pem.write_bytes(
        keys.dsse[0].public_bytes(  # type: ignore[union-attr]
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    with pytest.raises(SignatureError, match="refusing to run"):
        open_image(str(path), verify=True, verify_keys=[str(pem)])


def test_untouched_image_verifies(signed: Path, trusted: TrustedKeys) -> None:
    with SifImage.open(signed) as img:
        res = verify_image(img, trusted)
        assert res.ok and res.covers(img.primary_partition())


def test_partition_data_byte(signed: Path, trusted: TrustedKeys) -> None:
    with SifImage.open(signed) as img:
        off = img.get(2).offset + 1000
    patch(signed, off, b"\xff")
    assert_fails(signed, trusted, "object 2: data integrity compromised")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("name", b"evil.json"),
        (
            "extra",
            F.PartitionExtra(F.FSType.EXT3, F.PartType.PRIMSYS, b"02\0").pack(),
        ),
        ("linked_id", 3),
        ("data_type", F.DataType.GENERIC),
        ("created_at", 12345),
    ],
)
def test_descriptor_field(signed: Path, trusted: TrustedKeys, field: str, value: object) -> None:
    oid = 1 if field in ("name", "data_type") else 2
    rewrite_descriptor(signed, oid, **{field: value})
    assert_fails(signed, trusted, f"object {oid}: descriptor integrity compromised")


def test_descriptor_size(signed: Path, trusted: TrustedKeys) -> None:
    with SifImage.open(signed) as img:
        size = img.get(2).size
    rewrite_descriptor(signed, 2, size=size - 1)
    assert_fails(signed, trusted, "object 2: descriptor integrity compromised")


def test_descriptor_group(signed: Path, trusted: TrustedKeys) -> None:
    rewrite_descriptor(signed, 2, group_id=2 | F.DESCR_GROUP_MASK)
    msgs = failures(signed, trusted)
    assert any("object 2: signed object not found" in m for m in msgs), msgs


def test_offset_moved_to_identical_copy_still_verifies(signed: Path, trusted: TrustedKeys) -> None:
    """Offsets are not signed (by design); covers() pins the verified offset for mounting."""
    with SifImage.open(signed) as img:
        before = verify_image(img, trusted)
        old = img.get(2)
        assert before.covers(old)
        moved = type(old)(old.raw.replace(offset=old.offset + 1), old.slot)
        assert not before.covers(moved)


def test_header_launch_script(signed: Path, trusted: TrustedKeys) -> None:
    patch(signed, 0, b"#!/bin/evil\n".ljust(32, b"\0"))
    assert_fails(signed, trusted, "header integrity compromised")


def test_header_uuid(signed: Path, trusted: TrustedKeys) -> None:
    patch(signed, 48, os.urandom(16))
    assert_fails(signed, trusted, "header integrity compromised")


def test_added_unsigned_object(signed: Path, trusted: TrustedKeys) -> None:
    new = add_object(signed, ObjectInput(F.DataType.GENERIC, b"payload", group_id=1))
    assert_fails(signed, trusted, f"object {new}: object not signed")


def test_added_unsigned_group(signed: Path, trusted: TrustedKeys) -> None:
    add_object(signed, ObjectInput(F.DataType.GENERIC, b"payload", group_id=3))
    assert_fails(signed, trusted, "signature not found for object group 3")


def test_added_ungrouped_object(signed: Path, trusted: TrustedKeys) -> None:
    new = add_object(signed, ObjectInput(F.DataType.GENERIC, b"payload", group_id=0))
    assert_fails(signed, trusted, f"object {new}: not in an object group")


def test_removed_object(signed: Path, trusted: TrustedKeys) -> None:
    delete_object(signed, 2)
    assert_fails(signed, trusted, "object 2: signed object not found")


def test_signature_relinked_to_other_group(signed: Path, trusted: TrustedKeys) -> None:
    with SifImage.open(signed) as img:
        sig = next(d for d in img.find(F.DataType.SIGNATURE) if d.linked_id == 1)
    rewrite_descriptor(signed, sig.id, linked_id=2 | F.DESCR_GROUP_MASK)
    msgs = failures(signed, trusted)
    assert "signature not found for object group 1" in msgs, msgs
    assert any(f"signature object {sig.id}: object 4: signed object not found" in m for m in msgs)


def test_signature_copied_from_other_image(
    tmp_path: Path, signed: Path, trusted: TrustedKeys
) -> None:
    other = make_image(tmp_path / "other.sif")  # same content, another UUID
    with SifImage.open(signed) as img:
        sig = next(d for d in img.find(F.DataType.SIGNATURE) if d.linked_id == 1)
        data, extra = img.read(sig), sig.signature()
    add_object(
        other,
        ObjectInput.signature(data, extra.hashtype, group_id=0, linked_id=1, link_to_group=True),
    )
    msgs = failures(other, trusted, group_ids=[1])
    assert any("header integrity compromised" in m for m in msgs), msgs


def test_sha1_metadata_digest(tmp_path: Path, dsse_key: ed25519.Ed25519PrivateKey) -> None:
    p = make_image(tmp_path / "img.sif")
    with SifImage.open(p) as img:
        md = D.image_metadata(img, 2, [img.get(3)], "sha256")
    doc = json.loads(md.to_json())

    def sha1(d: str) -> str:
        return "sha1:" + "00" * 20

    doc["header"]["digest"] = sha1(doc["header"]["digest"])
    env = dsse.sign_envelope(json.dumps(doc).encode(), [dsse_key])
    add_object(p, ObjectInput.signature(env, 1, group_id=0, linked_id=2, link_to_group=True))
    msgs = failures(p, TrustedKeys(dsse=(dsse_key.public_key(),)), group_ids=[2])
    assert any("digest algorithm 'sha1' is not allowed" in m for m in msgs), msgs


def test_second_invalid_signature_fails(signed: Path, trusted: TrustedKeys) -> None:
    """Every linked signature must verify, even next to a good one."""
    other = ed25519.Ed25519PrivateKey.generate()
    sign_image(signed, DsseSigner([other]), group_ids=[1])
    msgs = failures(signed, trusted)
    assert any("not signed by any given key" in m for m in msgs), msgs


def test_subset_signature(tmp_path: Path, dsse_key: ed25519.Ed25519PrivateKey) -> None:
    p = make_image(tmp_path / "img.sif")
    sign_image(p, DsseSigner([dsse_key]), object_ids=[2])
    keys = TrustedKeys(dsse=(dsse_key.public_key(),))
    with SifImage.open(p) as img:
        assert verify_image(img, keys, object_ids=[2]).ok
    assert "signature object 4: object 1: object not signed (added after signing)" in failures(
        p, keys, group_ids=[1]
    )


def test_unsigned_image(tmp_path: Path, trusted: TrustedKeys) -> None:
    p = make_image(tmp_path / "img.sif")
    with SifImage.open(p) as img:
        res = verify_image(img, trusted)
    assert res.unsigned and not res.ok
    with pytest.raises(SignatureError, match="signature not found for object group 1"):
        res.check()


def test_verify_fd_reads_the_open_file(tmp_path: Path, signed: Path, trusted: TrustedKeys) -> None:
    """The path swapped after open: verify_fd checks the file the fd holds."""
    evil = make_image(tmp_path / "evil.sif")
    fd = os.open(signed, os.O_RDONLY)
    try:
        os.replace(evil, signed)
        res = verify_fd(fd, trusted, path=str(signed))
        assert res.ok
        with SifImage.from_fd(fd) as img:
            assert res.covers(img.primary_partition())
    finally:
        os.close(fd)
    fd = os.open(signed, os.O_RDONLY)
    try:
        with pytest.raises(SignatureError, match="signature not found"):
            verify_fd(fd, trusted)
    finally:
        os.close(fd)


def test_verify_fd_requires_signed_primary(
    tmp_path: Path, dsse_key: ed25519.Ed25519PrivateKey, trusted: TrustedKeys
) -> None:
    p = make_image(tmp_path / "img.sif")
    sign_image(p, DsseSigner([dsse_key]), object_ids=[3])
    fd = os.open(p, os.O_RDONLY)
    try:
        with pytest.raises(SignatureError, match="primary partition"):
            verify_fd(fd, trusted, object_ids=[3])
    finally:
        os.close(fd)


def test_added_group_with_a_second_primary_partition(signed: Path, trusted: TrustedKeys) -> None:
    """A new (unsigned) group holding another squashfs PrimSys partition (sifpy's own add
    refuses a second primary, so it is added as data and its descriptor edited): the whole
    image fails verification, and ``exec --verify-key`` refuses before mounting."""
    new = add_object(
        signed,
        ObjectInput.partition(b"hsqs" + bytes(4092), F.FSType.SQUASH, F.PartType.DATA,
                              "amd64", group_id=3),
    )  # fmt: skip
    with SifImage.open(signed) as img:
        extra = img.get(new).partition().replace(parttype=F.PartType.PRIMSYS)
        raw_extra = img.get(new).raw.extra
    packed = extra.pack()
    rewrite_descriptor(signed, new, extra=packed + raw_extra[len(packed) :])
    with SifImage.open(signed) as img:
        prims = [d for d in img.find(F.DataType.PARTITION)
                 if d.partition().parttype == F.PartType.PRIMSYS]  # fmt: skip
        assert len(prims) == 2
    assert_fails(signed, trusted, "signature not found for object group 3")

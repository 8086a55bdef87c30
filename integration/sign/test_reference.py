"""The 17 reference images, and a sifpy signature laid out exactly like the reference's."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from sifpy.sif import SifImage
from sifpy.sign.keyring import Keyring
from sifpy.sign.pgp import parse_clearsigned
from sifpy.sign.sign import PgpSigner, sign_image
from sifpy.sign.verify import TrustedKeys, verify_image
from tests.conftest import reference_images

from .conftest import FPR

SIGNED = {"one-group-signed.sif": [1], "two-groups-signed.sif": [1, 2]}
# image -> (plain --legacy-insecure ok, --legacy-insecure --all ok)
LEGACY = {
    "one-group-signed-legacy.sif": (True, False),
    "one-group-signed-legacy-all.sif": (True, True),
    "one-group-signed-legacy-group.sif": (True, True),
    "two-groups-signed-legacy.sif": (True, False),
    "two-groups-signed-legacy-all.sif": (True, False),
    "two-groups-signed-legacy-group.sif": (True, False),
}


def test_seventeen_images() -> None:
    assert len(reference_images()) == 17


@pytest.mark.parametrize("path", reference_images(), ids=lambda p: p.name)
def test_reference_image(path: Path, ref_keyring: Keyring) -> None:
    keys = TrustedKeys.load()
    with SifImage.open(path) as img:
        res = verify_image(img, keys)
        legacy = verify_image(img, keys, legacy=True)
        legacy_all = verify_image(img, keys, legacy_all=True)
    if path.name in SIGNED:
        assert res.ok, res.failures()
        assert [s.group_id for s in res.signatures] == SIGNED[path.name]
        assert all(s.signers == (FPR,) and s.kind == "pgp" for s in res.signatures)
        assert all(s.signer_names == ("Unit Test <unit@test.com>",) for s in res.signatures)
    elif path.name in LEGACY:
        assert not res.ok
        assert "only legacy signatures, which need --legacy-insecure" in res.failures()[0]
        assert (legacy.ok, legacy_all.ok) == LEGACY[path.name], (
            legacy.failures(),
            legacy_all.failures(),
        )
        assert all(s.signers == (FPR,) for s in legacy.signatures)
    else:
        assert res.unsigned and not res.ok
        assert not legacy.ok


def test_signed_image_without_key(keysdir: Path, images: Path) -> None:
    with SifImage.open(images / "one-group-signed.sif") as img:
        res = verify_image(img, TrustedKeys.load())
    assert "no trusted OpenPGP public keys" in res.failures()[0]


def test_apptainer_keyring_is_read(keysdir: Path, images: Path, ref_keyring: Keyring) -> None:
    import os

    pub = ref_keyring.export(FPR, armor=False)
    shutil.rmtree(keysdir)
    apptainer = Path(os.environ["HOME"]) / ".apptainer" / "keys"
    apptainer.mkdir(parents=True)
    (apptainer / "pgp-public").write_bytes(pub)
    with SifImage.open(images / "one-group-signed.sif") as img:
        assert verify_image(img, TrustedKeys.load()).ok


@pytest.mark.parametrize("name", ["one-group.sif", "two-groups.sif"])
def test_same_layout_as_reference(
    tmp_path: Path, images: Path, ref_keyring: Keyring, name: str
) -> None:
    """Signed with the same key, deterministic: identical bytes except the OpenPGP packet."""
    p = tmp_path / name
    shutil.copyfile(images / name, p)
    sign_image(p, PgpSigner(ref_keyring, ref_keyring.secret_key()), deterministic=True)
    ref = images / name.replace(".sif", "-signed.sif")
    with SifImage.open(p) as ours, SifImage.open(ref) as theirs:
        assert ours.header.replace(data_size=0) == theirs.header.replace(data_size=0)
        assert len(ours.descriptors) == len(theirs.descriptors)
        for a, b in zip(ours.descriptors, theirs.descriptors, strict=True):
            if a.type_name != "Signature":
                assert a.raw == b.raw
                continue
            # Same type, group (none), link (group), hashtype and 20-byte fingerprint entity.
            assert a.raw.replace(size=0, size_with_padding=0, offset=0) == b.raw.replace(
                size=0, size_with_padding=0, offset=0
            )
            sa, sb = parse_clearsigned(ours.read(a)), parse_clearsigned(theirs.read(b))
            assert sa.text == sb.text  # the integrity metadata JSON, byte for byte
            raw_a, raw_b = ours.read(a), theirs.read(b)
            assert (
                raw_a.split(b"-----BEGIN PGP SIGNATURE-----")[0]
                == raw_b.split(b"-----BEGIN PGP SIGNATURE-----")[0]
            )
            assert not raw_a.endswith(b"\n") and not raw_b.endswith(b"\n")
        res = verify_image(ours, TrustedKeys.load())
        assert res.ok, res.failures()

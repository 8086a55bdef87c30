"""DSSE: round trips for every key type, and the envelope format of the reference.

Debian's golang-github-sylabs-sif-dev predates the reference's DSSE test images, and
fixtures fetched from upstream are not committed here, so byte-level comparison with a
reference DSSE image is not part of this suite."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from sifpy.errors import SignatureError
from sifpy.sif import SifImage
from sifpy.sign import dsse
from sifpy.sign.sign import DsseSigner, sign_image
from sifpy.sign.verify import TrustedKeys, verify_image
from tests.sign.conftest import make_image

KEYS = {
    "ecdsa-p256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "ecdsa-p384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "ed25519": ed25519.Ed25519PrivateKey.generate,
    "rsa": lambda: rsa.generate_private_key(65537, 2048),
}


@pytest.mark.parametrize("kind", sorted(KEYS))
def test_round_trip(tmp_path: Path, kind: str) -> None:
    key = KEYS[kind]()
    p = make_image(tmp_path / "img.sif")
    done = sign_image(p, DsseSigner([key]))  # type: ignore[list-item]
    assert [(g.group_id, g.objects) for g in done] == [(1, (1, 2)), (2, (3,))]
    with SifImage.open(p) as img:
        res = verify_image(img, TrustedKeys(dsse=(key.public_key(),)))  # type: ignore[arg-type]
        sig = img.get(done[0].signature_id)
        assert sig.group_id == 0 and sig.links_group and sig.linked_id == 1
        assert sig.signature().hashtype == 1 and sig.signature().entity == bytes(256)
    assert res.ok, res.failures()
    assert [v.id for v in res.verified] == [1, 2, 3]


def test_pem_files_and_passphrase(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization as s

    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.BestAvailableEncryption(b"pw"))
    (tmp_path / "k.pem").write_bytes(pem)
    with pytest.raises(SignatureError, match="can't load key"):
        dsse.load_private_key(tmp_path / "k.pem")
    with pytest.raises(SignatureError, match="can't load key"):
        dsse.load_private_key(tmp_path / "k.pem", "wrong")
    assert isinstance(dsse.load_private_key(tmp_path / "k.pem", "pw"), ec.EllipticCurvePrivateKey)


def test_weak_rsa_refused(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization as s

    key = rsa.generate_private_key(65537, 1024)
    pem = key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption())
    (tmp_path / "k.pem").write_bytes(pem)
    with pytest.raises(SignatureError, match="too weak"):
        dsse.load_private_key(tmp_path / "k.pem")


def test_bad_signature_by_known_key_fails_envelope() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    env = dsse.sign_envelope(b"{}", [key]).replace(b'"sig":"', b'"sig":"AAAA')
    with pytest.raises(SignatureError):
        dsse.verify_envelope(env, [key.public_key()], 1)

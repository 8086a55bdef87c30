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


def _go_envelope(payload: bytes, sigs: list[tuple[str, bytes]]) -> bytes:
    """The envelope as the reference's Go struct marshals it, built here by hand."""
    import base64
    import json

    return json.dumps(
        {
            "payloadType": dsse.PAYLOAD_TYPE,
            "payload": base64.b64encode(payload).decode(),
            "signatures": [{"keyid": k, "sig": base64.b64encode(s).decode()} for k, s in sigs],
        },
        separators=(",", ":"),
    ).encode()


def _pae(payload: bytes) -> bytes:
    t = dsse.PAYLOAD_TYPE.encode()
    return (
        b"DSSEv1 "
        + str(len(t)).encode()
        + b" "
        + t
        + b" "
        + str(len(payload)).encode()
        + b" "
        + payload
    )


def test_envelope_bytes_are_the_references() -> None:
    """Deterministic schemes (Ed25519, RSA PKCS#1 v1.5 over SHA-256) give the exact bytes
    of the reference's envelope: its field order, compact JSON, padded base64."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    payload = b'{"version":1,"objects":[]}'
    ed = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    rk = rsa.generate_private_key(65537, 2048)
    want = _go_envelope(
        payload,
        [
            (dsse.keyid(ed.public_key()), ed.sign(_pae(payload))),
            (
                dsse.keyid(rk.public_key()),
                rk.sign(_pae(payload), padding.PKCS1v15(), hashes.SHA256()),
            ),
        ],
    )
    assert dsse.sign_envelope(payload, [ed, rk]) == want


@pytest.mark.parametrize("curve", [ec.SECP384R1, ec.SECP521R1])
def test_ecdsa_signs_sha256_whatever_the_curve(curve: type[ec.EllipticCurve]) -> None:
    """The reference loads every key with SHA-256: a P-384 or P-521 signature is over
    SHA-256(PAE), not the curve's own hash (which securesystemslib's schemes would use)."""
    import base64
    import json

    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes

    key = ec.generate_private_key(curve())
    payload = b"{}"
    env = json.loads(dsse.sign_envelope(payload, [key]))
    sig = base64.b64decode(env["signatures"][0]["sig"])
    key.public_key().verify(sig, _pae(payload), ec.ECDSA(hashes.SHA256()))
    with pytest.raises(InvalidSignature):
        key.public_key().verify(sig, _pae(payload), ec.ECDSA(hashes.SHA384()))
    # An envelope made outside sifpy the same way verifies.
    other = _go_envelope(
        payload,
        [(dsse.keyid(key.public_key()), key.sign(_pae(payload), ec.ECDSA(hashes.SHA256())))],
    )
    assert dsse.verify_envelope(other, [key.public_key()], 1).payload == payload


def test_crypto_libraries_load_only_for_dsse() -> None:
    """``sifpy exec --verify`` imports the verifier; securesystemslib and cryptography are
    loaded only when a signature is a DSSE envelope (a PGP-signed image needs neither)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from sifpy.sign import verify, dsse\n"
        "heavy = lambda: sorted(m for m in ('cryptography', 'securesystemslib') if m in sys.modules)\n"
        "assert not dsse.is_envelope(b'-----BEGIN PGP SIGNED MESSAGE-----\\n')\n"
        "print(heavy())\n"
        "from cryptography.hazmat.primitives.asymmetric import ed25519\n"
        "k = ed25519.Ed25519PrivateKey.generate()\n"
        "dsse.verify_envelope(dsse.sign_envelope(b'{}', [k]), [k.public_key()], 1)\n"
        "print(heavy())\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.split("\n")[:2] == ["[]", "['cryptography', 'securesystemslib']"]

"""DSSE envelopes signed with PEM keys (ECDSA P-256/P-384/P-521, Ed25519, RSA).

The reference (sylabs/sif pkg/integrity/dsse.go, through sigstore's DSSE wrapper) writes
``{"payloadType":"application/vnd.sylabs.sif-metadata+json","payload":"<b64>",
"signatures":[{"keyid":"SHA256:<b64>","sig":"<b64>"}]}`` where each signature covers the
DSSE pre-authentication encoding (PAE) of the payload. Signature schemes as sigstore's
signers make them: Ed25519 over the PAE; ECDSA (ASN.1 DER) and RSA PKCS#1 v1.5 over
SHA-256(PAE) (keys are loaded with SHA-256, the descriptor's hashtype 1). The key ID is the
SSH-style fingerprint: unpadded base64 of SHA-256 over the SSH wire-format public key.

The envelope, its PAE and the signers and verifiers are securesystemslib's (the DSSE
authors' Python library: ``Envelope``, ``CryptoSigner``, ``SSlibKey``). Two parts stay here:
the JSON (securesystemslib puts ``payload`` before ``payloadType`` and decodes base64
without checking it; the reference's Go struct order and its standard-then-URL-safe
decoding are kept), and ECDSA whose hash is not the curve's own (securesystemslib's ECDSA
schemes tie P-384 to SHA-384 and P-521 to SHA-512, while the reference signs SHA-256 with
every curve), which goes through ``cryptography`` directly. Neither library is imported
until a DSSE key or envelope is used, so verifying a PGP-signed image loads neither:
securesystemslib's import costs about 22 ms on top of the 21 ms of ``cryptography`` (best
of 9 fresh interpreters, 2-CPU Xeon), paid once by a ``sifpy exec --verify`` of a
DSSE-signed image, whose hashing of the image costs more.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sifpy.errors import SignatureError
from sifpy.sif import format as F

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
    from securesystemslib.dsse import Envelope

    PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
    PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey

PAYLOAD_TYPE = "application/vnd.sylabs.sif-metadata+json"

# Descriptor hashtype -> the digest size in bits ECDSA/RSA signatures are made over.
_HASH_BITS: dict[int, int] = {
    F.HashType.SHA256: 256,
    F.HashType.SHA384: 384,
    F.HashType.SHA512: 512,
}
# The securesystemslib ECDSA scheme of each (curve, hash bits) it offers.
_ECDSA_SCHEMES = {
    ("secp256r1", 256): "ecdsa-sha2-nistp256",
    ("secp384r1", 384): "ecdsa-sha2-nistp384",
    ("secp521r1", 512): "ecdsa-sha2-nistp521",
}
_CURVES = ("secp256r1", "secp384r1", "secp521r1")


def _envelope(payload: bytes) -> Envelope:
    from securesystemslib.dsse import Envelope

    return Envelope(payload, PAYLOAD_TYPE, {})


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding."""
    from securesystemslib.dsse import Envelope

    return Envelope(payload, payload_type, {}).pae()


def keyid(key: PublicKey) -> str:
    """``SHA256:<unpadded base64>`` of the SSH wire-format public key (ssh-keygen -l)."""
    from cryptography.hazmat.primitives import serialization

    line = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    wire = base64.b64decode(line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(wire).digest()).decode().rstrip("=")


def _check_key(key: object, path: str) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        if key.curve.name not in _CURVES:
            raise SignatureError(f"unsupported ECDSA curve {key.curve.name}: {path}")
    elif isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise SignatureError(f"RSA key of {key.key_size} bits is too weak: {path}")
    elif not isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        raise SignatureError(
            f"unsupported key type {type(key).__name__}: {path}",
            hint="use an ECDSA (P-256, P-384), Ed25519 or RSA key in PEM format",
        )


def load_private_key(path: str | Path, passphrase: str | None = None) -> PrivateKey:
    """A PEM private key; :class:`SignatureError` saying why not (passphrase, format)."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SignatureError(f"can't read key: {path}: {exc.strerror}") from exc
    try:
        key = serialization.load_pem_private_key(
            data, passphrase.encode() if passphrase is not None else None
        )
    except TypeError as exc:
        hint = "give the passphrase" if passphrase is None else None
        raise SignatureError(f"can't load key: {path}: {exc}", hint=hint) from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise SignatureError(f"can't load key: {path}: not a valid PEM private key") from exc
    _check_key(key, str(path))
    return key  # type: ignore[return-value]


def load_public_key(path: str | Path) -> PublicKey:
    """A PEM public key, a certificate's key, or the public half of a PEM private key."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SignatureError(f"can't read key: {path}: {exc.strerror}") from exc
    key: Any
    try:
        if b"CERTIFICATE-----" in data:
            from cryptography import x509

            key = x509.load_pem_x509_certificate(data).public_key()
        elif b"PRIVATE KEY-----" in data:
            key = serialization.load_pem_private_key(data, None).public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise SignatureError(f"can't load public key: {path}: {exc}") from exc
    _check_key(key, str(path))
    return key  # type: ignore[no-any-return]


def _scheme(key: PublicKey, bits: int) -> str | None:
    """The securesystemslib scheme that makes the reference's signature with ``key`` over a
    ``bits``-bit digest, or None where it has none (ECDSA with another curve's hash)."""
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    if isinstance(key, ed25519.Ed25519PublicKey):
        return "ed25519"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return _ECDSA_SCHEMES.get((key.curve.name, bits))
    return f"rsa-pkcs1v15-sha{bits}"


def _ecdsa_hash(bits: int) -> Any:
    from cryptography.hazmat.primitives import hashes

    if bits == 256:
        return hashes.SHA256()
    return hashes.SHA384() if bits == 384 else hashes.SHA512()


def sign_envelope(payload: bytes, keys: list[PrivateKey]) -> bytes:
    """A DSSE envelope over ``payload`` with one signature per key, as Go marshals it."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from securesystemslib.signer import CryptoSigner, Signature, SSlibKey

    if not keys:
        raise SignatureError("can't sign: no DSSE key given")
    env = _envelope(payload)
    for k in keys:
        pub, kid = k.public_key(), keyid(k.public_key())
        scheme = _scheme(pub, 256)
        if scheme is not None:
            env.sign(CryptoSigner(k, SSlibKey.from_crypto(pub, kid, scheme)))
        else:  # P-384/P-521 over SHA-256, as the reference signs (see the docstring)
            assert isinstance(k, ec.EllipticCurvePrivateKey)
            sig = k.sign(env.pae(), ec.ECDSA(_ecdsa_hash(256)))
            env.signatures[kid] = Signature(kid, sig.hex())
    doc = env.to_dict()
    ordered = {k: doc[k] for k in ("payloadType", "payload", "signatures")}
    return json.dumps(ordered, separators=(",", ":")).encode()


def is_envelope(data: bytes) -> bool:
    """Whether ``data`` is a DSSE envelope with sif's payload type (dsse.go isDSSESignature)."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(doc, dict) and doc.get("payloadType") == PAYLOAD_TYPE


@dataclass(frozen=True)
class DsseVerified:
    """What a good envelope proves: the payload, and the trusted keys that signed it."""

    payload: bytes
    keyids: tuple[str, ...]  # trusted signers whose signatures verified
    unknown: tuple[str, ...]  # signatures by keys not given (not counted)


def _b64(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise SignatureError(f"DSSE envelope: {what} is not a string")
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error:
        try:
            return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        except (binascii.Error, ValueError):
            raise SignatureError(f"DSSE envelope: {what} is not base64") from None


def _verify(key: PublicKey, kid: str, sig: bytes, message: bytes, hashtype: int) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric import ec
    from securesystemslib.exceptions import UnverifiedSignatureError, VerificationError
    from securesystemslib.signer import Signature, SSlibKey

    bits = _HASH_BITS.get(hashtype)
    if bits is None:
        return False
    scheme = _scheme(key, bits)
    if scheme is None:  # ECDSA over another curve's hash (see the docstring)
        assert isinstance(key, ec.EllipticCurvePublicKey)
        try:
            key.verify(sig, message, ec.ECDSA(_ecdsa_hash(bits)))
        except InvalidSignature:
            return False
        return True
    try:
        SSlibKey.from_crypto(key, kid, scheme).verify_signature(Signature(kid, sig.hex()), message)
    except (UnverifiedSignatureError, VerificationError):
        return False
    return True


def verify_envelope(data: bytes, keys: list[PublicKey], hashtype: int) -> DsseVerified:
    """Verify an envelope against trusted ``keys``.

    At least one signature must be by a given key; a signature whose key ID names a given
    key but does not verify fails the whole envelope (no invalid signature is tolerated).
    """
    if not keys:
        raise SignatureError(
            "can't verify DSSE signature: no public key given", hint="give --key PUBLIC.pem"
        )
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise SignatureError("DSSE envelope is not JSON") from None
    if not isinstance(doc, dict) or doc.get("payloadType") != PAYLOAD_TYPE:
        raise SignatureError(f"DSSE envelope: payload type is not {PAYLOAD_TYPE}")
    payload = _b64(doc.get("payload"), "payload")
    sigs = doc.get("signatures")
    if not isinstance(sigs, list) or not sigs:
        raise SignatureError("DSSE envelope holds no signatures")
    message = _envelope(payload).pae()
    by_id = {keyid(k): k for k in keys}
    good: list[str] = []
    unknown: list[str] = []
    for s in sigs:
        if not isinstance(s, dict):
            raise SignatureError("DSSE envelope: malformed signature entry")
        kid = s.get("keyid", "")
        sig = _b64(s.get("sig"), "sig")
        candidates = [(kid, by_id[kid])] if kid in by_id else ([] if kid else by_id.items())
        ok = [i for i, k in candidates if _verify(k, i, sig, message, hashtype)]
        if ok:
            good.append(ok[0])
        elif kid in by_id:
            raise SignatureError(f"DSSE signature by key {kid} does not verify")
        else:
            unknown.append(str(kid) or "(no key id)")
    if not good:
        raise SignatureError(
            "DSSE envelope not signed by any given key"
            + (f" (signed by {', '.join(unknown)})" if unknown else ""),
            hint="give the signer's public key with --key",
        )
    return DsseVerified(payload, tuple(good), tuple(unknown))

"""DSSE envelopes signed with PEM keys (ECDSA P-256/P-384, Ed25519, RSA), via ``cryptography``.

The reference (sylabs/sif pkg/integrity/dsse.go, through sigstore's DSSE wrapper) writes
``{"payloadType":"application/vnd.sylabs.sif-metadata+json","payload":"<b64>",
"signatures":[{"keyid":"SHA256:<b64>","sig":"<b64>"}]}`` where each signature covers the
DSSE pre-authentication encoding (PAE) of the payload. Signature schemes as sigstore's
signers make them: Ed25519 over the PAE; ECDSA (ASN.1 DER) and RSA PKCS#1 v1.5 over
SHA-256(PAE) (keys are loaded with SHA-256, the descriptor's hashtype 1). The key ID is the
SSH-style fingerprint: unpadded base64 of SHA-256 over the SSH wire-format public key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from sifpy.errors import SignatureError
from sifpy.sif import format as F

PAYLOAD_TYPE = "application/vnd.sylabs.sif-metadata+json"

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey
_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
# Descriptor hashtype -> the hash ECDSA/RSA signatures are made over (sif HashType).
_HASHES: dict[int, type[hashes.HashAlgorithm]] = {
    F.HashType.SHA256: hashes.SHA256,
    F.HashType.SHA384: hashes.SHA384,
    F.HashType.SHA512: hashes.SHA512,
}


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding."""
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def keyid(key: PublicKey) -> str:
    """``SHA256:<unpadded base64>`` of the SSH wire-format public key (ssh-keygen -l)."""
    line = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    wire = base64.b64decode(line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(wire).digest()).decode().rstrip("=")


def _check_key(key: object, path: str) -> None:
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, _CURVES):
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


def _sign(key: PrivateKey, message: bytes) -> bytes:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(message)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(message, ec.ECDSA(hashes.SHA256()))
    return key.sign(message, padding.PKCS1v15(), hashes.SHA256())


def _verify(key: PublicKey, sig: bytes, message: bytes, hashtype: int) -> bool:
    try:
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(sig, message)
            return True
        alg = _HASHES.get(hashtype)
        if alg is None:
            return False
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(sig, message, ec.ECDSA(alg()))
        else:
            key.verify(sig, message, padding.PKCS1v15(), alg())
        return True
    except InvalidSignature:
        return False


def sign_envelope(payload: bytes, keys: list[PrivateKey]) -> bytes:
    """A DSSE envelope over ``payload`` with one signature per key, as Go marshals it."""
    if not keys:
        raise SignatureError("can't sign: no DSSE key given")
    message = pae(PAYLOAD_TYPE, payload)
    doc = {
        "payloadType": PAYLOAD_TYPE,
        "payload": base64.b64encode(payload).decode(),
        "signatures": [
            {"keyid": keyid(k.public_key()), "sig": base64.b64encode(_sign(k, message)).decode()}
            for k in keys
        ],
    }
    return json.dumps(doc, separators=(",", ":")).encode()


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
    message = pae(PAYLOAD_TYPE, payload)
    by_id = {keyid(k): k for k in keys}
    good: list[str] = []
    unknown: list[str] = []
    for s in sigs:
        if not isinstance(s, dict):
            raise SignatureError("DSSE envelope: malformed signature entry")
        kid = s.get("keyid", "")
        sig = _b64(s.get("sig"), "sig")
        candidates = [by_id[kid]] if kid in by_id else ([] if kid else list(keys))
        ok = [k for k in candidates if _verify(k, sig, message, hashtype)]
        if ok:
            good.append(keyid(ok[0]))
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

"""Signing and verifying SIF images, compatible with the reference (sylabs/sif pkg/integrity).

* :mod:`.digest`: the integrity metadata (header, descriptor and object digests) and its JSON;
* :mod:`.pgp`: OpenPGP clear-signing and verification through GnuPG (``gpg``, ``gpgv``);
* :mod:`.dsse`: DSSE envelopes with PEM keys (ECDSA, Ed25519, RSA) via ``cryptography``;
* :mod:`.keyring`: the user's keyring (``~/.sifpy/keys``) and Apptainer's public keyring;
* :mod:`.sign`: adding signatures (:func:`sign_image`);
* :mod:`.verify`: checking them (:func:`verify_image`, :func:`verify_fd` for the runtime).
"""

from sifpy.sign.sign import DsseSigner, GroupSignature, PgpSigner, sign_image
from sifpy.sign.verify import TrustedKeys, VerifyResult, verify_fd, verify_image

__all__ = [
    "DsseSigner",
    "GroupSignature",
    "PgpSigner",
    "TrustedKeys",
    "VerifyResult",
    "sign_image",
    "verify_fd",
    "verify_image",
]

"""Signing and verifying SIF images, compatible with the reference (sylabs/sif pkg/integrity).

* :mod:`.digest`: the integrity metadata (header, descriptor and object digests) and its JSON;
* :mod:`.pgp`: OpenPGP clear-signing and verification through GnuPG (``gpg``, ``gpgv``);
* :mod:`.dsse`: DSSE envelopes with PEM keys (ECDSA, Ed25519, RSA) via ``cryptography``;
* :mod:`.keyring`: the user's keyring (``~/.sifpy/keys``) and Apptainer's public keyring;
* :mod:`.sign`: adding signatures (:func:`sign_image`);
* :mod:`.verify`: checking them (:func:`verify_image`, :func:`verify_fd` for the runtime);
* :mod:`.policy`: the administrator's verification policy that ``exec`` applies.

The package imports none of them itself: ``exec`` reads the policy on its hot path and must
not pay for ``cryptography``.
"""

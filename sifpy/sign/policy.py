"""Run policy: which images ``exec``/``run``/``shell`` accept (issue 6, item 4).

An administrator makes verification mandatory in ``/etc/sifpy/sifpy.conf`` (or the file
named by ``$SIFPY_CONFIG``), one ``key = value`` per line, ``#`` comments::

    verify = required                  # every image must verify ("optional" by default)
    trusted key = /etc/sifpy/site.pem  # a DSSE public key (repeatable)
    trusted keyring = /etc/sifpy/site.gpg  # OpenPGP public keys (repeatable)
    trusted fingerprint = 12045C8C...  # accept only these PGP signers (repeatable)

A user's ``--verify`` asks for the same check with the user's own keyrings added.
"""

from __future__ import annotations

import os

from sifpy.errors import SifpyError, SignatureError

SYSTEM_CONFIG = "/etc/sifpy/sifpy.conf"


class Policy:
    """The run policy (a plain class: this module is on the exec start-up path)."""

    def __init__(self) -> None:
        self.verify_required = False
        self.keys: list[str] = []
        self.keyrings: list[str] = []
        self.fingerprints: set[str] = set()


def load(path: str | None = None) -> Policy:
    """The run policy from the system config file (no file: nothing required)."""
    path = path or os.environ.get("SIFPY_CONFIG") or SYSTEM_CONFIG
    policy = Policy()
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return policy
    except OSError as exc:
        raise SifpyError(f"can't read config: {path}: {exc.strerror}") from exc
    for n, raw in enumerate(lines, start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        key, sep, value = (part.strip() for part in line.partition("="))
        key = " ".join(key.lower().split())
        if not sep or not value:
            raise SifpyError(f"{path}:{n}: expected 'key = value'")
        if key == "verify":
            if value not in ("required", "optional"):
                raise SifpyError(f"{path}:{n}: verify must be 'required' or 'optional'")
            policy.verify_required = value == "required"
        elif key == "trusted key":
            policy.keys.append(value)
        elif key == "trusted keyring":
            policy.keyrings.append(value)
        elif key == "trusted fingerprint":
            policy.fingerprints.add(value.replace(" ", "").upper())
        else:
            raise SifpyError(f"{path}:{n}: unknown setting {key!r}")
    return policy


def enforce(fd: int, path: str, policy: Policy, user_verify: bool, user_keys: list[str]) -> None:
    """Verify the image open on ``fd`` when the policy or the user asks; raise if it fails.

    Verification reads through ``fd``: the same open file is mounted afterwards, so a path
    swapped after this check can't be run instead.
    """
    if not (policy.verify_required or user_verify):
        return
    from sifpy.sign.verify import TrustedKeys, verify_fd

    # Under a mandatory policy only the administrator's keys count; a user's --verify adds
    # the user's own keyrings.
    keys = TrustedKeys.load(
        dsse_keys=policy.keys + ([] if policy.verify_required else user_keys),
        keyrings=policy.keyrings,
        default_pgp=not policy.verify_required,
    )
    try:
        res = verify_fd(fd, keys, path=path)
    except SignatureError as exc:
        raise SignatureError(
            f"refusing to run {path}: {exc.message}",
            hint="the image must be signed by a trusted key ('sifpy verify' shows why)",
        ) from exc
    if policy.fingerprints:
        signers = {s.upper() for sig in res.signatures for s in sig.signers}
        if not signers & policy.fingerprints:
            raise SignatureError(
                f"refusing to run {path}: not signed by a trusted fingerprint",
                hint="the site's configuration lists the accepted signers",
            )

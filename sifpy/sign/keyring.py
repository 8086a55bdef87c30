"""The user's OpenPGP keyring: a private GnuPG home, plus Apptainer's public keyring.

sifpy keeps its keys in ``$SIFPY_KEYSDIR``, else ``~/.sifpy/keys`` (mode 0700), used as
GnuPG's ``--homedir`` so that the user's own ``~/.gnupg`` is never touched. Apptainer's
public keyring (``~/.apptainer/keys/pgp-public``, a plain file of OpenPGP packets; same
for Singularity's ``~/.singularity/sypgp/pgp-public``) is read too when verifying, as
``apptainer verify`` does with its local keyring. No keyserver is ever consulted: which keys
are trusted is decided here, never by the image (an image can name a key, never make it trusted).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from sifpy import config
from sifpy.errors import SignatureError
from sifpy.sign.pgp import dearmor, gpg_failure, run_gpg

APPTAINER_PUBLIC = ("~/.apptainer/keys/pgp-public", "~/.singularity/sypgp/pgp-public")


def default_keysdir() -> Path:
    """``$SIFPY_KEYSDIR`` or ``~/.sifpy/keys``."""
    env = config.get("SIFPY_KEYSDIR")
    return Path(env) if env else Path("~/.sifpy/keys").expanduser()


@dataclass(frozen=True)
class Key:
    """One key in the keyring, as ``gpg --with-colons`` lists it."""

    fingerprint: str  # primary key fingerprint, upper-case hex
    user_ids: tuple[str, ...]
    algorithm: str
    bits: int
    created: int
    secret: bool = False
    subkeys: tuple[str, ...] = field(default=())

    @property
    def name(self) -> str:
        return self.user_ids[0] if self.user_ids else ""


_ALGOS = {"1": "RSA", "16": "ElGamal", "17": "DSA", "18": "ECDH", "19": "ECDSA", "22": "EdDSA"}


class Keyring:
    """A sifpy keyring directory (a GnuPG home)."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else default_keysdir()

    def ensure(self) -> str:
        """Create the directory 0700 if needed; refuse one that others can read."""
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = self.path.stat()
        if st.st_mode & 0o077:
            os.chmod(self.path, 0o700)
        return str(self.path)

    # --- listing -----------------------------------------------------------------------

    def keys(self, secret: bool = False) -> list[Key]:
        """Public keys (or, with ``secret``, keys whose secret part is here), in gpg's order."""
        if not self.path.exists():
            return []
        op = "--list-secret-keys" if secret else "--list-keys"
        proc = run_gpg(self.ensure(), ["--with-colons", "--fixed-list-mode", op])
        if proc.returncode != 0 and not proc.stdout.strip():
            raise gpg_failure(f"can't list keys in {self.path}", proc)
        return _parse_colons(proc.stdout.decode("utf-8", "replace"), secret)

    def find(self, selector: str, secret: bool = False) -> Key:
        """A key by fingerprint (or its suffix, at least 8 hex digits) or by user ID text."""
        sel = selector.upper().removeprefix("0X")
        keys = self.keys(secret)
        hits = [k for k in keys if len(sel) >= 8 and k.fingerprint.endswith(sel)]
        if not hits:
            hits = [k for k in keys if any(selector.lower() in u.lower() for u in k.user_ids)]
        if len(hits) != 1:
            what = "no" if not hits else "more than one"
            raise SignatureError(
                f"{what} {'secret ' if secret else ''}key matches {selector!r} in {self.path}",
                hint="'sifpy key list' shows the keys and their fingerprints",
            )
        return hits[0]

    def secret_key(self, index: int | None = None) -> Key:
        """The signing key: by index in the secret-key list, or the only one there is."""
        keys = self.keys(secret=True)
        if not keys:
            raise SignatureError(
                f"no secret key in {self.path}",
                hint="create one with 'sifpy key newpair', or sign with '--key FILE.pem'",
            )
        if index is None:
            if len(keys) > 1:
                raise SignatureError(
                    f"{len(keys)} secret keys in {self.path}: which one?",
                    hint="choose with --keyidx N ('sifpy key list --secret' shows the order)",
                )
            return keys[0]
        if not 0 <= index < len(keys):
            raise SignatureError(f"no secret key with index {index} (there are {len(keys)})")
        return keys[index]

    # --- changing ----------------------------------------------------------------------

    def generate(
        self,
        name: str,
        email: str = "",
        comment: str = "",
        passphrase: str = "",
        algorithm: str = "rsa4096",
    ) -> Key:
        """Create a signing key pair (no expiry); an empty passphrase leaves it unprotected."""
        uid = name + (f" ({comment})" if comment else "") + (f" <{email}>" if email else "")
        if not name.strip() or any(c in uid for c in "\n\r"):
            raise SignatureError("a key needs a name on one line")
        proc = run_gpg(
            self.ensure(),
            ["--quick-generate-key", uid, algorithm, "sign,cert", "never"],
            passphrase=passphrase,
        )
        if proc.returncode != 0:
            raise gpg_failure("can't generate key", proc)
        mine = [k for k in self.keys(secret=True) if uid in k.user_ids]
        if not mine:
            raise SignatureError("can't generate key: gpg created no key")
        return max(mine, key=lambda k: k.created)

    def import_keys(self, data: bytes) -> list[str]:
        """Import public or secret keys (armored or binary); returns the fingerprints."""
        proc = run_gpg(self.ensure(), ["--status-fd", "1", "--import"], stdin=data)
        fprs = []
        for line in proc.stdout.decode("utf-8", "replace").splitlines():
            parts = line.split()
            if len(parts) >= 4 and parts[1] == "IMPORT_OK":
                fprs.append(parts[3].upper())
        if proc.returncode != 0 and not fprs:
            raise gpg_failure("can't import keys", proc)
        return sorted(set(fprs))

    def export(self, fingerprint: str, secret: bool = False, armor: bool = True,
               passphrase: str | None = None) -> bytes:  # fmt: skip
        """Export one key, public by default."""
        key = self.find(fingerprint, secret)
        args = ["--armor"] if armor else []
        args += ["--export-secret-keys" if secret else "--export", key.fingerprint]
        proc = run_gpg(self.ensure(), args, passphrase=passphrase if secret else None)
        if proc.returncode != 0 or not proc.stdout:
            raise gpg_failure(f"can't export key {key.fingerprint}", proc)
        return proc.stdout

    def remove(self, fingerprint: str) -> Key:
        """Remove a key, its secret part included."""
        key = self.find(fingerprint)
        proc = run_gpg(
            self.ensure(),
            ["--yes", "--delete-secret-and-public-key", key.fingerprint],
        )
        if proc.returncode != 0:
            raise gpg_failure(f"can't remove key {key.fingerprint}", proc)
        return key

    def public_keys_bytes(self) -> bytes:
        """All public keys of this keyring, binary, for a verification keyring."""
        if not self.path.exists():
            return b""
        proc = run_gpg(self.ensure(), ["--export"])
        return proc.stdout if proc.returncode == 0 else b""


def trusted_keyring(
    keyring: Keyring | None = None,
    extra: tuple[str | os.PathLike[str], ...] = (),
    apptainer: bool = True,
) -> bytes:
    """The binary OpenPGP keys a verification trusts: ``keyring``'s (None: none),
    Apptainer's (when ``apptainer``), and those in the files ``extra``."""
    blobs = [keyring.public_keys_bytes()] if keyring is not None else []
    paths = [Path(p).expanduser() for p in APPTAINER_PUBLIC] if apptainer else []
    for p in paths:
        if p.is_file():
            blobs.append(dearmor(p.read_bytes()))
    for e in extra:
        try:
            blobs.append(dearmor(Path(e).read_bytes()))
        except OSError as exc:
            raise SignatureError(f"can't read keyring: {e}: {exc.strerror}") from exc
    return b"".join(blobs)


def _parse_colons(text: str, secret: bool) -> list[Key]:
    keys: list[Key] = []
    cur: dict[str, object] | None = None
    last = ""

    def flush() -> None:
        if cur is not None:
            keys.append(Key(**cur))  # type: ignore[arg-type]

    for line in text.splitlines():
        f = line.split(":")
        rec = f[0]
        if rec in ("pub", "sec"):
            flush()
            cur = {
                "fingerprint": "",
                "user_ids": (),
                "algorithm": _ALGOS.get(f[3], f[3])
                + (f" ({f[16]})" if len(f) > 16 and f[16] else ""),
                "bits": int(f[2] or 0),
                "created": int(f[5] or 0),
                "secret": secret,
                "subkeys": (),
            }
            last = rec
        elif rec in ("sub", "ssb"):
            last = rec
        elif rec == "fpr" and cur is not None:
            if last in ("pub", "sec") and not cur["fingerprint"]:
                cur["fingerprint"] = f[9].upper()
            elif last in ("sub", "ssb"):
                cur["subkeys"] = (*cur["subkeys"], f[9].upper())  # type: ignore[misc]
        elif rec == "uid" and cur is not None and f[1] not in ("r", "e"):
            cur["user_ids"] = (*cur["user_ids"], _unescape(f[9]))  # type: ignore[misc]
    flush()
    return keys


def _unescape(s: str) -> str:
    """gpg --with-colons escapes ':' and control characters as \\xNN."""
    return re.sub(r"\\x([0-9a-fA-F]{2})", lambda m: chr(int(m.group(1), 16)), s)

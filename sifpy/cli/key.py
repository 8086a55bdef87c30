"""``sifpy key``: manage the OpenPGP keys sifpy signs and verifies with.

Keys live in ``$SIFPY_KEYSDIR`` or ``~/.sifpy/keys`` (a private GnuPG home, mode 0700);
subcommands mirror ``apptainer key``: newpair, list, export, import, remove.
"""

from __future__ import annotations

import getpass
import os
import sys
from argparse import Namespace
from datetime import UTC, datetime

from sifpy import config
from sifpy.cli._args import ArgumentParser
from sifpy.errors import UsageError
from sifpy.sign.keyring import Key, Keyring
from sifpy.sign.pgp import stop_agent


def build_parser(prog: str) -> ArgumentParser:
    p = ArgumentParser(prog=prog, description="Manage OpenPGP signing keys.")
    p.add_argument("--keysdir", help="keyring directory (default $SIFPY_KEYSDIR or ~/.sifpy/keys)")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    n = sub.add_parser("newpair", help="create a new signing key pair")
    n.add_argument("-N", "--name", help="the key owner's name")
    n.add_argument("-E", "--email", default="", help="email address")
    n.add_argument("-C", "--comment", default="", help="comment")
    n.add_argument("-P", "--password", action="store_true", help="ask for a passphrase")
    n.add_argument("-b", "--bit-length", type=int, default=4096, help="RSA key size (4096)")
    n.add_argument("--algorithm", help="gpg algorithm, e.g. ed25519 (overrides --bit-length)")
    ls = sub.add_parser("list", help="list keys")
    ls.add_argument("-s", "--secret", action="store_true", help="list secret keys")
    e = sub.add_parser("export", help="export a key")
    e.add_argument("key", help="fingerprint (or its last 8+ hex digits) or user ID text")
    e.add_argument("output", nargs="?", help="file to write (default stdout)")
    e.add_argument("-s", "--secret", action="store_true", help="export the secret key")
    e.add_argument("--binary", action="store_true", help="binary instead of ASCII armor")
    i = sub.add_parser("import", help="import keys from a file")
    i.add_argument("file", help="armored or binary OpenPGP key file")
    r = sub.add_parser("remove", help="remove a key (and its secret part)")
    r.add_argument("key", help="fingerprint (or its last 8+ hex digits) or user ID text")
    return p


def _ask_passphrase() -> str:
    env = config.raw("SIFPY_PASSPHRASE")
    if env is not None:
        return env
    if not sys.stdin.isatty():
        raise UsageError("can't ask for a passphrase: stdin is not a terminal",
                         hint="set SIFPY_PASSPHRASE")  # fmt: skip
    first = getpass.getpass("Enter a passphrase: ")
    if getpass.getpass("Retype the passphrase: ") != first:
        raise UsageError("passphrases do not match")
    return first


def render_key(i: int, k: Key) -> str:
    """One key in ``apptainer key list`` style."""
    created = datetime.fromtimestamp(k.created, UTC).strftime("%Y-%m-%d %H:%M:%S +0000 UTC")
    lines = [f"{i}) U: {k.name}", f"   C: {created}", f"   F: {k.fingerprint}"]
    lines.append(f"   L: {k.bits} {k.algorithm}".rstrip())
    return "\n".join(lines) + "\n   --------\n"


def main(argv: list[str], prog: str = "sifpy key") -> int:
    """Run ``sifpy key``; no gpg-agent outlives it."""
    a = build_parser(prog).parse_args(argv)
    ring = Keyring(a.keysdir)
    try:
        return _main(a, ring)
    finally:
        if ring.path.is_dir():
            stop_agent(str(ring.path))


def _main(a: Namespace, ring: Keyring) -> int:
    out = sys.stdout
    if a.action == "newpair":
        if not a.name:
            raise UsageError("a new key needs a name", hint="give --name 'Your Name'")
        passphrase = _ask_passphrase() if a.password else ""
        algo = a.algorithm or f"rsa{a.bit_length}"
        key = ring.generate(a.name, a.email, a.comment, passphrase, algo)
        out.write(f"Generated key {key.fingerprint}: {key.name}\n")
    elif a.action == "list":
        keys = ring.keys(secret=a.secret)
        out.write(f"{'Secret' if a.secret else 'Public'} key store: {ring.path}\n\n")
        for i, k in enumerate(keys):
            out.write(render_key(i, k))
    elif a.action == "export":
        secret_pass = (config.raw("SIFPY_PASSPHRASE") or "") if a.secret else None
        data = ring.export(a.key, secret=a.secret, armor=not a.binary, passphrase=secret_pass)
        if a.output:
            fd = os.open(a.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                         0o600 if a.secret else 0o644)  # fmt: skip
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        else:
            out.flush()
            sys.stdout.buffer.write(data)
    elif a.action == "import":
        try:
            with open(a.file, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise UsageError(f"can't read key file: {a.file}: {exc.strerror}") from exc
        for fpr in ring.import_keys(data):
            out.write(f"Imported key {fpr}\n")
    elif a.action == "remove":
        key = ring.remove(a.key)
        out.write(f"Removed key {key.fingerprint}: {key.name}\n")
    return 0

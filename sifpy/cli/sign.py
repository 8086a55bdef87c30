"""``sifpy sign``: add signatures to a SIF (OpenPGP by default, DSSE with ``--key``).

Flags follow ``apptainer sign``: ``-g/--group-id``, ``-i/--sif-id``, ``-k/--keyidx``,
``--key FILE.pem`` (also ``$SIFPY_SIGN_KEY``). With no selection every object group gets
one signature. The image is rewritten atomically.
"""

from __future__ import annotations

import getpass
import sys
from argparse import Namespace

from sifpy import config
from sifpy.cli._args import ArgumentParser
from sifpy.errors import SignatureError
from sifpy.sign import dsse
from sifpy.sign.keyring import Keyring
from sifpy.sign.pgp import stop_agent
from sifpy.sign.sign import DsseSigner, PgpSigner, Signer, sign_image
from sifpy.util import log


def build_parser(prog: str) -> ArgumentParser:
    p = ArgumentParser(prog=prog, description="Sign the object groups of a SIF image.")
    p.add_argument("image", help="SIF image to sign")
    p.add_argument("-g", "--group-id", "--groupid", type=int, action="append", default=[],
                   metavar="N", help="sign object group N (repeatable)")  # fmt: skip
    p.add_argument("-i", "--sif-id", "--id", type=int, action="append", default=[],
                   metavar="N", help="sign only object N (repeatable)")  # fmt: skip
    p.add_argument("-k", "--keyidx", type=int, help="index of the secret key to use")
    p.add_argument("--key", action="append", default=[], metavar="FILE.pem",
                   help="sign a DSSE envelope with this PEM private key (repeatable)")  # fmt: skip
    p.add_argument("--keysdir", help="keyring directory (default $SIFPY_KEYSDIR or ~/.sifpy/keys)")
    p.add_argument("-a", "--all", action="store_true", help="deprecated: the default")
    return p


def _passphrase(what: str) -> str:
    env = config.raw("SIFPY_PASSPHRASE")
    if env is not None:
        return env
    if not sys.stdin.isatty():
        raise SignatureError(f"{what} is protected by a passphrase",
                             hint="set SIFPY_PASSPHRASE, or run from a terminal")  # fmt: skip
    return getpass.getpass(f"Passphrase for {what}: ")


def _dsse_signer(paths: list[str]) -> DsseSigner:
    keys = []
    for path in paths:
        try:
            keys.append(dsse.load_private_key(path, config.raw("SIFPY_PASSPHRASE")))
        except SignatureError as exc:
            if "passphrase" not in (exc.hint or "") and "password" not in exc.message.lower():
                raise
            keys.append(dsse.load_private_key(path, _passphrase(path)))
    return DsseSigner(keys)


def main(argv: list[str], prog: str = "sifpy sign") -> int:
    """Run ``sifpy sign``."""
    a = build_parser(prog).parse_args(argv)
    env_key = config.get("SIFPY_SIGN_KEY")
    pem = a.key or ([env_key] if env_key else [])
    signer: Signer
    if pem:
        signer = _dsse_signer(pem)
    else:
        ring = Keyring(a.keysdir)
        try:
            return _sign(
                a, PgpSigner(ring, ring.secret_key(a.keyidx), config.raw("SIFPY_PASSPHRASE"))
            )
        finally:
            if ring.path.is_dir():
                stop_agent(str(ring.path))  # no gpg-agent outlives the command
    return _sign(a, signer)


def _sign(a: Namespace, signer: Signer) -> int:
    log.info(f"Signing image: {a.image} with {signer.describe()}")
    try:
        done = sign_image(a.image, signer, group_ids=a.group_id, object_ids=a.sif_id)
    except SignatureError as exc:
        if not isinstance(signer, PgpSigner) or "passphrase" not in exc.message.lower():
            raise
        signer.passphrase = _passphrase(signer.describe())
        done = sign_image(a.image, signer, group_ids=a.group_id, object_ids=a.sif_id)
    for g in done:
        objs = ", ".join(map(str, g.objects))
        log.info(f"Signature object {g.signature_id} added for group {g.group_id} (objects {objs})")
    log.info(f"Signature created and applied to image '{a.image}'")
    return 0

"""``sifpy verify``: check the signatures of a SIF image.

Flags follow ``apptainer verify``: ``--key pub.pem`` (DSSE; also ``$SIFPY_VERIFY_KEY``),
OpenPGP by default against the sifpy and Apptainer keyrings (and ``--keyring FILE``),
``-g/--group-id``, ``-i/--sif-id``, ``-a/--all``, ``--legacy-insecure``, ``-j/--json``. No
keyserver is ever contacted. The report names each signer and the objects it covers, and on
failure exactly what does not match; the exit status is 0 only when everything verified.
"""

from __future__ import annotations

import json
import sys

from sifpy import config
from sifpy.cli._args import ArgumentParser
from sifpy.errors import SignatureError
from sifpy.sif import SifImage
from sifpy.sif import format as F
from sifpy.sign.verify import TrustedKeys, VerifyResult, verify_image


def build_parser(prog: str) -> ArgumentParser:
    p = ArgumentParser(prog=prog, description="Verify the signatures of a SIF image.")
    p.add_argument("image", help="SIF image to verify")
    p.add_argument("--key", action="append", default=[], metavar="FILE.pem",
                   help="trust this PEM public key for DSSE signatures (repeatable)")  # fmt: skip
    p.add_argument("--keyring", action="append", default=[], metavar="FILE",
                   help="also trust the OpenPGP public keys in FILE (repeatable)")  # fmt: skip
    p.add_argument("--keysdir", help="keyring directory (default $SIFPY_KEYSDIR or ~/.sifpy/keys)")
    p.add_argument("-l", "--local", action="store_true",
                   help="accepted for compatibility: sifpy never uses a keyserver")  # fmt: skip
    p.add_argument("-g", "--group-id", "--groupid", type=int, action="append", default=[],
                   metavar="N", help="verify object group N (repeatable)")  # fmt: skip
    p.add_argument("-i", "--sif-id", "--id", type=int, action="append", default=[],
                   metavar="N", help="verify object N (repeatable)")  # fmt: skip
    p.add_argument("-a", "--all", action="store_true",
                   help="with --legacy-insecure: verify every grouped object")  # fmt: skip
    p.add_argument("--legacy-insecure", action="store_true",
                   help="accept legacy signatures (no header/descriptor protection)")  # fmt: skip
    p.add_argument("-j", "--json", action="store_true", help="print the result as JSON")
    return p


def _object_label(img: SifImage, oid: int) -> str:
    d = img.get(oid)
    label = f"{oid} {d.type_name}"
    if d.data_type == F.DataType.PARTITION:
        part = d.partition()
        fs = F.FS_TYPE_NAMES.get(part.fstype, "?")
        arch = F.ARCH_NAMES.get(part.arch, "unknown")
        label += f" ({fs}/{F.PART_TYPE_NAMES.get(part.parttype, '?')}/{arch})"
    return label


def render(img: SifImage, res: VerifyResult) -> str:
    """The human report: one block per signature, then the verdict."""
    lines = [f"Verifying image: {res.path}"]
    if res.legacy:
        lines.append("WARNING: legacy signatures do not protect the header or descriptors")
    for s in res.signatures:
        mark = "[OK]    " if s.ok else "[FAILED]"
        who = (
            ", ".join(
                f"{n} ({f})" if n else f
                for n, f in zip(s.signer_names or ("",) * len(s.signers), s.signers, strict=False)
            )
            or "unknown signer"
        )
        where = f"group {s.group_id}" if s.group_id else "object"
        lines.append(f"{mark} signature {s.signature_id} ({s.kind}, {where}): {who}")
        if s.objects:
            lines.append("         objects: " + ", ".join(_object_label(img, i) for i in s.objects))
        if s.error:
            lines.append(f"         error: {s.error}")
    for e in res.errors:
        lines.append(f"[FAILED] {e}")
    if res.ok:
        lines.append(f"Container verified: {res.path}")
    elif res.unsigned:
        lines.append(f"Container is not signed: {res.path}")
    return "\n".join(lines) + "\n"


def main(argv: list[str], prog: str = "sifpy verify") -> int:
    """Run ``sifpy verify``."""
    a = build_parser(prog).parse_args(argv)
    env_key = config.get("SIFPY_VERIFY_KEY")
    pem = a.key or ([env_key] if env_key else [])
    # An explicit --key means: trust exactly these keys (as apptainer verify --key).
    keys = TrustedKeys.load(pem, a.keyring, a.keysdir, default_pgp=not pem)
    with SifImage.open(a.image) as img:
        res = verify_image(
            img,
            keys,
            group_ids=a.group_id,
            object_ids=a.sif_id,
            legacy=a.legacy_insecure,
            legacy_all=a.legacy_insecure and a.all,
        )
        if a.json:
            json.dump(res.to_json(), sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            sys.stdout.write(render(img, res))
    if not res.ok:
        try:
            res.check()
        except SignatureError as exc:
            if a.json:
                exc.message = f"can't verify {res.path}"
            raise
    return 0

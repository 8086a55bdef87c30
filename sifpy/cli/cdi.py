"""``sifpy cdi list``: the CDI devices ``--device`` can use, and the specs that are bad."""

from __future__ import annotations

import json
import sys

from sifpy import config
from sifpy.cli._args import ArgumentParser
from sifpy.runtime import cdi
from sifpy.sign import policy
from sifpy.util import log


def build_parser(prog: str) -> ArgumentParser:
    p = ArgumentParser(prog=prog, description="Show the CDI devices of the spec directories.")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    ls = sub.add_parser("list", help="list the devices (VENDOR/CLASS=NAME) and their spec")
    ls.add_argument("--json", action="store_true", help="print JSON")
    return p


def main(argv: list[str], prog: str = "sifpy cdi") -> int:
    """Run ``sifpy cdi``."""
    a = build_parser(prog).parse_args(argv)
    dirs = config.get("SIFPY_CDI_SPEC_DIRS") or policy.load().device_setting("cdi spec dirs")
    reg = cdi.Registry.load(dirs.split(":") if dirs else None)
    for err in reg.errors:
        log.warn(err.message)
    rows = [(name, spec.path) for name, (spec, _) in reg.devices.items()]
    if a.json:
        json.dump([{"device": d, "spec": p} for d, p in rows], sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for d, p in rows:
            sys.stdout.write(f"{d}\t{p}\n")
    return 0

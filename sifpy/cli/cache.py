"""``sifpy cache list|clean|verify``: the blob and SIF cache (see :mod:`sifpy.oci.cache`)."""

from __future__ import annotations

import json
import sys
from argparse import Namespace
from datetime import datetime

from sifpy.cli._args import ArgumentParser
from sifpy.errors import ImageError, UsageError
from sifpy.oci.cache import Cache
from sifpy.oci.cacheclean import CLEAN_TYPES


def build_parser(prog: str) -> ArgumentParser:
    p = ArgumentParser(prog=prog, description="Inspect and clean sifpy's image cache.")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    ls = sub.add_parser("list", help="list pulled images (repository, tag, digest, size)")
    ls.add_argument("--json", action="store_true", help="print JSON")
    clean = sub.add_parser("clean", help="remove cached blobs and images")
    clean.add_argument(
        "-d", "--days", type=float, help="only remove what was not written for this many days"
    )
    clean.add_argument(
        "-T",
        "--type",
        action="append",
        default=[],
        metavar="TYPE",
        help="what to remove: blob (layers), oci or sif (images made from them), all"
        " (default; repeatable, comma lists)",
    )
    clean.add_argument("-D", "--dry-run", action="store_true", help="only say what would go")
    clean.add_argument("-f", "--force", action="store_true", help="don't ask for confirmation")
    sub.add_parser("verify", help="re-hash every cached blob, removing bad ones")
    return p


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def _clean(a: Namespace, cache: Cache) -> int:
    types = [t.strip() for v in a.type for t in v.split(",") if t.strip()] or ["all"]
    bad = [t for t in types if t not in CLEAN_TYPES]
    if bad:
        known = ", ".join(CLEAN_TYPES)
        raise UsageError(f"unknown cache type: {', '.join(bad)}", hint=f"use {known}")
    older = None if a.days is None else a.days * 86400
    what = ", ".join(types) + (f" older than {a.days:g} days" if a.days is not None else "")
    if a.dry_run:
        would = cache.clean(older, types, dry_run=True)
        print(f"would remove {_size(would)} ({what}) from {cache.root}", file=sys.stderr)
        return 0
    # As Apptainer: ask first on a terminal; scripts (no terminal) don't get a question.
    if not a.force and sys.stdin.isatty():
        would = cache.clean(older, types, dry_run=True)
        prompt = f"remove {_size(would)} ({what}) from {cache.root}? [y/N] "
        print(prompt, end="", file=sys.stderr, flush=True)
        if sys.stdin.readline().strip().lower() not in ("y", "yes"):
            print("nothing removed", file=sys.stderr)
            return 0
    freed = cache.clean(older, types)
    print(f"removed {_size(freed)} from {cache.root}", file=sys.stderr)
    return 0


def main(argv: list[str], prog: str = "sifpy cache") -> int:
    """Run ``sifpy cache``."""
    a = build_parser(prog).parse_args(argv)
    cache = Cache()
    out = sys.stdout
    if a.action == "list":
        entries = cache.entries()
        if a.json:
            json.dump([e.__dict__ for e in entries], out, indent=2)
            out.write("\n")
            return 0
        from rich.console import Console
        from rich.table import Table

        table = Table(box=None, pad_edge=False)
        for col in ("REPOSITORY", "TAG", "DIGEST", "CREATED", "SIZE"):
            table.add_column(col, no_wrap=True)
        for e in entries:
            created = datetime.fromtimestamp(e.created).strftime("%Y-%m-%d %H:%M")
            table.add_row(e.repository, e.tag, e.digest[7:19], created, _size(e.size))
        Console(file=out, width=200).print(table)
        return 0
    if a.action == "clean":
        return _clean(a, cache)
    bad = cache.verify()
    for d in bad:
        print(f"removed corrupt blob {d}", file=sys.stderr)
    if bad:
        raise ImageError(f"cache had {len(bad)} corrupt blob(s); they were removed")
    return 0

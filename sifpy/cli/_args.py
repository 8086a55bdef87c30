"""argparse helpers shared by command modules: usage errors go through sifpy's error tree."""

from __future__ import annotations

import argparse
from typing import NoReturn

from sifpy.errors import UsageError


class ArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors become :class:`UsageError` (printed by the CLI)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}", hint=f"run '{self.prog} --help' for usage")


def add_registry_options(p: argparse.ArgumentParser) -> None:
    """``--insecure`` (and Apptainer's spellings) and ``--ca-cert``: how to reach a registry."""
    p.add_argument(
        "--insecure",
        "--no-https",
        "--nohttps",
        dest="insecure",
        action="store_true",
        help="use plain http for this registry (only for a registry you trust)",
    )
    p.add_argument("--ca-cert", metavar="FILE", help="trust this CA bundle (PEM) for the registry")

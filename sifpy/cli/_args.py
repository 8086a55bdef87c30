"""argparse helpers shared by command modules: usage errors go through sifpy's error tree."""

from __future__ import annotations

import argparse
from typing import NoReturn

from sifpy.errors import UsageError


class ArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors become :class:`UsageError` (printed by the CLI)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}", hint=f"run '{self.prog} --help' for usage")

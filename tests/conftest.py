"""Shared test helpers; the capability probes are tests/probe.py's (skip locally, fail in CI)."""

from __future__ import annotations

import glob
from pathlib import Path

from tests.probe import IN_CI, need_tool, require

__all__ = ["IN_CI", "need_tool", "reference_dir", "require"]


def reference_dir() -> Path:
    """Where Debian's golang-github-sylabs-sif-dev keeps the reference SIF sources."""
    hits = sorted(glob.glob("/usr/share/gocode/src/github.com/sylabs/sif*/test/images"))
    require(None if hits else "golang-github-sylabs-sif-dev is not installed")
    return Path(hits[-1]).parent.parent


def reference_images() -> list[Path]:
    hits = sorted(glob.glob("/usr/share/gocode/src/github.com/sylabs/sif*/test/images/*.sif"))
    return [Path(h) for h in hits]

"""Shared test helpers: capability probes that skip locally but fail in CI."""

from __future__ import annotations

import glob
import os
import shutil
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(ok: bool, reason: str) -> None:
    """Skip with ``reason`` when a capability is missing; in CI (CI=true) fail instead."""
    if ok:
        return
    if IN_CI:
        pytest.fail(f"missing capability in CI: {reason}", pytrace=False)
    pytest.skip(reason)


def need_tool(name: str) -> str:
    path = shutil.which(name)
    require(path is not None, f"{name} is not installed")
    assert path is not None
    return path


def reference_dir() -> Path:
    """Where Debian's golang-github-sylabs-sif-dev keeps the reference SIF sources."""
    hits = sorted(glob.glob("/usr/share/gocode/src/github.com/sylabs/sif*/test/images"))
    require(bool(hits), "golang-github-sylabs-sif-dev is not installed")
    return Path(hits[-1]).parent.parent


def reference_images() -> list[Path]:
    hits = sorted(glob.glob("/usr/share/gocode/src/github.com/sylabs/sif*/test/images/*.sif"))
    return [Path(h) for h in hits]

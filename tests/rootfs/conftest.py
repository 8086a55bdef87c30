"""Fixtures for the rootfs tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .tars import Box


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Box]:
    dest = tmp_path / "dest"
    victim = tmp_path / "victim"
    dest.mkdir()
    victim.mkdir()
    (victim / "hello").write_bytes(b"hello, victim\n")
    yield Box(tmp_path, dest, victim)

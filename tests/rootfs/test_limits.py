"""The unpacked-size cap's setting, and the budget's arithmetic on a real file system."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sifpy.errors import RootfsError, UsageError
from sifpy.rootfs import limits
from sifpy.rootfs.limits import Budget


@pytest.mark.parametrize(
    ("text", "size"),
    [("123", 123), ("64G", 64 << 30), ("500m", 500 << 20), ("1.5GiB", 3 << 29), ("2T", 2 << 40)],
)
def test_parse_size(text: str, size: int) -> None:
    assert limits.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "G", "-1G", "12X", "1e9"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(UsageError):
        limits.parse_size(text)


def test_max_unpacked_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SIFPY_MAX_UNPACKED", raising=False)
    assert limits.max_unpacked() == 64 << 30
    monkeypatch.setenv("SIFPY_MAX_UNPACKED", "10M")
    assert limits.max_unpacked() == 10 << 20
    monkeypatch.setenv("SIFPY_MAX_UNPACKED", "0")
    assert limits.max_unpacked() is None
    monkeypatch.setenv("SIFPY_MAX_UNPACKED", "lots")
    with pytest.raises(UsageError, match="SIFPY_MAX_UNPACKED"):
        limits.max_unpacked()


def test_budget_counts_every_layer_against_the_cap(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SIFPY_MAX_UNPACKED", "1M")
    budget = Budget(tmp_path)
    budget.add(600 << 10, "layer 1")
    with pytest.raises(RootfsError, match=r"layer 2: more than 1\.0 MiB uncompressed"):
        budget.add(600 << 10, "layer 2")


def test_budget_keeps_the_reserve(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A file that would eat into the reserve is refused before it is written; a squashfs
    budget (compressed output) checks the reserve only."""
    monkeypatch.setenv("SIFPY_MAX_UNPACKED", "0")
    st = os.statvfs(tmp_path)
    free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
    room = free - limits.reserve(total)
    with pytest.raises(RootfsError, match="must stay free"):
        Budget(tmp_path).add(max(room, 0) + (1 << 30), "big")
    if room > limits.CHECK_EVERY:
        Budget(tmp_path, expands=False).add(room + (1 << 30), "big")

"""GnuPG fixtures: a throw-away sifpy keyring holding the reference test key."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from sifpy.sign.keyring import Keyring
from tests.conftest import need_tool, reference_dir

FPR = "12045C8C0B1004D058DE4BEDA20C27EE7FF7BA84"  # test/keys/private.asc


def _kill_agent(home: Path) -> None:
    if shutil.which("gpgconf"):
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"], check=False,
                       capture_output=True)  # fmt: skip


@pytest.fixture
def keysdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty sifpy keyring (``$SIFPY_KEYSDIR``); HOME moved so no real keyring is read."""
    need_tool("gpg")
    need_tool("gpgv")
    home = tmp_path / "k"
    monkeypatch.setenv("SIFPY_KEYSDIR", str(home))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    yield home
    _kill_agent(home)


@pytest.fixture
def ref_keyring(keysdir: Path) -> Keyring:
    """The keyring with the reference's private.asc imported."""
    ring = Keyring(keysdir)
    assert ring.import_keys((reference_dir() / "test" / "keys" / "private.asc").read_bytes()) == [
        FPR
    ]
    return ring


@pytest.fixture
def images() -> Path:
    return reference_dir() / "test" / "images"

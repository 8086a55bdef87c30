"""The command lines of the way back to OCI: destinations that can't be, refused by name
before any work (exit 2, ``can't ...`` and a hint)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sifpy.errors import UsageError
from sifpy.export import parse_destination


def _sifpy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sifpy", *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("oci:out", ("oci", Path("out"), "latest")),
        ("oci:out:v1", ("oci", Path("out"), "v1")),
        ("oci-archive:/a/b.tar:v1", ("oci-archive", Path("/a/b.tar"), "v1")),
        ("oci-archive:/a:b/c.tar", ("oci-archive", Path("/a:b/c.tar"), "latest")),
    ],
)
def test_destinations(text: str, want: tuple[str, Path, str]) -> None:
    assert parse_destination(text) == want


@pytest.mark.parametrize("text", ["docker-archive:x.tar", "out.tar", "oci:", "oci:dir:"])
def test_bad_destinations(text: str) -> None:
    with pytest.raises(UsageError, match="can't export to"):
        parse_destination(text)


def test_export_cli_refuses_unknown_destination(tmp_path: Path) -> None:
    res = _sifpy("export", str(tmp_path / "none.sif"), "dir:out")
    assert res.returncode == 2 and "can't export to dir:out" in res.stderr, res.stderr
    assert "hint: oci:DIR[:tag]" in res.stderr


def test_pull_oci_refuses_oras() -> None:
    res = _sifpy("pull", "--oci", "x.sif", "oras://host/name:tag")
    assert res.returncode == 2 and "with --oci" in res.stderr, res.stderr

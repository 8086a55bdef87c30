"""Bad SIF input: one clear error line, a non-zero exit, no traceback, no huge allocation."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sifpy.errors import ImageError, SifFormatError
from sifpy.sif import ObjectInput, SifImage, create
from sifpy.sif import format as F
from tests.sif.mutate import (
    D_ID,
    D_OFFSET,
    D_SIZE,
    H_DSIZE,
    H_FREE,
    H_TOTAL,
    descr_off,
    set_q,
    set_u32,
)  # fmt: skip


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    p = tmp_path_factory.mktemp("good") / "good.sif"
    create(
        p,
        [
            ObjectInput(F.DataType.DEFFILE, b"Bootstrap: scratch\n"),
            ObjectInput.partition(b"q" * 5000, F.FSType.SQUASH, F.PartType.PRIMSYS, "amd64"),
        ],
    )
    return p.read_bytes()


def cases(good: bytes) -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, a phrase the error must contain)."""
    d2 = descr_off(1, 0)
    return {
        "empty": (b"", "file too small"),
        "truncated-header": (good[:100], "file too small"),
        "truncated-table": (good[:5000], "descriptor table"),
        "truncated-data": (good[:-10], "outside the file"),
        "wrong-magic": (good[:32] + b"NOT_MAGIC\x00" + good[42:], "bad magic"),
        "wrong-version": (good[:42] + b"99\x00" + good[45:], "unsupported SIF version"),
        "absurd-count": (set_q(good, H_TOTAL, 1 << 40), "absurd descriptor count"),
        "negative-count": (set_q(good, H_TOTAL, -1), "absurd descriptor count"),
        "free-above-total": (set_q(good, H_FREE, 49), "free descriptor count"),
        "table-size-mismatch": (set_q(good, H_DSIZE, 12), "descriptor table size"),
        "table-past-end": (set_q(set_q(good, H_TOTAL, 60000), H_DSIZE, 60000 * 585), "outside"),
        "offset-past-end": (set_q(good, d2 + D_OFFSET, 10**12), "outside the file"),
        "negative-offset": (set_q(good, d2 + D_OFFSET, -5), "outside the file"),
        "size-past-end": (set_q(good, d2 + D_SIZE, 10**15), "outside the file"),
        "overlap": (set_q(good, d2 + D_OFFSET, 32176), "overlap"),
        "over-table": (set_q(good, d2 + D_OFFSET, 4096), "overlaps the header or descriptor"),
        "duplicate-id": (set_u32(good, d2 + D_ID, 1), "duplicate object id 1"),
        "zero-id": (set_u32(good, d2 + D_ID, 0), "id 0"),
    }


CASE_NAMES = list(cases(b"\0" * 40000))


@pytest.mark.parametrize("name", CASE_NAMES)
def test_loader_raises_typed_error(name: str, good: bytes, tmp_path: Path) -> None:
    data, phrase = cases(good)[name]
    p = tmp_path / f"{name}.sif"
    p.write_bytes(data)
    with pytest.raises(SifFormatError) as exc:
        SifImage.open(p)
    assert phrase in str(exc.value)
    assert str(p) in str(exc.value)


def sifpy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sifpy", *args], capture_output=True, text=True, check=False
    )


def assert_clean_error(r: subprocess.CompletedProcess[str], phrase: str) -> None:
    assert r.returncode != 0
    assert r.stdout == ""
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, r.stderr
    assert phrase in errors[0], r.stderr
    assert all(line.startswith(("error: ", "hint: ")) for line in lines), r.stderr


@pytest.mark.parametrize(
    "name", ["empty", "wrong-magic", "absurd-count", "overlap", "truncated-data"]
)
def test_cli_reports_one_line(name: str, good: bytes, tmp_path: Path) -> None:
    data, phrase = cases(good)[name]
    p = tmp_path / "bad.sif"
    p.write_bytes(data)
    for cmd in (["list"], ["header"], ["info", "1"], ["dump", "1"]):
        assert_clean_error(sifpy("sif", *cmd, str(p)), phrase)


def test_cli_directory_and_missing(tmp_path: Path) -> None:
    assert_clean_error(sifpy("sif", "list", str(tmp_path)), "is a directory")
    assert_clean_error(sifpy("sif", "list", str(tmp_path / "nope.sif")), "No such file")


def test_cli_unknown_object(good: bytes, tmp_path: Path) -> None:
    p = tmp_path / "g.sif"
    p.write_bytes(good)
    assert_clean_error(sifpy("sif", "info", "7", str(p)), "no object with id 7")
    assert_clean_error(sifpy("sif", "info", "x", str(p)), "not an object id")


def test_unreadable_file_as_unprivileged_user(good: bytes, tmp_path: Path) -> None:
    """Root reads anything, so drop to an unprivileged uid in a forked child to test EACCES."""
    p = tmp_path / "secret.sif"
    p.write_bytes(good)
    p.chmod(0o600)
    if os.geteuid() != 0 and os.access(p, os.R_OK):
        pytest.skip("needs root to switch to another uid")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: become nobody, run the CLI with stderr into the pipe
        try:
            os.close(r)
            if os.geteuid() == 0:
                os.setgroups([])
                os.setresgid(65534, 65534, 65534)
                os.setresuid(65534, 65534, 65534)
            os.dup2(w, 2)
            sys.stderr = open(2, "w", closefd=False)  # pytest replaced sys.stderr
            from sifpy.cli import main

            rc = main(["sif", "list", str(p)])
            sys.stderr.flush()
            os._exit(rc)
        except BaseException:
            os._exit(99)
    os.close(w)
    with os.fdopen(r) as f:
        err = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 1, err
    assert err.startswith("error: can't open SIF: ") and "Permission denied" in err
    assert "Traceback" not in err


def test_huge_object_not_read_into_memory(good: bytes, tmp_path: Path) -> None:
    p = tmp_path / "g.sif"
    p.write_bytes(good)
    with SifImage.open(p) as img:
        part = img.primary_partition()
        with pytest.raises(ImageError, match="more than"):
            img.read(part, limit=1000)
        assert b"".join(img.iter_data(part, chunk=1000)) == b"q" * 5000

"""Writes are atomic: a failure, a full disk or a SIGKILL never damages the image or
leaves a half-written file (or a stray temporary) behind."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sifpy.errors import ImageError, SifpyError
from sifpy.sif import ObjectInput, SifImage, add_object, create, delete_object, set_primary
from sifpy.sif import format as F
from tests.conftest import require


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "img.sif"
    create(p, [
        ObjectInput(F.DataType.DEFFILE, b"Bootstrap: scratch\n"),
        ObjectInput.partition(b"s" * 8192, F.FSType.SQUASH, F.PartType.PRIMSYS, "amd64"),
        ObjectInput.partition(b"e" * 10, F.FSType.EXT3, F.PartType.DATA, "amd64"),
    ])  # fmt: skip
    return p


def test_create_failure_leaves_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "out.sif"
    with pytest.raises(ImageError, match="can't read object data"):
        create(dest, [ObjectInput(F.DataType.GENERIC, str(tmp_path / "missing"))])
    assert list(tmp_path.iterdir()) == []


def test_create_failure_keeps_old_file(image: Path) -> None:
    before = snapshot(image.parent)
    with pytest.raises(SifpyError):
        create(image, [ObjectInput(F.DataType.GENERIC, b"x", name="n" * 200)])
    assert snapshot(image.parent) == before


def test_refused_changes_leave_image_untouched(image: Path) -> None:
    before, ino = snapshot(image.parent), image.stat().st_ino
    with pytest.raises(ImageError, match="not a system partition"):
        set_primary(image, 3)
    with pytest.raises(ImageError, match="already contains a primary partition"):
        add_object(image, ObjectInput.partition(b"x", F.FSType.SQUASH, F.PartType.PRIMSYS, "386"))
    with pytest.raises(ImageError, match="not the last object"):
        delete_object(image, 1, compact=True)
    with pytest.raises(SifpyError, match="no object with id 9"):
        delete_object(image, 9)
    set_primary(image, 2)  # already primary: a no-op that doesn't rewrite the file
    assert snapshot(image.parent) == before
    assert image.stat().st_ino == ino


def test_mode_is_kept(image: Path) -> None:
    image.chmod(0o640)
    add_object(image, ObjectInput(F.DataType.GENERIC, b"x"))
    assert image.stat().st_mode & 0o7777 == 0o640


def test_file_size_limit_acts_as_full_disk(image: Path) -> None:
    """RLIMIT_FSIZE makes the write fail with EFBIG half-way, like ENOSPC would."""
    before = snapshot(image.parent)
    big = image.parent / "big.bin"
    big.write_bytes(b"b" * 200_000)
    before = snapshot(image.parent)

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    r = subprocess.run(
        [sys.executable, "-m", "sifpy", "sif", "add", "--datatype", "7", str(image), str(big)],
        capture_output=True, text=True, preexec_fn=limit, check=False,
    )  # fmt: skip
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith("error: can't write SIF: ") and "File too large" in r.stderr
    assert snapshot(image.parent) == before


def test_full_tmpfs(tmp_path: Path) -> None:
    """A real full filesystem (a small tmpfs, mounted as root)."""
    require(None if os.geteuid() == 0 else "mounting a small tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], check=True)
    try:
        p = mnt / "img.sif"
        create(p, [ObjectInput(F.DataType.GENERIC, b"g" * 60_000)])
        before = snapshot(mnt)
        with pytest.raises(ImageError, match="No space left on device"):
            add_object(p, ObjectInput(F.DataType.GENERIC, b"h" * 200_000))
        assert snapshot(mnt) == before
        with pytest.raises(ImageError, match="No space left on device"):
            create(mnt / "new.sif", [ObjectInput(F.DataType.GENERIC, b"i" * 300_000)])
        assert snapshot(mnt) == before
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_sigkill_during_add_leaves_image_intact(image: Path) -> None:
    before = snapshot(image.parent)
    proc = subprocess.Popen(
        [sys.executable, "-m", "sifpy", "sif", "add", "--datatype", "7", str(image), "-"],
        stdin=subprocess.PIPE,
    )
    assert proc.stdin is not None
    proc.stdin.write(b"z" * (4 << 20))  # the add is now half-way through a stream
    proc.stdin.flush()
    time.sleep(0.3)
    proc.kill()
    proc.wait()
    assert snapshot(image.parent) == before
    with SifImage.open(image) as img:
        assert [d.id for d in img.descriptors] == [1, 2, 3]


def test_sigkill_during_create_leaves_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "new.sif"
    proc = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from sifpy.sif import create, ObjectInput;"
         f"create({str(dest)!r}, [ObjectInput(0x4007, sys.stdin.buffer)])"],
        stdin=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdin is not None
    proc.stdin.write(b"z" * (4 << 20))
    proc.stdin.flush()
    time.sleep(0.3)
    proc.kill()
    proc.wait()
    assert list(tmp_path.iterdir()) == []

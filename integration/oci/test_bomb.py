"""Decompression bombs: a small gzip layer that expands far beyond its size.

The layer (a tar of one file of zeros, streamed through gzip: ~1000:1) is served by the real
registry and read from an OCI layout by ``Bootstrap: oci``. With a small
``SIFPY_MAX_UNPACKED``, every path that reads layers (the streaming pull into tar2sqfs, the
unpack path, a build) stops at the cap with one clear error, and leaves nothing: no output,
no SIF in the cache, no work directory. On a nearly full file system, the unpack stops
before the reserve is used."""

from __future__ import annotations

import gzip
import hashlib
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import IO

import pytest

from integration.oci.conftest import Registry, SifpyEnv, skopeo_push
from integration.oci.helpers import finish_oci_layout, oci_blob
from tests.conftest import need_tool, require

BOMB_MIB = 300  # expanded: a few hundred MiB from a few hundred KiB
CAP = "64M"


class _Zeros(IO[bytes]):
    def __init__(self, size: int) -> None:
        self.left = size

    def read(self, n: int = -1) -> bytes:  # type: ignore[override]
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return bytes(n)


class _Tee:
    """Hash what the tar writes (the layer's diff_id) on its way into gzip."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out, self.sha = out, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        return self.out.write(data)


def make_bomb_layout(layout: Path, tag: str, mib: int) -> int:
    """An OCI layout whose one layer is a gzip of a tar holding ``mib`` MiB of zeros;
    returns the layer's compressed size."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    raw = layout / "layer.tar.gz"
    with open(raw, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", compresslevel=9) as gz:
        tee = _Tee(gz)  # type: ignore[arg-type]
        with tarfile.open(fileobj=tee, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
            info = tarfile.TarInfo("zeros")
            info.size = mib << 20
            tar.addfile(info, _Zeros(info.size))
    layer = oci_blob(layout, raw.read_bytes())
    raw.unlink()
    finish_oci_layout(layout, layer, f"sha256:{tee.sha.hexdigest()}", tag)
    return int(layer["size"])  # type: ignore[call-overload]


@pytest.fixture(scope="module")
def bomb_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    layout = tmp_path_factory.mktemp("bomb") / "layout"
    size = make_bomb_layout(layout, "1", BOMB_MIB)
    assert size < 2 << 20  # small on the wire, BOMB_MIB MiB unpacked
    return layout


@pytest.fixture(scope="module")
def bomb_ref(registry: Registry, bomb_layout: Path) -> str:
    skopeo_push(bomb_layout, "1", f"{registry.host}/test/bomb:1")
    return f"docker://{registry.host}/test/bomb:1"


def _assert_refused(proc: subprocess.CompletedProcess[str], phrase: str) -> None:
    assert proc.returncode != 0, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith(("error:", "hint:"))]
    assert lines and lines[0].startswith("error: ") and phrase in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def _cached_sifs(cache: Path) -> list[Path]:
    return list((cache / "sif").rglob("*.sif")) if (cache / "sif").exists() else []


@pytest.mark.parametrize("mode", ["stream", "stream-after-download", "unpack"])
def test_pull_of_a_bomb_stops_at_the_cap(
    bomb_ref: str, sifpy: SifpyEnv, tmp_path: Path, mode: str
) -> None:
    """The pull reads the layer only up to the cap (which also bounds its CPU time), fails
    with one error naming the setting, and leaves no output, no cached SIF, no work dir."""
    if mode.startswith("stream"):
        need_tool("tar2sqfs")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    proc = sifpy.run(
        "pull", "--insecure", out_dir / "bomb.sif", bomb_ref, check=False,
        SIFPY_MAX_UNPACKED=CAP, SIFPY_TMPDIR=str(work),
        SIFPY_PULL_STREAM="0" if mode == "unpack" else "1",
        SIFPY_PULL_OVERLAP="1" if mode == "stream" else "0",
    )  # fmt: skip
    _assert_refused(proc, "more than 64.0 MiB uncompressed (SIFPY_MAX_UNPACKED)")
    assert list(out_dir.iterdir()) == [] and list(work.iterdir()) == []
    assert _cached_sifs(sifpy.cache) == []


def test_pull_under_the_cap_succeeds(bomb_ref: str, sifpy: SifpyEnv, tmp_path: Path) -> None:
    """The same image with a cap above its size pulls: the cap is what refused it."""
    need_tool("tar2sqfs")
    out = tmp_path / "bomb.sif"
    sifpy.run("pull", "--insecure", out, bomb_ref, SIFPY_MAX_UNPACKED=f"{BOMB_MIB + 10}M")
    assert out.stat().st_size < 4 << 20


def test_build_from_a_bomb_layout_stops_at_the_cap(
    bomb_layout: Path, sifpy: SifpyEnv, tmp_path: Path
) -> None:
    """``Bootstrap: oci`` unpacks the layer into the build's rootfs: stopped at the cap,
    nothing at the destination, no work directory left."""
    deffile = tmp_path / "bomb.def"
    deffile.write_text(f"Bootstrap: oci\nFrom: {bomb_layout}:1\n\n%post\n    true\n")
    work = tmp_path / "work"
    work.mkdir()
    out = tmp_path / "out" / "bomb.sif"
    out.parent.mkdir()
    proc = sifpy.run("build", "--tmpdir", work, out, deffile, check=False, SIFPY_MAX_UNPACKED=CAP)
    _assert_refused(proc, "more than 64.0 MiB uncompressed (SIFPY_MAX_UNPACKED)")
    assert list(out.parent.iterdir()) == [] and list(work.iterdir()) == []


def test_unpack_stops_before_the_disk_is_full(
    bomb_ref: str, sifpy: SifpyEnv, tmp_path: Path
) -> None:
    """No cap (the default 64 GiB), but the work directory is a 400 MiB file system (a
    tmpfs in a private mount namespace): the 300 MiB file would leave less than the 256 MiB
    reserve, so the unpack stops before writing it, with one error, and leaves nothing."""
    require(None if os.getuid() == 0 else "mounting a small tmpfs needs root (CI runs as root)")
    unshare = need_tool("unshare")
    work = tmp_path / "small"
    work.mkdir()
    out = tmp_path / "bomb.sif"
    script = (
        'mount -t tmpfs -o size=400M sifpy-small "$1" && shift && "$@"; rc=$?; '
        'ls -A "$SIFPY_TMPDIR"; exit $rc'
    )
    env = sifpy.env(SIFPY_TMPDIR=str(work), SIFPY_PULL_STREAM="0")
    proc = subprocess.run(
        [unshare, "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(work),
         sys.executable, "-m", "sifpy", "pull", "--insecure", str(out),
         bomb_ref],
        capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=300,
    )  # fmt: skip
    _assert_refused(proc, "must stay free")
    assert proc.stdout == ""  # nothing left in the work directory
    assert not out.exists() and _cached_sifs(sifpy.cache) == []

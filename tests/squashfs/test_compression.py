"""Compression choice: NAME[:LEVEL], the zstd:3 default, and that both packers (mksquashfs
for the unpack path, tar2sqfs for streaming) record what was asked for."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import pytest

from sifpy.errors import UsageError
from sifpy.rootfs import stream
from sifpy.squashfs import pack
from sifpy.squashfs.pack import compression_args, default_compression, parse_compression
from tests.rootfs.tars import layer, reg

from ..conftest import need_tool


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("zstd", ("zstd", None)),
        ("zstd:3", ("zstd", 3)),
        ("gzip:9", ("gzip", 9)),
        ("xz", ("xz", None)),
    ],
)
def test_parse(spec: str, expected: tuple[str, int | None]) -> None:
    assert parse_compression(spec) == expected


@pytest.mark.parametrize("bad", ["zip", "zstd:0", "zstd:23", "gzip:10", "xz:3", "zstd:", "zstd:x"])
def test_parse_refuses(bad: str) -> None:
    with pytest.raises(UsageError):
        parse_compression(bad)


def test_arguments_for_each_tool() -> None:
    assert compression_args("zstd:3") == ["-comp", "zstd", "-Xcompression-level", "3"]
    assert compression_args("zstd:3", "tar2sqfs") == ["--compressor", "zstd", "-X", "level=3"]
    assert compression_args("lz4", "tar2sqfs") == ["--compressor", "lz4"]


def test_default_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SIFPY_COMPRESSION", raising=False)
    assert default_compression() == "zstd:3"
    monkeypatch.setenv("SIFPY_COMPRESSION", "gzip:6")
    assert default_compression() == "gzip:6"


def superblock(sqfs: Path) -> str:
    unsquashfs = need_tool("unsquashfs")
    return subprocess.run([unsquashfs, "-s", str(sqfs)], capture_output=True, text=True).stdout


def test_mksquashfs_default_is_zstd_level_3(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    need_tool("mksquashfs")
    monkeypatch.delenv("SIFPY_COMPRESSION", raising=False)
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "f").write_bytes(b"x" * 100_000)
    pack(tmp_path / "root", tmp_path / "a.sqfs")
    info = superblock(tmp_path / "a.sqfs")
    assert "Compression zstd" in info and "compression-level 3" in info
    pack(tmp_path / "root", tmp_path / "b.sqfs", compression="gzip:6")
    info = superblock(tmp_path / "b.sqfs")
    assert "Compression gzip" in info and "compression-level 6" in info


def test_stream_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    need_tool("tar2sqfs")
    blob = io.BytesIO(layer(reg("f", b"y" * 100_000)))
    monkeypatch.delenv("SIFPY_COMPRESSION", raising=False)
    stream.layers_to_squashfs([blob], tmp_path / "a.sqfs")
    info = superblock(tmp_path / "a.sqfs")
    assert "Compression zstd" in info and "compression-level 3" in info
    monkeypatch.setenv("SIFPY_COMPRESSION", "gzip:4")
    blob.seek(0)
    stream.layers_to_squashfs([blob], tmp_path / "b.sqfs")
    info = superblock(tmp_path / "b.sqfs")
    assert "Compression gzip" in info and "compression-level 4" in info


@pytest.mark.parametrize(
    ("cpus", "spec", "jobs"),
    [(2, "zstd:3", 1), (2, "zstd:15", 2), (2, "zstd", 2), (2, "lz4", 1), (8, "zstd:3", 2),
     (8, "zstd:15", 8), (8, "xz", 8), (1, "zstd:3", 1)],
)  # fmt: skip
def test_tar2sqfs_threads(monkeypatch: pytest.MonkeyPatch, cpus: int, spec: str, jobs: int) -> None:
    """A fast compressor gets one or two threads (more only slow its feeders), a slow one
    every CPU."""
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(cpus)))
    assert stream._jobs(spec) == jobs

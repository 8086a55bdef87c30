"""Open a layer blob as a plain tar stream, telling gzip and zstd apart by magic bytes.

Media types lie often enough (Docker v2 layers are gzip whatever the name says) that
the bytes decide, as containerd's ``compression.DecompressStream`` does.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib
import io
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from typing import BinaryIO, cast

from sifpy.errors import RootfsError

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
COMPRESSIONS = ("auto", "gzip", "zstd", "none")


class _Prefixed(io.RawIOBase):
    """The bytes already read to sniff the magic, then the rest of the stream."""

    def __init__(self, head: bytes, rest: BinaryIO) -> None:
        self._head = head
        self._rest = rest

    def readable(self) -> bool:
        return True

    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        if self._head:
            n = min(len(buf), len(self._head))
            buf[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._rest.read(len(buf))
        buf[: len(data)] = data
        return len(data)


def detect(head: bytes) -> str:
    """The compression named by the first bytes of a blob: gzip, zstd or none."""
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return "none"


@contextlib.contextmanager
def open_tar_stream(
    layer: str | os.PathLike[str] | BinaryIO, compression: str
) -> Iterator[BinaryIO]:
    """Yield the uncompressed tar bytes of ``layer`` (a path or a binary stream)."""
    if compression not in COMPRESSIONS:
        raise RootfsError(
            f"can't apply layer: unknown compression: {compression}",
            f"use one of: {', '.join(COMPRESSIONS)}",
        )
    with contextlib.ExitStack() as stack:
        if isinstance(layer, str | os.PathLike):
            raw: BinaryIO = stack.enter_context(open(layer, "rb"))
        else:
            raw = layer
        head = raw.read(len(ZSTD_MAGIC))
        if compression == "auto":
            compression = detect(head)
        stream = cast(BinaryIO, io.BufferedReader(_Prefixed(head, raw), 1 << 20))
        gzip_exe = gunzip_program() if isinstance(layer, str | os.PathLike) else None
        if compression == "gzip" and gzip_exe:
            yield stack.enter_context(gunzip_process(gzip_exe, layer))  # type: ignore[arg-type]
        elif compression == "gzip":
            yield cast(BinaryIO, stack.enter_context(gzip.GzipFile(fileobj=stream, mode="rb")))
        elif compression == "zstd":
            yield stack.enter_context(_zstd_reader(stream))
        else:
            yield stream


def grow_pipe(fd: int, size: int = 1 << 20) -> None:
    """Let a pipe hold ``size`` bytes (F_SETPIPE_SZ; 64 KiB by default), so that the two
    processes on its ends run side by side instead of in lockstep. Best effort."""
    import fcntl

    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), size)


def gunzip_program() -> str | None:
    """The host's pigz (preferred, as containerd does: zlib's inflate takes 2/3 of gzip's
    time) or gzip, for :func:`gunzip_process`."""
    return shutil.which("pigz") or shutil.which("gzip")


@contextlib.contextmanager
def gunzip_process(exe: str, source: str | os.PathLike[str] | int) -> Iterator[BinaryIO]:
    """Decompress a gzip file (a path), or what arrives on a pipe (an fd, which the
    process inherits as its stdin; the caller closes its copy), with the host's ``pigz -dc``
    or ``gzip -dc`` in its own process, on another CPU, while we parse the tar."""
    with tempfile.TemporaryFile() as err:
        if isinstance(source, int):
            argv, stdin = [exe, "-dc"], source
        else:
            argv, stdin = [exe, "-dc", "--", os.fspath(source)], subprocess.DEVNULL
        proc = subprocess.Popen(
            argv,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=err,
            bufsize=1 << 16,
        )
        assert proc.stdout is not None
        grow_pipe(proc.stdout.fileno())
        try:
            yield cast(BinaryIO, proc.stdout)
        finally:
            proc.stdout.close()
            rc = proc.wait()
        # 2: a warning (trailing zeros); -13: SIGPIPE, we stopped reading (tar said enough).
        if rc not in (0, 2, -13):
            err.seek(0)
            text = err.read().decode(errors="replace").strip()
            raise RootfsError(f"can't apply layer: gzip failed: {text[-500:]}")


@contextlib.contextmanager
def _zstd_reader(stream: BinaryIO) -> Iterator[BinaryIO]:
    """zstd through the ``zstandard`` module when present, else the ``zstd`` binary."""
    try:
        zstandard = importlib.import_module("zstandard")
    except ImportError:
        pass
    else:
        # read_across_frames: a layer may be several concatenated frames.
        reader = zstandard.ZstdDecompressor().stream_reader(stream, read_across_frames=True)
        with reader:
            yield reader
        return
    exe = shutil.which("zstd")
    if exe is None:
        raise RootfsError(
            "can't apply layer: zstd-compressed and no zstd decoder found",
            "install the zstandard Python module or the zstd program",
        )
    # The host's zstd from the host PATH, never a program from the image (CVE-2014-9357).
    proc = subprocess.Popen(
        [exe, "-dc"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdin is not None and proc.stdout is not None

    def feed() -> None:
        assert proc.stdin is not None
        # BrokenPipe: the tar reader stopped early or zstd failed; wait() reports which.
        with contextlib.suppress(BrokenPipeError), proc.stdin:
            shutil.copyfileobj(stream, proc.stdin, 1 << 20)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        yield cast(BinaryIO, proc.stdout)
    finally:
        proc.stdout.close()
        feeder.join()
        rc = proc.wait()
        err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
    if rc not in (0, -13):  # -13: SIGPIPE because we stopped reading; tar said enough
        raise RootfsError(f"can't apply layer: zstd failed: {err[-500:]}")

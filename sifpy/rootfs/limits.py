"""How much a layer may unpack to: a cap on the bytes, and the disk's free space.

A layer is compressed, so its size says little: a 1 MiB gzip of zeros expands to 1 GiB (a
decompression bomb). Whatever unpacks layers (:mod:`sifpy.rootfs.unpack` onto a directory,
:mod:`sifpy.rootfs.stream` into tar2sqfs) counts the uncompressed tar bytes of every layer of
an image in one :class:`Budget` as it reads them, and stops with a :class:`RootfsError`:

- past ``$SIFPY_MAX_UNPACKED`` (default 64 GiB; ``K``, ``M``, ``G``, ``T`` suffixes,
  ``0`` for no cap) in all: this also bounds the CPU time a pull or build spends
  decompressing, since reading stops there (the decompressor gets SIGPIPE);
- when the file system written to would keep less than :func:`reserve` free (5% of it, at
  least 256 MiB): checked every :data:`CHECK_EVERY` bytes and before any larger file, so
  the disk is never filled (containerd and Docker have no such check and fail with ENOSPC
  in the middle of a layer, leaving the partial snapshot behind).

Where the files land one to one (a rootfs directory) the next file's size must fit too;
for a squashfs being written (compressed) only the reserve is checked.
"""

from __future__ import annotations

import os
import re
import threading

from sifpy import config
from sifpy.errors import RootfsError, UsageError

DEFAULT_MAX_UNPACKED = 64 << 30
MIN_RESERVE = 256 << 20
RESERVE_FRACTION = 0.05
CHECK_EVERY = 16 << 20
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """``123``, ``500M``, ``64G``, ``1.5TiB``: bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text, re.IGNORECASE)
    if m is None:
        raise UsageError(
            f"invalid size: {text!r}", hint="use a number of bytes with K, M, G or T (64G)"
        )
    return int(float(m[1]) * _UNITS[m[2].lower()])


def max_unpacked() -> int | None:
    """``$SIFPY_MAX_UNPACKED`` in bytes (None: no cap), else :data:`DEFAULT_MAX_UNPACKED`."""
    text = (config.get("SIFPY_MAX_UNPACKED") or "").strip()
    if not text:
        return DEFAULT_MAX_UNPACKED
    try:
        size = parse_size(text)
    except UsageError as exc:
        raise UsageError(f"SIFPY_MAX_UNPACKED: {exc.message}", exc.hint) from None
    return size or None


def reserve(total: int) -> int:
    """The free space to keep on a file system of ``total`` bytes."""
    return max(int(total * RESERVE_FRACTION), MIN_RESERVE)


def human(n: int) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


class Budget:
    """The uncompressed bytes of one image's layers, against the cap and the free space of
    the file system holding ``where`` (a directory). ``expands``: the files land there one
    to one (a rootfs), so the next one's size must fit too. Thread-safe (the stream path
    indexes layers in parallel)."""

    def __init__(self, where: str | os.PathLike[str], expands: bool = True) -> None:
        self.where = os.fspath(where)
        self.expands = expands
        self.cap = max_unpacked()
        self.total = 0
        self._unchecked = CHECK_EVERY  # check at the first entry
        self._lock = threading.Lock()

    def add(self, size: int, label: str) -> None:
        """Count ``size`` more bytes of ``label`` (a layer), about to be read or written."""
        with self._lock:
            self.total += size
            self._unchecked += size
            total, check = self.total, self._unchecked >= CHECK_EVERY
            if check:
                self._unchecked = 0
        if self.cap is not None and total > self.cap:
            raise RootfsError(
                f"can't unpack: {label}: more than {human(self.cap)} uncompressed "
                "(SIFPY_MAX_UNPACKED)",
                "the image is larger than allowed, or a decompression bomb; if you trust "
                "it, raise the cap, e.g. SIFPY_MAX_UNPACKED=200G",
            )
        if check:
            self.check_space(size if self.expands else 0, label)

    def check_space(self, upcoming: int, label: str) -> None:
        """Fail unless ``upcoming`` more bytes leave the :func:`reserve` free."""
        st = os.statvfs(self.where)
        free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
        keep = reserve(total)
        if free - upcoming < keep:
            raise RootfsError(
                f"can't unpack: {label}: {self.where}: {human(free)} free, and "
                f"{human(keep)} must stay free",
                "free space there, or work on a larger file system (SIFPY_TMPDIR for "
                "pulls, --tmpdir for builds)",
            )

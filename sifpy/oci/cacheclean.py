"""Cleaning the cache: ``sifpy cache clean`` (by type and age), ``verify`` (re-hash every
blob) and the bytes it uses."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

from sifpy.oci.cachedir import CacheDir, file_digest

# What `sifpy cache clean --type` names (Apptainer's names where they mean the same): the
# layers and configs, the SIFs made from them, or all of it.
CLEAN_TYPES: dict[str, tuple[str, ...]] = {
    "blob": ("blobs",),
    "oci": ("sif",),
    "sif": ("sif",),
    "all": ("blobs", "sif", "index", "locks"),
}


class CacheClean(CacheDir):
    """What ``sifpy cache clean`` asks of the cache directory."""

    def verify(self) -> list[str]:
        """Re-hash every blob; remove and return the digests of bad ones."""
        bad: list[str] = []
        if not self.blobs.is_dir():
            return bad
        for p in sorted(self.blobs.iterdir()):
            if p.name.startswith("."):
                continue
            digest = f"sha256:{p.name}"
            if file_digest(p) != digest:
                bad.append(digest)
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
        return bad

    def usage(self) -> int:
        """Bytes used by the cache."""
        total = 0
        for dirpath, _, files in os.walk(self.root):
            for name in files:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(dirpath, name)).st_size
        return total

    def clean(
        self,
        older_than: float | None = None,
        types: Iterable[str] = ("all",),
        dry_run: bool = False,
    ) -> int:
        """Remove everything of ``types`` (or only files not modified for ``older_than``
        seconds); return the bytes freed (with ``dry_run``, that would be freed)."""
        if not self.root.is_dir():
            return 0
        subs = {sub for t in types for sub in CLEAN_TYPES[t]}
        freed = 0
        now = time.time()
        for sub in ("blobs", "sif", "index", "locks"):
            if sub not in subs:
                continue
            top = self.root / sub
            if older_than is None:
                freed += _tree_size(top)
                if not dry_run:
                    shutil.rmtree(top, ignore_errors=True)
                continue
            for dirpath, _, files in os.walk(top):
                for name in files:
                    p = os.path.join(dirpath, name)
                    with contextlib.suppress(OSError):
                        st = os.lstat(p)
                        if now - st.st_mtime > older_than:
                            if not dry_run:
                                os.unlink(p)
                            freed += st.st_size
        return freed


def _tree_size(top: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(top):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total

"""The content-addressed cache: layer and config blobs, pulled SIFs, and an index.

Layout under :func:`default_root` (``$SIFPY_CACHEDIR``, else ``$XDG_CACHE_HOME/sifpy``,
else ``~/.cache/sifpy``), every directory 0700 (CVE-2019-19724)::

    blobs/sha256/<hex>          verified blobs, named by their digest
    blobs/sha256/.tmp-<hex>-*   downloads in progress (never read by anyone)
    sif/sha256/<hex>.sif        SIFs built from the image manifest <hex>
    sif/sha256/<hex>.sif.json   what was written there: sha256, size, inode, mtime, ctime
    index/<key>.json            one entry per pulled reference (for `cache list`)
    locks/<hex>.lock            advisory per-digest locks

Rules:

* A final name only ever appears by ``rename`` of a temporary file in the same directory,
  after the bytes were hashed while written, checked against the digest and size, and
  fsynced; a killed download leaves a ``.tmp-`` file, never a half blob under a final name
  (apptainer/singularity#331). The directory is fsynced after the rename.
* Several processes may fill the cache at once (apptainer/singularity#3634). A per-digest
  ``flock`` keeps them from downloading the same blob twice, but correctness does not rely
  on it (flock may be a no-op on NFS): losing a rename race is harmless because both
  contents are identical and verified.
* Reuse is verified: a cached blob is used only if its size matches and its sha256 is
  re-computed and matches (the cost is one read, which also warms the page cache for the
  unpack that follows). A corrupt blob is removed and fetched again.
* Only a cache nobody else can change is used (pip and containers/storage refuse the
  same): the root and every directory in it must be owned by the caller and not group or
  world writable, and the root's parent must not let others rename it away (owned by the
  caller or root, not writable by others unless sticky). Else another user could plant
  ``sif/sha256/<digest>.sif`` and ``pull`` would hand it out as that image.

The parts: :mod:`sifpy.oci.cachedir` (the directory, its checks, locks and commits),
:mod:`sifpy.oci.sifcache` (the cached SIFs and their records), :mod:`sifpy.oci.cacheclean`
(clean, verify, usage); here the blobs, the index, and a pull's output.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

from sifpy.errors import RegistryError, UsageError
from sifpy.oci.cacheclean import CacheClean
from sifpy.oci.cachedir import file_digest
from sifpy.oci.reference import digest_hex
from sifpy.oci.sifcache import SifCache


@dataclass(frozen=True)
class IndexEntry:
    """One pulled reference, as ``sifpy cache list`` shows it."""

    repository: str
    tag: str
    digest: str
    created: float
    size: int
    platform: str = ""


class _HashingWriter:
    """A file wrapper that hashes what is written; ``truncate()`` to 0 restarts the hash."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.hasher = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hasher.update(data)
        self.size += len(data)
        return self._f.write(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def truncate(self, size: int | None = None) -> int:
        if size not in (None, 0) or self._f.tell() != 0:
            raise ValueError("only a full restart (seek(0), truncate()) is supported")
        self.hasher = hashlib.sha256()
        self.size = 0
        return self._f.truncate(0)

    def flush(self) -> None:
        self._f.flush()

    def tell(self) -> int:
        return self._f.tell()


class Cache(SifCache, CacheClean):
    """A cache rooted at ``root`` (default :func:`sifpy.oci.cachedir.default_root`): blobs and
    the index here, SIFs from :class:`~sifpy.oci.sifcache.SifCache`, cleaning from
    :class:`~sifpy.oci.cacheclean.CacheClean`."""

    # --- blobs ----------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        """Where the blob ``digest`` lives (the digest is validated first)."""
        return self.blobs / digest_hex(digest)

    def has_blob(self, digest: str, size: int, verify: bool = True) -> bool:
        """Whether a good copy of the blob is cached; a bad copy is removed."""
        self._mkdirs()
        path = self.blob_path(digest)
        try:
            st = path.stat()
        except FileNotFoundError:
            return False
        if st.st_size == size and (not verify or file_digest(path) == digest):
            return True
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return False

    def ensure_blob(
        self, digest: str, size: int, fetch: Callable[[BinaryIO], None]
    ) -> tuple[Path, bool]:
        """Return the path of a verified copy of the blob, calling ``fetch(file)`` to
        download it if needed; the second value says whether it was already cached.

        ``fetch`` writes the blob into the file it is given (it may ``seek(0)`` and
        ``truncate()`` to restart). What it wrote is hashed here again before it gets its
        final name, so the cache holds only verified bytes whatever ``fetch`` does.
        """
        final = self.blob_path(digest)
        if self.has_blob(digest, size):
            return final, True
        with self.lock(digest):
            # Another process may have finished it while we waited.
            if self.has_blob(digest, size):
                return final, True
            fd, name = tempfile.mkstemp(prefix=f".tmp-{digest_hex(digest)}-", dir=self.blobs)
            tmp = Path(name)
            try:
                with os.fdopen(fd, "wb") as f:
                    w = _HashingWriter(f)
                    fetch(w)  # type: ignore[arg-type]
                    f.flush()
                    actual = "sha256:" + w.hasher.hexdigest()
                    if w.size != size or actual != digest:
                        raise RegistryError(
                            f"can't cache blob {digest}: digest mismatch (got {actual}, "
                            f"{w.size} bytes)"
                        )
                    os.fsync(f.fileno())
                os.chmod(tmp, 0o600)
                self._commit(tmp, final)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                raise
        return final, False

    # --- index ----------------------------------------------------------------------

    def record(self, entry: IndexEntry) -> None:
        """Add or replace the index entry for ``entry.repository:entry.tag``."""
        self._mkdirs()
        key = hashlib.sha256(
            f"{entry.repository}\0{entry.tag}\0{entry.platform}".encode()
        ).hexdigest()
        fd, name = tempfile.mkstemp(prefix=".tmp-", dir=self.index)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(asdict(entry), f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(name, self.index / f"{key}.json")
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)
            raise

    def entries(self) -> list[IndexEntry]:
        """The index, newest first; unreadable entries are skipped."""
        out: list[IndexEntry] = []
        if not self.index.is_dir():
            return out
        for p in self.index.glob("*.json"):
            try:
                data = json.loads(p.read_bytes()[: 1 << 16])
                out.append(IndexEntry(**data))
            except (OSError, ValueError, TypeError):
                continue
        return sorted(out, key=lambda e: e.created, reverse=True)


def copy_file(src: Path, dst: Path) -> None:
    """Copy ``src`` over ``dst`` (a reflink where the filesystem can, else kernel-side),
    fsynced."""
    from sifpy.sif.atomic import clone

    with open(src, "rb") as fi, open(dst, "wb") as fo:
        clone(fi.fileno(), fo.fileno())
        os.fsync(fo.fileno())


def install_copy(src: Path, out: Path) -> None:
    """Copy ``src`` to ``out`` atomically (temp in the same directory, fsync, rename)."""
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent or Path("."))
    os.close(fd)
    try:
        copy_file(src, Path(name))
        os.chmod(name, 0o755)
        os.replace(name, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
        raise


def output_path(out: str | os.PathLike[str], force: bool) -> Path:
    """The file a pull writes: refused when it exists (unless ``force``) or has no directory."""
    out_path = Path(out)
    if out_path.exists() and not force:
        raise UsageError(f"can't pull: {out_path}: file exists", "use --force to overwrite it")
    if not out_path.parent.is_dir() and str(out_path.parent) != "":
        raise UsageError(f"can't pull: {out_path.parent}: no such directory")
    return out_path

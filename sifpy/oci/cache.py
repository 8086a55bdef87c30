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
* A cached SIF is named by the manifest it was built from, not by its own bytes, so its
  sha256, size and identity (device, inode, mtime, ctime) are recorded next to it when it
  is written. It is handed out only if it is a regular file of the caller's and its
  ``fstat`` still matches the record: the ctime can't be set by an unprivileged process and
  changes with every write, truncation, chmod or rename, so a match means the bytes are the
  ones recorded, for the cost of one ``fstat``. When the identity differs (the cache was
  copied, or restored) the sha256 is re-computed instead; a SIF without a record or with
  other bytes is removed and built again.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

from sifpy import config
from sifpy.errors import CacheError, RegistryError, UsageError
from sifpy.oci.reference import digest_hex
from sifpy.util import log

HASH_CHUNK = 1 << 20


# What `sifpy cache clean --type` names (Apptainer's names where they mean the same): the
# layers and configs, the SIFs made from them, or all of it.
CLEAN_TYPES: dict[str, tuple[str, ...]] = {
    "blob": ("blobs",),
    "oci": ("sif",),
    "sif": ("sif",),
    "all": ("blobs", "sif", "index", "locks"),
}


def default_root() -> Path:
    """Where the cache lives, from the environment."""
    if d := config.get("SIFPY_CACHEDIR"):
        return Path(d)
    if x := os.environ.get("XDG_CACHE_HOME"):
        return Path(x) / "sifpy"
    return Path(os.environ.get("HOME") or Path.home()) / ".cache" / "sifpy"


def file_digest(path: Path) -> str:
    """``sha256:<hex>`` of a file's bytes."""
    with open(path, "rb") as f:
        return _fd_digest(f.fileno())


def _fd_digest(fd: int) -> str:
    h = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, HASH_CHUNK, offset):
        h.update(chunk)
        offset += len(chunk)
    return "sha256:" + h.hexdigest()


def _identity(st: os.stat_result) -> list[int]:
    """What changes whenever a file's bytes can have changed (see the module docs)."""
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _others_can_change(st: os.stat_result, uid: int, owners: tuple[int, ...]) -> str | None:
    """Why someone other than ``uid`` may change what ``st`` describes, or None."""
    if st.st_uid not in owners:
        return f"owned by uid {st.st_uid}, not by you (uid {uid})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"writable by other users (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


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


class Cache:
    """A cache rooted at ``root`` (default :func:`default_root`)."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()
        self.blobs = self.root / "blobs" / "sha256"
        self.sifs = self.root / "sif" / "sha256"
        self.index = self.root / "index"
        self.locks = self.root / "locks"
        self._checked = False

    def _mkdirs(self) -> None:
        """Create the cache (our own dirs 0700) and refuse one that others can change,
        each directory checked before anything is made or read in it."""
        if self._checked:
            return
        uid = os.geteuid()
        try:
            # The parents (e.g. a missing ~/.cache) get the usual mode.
            self.root.parent.mkdir(parents=True, exist_ok=True)
            parent = os.path.dirname(os.path.realpath(self.root))
            st = os.stat(parent)
            why = _others_can_change(st, uid, (uid, 0))
            if why and st.st_uid in (uid, 0) and st.st_mode & stat.S_ISVTX:
                why = None  # sticky (as /tmp): others can't rename what they don't own
            if why:
                self._refuse(parent, f"its parent directory is {why}")
            for d in (self.root, self.blobs.parent, self.blobs, self.sifs.parent, self.sifs,
                      self.index, self.locks):  # fmt: skip
                with contextlib.suppress(FileExistsError):
                    d.mkdir(mode=0o700)
                if why := _others_can_change(os.stat(d), uid, (uid,)):
                    self._refuse(d, why)
        except OSError as exc:
            raise CacheError(
                f"can't use cache: {exc.filename or self.root}: {exc.strerror}",
                hint=f"set SIFPY_CACHEDIR to a directory of yours (the cache is {self.root})",
            ) from exc
        self._checked = True

    def _refuse(self, path: str | os.PathLike[str], why: str) -> None:
        raise CacheError(
            f"can't use cache: {path}: {why}",
            hint="another user could plant images in it; use a directory only you can write "
            f"(chmod 0700 it, or set SIFPY_CACHEDIR to one; the cache is {self.root})",
        )

    # --- locks and atomic writes ------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, digest: str) -> Iterator[None]:
        """An exclusive advisory lock for one digest (best effort; see module docs)."""
        self._mkdirs()
        fd = os.open(self.locks / f"{digest_hex(digest)}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    @staticmethod
    def _commit(tmp: Path, final: Path) -> None:
        os.replace(tmp, final)
        dfd = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

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

    # --- SIFs ------------------------------------------------------------------------

    def sif_path(self, manifest_digest: str, variant: str = "") -> Path:
        """Where the SIF of an image manifest is cached; ``variant`` (e.g. the squashfs
        compression) tells apart SIFs made differently from the same image."""
        suffix = "".join(c if c.isalnum() else "-" for c in variant)
        return self.sifs / f"{digest_hex(manifest_digest)}{'-' + suffix if suffix else ''}.sif"

    def get_sif(self, manifest_digest: str, variant: str = "") -> Path | None:
        """The cached SIF for an image manifest, if there is one and its bytes are the
        ones recorded when it was written (else it is removed)."""
        self._mkdirs()
        path = self.sif_path(manifest_digest, variant)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError as exc:  # a symlink (ELOOP) or worse: never ours
            self._drop_sif(path, exc.strerror or "can't be opened")
            return None
        try:
            st = os.fstat(fd)
            why = None if stat.S_ISREG(st.st_mode) else "not a regular file"
            why = why or _others_can_change(st, os.geteuid(), (os.geteuid(),))
            record = None if why else self._sif_record(path)
            if why is None and record is None:
                why = "no record of what was written"
            if why is None and record is not None and record["identity"] != _identity(st):
                if record["size"] != st.st_size or _fd_digest(fd) != record["sha256"]:
                    why = "its bytes are not the ones written"
                else:  # the same bytes, another identity (a copied cache): note it
                    self._write_sif_record(path, record["sha256"], os.fstat(fd))
        finally:
            os.close(fd)
        if why:
            self._drop_sif(path, why)
            return None
        return path

    def _record_path(self, sif: Path) -> Path:
        return sif.with_name(sif.name + ".json")

    def _sif_record(self, sif: Path) -> dict[str, Any] | None:
        try:
            fd = os.open(self._record_path(sif), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or _others_can_change(
                st, os.geteuid(), (os.geteuid(),)
            ):
                return None
            try:
                data = json.loads(f.read(1 << 12))
            except ValueError:
                return None
        ok = isinstance(data, dict) and isinstance(data.get("sha256"), str)
        ok = ok and isinstance(data.get("size"), int) and isinstance(data.get("identity"), list)
        return data if ok else None

    def _write_sif_record(self, sif: Path, digest: str, st: os.stat_result) -> None:
        record = {"sha256": digest, "size": st.st_size, "identity": _identity(st)}
        fd, name = tempfile.mkstemp(prefix=".tmp-", dir=sif.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(name, self._record_path(sif))
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)
            raise

    def _drop_sif(self, sif: Path, why: str) -> None:
        log.warn(f"cached SIF {sif}: {why}; making it again")
        for p in (sif, self._record_path(sif)):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    def store_sif(
        self, manifest_digest: str, write: Callable[[Path], None], variant: str = ""
    ) -> Path:
        """Have ``write(path)`` make the cached SIF, then give it its name (atomically) and
        record its sha256 and identity beside it."""
        self._mkdirs()
        final = self.sif_path(manifest_digest, variant)
        fd, name = tempfile.mkstemp(prefix=".tmp-", dir=self.sifs)
        os.close(fd)
        tmp = Path(name)
        try:
            write(tmp)
            os.chmod(tmp, 0o600)
            with open(tmp, "rb") as f:
                digest = _fd_digest(f.fileno())  # just written: read from the page cache
                # No record means "not ours": a crash before the new one costs a rebuild.
                with contextlib.suppress(FileNotFoundError):
                    self._record_path(final).unlink()
                self._commit(tmp, final)
                # The identity after the rename (which changes the ctime), of this very
                # file even if a concurrent pull has replaced the name meanwhile.
                self._write_sif_record(final, digest, os.fstat(f.fileno()))
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        return final

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

    # --- maintenance ------------------------------------------------------------------

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


def copy_file(src: Path, dst: Path) -> None:
    """Copy ``src`` over ``dst`` (a reflink where the filesystem can, else kernel-side),
    fsynced."""
    from sifpy.sif.write import clone

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

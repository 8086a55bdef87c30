"""The cache's directory: where it is, the checks that nobody else can change it, per-digest
locks and atomic commits; what the blob, SIF and cleaning parts of :class:`sifpy.oci.cache.Cache`
build on (the layout and the rules: :mod:`sifpy.oci.cache`)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from sifpy import config
from sifpy.errors import CacheError
from sifpy.oci.reference import digest_hex

HASH_CHUNK = 1 << 20


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
        return fd_digest(f.fileno())


def fd_digest(fd: int) -> str:
    h = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, HASH_CHUNK, offset):
        h.update(chunk)
        offset += len(chunk)
    return "sha256:" + h.hexdigest()


def others_can_change(st: os.stat_result, uid: int, owners: tuple[int, ...]) -> str | None:
    """Why someone other than ``uid`` may change what ``st`` describes, or None."""
    if st.st_uid not in owners:
        return f"owned by uid {st.st_uid}, not by you (uid {uid})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"writable by other users (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


class CacheDir:
    """The cache directory rooted at ``root`` (default :func:`default_root`)."""

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
            why = others_can_change(st, uid, (uid, 0))
            if why and st.st_uid in (uid, 0) and st.st_mode & stat.S_ISVTX:
                why = None  # sticky (as /tmp): others can't rename what they don't own
            if why:
                self._refuse(parent, f"its parent directory is {why}")
            for d in (self.root, self.blobs.parent, self.blobs, self.sifs.parent, self.sifs,
                      self.index, self.locks):  # fmt: skip
                with contextlib.suppress(FileExistsError):
                    d.mkdir(mode=0o700)
                if why := others_can_change(os.stat(d), uid, (uid,)):
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

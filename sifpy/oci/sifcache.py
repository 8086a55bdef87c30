"""The cached SIFs, one per image manifest (and variant), with the record that says their
bytes are still the ones written.

A cached SIF is named by the manifest it was built from, not by its own bytes, so its
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
import json
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sifpy.oci.cachedir import CacheDir, fd_digest, others_can_change
from sifpy.oci.reference import digest_hex
from sifpy.util import log


def _identity(st: os.stat_result) -> list[int]:
    """What changes whenever a file's bytes can have changed (see the module docs)."""
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


class SifCache(CacheDir):
    """The ``sif/sha256`` part of the cache."""

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
            why = why or others_can_change(st, os.geteuid(), (os.geteuid(),))
            record = None if why else self._sif_record(path)
            if why is None and record is None:
                why = "no record of what was written"
            if why is None and record is not None and record["identity"] != _identity(st):
                if record["size"] != st.st_size or fd_digest(fd) != record["sha256"]:
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
            if not stat.S_ISREG(st.st_mode) or others_can_change(st, os.geteuid(), (os.geteuid(),)):
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
                digest = fd_digest(f.fileno())  # just written: read from the page cache
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

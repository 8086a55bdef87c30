"""The blob cache: atomic, verified, never holding wrong bytes."""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from pathlib import Path
from typing import BinaryIO

import pytest

from sifpy.errors import CacheError, RegistryError, UsageError
from sifpy.oci.cache import Cache, IndexEntry, copy_file
from sifpy.oci.cachedir import default_root

DATA = b"layer bytes " * 1000
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()


def writer(data: bytes) -> object:
    def fetch(out: BinaryIO) -> None:
        out.write(data[:10])
        out.seek(0)
        out.truncate()  # a restart, as after an unusable Range answer
        out.write(data)

    return fetch


def test_default_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SIFPY_CACHEDIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_root() == tmp_path / "xdg/sifpy"
    monkeypatch.setenv("SIFPY_CACHEDIR", str(tmp_path / "c"))
    assert default_root() == tmp_path / "c"


def test_ensure_blob_and_reuse(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    path, cached = cache.ensure_blob(DIGEST, len(DATA), writer(DATA))  # type: ignore[arg-type]
    assert not cached and path.read_bytes() == DATA
    assert path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "blobs").stat().st_mode & 0o777 == 0o700

    def boom(out: BinaryIO) -> None:
        raise AssertionError("must not download again")

    assert cache.ensure_blob(DIGEST, len(DATA), boom) == (path, True)
    # A corrupted cached blob is detected on reuse and replaced.
    path.write_bytes(b"X" + DATA[1:])
    assert cache.ensure_blob(DIGEST, len(DATA), writer(DATA))[1] is False  # type: ignore[arg-type]
    assert path.read_bytes() == DATA
    assert cache.verify() == []
    path.write_bytes(b"X" + DATA[1:])
    assert cache.verify() == [DIGEST] and not path.exists()


@pytest.mark.parametrize("bad", [b"wrong" + DATA[5:], DATA[:-1], DATA + b"!"])
def test_wrong_bytes_never_get_the_name(tmp_path: Path, bad: bytes) -> None:
    cache = Cache(tmp_path)
    with pytest.raises(RegistryError, match="digest mismatch"):
        cache.ensure_blob(DIGEST, len(DATA), writer(bad))  # type: ignore[arg-type]
    assert list(cache.blobs.iterdir()) == []


def test_failed_fetch_leaves_nothing(tmp_path: Path) -> None:
    cache = Cache(tmp_path)

    def fail(out: BinaryIO) -> None:
        out.write(DATA[:100])
        raise RegistryError("connection lost")

    with pytest.raises(RegistryError):
        cache.ensure_blob(DIGEST, len(DATA), fail)
    assert list(cache.blobs.iterdir()) == []


def test_bad_digest_never_becomes_a_path(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        Cache(tmp_path).blob_path("sha256:../../etc/passwd")


def test_threads_download_once(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    calls: list[int] = []

    def fetch(out: BinaryIO) -> None:
        calls.append(1)
        out.write(DATA)

    threads = [
        threading.Thread(target=cache.ensure_blob, args=(DIGEST, len(DATA), fetch))
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1


def test_index_and_clean(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    cache.record(IndexEntry("r/a", "1", DIGEST, 1.0, 10))
    cache.record(IndexEntry("r/a", "1", DIGEST, 2.0, 10))  # replaces
    cache.record(IndexEntry("r/b", "2", DIGEST, 3.0, 20))
    assert [(e.repository, e.created) for e in cache.entries()] == [("r/b", 3.0), ("r/a", 2.0)]
    cache.ensure_blob(DIGEST, len(DATA), writer(DATA))  # type: ignore[arg-type]
    sif = tmp_path / "x.sif"
    sif.write_bytes(b"sif")
    cache.store_sif(DIGEST, lambda tmp: copy_file(sif, tmp))
    assert cache.get_sif(DIGEST) is not None
    assert cache.get_sif(DIGEST, "zstd:15") is None  # made differently: another entry
    cache.store_sif(DIGEST, lambda tmp: copy_file(sif, tmp), "zstd:15")
    assert cache.get_sif(DIGEST, "zstd:15").name.endswith("-zstd-15.sif")  # type: ignore[union-attr]
    assert cache.clean(older_than=3600) == 0
    assert cache.clean() > len(DATA)
    assert cache.entries() == [] and cache.get_sif(DIGEST) is None


def test_cache_is_private_under_any_umask(tmp_path: Path) -> None:
    # CVE-2019-19724 class: every directory the cache makes is 0700 and every file 0600,
    # whatever the caller's umask.
    import os

    old = os.umask(0)
    try:
        cache = Cache(tmp_path / "c")
        path, _ = cache.ensure_blob(DIGEST, len(DATA), writer(DATA))  # type: ignore[arg-type]
    finally:
        os.umask(old)
    for dirpath, _dirnames, filenames in os.walk(tmp_path / "c"):
        assert os.stat(dirpath).st_mode & 0o777 == 0o700, dirpath
        for name in filenames:
            assert os.stat(os.path.join(dirpath, name)).st_mode & 0o077 == 0, name
    assert path.is_file()


# --- a cache others can change, and cached SIFs --------------------------------------

MANIFEST = "sha256:" + "ab" * 32
SIF_BYTES = b"SIF bytes " * 5000


def store(cache: Cache, data: bytes = SIF_BYTES) -> Path:
    return cache.store_sif(MANIFEST, lambda p: p.write_bytes(data))


@pytest.mark.parametrize("where", ["root", "sif/sha256", "blobs", "parent"])
def test_cache_others_can_write_is_refused(tmp_path: Path, where: str) -> None:
    """A group- or world-writable cache (or one whose parent lets others rename it away)
    is refused before anything in it is used: another user could have planted a SIF."""
    cache = Cache(tmp_path / "parent" / "cache")
    cache.root.mkdir(parents=True)
    store(cache)
    planted = cache.sif_path(MANIFEST)
    {"parent": cache.root.parent, "root": cache.root}.get(where, cache.root / where).chmod(0o777)
    for use in (
        lambda c: c.get_sif(MANIFEST),
        lambda c: store(c),
        lambda c: c.has_blob(DIGEST, len(DATA)),
        lambda c: c.ensure_blob(DIGEST, len(DATA), writer(DATA)),
    ):
        with pytest.raises(CacheError, match=r"^can't use cache: .*writable by other users") as e:
            use(Cache(cache.root))
        assert e.value.hint and "only you can write" in e.value.hint
    assert planted.read_bytes() == SIF_BYTES  # refused, and nothing touched
    # A sticky parent (as /tmp) is fine: others can't rename the cache away.
    if where == "parent":
        cache.root.parent.chmod(0o1777)
        assert Cache(cache.root).get_sif(MANIFEST) == planted


def test_cached_sif_is_handed_out_only_with_its_recorded_bytes(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "c")
    path = store(cache)
    assert Cache(cache.root).get_sif(MANIFEST) == path
    # Changed in place with the mtime put back: the ctime still tells, and the new bytes
    # are never handed out; the entry goes, to be built again.
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(100)
        f.write(b"X")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert Cache(cache.root).get_sif(MANIFEST) is None
    assert not path.exists() and not Path(f"{path}.json").exists()
    # A SIF with no record (planted, or from an older sifpy) is not handed out either.
    path.write_bytes(SIF_BYTES)
    assert Cache(cache.root).get_sif(MANIFEST) is None and not path.exists()
    # The same bytes under another identity (the cache was copied): re-hashed, accepted,
    # and the record follows, so the next look is one fstat again.
    store(cache)
    copy = tmp_path / "copy"
    shutil.copytree(cache.root, copy)
    assert Cache(copy).get_sif(MANIFEST) == Cache(copy).sif_path(MANIFEST)
    record = Path(f"{Cache(copy).sif_path(MANIFEST)}.json").read_text()
    assert Cache(copy).get_sif(MANIFEST) is not None
    assert Path(f"{Cache(copy).sif_path(MANIFEST)}.json").read_text() == record
    # A symlink in place of the SIF is never followed.
    target = tmp_path / "elsewhere.sif"
    target.write_bytes(SIF_BYTES)
    path = cache.sif_path(MANIFEST)
    path.unlink()
    path.symlink_to(target)
    assert Cache(cache.root).get_sif(MANIFEST) is None and target.exists()

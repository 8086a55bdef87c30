"""``docker://`` to SIF: resolve, download into the cache, merge, add metadata, pack.

The order is the data flow of the design notes: resolve the reference to one image
manifest (pinned by digest for the rest of the pull), fetch the layers in parallel into
the verified cache, merge them with Apptainer's metadata into one sanitised tar stream
packed by ``tar2sqfs`` (:mod:`sifpy.rootfs.stream`, no rootfs on disk) — or, without
tar2sqfs, apply them with :func:`sifpy.rootfs.apply_layers` into a private temporary
rootfs, write the metadata and pack it with ``mksquashfs`` — and write the SIF
atomically (the final name appears only when the image is complete). A SIF built from a
manifest digest is cached, so pulling the same image again copies it.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from sifpy import config
from sifpy.errors import CacheError, SifpyError, ToolError
from sifpy.oci.auth import lookup_credentials
from sifpy.oci.cache import Cache, IndexEntry, install_copy, output_path
from sifpy.oci.download import NoProgress, Progress, download
from sifpy.oci.manifests import Image
from sifpy.oci.reference import Platform, Reference
from sifpy.oci.registry import RegistryClient
from sifpy.oci.session import ClientOptions
from sifpy.rootfs import apply_layers, merge, stream
from sifpy.rootfs.compress import grow_pipe, gunzip_process, gunzip_program
from sifpy.rootfs.imageconfig import config_to_metadata
from sifpy.sif import ObjectInput, create
from sifpy.sif import format as F
from sifpy.squashfs.pack import (
    DEFAULT_COMPRESSION,
    compression_args,
    default_compression,
    parse_compression,
)
from sifpy.util import log
from sifpy.util.fs import rmtree
from sifpy.util.proc import DEVNULL, run


@dataclass(frozen=True)
class PullResult:
    """What a pull produced."""

    path: Path
    digest: str  # the image manifest's digest
    cached: bool  # the SIF came from the cache


class _Tee:
    """What the blob download writes to: the cache file, and a pipe to the decompressor.

    A restart of the download (``seek(0)``) voids what the pipe got: the pipe is closed
    and marked ``restarted``, and the download goes on into the cache file only. So it
    does when the reader went away (EPIPE), which is no fault of the download: the tar
    reader stops at the end-of-archive block, maybe before the blob's last bytes, and a
    reader that failed says so itself."""

    def __init__(self, out: BinaryIO, pipe_w: int) -> None:
        self.out = out
        self.pipe_w = pipe_w
        self.restarted = False

    def write(self, data: bytes) -> int:
        n = self.out.write(data)
        if self.pipe_w >= 0:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self.pipe_w, view) :]
            except OSError:
                self.close_pipe()
        return n

    def seek(self, offset: int, whence: int = 0) -> int:
        # Only a restart seeks. Whatever the reader made of the earlier bytes is void, even
        # if it finished before: those bytes may be the wrong ones that caused the restart.
        self.restarted = True
        self.close_pipe()
        return self.out.seek(offset, whence)

    def truncate(self, size: int | None = None) -> int:
        return self.out.truncate(size)

    def flush(self) -> None:
        self.out.flush()

    def close_pipe(self) -> None:
        if self.pipe_w >= 0:
            os.close(self.pipe_w)
            self.pipe_w = -1


def _can_overlap(image: Image, cache: Cache) -> bool:
    """One gzip layer, not in the cache, streaming on, a host gunzip: download and pack at
    once (``SIFPY_PULL_OVERLAP=0`` turns it off)."""
    if config.raw("SIFPY_PULL_OVERLAP") == "0" or len(image.layers) != 1:
        return False
    desc = image.layers[0]
    return (
        desc.media_type.endswith("gzip")
        and not desc.urls
        and not cache.has_blob(desc.digest, desc.size, verify=False)
        and use_streaming()
        and gunzip_program() is not None
    )


def _stream_while_downloading(
    client: RegistryClient,
    image: Image,
    cache: Cache,
    progress: Progress,
    out: Path,
    platform: Platform,
    cache_store: CacheStore | None = None,
) -> bool:
    """One gzip layer, not cached yet: decompress and pack it while it downloads.

    The blob goes to the cache as always (verified, then renamed into place) and, through
    a pipe, to pigz and the one-pass stream (:func:`stream.tar_to_squashfs`). The SIF is
    written only once the download is verified. False (nothing written) when this could not
    work out: the layer needs the two-pass merge, the download restarted, the layer was
    cached meanwhile; the caller then packs from the cache as usual. Download errors are
    raised.
    """
    desc = image.layers[0]
    exe = gunzip_program()
    assert exe is not None
    r, w = os.pipe()
    grow_pipe(w)
    tee: _Tee | None = None
    result: dict[str, object] = {}

    def fetch_into_pipe() -> None:
        nonlocal tee
        progress.start(desc)

        def fetch(f: BinaryIO) -> None:
            nonlocal tee
            tee = _Tee(f, w)
            client.fetch_blob(
                image.reference.repository, desc, tee,  # type: ignore[arg-type]
                lambda n: progress.update(desc, n),
            )  # fmt: skip

        try:
            path, cached = cache.ensure_blob(desc.digest, desc.size, fetch)
            progress.finish(desc, cached)
            result["path"] = path
        except BaseException as exc:  # handed to the main thread
            result["error"] = exc
        finally:
            if tee is not None:
                tee.close_pipe()
            else:
                os.close(w)  # never fetched (cached meanwhile): EOF for the decompressor

    log.verbose("streaming 1 layer into squashfs while it downloads")
    thread = threading.Thread(target=fetch_into_pipe, name="download", daemon=True)
    tmp_root = config.get("SIFPY_TMPDIR")
    work = Path(tempfile.mkdtemp(prefix="sifpy-pull-", dir=tmp_root))  # 0700
    why: BaseException | None = None
    try:
        thread.start()
        try:
            with gunzip_process(exe, r) as tar:
                os.close(r)
                r = -1
                sqfs = work / "rootfs.sqfs"
                stream.tar_to_squashfs(merge.TarStream(tar, desc.digest), sqfs, image.config_json)
        except (stream.NeedsMerge, SifpyError) as exc:
            why = exc
        finally:
            if r >= 0:
                os.close(r)
        thread.join()
        if "error" in result:
            raise result["error"]  # type: ignore[misc]
        if tee is not None and tee.restarted:  # the cause of any error the reader saw
            why = RuntimeError("the download restarted")
        if why is not None or tee is None:
            log.verbose(
                f"packing from the cache instead: {why or 'the layer was cached meanwhile'}"
            )
            return False
        write_sif(image, sqfs, out, platform, cache_store)
        return True
    finally:
        rmtree(work)


def mksquashfs(rootfs: Path, dest: Path) -> None:
    """Pack ``rootfs`` into ``dest`` (default compression: zstd level 3), every file owned by
    root (unprivileged-safe)."""
    exe = shutil.which("mksquashfs")
    if exe is None:
        raise ToolError("can't pack the image: mksquashfs not found", "install squashfs-tools")
    argv = [exe, str(rootfs), str(dest), "-noappend", "-all-root"]
    argv += compression_args(default_compression())
    argv += ["-no-progress", "-quiet"]
    # A signal is a failure too (Apptainer 1.5.1: a killed mksquashfs corrupted SIFs).
    run(argv, "pack the image", stdout=DEVNULL)
    with open(dest, "rb") as f:
        if f.read(4) != b"hsqs":
            raise ToolError("can't pack the image: mksquashfs wrote no squashfs superblock")


def sif_arch(image: Image, platform: Platform) -> str:
    arch = image.config_json.get("architecture") or platform.architecture
    return arch if arch in F.ARCH_CODES else platform.architecture


def use_streaming() -> bool:
    """Pull by streaming (no rootfs on disk) unless tar2sqfs is missing.

    ``SIFPY_PULL_STREAM=0`` forces the unpack path, ``1`` requires streaming."""
    choice = (config.raw("SIFPY_PULL_STREAM") or "auto").strip().lower()
    if choice in ("0", "no", "false", "off"):
        return False
    if choice in ("1", "yes", "true", "on"):
        return True
    if stream.tar2sqfs_path() is None:
        log.verbose("tar2sqfs not found: unpacking to a temporary rootfs instead")
        return False
    return True


def build_sif(
    image: Image,
    layers: list[Path],
    out: Path,
    platform: Platform,
    *,
    streaming: bool | None = None,
    cache_store: CacheStore | None = None,
) -> None:
    """Turn ``layers`` plus the image's metadata into a squashfs, then write ``out`` (and
    its cached copy, with ``cache_store``: see :func:`write_sif`).

    Streaming (:mod:`sifpy.rootfs.stream`, tar2sqfs) writes no rootfs; otherwise the
    layers are unpacked into a temporary rootfs and packed with mksquashfs."""
    if streaming is None:
        streaming = use_streaming()
    tmp_root = config.get("SIFPY_TMPDIR")
    work = Path(tempfile.mkdtemp(prefix="sifpy-pull-", dir=tmp_root))  # 0700
    try:
        sqfs = work / "rootfs.sqfs"
        if streaming:
            log.verbose(f"streaming {len(layers)} layers into squashfs")
            stream.layers_to_squashfs(layers, sqfs, image.config_json)
        else:
            rootfs = work / "rootfs"
            rootfs.mkdir(mode=0o755)
            log.verbose(f"unpacking {len(layers)} layers")
            apply_layers(rootfs, layers)
            config_to_metadata(rootfs, image.config_json)
            log.verbose("creating squashfs")
            mksquashfs(rootfs, sqfs)
            rmtree(rootfs)  # free the space before the SIF copy
        write_sif(image, sqfs, out, platform, cache_store)
    finally:
        rmtree(work)


# Given a function that writes the SIF to a path, store that in the cache (Cache.store_sif).
CacheStore = Callable[[Callable[[Path], None]], object]


def write_sif(
    image: Image, sqfs: Path, out: Path, platform: Platform, cache_store: CacheStore | None = None
) -> None:
    """The SIF: the image config's ``config`` section as JSON, then the squashfs.

    With ``cache_store``, the cached copy is written at the same time, from the squashfs,
    with the same id and times (so byte for byte the same file): two copies and two fsyncs
    side by side instead of one after the other. A cache that can't be written (a full
    disk) only gets a warning."""
    # Apptainer stores the config's `Config` section as JSON.Generic oci-config.json.
    cfg = image.config_json.get("config")
    config_doc = json.dumps(cfg if isinstance(cfg, dict) else {}).encode()
    image_id, when = uuid.uuid4().bytes, int(time.time())

    def make(path: Path) -> None:
        create(
            path,
            [
                ObjectInput(F.DataType.GENERIC_JSON, config_doc, name="oci-config.json"),
                ObjectInput.partition(
                    str(sqfs), F.FSType.SQUASH, F.PartType.PRIMSYS, sif_arch(image, platform)
                ),
            ],
            launch_script=F.DEFAULT_LAUNCH_SCRIPT,
            image_id=image_id,
            t=when,
        )

    if cache_store is None:
        make(out)
        return
    failed: list[BaseException] = []

    def store() -> None:
        try:
            cache_store(make)
        except (OSError, SifpyError) as exc:
            failed.append(exc)

    thread = threading.Thread(target=store, name="cache-sif", daemon=True)
    thread.start()
    try:
        make(out)
    finally:
        thread.join()
    if failed:  # the SIF is made; a full cache disk is not fatal
        log.warn(f"can't cache the SIF: {failed[0]}")


def pull(
    ref: Reference,
    out: str | os.PathLike[str] | None,
    *,
    platform: Platform,
    options: ClientOptions | None = None,
    cache: Cache | None = None,
    force: bool = False,
    progress: Progress | None = None,
    use_sif_cache: bool = True,
) -> PullResult:
    """Pull ``ref`` for ``platform`` into the SIF ``out``; with ``out=None``, into the SIF
    cache only (``sifpy exec docker://...``), and the result's path is the cached SIF."""
    if out is None:
        cache = cache or Cache()
        with tempfile.TemporaryDirectory(prefix="sifpy-pull-") as tmp:
            # Built beside the cache's copy (write_sif makes both at once), then dropped.
            res = _pull(ref, Path(tmp) / "image.sif", platform, options, cache, False,
                        progress, True, cache_only=True)  # fmt: skip
        if res.cached:
            return res
        variant = "" if default_compression() == DEFAULT_COMPRESSION else default_compression()
        sif = cache.get_sif(res.digest, variant)
        if sif is None:
            raise CacheError(
                f"can't run {ref}: its SIF could not be stored in the cache",
                hint="see the warning above; pull it into a file with 'sifpy pull' instead",
            )
        return PullResult(sif, res.digest, False)
    return _pull(ref, out, platform, options, cache, force, progress, use_sif_cache)


def _pull(
    ref: Reference,
    out: str | os.PathLike[str],
    platform: Platform,
    options: ClientOptions | None,
    cache: Cache | None,
    force: bool,
    progress: Progress | None,
    use_sif_cache: bool,
    cache_only: bool = False,
) -> PullResult:
    out_path = output_path(out, force)
    cache = cache or Cache()
    progress = progress or NoProgress()
    compression = default_compression()
    parse_compression(compression)  # a bad $SIFPY_COMPRESSION fails before the download
    creds = lookup_credentials(ref.registry)
    if creds is not None:
        log.debug(f"using credentials of {creds.username} from {creds.source}")
    with RegistryClient(ref.registry, options, creds) as client:
        image = client.resolve(ref, platform)
        log.verbose(f"{ref} -> {image.digest}")
        entry = IndexEntry(
            repository=f"{ref.registry}/{ref.repository}",
            tag=ref.tag or "",
            digest=image.digest,
            created=time.time(),
            size=image.config.size + sum(d.size for d in image.layers),
            platform=str(platform),
        )
        # SIFs made with another compression are other SIFs; the default keeps plain names.
        variant = "" if compression == DEFAULT_COMPRESSION else compression
        cached_sif = cache.get_sif(image.digest, variant) if use_sif_cache and not force else None
        if cached_sif is not None:
            log.verbose(f"using cached SIF {cached_sif}")
            if cache_only:
                cache.record(entry)
                return PullResult(cached_sif, image.digest, True)
            install_copy(cached_sif, out_path)
            cache.record(entry)
            return PullResult(out_path, image.digest, True)
        store: CacheStore | None = None
        if use_sif_cache:
            store = functools.partial(cache.store_sif, image.digest, variant=variant)
        if not (
            _can_overlap(image, cache)
            and _stream_while_downloading(client, image, cache, progress, out_path, platform, store)
        ):
            layers = download(client, image, cache, progress)
            build_sif(image, layers, out_path, platform, cache_store=store)
    cache.record(entry)
    return PullResult(out_path, image.digest, False)

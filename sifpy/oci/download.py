"""Layers into the cache: the transport half of a pull, shared by ``pull`` and the
``docker`` bootstrap agent."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, Protocol

from sifpy.oci import media as M
from sifpy.oci.cache import Cache
from sifpy.oci.manifests import Image
from sifpy.oci.registry import RegistryClient

DOWNLOAD_THREADS = 4


class Progress(Protocol):
    """What the pull reports while downloading; the CLI draws it."""

    def start(self, desc: M.Descriptor) -> None: ...
    def update(self, desc: M.Descriptor, done: int) -> None: ...
    def finish(self, desc: M.Descriptor, cached: bool) -> None: ...


class NoProgress:
    """A :class:`Progress` that reports nothing."""

    def start(self, desc: M.Descriptor) -> None:
        pass

    def update(self, desc: M.Descriptor, done: int) -> None:
        pass

    def finish(self, desc: M.Descriptor, cached: bool) -> None:
        pass


def download(
    client: RegistryClient,
    image: Image,
    cache: Cache,
    progress: Progress,
    threads: int = DOWNLOAD_THREADS,
) -> list[Path]:
    """Fetch every layer of ``image`` into ``cache`` in parallel; return their paths."""

    def one(desc: M.Descriptor) -> Path:
        progress.start(desc)

        def fetch(out: BinaryIO) -> None:
            client.fetch_blob(
                image.reference.repository, desc, out, lambda n: progress.update(desc, n)
            )

        path, cached = cache.ensure_blob(desc.digest, desc.size, fetch)
        progress.finish(desc, cached)
        return path

    unique = list({d.digest: d for d in image.layers}.values())
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(unique)))) as pool:
        paths = dict(zip((d.digest for d in unique), pool.map(one, unique), strict=True))
    return [paths[d.digest] for d in image.layers]

"""``sifpy pull [--force] [--arch A] [--platform P] out.sif docker://...`` (or ``oras://...``).

Layers download in parallel; progress is a rich bar per layer when stderr is a terminal,
one plain line per layer otherwise, and nothing with ``-q``.
"""

from __future__ import annotations

import sys
import threading
from argparse import Namespace
from types import TracebackType

from sifpy.cli._args import ArgumentParser
from sifpy.errors import UsageError
from sifpy.oci import media as M
from sifpy.oci.reference import parse_platform, parse_reference
from sifpy.oci.registry import ClientOptions
from sifpy.util import log


def build_parser(prog: str) -> ArgumentParser:
    p = ArgumentParser(prog=prog, description="Pull a container image into a SIF file.")
    p.add_argument("-F", "--force", action="store_true", help="overwrite an existing file")
    p.add_argument("--arch", help="architecture to pull (amd64, arm64, arm/v7, ...)")
    p.add_argument("--platform", help="platform to pull: os/arch[/variant]")
    p.add_argument(
        "--insecure",
        "--no-https",
        "--nohttps",
        dest="insecure",
        action="store_true",
        help="use plain http for this registry (only for a registry you trust)",
    )
    p.add_argument("--ca-cert", metavar="FILE", help="trust this CA bundle (PEM) for the registry")
    p.add_argument("--no-cache", action="store_true", help="don't reuse a cached SIF")
    p.add_argument("output", help="the SIF file to write")
    p.add_argument("image", help="docker://[registry/]name[:tag][@digest] or oras://host/name:tag")
    return p


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


class PlainProgress:
    """One line per layer, for logs and pipes."""

    def start(self, desc: M.Descriptor) -> None:
        pass

    def update(self, desc: M.Descriptor, done: int) -> None:
        pass

    def finish(self, desc: M.Descriptor, cached: bool) -> None:
        what = "cached" if cached else "downloaded"
        log.info(f"{what} {desc.digest[:19]} ({_size(desc.size)})")


class RichProgress:
    """A rich progress bar per layer (stderr is a terminal)."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TransferSpeedColumn,
        )

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self._tasks: dict[str, object] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> RichProgress:
        self._progress.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._progress.stop()

    def start(self, desc: M.Descriptor) -> None:
        with self._lock:
            self._tasks[desc.digest] = self._progress.add_task(desc.digest[7:19], total=desc.size)

    def update(self, desc: M.Descriptor, done: int) -> None:
        self._progress.update(self._tasks[desc.digest], completed=done)  # type: ignore[arg-type]

    def finish(self, desc: M.Descriptor, cached: bool) -> None:
        task = self._tasks[desc.digest]
        label = desc.digest[7:19] + (" (cached)" if cached else "")
        self._progress.update(task, completed=desc.size, description=label)  # type: ignore[arg-type]


def _pull_oras(a: Namespace) -> int:
    """``sifpy pull out.sif oras://host/name:tag``: the SIF artifact, byte for byte."""
    from sifpy.cli.push import PlainProgress as PlainTransfer
    from sifpy.cli.push import RichProgress as RichTransfer
    from sifpy.oci import oras

    ref = oras.parse_oras(a.image)
    options = ClientOptions(insecure=a.insecure, ca_cert=a.ca_cert)
    log.info(f"pulling oras://{ref}")
    if log.level >= log.NORMAL and sys.stderr.isatty():
        with RichTransfer() as rich_progress:
            digest = oras.pull(
                ref, a.output, options=options, force=a.force, progress=rich_progress
            )
    else:
        progress = PlainTransfer("downloaded") if log.level >= log.NORMAL else oras.NoProgress()
        digest = oras.pull(ref, a.output, options=options, force=a.force, progress=progress)
    log.info(f"wrote {a.output} ({digest})")
    return 0


def main(argv: list[str], prog: str = "sifpy pull") -> int:
    """Run ``sifpy pull``."""
    a = build_parser(prog).parse_args(argv)
    if a.image.startswith("oras://"):
        return _pull_oras(a)
    if a.image.startswith("library://"):
        raise UsageError(f"can't pull {a.image}: only docker:// and oras:// are supported")
    ref = parse_reference(a.image)
    platform = parse_platform(a.platform, a.arch)
    options = ClientOptions(insecure=a.insecure, ca_cert=a.ca_cert)
    from sifpy.oci.pull import NoProgress, Progress, pull

    log.info(f"pulling {ref} ({platform})")
    progress: Progress
    if log.level < log.NORMAL:
        progress = NoProgress()
    elif sys.stderr.isatty():
        with RichProgress() as rich_progress:
            result = pull(
                ref,
                a.output,
                platform=platform,
                options=options,
                force=a.force,
                progress=rich_progress,
                use_sif_cache=not a.no_cache,
            )
        log.info(f"wrote {result.path} ({result.digest})")
        return 0
    else:
        progress = PlainProgress()
    result = pull(
        ref,
        a.output,
        platform=platform,
        options=options,
        force=a.force,
        progress=progress,
        use_sif_cache=not a.no_cache,
    )
    suffix = ", from the cache" if result.cached else ""
    log.info(f"wrote {result.path} ({result.digest}{suffix})")
    return 0

"""Download progress per layer: a rich bar per layer on a terminal, a plain line per layer
otherwise (``sifpy pull`` and ``Bootstrap: docker``)."""

from __future__ import annotations

import threading
from types import TracebackType
from typing import Self

from sifpy.oci import media as M
from sifpy.util import log


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


class _RichBars:
    """rich bars with byte counts and speed on stderr; a context manager."""

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
        )

    def __enter__(self) -> Self:
        self._progress.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._progress.stop()


class PlainProgress:
    """One line per layer, for logs and pipes."""

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def start(self, desc: M.Descriptor) -> None:
        pass

    def update(self, desc: M.Descriptor, done: int) -> None:
        pass

    def finish(self, desc: M.Descriptor, cached: bool) -> None:
        what = "cached" if cached else "downloaded"
        log.info(f"{what} {desc.digest[:19]} ({_size(desc.size)})")


class RichProgress(_RichBars):
    """A rich progress bar per layer (stderr is a terminal)."""

    def __init__(self) -> None:
        super().__init__()
        self._tasks: dict[str, object] = {}
        self._lock = threading.Lock()

    def start(self, desc: M.Descriptor) -> None:
        with self._lock:
            self._tasks[desc.digest] = self._progress.add_task(desc.digest[7:19], total=desc.size)

    def update(self, desc: M.Descriptor, done: int) -> None:
        self._progress.update(self._tasks[desc.digest], completed=done)  # type: ignore[arg-type]

    def finish(self, desc: M.Descriptor, cached: bool) -> None:
        task = self._tasks[desc.digest]
        label = desc.digest[7:19] + (" (cached)" if cached else "")
        self._progress.update(task, completed=desc.size, description=label)  # type: ignore[arg-type]


def layer_progress() -> PlainProgress | RichProgress:
    """The progress display that fits stderr and the verbosity (use as a context manager)."""
    import sys

    if log.level == log.NORMAL and sys.stderr.isatty():
        return RichProgress()
    return PlainProgress()


# --- one file at a time (ORAS push and pull) ----------------------------------------------


class TransferPlain:
    """One line per transfer, for logs and pipes."""

    def __init__(self, verb: str) -> None:
        self.verb = verb
        self.what = ""
        self.total = 0

    def __enter__(self) -> TransferPlain:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def start(self, what: str, total: int) -> None:
        self.what, self.total = what, total

    def update(self, done: int) -> None:
        pass

    def finish(self, skipped: bool) -> None:
        how = "already there" if skipped else self.verb
        log.info(f"{self.what}: {how} ({_size(self.total)})")


class TransferRich(_RichBars):
    """A rich progress bar for one transfer (stderr is a terminal)."""

    def __init__(self) -> None:
        super().__init__()
        self._task: object = None

    def start(self, what: str, total: int) -> None:
        self._task = self._progress.add_task(what, total=total)

    def update(self, done: int) -> None:
        self._progress.update(self._task, completed=done)  # type: ignore[arg-type]

    def finish(self, skipped: bool) -> None:
        task = self._task
        total = self._progress.tasks[-1].total if self._progress.tasks else None
        label = self._progress.tasks[-1].description + (" (already there)" if skipped else "")
        self._progress.update(task, completed=total, description=label)  # type: ignore[arg-type]


def transfer_progress(verb: str) -> TransferPlain | TransferRich:
    """A display for one transfer: a bar on a terminal, else one line (silent with -q)."""
    import sys

    if log.level == log.NORMAL and sys.stderr.isatty():
        return TransferRich()
    return TransferPlain(verb)

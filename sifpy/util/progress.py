"""Progress for long build steps: a rich bar or spinner on a terminal, plain lines otherwise.

``step("creating squashfs")`` is a context manager yielding a :class:`Step`; ``update(done,
total)`` moves its bar. When stderr is not a terminal (CI logs, pipes) or with ``-q``/
``-v``, a step is just the usual one-line message, so logs stay readable; rich is only
imported when a bar is actually drawn.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sifpy.util import log


def interactive() -> bool:
    """Draw bars: stderr is a terminal and the verbosity is the default one."""
    return log.level == log.NORMAL and sys.stderr.isatty()


class Step:
    """One running step; ``update`` is a no-op without a bar."""

    def __init__(self, progress: Any = None, task: Any = None) -> None:
        self._progress, self._task = progress, task

    def update(self, done: int, total: int | None = None) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=done, total=total)


@contextmanager
def step(description: str) -> Iterator[Step]:
    """Show ``description`` while the block runs (with a bar if :func:`interactive`)."""
    if not interactive():
        log.info(description)
        yield Step()
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    class Count(MofNCompleteColumn):
        """done/total, or nothing while the total is unknown (not "0/?")."""

        def render(self, task: Any) -> Any:
            return "" if task.total is None else super().render(task)

    started = time.monotonic()
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
               Count(), TimeElapsedColumn())  # fmt: skip
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(description, total=None)
        yield Step(progress, task)
    log.info(f"{description}: done ({time.monotonic() - started:.1f}s)")

"""Messages to stderr at a verbosity the CLI sets (``-q``, ``-v``).

stdout is for requested output only; every diagnostic goes through here.
"""

from __future__ import annotations

import sys

QUIET, NORMAL, VERBOSE, DEBUG = -1, 0, 1, 2
level = NORMAL


def set_level(new: int) -> None:
    global level
    level = new


def _emit(prefix: str, msg: str) -> None:
    sys.stderr.write(f"{prefix}{msg}\n")
    sys.stderr.flush()


def warn(msg: str) -> None:
    # -q silences warnings too, as Apptainer's -q/-s do; errors are not logged here.
    if level >= NORMAL:
        _emit("warning: ", msg)


def info(msg: str) -> None:
    if level >= NORMAL:
        _emit("", msg)


def verbose(msg: str) -> None:
    if level >= VERBOSE:
        _emit("", msg)


def debug(msg: str) -> None:
    if level >= DEBUG:
        _emit("debug: ", msg)


# Things that are normal but worth a word at -v, said once per command with a count
# instead of once per occurrence (a Debian image's layers carry eight device nodes).
_tallies: dict[str, list[str]] = {}


def tally(what: str, item: str) -> None:
    """Count ``item`` under ``what`` (e.g. "device nodes in layers skipped"); each one
    shows at -d, the summary (:func:`summarize`) at -v."""
    items = _tallies.setdefault(what, [])
    if item not in items:
        items.append(item)
        debug(f"{what}: {item}")


def summarize() -> None:
    """One line per tally: ``<what>: N (first, second, ...)``; then forget them."""
    for what, items in _tallies.items():
        shown = ", ".join(items[:4]) + (", ..." if len(items) > 4 else "")
        verbose(f"{what}: {len(items)} ({shown})")
    _tallies.clear()

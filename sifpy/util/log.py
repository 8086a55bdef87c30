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
    if level >= QUIET:
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

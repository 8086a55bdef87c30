"""The private work directory of one build: made, locked, removed, kept or cleaned up.

Atomic output and clean-up: all work happens in a private directory
``.sifpy-build-XXXXXXXX`` (mode 0700): for a SIF under ``--tmpdir`` / ``$SIFPY_TMPDIR`` /
``$APPTAINER_TMPDIR`` / ``$TMPDIR`` / /tmp (as Apptainer; the output's directory is often
an NFS home), for a sandbox next to the destination. The SIF is written as an unnamed
``O_TMPFILE`` and linked into place when complete; a sandbox is renamed into place. On
any error or signal the directory is removed (``--no-cleanup`` keeps it as
``sifpy-kept-XXXXXXXX`` after a failure; a failed ``%post`` leaves its output in a
``sifpy-build-*.log`` beside it). After a SIGKILL it stays, but it holds an
``flock`` while the build lives: the next ``sifpy build`` that uses the same directory
removes every such directory whose lock is free. Child processes (mksquashfs, mmdebstrap,
the ``%post`` container) die with the build (``PR_SET_PDEATHSIG`` and a PID namespace).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import signal
import stat
import tempfile
import time
from collections.abc import Iterator

from sifpy import config
from sifpy.build.options import BuildOptions
from sifpy.errors import BuildError, Interrupted, UsageError
from sifpy.util import log
from sifpy.util.fs import rmtree

WORK_PREFIX = ".sifpy-build-"
_STALE_UNLOCKED_AGE = 3600.0


def clean_stale(parent: str) -> None:
    """Remove work directories of dead builds in ``parent`` (see the module docstring)."""
    me = os.geteuid()
    for path in glob.glob(os.path.join(glob.escape(parent), WORK_PREFIX + "*")):
        try:
            st = os.lstat(path)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != me:
                continue
            fd = os.open(os.path.join(path, ".lock"), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            if time.time() - os.lstat(path).st_mtime > _STALE_UNLOCKED_AGE:
                rmtree(path)
            continue
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a live build holds it
        finally:
            os.close(fd)
        log.verbose(f"removing the leftovers of a killed build: {path}")
        rmtree(path)


class Workspace:
    """A private directory for one build, locked while the build lives."""

    def __init__(self, parent: str) -> None:
        self.parent = parent
        clean_stale(parent)
        try:
            self.path = tempfile.mkdtemp(prefix=WORK_PREFIX, dir=parent)
        except OSError as exc:
            raise BuildError(
                f"can't create a work directory in {parent}: {exc.strerror}",
                hint="choose a writable directory with --tmpdir",
            ) from exc
        self.lock = os.open(os.path.join(self.path, ".lock"), os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self.lock, fcntl.LOCK_EX)
        self.scratch = os.path.join(self.path, "scratch")
        os.mkdir(self.scratch, 0o700)

    def close(self) -> None:
        rmtree(self.path)
        os.close(self.lock)


KEPT_PREFIX = "sifpy-kept-"


@contextlib.contextmanager
def workspace(parent: str, keep_on_failure: bool = False) -> Iterator[Workspace]:
    # SIGTERM/SIGHUP become exceptions so that the finally clause cleans up (as Ctrl-C's
    # KeyboardInterrupt does, and not catchable as an error).
    def stop(signum: int, _frame: object) -> None:
        raise Interrupted(signum)

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    ws = Workspace(parent)
    kept = False
    try:
        yield ws
    except BaseException:
        if keep_on_failure:  # --no-cleanup: renamed, so that the next build leaves it alone
            name = KEPT_PREFIX + os.path.basename(ws.path)[len(WORK_PREFIX) :]
            os.rename(ws.path, os.path.join(parent, name))
            ws.path, kept = os.path.join(parent, name), True
            log.info(f"--no-cleanup: the failed build's directory is kept: {ws.path}")
        raise
    finally:
        if kept:
            os.close(ws.lock)
        else:
            ws.close()
        for s, handler in old.items():
            signal.signal(s, handler)


def work_parent(dest: str, opts: BuildOptions) -> str:
    """Where the work directory goes: for a SIF, ``--tmpdir``, ``$SIFPY_TMPDIR``,
    ``$APPTAINER_TMPDIR``, ``$TMPDIR`` or /tmp (as Apptainer: not beside the output, often
    an NFS home); a sandbox is renamed into place, so it is built beside it."""
    beside = os.path.dirname(os.path.abspath(dest))
    if opts.sandbox:
        return beside
    for name, candidate in (
        ("--tmpdir", opts.tmpdir),
        ("$SIFPY_TMPDIR", config.get("SIFPY_TMPDIR")),
        ("$APPTAINER_TMPDIR", config.get("APPTAINER_TMPDIR")),
    ):
        if candidate:
            if not os.path.isdir(candidate):
                raise UsageError(f"{name} {candidate}: not a directory")
            return os.path.abspath(candidate)
    tmp = tempfile.gettempdir()  # $TMPDIR, else /tmp
    try:
        noexec = bool(os.statvfs(tmp).f_flag & os.ST_NOEXEC)
    except OSError:
        noexec = True
    if noexec:  # %post could not run programs from it
        log.verbose(f"{tmp} is noexec (or unusable): building in {beside}")
        return beside
    return tmp

"""What an MPI launcher set up for its ranks, carried into the container.

Launchers hand ranks three kinds of things: variables (which pass like any other host
variable), inherited fds (``PMI_FD``: kept, see :func:`sifpy.runtime.start.passed_fds`) and
directories. This module names the directories: PMIx servers (Slurm's ``srun --mpi=pmix``,
Open MPI's ``prterun``) keep a per-job directory holding the shared-memory data store
(``gds/ds12``, ``gds/ds21``) that clients map, and tell its path in ``PMIX_SERVER_TMPDIR``
and ``PMIX_DSTORE_*_BASE_PATH``. Slurm's lies under its spool (``/var/spool/slurmd``), which
no container shows; without it every rank prints ``PMIX ERROR ... gds_ds12_lock_pthread.c``
and falls back to a slower store. They are bound at the same path, read-write (clients take
locks in it); the system-wide ``PMIX_SYSTEM_TMPDIR`` (usually ``/tmp``) is not: it is not the
job's, and ``--contain`` means to hide it.
"""

from __future__ import annotations

import os

from sifpy import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Collection, Mapping

PMIX_DIRS = ("PMIX_SERVER_TMPDIR", "PMIX_DSTORE_21_BASE_PATH", "PMIX_DSTORE_ESH_BASE_PATH")


def launcher_binds(
    environ: Mapping[str, str], known: Collection[str] | None = None
) -> list[tuple[str, str, bool]]:
    """Binds (source, destination, read-only) of the job directories the launcher named in
    ``environ`` that exist (``known``: those that do, as another process found them; a
    shared container's holder plans for its ranks where its own session covers ``/tmp``);
    one inside another is covered by it."""
    dirs: list[str] = []
    for name in PMIX_DIRS:
        value = environ.get(name, "")
        there = os.path.normpath(value) in known if known is not None else os.path.isdir(value)
        if value.startswith("/") and there:
            dirs.append(os.path.normpath(value))
    dirs.sort()
    out: list[str] = []
    for path in dirs:
        if not any(path == top or path.startswith(top + "/") for top in out):
            out.append(path)
    return [(path, path, False) for path in out]

"""Subordinate user and group ids (``/etc/subuid``, ``/etc/subgid``) for builds.

When the administrator gave the user a range and the setuid helpers ``newuidmap`` and
``newgidmap`` (Debian: uidmap) are installed, a build maps container root to the user and
container ids 1..N to the range, so ``chown`` and ``setuid`` in ``%post`` are real, as with
Apptainer's ``--fakeroot``. Without them, root is emulated (:mod:`.seccomp`).
"""

from __future__ import annotations

import os
from typing import NamedTuple

HELPERS = ("/usr/bin/newuidmap", "/usr/bin/newgidmap")


class Ranges(NamedTuple):
    uid_start: int
    uid_count: int
    gid_start: int
    gid_count: int


def _lookup(path: str, name: str, ident: int) -> tuple[int, int] | None:
    """The first ``name:start:count`` (or ``uid:start:count``) entry of ``path``."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.strip().split(":")
        if len(parts) != 3 or parts[0] not in (name, str(ident)):
            continue
        try:
            start, count = int(parts[1]), int(parts[2])
        except ValueError:
            continue
        if start > 0 and count > 0:
            return start, count
    return None


def helpers() -> tuple[str, str] | None:
    """The setuid helpers newuidmap and newgidmap, when installed."""
    if all(os.access(p, os.X_OK) for p in HELPERS):
        return HELPERS
    return None


def ranges(name: str, uid: int, gid: int) -> Ranges | None:
    """The user's subordinate ranges, or None when there are none (or no helpers)."""
    if uid == 0 or helpers() is None:
        return None
    u = _lookup("/etc/subuid", name, uid)
    g = _lookup("/etc/subgid", name, uid)
    if u is None or g is None:
        return None
    return Ranges(u[0], u[1], g[0], g[1])


def write_maps(pid: int, uid: int, gid: int, r: Ranges) -> str | None:
    """Map container 0 to (uid, gid) and 1..N to the ranges for process ``pid``; returns an
    error message, or None on success."""
    from sifpy.util.proc import PIPE, run

    found = helpers()
    if found is None:
        return "newuidmap/newgidmap not found"
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
    for helper, own, start, count in (
        (found[0], uid, r.uid_start, r.uid_count),
        (found[1], gid, r.gid_start, r.gid_count),
    ):
        argv = [helper, str(pid), "0", str(own), "1", "1", str(start), str(count)]
        proc = run(argv, "map ids", stdout=PIPE, env=env, text=True, ok=None)
        if proc.returncode != 0:
            return f"{os.path.basename(helper)} failed: {proc.stderr.strip()[-300:]}"
    return None

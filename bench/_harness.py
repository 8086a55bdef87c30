"""What the start-up benchmarks (exec, exec_breakdown, mpi, read) share: the busybox image,
the unprivileged user both sides run as, and the accounting of every process a start
leaves behind."""

from __future__ import annotations

import ctypes
import os
import pwd
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path


def busybox_root(root: Path, applets: tuple[str, ...] = ("sh", "true", "id", "cat")) -> None:
    """A minimal image tree: a static busybox with ``applets``, the usual mount points."""
    (root / "bin").mkdir(parents=True)
    shutil.copy2("/bin/busybox", root / "bin" / "busybox")
    for applet in applets:
        (root / "bin" / applet).symlink_to("busybox")
    for d in ("dev", "proc", "sys", "tmp", "home", "etc", "mnt", "var/tmp", "root", "run"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for f in ("passwd", "group", "hosts", "resolv.conf"):
        (root / "etc" / f).touch()


def squashfs(root: Path, dest: Path) -> None:
    """``root`` packed as every side reads it (zstd, all files root's)."""
    subprocess.run(["mksquashfs", str(root), str(dest), "-comp", "zstd", "-noappend",
                    "-quiet", "-all-root"], check=True, stdout=subprocess.DEVNULL)  # fmt: skip


def bench_user(name: str | None) -> tuple[pwd.struct_passwd, list[str], dict[str, str]]:
    """The user the commands run as, the ``setpriv`` prefix that makes them so (empty unless
    started as root: then ``name``, else ``sifpytest`` if it exists, else ``nobody``), and
    their environment."""
    user = pwd.getpwuid(os.getuid())
    as_user: list[str] = []
    if os.getuid() == 0:
        names = {p.pw_name for p in pwd.getpwall()}
        user = pwd.getpwnam(name or next(n for n in ("sifpytest", "nobody") if n in names))
        as_user = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}",
                   "--init-groups", "--"]  # fmt: skip
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "USER": user.pw_name,
        "HOME": user.pw_dir,
        "LANG": "C.UTF-8",
    }
    return user, as_user, env


def become_subreaper(bench: str) -> None:
    """Adopt every orphaned descendant (FUSE servers, holders), so that :func:`reap_all`
    waits for them and their CPU time counts in RUSAGE_CHILDREN."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
        sys.exit(f"{bench}: can't become a child subreaper")


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def children() -> set[int]:
    """This process's children, adopted ones included."""
    return {int(p) for p in os.listdir("/proc") if p.isdigit() and _ppid(int(p)) == os.getpid()}


def reap_all(bench: str, keep: frozenset[int] = frozenset(), limit: float = 5) -> None:
    """Reap every descendant left over (a FUSE server exits once unmounted), but ``keep``;
    stop the benchmark if one is still there after ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            left = children() - keep
            if not left:
                return
            if time.monotonic() > deadline:
                sys.exit(f"{bench}: descendants did not exit within {limit:g} s: {sorted(left)}")
            time.sleep(0.001)


def cpu() -> float:
    """User + system seconds of every reaped descendant so far."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime

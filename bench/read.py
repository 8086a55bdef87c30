"""bench/read: read every file of a root file system inside ``sifpy exec`` against the
kernel's squashfs driver on the same squashfs, in one run.

sifpy runs as an unprivileged user (``--user``, default ``sifpytest`` if it exists, else
``nobody``): the FUSE path every user gets. The kernel side is a loop mount of the same
SIF at the partition's offset, read through chroot. Needs root (the kernel mount, and to
drop caches between runs). The tree defaults to a copy of this Debian host's /usr/bin,
/usr/lib/python3.11 and /usr/share/perl (any directory can be given with --rootfs, e.g. an
mmdebstrap tree). Each side is read cold (page cache dropped) and warm (a second exec,
which starts a new FUSE connection), and sifpy also "warm in a kept mount": the same read
twice in one exec, the second timed as (two reads) - (one read). Every figure is the
median of ``--runs`` rounds that alternate between the commands. The FUSE server is the
one ``sifpy exec --no-home`` picks, a start with an option (squashfuse_ll by default); run
with ``SIFPY_FUSE_SERVER=sifpy`` for sifpy's own. Prints the ratios and
writes them, with the commit and CPU, to bench/results/read.txt.

    sudo .venv/bin/python bench/read.py [--rootfs DIR] [--user NAME]
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _harness import bench_user, squashfs
from _report import provenance, report

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SKIP = {"dev", "proc", "sys", "tmp", "run", "home", "root", "var", "mnt", "media"}
DEFAULT_TREES = ["/usr/bin", "/usr/lib/python3.11", "/usr/share/perl"]


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def timed(argv: list[str], cold: bool) -> float:
    if cold:
        drop_caches()
    t = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rootfs", help="directory to pack (default: parts of this host's /usr)")
    ap.add_argument("--user", help="run sifpy as this user (default: sifpytest, else nobody)")
    ap.add_argument("--runs", type=int, default=3, help="rounds; each figure is the median")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/read needs root (kernel squashfs mount, drop_caches)")
    sys.path.insert(0, str(REPO))
    from sifpy.sif import ObjectInput, SifImage, create
    from sifpy.sif import format as F

    user, as_user, _ = bench_user(a.user)  # root (checked above): as_user is setpriv
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        t.chmod(0o755)
        root = t / "root"
        if a.rootfs:
            src = Path(a.rootfs)
        else:
            src = root
            for tree in DEFAULT_TREES:
                shutil.copytree(tree, root / tree.lstrip("/"), symlinks=True)
            busybox = root / "bin"
            busybox.mkdir()
            shutil.copy2("/bin/busybox", busybox / "busybox")
            for applet in ("sh", "tar", "cat"):
                (busybox / applet).symlink_to("busybox")
        sqfs, sif = t / "img.sqfs", t / "img.sif"
        squashfs(src, sqfs)
        create(sif, [ObjectInput.partition(sqfs, F.FSType.SQUASH, F.PartType.PRIMSYS, "amd64")])
        with SifImage.open(sif) as img:
            offset = img.primary_partition().offset
        mnt = t / "mnt"
        mnt.mkdir()
        nfiles = sum(len(f) for _, _, f in os.walk(src))
        size = sum((Path(d) / n).stat().st_size for d, _, fs in os.walk(src) for n in fs
                   if not (Path(d) / n).is_symlink())  # fmt: skip
        # The image's own top-level trees (in the container, the root is a tmpfs with the
        # image's directories bound in, so `find / -xdev` would not descend into them).
        tops = sorted("/" + e.name for e in src.iterdir() if e.is_dir() and not e.is_symlink()
                      and e.name not in SKIP)  # fmt: skip
        # tar read()s every byte into memory (cat would sendfile(), which the kernel can
        # satisfy from the page cache without copying: not what a program reading does).
        read_all = f"tar cf - {' '.join(tops)} | cat"
        sifpy = [*as_user, str(REPO / ".venv" / "bin" / "sifpy"), "exec", "--no-home",
                 str(sif), "/bin/sh", "-c"]  # fmt: skip
        sif.chmod(0o644)
        subprocess.run(["mount", "-t", "squashfs", "-o", f"ro,loop,offset={offset}", str(sif),
                        str(mnt)], check=True)  # fmt: skip
        try:
            kernel = ["chroot", str(mnt), "/bin/sh", "-c", read_all]
            # Alternating rounds, the median of each: a loaded machine drifts.
            runs: dict[str, list[float]] = {}
            for _ in range(a.runs):
                # Each warm read right after its own cold one: the other side's reads warm
                # other pages (the loop mount's, or the SIF file's under FUSE).
                for name, argv, cold in (
                    ("kernel cold", kernel, True),
                    ("kernel warm", kernel, False),
                    ("sifpy cold", [*sifpy, read_all], True),
                    ("sifpy warm", [*sifpy, read_all], False),
                    ("once", [*sifpy, read_all], False),
                    ("twice", [*sifpy, f"{read_all}; {read_all}"], False),
                ):
                    runs.setdefault(name, []).append(timed(argv, cold))
            res = {k: statistics.median(v) for k, v in runs.items()}
            res["sifpy warm, kept mount"] = res.pop("twice") - res.pop("once")
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    cold = res["sifpy cold"] / res["kernel cold"]
    kept = res["sifpy warm, kept mount"] / res["kernel warm"]
    from sifpy.runtime import start

    own = os.environ.get("SIFPY_FUSE_SERVER") == "sifpy" and os.access(start.SERVER, os.X_OK)
    server = "sifpy's own (SIFPY_FUSE_SERVER=sifpy)" if own else "squashfuse_ll (the default)"
    lines = [
        f"bench/read: {nfiles} files, {size / 2**20:.0f} MiB, read with tar, median of "
        f"{a.runs} alternating rounds; sifpy as "
        f"{user.pw_name} (uid {user.pw_uid}, FUSE), the kernel's squashfs as root",
        f"FUSE server: {server}; measured on: {provenance()}",
    ]
    lines += [f"  {k:<24} {v:7.2f} s" for k, v in res.items()]
    lines.append(f"ratio sifpy / kernel, cold cache: {cold:.2f}x (target <= 1.5x: "
                 f"{'met' if cold <= 1.5 else 'NOT met'})")  # fmt: skip
    lines.append(f"ratio sifpy / kernel, warm cache, new exec: "
                 f"{res['sifpy warm'] / res['kernel warm']:.2f}x")  # fmt: skip
    # (two reads) - (one read) <= 0: the machine's noise exceeded the read; no verdict.
    verdict = "met" if 0 < kept <= 1.2 else "NOT met" if kept > 0 else "noise: no verdict"
    lines.append(f"ratio sifpy / kernel, warm cache, kept mount: {kept:.2f}x (target <= 1.2x: "
                 f"{verdict})")  # fmt: skip
    lines.append(f"commands: {shlex.join(sifpy)} '<read>' and chroot MNT /bin/sh -c '<read>', "
                 f"<read> = {read_all}")  # fmt: skip
    text = "\n".join(lines) + "\n"
    report("read", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

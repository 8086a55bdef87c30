"""bench/build: sifpy's squashfs step (:func:`sifpy.squashfs.pack`) against plain
``mksquashfs`` with the same compression (sifpy's default) on the same root file system,
in one run.

The tree defaults to a copy of parts of this Debian host's /usr (any directory can be given
with --rootfs, e.g. an mmdebstrap tree or a sandbox). Both sides run ``--repeat`` times,
alternating, and the best time of each counts; the image sizes are compared too.

Then a whole recipe, sifpy against Charliecloud (see ``build_whole.py``; ``--no-whole``
skips it, ``--rootfs-tar`` reuses a base tar). Prints the ratios and writes
bench/results/build.txt.

    .venv/bin/python bench/build.py [--rootfs DIR] [--repeat N] [--no-whole]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _report import report

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_TREES = ["/usr/bin", "/usr/lib/python3.11", "/usr/share/perl"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rootfs", help="directory to pack (default: parts of this host's /usr)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-whole", action="store_true", help="skip the whole-recipe comparison")
    ap.add_argument("--rootfs-tar", help="whole recipe: a tar of the Debian base to use")
    a = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from sifpy.squashfs import DEFAULT_COMPRESSION, compression_args, pack
    from sifpy.util import log

    os.environ.pop("SIFPY_COMPRESSION", None)  # both sides: sifpy's default compression

    log.set_level(log.QUIET)
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        if a.rootfs:
            src = Path(a.rootfs)
        else:
            src = t / "root"
            for tree in DEFAULT_TREES:
                shutil.copytree(tree, src / tree.lstrip("/"), symlinks=True)
        nfiles = sum(len(f) for _, _, f in os.walk(src))
        size = sum((Path(d) / n).lstat().st_size for d, _, fs in os.walk(src) for n in fs)
        plain_out, ours_out = t / "plain.sqfs", t / "sifpy.sqfs"
        plain_argv = ["mksquashfs", str(src), str(plain_out), "-noappend"]
        plain_argv += compression_args(DEFAULT_COMPRESSION)
        plain_argv += ["-quiet", "-no-progress"]
        if os.geteuid() != 0:
            plain_argv.append("-all-root")
        plain, ours = [], []
        for _ in range(a.repeat):
            start = time.perf_counter()
            subprocess.run(plain_argv, check=True, stdout=subprocess.DEVNULL)
            plain.append(time.perf_counter() - start)
            start = time.perf_counter()
            pack(src, ours_out)
            ours.append(time.perf_counter() - start)
        p, o = min(plain), min(ours)
        ps, os_ = plain_out.stat().st_size, ours_out.stat().st_size
    mib = 1 << 20
    comp = " ".join(compression_args(DEFAULT_COMPRESSION))
    text = (
        f"bench/build: squashfs of {nfiles} files, {size / mib:.0f} MiB "
        f"(best of {a.repeat}, {os.cpu_count()} CPUs), both {comp}\n"
        f"  plain mksquashfs        {p:.2f} s   {ps / mib:.1f} MiB\n"
        f"  sifpy squashfs.pack     {o:.2f} s   {os_ / mib:.1f} MiB\n"
        f"ratio sifpy / mksquashfs, time: {o / p:.2f}x\n"
        f"ratio sifpy / mksquashfs, size: {os_ / ps:.2f}x\n"
    )
    if not a.no_whole:
        from build_whole import cleanup, whole

        work = Path(tempfile.mkdtemp(prefix="bench-build-", dir=os.environ.get("SIFPY_TMPDIR")))
        try:
            text += "\n" + whole(work, a.rootfs_tar)
        finally:
            cleanup(work)
    report("build", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

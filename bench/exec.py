"""bench/exec: start-up cost of ``sifpy exec IMG /bin/true`` against Charliecloud's ch-run.

Both run the same busybox squashfs, in the same run, as the same user. ch-run (Debian's
0.31 has no built-in SquashFUSE) is timed two ways: on the squashfs mounted once
beforehand (its lower bound) and as mount + run + unmount (the same work sifpy does on
every start). Prints the ratios and writes them to bench/results/exec.txt.

    .venv/bin/python bench/exec.py [--runs N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def busybox_root(root: Path) -> None:
    (root / "bin").mkdir(parents=True)
    shutil.copy2("/bin/busybox", root / "bin" / "busybox")
    for applet in ("sh", "true", "id", "cat"):
        (root / "bin" / applet).symlink_to("busybox")
    for d in ("dev", "proc", "sys", "tmp", "home", "etc", "mnt", "var/tmp", "root", "run"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for f in ("passwd", "group", "hosts", "resolv.conf"):
        (root / "etc" / f).touch()


def timed(argv: list[str], runs: int, env: dict[str, str]) -> list[float]:
    for _ in range(3):  # warm-up: page cache, Python's bytecode cache
        subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
        out.append(time.perf_counter() - t)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=30)
    a = ap.parse_args()
    for tool in ("ch-run", "squashfuse_ll", "mksquashfs", "fusermount3"):
        if not shutil.which(tool):
            sys.exit(f"bench/exec needs {tool} (apt-get install charliecloud-runtime squashfuse)")
    sys.path.insert(0, str(REPO))
    from sifpy.sif import ObjectInput, create
    from sifpy.sif import format as F

    env = {**os.environ, "USER": os.environ.get("USER") or "root"}
    # As an installed sifpy runs: with its bytecode compiled (pip does this on install).
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "sifpy")], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        busybox_root(t / "root")
        sqfs = t / "img.sqfs"
        subprocess.run(["mksquashfs", str(t / "root"), str(sqfs), "-comp", "zstd", "-noappend",
                        "-quiet", "-all-root"], check=True, stdout=subprocess.DEVNULL)  # fmt: skip
        sif = t / "img.sif"
        create(sif, [ObjectInput.partition(sqfs, F.FSType.SQUASH, F.PartType.PRIMSYS, "amd64")])
        mnt = t / "mnt"
        mnt.mkdir()
        sifpy = [str(REPO / ".venv" / "bin" / "sifpy"), "exec", str(sif), "/bin/true"]
        full = ["sh", "-c", f"squashfuse_ll {sqfs} {mnt} && ch-run {mnt} -- /bin/true;"
                f" fusermount3 -u {mnt}"]  # fmt: skip
        results = {"sifpy exec": timed(sifpy, a.runs, env)}
        results["ch-run (mount+run+unmount)"] = timed(full, a.runs, env)
        subprocess.run(["squashfuse_ll", str(sqfs), str(mnt)], check=True)
        try:
            results["ch-run (pre-mounted)"] = timed(
                ["ch-run", str(mnt), "--", "/bin/true"], a.runs, env
            )
        finally:
            subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    base = med["sifpy exec"]
    lines = [f"bench/exec: median of {a.runs} runs, /bin/true in a busybox squashfs"]
    lines += [f"  {k:<28} {v * 1000:7.1f} ms" for k, v in med.items()]
    for k, v in med.items():
        if k != "sifpy exec":
            lines.append(f"ratio sifpy / {k}: {base / v:.2f}x")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "exec.txt").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""bench/exec: start-up cost of ``sifpy exec IMG /bin/true`` against Charliecloud's ch-run.

The baseline is ch-run as its users run it: ``ch-run IMG.sqfs -- /bin/true``, which mounts
the squashfs itself with the SquashFUSE library linked into ch-run (``ldd /usr/bin/ch-run``
shows libsquashfuse_ll; ``ch-run -vv`` logs ch_fuse.c mounting and unmounting), in the
same process, with no FUSE server to exec. Two more ch-run lines are printed for
reference only: wrapped in an external ``squashfuse_ll`` mount and ``fusermount3 -u``
(what an earlier version of this bench used as its baseline), and on a squashfs mounted
once beforehand (ch-run's lower bound).

``sifpy`` is the program ``make venv`` installs (.venv/bin/sifpy): the starter, compiled
from sifpy/cli/starter.c, when a C compiler was there. For reference the same start also
runs through the Python-only launcher script (what is installed without a compiler): there
nothing serves the image early (only the starter does), Python mounts it in order, and the
difference between the two lines is what the starter saves.

Every command runs the same busybox squashfs (sifpy: the same bytes as a SIF), in the same
run, as the same unprivileged user (when started as root: ``--user``, default
``sifpytest`` if it exists, else ``nobody``). When started as root, sifpy is also timed as
root (the kernel squashfs driver, no FUSE). Runs alternate between the commands, so that
drift in the machine's load hits all of them alike. Besides the wall time, the CPU time
(user + system) of each start is measured over the whole process tree, FUSE servers that
outlive their parent included: this process is a child subreaper, so every descendant is
reaped here and counted in RUSAGE_CHILDREN. Prints the ratios and writes them, with the
commands, commit and CPU, to bench/results/exec.txt; bench/exec_breakdown.py splits sifpy's
start into its phases (bench/results/exec-breakdown.txt).

    .venv/bin/python bench/exec.py [--runs N] [--user NAME]
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

from _harness import (
    become_subreaper,
    bench_user,
    busybox_root,
    children,
    cpu,
    reap_all,
    squashfs,
)
from _report import provenance, report

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def timed(
    cmds: dict[str, list[str]], runs: int, env: dict[str, str], keep: frozenset[int] = frozenset()
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Time each command ``runs`` times, alternating between them: wall and CPU seconds."""
    for argv in cmds.values():  # warm-up: page cache, Python's bytecode cache
        for _ in range(3):
            subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
            reap_all("bench/exec", keep)
    wall: dict[str, list[float]] = {k: [] for k in cmds}
    spent: dict[str, list[float]] = {k: [] for k in cmds}
    for _ in range(runs):
        for k, argv in cmds.items():
            c = cpu()
            t = time.perf_counter()
            subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
            wall[k].append(time.perf_counter() - t)
            reap_all("bench/exec", keep)
            spent[k].append(cpu() - c)
    return wall, spent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--user", help="run as this user when started as root")
    ap.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="NAME=PROGRAM",
        help="also time another sifpy program (e.g. an earlier commit's .venv/bin/sifpy)",
    )
    a = ap.parse_args()
    for tool in ("ch-run", "squashfuse_ll", "mksquashfs", "fusermount3", "setpriv"):
        if not shutil.which(tool):
            sys.exit(f"bench/exec needs {tool} (apt-get install charliecloud-runtime squashfuse)")
    become_subreaper("bench/exec")
    sys.path.insert(0, str(REPO))
    from sifpy.sif import ObjectInput, create
    from sifpy.sif import format as F

    root = os.getuid() == 0
    user, as_user, env = bench_user(a.user)
    # As an installed sifpy runs: with its bytecode compiled (pip does this on install).
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "sifpy")], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        t.chmod(0o755)
        busybox_root(t / "root")
        sqfs = t / "img.sqfs"
        squashfs(t / "root", sqfs)
        sif = t / "img.sif"
        create(sif, [ObjectInput.partition(sqfs, F.FSType.SQUASH, F.PartType.PRIMSYS, "amd64")])
        for f in (sqfs, sif):
            f.chmod(0o644)
        mnt = t / "mnt"
        mnt.mkdir()
        os.chown(mnt, user.pw_uid, user.pw_gid)
        program = REPO / ".venv" / "bin" / "sifpy"
        kind = "starter" if program.read_bytes()[:4] == b"\x7fELF" else "script"
        script = t / "sifpy-script"
        from sifpy.cli import launcher

        launcher.write(str(script), str(REPO / ".venv" / "bin" / "python"), script=True)
        sifpy = [str(program), "exec", str(sif), "/bin/true"]
        full = ["sh", "-c", f"squashfuse_ll {sqfs} {mnt} && ch-run {mnt} -- /bin/true;"
                f" fusermount3 -u {mnt}"]  # fmt: skip
        base_name = "ch-run IMG.sqfs (its own SquashFUSE)"
        cmds = {
            "sifpy exec": as_user + sifpy,
            base_name: [*as_user, "ch-run", str(sqfs), "--", "/bin/true"],
            "sifpy exec, Python only": [*as_user, str(script), *sifpy[1:]],
            # `env` adds one exec (~0.5 ms) to this line only.
            "sifpy exec, squashfuse_ll exec'd": [
                *as_user,
                "env",
                "SIFPY_FUSE_SERVER=squashfuse_ll",
                *sifpy,
            ],
            "ch-run, external squashfuse_ll mount": as_user + full,
        }
        if root:
            cmds["sifpy exec as root (kernel)"] = sifpy
        for spec in a.compare:
            name, _, other = spec.partition("=")
            cmds[f"sifpy exec, {name}"] = [*as_user, other, *sifpy[1:]]
        wall, spent = timed(cmds, a.runs, env)
        subprocess.run([*as_user, "squashfuse_ll", str(sqfs), str(mnt)], check=True, env=env)
        pre = {"ch-run (pre-mounted)": [*as_user, "ch-run", str(mnt), "--", "/bin/true"]}
        try:
            w, c = timed(pre, a.runs, env, frozenset(children()))  # the mount's server
            wall.update(w)
            spent.update(c)
        finally:
            subprocess.run([*as_user, "fusermount3", "-u", str(mnt)], check=True, env=env)
    med = {k: statistics.median(v) for k, v in wall.items()}
    mcpu = {k: statistics.median(v) for k, v in spent.items()}
    base = med["sifpy exec"]
    lines = [
        f"bench/exec: median of {a.runs} alternating runs, /bin/true in a busybox squashfs, "
        f"as {user.pw_name} (uid {user.pw_uid}); .venv/bin/sifpy is the {kind}",
        f"measured on: {provenance()}",
        f"{'':<40} {'wall':>8} {'CPU (user+sys, whole tree)':>28}",
    ]
    lines += [f"  {k:<38} {v * 1000:6.1f} ms {mcpu[k] * 1000:16.1f} ms" for k, v in med.items()]
    for k, v in med.items():
        if k.startswith("ch-run"):
            lines.append(f"ratio sifpy / {k}: {base / v:.2f}x wall, "
                         f"{mcpu['sifpy exec'] / mcpu[k]:.2f}x CPU")  # fmt: skip
    fixed = ["sifpy exec, Python only", "sifpy exec, squashfuse_ll exec'd"]
    fixed.append("sifpy exec as root (kernel)")
    for k in fixed + [f"sifpy exec, {c.partition('=')[0]}" for c in a.compare]:
        if k in med:
            lines.append(f"ratio {k} / {base_name}: {med[k] / med[base_name]:.2f}x")
    target = base / med[base_name]
    lines.append(f"target <= 1.25x (sifpy exec / {base_name}): {target:.2f}x, "
                 f"{'met' if target <= 1.25 else 'NOT met'}")  # fmt: skip
    lines.append("where sifpy's milliseconds go: bench/results/exec-breakdown.txt "
                 "(bench/exec_breakdown.py)")  # fmt: skip
    lines.append("commands (run as the user above through setpriv, except 'as root'):")
    for k, v in {**cmds, **pre}.items():
        shown = v[len(as_user) :] if v[: len(as_user)] == as_user else v
        lines.append(f"  {k}: {shlex.join(shown)}")
    text = "\n".join(lines) + "\n"
    report("exec", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

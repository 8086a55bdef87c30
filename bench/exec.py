"""bench/exec: start-up cost of ``sifpy exec IMG /bin/true`` against Charliecloud's ch-run.

``sifpy`` is the program ``make venv`` installs (.venv/bin/sifpy): the starter, compiled
from sifpy/cli/starter.c, when a C compiler was there. For reference the same start also
runs through the Python-only launcher script (what is installed without a compiler).

Both run the same busybox squashfs, in the same run, as the same unprivileged user (when
started as root: ``--user``, default ``sifpytest`` if it exists, else ``nobody``), so both
mount it with squashfuse_ll. ch-run (Debian's 0.31 has no built-in SquashFUSE) is timed two
ways: as mount + run + unmount (the same work sifpy does on every start; the target's
baseline) and on the squashfs mounted once beforehand (its lower bound). When started as
root, sifpy is also timed as root (the kernel squashfs driver, no FUSE). Runs alternate
between the commands, so that drift in the machine's load hits all of them alike.
Prints the ratios and writes them to bench/results/exec.txt.

    .venv/bin/python bench/exec.py [--runs N] [--user NAME]
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _report import report

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


def timed(cmds: dict[str, list[str]], runs: int, env: dict[str, str]) -> dict[str, list[float]]:
    """Time each command ``runs`` times, alternating between them."""
    for argv in cmds.values():  # warm-up: page cache, Python's bytecode cache
        for _ in range(3):
            subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
    out: dict[str, list[float]] = {k: [] for k in cmds}
    for _ in range(runs):
        for k, argv in cmds.items():
            t = time.perf_counter()
            subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
            out[k].append(time.perf_counter() - t)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--user", help="run as this user when started as root")
    a = ap.parse_args()
    for tool in ("ch-run", "squashfuse_ll", "mksquashfs", "fusermount3", "setpriv"):
        if not shutil.which(tool):
            sys.exit(f"bench/exec needs {tool} (apt-get install charliecloud-runtime squashfuse)")
    sys.path.insert(0, str(REPO))
    from sifpy.sif import ObjectInput, create
    from sifpy.sif import format as F

    root = os.getuid() == 0
    user = pwd.getpwuid(os.getuid())
    if root:
        name = a.user or next(
            n for n in ("sifpytest", "nobody") if n in {p.pw_name for p in pwd.getpwall()}
        )
        user = pwd.getpwnam(name)
    as_user = (
        ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups", "--"]
        if root
        else []
    )
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "USER": user.pw_name,
        "HOME": user.pw_dir,
        "LANG": "C.UTF-8",
    }
    # As an installed sifpy runs: with its bytecode compiled (pip does this on install).
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "sifpy")], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        t.chmod(0o755)
        busybox_root(t / "root")
        sqfs = t / "img.sqfs"
        subprocess.run(["mksquashfs", str(t / "root"), str(sqfs), "-comp", "zstd", "-noappend",
                        "-quiet", "-all-root"], check=True, stdout=subprocess.DEVNULL)  # fmt: skip
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
        cmds = {
            "sifpy exec": as_user + sifpy,
            "ch-run (mount+run+unmount)": as_user + full,
            "sifpy exec, Python only": [*as_user, str(script), *sifpy[1:]],
        }
        if root:
            cmds["sifpy exec as root (kernel)"] = sifpy
        results = timed(cmds, a.runs, env)
        subprocess.run([*as_user, "squashfuse_ll", str(sqfs), str(mnt)], check=True, env=env)
        pre = {"ch-run (pre-mounted)": [*as_user, "ch-run", str(mnt), "--", "/bin/true"]}
        try:
            results.update(timed(pre, a.runs, env))
        finally:
            subprocess.run([*as_user, "fusermount3", "-u", str(mnt)], check=True, env=env)
    med = {k: statistics.median(v) for k, v in results.items()}
    base = med["sifpy exec"]
    lines = [
        f"bench/exec: median of {a.runs} alternating runs, /bin/true in a busybox squashfs, "
        f"as {user.pw_name} (uid {user.pw_uid}); {os.cpu_count()} CPUs; "
        f".venv/bin/sifpy is the {kind}"
    ]
    lines += [f"  {k:<30} {v * 1000:7.1f} ms" for k, v in med.items()]
    for k, v in med.items():
        if k.startswith("ch-run"):
            lines.append(f"ratio sifpy / {k}: {base / v:.2f}x")
    ratio = med["sifpy exec, Python only"] / med["ch-run (mount+run+unmount)"]
    lines.append(f"ratio sifpy, Python only / ch-run (mount+run+unmount): {ratio:.2f}x")
    if "sifpy exec as root (kernel)" in med:
        ratio = med["sifpy exec as root (kernel)"] / med["ch-run (mount+run+unmount)"]
        lines.append(f"ratio sifpy as root (kernel) / ch-run (mount+run+unmount): {ratio:.2f}x")
    target = base / med["ch-run (mount+run+unmount)"]
    lines.append(f"target <= 1.25x (sifpy / ch-run mount+run+unmount): {target:.2f}x, "
                 f"{'met' if target <= 1.25 else 'NOT met'}")  # fmt: skip
    text = "\n".join(lines) + "\n"
    report("exec", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""bench/mpi: start-up of ``mpiexec -n N ... /bin/true`` for N = 1, 2, 4, 8, 16 ranks on one
node (oversubscribed past the core count), in one run:

- bare processes: ``mpiexec -n N /bin/true``;
- Charliecloud's shared container: ``mpiexec -n N ch-run --join-ct=N IMG.sqfs -- /bin/true``
  (its built-in SquashFUSE, one container per node that the peers join);
- ``sifpy exec IMG.sif /bin/true``: a rank of a job, so the ranks share one container per
  node by default (sifpy.runtime.sharens); at N = 1, Hydra says the node runs one rank
  (``MPI_LOCALNRANKS``), and sifpy starts it plainly, without a holder;
- ``sifpy exec --no-sharens``: a container per rank, for reference.

sifpy's image is the same squashfs as ch-run's, inside a SIF. MPICH's Hydra (Debian's
``mpiexec.mpich``) starts the ranks; ``/bin/true`` makes no MPI call, so this measures what
each rank costs to start and to end. The CPU time (user + system) is the whole process
tree's, servers and holders that outlive mpiexec included (this process is a child
subreaper and reaps all of them before the next run); "per extra rank" is the slope between
N = 1 and N = 16. The FUSE servers per node are counted while four ranks run ``sleep 1``:
``squashfuse_ll`` processes, and ch-run processes still running (each ch-run that won its
peer group stays to serve its SquashFUSE mount; the others exec'd, but a peer caught
before its exec counts too, so ch-run's count is an upper bound). Runs alternate between
the commands. Writes bench/results/mpi.txt.

    .venv/bin/python bench/mpi.py [--runs N] [--user NAME]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _harness import become_subreaper, bench_user, busybox_root, cpu, reap_all, squashfs
from _report import provenance, report

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RANKS = (1, 2, 4, 8, 16)
TRUE = ["/bin/true"]
# ch-run --join needs its first peer alive until every peer has joined (its manual's
# caveats): with /bin/true, large N fail. The same start with a short sleep joins reliably.
SLEEP = ["/bin/sleep", "0.3"]


def run(argv: list[str], env: dict[str, str]) -> tuple[float, float, bool]:
    """Wall and CPU seconds of ``argv``, and whether it succeeded."""
    c = cpu()
    t = time.perf_counter()
    done = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    reap_all("bench/mpi", limit=10)  # holders and servers exit after their ranks
    return wall, cpu() - c, done.returncode == 0


def servers(argv: list[str], env: dict[str, str], uid: int) -> int:
    """The most FUSE servers (squashfuse_ll, serving ch-run) seen at once during ``argv``."""
    seen = 0
    done = threading.Event()

    def poll() -> None:
        nonlocal seen
        while not done.is_set():
            n = 0
            for p in os.listdir("/proc"):
                if not p.isdigit():
                    continue
                try:
                    st = Path(f"/proc/{p}/status").read_text()
                except OSError:
                    continue
                fields = dict(ln.split(":", 1) for ln in st.splitlines() if ":" in ln)
                name = fields.get("Name", "").strip()
                if fields.get("Uid", "").split()[:1] == [str(uid)] and name in (
                    "squashfuse_ll",
                    "ch-run",
                ):
                    n += 1
            seen = max(seen, n)
            time.sleep(0.05)

    t = threading.Thread(target=poll)
    t.start()
    try:
        subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
    finally:
        done.set()
        t.join()
    reap_all("bench/mpi", limit=10)
    return seen


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--user", help="run as this user when started as root")
    a = ap.parse_args()
    mpiexec = shutil.which("mpiexec.mpich")
    for tool in ("ch-run", "squashfuse_ll", "mksquashfs", "setpriv"):
        if not shutil.which(tool):
            sys.exit(f"bench/mpi needs {tool} (apt-get install charliecloud-runtime squashfuse)")
    if mpiexec is None:
        sys.exit("bench/mpi needs mpiexec.mpich (apt-get install mpich)")
    become_subreaper("bench/mpi")
    sys.path.insert(0, str(REPO))
    from sifpy.sif import ObjectInput, create
    from sifpy.sif import format as F

    user, as_user, env = bench_user(a.user)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "sifpy")], check=True)
    program = REPO / ".venv" / "bin" / "sifpy"
    kind = "starter" if program.read_bytes()[:4] == b"\x7fELF" else "script"
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        t.chmod(0o755)
        busybox_root(t / "root", ("sh", "true", "sleep"))
        sqfs = t / "img.sqfs"
        squashfs(t / "root", sqfs)
        sif = t / "img.sif"
        create(sif, [ObjectInput.partition(sqfs, F.FSType.SQUASH, F.PartType.PRIMSYS, "amd64")])
        for f in (sqfs, sif):
            f.chmod(0o644)

        def cmds(n: int, argv: list[str]) -> dict[str, list[str]]:
            mpi = [*as_user, mpiexec, "-n", str(n)]
            return {
                "bare": [*mpi, *argv],
                "ch-run --join": [*mpi, "ch-run", f"--join-ct={n}", str(sqfs), "--", *argv],
                "sifpy exec (shared)": [*mpi, str(program), "exec", str(sif), *argv],
                "sifpy exec --no-sharens": [
                    *mpi, str(program), "exec", "--no-sharens", str(sif), *argv
                ],
            }  # fmt: skip

        names = list(cmds(1, TRUE))
        for argv in cmds(2, TRUE).values():  # warm-up: page cache, bytecode
            for _ in range(2):
                run(argv, env)
        tables = {}
        for payload in (TRUE, SLEEP):
            wall: dict[tuple[str, int], list[float]] = {(k, n): [] for k in names for n in RANKS}
            cpu: dict[tuple[str, int], list[float]] = {(k, n): [] for k in names for n in RANKS}
            failed: dict[tuple[str, int], int] = {(k, n): 0 for k in names for n in RANKS}
            for _ in range(a.runs):
                for n in RANKS:
                    for k, argv in cmds(n, payload).items():
                        w, c, ok = run(argv, env)
                        wall[k, n].append(w)
                        cpu[k, n].append(c)
                        failed[k, n] += not ok
            tables[" ".join(payload)] = (wall, cpu, failed)
        fuse = {k: servers(argv, env, user.pw_uid) for k, argv in cmds(4, ["sleep", "1"]).items()}
    lines = [
        f"bench/mpi: `mpiexec.mpich -n N CMD`, median of {a.runs} alternating runs, "
        f"as {user.pw_name} (uid {user.pw_uid}); .venv/bin/sifpy is the {kind}",
        f"measured on: {provenance()}",
    ]
    for payload_name, (wall, cpu, failed) in tables.items():
        mw = {key: statistics.median(v) * 1000 for key, v in wall.items()}
        mc = {key: statistics.median(v) * 1000 for key, v in cpu.items()}
        lines += [
            "",
            f"CMD = {payload_name}: wall ms (CPU ms, user+sys of the whole tree) by ranks N"
            " (! = runs that failed):",
            f"{'':<26}" + "".join(f"{f'N={n}':>18}" for n in RANKS),
        ]
        for k in names:
            cells = ""
            for n in RANKS:
                bad = f" {failed[k, n]}!" if failed[k, n] else ""
                cells += f"{f'{mw[k, n]:.0f} ({mc[k, n]:.0f}){bad}':>18}"
            lines.append(f"{k:<26}{cells}")
        ratios = "".join(
            f"{mw['sifpy exec (shared)', n] / mw['ch-run --join', n]:>17.2f}x" for n in RANKS
        )
        lines.append(f"{'sifpy (shared) / ch-run':<26}{ratios}")
        lines.append(f"{'CPU ms per extra rank':<26}")
        for k in names:
            slope = (mc[k, 16] - mc[k, 1]) / 15
            lines.append(f"  {k:<24}{slope:>8.1f}")
    lines += ["", "FUSE servers on the node while 4 ranks run `sleep 1`:"]
    lines += [f"  {k:<24}{fuse[k]:>8}" for k in names]
    lines += [
        "",
        "commands (N=4):",
        *("  " + " ".join(argv[len(as_user) :]) for argv in cmds(4, TRUE).values()),
    ]
    report("mpi", "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

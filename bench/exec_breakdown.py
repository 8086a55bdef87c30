"""bench/exec_breakdown: where the milliseconds of ``sifpy exec IMG.sif /bin/true`` go.

Two starts are split: the starter's own (sifpy/cli/starter_fast.c: no Python at all, what
such a start gets by default), from the marks a starter built with ``SIFPY_PHASES 1``
writes (no tracer: each mark costs a clock read and a write to a pipe), and the start
through Python (``SIFPY_PYTHON_START=1``: what every start with options, settings or hooks
gets), from a trace as below.

Runs the start under ``strace --seccomp-bpf -f`` tracing only the syscalls that mark a phase
(execve, unshare, fsmount, move_mount, pivot_root, exit_group): with the seccomp filter,
no other syscall stops the process, so the phases keep their length (the total grows by a
few percent). Every phase is the median over the runs, as the user bench/exec runs as
(``--user``, default ``sifpytest``, else ``nobody``). Python's own share is split further
with ``-X importtime`` (the imports of the exec path, in the same interpreter and flags
the starter uses). Writes bench/results/exec-breakdown.txt, which bench/results/exec.txt
names.

    .venv/bin/python bench/exec_breakdown.py [--runs N] [--user NAME]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _harness import bench_user, busybox_root, squashfs
from _report import provenance, report

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# The starter's own start, from its phase marks (a starter built with SIFPY_PHASES 1 writes
# "sifpy-phase NAME NS" at the end of each): (the mark that ends it, what it is).
MARKS = [
    ("main", "setpriv, the kernel's exec of the starter, its dynamic loading"),
    ("checked", "argv, settings, identity, the SIF header"),
    ("namespaces", "user + mount namespaces, the detached FUSE mount"),
    ("forked", "fork the FUSE server (sifpy's own, linked in: no exec) and the read-ahead"),
    ("planned", "plan: the host paths pinned"),
    ("probed", "probe the image's mount points (the FUSE server's first answers)"),
    ("underlay", "session; fork the container: tmpfs root, one bind per image entry"),
    ("binds", "/etc/passwd and /etc/group, /dev, /proc, /sys, home, /tmp binds; root read-only"),
    ("exec", "pivot_root, cwd, no_new_privs, environment, seccomp"),
    ("exited", "the action shell (/.singularity.d environment) and the command (/bin/true)"),
    ("end", "stop the FUSE server"),
    ("reaped", "exit, reaped by the caller"),
]
# The start through Python, from a trace: (name, the event that ends it), matched in order.
PHASES = [
    ("starter: load, parse argv, open the image, read the SIF header", r"unshare\(CLONE_NEWNS\|"),
    ("user + mount namespaces, detached FUSE mount", r"fsmount\("),
    ("fork the FUSE server (squashfuse_ll by default) and the read-ahead", r"execve\(\".*python"),
    ("Python: interpreter start, imports, checks, plan (image served meanwhile)", r"move_mount\("),
    ("assemble the root: tmpfs, binds, /dev, /proc, files", r"pivot_root\("),
    ("pivot_root, identity, seccomp, exec the action shell", r"execve\(\"/bin/sh\""),
    ("the action shell (/.singularity.d environment, exec)", r"execve\(\"/bin/true\""),
    ("the command (/bin/true)", r"exit_group"),
    ("sifpy's end: reap, stop the server, exit", None),
]  # fmt: skip


def phases(trace: str, table: list[tuple[str, str | None]]) -> list[float]:
    """The length of each phase of ``table`` in ms, from one strace -ttt -f log."""
    lines = [ln.split(None, 2) for ln in trace.splitlines() if ln.strip()]
    events = [(float(t), rest) for _pid, t, rest in lines if not rest.startswith(("+++", "---"))]
    t0, out, i = events[0][0], [], 0
    last = t0
    for _name, pattern in table[:-1]:
        assert pattern is not None
        while i < len(events) and not re.match(pattern, events[i][1]):
            i += 1
        if i == len(events):
            raise SystemExit(f"bench/exec_breakdown: no {pattern} in the trace:\n{trace}")
        out.append((events[i][0] - last) * 1000)
        last = events[i][0]
    out.append((events[-1][0] - last) * 1000)
    return out


def phase_marks(stderr: str, start: int, end: int) -> list[float]:
    """The length of each of :data:`MARKS` in ms, from a marked starter's stderr; ``start``
    and ``end``: when the caller spawned it and when it was reaped (CLOCK_MONOTONIC)."""
    at = {}
    for line in stderr.splitlines():
        word, name, ns = [*line.split(), "", "", ""][:3]
        if word == "sifpy-phase":
            at[name] = int(ns)
    at["reaped"] = end
    if set(at) != {name for name, _ in MARKS}:
        raise SystemExit(f"bench/exec_breakdown: phase marks missing: {stderr}")
    out, last = [], start
    for name, _ in MARKS:
        out.append((at[name] - last) / 1e6)
        last = at[name]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--user", help="run as this user when started as root")
    a = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from sifpy.cli import launcher
    from sifpy.sif import ObjectInput, create
    from sifpy.sif import format as F

    user, as_user, env = bench_user(a.user)
    sifpy = str(REPO / ".venv" / "bin" / "sifpy")
    runs: list[list[float]] = []
    marks: list[list[float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        t.chmod(0o755)
        busybox_root(t / "root")
        sqfs, sif = t / "img.sqfs", t / "img.sif"
        squashfs(t / "root", sqfs)
        create(sif, [ObjectInput.partition(sqfs, F.FSType.SQUASH, F.PartType.PRIMSYS, "amd64")])
        sif.chmod(0o644)
        logs = t / "logs"
        logs.mkdir()
        os.chown(logs, user.pw_uid, user.pw_gid)
        log = logs / "trace"
        traced = "execve,unshare,fsmount,move_mount,pivot_root,exit_group"
        marked = str(t / "sifpy-phases")
        launcher.write(
            marked, str(REPO / ".venv" / "bin" / "python"), overrides={"SIFPY_PHASES": "1"}
        )
        os.chmod(t, 0o755)
        for i in range(a.runs + 2):
            argv = ["strace", "--seccomp-bpf", "-f", "-ttt", "-qq", "-o", str(log),
                    "-e", f"trace={traced}", sifpy, "exec", str(sif), "/bin/true"]  # fmt: skip
            done = subprocess.run(
                [*as_user, *argv], env={**env, "SIFPY_PYTHON_START": "1"}, capture_output=True,
                text=True,
            )  # fmt: skip
            if done.returncode != 0:
                sys.exit(f"bench/exec_breakdown: {done.stderr}")
            start = time.monotonic_ns()
            done = subprocess.run(
                [*as_user, marked, "exec", str(sif), "/bin/true"], env=env, capture_output=True,
                text=True,
            )  # fmt: skip
            end = time.monotonic_ns()
            if done.returncode != 0:
                sys.exit(f"bench/exec_breakdown: {done.stderr}")
            if i >= 2:  # warm-up: page cache, bytecode
                runs.append(phases(log.read_text(), PHASES))
                marks.append(phase_marks(done.stderr, start, end))
        # Imports of the exec path, as the starter runs Python (-I -S and its sys.path).
        boot = f"import sys; sys.path += [{str(REPO)!r}]; import sifpy.cli.exec"
        imports = []
        for _ in range(5):
            done = subprocess.run(
                [*as_user, str(REPO / ".venv" / "bin" / "python"), "-IS", "-X", "importtime",
                 "-c", boot], env=env, capture_output=True, text=True, check=True,
            )  # fmt: skip
            top = [ln for ln in done.stderr.splitlines() if ln.rstrip().endswith("sifpy.cli.exec")]
            imports.append(int(top[-1].split("|")[1]) / 1000)
    lines = [
        f"bench/exec_breakdown: `sifpy exec IMG.sif /bin/true` (busybox squashfs), median "
        f"of {a.runs} runs of each start, as {user.pw_name} (uid {user.pw_uid})",
        f"measured on: {provenance()}",
    ]
    for title, table, samples in (
        (
            "the starter's own start (the default for this command, no Python), from its "
            "phase marks (a build with SIFPY_PHASES 1; no tracer):",
            [name for _, name in MARKS],
            marks,
        ),
        (
            "the same start through Python (SIFPY_PYTHON_START=1, what any start with options "
            "gets), under strace --seccomp-bpf:",
            [name for name, _ in PHASES],
            runs,
        ),
    ):
        med = [statistics.median(r[i] for r in samples) for i in range(len(table))]
        lines.append(title)
        lines += [f"  {ms:6.2f} ms  {name}" for name, ms in zip(table, med, strict=True)]
        lines.append(f"  {sum(med):6.2f} ms  total (sum of the medians)")
    lines.append(f"  of the Python phase: importing sifpy.cli.exec and what it imports: "
                 f"{statistics.median(imports):.2f} ms (-X importtime, median of 5)")  # fmt: skip
    lines.append("  ch-run does all of this in C: bench/results/exec.txt has its total.")
    report("exec-breakdown", "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

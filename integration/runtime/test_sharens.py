"""One container per node for the ranks of a job (``--sharens``, the default for a rank of
an MPI or Slurm job) and instances, end to end as the unprivileged test user: the ranks
share one user and mount namespace and one FUSE server, each keeps its own exit status,
and nothing is left once the last one is gone, however they end."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from integration.conftest import UserRunner, require
from integration.runtime.conftest import busybox_rootfs, make_sif, user_processes

HOLDER = "sifpy-holder"  # the holder's process name (sifpy.runtime.sharens.HOLDER_NAME)
WAIT_GO = "while [ ! -e go ]; do sleep 0.05; done"


def live_processes(uid: int, name: str) -> list[int]:
    """Pids of the live (not zombie) processes of ``uid`` named ``name``."""
    return user_processes(uid, name, live=True)


def ns_holders(ns: str) -> list[int]:
    """Pids of every process in the namespace ``ns`` (``mnt:[N]`` as readlink shows it)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/ns/{ns.split(':')[0]}") == ns:
                    out.append(int(entry))
            except OSError:
                pass
    return out


def wait_for(check: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return bool(check())


class Node:
    """sifpy as the test user, with a private runtime directory and a shared cwd."""

    def __init__(self, runner: UserRunner, image: str, cwd: Path, rundir: Path, prog: list[str]):
        self.runner, self.image, self.cwd, self.rundir, self.prog = runner, image, cwd, rundir, prog
        self.uid = runner.user.uid

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {"XDG_RUNTIME_DIR": str(self.rundir), **(extra or {})}

    def __call__(self, *args: str, env: dict[str, str] | None = None, **kw: Any) -> Any:
        kw.setdefault("cwd", str(self.cwd))
        return self.runner([*self.prog, *args], env=self.env(env), **kw)

    def popen(self, *args: str, env: dict[str, str] | None = None, **kw: Any) -> Any:
        kw.setdefault("cwd", str(self.cwd))
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        return self.runner.popen([*self.prog, *args], env=self.env(env), **kw)

    def ranks(self, n: int, script: str, opts: tuple[str, ...] = ()) -> list[Any]:
        """Start ``n`` ranks of one simulated job step (PMI_RANK/PMI_SIZE, one parent)."""
        return [
            self.popen(
                "exec",
                *opts,
                self.image,
                "sh",
                "-c",
                script,
                env={"PMI_RANK": str(i), "PMI_SIZE": str(n)},
            )
            for i in range(n)
        ]

    def squashfuse(self) -> list[int]:
        # squashfuse_ll, or sifpy's own server (the starter's own starts serve with it)
        return live_processes(self.uid, "squashfuse_ll") + live_processes(
            self.uid, "sifpy-sqfs-serv"
        )

    def holders(self) -> list[int]:
        return live_processes(self.uid, HOLDER)


@pytest.fixture(scope="module")
def sharens_image(workdir: Path) -> str:
    def startscript(root: Path) -> None:
        d = root / ".singularity.d"
        d.mkdir()
        (d / "startscript").write_text('#!/bin/sh\necho "started $*" > "$MARK"\nexec sleep 1000\n')
        (d / "startscript").chmod(0o755)

    rootfs = busybox_rootfs(workdir / "sharens-rootfs", startscript)
    return str(make_sif(rootfs, workdir / "sharens.sif")["sif"])


@contextlib.contextmanager
def make_node(runner: UserRunner, image: str, workdir: Path, prog: list[str]) -> Iterator[Node]:
    """A Node in a fresh directory; afterwards, nothing of a shared container outlives its
    members: no server, no holder, no host mount, no socket or lock left behind."""
    tmp_path = Path(tempfile.mkdtemp(prefix="sharens-", dir=workdir))
    os.chmod(tmp_path, 0o755)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    os.chmod(cwd, 0o777)
    rundir = tmp_path / "run"
    rundir.mkdir(mode=0o700)
    os.chown(rundir, runner.user.uid, runner.user.gid)
    before = Path("/proc/self/mountinfo").read_text()
    n = Node(runner, image, cwd, rundir, prog)
    yield n
    assert wait_for(lambda: not n.squashfuse() and not n.holders()), (n.squashfuse(), n.holders())
    assert Path("/proc/self/mountinfo").read_text() == before
    left = [p.name for p in rundir.rglob("*") if p.suffix in (".sock", ".lock", ".json")]
    assert left == []


@pytest.fixture(params=["python", "starter"])
def node(
    request: pytest.FixtureRequest, runtime_ready: UserRunner, sharens_image: str, workdir: Path
) -> Iterator[Node]:
    """sifpy through ``python3 -m sifpy`` and through the starter."""
    prog = ["/usr/bin/python3", "-m", "sifpy"]
    if request.param == "starter":
        prog = [request.getfixturevalue("starter")]
    with make_node(runtime_ready, sharens_image, workdir, prog) as n:
        yield n


@pytest.fixture()
def starter_node(
    runtime_ready: UserRunner, sharens_image: str, workdir: Path, starter: str
) -> Iterator[Node]:
    """sifpy through the starter only."""
    with make_node(runtime_ready, sharens_image, workdir, [starter]) as n:
        yield n


def finish(procs: list[Any]) -> list[tuple[int, str, str]]:
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=60)
        out.append((p.returncode, stdout, stderr))
    return out


def test_ranks_share_one_container(node: Node) -> None:
    """Four ranks of one job step: one user namespace, one mount namespace, one FUSE server
    for all; each rank with its own pid, cwd and exit status."""
    script = (
        'echo "$(readlink /proc/self/ns/user) $(readlink /proc/self/ns/mnt) $$ $(pwd)"; '
        f"{WAIT_GO}; exit $((PMI_RANK + 3))"
    )
    procs = node.ranks(4, script)
    try:
        lines = [p.stdout.readline().split() for p in procs]
        assert all(len(line) == 4 for line in lines), [p.stderr.read() for p in procs]
        assert len(node.squashfuse()) == 1
        assert len(node.holders()) == 1
    finally:
        (node.cwd / "go").touch()
        results = finish(procs)
    assert [r[0] for r in results] == [3, 4, 5, 6], results
    assert len({line[0] for line in lines}) == 1  # the user namespace
    assert len({line[1] for line in lines}) == 1  # the mount namespace
    assert len({line[2] for line in lines}) == 4  # each rank its own process
    assert {line[3] for line in lines} == {str(node.cwd)}
    assert lines[0][1] != f"mnt:[{os.stat('/proc/self/ns/mnt').st_ino}]"


def test_no_sharens_gives_each_rank_its_own(node: Node) -> None:
    """--no-sharens: the ranks of a job get a container each (and so does a plain start)."""
    script = f'echo "$(readlink /proc/self/ns/mnt)"; {WAIT_GO}'
    procs = node.ranks(2, script, ("--no-sharens",))
    try:
        lines = [p.stdout.readline().strip() for p in procs]
        assert len(node.squashfuse()) == 2
        assert node.holders() == []
    finally:
        (node.cwd / "go").touch()
        results = finish(procs)
    assert [r[0] for r in results] == [0, 0], results
    assert len(set(lines)) == 2
    r = node("exec", node.image, "true")
    assert r.returncode == 0, r.stderr
    assert list(node.rundir.iterdir()) == []  # a start outside a job shares nothing


def test_explicit_sharens_outside_a_job(node: Node) -> None:
    """--sharens without a job's variables: processes of one parent share the container;
    options that need a container of its own are refused."""
    r = node("exec", "--sharens", node.image, "sh", "-c", "exit 7")
    assert r.returncode == 7, r.stderr
    r = node("exec", "--sharens", "--pid", node.image, "true")
    assert r.returncode == 125
    assert "--sharens can't be combined with --pid" in r.stderr
    r = node("exec", "--sharens", node.image, "no-such-command")
    assert r.returncode == 127
    assert "no-such-command" in r.stderr


def test_sigkilled_ranks_leave_nothing(node: Node) -> None:
    """SIGKILL the first rank (which started the holder), then the others: the container
    keeps serving the survivors, and once all are gone no FUSE server, holder, process in
    the container's namespaces or mount is left (the fixture checks the rest)."""
    wait_own = 'while [ ! -e "go$PMI_RANK" ]; do sleep 0.05; done'
    procs = node.ranks(3, f"readlink /proc/self/ns/mnt; {wait_own}; cat /etc/image-marker")
    mnt = ""
    try:
        mnt = procs[0].stdout.readline().strip()
        for p in procs[1:]:
            assert p.stdout.readline().strip() == mnt
        assert len(node.squashfuse()) == 1
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait(timeout=10)
        time.sleep(0.2)
        assert len(node.squashfuse()) == 1  # the others still need it
        assert len(node.holders()) == 1
        (node.cwd / "go1").touch()
        assert procs[1].communicate(timeout=30)[0] == "from the image\n"
        procs[2].send_signal(signal.SIGKILL)
    finally:
        for p in procs:
            with_kill(p)
    assert procs[0].returncode == -signal.SIGKILL
    assert procs[2].returncode == -signal.SIGKILL
    assert wait_for(lambda: not node.squashfuse() and not node.holders())
    assert mnt.startswith("mnt:[")
    assert wait_for(lambda: ns_holders(mnt) == [])


def test_openmpi_ranks_join_through_the_starter(starter_node: Node) -> None:
    """Under Open MPI's mpirun (a PMIx job directory in the host's /tmp, bound into the
    container), the ranks after the first join through the starter too: the holder plans
    them with the job directory the first rank found, though its own /tmp hides it."""
    node = starter_node
    mpirun = shutil.which("mpirun.openmpi")
    strace = shutil.which("strace")
    require(
        None if mpirun and strace else "mpirun.openmpi (openmpi-bin) or strace is not installed"
    )
    assert mpirun is not None and strace is not None
    script = 'echo "$OMPI_COMM_WORLD_RANK $(readlink /proc/self/ns/mnt)"'
    rank = [*node.prog, "exec", node.image, "sh", "-c", script]
    r, starts = traced(node, [mpirun, "--oversubscribe", "-n", "4", *rank])
    assert r.returncode == 0, r.stderr
    lines = sorted(line.split() for line in r.stdout.splitlines())
    assert [line[0] for line in lines] == ["0", "1", "2", "3"], r.stdout
    assert len({line[1] for line in lines}) == 1
    assert starts == 1  # PMIx: the holder is Python's


def traced(node: Node, argv: list[str]) -> tuple[subprocess.CompletedProcess[str], int]:
    """Run ``argv`` as the test user in the node's cwd under ``strace -ff`` (execve only);
    its result, and how many processes exec'd the interpreter (a trace file per process:
    no call of one is split by another's)."""
    strace = shutil.which("strace")
    assert strace is not None  # each caller requires it
    trace = node.cwd / "trace"
    r = subprocess.run(
        [strace, "-ff", "-qq", "-o", str(trace), "-e", "trace=execve", *node.runner.argv(argv)],
        env=node.runner.env(node.env()),
        cwd=str(node.cwd),
        capture_output=True,
        text=True,
        timeout=60,
    )
    n = 0
    for f in trace.parent.glob(f"{trace.name}.*"):
        lines = f.read_text().splitlines()
        n += any(ln.startswith('execve("/usr/bin/python3"') and ln.endswith("= 0") for ln in lines)
    return r, n


def with_kill(p: Any) -> None:
    if p.poll() is None:
        p.kill()
    p.communicate(timeout=30)


LAUNCHERS = {
    "mpich": ["mpiexec.mpich", "-n", "4"],  # Hydra: PMI_RANK, a PMI socket per rank
    "openmpi": ["mpirun.openmpi", "--oversubscribe", "-n", "4"],  # PMIx: PMIX_NAMESPACE
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_mpiexec_ranks_share_by_default(node: Node, launcher: str) -> None:
    """Under a real launcher (MPICH's Hydra, Open MPI's mpirun), the ranks share the
    container by default."""
    argv = LAUNCHERS[launcher]
    program = shutil.which(argv[0])
    require(None if program else f"{argv[0]} (Debian's {launcher}) is not installed")
    assert program is not None
    script = 'echo "$PMI_RANK$OMPI_COMM_WORLD_RANK $(readlink /proc/self/ns/user)'
    script += ' $(readlink /proc/self/ns/mnt)"'
    r = node.runner(
        [program, *argv[1:], *node.prog, "exec", node.image, "sh", "-c", script],
        env=node.env(),
        cwd=str(node.cwd),
    )
    assert r.returncode == 0, r.stderr
    lines = sorted(line.split() for line in r.stdout.splitlines())
    assert [line[0] for line in lines] == ["0", "1", "2", "3"], r.stdout
    assert len({line[1] for line in lines}) == 1, r.stdout + r.stderr
    assert len({line[2] for line in lines}) == 1


def run_step(node: Node, body: str, timeout: float = 60) -> Any:
    """Run ``body`` as one shell, the "launcher" whose children are the job step's ranks
    (``$rank``: sifpy exec of the node's image)."""
    rank = " ".join(shlex.quote(x) for x in [*node.prog, "exec", node.image])
    return node.runner(
        ["sh", "-c", f"rank={shlex.quote(rank)}\n{body}"],
        env=node.env(),
        cwd=str(node.cwd),
        timeout=timeout,
    )


NS_LINE = 'echo "$PMI_RANK $(readlink /proc/self/ns/user) $(readlink /proc/self/ns/mnt)"'


def test_late_rank_joins_the_container(node: Node) -> None:
    """A rank the node starts late (a loaded node: rank 0 done, its holder idle, long before
    rank 1 starts) still joins the step's container when the launcher said how many ranks
    the node runs: one container per step, never one per burst of ranks."""
    body = f"""
        MPI_LOCALNRANKS=2 PMI_RANK=0 $rank sh -c '{NS_LINE}' &
        wait $!
        sleep 1
        MPI_LOCALNRANKS=2 PMI_RANK=1 $rank sh -c '{NS_LINE}' &
        wait $!
    """
    r = run_step(node, body)
    assert r.returncode == 0, r.stderr
    lines = [line.split() for line in r.stdout.splitlines()]
    assert [line[0] for line in lines] == ["0", "1"], r.stdout
    assert lines[0][1:] == lines[1][1:], r.stdout


SLURM_RANK = {"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3"}


@pytest.mark.parametrize(
    "local",
    [
        {"PMI_RANK": "0", "PMI_SIZE": "2", "MPI_LOCALNRANKS": "1"},  # Hydra
        {**SLURM_RANK, "SLURM_NODEID": "1", "SLURM_STEP_TASKS_PER_NODE": "2,1"},
        {**SLURM_RANK, "SLURM_NODEID": "2", "SLURM_STEP_TASKS_PER_NODE": "3(x2),1"},
    ],
    ids=["hydra", "slurm", "slurm-repeated"],
)
def test_only_rank_on_node_starts_plainly(node: Node, local: dict[str, str]) -> None:
    """The launcher says this node runs one rank of the step: nothing to share, so no
    holder (its cost is the first rank's start-up); --sharens still asks for one."""
    script = f"echo up; {WAIT_GO}"
    for opts, holders in (((), 0), (("--sharens",), 1)):
        env = local
        p = node.popen("exec", *opts, node.image, "sh", "-c", script, env=env)
        try:
            assert p.stdout.readline() == "up\n"
            assert len(node.holders()) == holders, opts
        finally:
            (node.cwd / "go").touch()
            _, stderr = p.communicate(timeout=60)
            (node.cwd / "go").unlink()
        assert p.returncode == 0, stderr


def test_many_first_ranks_one_container(node: Node) -> None:
    """Twelve ranks starting at once, none finding a container yet: one creates it, all
    join it (one holder, one FUSE server), whatever the order they get there in."""
    n = 12
    body = f"""
        i=0
        while [ $i -lt {n} ]; do
            MPI_LOCALNRANKS={n} PMI_RANK=$i $rank sh -c '{NS_LINE}; {WAIT_GO}' > out$i &
            i=$((i + 1))
        done
        while [ "$(cat out* | wc -l)" -lt {n} ]; do sleep 0.05; done
        live() {{ ps -o stat=,comm= -u "$(id -u)" | awk -v n="$1" '$1 !~ /^Z/ && $2 == n' | wc -l; }}
        echo "holders $(live {HOLDER})"
        echo "servers $(( $(live squashfuse_ll) + $(live sifpy-sqfs-serv) ))"
        touch go
        wait
        cat out*
    """
    r = run_step(node, body, timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert out[:2] == ["holders 1", "servers 1"], r.stdout
    lines = sorted((line.split() for line in out[2:]), key=lambda line: int(line[0]))
    assert [line[0] for line in lines] == [str(i) for i in range(n)], r.stdout
    assert len({tuple(line[1:]) for line in lines}) == 1, r.stdout


def test_holder_ends_with_launcher_of_missing_ranks(node: Node) -> None:
    """Ranks said to come that never do (they failed before sifpy started): the holder
    waits for them only while their launcher lives, then goes (no mount left behind)."""
    r = run_step(node, f"MPI_LOCALNRANKS=3 PMI_RANK=0 $rank sh -c '{NS_LINE}'")
    assert r.returncode == 0, r.stderr
    # The launcher (the shell) is gone: the holder follows at once, well before its 60 s.
    assert wait_for(lambda: not node.holders(), timeout=5), node.holders()


def test_instance_start_list_exec_stop(node: Node) -> None:
    """An instance runs the image's %startscript (with its arguments), is listed, can be
    joined with instance://NAME, and stopping it ends every process in it."""
    mark = node.cwd / "started"
    env = {"MARK": str(mark)}
    r = node("instance", "start", node.image, "inst1", "a", "b", env=env)
    assert r.returncode == 0, r.stderr
    try:
        # The script's shell creates the file, then writes it: wait for the whole line.
        assert wait_for(lambda: mark.exists() and mark.read_text().endswith("\n"))
        assert mark.read_text() == "started a b\n"
        r = node("instance", "start", node.image, "inst1")
        assert r.returncode != 0 and "inst1" in r.stderr
        r = node("instance", "list", "--json")
        assert r.returncode == 0, r.stderr
        (entry,) = json.loads(r.stdout)["instances"]
        assert entry["instance"] == "inst1"
        assert entry["img"] == node.image
        assert entry["pid"] in node.holders()
        assert "inst1" in node("instance", "list").stdout
        r = node("exec", "instance://inst1", "sh", "-c", "readlink /proc/self/ns/mnt; exit 4")
        assert r.returncode == 4, r.stderr
        r2 = node("exec", "instance://inst1", "readlink", "/proc/self/ns/mnt")
        assert r2.stdout == r.stdout
        sleepers = live_processes(node.uid, "sleep")
        assert len(sleepers) == 1  # the start script, exec'd into sleep
        assert os.readlink(f"/proc/{sleepers[0]}/ns/mnt") == r.stdout.strip()
        assert len(node.squashfuse()) == 1
    finally:
        r = node("instance", "stop", "inst1")
    assert r.returncode == 0, r.stderr
    assert live_processes(node.uid, "sleep") == []
    assert json.loads(node("instance", "list", "--json").stdout)["instances"] == []
    r = node("exec", "instance://inst1", "true")
    assert r.returncode == 125 and "not running" in r.stderr
    r = node("instance", "stop", "inst1")
    assert r.returncode != 0 and "not running" in r.stderr


def test_instance_stop_all_without_startscript(node: Node, images: dict[str, Any]) -> None:
    """An image without %startscript: the instance stays up anyway; stop -a ends all."""
    plain = images["plain"]["sif"]
    for name in ("one", "two"):
        r = node("instance", "start", plain, name)
        assert r.returncode == 0, r.stderr
    listed = node("instance", "list").stdout
    assert "one" in listed and "two" in listed
    assert len(node.squashfuse()) == 2
    r = node("exec", "instance://two", "cat", "/etc/image-marker")
    assert r.stdout == "from the image\n", r.stderr
    r = node("instance", "stop", "-a")
    assert r.returncode == 0, r.stderr
    assert json.loads(node("instance", "list", "--json").stdout)["instances"] == []


# A plain start: the starter makes its holder too (starter_holder.c), no Python at all; with
# an option it leaves to Python (--env), the rank that creates the container starts Python.
PYTHON_STARTS = [((), 0), (("--env", "SHARED=1"), 1)]


@pytest.mark.parametrize(("opts", "pythons"), PYTHON_STARTS)
def test_starter_joins_without_python(
    starter_node: Node, opts: tuple[str, ...], pythons: int
) -> None:
    """With the holder up, the starter joins it itself: of four ranks, only the first may
    start Python (the one that creates the container); each keeps its exit status."""
    strace = shutil.which("strace")
    require(None if strace else "strace is not installed")
    assert strace is not None
    node = starter_node
    rank = " ".join(shlex.quote(x) for x in [*node.prog, "exec", *opts, node.image])
    script = f"""
        PMI_RANK=0 PMI_SIZE=4 {rank} sh -c 'echo up; {WAIT_GO}' > first &
        first=$!
        while [ ! -s first ]; do sleep 0.05; done
        for i in 1 2 3; do
            PMI_RANK=$i PMI_SIZE=4 {rank} sh -c 'exit $((PMI_RANK + 10))' & pids="$pids $!"
        done
        for p in $pids; do wait $p; echo "rc $?"; done
        touch go
        wait $first; echo "rc $?"
    """
    r, starts = traced(node, ["sh", "-c", script])
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:4] == ["rc 11", "rc 12", "rc 13", "rc 0"], r.stdout
    assert starts == pythons


@pytest.mark.parametrize(("opts", "pythons"), PYTHON_STARTS)
def test_ranks_starting_together_start_python_once(
    starter_node: Node, opts: tuple[str, ...], pythons: int
) -> None:
    """Ranks that start together (mpiexec -n 4, no holder yet): one creates the container
    (through Python only where the start needs it), the others wait for it and join through
    the starter."""
    node = starter_node
    mpiexec = shutil.which("mpiexec.mpich")
    strace = shutil.which("strace")
    require(None if mpiexec and strace else "mpiexec.mpich (mpich) or strace is not installed")
    assert mpiexec is not None and strace is not None
    script = 'echo "$PMI_RANK $(readlink /proc/self/ns/mnt)"; exit $((PMI_RANK + 1))'
    rank = [*node.prog, "exec", *opts, node.image, "sh", "-c", script]
    r, starts = traced(node, [mpiexec, "-n", "4", *rank])
    # Hydra exits with its ranks' statuses OR'ed together: 1 | 2 | 3 | 4 (each its own).
    assert r.returncode == 7, r.stderr
    lines = sorted(line.split() for line in r.stdout.splitlines())
    assert [line[0] for line in lines] == ["0", "1", "2", "3"], r.stdout
    assert len({line[1] for line in lines}) == 1
    assert starts == pythons

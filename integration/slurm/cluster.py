"""A single-node Slurm cluster of our own: munged, slurmctld and slurmd, started as root
from a private directory (configuration, state, spool, sockets, logs; the ports are free
ones), found by clients through ``SLURM_CONF``, and stopped by pid.

Nothing global is touched: the munge daemon has its own socket (slurm.conf's ``AuthInfo``),
so other clusters (or another test session) on the machine are left alone.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

TOOLS = ("munged", "slurmctld", "slurmd", "srun", "sinfo")


def missing() -> str | None:
    """Why a cluster can't be started here (None if it can)."""
    if os.getuid() != 0:
        return "starting Slurm needs root"
    for tool in TOOLS:
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian: slurm-wlm, munge)"
    for user in ("munge", "slurm"):
        try:
            pwd.getpwnam(user)
        except KeyError:
            return f"no {user} user (Debian: slurm-wlm, munge)"
    return None


# What a Slurm on one machine needs whatever its layout (plugins that need no cgroups or
# accounting daemon, PMI-2 by default); the virtual cluster (vcluster.py) uses them too.
SETTINGS = """ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=pmi2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(
    ready: Callable[[], bool],
    what: str,
    procs: Callable[[], Sequence[subprocess.Popen[bytes]]],
    log: Callable[[], str],
    timeout: float = 30,
) -> None:
    """Poll ``ready`` until it holds; fail with the daemons' ``log`` as soon as one of
    ``procs`` has exited, or after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not ready():
        for proc in procs():
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args!r} exited {proc.returncode}\n{log()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}\n{log()}")
        time.sleep(0.05)


class Cluster:
    """The running cluster; :meth:`env` is what a client (``srun``) needs."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.node = socket.gethostname().split(".")[0]
        self.conf = base / "slurm.conf"
        self.procs: list[subprocess.Popen[bytes]] = []

    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def log(self) -> str:
        """The daemons' logs, for a failure message."""
        out = []
        for name in ("munged.log", "slurmctld.log", "slurmd.log", "munged.out"):
            path = self.base / "log" / name
            if path.exists():
                out.append(f"--- {name}\n{path.read_text()[-3000:]}")
        return "\n".join(out)

    def start(self) -> None:
        munge, slurm = pwd.getpwnam("munge"), pwd.getpwnam("slurm")
        for sub, owner, mode in (
            ("munge", munge, 0o755),
            ("log", slurm, 0o755),
            ("ctld", slurm, 0o700),
            ("spool", None, 0o755),
        ):
            path = self.base / sub
            path.mkdir(mode=mode)
            path.chmod(mode)
            if owner is not None:
                os.chown(path, owner.pw_uid, owner.pw_gid)
        key = self.base / "munge" / "munge.key"  # a key of our own: no global state
        key.write_bytes(os.urandom(128))
        key.chmod(0o400)
        os.chown(key, munge.pw_uid, munge.pw_gid)
        sock = self.base / "munge" / "munge.socket"
        b = self.base
        self.conf.write_text(
            f"""ClusterName=sifpy
SlurmctldHost={self.node}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=slurm
AuthType=auth/munge
AuthInfo=socket={sock}
CredType=cred/munge
StateSaveLocation={b}/ctld
SlurmdSpoolDir={b}/spool
SlurmctldPidFile={b}/ctld/slurmctld.pid
SlurmdPidFile={b}/spool/slurmd.pid
SlurmctldLogFile={b}/log/slurmctld.log
SlurmdLogFile={b}/log/slurmd.log
{SETTINGS}NodeName={self.node} CPUs={os.cpu_count() or 1} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""
        )
        self.conf.chmod(0o644)
        env = dict(os.environ, SLURM_CONF=str(self.conf))
        as_munge = ["setpriv", f"--reuid={munge.pw_uid}", f"--regid={munge.pw_gid}"]
        self._spawn(
            "munged",
            [
                *as_munge,
                "--init-groups",
                "munged",
                "--foreground",
                f"--socket={sock}",
                f"--pid-file={b}/munge/munged.pid",
                f"--log-file={b}/log/munged.log",
                f"--seed-file={b}/munge/munged.seed",
                f"--key-file={key}",
            ],
            env,
        )
        self._wait(lambda: sock.exists(), "munged's socket")
        self._spawn("slurmctld", ["slurmctld", "-D", "-i"], env)  # -i: ignore saved state
        self._spawn("slurmd", ["slurmd", "-D"], env)

        def idle() -> bool:
            res = subprocess.run(
                ["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True
            )
            return res.stdout.strip() == "idle"

        self._wait(idle, "the node to be idle")

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        """Start a daemon in the foreground (its pid is the Popen's), output to a log."""
        with open(self.base / "log" / f"{name}.out", "wb") as log:
            self.procs.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT))

    def _wait(self, ready: Callable[[], bool], what: str, timeout: float = 30) -> None:
        wait_until(ready, what, lambda: self.procs, self.log, timeout)

    def stop(self) -> None:
        """Stop the daemons by pid, last started first, and wait for them."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()


def start() -> Cluster:
    base = Path(tempfile.mkdtemp(prefix="sifpy-slurm-", dir="/var/spool"))
    base.chmod(0o755)
    cluster = Cluster(base)
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    return cluster

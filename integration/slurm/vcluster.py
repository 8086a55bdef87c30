"""A virtual Slurm cluster of several nodes on this one machine: every "machine" (a head
node running slurmctld, and compute nodes running slurmd) is a network, mount, UTS and IPC
namespace of its own, with its own hostname, addresses, ``/run``, ``/tmp`` and spool; the
nodes reach each other and the head over veth pairs on a bridge, and only there.

Why namespaces rather than several slurmds on one host: Debian's slurmd is not built with
``--enable-multiple-slurmd``, and a real node has a hostname, a network and node-local
directories of its own (sifpy's per-node containers are found through the node's ``/tmp``;
Slurm's PMIx server keeps its data store in the node's spool). Each slurmd here finds its
node name from its own hostname, as on a real cluster.

Layout (addresses are private, and live only inside namespaces this module made)::

    head   (vhead)    br0 10.250.0.1/24   munged, slurmctld, and the clients (srun, sinfo)
      ├─ vc-vnode1 ══ eth0 of vnode1 10.250.0.2/24   munged, slurmd
      └─ vc-vnode2 ══ eth0 of vnode2 10.250.0.3/24   munged, slurmd

Nothing of it is in the host's network namespace: the bridge is in the head's, each veth
pair joins the head's namespace to a node's, so the host's network configuration is never
touched and everything disappears with the namespaces. A namespace lives as long as a
process in it: each is held by a ``sleep`` (which dies with the test process through a
parent-death signal, should the test process die without cleaning up) and the daemons
started in it; :meth:`VirtualCluster.stop` stops all of them by pid.

Paths that must look the same on every node (the images and the test's copy of sifpy: a
"parallel file system") are bound into each node's private ``/tmp`` at their own path; the
rest of the file system is shared as it is. All machines use one munge key, each its own
munged on its own ``/run/munge`` socket (munge's default path, private to the machine).
"""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from integration.slurm import cluster

SUBNET = "10.250.0"  # private (RFC 1918); only ever configured inside our namespaces
NAMESPACES = ("--net", "--mount", "--uts", "--ipc")
TOOLS = ("ip", "unshare", "nsenter", "mount")


def missing() -> str | None:
    """Why a virtual cluster can't be started here (None if it can)."""
    why = cluster.missing()
    if why:
        return why
    for tool in TOOLS:
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian: iproute2, util-linux, mount)"
    # Bridges and veth pairs in a network namespace of our own: the kernel must offer both.
    res = subprocess.run(
        [
            "unshare",
            "--net",
            "sh",
            "-c",
            "ip link add br0 type bridge && ip link add v0 type veth peer name v1",
        ],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        return f"can't make a bridge and a veth pair in a network namespace: {res.stderr.strip()}"
    return None


class Machine:
    """One namespace set (network, mount, UTS, IPC), held by a process: a "machine"."""

    def __init__(self, name: str, addr: str, root: Path) -> None:
        self.name = name
        self.addr = addr
        self.root = root  # this machine's private directories: run/, tmp/
        self.holder: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.holder is not None
        return self.holder.pid

    def enter(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this machine (nsenter execs it: the pid stays the command's)."""
        return ["nsenter", f"--target={self.pid}", *NAMESPACES, "--", *argv]

    def sh(self, script: str) -> None:
        """Run a shell script inside this machine as root; fail with its output."""
        res = subprocess.run(self.enter(["sh", "-euc", script]), capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{self.name}: {script!r} failed:\n{res.stdout}{res.stderr}")

    def net_ns(self) -> str:
        return os.readlink(f"/proc/{self.pid}/ns/net")

    def unshared(self) -> bool:
        """Whether the holder has its namespaces yet (``unshare`` has run)."""
        return self.net_ns() != os.readlink("/proc/self/ns/net")

    def counters(self, dev: str) -> tuple[int, int]:
        """(received, sent) bytes of a network device in this machine's namespace."""
        for line in Path(f"/proc/{self.pid}/net/dev").read_text().splitlines()[2:]:
            name, _, fields = line.partition(":")
            if name.strip() == dev:
                values = fields.split()
                return int(values[0]), int(values[8])
        raise KeyError(f"{self.name} has no network device {dev}")


class VirtualCluster:
    """The running cluster: :meth:`on_head` runs a client where ``srun`` can reach every node."""

    def __init__(
        self, base: Path, nodes: int, shared: Sequence[str], private_tmp: bool = True
    ) -> None:
        self.base = base
        self.private_tmp = private_tmp
        self.conf = base / "slurm.conf"
        self.shared = [os.path.realpath(p) for p in shared]
        self.head = Machine("vhead", f"{SUBNET}.1", base / "vhead")
        self.nodes = [
            Machine(f"vnode{i}", f"{SUBNET}.{i + 1}", base / f"vnode{i}")
            for i in range(1, nodes + 1)
        ]
        self.daemons: list[subprocess.Popen[bytes]] = []

    @property
    def machines(self) -> list[Machine]:
        return [self.head, *self.nodes]

    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def on_head(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run on the head node, where the clients (srun, sinfo) run."""
        return self.head.enter(argv)

    def log(self) -> str:
        """The daemons' logs, for a failure message."""
        out = []
        for m in self.machines:
            for name in ("munge/munged.log", "log/slurmctld.log", "log/slurmd.log"):
                path = m.root / "run" / name
                if path.exists():
                    out.append(f"--- {m.name}: {name}\n{path.read_text()[-3000:]}")
            for path in sorted((m.root / "out").glob("*.out")):
                out.append(f"--- {m.name}: {path.name}\n{path.read_text()[-1000:]}")
        return "\n".join(out)

    # -- bring-up --------------------------------------------------------------------

    def start(self) -> None:
        munge, slurm = pwd.getpwnam("munge"), pwd.getpwnam("slurm")
        key = self.base / "munge.key"  # one key for every machine, as on a real cluster
        key.write_bytes(os.urandom(128))
        key.chmod(0o400)
        os.chown(key, munge.pw_uid, munge.pw_gid)
        hosts = self.base / "hosts"  # every machine resolves every other one's name
        hosts.write_text(
            "127.0.0.1 localhost\n" + "".join(f"{m.addr} {m.name}\n" for m in self.machines)
        )
        hosts.chmod(0o644)
        self._write_conf()
        for m in self.machines:
            self._make_dirs(m, munge, slurm)
            self._hold(m)
        for m in self.machines:
            self._wait(m.unshared, f"{m.name}'s namespaces")
            self._setup(m)
        self._network()
        env = dict(os.environ, SLURM_CONF=str(self.conf))
        for m in self.machines:
            self._munged(m, key, munge, env)
        for m in self.machines:
            sock = m.root / "run" / "munge" / "munge.socket.2"
            self._wait(sock.exists, f"munged's socket on {m.name}")
        self._spawn(self.head, "slurmctld", ["slurmctld", "-D", "-i"], env)
        for node in self.nodes:
            self._spawn(node, "slurmd", ["slurmd", "-D"], env)
        self._wait(self._idle, "every node to be idle")

    def _write_conf(self) -> None:
        # The ports are Slurm's defaults: every machine has a network of its own.
        nodes = "".join(
            f"NodeName={n.name} NodeAddr={n.addr} CPUs={os.cpu_count() or 1} State=UNKNOWN\n"
            for n in self.nodes
        )
        self.conf.write_text(
            f"""ClusterName=sifpyv
SlurmctldHost={self.head.name}({self.head.addr})
SlurmUser=slurm
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=/run/slurmctld
SlurmdSpoolDir=/run/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/run/log/slurmctld.log
SlurmdLogFile=/run/log/slurmd.log
{cluster.SETTINGS}{nodes}PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""
        )
        self.conf.chmod(0o644)

    def _make_dirs(self, m: Machine, munge: pwd.struct_passwd, slurm: pwd.struct_passwd) -> None:
        """The machine's own /run (munge's socket, Slurm's state, spool and logs), its own
        /tmp, and a directory for the daemons' output."""
        for sub, owner, mode in (
            ("run", None, 0o755),
            ("run/munge", munge, 0o755),
            ("run/log", slurm, 0o755),
            ("run/slurmctld", slurm, 0o700),
            ("tmp", None, 0o1777),
            ("out", None, 0o755),
        ):
            path = m.root / sub
            path.mkdir(parents=True, mode=mode)
            path.chmod(mode)
            if owner is not None:
                os.chown(path, owner.pw_uid, owner.pw_gid)
        for shared in self.shared:
            rel = os.path.relpath(shared, "/tmp")
            if not rel.startswith(".."):
                (m.root / "tmp" / rel).mkdir(parents=True, exist_ok=True)

    def _hold(self, m: Machine) -> None:
        """Start the process that holds the machine's namespaces; it dies with us."""
        m.holder = subprocess.Popen(
            [
                "setpriv",
                "--pdeathsig=KILL",
                "unshare",
                *NAMESPACES,
                "--propagation=private",
                "sleep",
                "infinity",
            ],
            stdin=subprocess.DEVNULL,
        )

    def _setup(self, m: Machine) -> None:
        """Hostname, /etc/hosts, private /run and /tmp (with the shared paths), loopback."""
        q = shlex.quote
        binds = []
        for shared in self.shared:
            rel = os.path.relpath(shared, "/tmp")
            if not rel.startswith(".."):
                binds.append(f"mount --bind {q(shared)} {q(str(m.root / 'tmp' / rel))}")
        m.sh(
            "\n".join(
                [
                    f"hostname {q(m.name)}",
                    f"mount --bind {q(str(self.base / 'hosts'))} /etc/hosts",
                    *binds,
                    *([f"mount --rbind {q(str(m.root / 'tmp'))} /tmp"] if self.private_tmp else []),
                    f"mount --bind {q(str(m.root / 'run'))} /run",
                    "ip link set lo up",
                ]
            )
        )

    def _network(self) -> None:
        """The bridge on the head, a veth pair from it to each node."""
        self.head.sh(
            f"ip link add br0 type bridge\n"
            f"ip addr add {self.head.addr}/24 dev br0\n"
            f"ip link set br0 up\n"
        )
        for n in self.nodes:
            self.head.sh(
                f"ip link add vc-{n.name} type veth peer name eth0 netns {n.pid}\n"
                f"ip link set vc-{n.name} master br0 up\n"
            )
            n.sh(f"ip addr add {n.addr}/24 dev eth0\nip link set eth0 up\n")

    def _munged(self, m: Machine, key: Path, munge: pwd.struct_passwd, env: dict[str, str]) -> None:
        as_munge = ["setpriv", f"--reuid={munge.pw_uid}", f"--regid={munge.pw_gid}"]
        argv = [
            *as_munge,
            "--init-groups",
            "munged",
            "--foreground",
            "--socket=/run/munge/munge.socket.2",
            "--pid-file=/run/munge/munged.pid",
            "--log-file=/run/munge/munged.log",
            "--seed-file=/run/munge/munged.seed",
            f"--key-file={key}",
        ]
        self._spawn(m, "munged", argv, env)

    def _idle(self) -> bool:
        res = subprocess.run(
            self.on_head(["sinfo", "-h", "-N", "-o", "%N %T"]),
            env=dict(os.environ, **self.env()),
            capture_output=True,
            text=True,
        )
        want = sorted(f"{n.name} idle" for n in self.nodes)
        return sorted(res.stdout.splitlines()) == want

    def _spawn(self, m: Machine, name: str, argv: list[str], env: dict[str, str]) -> None:
        """Start a daemon in the foreground inside ``m`` (its pid is the Popen's)."""
        with open(m.root / "out" / f"{name}.out", "wb") as log:
            self.daemons.append(
                subprocess.Popen(
                    m.enter(argv),
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )

    def _wait(self, ready: Callable[[], bool], what: str, timeout: float = 30) -> None:
        def procs() -> list[subprocess.Popen[bytes]]:
            return [*self.daemons, *(m.holder for m in self.machines if m.holder)]

        cluster.wait_until(ready, what, procs, self.log, timeout)

    # -- teardown --------------------------------------------------------------------

    def stop(self) -> None:
        """Stop the daemons by pid, last started first, then the namespaces' holders: the
        namespaces, and with them the bridge, the veth pairs and the mounts, go away."""
        procs = [*reversed(self.daemons), *(m.holder for m in self.machines if m.holder)]
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.daemons.clear()
        for m in self.machines:
            m.holder = None


def start(nodes: int = 2, shared: Sequence[str] = (), private_tmp: bool = True) -> VirtualCluster:
    """A virtual cluster of ``nodes`` compute nodes and a head; ``shared``: paths under /tmp
    every node sees (others are visible everywhere anyway); ``private_tmp=False``: the
    nodes share the host's /tmp (as a site with /tmp on a shared file system would)."""
    base = Path(tempfile.mkdtemp(prefix="sifpy-vcluster-", dir="/var/spool"))
    base.chmod(0o755)
    vc = VirtualCluster(base, nodes, shared, private_tmp)
    try:
        vc.start()
    except BaseException:
        vc.stop()
        shutil.rmtree(base, ignore_errors=True)
        raise
    return vc

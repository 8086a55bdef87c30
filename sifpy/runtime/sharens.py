"""One container per node, joined by every rank of a job step (``--sharens``), and named,
long-lived containers on the same machinery (instances): the job step, the container's
key, the lock and socket the ranks meet at, and a rank's join. The holder is
:mod:`sifpy.runtime.sharens_holder`; instances are :mod:`sifpy.runtime.instances`.

Why: with a container per rank, every rank has its own user namespace, so MPI's shared
memory between ranks fails (UCX opens its peer's ``/proc/PID/fd/N`` and calls
``process_vm_readv``: both refused across user namespaces), and every rank pays for its
own FUSE server, decompressing the same blocks again. pyxis/enroot create the container
once per node and the tasks join it through saved namespace fds; this is the same design.

Process structure::

    holder (one per node and key)   its own session, no parent to die with; user + mount
    │                               namespaces, the image's FUSE server, a socket the ranks
    │                               join through; it watches every rank (a pidfd each) and
    │                               ends everything when the last one is gone
    ├─ squashfuse_ll -f             the FUSE server (PDEATHSIG: dies with the holder)
    └─ keeper                       pivoted into the container root; its mount namespace is
                                    the container's (PDEATHSIG: dies with the holder)
    rank (sifpy exec, any parent)   joins: setns(user), setns(mnt), chdir, exec the command
                                    itself: its pid, cwd, environment and exit status stay
                                    its own; no monitor per rank

The first rank, holding the key's lock, starts the holder and waits until it is ready; every
rank then connects, sends a pidfd of itself and gets the namespace fds, and only then lets
the lock go. The holder exits only while it can take that lock itself (no rank is between
connecting and registering), nobody is registered and no rank of the step is still to
come (:func:`local_ranks`): a rank either joins a live holder or finds none and starts one.
Nothing depends on the first rank: SIGKILL of any rank closes its pidfd's process, and the
mount namespaces die with their last process.

The key is a hash of the image's identity (device, inode, mtime, size, partition), the uid,
the options that shape the container's mounts (its cwd included) and the job step
(:func:`job_step`), so only ranks that would have built the same container share one.
"""

from __future__ import annotations

# Not the public socket module: it builds enums, +3.9 ms to a rank's imports (python -X
# importtime -I -S, 2-CPU Xeon); _socket has the same socket class and constants.
import _socket
import fcntl
import os
import struct

from sifpy import TYPE_CHECKING
from sifpy.errors import RuntimeSetupError
from sifpy.runtime import ns

if TYPE_CHECKING:
    from typing import Any, NoReturn

    from sifpy.runtime.spec import LaunchSpec
    from sifpy.runtime.start import Identity

# Variables that say "this process is a rank of a parallel job" (checked in this order by
# job_step); the starter (sifpy/cli/starter.c) knows the same list.
RANK_VARS = ("SLURM_STEP_ID", "PMIX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")

HOLDER_NAME = "sifpy-holder"
MSG_JOIN, MSG_STOP, MSG_FAST = b"j", b"s", b"f"
NS_FDS = struct.Struct("2i")  # the namespace fds a joiner gets
PIDFD = struct.Struct("i")  # the pidfd it gives
TIMEOUT = 10.0  # seconds a holder may take to start, or to answer


def job_step(environ: dict[str, str] | os._Environ[str]) -> str | None:
    """The job step this process is a rank of, or None when it is none.

    Slurm names the step (``SLURM_JOB_ID.SLURM_STEP_ID``, with ``SLURM_PROCID``), PMIx its
    namespace, Open MPI its job; MPICH's Hydra names nothing, but starts every rank of a
    node from one proxy: the parent process (pid and start time) stands for the step.

    The node's name ends each: the job's name is the same on every node, and the runtime
    directory that the ranks meet in is node-local only by convention. Where two nodes
    share it (a ``/tmp`` or ``$XDG_RUNTIME_DIR`` on a shared file system, or "nodes" that
    are namespaces of one kernel), the names would otherwise make one node's ranks take
    another node's lock and socket, or join its container.
    """
    get = environ.get
    if get("SLURM_STEP_ID") and get("SLURM_PROCID") and get("SLURM_JOB_ID"):
        return _on_node(f"slurm:{get('SLURM_JOB_ID')}.{get('SLURM_STEP_ID')}")
    if get("PMIX_RANK") and get("PMIX_NAMESPACE"):
        return _on_node(f"pmix:{get('PMIX_NAMESPACE')}")
    if get("OMPI_COMM_WORLD_RANK") and get("OMPI_MCA_ess_base_jobid"):
        return _on_node(f"ompi:{get('OMPI_MCA_ess_base_jobid')}")
    if any(get(v) for v in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")):
        return parent_step()
    return None


def local_ranks(environ: Mapping[str, str]) -> int | None:
    """How many ranks of this process's job step run on this node, as its launcher says:
    Hydra's ``MPI_LOCALNRANKS``, Open MPI's ``OMPI_COMM_WORLD_LOCAL_SIZE``, Slurm's
    ``SLURM_STEP_TASKS_PER_NODE`` at ``SLURM_NODEID`` (``2(x3),1``: 2 on each of the first
    three nodes, 1 on the fourth); None when none says (then a holder only lingers).

    The MPI launchers' first: inside a Slurm allocation, an ``mpiexec`` is the step's
    innermost launcher, and Slurm's counts are then the allocation's."""
    get = environ.get
    for var in ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE"):
        value = get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    node, per_node = get("SLURM_NODEID", ""), get("SLURM_STEP_TASKS_PER_NODE", "")
    if not (get("SLURM_STEP_ID") and node.isdigit() and per_node):
        return None
    index = int(node)
    for group in per_node.split(","):
        count, _, times = group.partition("(x")
        repeat = times[:-1] if times.endswith(")") else ("1" if not times else "")
        if not (count.isdigit() and repeat.isdigit()):
            return None
        if index < int(repeat):
            return int(count) or None
        index -= int(repeat)
    return None


def parent_step() -> str:
    """The parent process (pid and start time, which a reused pid does not have) as the
    job step: the ranks of one launcher on one node share it."""
    ppid = os.getppid()
    try:
        with open(f"/proc/{ppid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        started = fields[19].decode()  # field 22, starttime, counted after "pid (comm)"
    except (OSError, IndexError):
        started = "?"
    return _on_node(f"parent:{ppid}:{started}")


def _on_node(step: str) -> str:
    """``step`` on this node (the starter's job_step appends the same)."""
    return f"{step} on {os.uname().nodename}"


def runtime_dir() -> str:
    """The caller's private directory for locks and sockets: ``$XDG_RUNTIME_DIR/sifpy``
    (systemd's per-user tmpfs) or ``/tmp/sifpy-UID``; it must be the caller's own, mode 0700
    (another user's directory there would let them answer our joins)."""
    uid = os.getuid()
    base = os.environ.get("XDG_RUNTIME_DIR", "")
    path = f"{base}/sifpy" if base.startswith("/") else f"/tmp/sifpy-{uid}"
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise RuntimeSetupError(f"can't create directory: {path}: {exc.strerror}") from exc
    st = os.lstat(path)
    if not os.path.isdir(path) or os.path.islink(path) or st.st_uid != uid or st.st_mode & 0o077:
        raise RuntimeSetupError(
            f"can't use directory: {path}: not a private directory of uid {uid}",
            "remove it, or set XDG_RUNTIME_DIR to a directory of your own",
        )
    return path


def container_key(spec: LaunchSpec, step: str, st: os.stat_result) -> str:
    """The hash that names the shared container of ``spec`` in ``step`` (see the module
    docstring): what decides the container's mounts, never its command or environment."""
    # Not hashlib: it loads OpenSSL's, 2.5 ms of a first rank's start (python -X importtime
    # -I -S, 2-CPU Xeon); _sha256 is CPython's own, 0.03 ms, the same digest.
    import _sha256  # type: ignore[import-not-found]  # no stub: CPython's C module

    opts = spec.options
    parts = [
        (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size),
        getattr(spec.image, "offset", 0),
        os.getuid(),
        step,
        spec.cwd,
        sorted(spec.binds),
        # Not what differs between the ranks' commands: what they read ahead, fds passed.
        [repr(v) for k, v in opts.asdict().items() if k not in _NOT_KEYED],
        spec.env.get("HOME"),
    ]
    digest: str = _sha256.sha256(repr(parts).encode()).hexdigest()
    return digest[:24]


_NOT_KEYED = ("identity", "pass_fds", "prefetch")


def fast_key(
    head: list[str], step: str, cwd: str, st: os.stat_result, environ: Mapping[str, str]
) -> str:
    """The name under which the starter (``sifpy/cli/starter.c``, ``fast_key`` there: the
    same bytes, the same hash) finds a holder without starting Python: ``head`` is sifpy's
    argv up to the image (global options, action, options, image), as given. Equal names
    only point the starter at a holder; the holder then checks that the rank's container
    is its own (:func:`container_key`) before it lets it in."""
    parts = [
        "sifpy-fast-1",
        str(os.getuid()),
        step,
        cwd,
        str(st.st_dev),
        str(st.st_ino),
        str(st.st_mtime_ns),
        str(st.st_size),
        *head,
        "",
        *(environ.get(v, "") for v in FAST_KEY_VARS),
    ]
    data = "\0".join(parts).encode(errors="surrogateescape")
    return "f-" + "".join(f"{_fnv1a(data, basis):016x}" for basis in _FNV_BASES)


# Variables that shape a container but are no option: its binds, and the home it binds.
FAST_KEY_VARS = ("HOME", "SIFPY_BIND", "APPTAINER_BIND", "SIFPY_MOUNT", "APPTAINER_MOUNT")
_FNV_BASES = (0xCBF29CE484222325, 0x84222325CBF29CE4)  # FNV-1a's offset basis, and swapped


def _fnv1a(data: bytes, h: int) -> int:
    """64-bit FNV-1a (a name, not a secret: the directory is the user's own)."""
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


# --- a rank -------------------------------------------------------------------------------


def run_joined(
    spec: LaunchSpec,
    ident: Identity,
    base: str,
    create: bool = True,
    prepare: Prepare | None = None,
    alias: str | None = None,
    release: tuple[int, str] | None = None,
) -> NoReturn:
    """Join (``create``: starting it if needed) the shared container at ``base`` and become
    ``spec.argv`` in it, in ``spec.cwd`` with ``spec.env`` and ``spec.options.pass_fds``.
    A holder started here answers the starter's joins at ``alias`` (see :func:`fast_key`)
    with ``prepare``. ``release``: the starter's lock (fd, path), closed once joined: the
    ranks waiting on it can join through ``alias`` then."""
    from sifpy.runtime import assemble, process

    holder_spec = spec.replace(
        argv=["true"], options=spec.options.replace(prefetch=(), pass_fds=())
    )

    def create_holder() -> None:
        from sifpy.runtime.sharens_holder import start_holder

        start_holder(base, holder_spec, ident, prepare=prepare, alias=alias)

    try:
        fds = join(base, create_holder if create else None)
    finally:
        if release is not None:
            os.close(release[0])
    enter_joined(fds)
    assemble.enter_cwd(spec, ident)
    process.exec_joined(spec.argv, spec.env, spec.options.pass_fds)


def running(base: str) -> bool:
    """Whether a holder answers at ``base`` (a dead one's files are left to its next
    start)."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        sock.connect(f"{base}.sock")
    except OSError:
        return False
    finally:
        sock.close()
    return True


def join(base: str, create: Callable[[], object] | None = None) -> tuple[int, int]:
    """Join the shared container whose lock and socket are ``base.lock`` and ``base.sock``;
    ``create`` starts its holder when there is none (else: an error). Returns the user and
    mount namespace fds, this process now registered as a member."""
    lock = take_lock(f"{base}.lock")
    try:
        sock = connect_holder(f"{base}.sock")
        if sock is None:
            if create is None:
                raise RuntimeSetupError(f"can't join: {os.path.basename(base)}: not running")
            create()
            sock = connect_holder(f"{base}.sock")
            if sock is None:
                raise RuntimeSetupError("can't join the shared container: its holder is gone")
        try:
            return register(sock)
        finally:
            sock.close()
    finally:
        os.close(lock)


def take_lock(path: str) -> int:
    """Open and lock ``path``; a holder removes it when it exits (holding the lock), so a
    lock taken on a removed file is taken again on the current one."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def connect_holder(path: str) -> _socket.socket | None:
    """A connection to a live holder, or None (no socket, or a dead holder's: removed)."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    sock.settimeout(TIMEOUT)
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        # Refused: its holder was killed; we hold the lock, nobody else is creating it.
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return None
    except OSError:
        sock.close()
        raise
    return sock


def register(sock: _socket.socket) -> tuple[int, int]:
    pidfd = os.pidfd_open(os.getpid())
    try:
        sock.sendmsg([MSG_JOIN], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, PIDFD.pack(pidfd))])
    finally:
        os.close(pidfd)
    msg, anc, _flags, _addr = sock.recvmsg(4096, _socket.CMSG_SPACE(NS_FDS.size))
    fds = [
        fd
        for level, kind, data in anc
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS
        for fd in struct.unpack(f"{len(data) // 4}i", data[: len(data) // 4 * 4])
    ]
    if msg != b"k" or len(fds) != 2:
        for fd in fds:
            os.close(fd)
        why = msg[1:].decode(errors="replace") if msg[:1] == b"e" else "no answer"
        raise RuntimeSetupError(f"can't join the shared container: {why}")
    for fd in fds:
        os.set_inheritable(fd, False)
    return fds[0], fds[1]


def enter_joined(fds: tuple[int, int]) -> None:
    """Join the user namespace, then the container's mount namespace (root and cwd become
    the container's /)."""
    userns, mntns = fds
    try:
        ns.setns(userns, ns.CLONE_NEWUSER, "the shared container's user namespace")
        ns.setns(mntns, ns.CLONE_NEWNS, "the shared container's mount namespace")
    finally:
        os.close(userns)
        os.close(mntns)


def stop(base: str) -> bool:
    """Ask the holder at ``base`` to end its container (its members are killed); wait until
    it is gone. False if none was running."""
    sock = connect_holder(f"{base}.sock")
    if sock is None:
        return False
    try:
        sock.settimeout(TIMEOUT)
        sock.sendall(MSG_STOP)
        while sock.recv(64):  # the holder closes the connection when it exits
            pass
    except OSError:
        pass
    finally:
        sock.close()
    return True


if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    # prepare(args, environ, cwd, step) -> (cwd candidates, argv, env, spec): what a rank
    # the starter sent would run (see sifpy.runtime.sharens_holder.Fast)
    Prepare = Callable[
        [list[str], dict[str, str], str, str], tuple[list[str], list[str], dict[str, str], Any]
    ]

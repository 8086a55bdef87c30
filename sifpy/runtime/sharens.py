"""One container per node, joined by every rank of a job step (``--sharens``), and named,
long-lived containers on the same machinery (instances).

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
connecting and registering) and nobody is registered: a rank either joins a live holder or
finds none and starts one. Nothing depends on the first rank: SIGKILL of any rank closes its
pidfd's process, and the mount namespaces die with their last process.

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
from sifpy.errors import ExitStatus, RuntimeSetupError, SifpyError
from sifpy.runtime import ns

if TYPE_CHECKING:
    from typing import Any, NoReturn

    from sifpy.runtime.spec import LaunchSpec
    from sifpy.runtime.start import Identity

# Variables that say "this process is a rank of a parallel job" (checked in this order by
# job_step); the starter (sifpy/cli/starter.c) knows the same list.
RANK_VARS = ("SLURM_STEP_ID", "PMIX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")

HOLDER_NAME = "sifpy-holder"
_JOIN, _STOP, _FAST = b"j", b"s", b"f"
_FDS = struct.Struct("2i")  # the namespace fds a joiner gets
_PIDFD = struct.Struct("i")  # the pidfd it gives
_TIMEOUT = 10.0  # seconds a holder may take to start, or to answer
# How long a holder outlives its last rank when it can't tell whether more are coming (no
# launcher said how many ranks this node runs): the ranks of a job start together, but the
# first may be done before the last has joined.
_LINGER_MS = 200
# How long a holder that knows its node's rank count waits for ranks that have not joined
# yet, its launcher still alive, once its members are gone (a rank that fails before it
# starts sifpy; an MPMD job whose other programs never join).
_WAIT_ALL_S = 60.0


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
    import hashlib

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
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:24]


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
        start_holder(base, holder_spec, ident, prepare=prepare, alias=alias)

    try:
        fds = join(base, create_holder if create else None)
    finally:
        if release is not None:
            os.close(release[0])
    enter_joined(fds)
    assemble.enter_cwd(spec, ident)
    process.exec_joined(spec.argv, spec.env, spec.options.pass_fds)


def instances_dir() -> str:
    """Where the instances' sockets, locks, logs and descriptions are."""
    path = f"{runtime_dir()}/instances"
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    return path


def instance_base(name: str) -> str:
    """The base path of instance ``name`` (checked: a plain name)."""
    ok = name and name[0].isalnum() and all(c.isalnum() or c in "._-" for c in name)
    if not ok or len(name) > 64:
        raise RuntimeSetupError(
            f"can't use instance name: {name!r}: invalid",
            "use letters, digits, '.', '_' and '-' (64 at most), starting with a letter or digit",
        )
    return f"{instances_dir()}/{name}"


def start_instance(base: str, spec: LaunchSpec, ident: Identity, info: dict[str, object]) -> int:
    """Start instance ``base``: a holder that stays until stopped, and in it ``spec.argv``
    (the start script) as its first member, detached, its output in ``base.out`` and
    ``base.err``. ``info`` (with the holder's ``pid`` added) goes to ``base.json``. Returns
    the holder's pid."""
    import json

    lock = _lock(f"{base}.lock")
    try:
        sock = _connect(f"{base}.sock")
        if sock is not None:
            sock.close()
            name = os.path.basename(base)
            raise RuntimeSetupError(
                f"can't start instance: {name}: an instance of that name is running",
                f"stop it first (sifpy instance stop {name}) or choose another name",
            )
        holder_spec = spec.replace(options=spec.options.replace(prefetch=(), pass_fds=()))
        info = {**info, "logOutPath": f"{base}.out", "logErrPath": f"{base}.err"}
        pid = start_holder(base, holder_spec, ident, True)
        info["pid"] = pid
        tmp = f"{base}.json.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(info, f)
        os.replace(tmp, f"{base}.json")
    finally:
        os.close(lock)
    # The start script: a member like any rank, in a session of its own.
    err_r, err_w = os.pipe()
    child = os.fork()
    if child == 0:
        code = ExitStatus.LAUNCH_FAILED
        try:
            os.close(err_r)
            os.setsid()
            if os.fork() == 0:
                from sifpy.runtime import assemble, process

                flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW
                out = os.open(f"{base}.out", flags, 0o600)
                err = os.open(f"{base}.err", flags, 0o600)
                null = os.open(os.devnull, os.O_RDONLY)
                for src, dst in ((null, 0), (out, 1), (err, 2)):
                    os.dup2(src, dst)
                    os.close(src)
                enter_joined(join(base))
                assemble.enter_cwd(spec, ident)
                os.close(err_w)  # past this point, exec_joined reports on base.err
                process.exec_joined(spec.argv, spec.env)
            code = 0
        except SifpyError as exc:
            os.write(err_w, exc.message.encode(errors="replace")[:3000])
        except BaseException as exc:
            os.write(err_w, f"can't start the instance's script: {exc!r}".encode()[:3000])
        finally:
            os._exit(code)
    os.close(err_w)
    os.waitpid(child, 0)
    with os.fdopen(err_r, "rb") as f:
        why = f.read().decode(errors="replace")
    if why:
        stop(base)
        raise RuntimeSetupError(why)
    return pid


def list_instances() -> list[dict[str, object]]:
    """The running instances' descriptions (``base.json``), by name; the files of dead ones
    are removed."""
    import json

    out = []
    folder = instances_dir()
    for entry in sorted(os.listdir(folder)):
        if not entry.endswith(".json"):
            continue
        base = f"{folder}/{entry[:-5]}"
        try:
            with open(f"{base}.json", encoding="utf-8") as f:
                info = json.load(f)
        except (OSError, ValueError):
            continue
        if running(base):
            out.append(info)
        else:
            for ext in (".json", ".out", ".err"):
                try:
                    os.unlink(f"{base}{ext}")
                except OSError:
                    pass
    return out


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
    lock = _lock(f"{base}.lock")
    try:
        sock = _connect(f"{base}.sock")
        if sock is None:
            if create is None:
                raise RuntimeSetupError(f"can't join: {os.path.basename(base)}: not running")
            create()
            sock = _connect(f"{base}.sock")
            if sock is None:
                raise RuntimeSetupError("can't join the shared container: its holder is gone")
        try:
            return _register(sock)
        finally:
            sock.close()
    finally:
        os.close(lock)


def _lock(path: str) -> int:
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


def _connect(path: str) -> _socket.socket | None:
    """A connection to a live holder, or None (no socket, or a dead holder's: removed)."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    sock.settimeout(_TIMEOUT)
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


def _register(sock: _socket.socket) -> tuple[int, int]:
    pidfd = os.pidfd_open(os.getpid())
    try:
        sock.sendmsg([_JOIN], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, _PIDFD.pack(pidfd))])
    finally:
        os.close(pidfd)
    msg, anc, _flags, _addr = sock.recvmsg(4096, _socket.CMSG_SPACE(_FDS.size))
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
    sock = _connect(f"{base}.sock")
    if sock is None:
        return False
    try:
        sock.settimeout(_TIMEOUT)
        sock.sendall(_STOP)
        while sock.recv(64):  # the holder closes the connection when it exits
            pass
    except OSError:
        pass
    finally:
        sock.close()
    return True


# --- the holder ---------------------------------------------------------------------------


def start_holder(
    base: str,
    spec: LaunchSpec,
    ident: Identity,
    persistent: bool = False,
    info: str | None = None,
    prepare: Prepare | None = None,
    alias: str | None = None,
) -> int:
    """Start the holder of ``base`` (the caller holds ``base.lock``) and wait until its
    container is ready; return its pid. ``persistent`` (an instance): it stays without
    members until stopped. ``info``: text written to ``base.json`` once it is ready.
    Raises the holder's own set-up error.

    A rank's holder (not ``persistent``) learns from the rank's environment how many ranks
    its node runs (:func:`local_ranks`) and watches the rank's parent, the launcher: it
    stays until that many have joined, or the launcher is gone, however quickly they come
    and go; without a count it only lingers (``_LINGER_MS``)."""
    expect = None if persistent else local_ranks(os.environ)
    launcher = -1
    if expect is not None:
        try:
            launcher = os.pidfd_open(os.getppid())
        except OSError:  # gone already: no rank of it is still to come
            expect = None
    ready_r, ready_w = os.pipe()
    pidr, pidw = os.pipe()
    first = os.fork()
    if first == 0:  # its own session, and a parent that exits now: it outlives every rank
        code = ExitStatus.LAUNCH_FAILED
        try:
            os.close(ready_r)
            os.close(pidr)
            os.setsid()
            holder = os.fork()
            if holder != 0:
                os.write(pidw, str(holder).encode())
                code = 0
            else:
                os.close(pidw)
                wait = (expect, launcher) if expect is not None else None
                _holder(base, spec, ident, ready_w, persistent, prepare, alias, wait)
        finally:
            os._exit(code)
    if launcher >= 0:
        os.close(launcher)
    os.close(ready_w)
    os.close(pidw)
    os.waitpid(first, 0)
    try:
        holder_pid = int(os.read(pidr, 64) or b"0")
        answer = os.read(ready_r, 65536)
    finally:
        os.close(pidr)
        os.close(ready_r)
    if answer != b"ready":
        _code, message, hint = [*answer.decode(errors="replace").split("\0", 2), "", ""][:3]
        raise RuntimeSetupError(
            message or "can't start the shared container: its holder exited", hint or None
        )
    if info is not None:
        tmp = f"{base}.json.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(info)
        os.replace(tmp, f"{base}.json")
    return holder_pid


def _holder(
    base: str,
    spec: LaunchSpec,
    ident: Identity,
    ready: int,
    persistent: bool,
    prepare: Prepare | None = None,
    alias: str | None = None,
    wait: tuple[int, int] | None = None,
) -> NoReturn:
    """The holder process (see the module docstring); never returns. ``wait``: the number
    of ranks to wait for, and a pidfd of their launcher (see :func:`start_holder`)."""
    from sifpy.runtime import drivers, mount, process, supervise
    from sifpy.runtime.start import SifPartition

    servers: list[int] = []
    try:
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):  # the ranks' pipes must see end-of-file without us
            os.dup2(devnull, fd)
        os.close(devnull)
        # Nothing of the rank's (its PMI socket, its lock) stays open here but the image,
        # which the image's path names (/proc/self/fd/N).
        keep = {ready} if wait is None else {ready, wait[1]}
        image = spec.image
        if image.path.startswith("/proc/self/fd/"):
            keep.add(int(image.path.rsplit("/", 1)[1]))
        low = 3
        for fd in sorted(keep):
            os.closerange(low, fd)
            low = fd + 1
        os.closerange(low, mount.max_fd())
        os.chdir("/")
        if isinstance(image, SifPartition):
            driver = drivers.choose(spec.options.mount_driver, spec.options.squashfuse)
        else:
            driver = drivers.Driver("sandbox")
        # The socket and the lock exist before the namespaces: the session covers /tmp.
        dir_fd = os.open(os.path.dirname(base), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        name = os.path.basename(base)
        lock = os.open(f"{base}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        import socket  # here, not on a rank's path (enum)

        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(f"{base}.sock")
        listener.listen(64)
        if alias is not None:  # the starter's name for this container (see fast_key)
            try:
                os.unlink(alias, dir_fd=dir_fd)
            except FileNotFoundError:
                pass
            os.symlink(f"{name}.sock", alias, dir_fd=dir_fd)
        image_st = os.stat(image.path)
        keep_r, keep_w = os.pipe()
        report_r, report_w = os.pipe()
        keeper = process.set_up_keeper(spec, ident, driver, report_w, servers, keep_w)
        try:
            with open("/proc/self/comm", "w") as f:
                f.write(HOLDER_NAME)  # what ps shows (the keeper is named before: python3)
        except OSError:
            pass
        os.close(keep_w)
        os.close(report_w)
        if os.read(keep_r, 1) != b"k":
            err = os.read(report_r, 65536)
            raise RuntimeSetupError(
                err.decode(errors="replace").split("\0")[1]
                if err.count(b"\0") >= 2
                else "can't set up the shared container"
            )
        os.close(keep_r)
        os.close(report_r)
        userns = os.open("/proc/self/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        mntns = os.open(f"/proc/{keeper}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        keeper_fd = os.pidfd_open(keeper)
    except SifpyError as exc:
        supervise.report_error(ready, ExitStatus.LAUNCH_FAILED, exc.message, exc.hint)
        _end(servers)
    except BaseException as exc:
        why = f"can't start the shared container: {exc!r}"
        supervise.report_error(ready, ExitStatus.LAUNCH_FAILED, why)
        _end(servers)
    os.write(ready, b"ready")
    os.close(ready)
    try:
        fast = None
        if prepare is not None:
            fast = _Fast(prepare, name, image_st, spec.image, seccomp_program())
        _serve(listener, lock, keeper_fd, (userns, mntns), persistent, fast, wait)
    finally:
        if alias is not None:
            try:
                if os.readlink(alias, dir_fd=dir_fd) == f"{name}.sock":
                    os.unlink(alias, dir_fd=dir_fd)
            except OSError:
                pass
            try:  # the starter's (starter_join.c); taken again if gone
                os.unlink(alias.removesuffix(".sock") + ".lock", dir_fd=dir_fd)
            except OSError:
                pass
        os.kill(keeper, 9)
        try:
            os.unlink(f"{name}.sock", dir_fd=dir_fd)
        except OSError:
            pass
        try:  # locked by us (_serve returned so): see _lock
            os.unlink(f"{name}.lock", dir_fd=dir_fd)
        except OSError:
            pass
        if persistent:
            for ext in (".json", ".out", ".err"):
                try:
                    os.unlink(f"{name}{ext}", dir_fd=dir_fd)
                except OSError:
                    pass
        _end(servers)


def _end(servers: list[int]) -> NoReturn:
    from sifpy.runtime import mount

    for pid in reversed(servers):
        mount.stop_server(pid)
    os._exit(0)


def _serve(
    listener: socket.socket,
    lock: int,
    keeper_fd: int,
    ns_fds: tuple[int, int],
    persistent: bool,
    fast: _Fast | None = None,
    wait: tuple[int, int] | None = None,
) -> None:
    """Answer joins and watch the members until the last one is gone and no more are to
    come (``wait``: this many joined, or their launcher gone; else after ``_LINGER_MS``),
    or, ``persistent``, until told to stop; returns with the lock held (no rank can be
    joining)."""
    import gc
    import select
    import signal
    import time

    gc.enable()  # paused while the first rank started (sifpy.cli.entry); this lives long
    members: dict[int, int] = {}  # pidfd -> pid
    poller = select.poll()
    poller.register(listener.fileno(), select.POLLIN)
    poller.register(keeper_fd, select.POLLIN)
    expect, launcher = wait if wait is not None else (0, -1)
    if launcher >= 0:
        poller.register(launcher, select.POLLIN)  # readable once it has exited
    joined = [0]
    listener.setblocking(False)
    stopping = False
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # `instance stop` asks through the socket
    idle_since = time.monotonic()
    while not stopping:
        idle = not members and not persistent
        for fd, _event in poller.poll(_LINGER_MS // 2 if idle else None):
            if fd == keeper_fd:
                stopping = True
            elif fd == listener.fileno():
                stopping |= _accept(listener, ns_fds, members, poller, fast, joined)
            elif fd == launcher:
                poller.unregister(launcher)
                os.close(launcher)
                launcher = -1
            elif fd in members:
                poller.unregister(fd)
                os.close(fd)
                del members[fd]
        if members or persistent:
            idle_since = time.monotonic()
        elif not stopping and time.monotonic() - idle_since >= _LINGER_MS / 1000:
            # Not while ranks of the step are still to come: a rank the node started late
            # (a loaded node: seconds) joins this container, not a second one.
            waiting = launcher >= 0 and joined[0] < expect
            if waiting and time.monotonic() - idle_since < _WAIT_ALL_S:
                continue
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a rank is joining: its connection is next
            # Locked: no rank is between connecting and registering; one that connected
            # before (and gave up) is answered, else we are done.
            if not _accept(listener, ns_fds, members, poller, fast, joined) and not members:
                return
            fcntl.flock(lock, fcntl.LOCK_UN)
    for pidfd in members:  # stopped: the members go with the container
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except OSError:
            pass
    fcntl.flock(lock, fcntl.LOCK_EX)


def _accept(
    listener: socket.socket,
    ns_fds: tuple[int, int],
    members: dict[int, int],
    poller: object,
    fast: _Fast | None = None,
    joined: list[int] | None = None,
) -> bool:
    """Answer every pending connection: register joiners (counted in ``joined[0]``); True
    when asked to stop."""
    import select

    stop_asked = False
    while True:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return stop_asked
        with conn:
            conn.settimeout(_TIMEOUT)
            try:
                msg, anc, _flags, _addr = conn.recvmsg(16, _socket.CMSG_SPACE(_PIDFD.size))
            except OSError:
                continue
            fds = [
                fd
                for level, kind, data in anc
                if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS
                for fd in struct.unpack(f"{len(data) // 4}i", data[: len(data) // 4 * 4])
            ]
            if msg == _STOP:
                for fd in fds:
                    os.close(fd)
                stop_asked = True
                # The connection stays open until we exit: `stop` waits for its end.
                os.set_inheritable(conn.detach(), False)
                continue
            if msg[:1] not in (_JOIN, _FAST) or not fds:
                for fd in fds:
                    os.close(fd)
                continue
            pidfd = fds[0]
            for fd in fds[1:]:
                os.close(fd)
            answer = b"k"
            if msg[:1] == _FAST:
                answer = fast.answer(conn, msg[1:]) if fast is not None else b"e"
            try:
                conn.sendmsg(
                    [answer], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, _FDS.pack(*ns_fds))]
                )
                if answer[:1] != b"k":
                    raise OSError("refused")
            except OSError:
                os.close(pidfd)
                continue
            members[pidfd] = 0
            if joined is not None:
                joined[0] += 1
            poller.register(pidfd, select.POLLIN)  # type: ignore[attr-defined]


def seccomp_program() -> bytes:
    """The payload's seccomp filter, for the starter to install (see :mod:`.seccomp`)."""
    from sifpy.runtime import seccomp

    return seccomp.payload_filter(False)


class _Fast:
    """The holder's answer to a rank the starter sent (``f``): what Python would run for
    it, computed here by ``prepare``, once its container proves to be this one."""

    def __init__(
        self, prepare: Prepare, key: str, st: os.stat_result, image: Any, bpf: bytes
    ) -> None:
        self.prepare, self.key, self.st, self.image, self.bpf = prepare, key, st, image, bpf

    def answer(self, conn: socket.socket, head: bytes) -> bytes:
        """Read the request's body after ``head``; the answer (``k`` + body, or ``e``)."""
        try:
            size = _LEN.unpack(head[: _LEN.size])[0]
            data = head[_LEN.size :]
            while len(data) < size:
                chunk = conn.recv(size - len(data))
                if not chunk:
                    return b"e"
                data += chunk
            # step, image dev, ino, mtime_ns and size, cwd, argc, argv..., env..., each
            # NUL-terminated (starter_join.c)
            text = data.decode(errors="surrogateescape").split("\0")[:-1]
            step, dev, ino, mtime, fsize, cwd, count = text[:7]
            args, env_items = text[7 : 7 + int(count)], text[7 + int(count) :]
            st = self.st
            if [dev, ino, mtime, fsize] != [
                str(x) for x in (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
            ]:
                return b"e"
            environ = dict(item.split("=", 1) for item in env_items if "=" in item)
            cwds, argv, env, spec = self.prepare(args, environ, cwd, step)
            spec = spec.replace(image=self.image)
            if container_key(spec, step, st) != self.key:
                return b"e"  # another container: the rank starts Python, which finds it
        except Exception:  # anything unusual: the rank starts Python, which reports it
            return b"e"
        envs = [f"{k}={v}" for k, v in env.items()]
        lists = [str(len(cwds)), *cwds, str(len(argv)), *argv, str(len(envs)), *envs]
        body = "".join(f"{item}\0" for item in lists)
        out = _LEN.pack(len(self.bpf)) + self.bpf + body.encode(errors="surrogateescape")
        return b"k" + _LEN.pack(len(out)) + out


_LEN = struct.Struct("<I")


if TYPE_CHECKING:
    import socket
    from collections.abc import Callable, Mapping

    # prepare(args, environ, cwd, step) -> (cwd candidates, argv, env, spec): what a rank
    # the starter sent would run (see _Fast)
    Prepare = Callable[
        [list[str], dict[str, str], str, str], tuple[list[str], list[str], dict[str, str], Any]
    ]

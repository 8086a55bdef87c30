"""The holder of a shared container (:mod:`sifpy.runtime.sharens`): the process that keeps
a node's user and mount namespaces and its FUSE server, answers the ranks' joins (also the
starter's, :class:`Fast`), watches every member through a pidfd, and ends the container
once its last member is gone and no rank of the step is still to come."""

from __future__ import annotations

# Not the public socket module: +3.9 ms (python -X importtime -I -S), on the path of the
# rank that creates the container; the holder imports socket itself, once forked.
import _socket
import fcntl
import os
import struct

from sifpy import TYPE_CHECKING
from sifpy.errors import ExitStatus, RuntimeSetupError, SifpyError
from sifpy.runtime.sharens import (
    HOLDER_NAME,
    MSG_FAST,
    MSG_JOIN,
    MSG_STOP,
    NS_FDS,
    PIDFD,
    TIMEOUT,
    container_key,
    local_ranks,
)

if TYPE_CHECKING:
    from typing import Any, NoReturn

    from sifpy.runtime.sharens import Prepare
    from sifpy.runtime.spec import LaunchSpec
    from sifpy.runtime.start import Identity

# How long a holder outlives its last rank when it can't tell whether more are coming (no
# launcher said how many ranks this node runs): the ranks of a job start together, but the
# first may be done before the last has joined.
_LINGER_MS = 200
# How long a holder that knows its node's rank count waits for ranks that have not joined
# yet, its launcher still alive, once its members are gone (a rank that fails before it
# starts sifpy; an MPMD job whose other programs never join).
_WAIT_ALL_S = 60.0


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
        # _socket's socket, as a rank's: socket's enums cost the holder 3 ms of CPU before
        # its container is ready (cProfile of _holder, 2-CPU Xeon), which the first rank
        # waits for.
        listener = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
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
            fast = Fast(prepare, name, image_st, spec.image, seccomp_program())
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
    listener: _socket.socket,
    lock: int,
    keeper_fd: int,
    ns_fds: tuple[int, int],
    persistent: bool,
    fast: Fast | None = None,
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
    listener: _socket.socket,
    ns_fds: tuple[int, int],
    members: dict[int, int],
    poller: object,
    fast: Fast | None = None,
    joined: list[int] | None = None,
) -> bool:
    """Answer every pending connection: register joiners (counted in ``joined[0]``); True
    when asked to stop."""
    import select

    stop_asked = False
    while True:
        try:
            # accept4(SOCK_CLOEXEC); accept() is the socket module's wrapper of it
            conn_fd, _ = listener._accept()  # type: ignore[attr-defined]
        except BlockingIOError:
            return stop_asked
        conn = _socket.socket(fileno=conn_fd)
        try:
            conn.settimeout(TIMEOUT)
            try:
                msg, anc, _flags, _addr = conn.recvmsg(16, _socket.CMSG_SPACE(PIDFD.size))
            except OSError:
                continue
            fds = [
                fd
                for level, kind, data in anc
                if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS
                for fd in struct.unpack(f"{len(data) // 4}i", data[: len(data) // 4 * 4])
            ]
            if msg == MSG_STOP:
                for fd in fds:
                    os.close(fd)
                stop_asked = True
                # The connection stays open until we exit: `stop` waits for its end.
                os.set_inheritable(conn.detach(), False)
                continue
            if msg[:1] not in (MSG_JOIN, MSG_FAST) or not fds:
                for fd in fds:
                    os.close(fd)
                continue
            pidfd = fds[0]
            for fd in fds[1:]:
                os.close(fd)
            answer = b"k"
            if msg[:1] == MSG_FAST:
                answer = fast.answer(conn, msg[1:]) if fast is not None else b"e"
            try:
                conn.sendmsg(
                    [answer], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, NS_FDS.pack(*ns_fds))]
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
        finally:
            conn.close()  # after detach(): closes nothing


def seccomp_program() -> bytes:
    """The payload's seccomp filter, for the starter to install (see :mod:`.seccomp`)."""
    from sifpy.runtime import seccomp

    return seccomp.payload_filter(False)


class Fast:
    """The holder's answer to a rank the starter sent (``f``): what Python would run for
    it, computed here by ``prepare``, once its container proves to be this one."""

    def __init__(
        self, prepare: Prepare, key: str, st: os.stat_result, image: Any, bpf: bytes
    ) -> None:
        self.prepare, self.key, self.st, self.image, self.bpf = prepare, key, st, image, bpf

    def answer(self, conn: _socket.socket, head: bytes) -> bytes:
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

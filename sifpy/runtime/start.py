"""The first steps of a start: what runs (a SIF partition or a sandbox), as whom, and the
image the starter served before Python started.

``sifpy exec``'s critical path is the FUSE server more than Python: before the command's
first instruction, squashfuse must decompress the action shell and the program (a 2 MB
busybox: ~5 ms of one core), and it can only start once the namespaces are entered. The
compiled starter (``sifpy/cli/starter.c``) is the one place that serves the image early: it
enters the user and mount namespaces, creates the image's FUSE mount *detached* (attached
nowhere: the session that will hold it can only be mounted over ``/tmp`` once every host
path the container needs has been pinned), starts squashfuse and the read-ahead of the
programs, and execs Python, which takes them over here (:func:`adopt`) and computes the
rest (environment, mount plan) while the server works on the other CPU;
:func:`sifpy.runtime.process.launch` attaches the mount in the session. Without the starter
(no C compiler at install time, or a start it leaves to Python) Python mounts in order:
bench/exec's "Python only" line says what that costs.

This module is on the hot path before that work: it imports only :mod:`.ns` and :mod:`.mount`.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat

from sifpy import TYPE_CHECKING, config
from sifpy.errors import RuntimeSetupError
from sifpy.runtime import mount, ns
from sifpy.util.record import Record

if TYPE_CHECKING:
    from collections.abc import Callable

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DRIVERS = ("auto", "squashfuse", "kernel", "python", "unsquash")
SQUASHFUSE = "squashfuse_ll"
# One thread for squashfuse_ll: libfuse's worker threads start on demand, ~3 ms of every
# exec, and squashfuse_ll decompresses under one lock anyway.
FUSE_SINGLE_THREAD = True
# sifpy's own server (sifpy/runtime/serve/sqfs_serve.c, built by `make venv` next to its
# source): libsquashfuse's code with reads decompressed in parallel, no open/release round
# trips and the page cache kept across opens. Here (a start with options, or without the
# starter) opt-in: SIFPY_FUSE_SERVER=sifpy; the starter links it in and serves its own
# starts with it, forked with no exec (bench/exec). The tests run every exec through both.
SERVER = os.path.join(os.path.dirname(__file__), "serve", "sifpy-sqfs-serve")
SERVER_THREADS = 4  # libfuse's loop starts them as requests wait; 2-CPU nodes need no more


def server_program(name: str = SQUASHFUSE) -> str:
    """The squashfs FUSE server to run: sifpy's own with ``$SIFPY_FUSE_SERVER=sifpy``
    where it was built, else the helper ``name`` as :func:`mount.find_program` finds it
    (raising :class:`ToolError` if missing)."""
    own = config.get("SIFPY_FUSE_SERVER") == "sifpy"
    if name == SQUASHFUSE and own and os.access(SERVER, os.X_OK):
        return SERVER
    return mount.find_program(name)


# Records are sifpy.util.record classes, not dataclasses: importing dataclasses (and
# inspect) and generating their methods cost ~10 ms, on the start-up path of `sifpy exec`.
class SifPartition(Record):
    """A squashfs partition inside a SIF file: ``size`` bytes at byte ``offset``."""

    __slots__ = ("path", "offset", "size")

    def __init__(
        self,
        path: str,
        offset: int,
        size: int,
    ) -> None:
        self.path = path
        self.offset = offset
        self.size = size


class Sandbox(Record):
    """A directory used as the root file system."""

    __slots__ = ("path",)

    def __init__(
        self,
        path: str,
    ) -> None:
        self.path = path


class Identity(Record):
    """The caller's host account, looked up once before entering the container."""

    __slots__ = ("uid", "gid", "name", "group", "gecos", "home", "shell")

    def __init__(
        self,
        uid: int,
        gid: int,
        name: str,
        group: str,
        gecos: str,
        home: str,
        shell: str,
    ) -> None:
        self.uid = uid
        self.gid = gid
        self.name = name
        self.group = group
        self.gecos = gecos
        self.home = home
        self.shell = shell


def host_identity(uid: int | None = None, gid: int | None = None) -> Identity:
    """Look the caller (or ``uid``, ``gid``) up in the host's user and group databases
    (NSS), once."""
    uid = os.getuid() if uid is None else uid
    gid = os.getgid() if gid is None else gid
    try:
        pw = pwd.getpwuid(uid)
        name, gecos, home, shell = pw.pw_name, pw.pw_gecos, pw.pw_dir, pw.pw_shell
    except KeyError:
        name, gecos, home, shell = f"uid{uid}", "", os.environ.get("HOME", "/"), "/bin/sh"
    try:
        group = grp.getgrgid(gid).gr_name
    except KeyError:
        group = f"gid{gid}"
    return Identity(uid, gid, name, group, gecos, home, shell)


def passed_fds() -> tuple[int, ...]:
    """The fds above 2 that this process's caller passed to it: open and inheritable. The
    command inherits exactly these, as from any other program (Apptainer, Charliecloud and
    runc keep them too): MPI launchers hand each rank its PMI socket this way (``PMI_FD``).

    Call it before anything inheritable is opened; every fd sifpy opens itself is
    close-on-exec (PEP 446), and the starter's are again once :func:`adopt` took them.
    """
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:  # no /proc: probe the usual range instead
        names = [str(fd) for fd in range(3, 1024)]
    fds = []
    for name in names:
        fd = int(name)
        try:
            if fd > 2 and os.get_inheritable(fd):
                fds.append(fd)
        except OSError:  # listdir's own fd, closed by now, or none at all
            pass
    return tuple(sorted(fds))


def enter(fakeroot: bool, flags: int = 0, handshake: Callable[[], None] | None = None) -> None:
    """Unshare the user and mount namespaces (and ``flags``), map the caller's ids (to 0 with
    ``fakeroot``; ``handshake`` instead when another process writes the maps), set
    no_new_privs, and make every mount private: nothing mounted or unmounted here can reach
    another namespace."""
    outer_uid, outer_gid = os.getuid(), os.getgid()
    inner_uid, inner_gid = (0, 0) if fakeroot else (outer_uid, outer_gid)
    ns.unshare(ns.CLONE_NEWUSER | ns.CLONE_NEWNS | flags)
    if handshake is not None:
        handshake()
    else:
        ns.map_ids(outer_uid, outer_gid, inner_uid, inner_gid)
    ns.set_no_new_privs()  # inherited by the FUSE servers, helpers and the container
    ns.mount(None, "/", None, ns.MS_REC | ns.MS_PRIVATE, what="/ (make private)")


class Served:
    """An image the starter served (:func:`adopt`): its detached mount and FUSE server, until
    :func:`sifpy.runtime.process.launch` takes them (:meth:`take`); :meth:`stop` ends them
    if it never did (a usage error found after serving)."""

    __slots__ = ("_mount_fd", "_server", "fakeroot", "offset")

    def __init__(self, mount_fd: int, server: int, fakeroot: bool, offset: int) -> None:
        self._mount_fd, self._server = mount_fd, server
        self.fakeroot, self.offset = fakeroot, offset

    def take(self) -> tuple[int, int]:
        """The mount's fd and the server's pid, now the caller's to close and stop."""
        if self._server < 0:
            raise RuntimeError("the served image was taken already")
        taken = self._mount_fd, self._server
        self._mount_fd = self._server = -1
        return taken

    def stop(self) -> None:
        if self._server >= 0:
            os.close(self._mount_fd)
            mount.stop_server(self._server)
            self._mount_fd = self._server = -1


def adopt() -> tuple[Served, int, tuple[int, int]] | None:
    """The image the starter (``sifpy/cli/starter.c``) served before Python started: its
    :class:`Served`, the image's fd (the file to validate and run) and the caller's host
    uid and gid (with ``--fakeroot`` this process is uid 0 already); None when the starter
    did not serve (or this is not the starter).

    The state comes in ``SIFPY_SERVED``, which is removed here (the container never sees it):
    ``MOUNT_FD,SERVER_PID,IMAGE_FD,OFFSET,FAKEROOT,UID,GID``. Only our own child can be the
    server; nothing here touches the mount (that would wait for the server).
    """
    state = config.take("SIFPY_SERVED")
    if state is None:
        return None
    served = None
    try:
        mount_fd, server, image_fd, offset, fakeroot, uid, gid = map(int, state.split(","))
        # Our child (else ChildProcessError); one that already failed stays waitable, and
        # its mount then tells why (launch() attaches it and asks).
        os.waitid(os.P_PID, server, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        served = Served(mount_fd, server, bool(fakeroot), offset)
        os.set_inheritable(mount_fd, False)
        if not stat.S_ISREG(os.fstat(image_fd).st_mode):
            raise ValueError(f"fd {image_fd} is no image file")
        os.set_inheritable(image_fd, False)
        ns.drop_inherited_caps()
    except (ValueError, OSError, RuntimeSetupError) as exc:
        if served is not None:
            served.stop()
        raise RuntimeSetupError(
            f"can't use the image the starter served: {exc}",
            "run sifpy again; if this persists, rebuild it (make venv)",
        ) from exc
    return served, image_fd, (uid, gid)

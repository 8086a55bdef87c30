"""Probes: can this user create a user + mount namespace here, and mount FUSE in one?

They fork, so that the caller's own namespaces are never touched, and they are cheap enough
for tests (and ``sifpy`` diagnostics) to call once per session.
"""

from __future__ import annotations

import errno
import os

from sifpy.errors import RuntimeSetupError
from sifpy.runtime import ns


def _probe_in_child(flags: int, then: str) -> str | None:
    """Fork; the child unshares ``flags`` and runs step ``then``; return None or a reason."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report a reason on the pipe, never return into the caller's code
        os.close(r)
        code = 0
        try:
            uid, gid = os.getuid(), os.getgid()
            ns.unshare(flags)
            if flags & ns.CLONE_NEWUSER:
                ns.map_ids(uid, gid, uid, gid)
            if then == "fuse":
                _probe_fuse_mount()
        except BaseException as exc:
            os.write(w, str(exc).encode()[:4000])
            code = 1
        os._exit(code)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 4096):
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) == 0:
        return None
    return b"".join(chunks).decode(errors="replace") or f"probe failed: status {status}"


def _probe_fuse_mount() -> None:
    # A FUSE mount needs only a /dev/fuse fd and a directory; no server has to answer for
    # mount(2) to succeed, and the mount namespace dies with this child.
    try:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise RuntimeSetupError(
            f"can't open: /dev/fuse: {os.strerror(exc.errno or errno.EIO)}"
        ) from exc
    ns.mount(None, "/", None, ns.MS_REC | ns.MS_PRIVATE)
    ns.mount("tmpfs", "/tmp", "tmpfs", ns.MS_NOSUID | ns.MS_NODEV, "mode=0700")
    os.mkdir("/tmp/m")
    opts = f"fd={fd},rootmode=40000,user_id={os.getuid()},group_id={os.getgid()}"
    ns.mount("probe", "/tmp/m", "fuse.probe", ns.MS_NOSUID | ns.MS_NODEV | ns.MS_RDONLY, opts)


def userns_available() -> str | None:
    """Return None if an unprivileged user+mount namespace can be created, else the reason."""
    return _probe_in_child(ns.CLONE_NEWUSER | ns.CLONE_NEWNS, "")


def fuse_available() -> str | None:
    """Return None if a FUSE file system can be mounted in a user namespace, else the reason."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist (load the fuse module, or bind it into this container)"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "/dev/fuse is not readable and writable by this user"
    return _probe_in_child(ns.CLONE_NEWUSER | ns.CLONE_NEWNS, "fuse")

"""The container's mount plan: what Apptainer mounts by default (``/dev``, ``/proc``,
``/sys``, home, ``/tmp``, the generated ``/etc`` files, user binds), in its order, less what
``--no-mount`` skips, each host source pinned by an ``O_PATH`` fd.

The plan is made in the monitor, in the container's mount namespace (bind sources must come
from there) but before the session covers ``/tmp``; :func:`launch._apply` carries it out
inside the new root.
"""

from __future__ import annotations

import os
import stat

from sifpy import TYPE_CHECKING
from sifpy.errors import RuntimeSetupError

if TYPE_CHECKING:
    from sifpy.runtime.spec import LaunchSpec
    from sifpy.runtime.start import Identity

# --no-mount names (Apptainer's), besides absolute paths of the system binds.
NO_MOUNT = frozenset({"proc", "sys", "dev", "devpts", "home", "tmp", "hostfs", "cwd", "bind-paths"})
_SYSTEM_BINDS = ("/etc/hosts", "/etc/localtime")  # Apptainer's default "bind path" entries
_MINIMAL_DEV = ("null", "zero", "random", "urandom", "tty", "full")


class Mount:
    """One mount of the container root, with its host source pinned by an O_PATH fd.

    A plain class (no dataclasses import on the exec path); fields are set after creation.
    """

    __slots__ = (
        "data",
        "dest",
        "devices",
        "fd",
        "harden",
        "is_dir",
        "kind",
        "nofollow",
        "readonly",
        "recursive",
    )

    def __init__(
        self,
        dest: str,
        kind: str,  # bind | tmpfs | proc | devpts | symlink | file (generated, in _FILES)
        fd: int = -1,
        data: str = "",  # tmpfs options, symlink target, generated file name
        readonly: bool = False,
        harden: bool = True,  # remount nosuid,nodev (not for /dev, /proc, /sys)
        is_dir: bool = True,
        nofollow: bool = False,  # an image symlink at dest is replaced, never followed
        recursive: bool = False,  # with readonly: its submounts read-only too
        devices: bool = False,  # hardened without nodev: a bind of host device nodes
    ) -> None:
        self.dest, self.kind, self.fd, self.data = dest, kind, fd, data
        self.readonly, self.harden, self.is_dir = readonly, harden, is_dir
        self.nofollow, self.recursive, self.devices = nofollow, recursive, devices

    def __repr__(self) -> str:
        return f"Mount({self.dest!r}, {self.kind!r}, fd={self.fd}, data={self.data!r})"


def pin(path: str, what: str) -> int:
    # O_PATH follows the host's own symlinks (the user's paths), and keeps the object
    # reachable after /tmp is covered and after the old root is gone.
    try:
        return os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError as exc:
        raise RuntimeSetupError(f"can't bind: {what}: {path}: {exc.strerror}") from exc


def _host_file(path: str, copy: bool) -> Mount:
    """A host file shown read-only: bound, or (``copy``) a copy of it in the session, which
    is what a confined payload gets: a read-only bind of the host file itself can be made
    writable again by whoever may remount it (real root's %post), and then written through.
    Docker likewise gives each container its own copy of /etc/hosts and /etc/resolv.conf."""
    fd = pin(path, path)
    if copy:
        return Mount(
            path, "file", fd, data="host" + path.replace("/", "-"), readonly=True, is_dir=False
        )
    return Mount(path, "bind", fd, readonly=True, is_dir=False)


def plan(spec: LaunchSpec, ident: Identity) -> list[Mount]:
    """The container's mounts, in Apptainer's order (dev, kernel, home, tmp, files, binds),
    less those ``--no-mount`` names."""
    opts = spec.options
    skip = set(opts.no_mount)
    plan: list[Mount] = []
    own_dev = False  # /dev is a tmpfs of the container's, not the host's /dev
    if "dev" in skip:
        pass  # an empty /dev (the image's own is never used: it may be a symlink)
    elif opts.contain:
        plan.append(Mount("/dev", "tmpfs", data="mode=0755,size=1m"))
        for name in _MINIMAL_DEV:
            if os.path.exists(f"/dev/{name}"):
                plan.append(
                    Mount(f"/dev/{name}", "bind", pin(f"/dev/{name}", "/dev"), is_dir=False)
                )
                plan[-1].harden = False
        plan.append(Mount("/dev/shm", "tmpfs", data="mode=1777"))
        links = [("fd", "/proc/self/fd")] + [
            (name, f"/proc/self/fd/{i}") for i, name in enumerate(("stdin", "stdout", "stderr"))
        ]
        if "devpts" not in skip:
            plan.append(Mount("/dev/pts", "devpts", pin("/dev/pts", "/dev/pts")))
            links.insert(0, ("ptmx", "pts/ptmx"))
        plan += [Mount(f"/dev/{name}", "symlink", data=target) for name, target in links]
    elif _needs_own_dev(spec):
        plan += _own_dev()
        own_dev = True
    else:
        plan.append(Mount("/dev", "bind", pin("/dev", "/dev"), harden=False))
    if "proc" in skip:
        pass
    elif opts.pid_ns:
        plan.append(Mount("/proc", "proc"))
    else:
        plan.append(Mount("/proc", "bind", pin("/proc", "/proc"), harden=False))
    if "sys" not in skip:
        # Confined (a build's %post, possibly real root): read-only with every submount
        # (cgroup file systems), as Docker mounts /sys for a container that is not
        # --privileged.
        sys_ro = opts.confine
        plan.append(Mount("/sys", "bind", pin("/sys", "/sys"), readonly=sys_ro, harden=sys_ro))
        plan[-1].recursive = sys_ro
    for path in _SYSTEM_BINDS:
        if os.path.isfile(path) and "bind-paths" not in skip and path not in skip:
            plan.append(_host_file(path, opts.confine))
    work = opts.workdir if opts.contain else None
    if not opts.no_home and "home" not in skip:
        home_src = opts.home or ident.home
        home_dest = opts.home_dest or home_src
        if work:
            plan.append(Mount(home_dest, "bind", pin(f"{work}/home", "--workdir")))
        elif opts.contain:
            plan.append(Mount(home_dest, "tmpfs", data="mode=0700"))
        elif home_src and home_src != "/":
            plan.append(Mount(home_dest, "bind", pin(home_src, "home")))
    for path, sub in (("/tmp", "tmp"), ("/var/tmp", "var_tmp")):
        if "tmp" in skip:
            continue
        if work:
            plan.append(Mount(path, "bind", pin(f"{work}/{sub}", "--workdir")))
        elif opts.contain:
            plan.append(Mount(path, "tmpfs", data="mode=1777"))
        else:
            plan.append(Mount(path, "bind", pin(path, path)))
    if os.path.isfile("/etc/resolv.conf") and "/etc/resolv.conf" not in skip:
        plan.append(_host_file("/etc/resolv.conf", opts.confine))
    if opts.passwd:
        # nofollow: an image's /etc/passwd -> /dev/null (or -> a file in the user's home)
        # must not carry the generated file over that target; the entry itself is replaced
        # (runc refuses to mount over a symlink for the same reason, CVE-2021-30465).
        for name in ("passwd", "group"):
            plan.append(
                Mount(f"/etc/{name}", "file", data=name, readonly=True, is_dir=False, nofollow=True)
            )
    if opts.inject is not None:  # --nv, --rocm, --device: before the user's binds
        from sifpy.runtime import gpu

        dev_is_host = not opts.contain and "dev" not in skip and not own_dev
        plan += gpu.mounts(opts.inject, dev_is_host=dev_is_host)
    for src, dest, readonly in spec.binds:
        if not dest.startswith("/"):
            raise RuntimeSetupError(f"can't bind: {src}: destination {dest} is not absolute")
        fd = pin(src, src)
        mode = os.fstat(fd).st_mode
        # Device nodes (and directories of them, under the host's /dev) keep device access,
        # as Apptainer's do: interconnects and GPUs are reached through them. No device
        # node can be made by the user (mknod needs CAP_MKNOD in the initial namespace),
        # and a host mount's own nodev is locked and kept (mount.remount).
        devices = stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or _under_dev(os.path.realpath(src))
        plan.append(
            Mount(dest, "bind", fd, readonly=readonly, is_dir=stat.S_ISDIR(mode), devices=devices)
        )
    return plan


def _under_dev(path: str) -> bool:
    return path == "/dev" or path.startswith("/dev/")


def _needs_own_dev(spec: LaunchSpec) -> bool:
    """Whether a bind's destination (or a device node's, for --nv, --rocm, --device) is in
    /dev but is not there already: the host's /dev, which the container shares by default,
    is no place to create it, nor to bind another node over one of its own."""
    for _src, dest, _ro in spec.binds:
        path = os.path.normpath(dest)
        if _under_dev(path) and path != "/dev" and not os.path.lexists(path):
            return True
    inject = spec.options.inject
    for host, dest in inject.devices if inject is not None else ():
        path = os.path.normpath(dest)
        if _under_dev(path) and os.path.realpath(host) != os.path.realpath(path):
            return True
    return False


def _own_dev() -> list[Mount]:
    """/dev as the container's own tmpfs, holding binds of every entry of the host's (and its
    symlinks): mount points can then be created in it."""
    plan = [Mount("/dev", "tmpfs", data="mode=0755")]
    for name in sorted(os.listdir("/dev")):
        path = f"/dev/{name}"
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            plan.append(Mount(path, "symlink", data=os.readlink(path)))
            continue
        fd = pin(path, "/dev")
        plan.append(Mount(path, "bind", fd, harden=False, is_dir=stat.S_ISDIR(st.st_mode)))
    return plan

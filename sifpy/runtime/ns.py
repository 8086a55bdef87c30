"""Thin, typed wrappers over the kernel calls the runtime needs, and capability probes.

Python 3.11 has no ``os.unshare``, ``os.mount`` or ``pivot_root``; they are reached through
_ctypes on the C library that is already loaded into the interpreter (``CDLL(None)``), so no
``find_library`` runs (it forks ``ldconfig``/``gcc`` and would read the image's files after a
``pivot_root``). Every wrapper turns ``errno`` into a :class:`RuntimeSetupError` whose message
follows the ``can't VERB: OBJECT: reason`` grammar.

Everything here is callable after ``pivot_root``: no lazy imports, no NSS, no file reads
outside ``/proc/self``.
"""

from __future__ import annotations

import errno
import os
import sys

from sifpy import TYPE_CHECKING
from sifpy.errors import RuntimeSetupError

# Clone flags (include/uapi/linux/sched.h).
CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWNET = 0x40000000

# mount(2) flags (include/uapi/linux/mount.h).
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_UNBINDABLE = 0x20000
MS_PRIVATE = 0x40000
MS_SLAVE = 0x80000
MS_RELATIME = 0x200000
MNT_DETACH = 0x2

# prctl(2) options (include/uapi/linux/prctl.h).
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39

# pivot_root has no glibc wrapper; the syscall number depends on the architecture
# (arch/x86/entry/syscalls/syscall_64.tbl, include/uapi/asm-generic/unistd.h).
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "ppc64le": 203, "riscv64": 41, "s390x": 217}
_SYS_RT_SIGACTION = {"x86_64": 13, "aarch64": 134, "ppc64le": 173, "riscv64": 134, "s390x": 174}

# The C library already loaded into the interpreter (dlopen(NULL)), called through _ctypes
# directly: the public ctypes package adds ~0.9 ms to exec's imports (python -X importtime
# -I -S after exec's own modules, 2-CPU Xeon: ~5% of a start), for the five C types below.
if TYPE_CHECKING:
    from typing import Any

    _libc: Any
    _CInt: Any
    _CLong: Any
    _CULong: Any
    _ctypes: Any

    def get_errno() -> int: ...

    def _c_buffer(data: bytes) -> Any: ...

else:
    # Not ctypes: ~0.9 ms more at each start (python -X importtime -I -S, above).
    import _ctypes
    from _ctypes import get_errno  # as above: ctypes' own costs ~0.9 ms (importtime)

    class _CInt(_ctypes._SimpleCData):
        _type_ = "i"

    class _CLong(_ctypes._SimpleCData):
        _type_ = "l"

    class _CULong(_ctypes._SimpleCData):
        _type_ = "L"

    class _CCharP(_ctypes._SimpleCData):
        _type_ = "z"

    class _CChar(_ctypes._SimpleCData):
        _type_ = "c"

    def _c_buffer(data: bytes) -> Any:
        """A C copy of ``data`` whose address (``_ctypes.addressof``) can go into a struct."""

        class _Buf(_ctypes.Array):
            _type_ = _CChar
            _length_ = len(data)

        return _Buf.from_buffer_copy(data)

    class _Func(_ctypes.CFuncPtr):
        _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
        _restype_ = _CInt

    class _LibC:
        _handle = _ctypes.dlopen(None, os.RTLD_NOW)

        def __init__(self, **functions):
            for name, (argtypes, restype) in functions.items():
                func = _Func((name, self))
                if argtypes is not None:
                    func.argtypes = argtypes
                func.restype = restype
                setattr(self, name, func)

    _libc = _LibC(
        mount=((_CCharP, _CCharP, _CCharP, _CULong, _CCharP), _CInt),
        umount2=((_CCharP, _CInt), _CInt),
        unshare=((_CInt,), _CInt),
        setns=((_CInt, _CInt), _CInt),
        prctl=((_CInt, _CULong, _CULong, _CULong, _CULong), _CInt),
        capset=((_CCharP, _CCharP), _CInt),
        capget=(None, _CInt),  # (header bytes, a _c_buffer the kernel writes)
        syscall=(None, _CLong),  # variadic: pass _CLong/_CInt/_CULong, bytes or None
        sethostname=((_CCharP, _CULong), _CInt),
    )


def _fail(verb: str, obj: str, err: int, hint: str | None = None) -> RuntimeSetupError:
    return RuntimeSetupError(f"can't {verb}: {obj}: {os.strerror(err)}", hint)


_USERNS_HINT = (
    "unprivileged user namespaces may be disabled: check the sysctls "
    "user.max_user_namespaces (> 0), kernel.unprivileged_userns_clone (Debian, = 1) "
    "and kernel.apparmor_restrict_unprivileged_userns (Ubuntu, = 0)"
)


def unshare(flags: int) -> None:
    """Move the calling process into new namespaces (``unshare(2)``).

    The one ctypes fallback for Python < 3.12, which lacks ``os.unshare``. The kernel refuses
    ``CLONE_NEWUSER`` in a multi-threaded process (EINVAL), so call this only in a freshly
    forked child.
    """
    if _libc.unshare(flags) != 0:
        err = get_errno()
        hint = (
            _USERNS_HINT if flags & CLONE_NEWUSER and err in (errno.EPERM, errno.ENOSPC) else None
        )
        raise _fail("unshare", f"flags {flags:#x}", err, hint)


def setns(fd: int, nstype: int, what: str) -> None:
    """Join the namespace open as ``fd`` (``setns(2)``; ``os.setns`` is Python 3.12's).

    Joining a user namespace needs a single-threaded caller and gives it every capability
    in that namespace (the kernel's rule for its owner); a mount namespace then sets the
    caller's root and cwd to that namespace's root (the container's, once pivoted).
    """
    if _libc.setns(fd, nstype) != 0:
        raise _fail("join namespace", what, get_errno())


def _write_proc(path: str, data: str) -> None:
    # One write(2) per file: the kernel accepts a map only in a single write.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, data.encode())
        finally:
            os.close(fd)
    except OSError as exc:
        raise _fail("write", path, exc.errno or errno.EIO) from exc


def map_ids(outer_uid: int, outer_gid: int, inner_uid: int, inner_gid: int) -> None:
    """Map one uid and one gid of the parent namespace into the caller's new user namespace.

    Must run in the process that just called ``unshare(CLONE_NEWUSER)``. An unprivileged process
    may map only its own ids, one each, and must first deny ``setgroups(2)`` (since Linux 3.19,
    CVE-2014-8989: otherwise it could drop a supplementary group that a negative ACL keys on).
    """
    _write_proc("/proc/self/setgroups", "deny")
    _write_proc("/proc/self/uid_map", f"{inner_uid} {outer_uid} 1\n")
    _write_proc("/proc/self/gid_map", f"{inner_gid} {outer_gid} 1\n")


def set_no_new_privs() -> None:
    """Set ``PR_SET_NO_NEW_PRIVS``, then read it back: fail closed if it did not stick.

    With it, exec never grants privileges (setuid bits, file capabilities) to anything the
    container runs.
    """
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise _fail("set", "no_new_privs", get_errno())
    if _libc.prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) != 1:
        raise RuntimeSetupError("can't set: no_new_privs: the kernel did not keep it")


PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
_CAP_VERSION_3 = 0x20080522


def drop_inherited_caps() -> None:
    """Clear the ambient and inheritable capability sets, keep the effective and permitted.

    The starter (sifpy/cli/starter.c) enters the user namespace before it execs Python, and
    carries its capabilities there across exec in the ambient set; cleared at once, every
    program this process execs starts as if it had unshared itself (no capability but from
    its uid 0 in the namespace, none with ``--fakeroot`` off).
    """
    if _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0:
        raise _fail("clear", "ambient capabilities", get_errno())
    with open("/proc/self/status", "rb") as f:
        fields = dict(line.split(b":\t", 1) for line in f.read().splitlines() if b":\t" in line)
    _capset(int(fields[b"CapEff"], 16), int(fields[b"CapPrm"], 16))


def _capset(effective: int, permitted: int, inheritable: int = 0) -> None:
    """Set this process's effective, permitted and inheritable sets (bit masks)."""
    order = sys.byteorder
    header = _CAP_VERSION_3.to_bytes(4, order) + bytes(4)  # this process
    data = b"".join(
        (effective >> (32 * i) & 0xFFFFFFFF).to_bytes(4, order)
        + (permitted >> (32 * i) & 0xFFFFFFFF).to_bytes(4, order)
        + (inheritable >> (32 * i) & 0xFFFFFFFF).to_bytes(4, order)
        for i in (0, 1)
    )
    if _libc.capset(header, data) != 0:
        raise _fail("set", "capabilities", get_errno())


CAP_SYS_ADMIN = 21
_PR_CAP_AMBIENT_RAISE = 2


def keep_caps_across_exec(caps: tuple[int, ...]) -> None:
    """Put ``caps`` (held now, in this user namespace) in the ambient set, so that the next
    ``execve`` of an ordinary program keeps them although this process's uid is not 0 here.
    For a FUSE server built on libfuse 2 (fuse2fs), which can't take a connection that is
    already mounted and so must call mount(2) itself; Apptainer starts it the same way
    (AmbientCaps in https://github.com/apptainer/apptainer/blob/main/internal/pkg/image/
    driver/imagedriver.go). no_new_privs does not stop it: nothing is gained at exec."""
    with open("/proc/self/status", "rb") as f:
        fields = dict(line.split(b":\t", 1) for line in f.read().splitlines() if b":\t" in line)
    mask = sum(1 << cap for cap in caps)
    _capset(int(fields[b"CapEff"], 16), int(fields[b"CapPrm"], 16), mask)
    for cap in caps:
        if _libc.prctl(PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE, cap, 0, 0) != 0:
            raise _fail("raise", f"ambient capability {cap}", get_errno())


PR_CAPBSET_DROP = 24


_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 22, 2


def seccomp_fprog(prog: bytes) -> Any:
    """The C ``struct sock_fprog`` for the classic-BPF program ``prog`` (``struct
    sock_filter[]`` bytes), for :func:`set_seccomp_filter`. Build it before forking the
    process that installs it: in a freshly forked child, making it (a ctypes class, the pages
    it touches copied) costs ~0.2 ms of every container start."""
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; }: on the 64-bit
    # ABIs supported, the pointer sits at offset 8 (6 bytes of padding after len). One C
    # buffer holds it and, after it, the program.
    order = sys.byteorder
    buf = _c_buffer((len(prog) // 8).to_bytes(2, order) + bytes(14) + prog)
    buf[8:16] = (_ctypes.addressof(buf) + 16).to_bytes(8, order)
    return buf


def set_seccomp_filter(fprog: Any) -> None:
    """Install the filter ``fprog`` (:func:`seccomp_fprog`) on the calling thread with
    ``prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER)``; it is inherited by every child and kept
    across ``execve``. The caller sets no_new_privs first (the kernel requires it without
    CAP_SYS_ADMIN). Filters stack: every installed one runs, the most restrictive answer
    wins.
    """
    if _libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, _ctypes.addressof(fprog), 0, 0) != 0:
        raise _fail("install", "seccomp filter", get_errno())


def limit_caps(keep: int) -> None:
    """Keep only the capabilities in the bit mask ``keep``: drop the others from the bounding
    set (so that no later ``execve``, even of a root-owned or file-capability program, gets
    them back), and from the effective and permitted sets; clear the inheritable and ambient
    sets. runc does this for a container's process (its bounding, effective, permitted sets
    are the configured list, inheritable and ambient empty since CVE-2022-24769).
    ``limit_caps(0)``: none at all, and none to gain at exec, even as uid 0 of the namespace
    (a helper that parses untrusted input, such as squashfuse).
    """
    if _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0:
        raise _fail("clear", "ambient capabilities", get_errno())
    for cap in range(64):
        if keep >> cap & 1:
            continue
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            err = get_errno()
            if err == errno.EINVAL:  # past CAP_LAST_CAP: nothing more to drop
                break
            raise _fail("drop", f"capability {cap} from the bounding set", err)
    # capget, not /proc/self/status: this runs after pivot_root, where /proc may be absent.
    order = sys.byteorder
    header = _CAP_VERSION_3.to_bytes(4, order) + bytes(4)  # this process
    now = _c_buffer(bytes(24))  # struct __user_cap_data_struct[2]: effective, permitted, inh.
    if _libc.capget(header, now) != 0:
        raise _fail("get", "capabilities", get_errno())
    raw = bytes(now)
    effective = permitted = 0
    for i in (0, 1):
        effective |= int.from_bytes(raw[12 * i : 12 * i + 4], order) << (32 * i)
        permitted |= int.from_bytes(raw[12 * i + 4 : 12 * i + 8], order) << (32 * i)
    _capset(effective & keep, permitted & keep)


def set_parent_death_signal(sig: int) -> None:
    """Ask the kernel to send ``sig`` to the caller when its parent (thread) dies.

    Survives ``execve`` of a non-setuid program. The caller must check ``os.getppid()``
    afterwards: the parent may have died before this call.
    """
    if _libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        raise _fail("set", "parent death signal", get_errno())


def set_child_subreaper(on: bool) -> None:
    """Make the caller adopt its descendants orphaned from now on (prctl(2),
    PR_SET_CHILD_SUBREAPER), so that it can reap them; ``on=False`` undoes it (the setting
    survives execve: the payload must not inherit it)."""
    if _libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) != 0:
        raise _fail("set", "child subreaper", get_errno())


def set_hostname(name: str) -> None:
    """sethostname(2), in the container's own UTS namespace (an OCI bundle's ``hostname``)."""
    data = os.fsencode(name)
    if _libc.sethostname(data, len(data)) != 0:
        raise _fail("set", f"hostname {name}", get_errno())


def set_rlimit(resource: int, soft: int, hard: int) -> None:
    """setrlimit(2) for the command (an OCI bundle's ``process.rlimits``); raising a hard
    limit above the caller's is refused by the kernel (EPERM), and said so. The caller
    imports ``resource`` before pivot_root (the host's modules are gone after it)."""
    import resource as resource_

    try:
        resource_.setrlimit(resource, (soft, hard))
    except (OSError, ValueError) as exc:
        err = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EPERM
        raise _fail(
            "set",
            f"resource limit {resource} to {soft}/{hard}",
            err,
            "a hard limit can only be lowered without privilege",
        ) from exc


def _b(s: str | None) -> bytes | None:
    return None if s is None else os.fsencode(s)


def mount(
    source: str | None,
    target: str,
    fstype: str | None = None,
    flags: int = 0,
    data: str | None = None,
    what: str | None = None,
) -> None:
    """Call ``mount(2)``; ``what`` names the mount in the error message (default ``target``)."""
    if _libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)) != 0:
        raise _fail("mount", what or target, get_errno())


def umount2(target: str, flags: int = 0) -> None:
    """Call ``umount2(2)``."""
    if _libc.umount2(_b(target), flags) != 0:
        raise _fail("unmount", target, get_errno())


# The new mount API (Linux 5.2; include/uapi/linux/mount.h); the syscall numbers are the
# same on every architecture since 5.1 (the unified table from 424 on).
_SYS_MOVE_MOUNT, _SYS_FSOPEN, _SYS_FSCONFIG, _SYS_FSMOUNT = 429, 430, 431, 432
_FSCONFIG_SET_FLAG, _FSCONFIG_SET_STRING, _FSCONFIG_CMD_CREATE = 0, 1, 6
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV = 0x1, 0x2, 0x4
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_AT_FDCWD = -100


def _syscall(what: str, obj: str, nr: int, *args: object) -> int:
    res = int(_libc.syscall(_CLong(nr), *args))
    if res < 0:
        raise _fail(what, obj, get_errno())
    return res


def detached_mount(
    fstype: str,
    source: str,
    readonly: bool,
    attrs: int,
    options: tuple[tuple[str, str], ...] = (),
) -> int:
    """Create a mount that is attached nowhere yet (fsopen/fsconfig/fsmount); return its fd.

    The privilege check happens here, in the caller's user namespace; :func:`move_mount` can
    later attach it in a mount namespace of a child user namespace (the kernel squashfs path:
    real root mounts, the container's namespaces receive the mount). Until then it is
    reachable only through the fd (``openat``), which is how a FUSE image is served before
    the container's session exists (:func:`sifpy.runtime.mount.serve_squashfs`).
    ``options``: further string parameters (``fd``, ``rootmode``, ... for FUSE).
    """
    obj = f"{fstype} from {source}"
    fs_fd = _syscall("mount", obj, _SYS_FSOPEN, fstype.encode(), 1)  # FSOPEN_CLOEXEC
    try:
        if readonly:
            _syscall("mount", obj, _SYS_FSCONFIG, fs_fd, _FSCONFIG_SET_FLAG, b"ro", None, 0)
        for key, value in (("source", source), *options):
            _syscall(
                "mount", obj, _SYS_FSCONFIG, fs_fd, _FSCONFIG_SET_STRING, _b(key), _b(value), 0
            )
        _syscall("mount", obj, _SYS_FSCONFIG, fs_fd, _FSCONFIG_CMD_CREATE, None, None, 0)
        return _syscall("mount", obj, _SYS_FSMOUNT, fs_fd, 1, attrs)  # FSMOUNT_CLOEXEC
    finally:
        os.close(fs_fd)


_SYS_MOUNT_SETATTR = 442  # Linux 5.12, the unified table
_AT_RECURSIVE = 0x8000


def set_readonly_recursive(path: str, what: str) -> bool:
    """Make the mount at ``path`` and every mount below it read-only (``mount_setattr(2)``
    with AT_RECURSIVE); False when the kernel has no mount_setattr (before 5.12)."""
    attr = MOUNT_ATTR_RDONLY.to_bytes(8, sys.byteorder) + bytes(24)  # struct mount_attr
    res = int(
        _libc.syscall(_CLong(_SYS_MOUNT_SETATTR), _AT_FDCWD, _b(path), _AT_RECURSIVE, attr, 32)
    )
    if res == 0:
        return True
    err = get_errno()
    if err == errno.ENOSYS:
        return False
    raise _fail("remount", f"{what} (read-only, recursively)", err)


def move_mount(mount_fd: int, target: str) -> None:
    """Attach the detached mount ``mount_fd`` on ``target`` (``move_mount(2)``)."""
    _syscall(
        "mount",
        target,
        _SYS_MOVE_MOUNT,
        mount_fd,
        b"",
        _AT_FDCWD,
        _b(target),
        _MOVE_MOUNT_F_EMPTY_PATH,
    )


def in_initial_userns() -> bool:
    """True when the caller's user namespace is the initial one (the identity map)."""
    try:
        with open("/proc/self/uid_map", "rb") as f:
            return f.read().split() == [b"0", b"0", b"4294967295"]
    except OSError:
        return False


def pivot_root(new_root: str, put_old: str) -> None:
    """Call ``pivot_root(2)`` through ``syscall(2)`` (glibc has no wrapper)."""
    nr = _SYS_PIVOT_ROOT.get(os.uname().machine)
    if nr is None:
        raise RuntimeSetupError(
            f"can't pivot_root: architecture {os.uname().machine} is not supported"
        )
    if _libc.syscall(_CLong(nr), _b(new_root), _b(put_old)) != 0:
        raise _fail("pivot_root", new_root, get_errno())


def reset_reserved_signals() -> None:
    """Set signals 32 and 33 to their default disposition, with the raw syscall.

    glibc reserves them (SIGCANCEL, SIGSETXID) and its sigaction() refuses to touch them,
    so Python can't either; but an ignored disposition inherited from our own caller
    survives execve and would leak into the container (seen under some job launchers).
    An all-zero ``struct kernel_sigaction`` is SIG_DFL, no flags, empty mask on every arch.
    """
    nr = _SYS_RT_SIGACTION.get(os.uname().machine)
    if nr is None:
        return
    zero = bytes(32)  # only read by the kernel
    for sig in (32, 33):
        _libc.syscall(_CLong(nr), _CInt(sig), zero, None, _CULong(8))

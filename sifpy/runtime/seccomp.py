"""Root emulation for unprivileged builds: a seccomp filter that fakes ownership calls.

In a user namespace that maps one id (the builder's, as 0), ``chown`` to any other owner and
``setuid``-family calls fail with EINVAL/EPERM, and device ``mknod`` with EPERM; ``apt``,
``dpkg`` and many maintainer scripts give up on those errors. Charliecloud ("seccomp"
root emulation, its default for ``ch-image build``) and enroot (``enroot-nsenter``) solve
this with a classic-BPF filter that makes exactly these calls return 0 without doing
anything: "zero-consistency" root emulation (arXiv 2405.06085). The image then records
every file as owned by the builder, which ``mksquashfs -all-root`` turns into root.

Faked (return 0): ``chown fchown lchown fchownat``, ``setuid setgid setreuid setregid
setresuid setresgid setfsuid setfsgid setgroups``, and ``mknod``/``mknodat`` of character
or block devices (FIFOs, sockets and regular files are still made for real). The filter is
inherited by every child and survives ``execve``; it needs ``no_new_privs``, which
:func:`install` sets. Supported architectures: x86_64 and aarch64; any other syscall ABI
(e.g. i386 or x32 on x86_64) passes unfiltered.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import stat
import struct

# linux/filter.h, linux/seccomp.h, linux/audit.h
_BPF_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_BPF_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_BPF_AND_K = 0x54  # BPF_ALU | BPF_AND | BPF_K
_BPF_RET_K = 0x06  # BPF_RET | BPF_K
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000  # | errno; errno 0 makes the call "succeed"
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2

# struct seccomp_data: int nr; __u32 arch; __u64 ip; __u64 args[6]. The low 32 bits of an
# argument sit at its offset on little-endian machines (both supported arches are).
_OFF_NR, _OFF_ARCH = 0, 4
_S_IFMT = 0o170000  # stat.S_IFMT is a function in Python


def _arg_low(i: int) -> int:
    return 16 + 8 * i


# arch -> (AUDIT_ARCH value, {syscall: nr}, {mknod syscall: index of the mode argument})
_ARCHES: dict[str, tuple[int, dict[str, int], dict[int, int]]] = {
    "x86_64": (
        0xC000003E,
        {
            "chown": 92,
            "fchown": 93,
            "lchown": 94,
            "setuid": 105,
            "setgid": 106,
            "setreuid": 113,
            "setregid": 114,
            "setgroups": 116,
            "setresuid": 117,
            "setresgid": 119,
            "setfsuid": 122,
            "setfsgid": 123,
            "fchownat": 260,
        },
        {133: 1, 259: 2},  # mknod(path, mode, dev), mknodat(dirfd, path, mode, dev)
    ),
    "aarch64": (
        0xC00000B7,
        {
            "fchownat": 54,
            "fchown": 55,
            "setregid": 143,
            "setgid": 144,
            "setreuid": 145,
            "setuid": 146,
            "setresuid": 147,
            "setresgid": 149,
            "setfsuid": 151,
            "setfsgid": 152,
            "setgroups": 159,
        },
        {33: 2},  # mknodat only (no legacy mknod in the generic table)
    ),
}


class _Prog:
    """A tiny assembler: instructions with symbolic jump targets."""

    def __init__(self) -> None:
        self.ops: list[tuple[int, int | str, int | str, int]] = []
        self.labels: dict[str, int] = {}

    def op(self, code: int, k: int, jt: int | str = 0, jf: int | str = 0) -> None:
        self.ops.append((code, jt, jf, k))

    def label(self, name: str) -> None:
        self.labels[name] = len(self.ops)

    def assemble(self) -> bytes:
        out = b""
        for i, (code, jt, jf, k) in enumerate(self.ops):

            def rel(t: int | str, i: int = i) -> int:
                return t if isinstance(t, int) else self.labels[t] - i - 1

            out += struct.pack("=HBBI", code, rel(jt), rel(jf), k & 0xFFFFFFFF)
        return out


def build_filter(machine: str | None = None) -> bytes | None:
    """The filter program (``struct sock_filter[]`` bytes) for ``machine``, or None if
    the architecture is not supported."""
    entry = _ARCHES.get(machine or platform.machine())
    if entry is None:
        return None
    audit_arch, calls, mknods = entry
    p = _Prog()
    p.op(_BPF_LD_W_ABS, _OFF_ARCH)
    p.op(_BPF_JEQ_K, audit_arch, 0, "allow")
    p.op(_BPF_LD_W_ABS, _OFF_NR)
    for nr in sorted(calls.values()):
        p.op(_BPF_JEQ_K, nr, "fake")
    for nr in mknods:
        p.op(_BPF_JEQ_K, nr, f"mknod{nr}")
    p.op(_BPF_RET_K, _RET_ALLOW)  # classic BPF jumps only forward: the returns go last
    for nr, mode_arg in mknods.items():
        # Only device nodes are faked: (mode & S_IFMT) in (S_IFCHR, S_IFBLK).
        p.label(f"mknod{nr}")
        p.op(_BPF_LD_W_ABS, _arg_low(mode_arg))
        p.op(_BPF_AND_K, _S_IFMT)
        p.op(_BPF_JEQ_K, stat.S_IFCHR, "fake")
        p.op(_BPF_JEQ_K, stat.S_IFBLK, "fake", "allow")
    p.label("allow")
    p.op(_BPF_RET_K, _RET_ALLOW)
    p.label("fake")
    p.op(_BPF_RET_K, _RET_ERRNO | 0)
    return p.assemble()


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install() -> bool:
    """Install the filter on the calling thread (and so on all its future children).

    Sets ``no_new_privs`` first, as the kernel requires of an unprivileged caller. Returns
    False when the architecture is not supported; raises OSError when the kernel refuses.
    Call it in a process that is about to exec the build's commands, never in a
    long-lived sifpy process: it changes what ``chown`` means for everything after it.
    """
    prog = build_filter()
    if prog is None:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(err)}")
    buf = ctypes.create_string_buffer(prog, len(prog))
    fprog = _SockFprog(len(prog) // 8, ctypes.cast(buf, ctypes.c_void_p))
    if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        err = ctypes.get_errno() or errno.EINVAL
        raise OSError(err, f"prctl(PR_SET_SECCOMP): {os.strerror(err)}")
    return True

"""The container's seccomp filters (classic BPF, assembled here: no libseccomp).

* **Terminal injection** (:func:`install_payload_filter`, every container): ``ioctl``
  ``TIOCSTI`` pushes bytes into a terminal's input queue, ``TIOCLINUX`` (subcode 2/3)
  pastes a console selection; a program in the image could type commands that the
  caller's shell runs after the container exits (CVE-2017-5226 in bubblewrap). Both
  return EPERM, flatpak's rule (flatpak-run.c ``setup_seccomp``, bubblewrap's
  ``--new-session`` advice): the request number is compared on its low 32 bits only,
  because the kernel reads ``cmd`` as an ``unsigned int`` and a filter that compared all
  64 bits would miss ``0xffffffff00005412`` (CVE-2019-10063). The rule covers the
  compatibility ABIs too (i386 and x32 on x86_64, arm on aarch64), as flatpak adds them:
  a 32-bit program in the image would otherwise go around it. The terminal's other
  ioctls (job control: TIOCSPGRP, TIOCGWINSZ...) are untouched.
* **Build** (``confine``, the build's ``%post``): besides, no new user namespace
  (``unshare``/``clone`` with ``CLONE_NEWUSER``: EPERM; ``clone3``, whose flags a filter
  can't read: ENOSYS, so the C library falls back to ``clone``), Docker's default
  profile for a process without CAP_SYS_ADMIN: a nested user namespace would give the
  payload every capability back (the mounts it sees stay locked there, but a fresh
  sysfs in a new network namespace would not be).
* **Root emulation** (:func:`install`, unprivileged builds without subordinate ids): in a
  user namespace that maps one id (the builder's, as 0), ``chown`` to any other owner and
  ``setuid``-family calls fail with EINVAL/EPERM, and device ``mknod`` with EPERM;
  ``apt``, ``dpkg`` and many maintainer scripts give up on those errors. Charliecloud
  ("seccomp" root emulation, its default for ``ch-image build``) and enroot
  (``enroot-nsenter``) solve this with a filter that makes exactly these calls return 0
  without doing anything: "zero-consistency" root emulation (arXiv 2405.06085). The image
  then records every file as owned by the builder, which ``mksquashfs -all-root`` turns
  into root. Faked (return 0): ``chown fchown lchown fchownat``, ``setuid setgid setreuid
  setregid setresuid setresgid setfsuid setfsgid setgroups``, and ``mknod``/``mknodat`` of
  character or block devices (FIFOs, sockets and regular files are still made for real).
  Supported architectures: x86_64 and aarch64; any other syscall ABI passes unfiltered.

Every filter is inherited by every child and survives ``execve``; installing one needs
``no_new_privs``. This module is on the path of every ``sifpy exec``: it imports nothing
that costs (no ctypes, struct or platform); the kernel calls are in :mod:`.ns`.
"""

from __future__ import annotations

import errno
import os
import stat
import sys

from sifpy.runtime import ns

# linux/filter.h, linux/seccomp.h, linux/audit.h
_BPF_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_BPF_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_BPF_AND_K = 0x54  # BPF_ALU | BPF_AND | BPF_K
_BPF_JSET_K = 0x45  # BPF_JMP | BPF_JSET | BPF_K
_BPF_RET_K = 0x06  # BPF_RET | BPF_K
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000  # | errno; errno 0 makes the call "succeed"

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
        # struct sock_filter { __u16 code; __u8 jt; __u8 jf; __u32 k; }, native order. Built
        # in the container's first process on every start: one plain loop, no closures.
        order, labels, out = sys.byteorder, self.labels, []
        for i, (code, jt, jf, k) in enumerate(self.ops):
            if isinstance(jt, str):
                jt = labels[jt] - i - 1
            if isinstance(jf, str):
                jf = labels[jf] - i - 1
            out.append(
                code.to_bytes(2, order) + bytes((jt, jf)) + (k & 0xFFFFFFFF).to_bytes(4, order)
            )
        return b"".join(out)


def build_filter(machine: str | None = None) -> bytes | None:
    """The filter program (``struct sock_filter[]`` bytes) for ``machine``, or None if
    the architecture is not supported."""
    entry = _ARCHES.get(machine or os.uname().machine)
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


def install() -> bool:
    """Install the root-emulation filter on the calling thread (and so on all its future
    children).

    Sets ``no_new_privs`` first, as the kernel requires of an unprivileged caller. Returns
    False when the architecture is not supported; raises :class:`RuntimeSetupError` when the
    kernel refuses. Call it in a process that is about to exec the build's commands, never in
    a long-lived sifpy process: it changes what ``chown`` means for everything after it.
    """
    prog = build_filter()
    if prog is None:
        return False
    ns.set_no_new_privs()
    ns.set_seccomp_filter(ns.seccomp_fprog(prog))
    return True


# --- the payload's filter -----------------------------------------------------------------

# asm-generic/ioctls.h (x86, arm and arm64 use the generic numbers)
TIOCSTI = 0x5412
TIOCLINUX = 0x541C
_CLONE_NEWUSER = 0x10000000
_X32 = 0x40000000  # __X32_SYSCALL_BIT: x32 calls share AUDIT_ARCH_X86_64

# AUDIT_ARCH -> (ioctl numbers, unshare numbers, clone numbers, clone3 numbers). All four
# ABIs are listed whatever the machine: an arch value that never occurs costs one compare.
_PAYLOAD_ARCHES: dict[int, tuple[tuple[int, ...], ...]] = {
    0xC000003E: ((16, _X32 | 514), (272, _X32 | 272), (56, _X32 | 56), (435, _X32 | 435)),
    0x40000003: ((54,), (310,), (120,), (435,)),  # i386
    0xC00000B7: ((29,), (97,), (220,), (435,)),  # aarch64
    0x40000028: ((54,), (337,), (120,), (435,)),  # arm (EABI)
}


def payload_filter(confine: bool = False) -> bytes:
    """The filter every container's command runs under (see the module docstring); with
    ``confine`` (a build's ``%post``), no new user namespace either."""
    p = _Prog()
    p.op(_BPF_LD_W_ABS, _OFF_ARCH)
    for i, arch in enumerate(_PAYLOAD_ARCHES):
        p.op(_BPF_JEQ_K, arch, f"arch{i}")
    p.op(_BPF_RET_K, _RET_ALLOW)
    for i, (ioctls, unshares, clones, clone3s) in enumerate(_PAYLOAD_ARCHES.values()):
        p.label(f"arch{i}")
        p.op(_BPF_LD_W_ABS, _OFF_NR)
        for nr in ioctls:
            p.op(_BPF_JEQ_K, nr, "ioctl")
        if confine:
            for nr in unshares:
                p.op(_BPF_JEQ_K, nr, "flags0")  # unshare(flags)
            for nr in clones:
                p.op(_BPF_JEQ_K, nr, "flags0")  # clone(flags, ...) on all four ABIs
            for nr in clone3s:
                p.op(_BPF_JEQ_K, nr, "enosys")
        p.op(_BPF_RET_K, _RET_ALLOW)
    p.label("ioctl")
    # The low 32 bits of the request only (flatpak's SCMP_CMP_MASKED_EQ 0xFFFFFFFF).
    p.op(_BPF_LD_W_ABS, _arg_low(1))
    p.op(_BPF_JEQ_K, TIOCSTI, "eperm")
    p.op(_BPF_JEQ_K, TIOCLINUX, "eperm")
    p.op(_BPF_RET_K, _RET_ALLOW)
    if confine:
        p.label("flags0")
        p.op(_BPF_LD_W_ABS, _arg_low(0))
        p.op(_BPF_JSET_K, _CLONE_NEWUSER, "eperm")
        p.op(_BPF_RET_K, _RET_ALLOW)
        p.label("enosys")
        p.op(_BPF_RET_K, _RET_ERRNO | errno.ENOSYS)
    p.label("eperm")
    p.op(_BPF_RET_K, _RET_ERRNO | errno.EPERM)
    return p.assemble()


_prepared: dict[bool, object] = {}  # confine -> the payload's filter, ready to install


def prepare_payload_filter(confine: bool = False) -> None:
    """Build the payload's filter now, for :func:`install_payload_filter` in a child forked
    later: built there, in a fresh copy of this process, it costs ~0.4 ms of every start
    (the pages its objects touch are copied; measured in a forked child: 0.25 ms for the
    program, 0.15 ms for its C struct), built here ~0.07 ms."""
    if confine not in _prepared:
        _prepared[confine] = ns.seccomp_fprog(payload_filter(confine))


def install_payload_filter(confine: bool = False) -> None:
    """Install :func:`payload_filter` on the calling thread; no_new_privs must be set.

    Its price: on the payload's ABI, every syscall but ioctl (and, confined, the clone
    family) is an ALLOW that the program decides from arch and nr alone, which the kernel
    (5.11+) caches, so it never runs the program for them; tests/runtime/test_seccomp.py
    checks that no change loses this. Measured (CPU time of a getppid() loop, 2-CPU VM,
    kernel 6.18): 66 ns without a filter, 75 ns under an allow-all filter (the seccomp
    entry path any filter costs), 76 ns under this one, 93 ns under a program that reads
    an argument first. The prctl installing it takes 15 us (one filter, once per
    container); build it beforehand with :func:`prepare_payload_filter`.
    SECCOMP_FILTER_FLAG_SPEC_ALLOW changed nothing here (this kernel forces no store-bypass
    mitigation on filtered tasks).
    """
    prepare_payload_filter(confine)
    ns.set_seccomp_filter(_prepared[confine])

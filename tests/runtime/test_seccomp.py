"""The payload's seccomp filter, installed in a forked child (the parent stays unfiltered):
TIOCSTI and TIOCLINUX are refused whatever the request's high 32 bits, other terminal
ioctls work, and the build's variant refuses new user namespaces."""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import termios
from collections.abc import Callable

import pytest

from sifpy.runtime import ns, seccomp

_SYS_IOCTL = {"x86_64": 16, "aarch64": 29}


def in_child(confine: bool, probe: Callable[[], int]) -> int:
    """Fork; the child installs the payload filter and exits with ``probe()``."""
    pid = os.fork()
    if pid == 0:
        code = 100
        try:
            ns.set_no_new_privs()
            seccomp.install_payload_filter(confine)
            code = probe()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def ioctl_errno(fd: int, request: int, arg: bytes) -> int:
    nr = _SYS_IOCTL.get(os.uname().machine)
    if nr is None:
        pytest.skip("no ioctl syscall number for this machine in the test")
    # syscall(2) directly: fcntl.ioctl takes an unsigned long and would reject the high bits.
    res = ns._libc.syscall(ns._CLong(nr), ns._CInt(fd), ns._CULong(request), arg)
    return 0 if res == 0 else ns.get_errno()


def test_tiocsti_and_tioclinux_are_refused_on_the_low_32_bits() -> None:
    master, slave = os.openpty()
    try:

        def probe() -> int:
            got = (
                ioctl_errno(slave, termios.TIOCSTI, b"x"),
                ioctl_errno(slave, 0xFFFFFFFF00000000 | termios.TIOCSTI, b"x"),
                ioctl_errno(slave, 0x541C, b"\x02"),  # TIOCLINUX
            )
            fcntl.ioctl(slave, termios.TIOCGWINSZ, b"\0" * 8)  # still allowed
            return 0 if got == (errno.EPERM,) * 3 else 1

        assert in_child(False, probe) == 0
        queued = struct.unpack("i", fcntl.ioctl(slave, termios.FIONREAD, b"\0" * 4))[0]
        assert queued == 0
    finally:
        os.close(master)
        os.close(slave)


def test_confined_payload_cannot_make_a_user_namespace() -> None:
    def probe() -> int:
        try:
            ns.unshare(ns.CLONE_NEWUSER)
        except Exception as exc:
            return 0 if "Operation not permitted" in str(exc) else 2
        return 1

    assert in_child(True, probe) == 0
    # Unconfined, the same call is allowed by the filter (whatever the kernel then says).
    assert in_child(False, lambda: 0) == 0


def test_filter_programs_assemble() -> None:
    for confine in (False, True):
        prog = seccomp.payload_filter(confine)
        assert len(prog) % 8 == 0 and 0 < len(prog) // 8 < 256
        # Every jump lands inside the program (classic BPF only jumps forward).
        for i in range(len(prog) // 8):
            code, jt, jf, _ = struct.unpack("=HBBI", prog[8 * i : 8 * i + 8])
            if code & 0x07 == 0x05:  # BPF_JMP
                assert i + 1 + max(jt, jf) < len(prog) // 8


# --- what the kernel can cache --------------------------------------------------------------
#
# Since Linux 5.11 (kernel/seccomp.c, seccomp_cache_prepare), a filter is not run at all for a
# syscall whose answer is ALLOW whatever its arguments: the kernel emulates the program once
# per (arch, nr) with only those two known, and records the constant ALLOWs in a bitmap. A
# program that loads anything else (an argument, the instruction pointer) on a syscall's way,
# or uses an instruction the emulator doesn't know, runs on every such syscall of the payload,
# HPC codes making millions. The interpreter below follows that emulation: on the way to a
# return, a load of any other field makes the answer "not constant" (None).

_LD_W_ABS, _RET_K, _JA = 0x20, 0x06, 0x05
_JUMPS = {0x15: "jeq", 0x25: "jgt", 0x35: "jge", 0x45: "jset"}
_AND_K = 0x54
_ALLOW = 0x7FFF0000
_NATIVE_AND_COMPAT = {"x86_64": (0xC000003E, 0x40000003), "aarch64": (0xC00000B7, 0x40000028)}


def run_bpf(prog: bytes, arch: int, nr: int, args: tuple[int, ...] | None = None) -> int | None:
    """The filter's answer for (arch, nr) and, if given, the arguments; without them, None
    where the answer depends on anything but arch and nr (as the kernel's emulator sees it)."""
    insns = [struct.unpack("=HBBI", prog[i : i + 8]) for i in range(0, len(prog), 8)]
    acc, pc = 0, 0
    while True:
        code, jt, jf, k = insns[pc]
        pc += 1
        if code == _LD_W_ABS:
            if k == 0:
                acc = nr
            elif k == 4:
                acc = arch
            elif args is not None and 16 <= k < 64 and k % 4 == 0:
                word = args[(k - 16) // 8] & 0xFFFFFFFFFFFFFFFF
                acc = (word >> 32) if k % 8 else (word & 0xFFFFFFFF)
            else:
                return None
        elif code == _AND_K:
            acc &= k
        elif code == _RET_K:
            return k
        elif code == _JA:
            pc += k
        elif code in _JUMPS:
            op = _JUMPS[code]
            taken = {
                "jeq": acc == k,
                "jgt": acc > k,
                "jge": acc >= k,
                "jset": bool(acc & k),
            }[op]
            pc += jt if taken else jf
        else:
            return None  # the kernel's emulator gives up on any other instruction


@pytest.mark.parametrize("machine", sorted(_NATIVE_AND_COMPAT))
@pytest.mark.parametrize("confine", [False, True])
def test_payload_filter_is_a_constant_allow_but_for_what_it_inspects(
    machine: str, confine: bool
) -> None:
    """On the machine's native ABI and its compat ABI, every syscall number the kernel caches
    (0..1023 covers every table) is a constant ALLOW, but ioctl (and, for a build's %post,
    unshare and clone, whose flags are read; clone3 is a constant ENOSYS)."""
    prog = seccomp.payload_filter(confine)
    for arch in _NATIVE_AND_COMPAT[machine]:
        ioctls, unshares, clones, clone3s = seccomp._PAYLOAD_ARCHES[arch]
        inspected = {nr for nr in ioctls if nr < 1024}  # x32's carry bit 30: never cached
        if confine:
            inspected |= set(unshares) | set(clones)
        for nr in range(1024):
            got = run_bpf(prog, arch, nr)
            if nr in inspected:
                assert got is None, (hex(arch), nr)
            elif confine and nr in clone3s:
                assert got == 0x00050000 | errno.ENOSYS, (hex(arch), nr)
            else:
                assert got == _ALLOW, (hex(arch), nr, got)


@pytest.mark.parametrize("arch", sorted(seccomp._PAYLOAD_ARCHES))
def test_payload_filter_refuses_tiocsti_on_every_abi(arch: int) -> None:
    """The answers the filter gives with the arguments known, on each of the four ABIs (x32's
    ioctl included): the compat ABIs can't be tried on a 64-bit test machine."""
    prog = seccomp.payload_filter(False)
    eperm = 0x00050000 | errno.EPERM
    for nr in seccomp._PAYLOAD_ARCHES[arch][0]:
        for request in (0x5412, 0xFFFFFFFF00005412, 0x541C):
            assert run_bpf(prog, arch, nr, (3, request, 0, 0, 0, 0)) == eperm
        assert run_bpf(prog, arch, nr, (3, 0x5413, 0, 0, 0, 0)) == _ALLOW  # TIOCGWINSZ
    # An ABI the filter doesn't list passes whole (it can't occur on these machines).
    assert run_bpf(prog, 0x12345678, 16) == _ALLOW


@pytest.mark.parametrize("machine", sorted(_NATIVE_AND_COMPAT))
def test_root_emulation_filter_inspects_only_mknod(machine: str) -> None:
    prog = seccomp.build_filter(machine)
    assert prog is not None
    audit_arch, calls, mknods = seccomp._ARCHES[machine]
    for nr in range(1024):
        got = run_bpf(prog, audit_arch, nr)
        if nr in mknods:
            assert got is None
        elif nr in calls.values():
            assert got == 0x00050000  # "succeeds", doing nothing
        else:
            assert got == _ALLOW, (nr, got)


def test_the_interpreter_sees_what_defeats_the_cache() -> None:
    """run_bpf is no rubber stamp: a program that reads the instruction pointer or an
    argument before it decides on nr, or uses an instruction the kernel's emulator lacks,
    is "not constant" for every syscall, as the kernel then runs it on each."""
    for first in ((0x20, 8), (0x20, 16), (0x61, 0)):  # load ip, load args[0], BPF_LDX_MEM
        p = seccomp._Prog()
        p.op(*first)
        p.op(0x06, _ALLOW)
        assert run_bpf(p.assemble(), 0xC000003E, 39) is None


def test_a_prepared_filter_is_installed_as_is_in_the_child(monkeypatch: pytest.MonkeyPatch) -> None:
    """The container's first process installs the filter its parent built before the fork
    (building it in a fresh fork costs ~0.3 ms of every start): there, nothing is assembled
    again, and what is installed is the same filter (TIOCSTI refused)."""
    seccomp.prepare_payload_filter(False)

    def no_build(confine: bool = False) -> bytes:
        raise AssertionError("assembled again in the child")

    monkeypatch.setattr(seccomp, "payload_filter", no_build)
    master, slave = os.openpty()
    try:
        probe = lambda: 0 if ioctl_errno(slave, termios.TIOCSTI, b"x") == errno.EPERM else 1  # noqa: E731
        assert in_child(False, probe) == 0
    finally:
        os.close(master)
        os.close(slave)

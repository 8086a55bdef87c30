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

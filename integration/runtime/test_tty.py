"""Terminal injection: a program in the image must not push input into the caller's
terminal (``ioctl`` TIOCSTI, TIOCLINUX), through ``python3 -m sifpy`` and through the
starter, for exec, run, shell and test; an interactive shell still gets its terminal and
job control.

Each run happens in a real pty that is the controlling terminal of the session (as a
login shell's is), in raw mode so that FIONREAD on it counts every byte waiting in its
input queue: a byte pushed by TIOCSTI would be read by the caller's shell once the
container has exited. The payload is a small static C program (the busybox image has no
Python; it does what ``fcntl.ioctl(0, termios.TIOCSTI, b"x")`` does), run first outside
the container as the control: it injects there, so the test can see an injection.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import shutil
import struct
import subprocess
import termios
import time
import tty
from pathlib import Path
from typing import Any

import pytest

from integration.conftest import UserRunner, require
from integration.runtime.conftest import busybox_rootfs, make_sif

PAYLOAD_C = r"""
#include <errno.h>
#include <stdio.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

static void report(const char *name, long r) {
    printf("%s=%d\n", name, r == 0 ? 0 : errno);
}

#ifdef __x86_64__
/* The i386 ABI from a 64-bit process (int $0x80): seccomp sees AUDIT_ARCH_I386 and the
   i386 numbers, a way around a filter that only knows x86_64. The argument must lie below
   4 GiB: a static (non-PIE) program's data does. */
static char c32 = 'x';
static long int80(long nr, long a, long b, long c) {
    long r;
    __asm__ volatile("int $0x80" : "=a"(r) : "a"(nr), "b"(a), "c"(b), "d"(c) : "memory");
    return r;
}
#endif

int main(void) {
    char c = 'x', subcode = 2; /* TIOCL_SETSEL: a console paste, its first step */
    struct winsize ws;
    report("TIOCSTI", ioctl(0, TIOCSTI, &c));
    /* The kernel reads the request as an unsigned int: the high 32 bits are ignored. */
    report("TIOCSTI_HIGH", syscall(SYS_ioctl, 0, 0xffffffff00000000UL | TIOCSTI, &c));
    report("TIOCLINUX", ioctl(0, TIOCLINUX, &subcode));
    report("TIOCGWINSZ", ioctl(0, TIOCGWINSZ, &ws)); /* other tty ioctls still work */
#ifdef __x86_64__
    long r = int80(54, 0, TIOCSTI, (long)&c32); /* i386 ioctl */
    printf("TIOCSTI_I386=%ld\n", r < 0 ? -r : 0);
#endif
    fflush(stdout);
    return 0;
}
"""


def compile_payload(dest: Path) -> Path:
    """The static payload program (``cc -static``), world-readable and executable."""
    require(None if shutil.which("cc") else "no C compiler (cc) for the TIOCSTI payload")
    src = dest.with_suffix(".c")
    src.write_text(PAYLOAD_C)
    res = subprocess.run(
        ["cc", "-static", "-O", "-o", str(dest), str(src)], capture_output=True, text=True
    )
    require(None if res.returncode == 0 else f"can't link a static program: {res.stderr}")
    dest.chmod(0o755)
    return dest


def run_in_pty(
    runner: UserRunner | None, argv: list[str], typed: bytes = b"", **kw: Any
) -> tuple[int, str, int]:
    """Run ``argv`` as the test user (``runner``; None: as this process's user, with
    ``env`` and ``cwd`` from ``kw``) with a fresh pty as its controlling terminal and 0, 1,
    2; type ``typed``; return (exit status, what it wrote, bytes left queued in the
    terminal's input after it exited)."""
    env = kw.pop("env", None)
    if runner is not None:
        argv, env = runner.argv(argv), runner.env(env)
        kw.setdefault("cwd", runner.user.home)
    master, slave = os.openpty()
    try:
        tty.setraw(slave)  # no line discipline buffering or echo: FIONREAD counts each byte

        def controlling_tty() -> None:  # runs after setsid (start_new_session)
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        proc = subprocess.Popen(
            argv,
            env=env,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
            preexec_fn=controlling_tty,
            cwd=kw.pop("cwd", None),
        )
        if typed:
            time.sleep(0.5)
            os.write(master, typed)
        out = b""
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            if select.select([master], [], [], 0.1)[0]:
                out += os.read(master, 65536)
        if proc.poll() is None:
            proc.kill()
        code = proc.wait()
        while select.select([master], [], [], 0.2)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        queued = struct.unpack("i", fcntl.ioctl(slave, termios.FIONREAD, b"\0" * 4))[0]
        return code, out.decode(errors="replace"), queued
    finally:
        os.close(master)
        os.close(slave)


def results(out: str) -> dict[str, int]:
    return {
        k: int(v)
        for k, _, v in (ln.strip().partition("=") for ln in out.splitlines())
        if k in ("TIOCSTI", "TIOCSTI_HIGH", "TIOCSTI_I386", "TIOCLINUX", "TIOCGWINSZ")
    }


def blocked(out: str) -> None:
    expected = {
        "TIOCSTI": errno.EPERM,
        "TIOCSTI_HIGH": errno.EPERM,
        "TIOCLINUX": errno.EPERM,
        "TIOCGWINSZ": 0,
    }
    if os.uname().machine == "x86_64":
        expected["TIOCSTI_I386"] = errno.EPERM
    assert results(out) == expected, out


@pytest.fixture(scope="module")
def tty_image(workdir: Path, runtime_ready: UserRunner) -> dict[str, str]:
    """A busybox SIF with the payload as /bin/inject, and as its runscript and test."""
    payload = compile_payload(workdir / "inject")

    def extra(root: Path) -> None:
        shutil.copy2(payload, root / "bin" / "inject")
        (root / ".singularity.d").mkdir()
        for name in ("runscript", "test"):
            (root / ".singularity.d" / name).write_text("#!/bin/sh\nexec /bin/inject\n")

    rootfs = busybox_rootfs(workdir / "tty-rootfs", extra)
    for name in ("bin/inject", ".singularity.d/runscript", ".singularity.d/test"):
        (rootfs / name).chmod(0o755)
    return {"sif": make_sif(rootfs, workdir / "tty.sif")["sif"], "payload": str(payload)}


@pytest.fixture(params=["python", "starter"])
def program(request: pytest.FixtureRequest, no_leftovers: None) -> list[str]:
    if request.param == "starter":
        return [request.getfixturevalue("starter")]
    return ["/usr/bin/python3", "-m", "sifpy"]


def test_the_payload_injects_outside_a_container(
    runtime_ready: UserRunner, tty_image: dict[str, str]
) -> None:
    """The control: on this host the payload really types into its terminal (the sysctl
    dev.tty.legacy_tiocsti=1), so the container tests below can see an injection."""
    legacy = Path("/proc/sys/dev/tty/legacy_tiocsti")
    if legacy.exists() and legacy.read_text().strip() == "0":
        pytest.skip("dev.tty.legacy_tiocsti=0: the kernel refuses TIOCSTI to everyone")
    code, out, queued = run_in_pty(runtime_ready, [tty_image["payload"]])
    assert code == 0, out
    got = results(out)
    assert got["TIOCSTI"] == 0 and got["TIOCSTI_HIGH"] == 0, out
    if os.uname().machine == "x86_64":  # the i386 ABI, where the kernel has it
        assert got["TIOCSTI_I386"] in (0, errno.ENOSYS), out
    injected = [k for k, v in got.items() if k.startswith("TIOCSTI") and v == 0]
    assert queued == len(injected), out  # one 'x' from each TIOCSTI that worked


@pytest.mark.parametrize(
    "action",
    [("exec", "/bin/inject"), ("exec", "--contain", "--pid"), ("run",), ("test",)],
    ids=["exec", "exec-contain-pid", "run", "test"],
)
def test_payload_cannot_inject_into_the_terminal(
    runtime_ready: UserRunner,
    tty_image: dict[str, str],
    program: list[str],
    action: tuple[str, ...],
) -> None:
    verb, *opts = action
    argv = [*program, verb, *[o for o in opts if o.startswith("-")], tty_image["sif"]]
    argv += [o for o in opts if not o.startswith("-")]
    if verb == "exec" and argv[-1] == tty_image["sif"]:
        argv.append("/bin/inject")
    code, out, queued = run_in_pty(runtime_ready, argv)
    assert code == 0, out
    blocked(out)
    assert queued == 0, out


def test_interactive_shell_keeps_its_terminal_and_job_control(
    runtime_ready: UserRunner, tty_image: dict[str, str], program: list[str]
) -> None:
    """``sifpy shell`` in a terminal: the shell is interactive with job control (set -m:
    it made itself the terminal's foreground process group), runs a background job, and
    the payload it starts is still refused."""
    typed = b"echo flags=$-; sleep 0.2 & jobs; wait; /bin/inject; exit 3\n"
    code, out, queued = run_in_pty(runtime_ready, [*program, "shell", tty_image["sif"]], typed)
    assert code == 3, out
    flags = next(ln for ln in out.splitlines() if ln.startswith("flags=")).split("=", 1)[1]
    assert "i" in flags and "m" in flags, out
    assert "job control turned off" not in out and "can't access tty" not in out, out
    assert "sleep 0.2" in out, out  # `jobs` listed the background job
    blocked(out)
    assert queued == 0, out

"""Runtime rows of the attack checklist (docs/security.md) that no other test covers,
through ``python3 -m sifpy`` and the starter, as the unprivileged test user: the payload's
open files and signal state, ``--pwd`` aimed outside the root, the supervisor seen from
the payload, the caller's loader and Python variables, a setuid-root program in the
image, and the modes of the session the runtime builds."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from integration.conftest import PYTHON, UserRunner, require
from integration.runtime.conftest import busybox_rootfs, make_sif, user_processes
from integration.runtime.test_cli_exec import Sifpy

pytestmark = pytest.mark.unpriv


@pytest.fixture(params=["python", "starter"])
def sifpy(
    request: pytest.FixtureRequest,
    runtime_ready: UserRunner,
    images: dict[str, Any],
    no_leftovers: None,
    workdir: Path,
) -> Sifpy:
    cwd = workdir / "cwd"
    cwd.mkdir(exist_ok=True)
    os.chmod(cwd, 0o777)
    program = ["/usr/bin/python3", "-m", "sifpy"]
    if request.param == "starter":
        program = [request.getfixturevalue("starter")]
    return Sifpy(runtime_ready, images["plain"]["sif"], str(cwd), program)


def _descends(pid: int, ancestor: int) -> bool:
    """Whether ``pid`` is ``ancestor`` or one of its descendants."""
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            stat_line = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        pid = int(stat_line.rsplit(")", 1)[1].split()[1])
    return False


def _status(text: str) -> dict[str, str]:
    return {k: v.strip() for k, v in (ln.split(":", 1) for ln in text.splitlines() if ":" in ln)}


def test_payload_holds_only_0_1_2_and_the_passed_fds(sifpy: Sifpy) -> None:
    # runc's create.bats oracle: nothing sifpy opened (the image, the FUSE device, pipes,
    # the session) reaches the command, only what the caller passed (here 0, 1, 2 and 5,
    # as an MPI launcher passes its PMI socket); sh lists its own fds, so no directory fd.
    for opts in [(), ("--contain", "--pid"), ("--writable-tmpfs",), ("--fakeroot",)]:
        argv = [*sifpy.program, "exec", *opts, sifpy.image, "sh", "-c", "ls /proc/$$/fd; :"]
        r = sifpy.runner(["sh", "-c", 'exec "$@" 5</dev/null', "sh", *argv], cwd=sifpy.cwd)
        assert r.returncode == 0, r.stderr  # ":" above keeps sh alive while ls runs
        assert r.stdout.split() == ["0", "1", "2", "5"], (opts, r.stdout)


def test_payload_signal_state_is_clean(sifpy: Sifpy) -> None:
    # Python ignores SIGPIPE and SIGXFSZ; the starter blocks signals while it serves.
    for opts in [(), ("--pid",)]:
        r = sifpy.exec("cat", "/proc/self/status", opts=opts)
        assert r.returncode == 0, r.stderr
        st = _status(r.stdout)
        assert int(st["SigIgn"], 16) == 0 and int(st["SigBlk"], 16) == 0, (opts, st)
        assert st["NoNewPrivs"] == "1"


@pytest.mark.parametrize("fd", range(3, 12))
def test_pwd_through_proc_self_fd_never_leaves_the_root(sifpy: Sifpy, fd: int) -> None:
    # CVE-2024-21626: a cwd through a directory fd the runtime holds lies outside the new
    # root. Either sifpy refuses (125, one clear message, as runc does: "outside" the root,
    # or, for an fd that is no directory in the container, as any --pwd that does not
    # exist there, as Apptainer does) or the command starts inside the container.
    r = sifpy.exec("sh", "-c", "pwd; cat /etc/image-marker", opts=("--pwd", f"/proc/self/fd/{fd}"))
    if r.returncode == 125:
        # Refused before the chdir (the cwd bind can't pin it) or at the chdir (outside).
        first = r.stderr.splitlines()[0]
        assert first.startswith("error: can't ") and f"/proc/self/fd/{fd}" in first, r.stderr
        assert r.stdout == ""
        return
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[1:] == ["from the image"], r.stdout
    assert r.stdout.startswith("/") and "sifpy-it-" not in r.stdout


def test_supervisor_is_not_writable_from_the_payload(sifpy: Sifpy) -> None:
    # CVE-2019-5736 analogue: without --pid the payload sees its supervisor's /proc entry;
    # it must not be able to open the runtime's executable for writing.
    script = "echo x >> /proc/$PPID/exe && echo WROTE; echo done"
    for opts in [(), ("--contain",), ("--fakeroot",)]:
        r = sifpy.exec("sh", "-c", script, opts=opts)
        assert r.returncode == 0 and r.stdout.split() == ["done"], (opts, r.stdout, r.stderr)
    # With --pid, no host process is visible at all.
    r = sifpy.exec("sh", "-c", "ls /proc | grep -c '^[0-9]'", opts=("--pid",))
    assert r.returncode == 0 and int(r.stdout) <= 4, r.stdout


def test_host_loader_and_python_variables_are_not_passed(sifpy: Sifpy) -> None:
    # Apptainer never passes LD_LIBRARY_PATH (alwaysOmitKeys); the caller's LD_PRELOAD,
    # LD_AUDIT and PYTHONPATH/PYTHONSTARTUP name host files the image's programs would load
    # (PYTHONHOME too, but set here it would break python3 -m sifpy itself).
    host = {
        "LD_LIBRARY_PATH": "/host/lib",
        "LD_PRELOAD": "/host/evil.so",
        "LD_AUDIT": "/host/audit.so",
        "PYTHONSTARTUP": "/host/start.py",
        "KEEPME": "yes",
    }
    r = sifpy.exec("env", env=host)
    assert r.returncode == 0, r.stderr
    env = dict(ln.split("=", 1) for ln in r.stdout.splitlines() if "=" in ln)
    assert env["KEEPME"] == "yes"
    for name in host:
        if name != "KEEPME":
            assert name not in env, (name, env.get(name))
    # The runner's own PYTHONPATH (the sifpy copy) is a host path too.
    assert "PYTHONPATH" not in env
    # Asked for explicitly, they are passed.
    r = sifpy.exec("env", env={"SIFPYENV_LD_PRELOAD": "/in/image.so", "SIFPYENV_PYTHONPATH": "/p"})
    env = dict(ln.split("=", 1) for ln in r.stdout.splitlines() if "=" in ln)
    assert env.get("LD_PRELOAD") == "/in/image.so" and env.get("PYTHONPATH") == "/p", r.stdout


# A static program: its effective uid and capabilities, as the kernel reports them.
SUID_C = r"""
#include <stdio.h>
#include <string.h>
#include <unistd.h>
int main(void) {
    char line[256];
    FILE *f = fopen("/proc/self/status", "r");
    printf("euid=%d\n", (int)geteuid());
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, "CapEff:", 7)) fputs(line, stdout);
    return 0;
}
"""


@pytest.fixture(scope="module")
def suid_image(workdir: Path) -> str:
    """An image whose /bin/suid-probe is a setuid-root program (built by root, so the
    squashfs really holds uid 0 and mode 4755)."""
    require(None if os.getuid() == 0 else "needs root to make a root-owned setuid file")
    require(None if shutil.which("gcc") else "gcc is not installed")
    src = workdir / "suid-probe.c"
    src.write_text(SUID_C)
    prog = workdir / "suid-probe"
    res = subprocess.run(["gcc", "-static", "-o", str(prog), str(src)], capture_output=True)
    require(None if res.returncode == 0 else f"can't link statically: {res.stderr[-200:]!r}")
    root = busybox_rootfs(workdir / "suid-rootfs")
    dest = root / "bin" / "suid-probe"
    shutil.copy(prog, dest)
    os.chown(dest, 0, 0)
    dest.chmod(0o4755)
    return str(make_sif(root, workdir / "suid.sif")["sif"])


def test_setuid_root_program_gives_no_privilege(sifpy: Sifpy, suid_image: str) -> None:
    # The bit is kept in the image (it is the image's content) but the mount is nosuid and
    # no_new_privs is set: the program runs as the caller, with no capability.
    r = sifpy("exec", suid_image, "sh", "-c", "stat -c %a:%u /bin/suid-probe; /bin/suid-probe")
    assert r.returncode == 0, r.stderr
    mode_owner, euid, capeff = r.stdout.split("\n")[:3]
    mode, owner = mode_owner.split(":")
    # Host root is not mapped in the user namespace: the owner shows as the overflow uid.
    assert mode == "4755" and owner != str(sifpy.runner.user.uid), mode_owner
    assert euid == f"euid={sifpy.runner.user.uid}"
    assert int(capeff.split()[1], 16) == 0, capeff


def test_session_is_private_and_0700(sifpy: Sifpy) -> None:
    # CVE-2020-25039/25040 class: the runtime's session (image mount point, staging root,
    # generated files) is a tmpfs of mode 0700 in the container's own mount namespace; the
    # host's /tmp gets nothing while the container runs.
    uid = sifpy.runner.user.uid
    before = {p for p in os.listdir("/tmp") if os.stat(f"/tmp/{p}").st_uid == uid}
    p = sifpy.runner.popen(
        [*sifpy.program, "exec", sifpy.image, "sh", "-c", "echo up; read x"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=sifpy.cwd,
    )
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "up"
        # Other sessions of the test user may run too: take the server under this one.
        names = ("sifpy-sqfs-serv", "squashfuse_ll")  # sifpy's own server, or the fallback
        servers = [s for n in names for s in user_processes(uid, n) if _descends(s, p.pid)]
        assert servers
        # The server lives in the session's mount namespace: its /tmp is the session.
        st = os.stat(f"/proc/{servers[0]}/root/tmp")
        assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o700, uid)
        mountinfo = Path(f"/proc/{servers[0]}/mountinfo").read_text().splitlines()
        session = [ln for ln in mountinfo if ln.split()[4] == "/tmp"]
        assert session and "mode=700" in session[-1] and "nosuid" in session[-1], session
        during = {q for q in os.listdir("/tmp") if os.stat(f"/tmp/{q}").st_uid == uid}
        assert during == before
    finally:
        p.communicate(timeout=20)  # end of input: the command, then sifpy, end normally


def _survivors(tag: str) -> list[int]:
    """Pids whose command line holds ``tag`` (a unique sleep length)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if tag.encode() in cmd:
                out.append(int(entry))
    return out


def _background_left(sifpy: Sifpy, opts: tuple[str, ...], tag: str) -> list[int]:
    import time

    # The background job starts (prints its pid) before the primary command exits.
    script = f"sleep {tag} </dev/null >/dev/null 2>&1 & sleep 0.3; echo started"
    r = sifpy.exec("sh", "-c", script, opts=opts)
    assert r.returncode == 0 and r.stdout == "started\n", r.stderr
    time.sleep(0.5)
    left = _survivors(tag)
    for pid in left:
        os.kill(pid, 9)
    return left


def test_background_job_ends_with_the_container_under_pid(sifpy: Sifpy) -> None:
    # apptainer#2104: what happens to a job still running when the command exits. With
    # --pid the container's init is killed with it, and the whole namespace goes.
    assert _background_left(sifpy, ("--pid",), f"97.{os.getpid()}1") == []


@pytest.mark.xfail(
    strict=True,
    reason="without --pid a background job outlives the container, and loses its image "
    "(the FUSE server stops with sifpy): neither killed nor kept working",
)
def test_background_job_ends_with_the_container(sifpy: Sifpy) -> None:
    assert _background_left(sifpy, (), f"97.{os.getpid()}2") == []


@pytest.mark.parametrize(
    "sig",
    [signal.SIGINT, signal.SIGHUP, signal.SIGWINCH, signal.SIGUSR1],
    ids=lambda s: signal.Signals(s).name,
)
def test_signals_reach_a_trap_in_the_container(sifpy: Sifpy, sig: int) -> None:
    name = signal.Signals(sig).name[3:]
    script = f"trap 'echo got-{name}; exit 7' {name}; echo ready; while :; do sleep 0.1; done"
    p = sifpy.runner.popen(
        [*sifpy.program, "exec", sifpy.image, "sh", "-c", script],
        stdout=subprocess.PIPE,
        cwd=sifpy.cwd,
    )
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    p.send_signal(sig)
    out, _ = p.communicate(timeout=20)
    assert (out.strip(), p.returncode) == (f"got-{name}", 7)


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGABRT, 134), (signal.SIGINT, 130)])
def test_more_signal_deaths_are_128_plus_n(sifpy: Sifpy, sig: int, code: int) -> None:
    assert sifpy.exec("sh", "-c", f"kill -{int(sig)} $$").returncode == code


NSS_C = r"""
#include <fcntl.h>
#include <unistd.h>
__attribute__((constructor)) static void evil(void) {
    char comm[64];
    int n = 0, fd = open("/proc/self/comm", O_RDONLY);
    if (fd >= 0) { n = read(fd, comm, sizeof comm); close(fd); }
    int out = open(MARKER, O_WRONLY | O_APPEND | O_CREAT, 0666);
    if (out >= 0 && n > 0) { write(out, "nss:", 4); write(out, comm, n); close(out); }
}
"""


@pytest.fixture(scope="module")
def lookup_trap(workdir: Path) -> dict[str, Any]:
    """An image that traps sifpy's own process if it resolves a name or imports a module
    once inside the root (CVE-2019-14271 analogue): an nsswitch.conf naming a service whose
    libnss_evil.so.2 logs who loaded it, and a shadow of every standard-library module
    (``json.py``, ``traceback.py``...) in the host Python's own directory, each logging its
    name. The marker lies in the host's /tmp, which the container shares."""
    import sys

    require(None if shutil.which("gcc") else "gcc is not installed")
    marker = Path(f"/tmp/sifpy-it-lookup-{os.getpid()}")
    lib = workdir / "libnss_evil.so.2"
    src = workdir / "nss.c"
    src.write_text(NSS_C)
    subprocess.run(
        ["gcc", "-shared", "-fPIC", f'-DMARKER="{marker}"', "-o", str(lib), str(src)],
        check=True,
        capture_output=True,
    )
    # Every directory on the path of the python3 that runs sifpy (stdlib, lib-dynload,
    # dist-packages): inside the image, the same paths lead to the shadows.
    dirs = subprocess.run(
        [PYTHON, "-c", "import sys; print('\\n'.join(p for p in sys.path if p.startswith('/usr')))"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert dirs

    def plant(root: Path) -> None:
        (root / "etc/nsswitch.conf").write_text(
            "passwd: evil files\ngroup: evil files\nhosts: evil files\nshadow: evil files\n"
        )
        for d in ("lib", "lib64", "usr/lib", "lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu"):
            (root / d).mkdir(parents=True, exist_ok=True)
            shutil.copy(lib, root / d / lib.name)
        for d in dirs:
            pydir = root / d.lstrip("/")
            pydir.mkdir(parents=True, exist_ok=True)
            for name in sys.stdlib_module_names:
                (pydir / f"{name}.py").write_text(
                    f"open({str(marker)!r}, 'a').write('py:{name}\\n')\n"
                )

    root = busybox_rootfs(workdir / "lookup-rootfs", plant)
    return {"sif": make_sif(root, workdir / "lookup.sif")["sif"], "marker": marker, "dirs": dirs}


def test_no_lookup_or_import_inside_the_image(sifpy: Sifpy, lookup_trap: dict[str, Any]) -> None:
    marker = Path(lookup_trap["marker"])
    try:
        for opts in [(), ("--pid",), ("--fakeroot",), ("--writable-tmpfs",)]:
            marker.write_text("")
            marker.chmod(0o666)
            r = sifpy("exec", *opts, str(lookup_trap["sif"]), "true")
            assert r.returncode == 0, (opts, r.stderr)
            assert marker.read_text() == "", (opts, marker.read_text())
        # The trap is in place where sifpy's process would look (its python3's path).
        shadows = " ".join(f"{d}/json.py {d}/traceback.py" for d in lookup_trap["dirs"])
        r = sifpy("exec", str(lookup_trap["sif"]), "sh", "-c",
                  f"cat /etc/nsswitch.conf; ls /lib/x86_64-linux-gnu/libnss_evil.so.2 {shadows}")  # fmt: skip
        assert r.returncode == 0 and "passwd: evil" in r.stdout, r.stderr
    finally:
        marker.unlink(missing_ok=True)

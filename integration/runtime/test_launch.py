"""End to end: sifpy.runtime.launch as an unprivileged user, with real user namespaces,
real squashfuse_ll and real busybox images. No kernel call is mocked."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from integration.conftest import User, UserRunner
from integration.runtime.conftest import Launcher, user_processes
from integration.runtime.conftest import ok as _ok

pytestmark = pytest.mark.unpriv


# --- the core: identity, exit statuses ------------------------------------------------------


def test_uid_and_gid_are_the_callers(sif: Launcher, test_user: User) -> None:
    out = _ok(sif(["sh", "-c", "id -u; id -g; id -un"]))
    assert out.split() == [str(test_user.uid), str(test_user.gid), test_user.name]


def test_fakeroot_is_uid_0(sif: Launcher) -> None:
    out = _ok(sif(["sh", "-c", "id -u; id -g; id -un"], options={"fakeroot": True}))
    assert out.split() == ["0", "0", "root"]


@pytest.mark.parametrize("code", [0, 1, 42, 255])
def test_exit_status_passes_through(sif: Launcher, code: int) -> None:
    _ok(sif(["sh", "-c", f"exit {code}"]), code)


def test_killed_by_signal_is_128_plus_n(sif: Launcher) -> None:
    _ok(sif(["sh", "-c", "kill -9 $$"]), 137)


def test_not_found_is_127(sif: Launcher) -> None:
    res = sif(["no-such-command"])
    _ok(res, 127)
    assert "can't execute: no-such-command" in res.stderr


def test_not_executable_is_126(sif: Launcher) -> None:
    _ok(sif(["/noexec"]), 126)


def test_setup_failure_is_125(sif: Launcher, workdir: Path) -> None:
    res = sif(["true"], binds=[[str(workdir / "missing"), "/x", False]])
    _ok(res, 125)
    assert "SETUP-ERROR: can't bind" in res.stderr


def test_sandbox_directory(sandbox: Launcher, test_user: User) -> None:
    out = _ok(sandbox(["sh", "-c", "id -u; cat /etc/image-marker; touch /bin/x || echo ro"]))
    assert out.split("\n")[:3] == [str(test_user.uid), "from the image", "ro"]


def test_writable_sandbox(
    runtime_ready: UserRunner, driver: str, workdir: Path, test_user: User, no_leftovers: None
) -> None:
    # The build's %post runs like this: the sandbox itself is the root, read-write.
    root = workdir / f"writable-{os.getpid()}"
    subprocess.run(["cp", "-a", str(workdir / "rootfs"), str(root)], check=True)
    subprocess.run(["chown", "-R", f"{test_user.uid}:{test_user.gid}", str(root)], check=True)
    run = Launcher(runtime_ready, driver, {"sandbox": str(root)})
    _ok(run(["sh", "-c", "echo built > /etc/built"], options={"writable": True, "fakeroot": True}))
    assert (root / "etc" / "built").read_text() == "built\n"
    # The caller's home was not created in it (the sandbox has no /home, as Apptainer's
    # would fail; it may not be left behind either).
    assert not (root / "home").exists() or not any((root / "home").iterdir())


# --- process state at exec -----------------------------------------------------------------


@pytest.mark.parametrize("pass_fds", [[], [5]])
def test_only_fds_0_1_2_and_passed_are_open(sif: Launcher, pass_fds: list[int]) -> None:
    """The command gets 0, 1, 2 and ``pass_fds``: not the caller's other fds (its fd 5 when
    not passed), nor any of the runtime's own."""
    cfg = sif.cfg(["ls", "/proc/self/fd"], options={"pass_fds": pass_fds})
    argv = ["sh", "-c", 'exec "$@" 5</etc/hostname', "sh", "/usr/bin/python3", sif.driver, cfg]
    out = _ok(sif.runner(argv))
    # ls itself holds one more fd: the directory it is listing (the lowest free, 3).
    fds = sorted(int(x) for x in out.split())
    assert fds == [0, 1, 2, 3, *pass_fds]


def test_no_new_privs_and_clean_signal_state(sif: Launcher) -> None:
    out = _ok(sif(["cat", "/proc/self/status"]))
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    assert fields["NoNewPrivs"].strip() == "1"
    assert int(fields["SigIgn"], 16) == 0
    assert int(fields["SigBlk"], 16) == 0


def test_sigpipe_is_default(sif: Launcher) -> None:
    res = sif(["sh", "-c", "yes | head -1"], run_kw={"timeout": 20})
    assert _ok(res) == "y\n"


# --- the container's view ------------------------------------------------------------------


def test_home_and_cwd_are_visible(sif: Launcher, test_user: User, user_dir: Path) -> None:
    marker = Path(test_user.home) / ".sifpy-it-marker"
    marker.write_text("home\n")
    (user_dir / "cwd-marker").write_text("cwd\n")
    try:
        out = _ok(sif(["sh", "-c", "pwd; cat ~/.sifpy-it-marker cwd-marker"], cwd=str(user_dir)))
    finally:
        marker.unlink()
    assert out.split() == [str(user_dir), "home", "cwd"]


def test_passwd_and_group_have_the_caller(sif: Launcher, test_user: User) -> None:
    out = _ok(sif(["sh", "-c", "cat /etc/passwd; echo --; cat /etc/group"]))
    passwd, group = out.split("--\n")
    assert passwd.startswith("root:x:0:0:")  # the image's lines are kept
    assert f"{test_user.name}:x:{test_user.uid}:{test_user.gid}:" in passwd
    assert f":x:{test_user.gid}:{test_user.name}" in group


def test_ro_and_rw_binds(sif: Launcher, test_user: User, user_dir: Path) -> None:
    binds = [[str(user_dir), "/ro", True], [str(user_dir), "/opt/rw", False]]
    script = "touch /ro/a 2>/dev/null && echo ro-writable; touch /opt/rw/b && echo rw-ok"
    out = _ok(sif(["sh", "-c", script], binds=binds))
    assert out.split() == ["rw-ok"]
    assert sorted(os.listdir(user_dir)) == ["b"]


def test_contain_has_minimal_dev_and_private_tmp(sif: Launcher) -> None:
    out = _ok(sif(["sh", "-c", "ls /dev; echo --; ls -A /tmp | wc -l"], options={"contain": True}))
    devs, tmp = out.split("--\n")
    assert {"null", "zero", "random", "urandom", "tty", "full", "shm", "pts"} <= set(devs.split())
    assert "sda" not in devs and "vda" not in devs
    assert tmp.strip() == "0"


def test_session_is_not_visible(sif: Launcher) -> None:
    # The session tmpfs (image mount, staging root) is unbindable: the recursive bind of the
    # host's /tmp must not carry it into the container.
    script = 'awk \'$5 == "/tmp" || $5 ~ "^/tmp/" { print $5 }\' /proc/self/mountinfo'
    assert _ok(sif(["sh", "-c", script])).split() == ["/tmp"]


def test_pid_namespace_gives_init_and_fresh_proc(sif: Launcher) -> None:
    # sifpy's init is PID 1 and the command its child (PID 2); with no_init, PID 1 itself.
    out = _ok(sif(["sh", "-c", "echo $$; ls /proc | grep -c '^[0-9]'"], options={"pid_ns": True}))
    pid, count = out.split()
    assert pid == "2" and int(count) <= 4  # init, sh, ls and grep: nothing of the host
    out = _ok(sif(["sh", "-c", "echo $$"], options={"pid_ns": True, "no_init": True}))
    assert out.strip() == "1"


def test_image_is_read_only_and_nosuid(sif: Launcher) -> None:
    out = _ok(sif(["sh", "-c", "touch /bin/x 2>/dev/null || echo ro; grep ' /bin ' /proc/mounts"]))
    assert out.startswith("ro\n")
    assert "nosuid" in out and "nodev" in out


# --- signals and lifetimes -----------------------------------------------------------------


def _wait_line(proc: Any, want: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.strip() == want:
            return
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"never saw {want!r}: {proc.communicate()}")


def test_sigterm_reaches_a_trap_in_the_container(sif: Launcher) -> None:
    script = 'trap "echo got-term; exit 3" TERM; echo ready; while :; do sleep 0.1; done'
    proc = sif.popen(["sh", "-c", script])
    _wait_line(proc, "ready")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 3, err
    assert "got-term" in out


def test_sigkill_of_the_launcher_leaves_nothing(sif: Launcher, test_user: User) -> None:
    proc = sif.popen(["sh", "-c", "echo ready; exec sleep 30"])
    _wait_line(proc, "ready")
    assert user_processes(test_user.uid, "squashfuse_ll")
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        left = user_processes(test_user.uid, "squashfuse_ll") + user_processes(
            test_user.uid, "sleep"
        )
        if not left:
            break
        time.sleep(0.1)
    assert not left, f"left running: {left}"


# --- hostile images ------------------------------------------------------------------------


def test_tmp_symlink_in_image_is_ignored(hostile: Launcher, test_user: User) -> None:
    # The image's /tmp -> /etc: /tmp must be the runtime's own, /etc the image's.
    with tempfile.NamedTemporaryFile(dir="/tmp", prefix="sifpy-it-") as marker:
        os.chmod(marker.name, 0o644)
        name = os.path.basename(marker.name)
        out = _ok(hostile(["sh", "-c", f"ls /tmp/{name}; cat /etc/image-marker"]))
    assert out.split("\n")[:2] == [f"/tmp/{name}", "from the image"]


def test_bind_through_absolute_symlink_stays_inside(
    hostile: Launcher, root_victim: Path, user_dir: Path
) -> None:
    # The image's /data -> /<host dir>/sub/dir, a host path the user could write but the
    # container does not share: the bind must land inside the container (where the path is
    # created in the runtime's tmpfs), never on the host.
    (user_dir / "from-host").write_text("x\n")
    res = hostile(["sh", "-c", "ls /data; readlink /data"], binds=[[str(user_dir), "/data", False]])
    assert _ok(res).split() == ["from-host", f"{root_victim}/sub/dir"]
    assert list(root_victim.iterdir()) == []


def test_bind_through_symlink_into_shared_host_dir_is_refused(
    hostile: Launcher, images: dict[str, Any], test_user: User, user_dir: Path
) -> None:
    # The image's /data2 -> <host /tmp dir>/sub/dir: inside the container that is the host's
    # /tmp, so creating the missing mount point would write on the host: refused.
    victim = Path(images["hostile"]["victim"])
    os.chown(victim, test_user.uid, test_user.gid)
    res = hostile(["true"], binds=[[str(user_dir), "/data2", False]])
    _ok(res, 125)
    assert "can't create mount point: /data2" in res.stderr
    assert list(victim.iterdir()) == []


def test_bind_through_dotdot_symlink_stays_inside(
    hostile: Launcher, test_user: User, user_dir: Path
) -> None:
    # /vt -> /var/tmp/../../.. must resolve to the container's /, not above it.
    (user_dir / "f").write_text("x\n")
    out = _ok(hostile(["sh", "-c", "ls /vt/sub"], binds=[[str(user_dir), "/vt/sub", True]]))
    assert out.split() == ["f"]


def test_userns_probe_agrees(runtime_ready: UserRunner) -> None:
    res = runtime_ready.python(
        "from sifpy.runtime import probes; print(probes.userns_available(), probes.fuse_available())"
    )
    assert res.stdout.split() == ["None", "None"], res.stderr

"""``--pid`` (an init as PID 1), ``--ipc``, ``--writable-tmpfs`` and ``--overlay``, ``--no-mount``,
``--workdir`` and ``--mount``, as the unprivileged test user."""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from integration.conftest import User, UserRunner, require
from integration.runtime.conftest import Launcher
from integration.runtime.conftest import ok as _ok

pytestmark = pytest.mark.unpriv

PID = {"pid_ns": True}


# --- --pid: init ----------------------------------------------------------------------------


def test_init_reaps_orphaned_zombies(sif: Launcher) -> None:
    # The inner sh exits at once: its background sleep is re-parented to PID 1, which must
    # reap it when it exits. A zombie shows as state Z in /proc/PID/stat.
    script = (
        "sh -c 'sleep 0.2 & exit 0'; sleep 1; "
        "for f in /proc/[0-9]*/stat; do read -r p c s rest < $f 2>/dev/null && echo $c $s; done"
    )
    out = _ok(sif(["sh", "-c", script], options=PID))
    states = dict(line.split() for line in out.splitlines())
    assert "Z" not in states.values(), out
    assert "(sleep)" not in states  # gone, not a zombie
    assert "(python3)" in states and states["(python3)"] == "S"  # the init, PID 1


def test_init_preserves_exit_status_and_signal_death(sif: Launcher) -> None:
    _ok(sif(["sh", "-c", "exit 42"], options=PID), 42)
    _ok(sif(["sh", "-c", "kill -9 $$"], options=PID), 137)
    res = sif(["no-such-command"], options=PID)
    _ok(res, 127)
    assert "can't execute: no-such-command" in res.stderr


def test_init_forwards_sigterm(sif: Launcher) -> None:
    script = 'trap "echo got-term; exit 3" TERM; echo ready; while :; do sleep 0.1; done'
    proc = sif.popen(["sh", "-c", script], options=PID)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 3, err
    assert "got-term" in out


def test_ipc_namespace(sif: Launcher, runtime_ready: UserRunner) -> None:
    host = runtime_ready(["readlink", "/proc/self/ns/ipc"]).stdout.strip()
    same = _ok(sif(["readlink", "/proc/self/ns/ipc"])).strip()
    new = _ok(sif(["readlink", "/proc/self/ns/ipc"], options={"ipc_ns": True})).strip()
    assert host.startswith("ipc:[") and same == host and new != host


# --- overlays -------------------------------------------------------------------------------


def test_writable_tmpfs_is_writable_and_gone_next_run(sif: Launcher) -> None:
    opts = {"writable_tmpfs": True}
    script = (
        "echo new > /etc/new && echo more >> /etc/image-marker && cat /etc/new /etc/image-marker"
    )
    assert _ok(sif(["sh", "-c", script], options=opts)) == "new\nfrom the image\nmore\n"
    script = "cat /etc/new 2>/dev/null; cat /etc/image-marker; touch /etc/x 2>/dev/null || echo ro"
    assert _ok(sif(["sh", "-c", script])) == "from the image\nro\n"
    # The upper layer is capped (64 MiB by default; 1 MiB here).
    res = sif(
        ["sh", "-c", "dd if=/dev/zero of=/big bs=1024 count=4096 2>/dev/null || echo full"],
        options={"writable_tmpfs": True, "tmpfs_size_mb": 1},
    )
    assert _ok(res).strip() == "full"


def test_overlay_dir_persists(sif: Launcher, user_dir: Path) -> None:
    opts = {"overlay": str(user_dir)}
    _ok(sif(["sh", "-c", "echo kept > /etc/persist; rm /noexec"], options=opts))
    assert (user_dir / "upper" / "etc" / "persist").read_text() == "kept\n"
    out = _ok(sif(["sh", "-c", "cat /etc/persist; ls /noexec 2>&1 || true"], options=opts))
    assert out.startswith("kept\n") and "No such file" in out
    # Without the overlay, the image is as built.
    assert _ok(sif(["cat", "/noexec"])) == "not executable\n"


@pytest.mark.parametrize(
    ("options", "fstype"),
    [
        ({"overlay_driver": "fuse"}, "fuse.fuse-overlayfs"),
        ({"overlay_driver": "kernel", "fakeroot": True}, "overlay"),
        ({"fakeroot": True}, "overlay"),  # auto: the kernel's for (fake)root
    ],
)
def test_overlay_drivers(sif: Launcher, options: dict[str, Any], fstype: str) -> None:
    if options.get("overlay_driver") == "fuse":
        require(None if shutil.which("fuse-overlayfs") else "fuse-overlayfs is not installed")
    script = "echo x > /etc/new && cat /etc/new; awk '$2 == \"/\" { print $3 }' /proc/mounts"
    res = sif(["sh", "-c", script], options={"writable_tmpfs": True, **options})
    assert _ok(res).split() == ["x", fstype]


# --- --no-mount, --workdir, --mount -------------------------------------------------------------


def test_no_mount(sif: Launcher, test_user: User) -> None:
    out = _ok(
        sif(
            [
                "sh",
                "-c",
                f"ls /proc | wc -l; ls /sys | wc -l; ls -d {test_user.home} 2>&1; ls /etc",
            ],
            options={"no_mount": ["proc", "sys", "home", "bind-paths", "cwd"]},
            cwd="/",
        )
    )
    lines = out.splitlines()
    assert lines[0] == "0" and lines[1] == "0"
    assert "No such file" in lines[2]
    assert "hosts" not in lines[3:] and "passwd" in lines[3:]
    res = sif(["true"], options={"no_mount": ["bogus"]})
    _ok(res, 125)
    assert "can't skip mount: bogus" in res.stderr


def test_workdir_with_contain(sif: Launcher, user_dir: Path, test_user: User) -> None:
    opts = {"contain": True, "workdir": str(user_dir)}
    script = f"echo t > /tmp/t && echo v > /var/tmp/v && echo h > {test_user.home}/h"
    _ok(sif(["sh", "-c", script], options=opts))
    assert (user_dir / "tmp" / "t").read_text() == "t\n"
    assert (user_dir / "var_tmp" / "v").read_text() == "v\n"
    assert (user_dir / "home" / "h").read_text() == "h\n"


def test_cli_mount_and_overlay_flags(
    runtime_ready: UserRunner, images: dict[str, Any], user_dir: Path, no_leftovers: None
) -> None:
    (user_dir / "f").write_text("bound\n")
    sif = images["plain"]["sif"]
    py = ["/usr/bin/python3", "-m", "sifpy", "exec"]
    res = runtime_ready(
        [
            *py,
            "--mount",
            f"type=bind,src={user_dir},dst=/mnt/a,ro",
            "--mount",
            f"type=bind,source={user_dir},destination=/mnt/b",
            "--writable-tmpfs",
            "--containall",
            sif,
            "sh",
            "-c",
            "cat /mnt/a/f; touch /mnt/a/x 2>/dev/null || echo ro; touch /mnt/b/y && echo rw; "
            "touch /etc/z && echo etc-rw; echo $$",
        ]
    )
    assert _ok(res).split() == ["bound", "ro", "rw", "etc-rw", "2"]
    res = runtime_ready([*py, "--mount", "type=volume,src=a,dst=/b", sif, "true"])
    assert res.returncode == 125 and "invalid --mount" in res.stderr
    res = runtime_ready([*py, "--no-mount", "proc,sys", sif, "sh", "-c", "ls /proc | wc -l"])
    assert _ok(res).strip() == "0"

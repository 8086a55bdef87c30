"""Day-one failures, as the unprivileged test user against the real registry: each is one
``error:`` line and a ``hint:``, never a traceback, and quickly."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from integration.conftest import UserRunner
from integration.oci.conftest import Registry, free_port

SIFPY = ["/usr/bin/python3", "-m", "sifpy"]


def one_error(res: subprocess.CompletedProcess[str]) -> str:
    """The error line of a failed command that printed just an error and a hint."""
    assert res.returncode not in (0, None), res.stderr
    lines = [ln for ln in res.stderr.splitlines() if not ln.startswith("pulling ")]
    assert len(lines) == 2 and lines[0].startswith("error: "), res.stderr
    assert lines[1].startswith("hint: "), res.stderr
    return lines[0]


@pytest.mark.parametrize(
    "env",
    [{"SIFPY_CACHEDIR": "/var/cache/sifpy"}, {"XDG_CACHE_HOME": "/nonexistent"}],
    ids=["cachedir-not-writable", "xdg-missing"],
)
def test_unusable_cache_is_one_error(
    registry: Registry,
    run_as_user: UserRunner,
    user_dir: Path,
    env: dict[str, str],
) -> None:
    out = user_dir / "x.sif"
    ref = f"docker://{registry.host}/test/plain:1"
    res = run_as_user([*SIFPY, "pull", "--insecure", str(out), ref], env=env, timeout=120)
    assert "cache" in one_error(res)
    assert not out.exists()


def test_deleted_cwd_is_one_error(run_as_user: UserRunner, user_dir: Path) -> None:
    gone = user_dir / "gone"
    for cmd in ("build x.def", "exec x.sif true", "pull docker://alpine"):
        sh = f'mkdir "$1" && cd "$1" && rmdir "$1" && exec {" ".join(SIFPY)} {cmd}'
        res = run_as_user(["sh", "-c", sh, "sh", str(gone)])
        assert one_error(res).endswith("the current directory no longer exists"), res.stderr


def test_refused_connection_fails_fast(run_as_user: UserRunner, user_dir: Path) -> None:
    port = free_port()  # nothing listens there
    t0 = time.monotonic()
    res = run_as_user(
        [*SIFPY, "pull", "--insecure", str(user_dir / "x.sif"), f"docker://127.0.0.1:{port}/a:1"]
    )
    took = time.monotonic() - t0
    assert one_error(res) == f"error: can't connect: 127.0.0.1:{port}: connection refused"
    assert took < 5, took


def test_explicit_arch_the_image_lacks_is_an_error(
    registry: Registry,
    run_as_user: UserRunner,
    user_dir: Path,
) -> None:
    out = user_dir / "arm.sif"
    ref = f"docker://{registry.host}/test/plain:1"  # amd64 only
    res = run_as_user(
        [*SIFPY, "pull", "--insecure", "--arch", "arm64", str(out), ref],
        env={"SIFPY_CACHEDIR": str(user_dir / "cache")},
        timeout=120,
    )
    assert "only, not linux/arm64" in one_error(res)
    assert not out.exists()
    # From an index that has it, the same flag picks it.
    ref = f"docker://{registry.host}/test/index:1"
    res = run_as_user(
        [*SIFPY, "pull", "--insecure", "--arch", "arm64", str(out), ref],
        env={"SIFPY_CACHEDIR": str(user_dir / "cache")},
        timeout=120,
    )
    assert res.returncode == 0, res.stderr


def _agents_for(path: Path) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd and cmd[0].endswith(b"gpg-agent") and str(path).encode() in b" ".join(cmd):
            found.append(pid)
    return found


def test_key_newpair_leaves_no_agent(run_as_user: UserRunner, user_dir: Path) -> None:
    keys = user_dir / "keys"
    argv = [*SIFPY, "key", "--keysdir", str(keys), "newpair", "--name", "T", "--email", "t@x.org"]
    res = run_as_user([*argv, "--algorithm", "ed25519"], timeout=120)
    assert res.returncode == 0, res.stderr
    res = run_as_user([*SIFPY, "key", "--keysdir", str(keys), "list", "--secret"])
    assert res.returncode == 0 and "t@x.org" in res.stdout, res.stderr
    time.sleep(0.5)
    assert _agents_for(keys) == []

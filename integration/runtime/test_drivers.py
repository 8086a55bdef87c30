"""Each way of mounting a SIF image: squashfuse_ll, the kernel's squashfs as root, the
pure-Python FUSE server and extraction, run against one image with files that span several
squashfs blocks, a fragment tail, a sparse region, symlinks and hard links."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from integration.conftest import UserRunner, require
from integration.runtime.conftest import Launcher, busybox_rootfs, make_sif

pytestmark = pytest.mark.unpriv

# File name -> content: more than one 128 KiB block plus a fragment tail, an exact block,
# a tiny file (fragment only), an empty file.
_RNG = hashlib.sha256(b"sifpy").digest()
FILES = {
    "big": (_RNG * 12000)[: 300_000 + 17],
    "block": bytes(range(256)) * 512,
    "tiny": b"tiny\n",
    "empty": b"",
}


def _with_data(root: Path) -> None:
    data = root / "data"
    data.mkdir()
    for name, content in FILES.items():
        (data / name).write_bytes(content)
    with open(data / "sparse", "wb") as f:  # a hole of 3 blocks, then data
        f.seek(3 * 131072)
        f.write(b"end\n")
    (data / "link").symlink_to("big")
    os.link(data / "tiny", data / "hard")


@pytest.fixture(scope="module")
def data_image(workdir: Path) -> dict[str, Any]:
    root = busybox_rootfs(workdir / "data-rootfs", _with_data)
    return make_sif(root, workdir / "data.sif")


def _expected() -> str:
    sums = {n: hashlib.sha256(c).hexdigest() for n, c in FILES.items()}
    sums["sparse"] = hashlib.sha256(b"\0" * 3 * 131072 + b"end\n").hexdigest()
    return "".join(f"{sums[n]}  /data/{n}\n" for n in sorted(sums))


SCRIPT = (
    "cd /data && sha256sum $(ls | grep -v -e link -e hard | sort | sed 's,^,/data/,'); "
    "readlink link; cat hard; stat -c %h tiny; id -u; ls /bin | grep -c .; "
    "touch /data/new 2>/dev/null || echo read-only"
)


def _check(res: subprocess.CompletedProcess[str], uid: int) -> None:
    assert res.returncode == 0, f"rc={res.returncode}\n{res.stdout}\n{res.stderr}"
    lines = res.stdout.splitlines()
    assert "".join(f"{ln}\n" for ln in lines[:5]) == _expected()
    assert lines[5:9] == ["big", "tiny", "2", str(uid)]
    assert int(lines[9]) > 100  # busybox applets
    assert lines[10] == "read-only"


def _have_pyfuse3(runner: UserRunner) -> str | None:
    res = runner.python("import pyfuse3, PySquashfsImage")
    return None if res.returncode == 0 else f"pyfuse3 is not importable: {res.stderr[-200:]}"


@pytest.mark.parametrize("mdriver", ["squashfuse", "python", "unsquash"])
def test_mount_driver_as_user(
    runtime_ready: UserRunner,
    driver: str,
    data_image: dict[str, Any],
    no_leftovers: None,
    mdriver: str,
) -> None:
    if mdriver == "python":
        require(_have_pyfuse3(runtime_ready))
    if mdriver == "unsquash":
        require(None if shutil.which("unsquashfs") else "unsquashfs is not installed")
    run = Launcher(runtime_ready, driver, data_image)
    res = run(["sh", "-c", SCRIPT], options={"mount_driver": mdriver})
    _check(res, runtime_ready.user.uid)
    assert _processes_using(data_image["sif"]) == []


def _processes_using(needle: str) -> list[str]:
    """Command lines that mention ``needle`` (the launcher, monitor, servers and helpers all
    do): other sessions may run processes of the same user at the same time."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if needle in cmd:
                out.append(cmd)
    return out


def test_auto_falls_back_to_python_without_squashfuse(
    runtime_ready: UserRunner, driver: str, data_image: dict[str, Any], no_leftovers: None
) -> None:
    require(_have_pyfuse3(runtime_ready))
    run = Launcher(runtime_ready, driver, data_image)
    res = run(["cat", "/data/tiny"], options={"squashfuse": "no-such-squashfuse_ll"})
    assert res.returncode == 0 and res.stdout == "tiny\n", res.stderr
    assert "no-such-squashfuse_ll not found: mounting with sifpy's Python FUSE" in res.stderr


def _losetup() -> str:
    return subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout


def test_kernel_driver_as_root(
    runtime_ready: UserRunner, driver: str, data_image: dict[str, Any], sifpy_copy: str
) -> None:
    # Real root only: the kernel squashfs on a loop device at the partition's offset.
    require(None if os.getuid() == 0 else "the kernel mount path needs root")
    require(None if os.access("/dev/loop-control", os.W_OK) else "no /dev/loop-control")
    before_mounts = Path("/proc/self/mountinfo").read_text()
    run = Launcher(runtime_ready, driver, data_image)
    cfg = run.cfg(
        ["sh", "-c", SCRIPT + "; grep ' / ' /proc/self/mountinfo; grep /data /proc/mounts"],
        options={"mount_driver": "kernel"},
    )
    env = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "HOME": "/root", "PYTHONPATH": sifpy_copy}
    res = subprocess.run(["/usr/bin/python3", driver, cfg], env=env, capture_output=True, text=True)
    _check(res, 0)
    assert "squashfs" in res.stdout and "/dev/loop" in res.stdout
    # The loop device is autocleared with the mount; nothing is left on the host.
    assert data_image["sif"] not in _losetup()
    assert Path("/proc/self/mountinfo").read_text() == before_mounts


def test_kernel_driver_refused_for_a_user(
    runtime_ready: UserRunner, driver: str, data_image: dict[str, Any], no_leftovers: None
) -> None:
    run = Launcher(runtime_ready, driver, data_image)
    res = run(["true"], options={"mount_driver": "kernel"})
    assert res.returncode == 125 and "needs root in the initial user namespace" in res.stderr


def test_cli_unsquash_and_mount_driver(
    runtime_ready: UserRunner, data_image: dict[str, Any], no_leftovers: None
) -> None:
    sif = data_image["sif"]
    py = ["/usr/bin/python3", "-m", "sifpy", "-v"]
    res = runtime_ready([*py, "exec", "--unsquash", sif, "cat", "/data/tiny"])
    assert res.returncode == 0 and res.stdout == "tiny\n", res.stderr
    assert "extracting the image" in res.stderr
    res = runtime_ready([*py, "exec", "--mount-driver", "squashfuse", sif, "cat", "/data/hard"])
    assert res.returncode == 0 and res.stdout == "tiny\n", res.stderr
    res = runtime_ready([*py, "exec", "--mount-driver", "bogus", sif, "true"])
    assert res.returncode == 125 and "invalid choice" in res.stderr

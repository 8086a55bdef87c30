"""Hostile images and hostile environments (docs/security.md): an image whose
``/proc``, ``/dev`` and ``/sys`` are symlinks to host paths, and ``LD_PRELOAD``/``PATH`` from
the caller or from the image's environment scripts aimed at the runtime's own helpers
(squashfuse_ll, unsquashfs, fuse-overlayfs). The host must be unchanged, and the helpers
must never run anything but themselves."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from integration.conftest import UserRunner, require
from integration.runtime.conftest import Launcher, busybox_rootfs, make_sif

pytestmark = pytest.mark.unpriv

EVIL_C = r"""
#include <fcntl.h>
#include <unistd.h>
__attribute__((constructor)) static void evil(void) {
    char comm[64];
    int n = 0, fd = open("/proc/self/comm", O_RDONLY);
    if (fd >= 0) { n = read(fd, comm, sizeof comm); close(fd); }
    int out = open(MARKER, O_WRONLY | O_APPEND | O_CREAT, 0666);
    if (out >= 0 && n > 0) { write(out, comm, n); close(out); }
}
"""
HELPERS = {"squashfuse_ll", "unsquashfs", "fuse-overlayfs", "losetup", "mount"}


@pytest.fixture(scope="module")
def evil() -> Iterator[dict[str, Path]]:
    """A real preload library that logs who loaded it, and fake helpers on a PATH dir.

    Outside /tmp: the monitor covers /tmp with its session, so a library or marker there
    would be out of the helpers' reach and the test would prove nothing."""
    require(None if shutil.which("gcc") else "gcc is not installed")
    parent = "/srv" if os.path.isdir("/srv") else "/var/cache"
    base = Path(tempfile.mkdtemp(prefix="sifpy-evil-", dir=parent))
    base.chmod(0o777)
    marker = base / "marker"
    src = base / "evil.c"
    src.write_text(EVIL_C)
    lib = base / "evil.so"
    subprocess.run(
        ["gcc", "-shared", "-fPIC", f'-DMARKER="{marker}"', "-o", str(lib), str(src)],
        check=True,
        capture_output=True,
    )
    lib.chmod(0o755)
    fake = base / "bin"
    fake.mkdir()
    for name in HELPERS:
        (fake / name).write_text(f"#!/bin/sh\necho fake-{name} >> {marker}\nexit 1\n")
        (fake / name).chmod(0o755)
    fake.chmod(0o755)
    yield {"lib": lib, "marker": marker, "bin": fake}
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def hostile_image(workdir: Path, evil: dict[str, Path]) -> dict[str, Any]:
    victim = workdir / "hostile-victim"
    victim.mkdir()
    victim.chmod(0o777)

    def links(root: Path) -> None:
        (root / "proc").symlink_to("/etc")
        (root / "dev").symlink_to(str(victim))
        (root / "sys").symlink_to("/")
        env = root / ".singularity.d" / "env"
        env.mkdir(parents=True)
        (env / "90-environment.sh").write_text(
            f"export LD_PRELOAD={evil['lib']}\nexport PATH={evil['bin']}:$PATH\n"
        )

    root = busybox_rootfs(workdir / "hostile-ns-rootfs", links)
    return {**make_sif(root, workdir / "hostile-ns.sif"), "victim": victim}


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"contain": True},
        {"pid_ns": True},
        {"writable_tmpfs": True},
        {"mount_driver": "unsquash"},
    ],
    ids=["default", "contain", "pid", "writable-tmpfs", "unsquash"],
)
def test_proc_dev_sys_symlinks_are_not_followed(
    runtime_ready: UserRunner,
    driver: str,
    hostile_image: dict[str, Any],
    no_leftovers: None,
    options: dict[str, Any],
) -> None:
    image = {k: v for k, v in hostile_image.items() if k != "victim"}
    run = Launcher(runtime_ready, driver, image)
    script = (
        "grep -q '^Name:' /proc/self/status && echo proc; test -c /dev/null && echo dev; "
        "test -d /sys/kernel && echo sys; cat /etc/image-marker; "
        "for d in /proc /dev /sys; do test -L $d && echo link:$d; done; "
        "touch /dev/planted 2>/dev/null; true"
    )
    res = run(["sh", "-c", script], options=options, cwd="/")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["proc", "dev", "sys", "from the image"]
    assert list(hostile_image["victim"].iterdir()) == []


def _reset(marker: Path) -> None:
    marker.write_text("")
    marker.chmod(0o666)  # setpriv (root) and the user's processes both append


def _marker_lines(marker: Path) -> list[str]:
    return [ln for ln in marker.read_text().split() if ln != "setpriv"]


@pytest.mark.parametrize(
    "flags",
    [[], ["--unsquash"], ["--writable-tmpfs"], ["--mount-driver", "python"]],
    ids=["squashfuse", "unsquash", "overlay", "python"],
)
def test_preload_and_path_never_reach_the_helpers(
    runtime_ready: UserRunner,
    images: dict[str, Any],
    hostile_image: dict[str, Any],
    evil: dict[str, Path],
    no_leftovers: None,
    flags: list[str],
) -> None:
    marker = evil["marker"]
    # From the caller's environment: the caller (python3) loads it itself, that is the
    # user's own doing; no helper may load it, and no fake helper on PATH may run.
    for image in (images["plain"]["sif"], hostile_image["sif"]):
        _reset(marker)
        env = {"LD_PRELOAD": str(evil["lib"]), "PATH": f"{evil['bin']}:/usr/bin:/bin"}
        res = runtime_ready(
            ["/usr/bin/python3", "-m", "sifpy", "exec", *flags, image, "cat", "/etc/image-marker"],
            env=env,
            cwd="/",
        )
        assert res.returncode == 0 and res.stdout == "from the image\n", res.stderr
        lines = _marker_lines(marker)
        assert "python3" in lines  # the library works: the caller loaded it
        assert not [ln for ln in lines if ln in HELPERS or ln.startswith("fake-")], lines
    # From the image's environment scripts only: nothing outside the container loads it.
    _reset(marker)
    res = runtime_ready(
        ["/usr/bin/python3", "-m", "sifpy", "exec", *flags, hostile_image["sif"], "true"], cwd="/"
    )
    assert res.returncode == 0, res.stderr
    lines = _marker_lines(marker)
    assert not [ln for ln in lines if ln in HELPERS or ln.startswith("fake-")], lines
    assert "python3" not in lines
    assert os.stat(evil["bin"]).st_mode & 0o777 == 0o755

"""``--overlay IMAGE[:ro]``: ext3 overlay images (``sifpy overlay create``'s, which is the
layout Apptainer's ``overlay create`` writes: ``upper/`` and ``work/`` at the root of an
ext3 file system made with ``mkfs.ext3 -d``), plain ext3 file systems used read-only,
and several overlays stacked as Apptainer stacks them; all as the unprivileged test user
through the real fuse2fs and fuse-overlayfs."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from integration.conftest import UserRunner
from integration.runtime.conftest import user_processes
from integration.runtime.test_apptainer_conformance import BUSYBOX, Sifpy
from tests.probe import require


@pytest.fixture(scope="module")
def ov(runtime_ready: UserRunner, workdir: Path) -> Sifpy:
    for tool in ("fuse2fs", "fuse-overlayfs", "mkfs.ext3", "e2fsck"):
        found = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")
        require(None if found else f"{tool} is not installed")
    cwd = workdir / "overlay-images"
    cwd.mkdir(exist_ok=True)
    cwd.chmod(0o777)
    return Sifpy(runtime_ready, cwd)


@pytest.fixture(scope="module")
def image(ov: Sifpy) -> str:
    (ov.cwd / "bb.def").write_text(BUSYBOX)
    r = ov("build", "--force", "bb.sif", "bb.def", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return str(ov.cwd / "bb.sif")


def _create(ov: Sifpy, name: str) -> str:
    path = ov.cwd / name
    path.unlink(missing_ok=True)
    r = ov("overlay", "create", "--size", "16", str(path))
    assert r.returncode == 0, r.stderr
    return str(path)


def _plain_ext3(ov: Sifpy, name: str, files: dict[str, str]) -> str:
    """An ext3 file system without upper/ (made by root: its files are root's)."""
    tree = ov.cwd / f"{name}.tree"
    shutil.rmtree(tree, ignore_errors=True)
    for rel, text in files.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text(text)
    path = ov.cwd / name
    path.unlink(missing_ok=True)
    subprocess.run(["truncate", "-s", "8M", str(path)], check=True)
    subprocess.run(["mkfs.ext3", "-q", "-F", "-d", str(tree), str(path)], check=True)
    path.chmod(0o644)
    return str(path)


def _clean(path: str) -> None:
    """The image was written out and closed: e2fsck finds nothing to fix."""
    r = subprocess.run(["e2fsck", "-fn", path], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_image_persists_and_is_the_users(
    ov: Sifpy, image: str, runtime_ready: UserRunner, no_leftovers: None
) -> None:
    img = _create(ov, "persist.img")
    uid = runtime_ready.user.uid
    # /etc is the image's (root's): written through the overlay all the same.
    r = ov("exec", "--overlay", img, image, "sh", "-c",
           "mkdir -p /data && echo kept > /data/f && echo changed > /etc/new && "
           "stat -c '%u %g' /data/f")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(uid), str(runtime_ready.user.gid)]
    assert user_processes(uid, "fuse2fs", live=True) == []
    _clean(img)
    r = ov("exec", "--overlay", img, image, "cat", "/data/f", "/etc/new")
    assert (r.returncode, r.stdout) == (0, "kept\nchanged\n"), r.stderr
    # Without the overlay the image is as built.
    assert ov("exec", image, "test", "-e", "/data/f").returncode == 1


def test_image_read_only(ov: Sifpy, image: str, no_leftovers: None) -> None:
    img = _create(ov, "ro.img")
    assert ov("exec", "--overlay", img, image, "sh", "-c", "echo x > /f").returncode == 0
    r = ov("exec", "--overlay", f"{img}:ro", image, "sh", "-c", "cat /f; touch /g")
    assert r.returncode == 1 and r.stdout == "x\n"
    assert "Read-only file system" in r.stderr
    _clean(img)


def test_image_written_by_one_run_at_a_time(
    ov: Sifpy, image: str, runtime_ready: UserRunner
) -> None:
    img = _create(ov, "lock.img")
    uid = runtime_ready.user.uid
    holder = runtime_ready.popen(
        ["/usr/bin/python3", "-m", "sifpy", "exec", "--overlay", img, image, "sleep", "4"],
        cwd=str(ov.cwd), stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not user_processes(uid, "sleep", live=True):
            assert holder.poll() is None, holder.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        r = ov("exec", "--overlay", img, image, "true")
        assert r.returncode == 125 and "in use by another container" in r.stderr, r.stderr
        r = ov("exec", "--overlay", f"{img}:ro", image, "true")
        assert r.returncode == 125 and "written by another container" in r.stderr, r.stderr
    finally:
        _, err = holder.communicate(timeout=60)
    assert holder.returncode == 0, err
    # Read-only, two runs share it.
    assert ov("exec", "--overlay", f"{img}:ro", image, "true").returncode == 0


def test_overlays_stack(ov: Sifpy, image: str, no_leftovers: None) -> None:
    """Read-only layers below, a later one above an earlier one, the writable one on top;
    a plain ext3 file system read-only (its root is the layer) and a directory's upper/."""
    plain = _plain_ext3(ov, "plain.img", {"data/who": "plain\n", "data/p": "p\n"})
    layer = ov.cwd / "layer"
    shutil.rmtree(layer, ignore_errors=True)
    (layer / "upper" / "data").mkdir(parents=True)
    (layer / "upper" / "data" / "who").write_text("dir\n")
    layer.chmod(0o755)
    top = _create(ov, "top.img")
    script = "cat /data/who /data/p && echo top > /data/t && cat /data/t"
    r = ov("exec", "--overlay", f"{plain}:ro", "--overlay", f"{layer}:ro", "--overlay", top,
           image, "sh", "-c", script)  # fmt: skip
    assert (r.returncode, r.stdout) == (0, "dir\np\ntop\n"), r.stderr
    r = ov("exec", "--overlay", f"{layer}:ro", "--overlay", f"{plain}:ro", "--overlay", top,
           image, "sh", "-c", "cat /data/who /data/t")  # fmt: skip
    assert (r.returncode, r.stdout) == (0, "plain\ntop\n"), r.stderr
    # What was written went to the writable image only.
    assert not (layer / "upper" / "data" / "t").exists()
    _clean(top)
    _clean(plain)


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        (["--overlay", "{a}", "--overlay", "{b}"], "only one --overlay can be writable"),
        (["--writable-tmpfs", "--overlay", "{a}"], "can't be combined with a writable --overlay"),
        (["--fakeroot", "--overlay", "{a}"], "ext3 images with --fakeroot are not supported"),
        (["--overlay", "{bb}"], "neither a directory nor an ext3 image"),
    ],
    ids=["two-writable", "with-writable-tmpfs", "fakeroot", "not-ext3"],
)
def test_refused(ov: Sifpy, image: str, opts: list[str], message: str) -> None:
    fields = {"a": _create(ov, "a.img"), "b": _create(ov, "b.img"), "bb": image}
    r = ov("exec", *(o.format(**fields) for o in opts), image, "true")
    assert r.returncode == 125 and r.stderr.startswith("error: "), r.stderr
    assert message in r.stderr


def test_image_made_by_root(ov: Sifpy, image: str, no_leftovers: None) -> None:
    """An overlay image whose upper/ and work/ are root's (Apptainer's ``overlay create``
    run as root): refused writable with a message (no one's in the user's namespace),
    usable read-only, and refused again at once (the failed run released its lock)."""
    root = ov.cwd / "root-made"
    shutil.rmtree(root, ignore_errors=True)
    (root / "upper" / "data").mkdir(parents=True)
    (root / "upper" / "data" / "r").write_text("root\n")
    (root / "work").mkdir(mode=0o700)
    path = ov.cwd / "root.img"
    path.unlink(missing_ok=True)
    subprocess.run(["truncate", "-s", "8M", str(path)], check=True)
    subprocess.run(["mkfs.ext3", "-q", "-F", "-d", str(root), str(path)], check=True)
    path.chmod(0o666)
    for _ in range(2):
        r = ov("exec", "--overlay", str(path), image, "true")
        assert r.returncode == 125 and "its upper/ is not yours" in r.stderr, r.stderr
    r = ov("exec", "--overlay", f"{path}:ro", image, "cat", "/data/r")
    assert (r.returncode, r.stdout) == (0, "root\n"), r.stderr
    _clean(str(path))

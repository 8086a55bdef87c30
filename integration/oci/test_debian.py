"""A single-layer Debian bookworm image (mmdebstrap minbase) through the real registry.

The tree comes from ``mmdebstrap --variant=minbase --format=tar bookworm`` (the host's apt
sources; cached in pytest's cache dir, so only the first run pays for it). The OCI layout
is written by hand: the tar gzipped as the only layer, a config, a manifest, index.json;
``skopeo copy`` pushes it as ``test/debian:bookworm``. ``sifpy pull`` (streaming and
unpack) must give the tree ``umoci unpack`` gives, and the SIF must run Debian's tools.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from integration.oci.conftest import Registry, SifpyEnv, skopeo_push
from integration.oci.helpers import (
    assert_same_tree,
    finish_oci_layout,
    sif_rootfs,
    umoci_rootfs,
)
from sifpy.sif import SifImage
from tests.conftest import need_tool, require

NAME = "test/debian:bookworm"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass
class DebianImage:
    layout: Path
    tag: str
    reference: Path  # umoci's unpack of the image
    arch: str
    devices: set[str]  # device nodes in the layer (sifpy skips them)


def minbase_tar(pytestconfig: pytest.Config, tmp: Path) -> Path:
    """The mmdebstrap tar, built once and kept in pytest's cache dir (or a tmp dir)."""
    mmdebstrap = need_tool("mmdebstrap")
    cache = getattr(pytestconfig, "cache", None)
    where = cache.mkdir("sifpy-debian-bookworm") if cache is not None else tmp
    out = Path(where) / "minbase.tar"
    if out.is_file() and out.stat().st_size > 0:
        return out
    partial = out.with_suffix(".tar.partial")
    require(
        None
        if os.geteuid() == 0 or shutil.which("newuidmap") is not None
        else "mmdebstrap needs root"
    )
    proc = subprocess.run(
        [mmdebstrap, "--quiet", "--variant=minbase", "--format=tar", "bookworm", str(partial)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=600,
    )
    require(None if proc.returncode == 0 else f"mmdebstrap failed: {proc.stderr[-1500:]}")
    partial.rename(out)  # atomic: an interrupted run leaves no half tar under the final name
    return out


def write_layout(layout: Path, tar: Path, tag: str, arch: str) -> None:
    """One gzip layer (the tar as is), a config, a manifest and index.json, by hand."""
    blobs = layout / "blobs/sha256"
    blobs.mkdir(parents=True)
    diff_id = hashlib.sha256()
    tmp = blobs / "layer.tmp"
    with open(tar, "rb") as src, gzip.GzipFile(tmp, "wb", compresslevel=1, mtime=0) as gz:
        while chunk := src.read(1 << 20):
            diff_id.update(chunk)
            gz.write(chunk)
    layer_hash = hashlib.sha256()
    with open(tmp, "rb") as f:
        while chunk := f.read(1 << 20):
            layer_hash.update(chunk)
    layer = {"digest": f"sha256:{layer_hash.hexdigest()}", "size": tmp.stat().st_size}
    tmp.rename(blobs / layer_hash.hexdigest())
    finish_oci_layout(
        layout,
        layer,
        f"sha256:{diff_id.hexdigest()}",
        tag,
        arch,
        config={"Env": [PATH_ENV], "Cmd": ["bash"]},
        history=[{"created_by": "mmdebstrap --variant=minbase bookworm"}],
    )


@pytest.fixture(scope="module")
def debian(
    registry: Registry, pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DebianImage]:
    """test/debian:bookworm in the registry fixture, its layout and umoci's tree of it."""
    work = tmp_path_factory.mktemp("debian")
    tar = minbase_tar(pytestconfig, work)
    arch = subprocess.run(
        [need_tool("dpkg"), "--print-architecture"], capture_output=True, text=True, check=True
    ).stdout.strip()
    with tarfile.open(tar) as tf:
        devices = {m.name.removeprefix("./") for m in tf if m.ischr() or m.isblk()}
    layout = work / "layout"
    write_layout(layout, tar, "bookworm", arch)
    skopeo_push(layout, "bookworm", f"{registry.host}/{NAME}")
    registry.layouts[NAME] = (layout, "bookworm")
    reference = umoci_rootfs(layout, "bookworm", work / "bundle")
    # Rootless umoci can't mknod: it leaves an empty regular file where a device node was.
    # sifpy skips device nodes (with a warning), so the reference loses these placeholders.
    for dev in devices:
        st = (reference / dev).lstat()
        assert stat.S_ISREG(st.st_mode) and st.st_size == 0, dev
        (reference / dev).unlink()
    yield DebianImage(layout, "bookworm", reference, arch, devices)
    shutil.rmtree(work, ignore_errors=True)


@pytest.mark.parametrize("mode", ["stream", "unpack"])
def test_debian_pull_matches_umoci_and_runs(
    debian: DebianImage, registry: Registry, sifpy: SifpyEnv, tmp_path: Path, mode: str
) -> None:
    if mode == "stream":
        need_tool("tar2sqfs")
    out = tmp_path / "debian.sif"
    proc = sifpy.run(
        "-v", "pull", "--insecure", out, f"docker://{registry.host}/{NAME}",
        SIFPY_PULL_STREAM="1" if mode == "stream" else "0",
    )  # fmt: skip
    assert ("streaming" in proc.stderr) == (mode == "stream")
    with SifImage.open(out) as img:
        assert img.primary_arch == debian.arch
    ours = sif_rootfs(out, tmp_path / "ours")
    # Device nodes are skipped: normal in a Debian image, so one summary line at -v, not a
    # warning per node.
    assert debian.devices and all(not (ours / d).exists() for d in debian.devices)
    nodes = [ln for ln in proc.stderr.splitlines() if "device node" in ln]
    assert len(nodes) == 1 and "warning" not in proc.stderr, proc.stderr
    assert nodes[0].startswith("device nodes in layers skipped")
    assert f": {len(debian.devices)} (" in nodes[0], (nodes, debian.devices)
    got = assert_same_tree(ours, debian.reference, strict_links=mode == "stream")
    assert len(got) > 5000  # a whole Debian, not an empty tree that trivially matched
    assert (ours / "etc/debian_version").read_text().startswith("12.")
    # The image runs: Debian's own binaries and dynamic loader, from the SIF.
    version = sifpy.run("exec", out, "cat", "/etc/debian_version").stdout
    assert version.strip().startswith("12."), version
    apt = sifpy.run("exec", out, "apt-get", "--version")
    assert apt.stdout.startswith("apt 2."), apt.stdout + apt.stderr

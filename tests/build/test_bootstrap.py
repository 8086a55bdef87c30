"""Bootstrap agents that need no namespace: oci, oci-archive, docker-archive, busybox."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
from pathlib import Path

import pytest

from sifpy.build.options import BuildOptions
from sifpy.build.pipeline import build
from sifpy.errors import BuildError, RootfsError
from sifpy.rootfs.bootstrap import debootstrap, oci
from sifpy.runtime import seccomp
from tests.conftest import need_tool
from tests.rootfs.tars import dir_, hard, layer, reg, snapshot, sym, wh

from .oci_images import docker_archive, oci_layout, tar_dir

LAYER1 = layer(
    dir_("etc"),
    reg("etc/os-release", b"NAME=test\n"),
    dir_("gone"),
    reg("gone/file", b"x"),
    reg("keep.txt", b"keep"),
)
LAYER2 = layer(wh("gone"), hard("keep-link", "keep.txt"), sym("latest", "keep.txt"))
CONFIG = {"Env": ["PATH=/usr/bin:/bin", "LEVEL=2"], "Cmd": ["/bin/sh"], "Labels": {"l": "v"}}


def _def(tmp_path: Path, agent: str, source: str) -> Path:
    d = tmp_path / f"{agent}.def"
    d.write_text(f"Bootstrap: {agent}\nFrom: {source}\n")
    return d


def _check_tree(out: Path) -> None:
    assert (out / "etc/os-release").read_text() == "NAME=test\n"
    assert not (out / "gone").exists()
    assert os.stat(out / "keep-link").st_ino == os.stat(out / "keep.txt").st_ino
    assert os.readlink(out / "latest") == "keep.txt"
    env = (out / ".singularity.d/env/10-docker2singularity.sh").read_text()
    assert 'export LEVEL="${LEVEL:-"2"}"' in env
    labels = json.loads((out / ".singularity.d/labels.json").read_text())
    assert labels["l"] == "v"


# "archive:tag": Apptainer hands From: to containers/image, which splits an oci-archive
# reference at the first colon (oci/archive/oci_transport.go: img.tar:v1 is the archive
# img.tar and the tag v1).
@pytest.mark.parametrize("form", ["dir", "dir:tag", "digest", "archive", "archive:tag"])
def test_oci_sources(tmp_path: Path, form: str) -> None:
    layout = oci_layout(tmp_path / "layout", [LAYER1, LAYER2], CONFIG, tag="v1")
    agent, source = "oci", str(layout)
    if form == "dir:tag":
        source += ":v1"
    elif form == "digest":
        index = json.loads((layout / "index.json").read_text())
        source += "@" + index["manifests"][0]["digest"]
    elif form.startswith("archive"):
        agent, source = "oci-archive", str(tar_dir(layout, tmp_path / "img.tar"))
        source += ":v1" if form == "archive:tag" else ""
    out = tmp_path / "out"
    build(str(out), str(_def(tmp_path, agent, source)), BuildOptions(sandbox=True))
    _check_tree(out)
    labels = json.loads((out / ".singularity.d/labels.json").read_text())
    assert labels["org.opencontainers.image.base.digest"].startswith("sha256:")


@pytest.mark.parametrize("ref", ["", ":demo:1", ":@0"])
def test_docker_archive(tmp_path: Path, ref: str) -> None:
    """docker-archive:path[:name:tag|:@N] as containers/image reads it."""
    archive = docker_archive(tmp_path / "d.tar", [LAYER1, LAYER2], CONFIG)
    out = tmp_path / "out"
    deffile = _def(tmp_path, "docker-archive", str(archive) + ref)
    build(str(out), str(deffile), BuildOptions(sandbox=True))
    _check_tree(out)
    labels = json.loads((out / ".singularity.d/labels.json").read_text())
    assert labels["org.opencontainers.image.base.name"] == "demo:1"


def test_oci_bad_tag_and_tampered_blob(tmp_path: Path) -> None:
    layout = oci_layout(tmp_path / "layout", [LAYER1], CONFIG)
    with pytest.raises(BuildError, match="can't find tag"):
        build(
            str(tmp_path / "o"),
            str(_def(tmp_path, "oci", f"{layout}:nope")),
            BuildOptions(sandbox=True),
        )
    digest = hashlib.sha256(LAYER1).hexdigest()
    blob = layout / "blobs/sha256" / digest
    blob.write_bytes(LAYER1[:-1] + b"\1")
    with pytest.raises(BuildError, match="does not match its digest"):
        build(
            str(tmp_path / "o"), str(_def(tmp_path, "oci", str(layout))), BuildOptions(sandbox=True)
        )
    assert not (tmp_path / "o").exists()


MALICIOUS = [
    layer(reg("../escape.txt", b"pwned")),
    layer(sym("link", "../../victim"), reg("link/hello", b"pwned")),
    layer(hard("hl", "../victim/hello")),
    layer(reg(".wh...", b"")),
]


@pytest.mark.parametrize("bad", range(len(MALICIOUS)))
def test_malicious_oci_archive_never_escapes(tmp_path: Path, bad: int) -> None:
    work = tmp_path / "work"
    victim = tmp_path / "victim"
    work.mkdir()
    victim.mkdir()
    (victim / "hello").write_text("victim\n")
    layers = [LAYER1, MALICIOUS[bad]]
    if bad == 1:  # symlink in one layer, write through it in the next
        layers = [LAYER1, layer(sym("link", "../../victim")), layer(reg("link/hello", b"pwned"))]
    archive = tar_dir(oci_layout(tmp_path / "layout", layers, CONFIG), tmp_path / "bad.tar")
    before = snapshot(victim, victim / "none")
    out = work / "out"
    try:
        build(
            str(out), str(_def(tmp_path, "oci-archive", str(archive))), BuildOptions(sandbox=True)
        )
    except (RootfsError, BuildError):
        assert not out.exists()
    assert snapshot(victim, victim / "none") == before
    assert not (tmp_path / "escape.txt").exists()
    assert not list(work.glob(".sifpy-build-*"))


def test_busybox_from_host(tmp_path: Path) -> None:
    need_tool("busybox")
    d = tmp_path / "b.def"
    d.write_text("Bootstrap: busybox\n")
    out = tmp_path / "out"
    build(str(out), str(d), BuildOptions(sandbox=True))
    assert stat.S_IMODE((out / "bin/busybox").stat().st_mode) == 0o755
    assert os.readlink(out / "bin/sh") == "busybox"
    assert len(list((out / "bin").iterdir())) > 50


def test_split_ref() -> None:
    assert oci.split_ref("/no/such:tag") == ("/no/such", "tag", None)
    assert oci.split_ref("/x@sha256:ab") == ("/x", None, "sha256:ab")
    assert oci.split_ref("/no/such") == ("/no/such", None, None)
    # The first colon ends the path, as in containers/image.
    assert oci.split_ref("img.tar:v2") == ("img.tar", "v2", None)
    assert oci.split_ref("d.tar:busybox:latest") == ("d.tar", "busybox:latest", None)


def test_docker_archive_unknown_tag(tmp_path: Path) -> None:
    archive = docker_archive(tmp_path / "d.tar", [LAYER1], CONFIG)
    deffile = _def(tmp_path, "docker-archive", f"{archive}:other:2")
    with pytest.raises(BuildError, match="can't find other:2"):
        build(str(tmp_path / "out"), str(deffile), BuildOptions(sandbox=True))


def test_host_mirror(tmp_path: Path) -> None:
    deb822 = tmp_path / "debian.sources"
    deb822.write_text(
        "Types: deb\nURIs: http://security.example/debian-security\nSuites: bookworm-security\n"
        "Components: main\n\nTypes: deb\n# comment\nURIs: http://mirror.example/debian\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n"
    )
    assert debootstrap.host_mirror([str(deb822)]) == "http://mirror.example/debian"
    one = tmp_path / "sources.list"
    one.write_text("# x\ndeb [arch=amd64] http://one.example/debian bookworm main\n")
    assert debootstrap.host_mirror([str(one)]) == "http://one.example/debian"
    assert debootstrap.host_mirror([]) is None


def test_seccomp_filter_program() -> None:
    prog = seccomp.build_filter("x86_64")
    assert prog is not None and len(prog) % 8 == 0 and len(prog) // 8 < 64
    assert seccomp.build_filter("aarch64") is not None
    assert seccomp.build_filter("sparc") is None


def test_seccomp_fakes_chown_in_a_child(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_text("")
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            if seccomp.install():
                os.chown(target, 4321, 4321)  # EPERM without the filter (unless real root)
                os.setgroups([4321])
                code = 0 if os.stat(target).st_uid == os.getuid() else 2
            else:
                code = 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == 3:
        pytest.skip("seccomp root emulation is not supported on this architecture")
    assert code == 0, f"child failed with {code}"
    assert os.stat(target).st_uid == os.getuid()
    assert signal.SIGKILL  # the parent is unfiltered: it can still do everything it could

"""SIF -> OCI and back: ``sifpy export`` (oci-archive:, oci:), ``sifpy push docker://`` and
the OCI-SIF of ``sifpy pull --oci``, each read by the independent tools (skopeo, umoci,
siftool) and compared with the tree the SIF holds."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from integration.conftest import UserRunner
from integration.oci.conftest import Registry, SifpyEnv, run
from integration.runtime.conftest import busybox_rootfs, make_sif
from sifpy.rootfs.imageconfig import config_to_metadata
from tests.probe import need_tool
from tests.rootfs.tars import describe_tree

SIFPY = ["/usr/bin/python3", "-m", "sifpy"]
META = (".singularity.d", ".exec", ".run", ".shell", ".test", "singularity", "environment",
        "dev", "proc", "sys", "tmp", "var", "home", "root", "etc/hosts", "etc/resolv.conf")  # fmt: skip
# The image's config, as an image pulled with these would carry it; export must give it
# back from the SIF's metadata.
CONFIG: dict[str, Any] = {
    "config": {
        "Env": ["PATH=/bin:/usr/bin", 'GREETING=hello "world" $HOME', "EMPTY="],
        "Entrypoint": ["/bin/echo", "it's"],
        "Cmd": ["from cmd", "two words"],
        "Labels": {"org.example.test": "yes", "org.example.quote": 'a "b"'},
    }
}


def _extra(root: Path) -> None:
    """What a layer must carry exactly: modes, hard links, symlinks (absolute, dangling,
    to a directory), a FIFO, an empty directory, long and non-ASCII names."""
    (root / "data/empty").mkdir(parents=True)
    (root / "data/secret").write_text("s3cret\n")
    os.link(root / "data/secret", root / "data/secret-again")
    (root / "data/abs-link").symlink_to("/etc/image-marker")
    (root / "data/dangling").symlink_to("no/such/file")
    (root / "data/dir-link").symlink_to("empty")
    os.mkfifo(root / "data/fifo")
    long = root / "data" / ("d" * 90) / ("f" * 120)
    long.parent.mkdir()
    long.write_text("long name\n")
    (root / "data/ünïcødé").write_text("unicode\n")
    (root / "data/big").write_bytes(os.urandom(300_000))
    config_to_metadata(root, CONFIG)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the SIF, the tree it was made from, with the modes the SIF holds)."""
    for tool in ("umoci", "skopeo", "siftool", "mksquashfs", "busybox"):
        need_tool(tool)
    top = tmp_path_factory.mktemp("export")
    root = busybox_rootfs(top / "rootfs", _extra)
    (root / "data/secret").chmod(0o600)  # after busybox_rootfs's chmods
    (root / "data/empty").chmod(0o700)
    (root / "bin/busybox").chmod(0o4755)
    sif = top / "app.sif"
    make_sif(root, sif)
    return sif, root


def _unpack(layout_ref: str, dest: Path) -> dict[str, tuple[object, ...]]:
    run(need_tool("umoci"), "unpack", "--rootless", "--image", layout_ref, dest)
    return describe_tree(dest / "rootfs")


def _config_of(layout: Path, tag: str) -> dict[str, Any]:
    out = run(need_tool("skopeo"), "inspect", "--config", f"oci:{layout}:{tag}")
    doc = json.loads(out)
    assert isinstance(doc, dict)
    return doc


def _check_config(cfg: dict[str, Any]) -> None:
    section = cfg["config"]
    want = CONFIG["config"]
    assert section["Env"] == want["Env"]
    assert section["Entrypoint"] == want["Entrypoint"] and section["Cmd"] == want["Cmd"]
    assert section["Labels"] == want["Labels"]
    assert cfg["os"] == "linux" and cfg["architecture"] == "amd64"
    assert cfg["rootfs"]["type"] == "layers" and len(cfg["rootfs"]["diff_ids"]) == 1


def test_oci_archive_round_trip(image: tuple[Path, Path], sifpy: SifpyEnv, tmp_path: Path) -> None:
    sif, root = image
    archive = tmp_path / "out.tar"
    sifpy.run("export", sif, f"oci-archive:{archive}:v1")
    # skopeo reads the archive; the tag is the index's ref name.
    layout = tmp_path / "copied"
    run(need_tool("skopeo"), "copy", "--quiet", f"oci-archive:{archive}:v1", f"oci:{layout}:v1")
    assert _unpack(f"{layout}:v1", tmp_path / "bundle") == describe_tree(root)
    _check_config(_config_of(layout, "v1"))
    with tarfile.open(archive) as tar:
        index = json.load(tar.extractfile("index.json"))  # type: ignore[arg-type]
        layout_file = json.load(tar.extractfile("oci-layout"))  # type: ignore[arg-type]
    assert layout_file == {"imageLayoutVersion": "1.0.0"}
    (entry,) = index["manifests"]
    assert entry["annotations"] == {"org.opencontainers.image.ref.name": "v1"}
    assert entry["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    # Reproducible: the same SIF, the same bytes.
    again = tmp_path / "again.tar"
    sifpy.run("export", sif, f"oci-archive:{again}:v1")
    assert again.read_bytes() == archive.read_bytes()


def test_oci_layout_round_trip(image: tuple[Path, Path], sifpy: SifpyEnv, tmp_path: Path) -> None:
    sif, root = image
    layout = tmp_path / "layout"
    sifpy.run("export", sif, f"oci:{layout}:first")
    sifpy.run("export", sif, f"oci:{layout}")  # the default tag, beside the first
    index = json.loads((layout / "index.json").read_text())
    tags = [m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]]
    assert tags == ["first", "latest"]
    manifest_digest = index["manifests"][0]["digest"]
    manifest = json.loads((layout / "blobs/sha256" / manifest_digest[7:]).read_text())
    (layer,) = manifest["layers"]
    assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
    assert manifest["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    assert _unpack(f"{layout}:first", tmp_path / "bundle") == describe_tree(root)
    _check_config(_config_of(layout, "latest"))
    # umoci's runtime config runs the image's ENTRYPOINT + CMD.
    bundle_cfg = json.loads((tmp_path / "bundle/config.json").read_text())
    assert bundle_cfg["process"]["args"] == CONFIG["config"]["Entrypoint"] + CONFIG["config"]["Cmd"]


def test_push_docker_read_by_skopeo(
    image: tuple[Path, Path], registry: Registry, sifpy: SifpyEnv, tmp_path: Path
) -> None:
    sif, root = image
    target = f"{registry.host}/test/exported:v1"
    # Small chunks: the layer goes up in PATCH requests, the config in one PUT.
    pushed = sifpy.run("push", "--insecure", "--chunk-size", "256K", sif, f"docker://{target}")
    assert "pushed docker://" in pushed.stderr
    skopeo = need_tool("skopeo")
    info = json.loads(run(skopeo, "inspect", "--tls-verify=false", f"docker://{target}"))
    # The same image as the export: the same manifest digest.
    layout = tmp_path / "layout"
    sifpy.run("export", sif, f"oci:{layout}:v1")
    index = json.loads((layout / "index.json").read_text())
    assert info["Digest"] == index["manifests"][0]["digest"]
    assert info["Labels"] == CONFIG["config"]["Labels"]
    assert info["Env"] == CONFIG["config"]["Env"]
    # Copied back and unpacked: the SIF's tree.
    back = tmp_path / "back"
    run(skopeo, "copy", "--quiet", "--src-tls-verify=false", f"docker://{target}", f"oci:{back}:b")
    assert _unpack(f"{back}:b", tmp_path / "bundle") == describe_tree(root)
    # Pushing again finds every blob in the registry.
    again = sifpy.run("-v", "push", "--insecure", sif, f"docker://{registry.host}/test/exported:v2")
    assert "already in the registry" in again.stderr, again.stderr


def test_pull_oci_writes_ocisif_that_runs(
    registry: Registry, runtime_ready: UserRunner, user_dir: Path
) -> None:
    out = user_dir / "oci.sif"
    env = {"SIFPY_CACHEDIR": str(user_dir / "cache")}
    ref = f"docker://{registry.host}/test/plain:1"
    res = runtime_ready([*SIFPY, "pull", "--insecure", "--oci", str(out), ref], env=env)
    assert res.returncode == 0, res.stderr
    siftool = need_tool("siftool")

    def tool(*argv: str) -> str:
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout

    # The reference reads the file: four objects in one group, no partition. (Debian's
    # siftool 2.8.3 predates the OCI data types and calls them "Unknown"; sifpy's
    # siftool-compatible listing names them.)
    listing = tool(siftool, "list", str(out))
    rows = [line.split("|") for line in listing.splitlines() if line[:1].isdigit()]
    assert [r[0].strip() for r in rows] == ["1", "2", "3", "4"], listing
    assert "FS" not in listing
    ours = runtime_ready([*SIFPY, "sif", "list", str(out)]).stdout
    kinds = [line.split("|")[-1].strip() for line in ours.splitlines() if line[:1].isdigit()]
    assert kinds == ["OCI.Blob", "OCI.Blob", "OCI.Blob", "OCI.RootIndex"], ours
    # The root index (dumped by the reference) names the manifest; the first blob, the
    # layer, is a squashfs.
    index = json.loads(tool(siftool, "dump", "4", str(out)))
    assert index["mediaType"] == "application/vnd.oci.image.index.v1+json"
    assert [m["mediaType"] for m in index["manifests"]] == [
        "application/vnd.oci.image.manifest.v1+json"
    ]
    layer = subprocess.run([siftool, "dump", "1", str(out)], capture_output=True, check=True)
    assert layer.stdout[:4] == b"hsqs"
    # The layer is a squashfs of the image's tree, named in the manifest by its media type.
    from sifpy.sif import SifImage, ocisif

    with SifImage.open(out) as img:
        oci = ocisif.read_image(img)
        assert [m for m, _ in oci.layers] == [ocisif.SQUASHFS_LAYER]
        assert oci.config["config"]["Entrypoint"] == ["/bin/echo"]
    res = runtime_ready([*SIFPY, "exec", str(out), "cat", "/etc/marker"], env=env)
    assert (res.returncode, res.stdout) == (0, "plain image\n"), res.stderr
    res = runtime_ready([*SIFPY, "run", str(out), "hi"], env=env)
    assert (res.returncode, res.stdout) == (0, "hi\n"), res.stderr
    res = runtime_ready([*SIFPY, "inspect", "--labels", str(out)], env=env)
    assert res.returncode == 0 and "org.example.test" in res.stdout, res.stderr
    # Exported again, the OCI-SIF gives the pulled image's own config and tree.
    layout = user_dir / "layout"
    res = runtime_ready([*SIFPY, "export", str(out), f"oci:{layout}:t"], env=env)
    assert res.returncode == 0, res.stderr
    src_layout, src_tag = registry.layouts["test/plain:1"]
    assert _config_of(layout, "t")["config"] == _config_of(src_layout, src_tag)["config"]
    exported = _unpack(f"{layout}:t", user_dir / "bundle")
    original = _unpack(f"{src_layout}:{src_tag}", user_dir / "orig")
    # The squashfs holds the image plus Apptainer's metadata and mount points.
    assert {k: v for k, v in exported.items() if k in original} == original
    assert all(k.startswith(META) for k in exported.keys() - original.keys())
    # Pulling again to the same name is refused without --force.
    res = runtime_ready([*SIFPY, "pull", "--insecure", "--oci", str(out), ref], env=env)
    assert res.returncode != 0 and "file exists" in res.stderr
    shutil.rmtree(user_dir / "cache", ignore_errors=True)

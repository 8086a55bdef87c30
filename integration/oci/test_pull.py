"""``sifpy pull`` from a real registry: the rootfs in the SIF equals umoci's unpack."""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from integration.oci.conftest import Registry, SifpyEnv
from integration.oci.helpers import assert_same_tree, sif_config, sif_rootfs, umoci_rootfs
from sifpy.oci.cache import Cache
from sifpy.sif import SifImage
from sifpy.sif import format as F
from tests.conftest import need_tool

CASES = [
    ("test/plain:1", "test/plain:1", []),
    ("test/plain-v2s2:1", "test/plain-v2s2:1", []),
    ("test/multi:1", "test/multi:1", []),
    ("test/index:1", "test/index:1@amd64", ["--arch", "amd64"]),
    ("test/index:1", "test/index:1@arm64", ["--arch", "arm64"]),
    ("test/index:1", "test/index:1@arm64", ["--platform", "linux/arm64"]),
]


@pytest.mark.parametrize("mode", ["stream", "stream-after-download", "unpack"])
@pytest.mark.parametrize(
    ("name", "layout_key", "flags"), CASES, ids=[" ".join([c[0], *c[2]]) for c in CASES]
)
def test_pull_matches_umoci(
    registry: Registry,
    sifpy: SifpyEnv,
    tmp_path: Path,
    name: str,
    layout_key: str,
    flags: list[str],
    mode: str,
) -> None:
    streaming = mode.startswith("stream")
    if streaming:
        need_tool("tar2sqfs")
    out = tmp_path / "app.sif"
    proc = sifpy.run(
        "-v", "pull", "--insecure", *flags, out, f"docker://{registry.host}/{name}",
        SIFPY_PULL_STREAM="1" if streaming else "0",
        SIFPY_PULL_OVERLAP="1" if mode == "stream" else "0",
    )  # fmt: skip
    assert "wrote" in proc.stderr
    assert ("streaming" in proc.stderr) == streaming
    # One gzip layer streams while it downloads (unless turned off); more layers can't.
    overlapped = "while it downloads" in proc.stderr
    assert overlapped == (mode == "stream" and name != "test/multi:1")
    assert "packing from the cache instead" not in proc.stderr
    with SifImage.open(out) as img:
        assert img.launch_script == F.DEFAULT_LAUNCH_SCRIPT
        part = img.primary_partition()
        assert part.partition().fstype == F.FSType.SQUASH
    layout, tag = registry.layouts[layout_key]
    ours = sif_rootfs(out, tmp_path / "ours")
    reference = umoci_rootfs(layout, tag, tmp_path / "bundle")
    assert_same_tree(ours, reference, strict_links=mode == "stream")


def test_index_platforms_differ(registry: Registry, sifpy: SifpyEnv, tmp_path: Path) -> None:
    for arch in ("amd64", "arm64"):
        out = tmp_path / f"{arch}.sif"
        sifpy.run(
            "pull", "--insecure", "--arch", arch, out, f"docker://{registry.host}/test/index:1"
        )
        root = sif_rootfs(out, tmp_path / arch)
        assert (root / "etc/marker").read_text() == f"I am {arch}\n"
        with SifImage.open(out) as img:
            assert img.primary_arch == arch


def test_missing_platform_is_clear(registry: Registry, sifpy: SifpyEnv, tmp_path: Path) -> None:
    proc = sifpy.run(
        "pull", "--insecure", "--arch", "s390x", tmp_path / "x.sif",
        f"docker://{registry.host}/test/index:1", check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "no image for linux/s390x" in proc.stderr
    assert "linux/amd64" in proc.stderr and "linux/arm64" in proc.stderr
    assert not (tmp_path / "x.sif").exists()


def test_metadata(registry: Registry, sifpy: SifpyEnv, tmp_path: Path) -> None:
    out = tmp_path / "app.sif"
    sifpy.run("pull", "--insecure", out, f"docker://{registry.host}/test/plain:1")
    root = sif_rootfs(out, tmp_path / "root")
    meta = root / ".singularity.d"
    labels = json.loads((meta / "labels.json").read_text())
    assert labels["org.example.test"] == "yes"
    env_sh = (meta / "env/10-docker2singularity.sh").read_text()
    assert 'export PATH="/bin:/usr/bin"' in env_sh
    assert stat.S_IMODE((meta / "runscript").stat().st_mode) == 0o755
    cfg = sif_config(out)
    assert cfg["Entrypoint"] == ["/bin/echo"]
    # The scripts work: source the env, run the runscript with the image's own busybox sh,
    # inside the extracted tree (no container runtime needed: paths are rewritten by chroot).
    script = (
        ". /.singularity.d/env/10-docker2singularity.sh; "
        'printf "%s\\n" "$GREETING"; /.singularity.d/runscript; /.singularity.d/runscript a b'
    )
    res = subprocess.run(
        [shutil.which("chroot", path="/usr/sbin:/usr/bin:/sbin:/bin") or "chroot", str(root), "/bin/sh", "-c", script],
        capture_output=True, text=True, env={"HOME": "/root"},
    )  # fmt: skip
    if res.returncode != 0 and "Operation not permitted" in res.stderr:
        pytest.skip("chroot not permitted here")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ['hello "world" $HOME', "from-cmd", "a b"]


def test_second_pull_uses_cached_sif(registry: Registry, sifpy: SifpyEnv, tmp_path: Path) -> None:
    ref = f"docker://{registry.host}/test/plain:1"
    sifpy.run("pull", "--insecure", tmp_path / "a.sif", ref)
    again = sifpy.run("pull", "--insecure", tmp_path / "b.sif", ref)
    assert "from the cache" in again.stderr
    assert (tmp_path / "a.sif").read_bytes() == (tmp_path / "b.sif").read_bytes()
    # Another compression is another SIF, made anew (and cached apart).
    gz = sifpy.run("pull", "--insecure", tmp_path / "g.sif", ref, SIFPY_COMPRESSION="gzip:6")
    assert "from the cache" not in gz.stderr
    with SifImage.open(tmp_path / "g.sif") as img:
        offset = img.primary_partition().offset
    info = subprocess.run(
        [need_tool("unsquashfs"), "-s", "-o", str(offset), tmp_path / "g.sif"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "Compression gzip" in info and "compression-level 6" in info
    again = sifpy.run("pull", "--insecure", tmp_path / "c.sif", ref)
    assert (tmp_path / "c.sif").read_bytes() == (tmp_path / "a.sif").read_bytes()
    # An existing output is refused without --force, kept intact, and replaced with it.
    refused = sifpy.run("pull", "--insecure", tmp_path / "a.sif", ref, check=False)
    assert refused.returncode != 0 and "--force" in refused.stderr
    sifpy.run("pull", "--insecure", "--force", tmp_path / "a.sif", ref)
    listing = sifpy.run("cache", "list", "--json")
    entries = json.loads(listing.stdout)
    assert [e["repository"] for e in entries] == [f"{registry.host}/test/plain"]
    assert entries[0]["tag"] == "1" and entries[0]["digest"].startswith("sha256:")
    table = sifpy.run("cache", "list").stdout
    assert "REPOSITORY" in table and "test/plain" in table
    assert Cache(sifpy.cache).verify() == []
    sifpy.run("cache", "clean")
    assert json.loads(sifpy.run("cache", "list", "--json").stdout) == []


def test_quiet_prints_nothing(registry: Registry, sifpy: SifpyEnv, tmp_path: Path) -> None:
    proc = sifpy.run(
        "-q", "pull", "--insecure", tmp_path / "a.sif", f"docker://{registry.host}/test/multi:1"
    )
    assert proc.stderr == "" and proc.stdout == ""


def test_unknown_image_and_tag(registry: Registry, sifpy: SifpyEnv, tmp_path: Path) -> None:
    for name in ("test/nope:1", "test/plain:nope"):
        proc = sifpy.run(
            "pull",
            "--insecure",
            tmp_path / "x.sif",
            f"docker://{registry.host}/{name}",
            check=False,
        )
        assert proc.returncode == 1
        assert "error: can't fetch manifest" in proc.stderr
        assert "Traceback" not in proc.stderr


def test_pull_by_digest(registry: Registry, sifpy: SifpyEnv, tmp_path: Path) -> None:
    layout, tag = registry.layouts["test/plain:1"]
    index = json.loads((layout / "index.json").read_text())
    (m,) = [
        m
        for m in index["manifests"]
        if m["annotations"]["org.opencontainers.image.ref.name"] == tag
    ]
    out = tmp_path / "d.sif"
    sifpy.run("pull", "--insecure", out, f"docker://{registry.host}/test/plain@{m['digest']}")
    assert (sif_rootfs(out, tmp_path / "r") / "etc/marker").read_text() == "plain image\n"


def test_one_layer_that_needs_the_merge(
    registry: Registry, sifpy: SifpyEnv, tmp_path: Path
) -> None:
    """A one-layer image whose tar lists a name twice (the later entry wins) can't be
    streamed while it downloads: the pull says so, packs it from the cache, and the SIF
    still holds what umoci unpacks."""
    import io
    import tarfile

    from integration.oci.conftest import skopeo_push
    from tests.rootfs.tars import dir_, layer, reg

    need_tool("tar2sqfs")
    umoci = need_tool("umoci")
    blob = tmp_path / "layer.tar"
    blob.write_bytes(
        layer(dir_("etc"), reg("etc/motd", b"first\n"), reg("etc/motd", b"second\n", 0o600))
    )
    with tarfile.open(fileobj=io.BytesIO(blob.read_bytes())) as tf:
        assert [m.name for m in tf.getmembers()].count("etc/motd") == 2
    oci = tmp_path / "oci"
    subprocess.run([umoci, "init", "--layout", oci], check=True)
    subprocess.run([umoci, "new", "--image", f"{oci}:1"], check=True)
    subprocess.run([umoci, "raw", "add-layer", "--image", f"{oci}:1", blob], check=True)
    skopeo_push(oci, "1", f"{registry.host}/test/twice:1")
    out = tmp_path / "app.sif"
    proc = sifpy.run("-v", "pull", "--insecure", out, f"docker://{registry.host}/test/twice:1")
    assert "while it downloads" in proc.stderr
    assert "packing from the cache instead" in proc.stderr and "written twice" in proc.stderr
    ours = sif_rootfs(out, tmp_path / "ours")
    assert (ours / "etc/motd").read_bytes() == b"second\n"
    assert_same_tree(ours, umoci_rootfs(oci, "1", tmp_path / "bundle"), strict_links=True)


def test_nested_index_is_refused(registry: Registry, sifpy: SifpyEnv, tmp_path: Path) -> None:
    """An index whose entry for the host platform is itself an index (or, through more
    levels, an index reached again): refused at the first nested level, nothing written."""
    import hashlib

    import requests

    base = f"http://{registry.host}/v2/test/index"
    index_type = "application/vnd.oci.image.index.v1+json"
    inner = requests.get(f"{base}/manifests/1", headers={"Accept": index_type}, timeout=10)
    assert inner.status_code == 200 and json.loads(inner.content)["manifests"]
    outer = {
        "schemaVersion": 2,
        "mediaType": index_type,
        "manifests": [
            {
                "mediaType": index_type,
                "digest": "sha256:" + hashlib.sha256(inner.content).hexdigest(),
                "size": len(inner.content),
                "platform": {"os": "linux", "architecture": "amd64"},
            }
        ],
    }
    put = requests.put(
        f"{base}/manifests/nested",
        data=json.dumps(outer).encode(),
        headers={"Content-Type": index_type},
        timeout=10,
    )
    assert put.status_code == 201, put.text
    out = tmp_path / "n.sif"
    proc = sifpy.run(
        "pull", "--insecure", "--arch", "amd64", out,
        f"docker://{registry.host}/test/index:nested", check=False,
    )  # fmt: skip
    assert proc.returncode == 1 and "nested indexes are not supported" in proc.stderr, proc.stderr
    assert not out.exists()


@pytest.mark.xfail(
    strict=True,
    reason="diff_ids are not checked yet: the uncompressed layer stream is not hashed in "
    "rootfs.unpack, the stream merge's index pass or the one-pass reader",
)
def test_layer_not_matching_its_diff_id_is_refused(
    registry: Registry, sifpy: SifpyEnv, tmp_path: Path
) -> None:
    """test/plain with its config's ``rootfs.diff_ids[0]`` changed (a new config blob and
    manifest, the layer untouched): the layer's uncompressed digest no longer matches."""
    import hashlib

    import requests

    base = f"http://{registry.host}/v2/test/plain"
    mtype = "application/vnd.oci.image.manifest.v1+json"
    manifest = requests.get(f"{base}/manifests/1", headers={"Accept": mtype}, timeout=10).json()
    config = requests.get(f"{base}/blobs/{manifest['config']['digest']}", timeout=10).json()
    config["rootfs"]["diff_ids"][0] = "sha256:" + "0" * 64
    raw = json.dumps(config).encode()
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    start = requests.post(f"{base}/blobs/uploads/", timeout=10)
    assert start.status_code == 202, start.text
    loc = start.headers["Location"]
    done = requests.put(
        loc, params={"digest": digest}, data=raw,
        headers={"Content-Type": "application/octet-stream"}, timeout=10,
    )  # fmt: skip
    assert done.status_code == 201, done.text
    manifest["config"] = {**manifest["config"], "digest": digest, "size": len(raw)}
    put = requests.put(
        f"{base}/manifests/bad-diffid", data=json.dumps(manifest).encode(),
        headers={"Content-Type": mtype}, timeout=10,
    )  # fmt: skip
    assert put.status_code == 201, put.text
    out = tmp_path / "d.sif"
    ref = f"docker://{registry.host}/test/plain:bad-diffid"
    proc = sifpy.run("pull", "--insecure", out, ref, check=False)
    assert proc.returncode == 1 and "diff" in proc.stderr.lower(), proc.stderr
    assert not out.exists()

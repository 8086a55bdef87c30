"""Build OCI image layouts and archives (oci-archive, docker-archive) in tests, by hand."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

from sifpy.rootfs.metadata import host_arch


def _blob(root: Path, data: bytes) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (root / "blobs" / "sha256" / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def oci_layout(
    root: Path, layers: list[bytes], config: dict[str, Any] | None = None, tag: str = "latest"
) -> Path:
    """An OCI image layout at ``root`` with one image tagged ``tag``."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    cfg = {
        "architecture": host_arch(),
        "os": "linux",
        "config": config or {},
        "rootfs": {"type": "layers", "diff_ids": []},
    }
    cdesc = _blob(root, json.dumps(cfg).encode())
    cdesc["mediaType"] = "application/vnd.oci.image.config.v1+json"
    ldescs = []
    for data in layers:
        d = _blob(root, data)
        d["mediaType"] = "application/vnd.oci.image.layer.v1.tar"
        ldescs.append(d)
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": cdesc,
        "layers": ldescs,
    }
    mdesc = _blob(root, json.dumps(manifest).encode())
    mdesc["mediaType"] = manifest["mediaType"]
    mdesc["annotations"] = {"org.opencontainers.image.ref.name": tag}
    index = {"schemaVersion": 2, "manifests": [mdesc]}
    (root / "index.json").write_text(json.dumps(index))
    return root


def tar_dir(src: Path, dest: Path) -> Path:
    """A tar of the directory ``src`` (its contents at the top), as skopeo writes."""
    with tarfile.open(dest, "w") as tf:
        for path in sorted(src.rglob("*")):
            tf.add(path, arcname=str(path.relative_to(src)), recursive=False)
    return dest


def docker_archive(dest: Path, layers: list[bytes], config: dict[str, Any]) -> Path:
    """A ``docker save`` style tar: manifest.json, <hex>.json, <n>/layer.tar."""
    cfg = json.dumps({"architecture": host_arch(), "os": "linux", "config": config}).encode()
    chex = hashlib.sha256(cfg).hexdigest()
    files = {f"{chex}.json": cfg}
    names = []
    for i, data in enumerate(layers):
        files[f"l{i}/layer.tar"] = data
        names.append(f"l{i}/layer.tar")
    manifest = [{"Config": f"{chex}.json", "RepoTags": ["demo:1"], "Layers": names}]
    files["manifest.json"] = json.dumps(manifest).encode()
    with tarfile.open(dest, "w") as tf:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return dest

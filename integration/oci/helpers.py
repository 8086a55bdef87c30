"""Reading a pulled SIF back, the reference tree umoci makes from the same image, a
one-layer OCI layout written by hand, and the base of the test HTTP servers."""

from __future__ import annotations

import hashlib
import http.server
import json
import stat
import subprocess
from pathlib import Path

from sifpy.rootfs.imageconfig import MOUNT_POINTS
from sifpy.sif import SifImage
from sifpy.sif import format as F
from tests.conftest import need_tool
from tests.rootfs.tars import describe_tree as describe

ADDED_BY_SIFPY = {".singularity.d", "var", *MOUNT_POINTS}


def oci_blob(layout: Path, data: bytes) -> dict[str, object]:
    """Store ``data`` in the layout's blobs; its descriptor's digest and size."""
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def finish_oci_layout(
    layout: Path,
    layer: dict[str, object],
    diff_id: str,
    tag: str,
    arch: str = "amd64",
    **config: object,
) -> None:
    """Config, manifest and index.json around one gzip ``layer`` (a descriptor of a blob
    already in the layout) whose uncompressed digest is ``diff_id``; ``config``: more keys
    of the image config (``config``, ``history``)."""
    image = {
        "architecture": arch,
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        **config,
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            **oci_blob(layout, json.dumps(image).encode()),
        },
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **layer}],
    }
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": manifest["mediaType"],
                **oci_blob(layout, json.dumps(manifest).encode()),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (layout / "index.json").write_text(json.dumps(index))


def sif_rootfs(sif: Path, dest: Path) -> Path:
    """Extract the primary partition of ``sif`` with unsquashfs at its offset."""
    with SifImage.open(sif) as img:
        part = img.primary_partition()
        offset = part.offset
    subprocess.run(
        [need_tool("unsquashfs"), "-no-progress", "-o", str(offset), "-d", str(dest), str(sif)],
        check=True,
        capture_output=True,
        stdin=subprocess.DEVNULL,
    )
    return dest


def sif_config(sif: Path) -> dict[str, object]:
    with SifImage.open(sif) as img:
        (d,) = [d for d in img.descriptors if d.data_type == F.DataType.GENERIC_JSON]
        assert d.name == "oci-config.json"
        data = json.loads(img.read(d))
    assert isinstance(data, dict)
    return data


def umoci_rootfs(layout: Path, tag: str, dest: Path) -> Path:
    subprocess.run(
        [need_tool("umoci"), "unpack", "--rootless", "--image", f"{layout}:{tag}", str(dest)],
        check=True,
        capture_output=True,
        stdin=subprocess.DEVNULL,
    )
    return dest / "rootfs"


def assert_same_tree(
    ours: Path, reference: Path, *, strict_links: bool = False
) -> dict[str, tuple[object, ...]]:
    """Every path of the reference is in ours, identical; ours adds only sifpy's metadata
    and mount points. ``strict_links``: hardlinked symlinks must stay one inode too (the
    streaming path, tar2sqfs)."""
    expected = describe(reference)
    got = describe(ours)
    for path, value in expected.items():
        have = got.get(path)
        if value[0] == stat.S_IFLNK and have is not None and not strict_links:
            # A hardlink to a symlink (in the multi-layer fixture) survives sifpy's rootfs
            # but not always mksquashfs 4.5.1 (it is sometimes stored as two symlinks):
            # compare the link itself, not its link group.
            value, have = value[:3], have[:3]
        assert have == value, f"{path}: {have!r} != {value!r}"
    extra = {p for p in got if p not in expected}
    for p in extra:
        assert p.split("/")[0] in ADDED_BY_SIFPY or p in ADDED_BY_SIFPY, f"unexpected {p}"
    return got


class QuietHandler(http.server.BaseHTTPRequestHandler):
    """An HTTP/1.1 handler that logs nothing and answers with a whole body at once."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def answer(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

"""OCI-SIF: an OCI image stored in a SIF, as Apptainer 1.2+ and SingularityCE 4 write it in
their ``--oci`` mode.

The layout follows sylabs' oci-tools (``pkg/sif``, https://github.com/sylabs/oci-tools):
every blob of the image (layers, config, manifest) is an ``OCI.Blob`` object whose
descriptor extra holds its digest text, written in that order, and the image index that
names the manifest is the one ``OCI.RootIndex`` object, written last. The SIF is written
deterministically (zero id and times) with 8 spare descriptors, as their ``Write``
with Apptainer's spare capacity does. Layers meant to be run are squashfs
(``application/vnd.sylabs.image.layer.v1.squashfs``): one such layer is a root file
system that sifpy mounts at its offset, as it mounts a native SIF's partition.

Everything read here is the image author's data: sizes are bounded, the small documents
are checked against their digests, and a layout sifpy can't run is refused by name.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sifpy.errors import ImageError
from sifpy.sif import format as F
from sifpy.sif.image import Descriptor, SifImage

SQUASHFS_LAYER = "application/vnd.sylabs.image.layer.v1.squashfs"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
SPARE_DESCRIPTORS = 8
_DOC_LIMIT = 4 << 20  # an index, manifest or config larger than this is not an image's


@dataclass(frozen=True)
class OciSifImage:
    """The image of an OCI-SIF: its manifest, config and the descriptor of each layer."""

    manifest: dict[str, Any]
    config: dict[str, Any]
    layers: list[tuple[str, Descriptor]]  # (media type, the OCI.Blob object)

    def rootfs(self, path: str) -> Descriptor:
        """The one squashfs layer: the root file system sifpy runs."""
        if len(self.layers) != 1 or self.layers[0][0] != SQUASHFS_LAYER:
            kinds = ", ".join(m for m, _ in self.layers) or "none"
            raise ImageError(
                f"can't run {path}: an OCI-SIF with {len(self.layers)} layers ({kinds})",
                hint="sifpy runs OCI-SIFs of one squashfs layer (apptainer pull --oci and "
                "sifpy pull --oci write those)",
            )
        return self.layers[0][1]


def is_ocisif(img: SifImage) -> bool:
    """An OCI-SIF: a root index and no primary partition (a native image that also
    carries OCI objects runs from its partition)."""
    return bool(img.find(F.DataType.OCI_ROOT_INDEX)) and not any(
        d.is_primary_partition() for d in img.descriptors
    )


def rootfs(img: SifImage) -> Descriptor:
    """What runs: a native image's primary squashfs partition, or an OCI-SIF's one
    squashfs layer."""
    if is_ocisif(img):
        return read_image(img).rootfs(img.path)
    part = img.primary_partition()
    if part.partition().fstype != F.FSType.SQUASH:
        raise ImageError(
            f"can't run {img.path}: the primary partition is not squashfs",
            hint="sifpy runs squashfs images; rebuild the image",
        )
    return part


def _document(img: SifImage, d: Descriptor, what: str) -> dict[str, Any]:
    if d.size > _DOC_LIMIT:
        raise ImageError(f"can't read {img.path}: the OCI {what} is {d.size} bytes")
    raw = img.read(d, _DOC_LIMIT)
    if "sha256:" + hashlib.sha256(raw).hexdigest() != d.oci_digest():
        raise ImageError(
            f"can't read {img.path}: the OCI {what} does not match its digest {d.oci_digest()}",
            hint="the image is damaged; pull it again",
        )
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise ImageError(f"can't read {img.path}: the OCI {what} is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ImageError(f"can't read {img.path}: the OCI {what} is not a JSON object")
    return doc


def _blob(img: SifImage, digest: object, what: str) -> Descriptor:
    for d in img.find(F.DataType.OCI_BLOB):
        if d.oci_digest() == digest:
            return d
    raise ImageError(f"can't read {img.path}: the OCI {what} {digest} is not in the SIF")


def read_image(img: SifImage) -> OciSifImage:
    """The image the root index names (its first image manifest)."""
    roots = img.find(F.DataType.OCI_ROOT_INDEX)
    if len(roots) != 1:
        raise ImageError(f"can't read {img.path}: {len(roots)} OCI root indexes (one expected)")
    index = _document(img, roots[0], "root index")
    manifests = index.get("manifests")
    entries = [
        m
        for m in (manifests if isinstance(manifests, list) else [])
        if isinstance(m, dict) and m.get("mediaType") in (OCI_MANIFEST, DOCKER_MANIFEST)
    ]
    if not entries:
        raise ImageError(f"can't read {img.path}: its OCI root index names no image manifest")
    manifest = _document(img, _blob(img, entries[0].get("digest"), "manifest"), "manifest")
    cfg_desc = manifest.get("config")
    if not isinstance(cfg_desc, dict):
        raise ImageError(f"can't read {img.path}: the OCI manifest has no config")
    config = _document(img, _blob(img, cfg_desc.get("digest"), "config"), "config")
    layers = []
    for layer in manifest.get("layers") or []:
        if not isinstance(layer, dict):
            raise ImageError(f"can't read {img.path}: a layer of the OCI manifest is not an object")
        layers.append((str(layer.get("mediaType")), _blob(img, layer.get("digest"), "layer")))
    return OciSifImage(manifest, config, layers)


@dataclass(frozen=True)
class Blob:
    """A blob to store: a file or bytes, and its digest."""

    digest: str
    data: bytes | str | os.PathLike[str]


def write(path: str | os.PathLike[str], blobs: Sequence[Blob], root_index: bytes) -> None:
    """Write the OCI-SIF ``path``: ``blobs`` in order (layers, config, manifest, as the
    reference), then ``root_index``; atomically, and byte for byte the same for the same
    input."""
    from sifpy.sif.objects import ObjectInput
    from sifpy.sif.write import create

    objects = [ObjectInput.oci(b.data, b.digest) for b in blobs]
    index_digest = "sha256:" + hashlib.sha256(root_index).hexdigest()
    objects.append(ObjectInput.oci(root_index, index_digest, root_index=True))
    create(
        path,
        objects,
        deterministic=True,
        capacity=len(objects) + SPARE_DESCRIPTORS,
        launch_script=F.DEFAULT_LAUNCH_SCRIPT,
        mode=0o755,
    )

"""SIF to OCI: ``sifpy export`` (``oci:DIR[:tag]``, ``oci-archive:FILE[:tag]``), ``sifpy push
IMG.sif docker://...`` and the OCI-SIF that ``sifpy pull --oci`` writes.

The image is one layer: the SIF's squashfs tree as a reproducible gzip tar
(:mod:`sifpy.rootfs.treetar`), or for an OCI-SIF the squashfs itself. Its config comes from
the image's metadata (:mod:`sifpy.rootfs.ociconfig`: environment, runscript as
Entrypoint/Cmd, labels), its time from the SIF's header. The same SIF gives the same
blobs, so the same digests: exporting twice, or pushing again, changes nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sifpy import config
from sifpy.errors import ImageError, UsageError
from sifpy.oci import media as M
from sifpy.oci.reference import Reference
from sifpy.oci.session import ClientOptions
from sifpy.rootfs import ociconfig
from sifpy.rootfs.treetar import write_layer
from sifpy.sif import format as F
from sifpy.sif import ocisif
from sifpy.sif.image import SifImage
from sifpy.squashfs.read import SquashfsFiles
from sifpy.squashfs.tree import SquashfsTree
from sifpy.util import log

TAR_GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"
LAYOUT_FILE = b'{"imageLayoutVersion":"1.0.0"}'
DEFAULT_TAG = "latest"


def _json(doc: Any) -> bytes:
    """Compact JSON, as Go's encoder writes the documents (and the same bytes each time)."""
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class OciImage:
    """An image's blobs: the layer (a file in a work directory), config and manifest."""

    layer: Path
    layer_digest: str
    layer_size: int
    config: bytes
    manifest: bytes

    @property
    def manifest_digest(self) -> str:
        return _digest(self.manifest)

    @property
    def config_digest(self) -> str:
        return _digest(self.config)

    def descriptor(self, tag: str | None = None) -> dict[str, Any]:
        """The manifest's descriptor, for an index."""
        d: dict[str, Any] = {
            "mediaType": M.OCI_MANIFEST,
            "digest": self.manifest_digest,
            "size": len(self.manifest),
        }
        if tag:
            d["annotations"] = {REF_NAME: tag}
        return d

    def blobs(self) -> list[tuple[str, bytes | Path]]:
        return [
            (self.layer_digest, self.layer),
            (self.config_digest, self.config),
            (self.manifest_digest, self.manifest),
        ]


def _manifest(config: bytes, layer_media: str, digest: str, size: int) -> bytes:
    return _json(
        {
            "schemaVersion": 2,
            "mediaType": M.OCI_MANIFEST,
            "config": {"mediaType": M.OCI_CONFIG, "digest": _digest(config), "size": len(config)},
            "layers": [{"mediaType": layer_media, "digest": digest, "size": size}],
        }
    )


def _arch(img: SifImage, part: Any) -> str:
    if part.data_type == F.DataType.PARTITION:
        arch = F.ARCH_NAMES.get(part.partition().arch)
        if arch:
            return arch
    return img.primary_arch if img.primary_arch != "unknown" else "amd64"


def image_from_sif(sif: str | os.PathLike[str], work: Path, squashfs: bool = False) -> OciImage:
    """The OCI image of ``sif``, its layer written into ``work``; ``squashfs``: the layer is
    the image's squashfs as it is (an OCI-SIF's layer), else a gzip tar of its tree."""
    path = os.fspath(sif)
    with SifImage.open(path) as img:
        part = ocisif.rootfs(img)
        # An OCI-SIF carries its config: the original, not one guessed from metadata
        # (which an Apptainer-made OCI-SIF does not have).
        own = ocisif.read_image(img).config if ocisif.is_ocisif(img) else None
        arch, created = _arch(img, part), img.header.created_at
        layer = work / "layer"
        if squashfs:
            h = hashlib.sha256()
            with open(layer, "wb") as out:
                for chunk in img.iter_data(part):
                    h.update(chunk)
                    out.write(chunk)
            digest = diff_id = "sha256:" + h.hexdigest()
            size, media = part.size, ocisif.SQUASHFS_LAYER
        else:
            log.verbose(f"writing the layer of {path}")
            with SquashfsTree(path, part.offset) as tree, open(layer, "wb") as out:
                d = write_layer(tree.walk(), tree.chunks, out)
            digest, diff_id, size, media = d.digest, d.diff_id, d.size, TAR_GZIP_LAYER
    if own is not None:
        config = _json(ociconfig.relayered(own, diff_id))
    else:
        files = SquashfsFiles(path, part.offset)
        try:
            config = _json(ociconfig.image_config(files, arch, created, diff_id))
        finally:
            files.close()
    return OciImage(layer, digest, size, config, _manifest(config, media, digest, size))


@contextmanager
def exported(sif: str | os.PathLike[str], squashfs: bool = False) -> Iterator[OciImage]:
    """:func:`image_from_sif` in a private work directory removed afterwards."""
    tmp_root = config.get("SIFPY_TMPDIR")
    with tempfile.TemporaryDirectory(prefix="sifpy-export-", dir=tmp_root) as work:
        yield image_from_sif(sif, Path(work), squashfs)


# --- destinations -----------------------------------------------------------------------


def parse_destination(text: str) -> tuple[str, Path, str]:
    """``oci:DIR[:tag]`` or ``oci-archive:FILE[:tag]`` -> (transport, path, tag)."""
    transport, sep, rest = text.partition(":")
    if not sep or transport not in ("oci", "oci-archive") or not rest:
        raise UsageError(
            f"can't export to {text}: unknown destination",
            hint="oci:DIR[:tag] or oci-archive:FILE.tar[:tag]",
        )
    path, sep, tag = rest.rpartition(":")
    if not sep or "/" in tag or not path:
        path, tag = rest, DEFAULT_TAG
    if not tag:
        raise UsageError(f"can't export to {text}: empty tag")
    return transport, Path(path), tag


def _index(old: dict[str, Any] | None, image: OciImage, tag: str) -> bytes:
    """index.json: the manifests already there, less any that had this tag, plus ours."""
    kept = []
    for m in (old or {}).get("manifests") or []:
        if isinstance(m, dict) and (m.get("annotations") or {}).get(REF_NAME) != tag:
            kept.append(m)
    doc = {
        "schemaVersion": 2,
        "mediaType": M.OCI_INDEX,
        "manifests": [*kept, image.descriptor(tag)],
    }
    return _json(doc)


def write_layout(image: OciImage, directory: Path, tag: str) -> None:
    """Add ``image`` to the OCI image layout ``directory`` (made if missing) under ``tag``."""
    old = None
    index_path = directory / "index.json"
    if directory.exists():
        if not directory.is_dir():
            raise ImageError(f"can't export to {directory}: not a directory")
        if index_path.exists():
            try:
                old = json.loads(index_path.read_bytes())
            except ValueError as exc:
                raise ImageError(f"can't export to {directory}: bad index.json: {exc}") from None
        elif any(directory.iterdir()):
            raise ImageError(
                f"can't export to {directory}: not empty and not an OCI image layout",
                hint="name a new or empty directory",
            )
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    for digest, data in image.blobs():
        dest = blobs / digest.removeprefix("sha256:")
        if dest.exists() and dest.stat().st_size == _size(data):
            continue  # content-addressed: the same name is the same bytes
        tmp = dest.with_name(dest.name + ".tmp")
        if isinstance(data, Path):
            shutil.copyfile(data, tmp)
        else:
            tmp.write_bytes(data)
        tmp.replace(dest)
    (directory / "oci-layout").write_bytes(LAYOUT_FILE)
    tmp = index_path.with_name("index.json.tmp")
    tmp.write_bytes(_index(old if isinstance(old, dict) else None, image, tag))
    tmp.replace(index_path)


def _size(data: bytes | Path) -> int:
    return data.stat().st_size if isinstance(data, Path) else len(data)


def write_archive(image: OciImage, out: Path, tag: str) -> None:
    """``out``: a tar of an OCI image layout holding ``image`` as ``tag`` (skopeo's
    ``oci-archive:``), byte for byte the same for the same image."""
    from sifpy.sif.atomic import AtomicFile

    def member(name: str, size: int = 0, directory: bool = False) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
        ti.mode = 0o755 if directory else 0o644
        ti.size, ti.mtime = size, 0
        return ti

    with AtomicFile(out, 0o644) as af:
        with (
            os.fdopen(os.dup(af.fd), "wb") as f,
            tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar,
        ):
            tar.addfile(member("blobs/", directory=True))
            tar.addfile(member("blobs/sha256/", directory=True))
            for digest, data in sorted(image.blobs()):
                name = "blobs/sha256/" + digest.removeprefix("sha256:")
                if isinstance(data, Path):
                    with open(data, "rb") as src:
                        tar.addfile(member(name, _size(data)), src)
                else:
                    tar.addfile(member(name, len(data)), io.BytesIO(data))
            index = _index(None, image, tag)
            tar.addfile(member("index.json", len(index)), io.BytesIO(index))
            tar.addfile(member("oci-layout", len(LAYOUT_FILE)), io.BytesIO(LAYOUT_FILE))
        af.commit()


def export(sif: str | os.PathLike[str], destination: str) -> tuple[str, str]:
    """``sifpy export``: write ``sif`` to ``destination``; return (manifest digest, tag)."""
    transport, path, tag = parse_destination(destination)
    with exported(sif) as image:
        if transport == "oci":
            write_layout(image, path, tag)
        else:
            write_archive(image, path, tag)
        return image.manifest_digest, tag


def push(
    sif: str | os.PathLike[str],
    ref: Reference,
    options: ClientOptions | None = None,
    progress: Any = None,
    chunk: int | None = None,
) -> str:
    """``sifpy push IMG.sif docker://...``: upload the exported image; return its manifest
    digest. The uploads are the ones ``push oras://`` makes (:class:`sifpy.oci.oras.Pusher`:
    ``HEAD`` skips a blob the registry has, then ``POST`` and ``PUT``, or ``PATCH`` chunks
    for a large one), the manifest is ``PUT`` by tag last."""
    from sifpy.oci import oras
    from sifpy.oci.auth import lookup_credentials
    from sifpy.oci.registry import RegistryClient

    if ref.tag is None:
        raise UsageError(f"can't push to {ref}: a tag is required")
    with exported(sif) as image:
        creds = lookup_credentials(ref.registry)
        with RegistryClient(ref.registry, options, creds) as client:
            client.action = "push"
            pusher = oras.Pusher(client, ref.repository, chunk or oras.DEFAULT_CHUNK, ref.tag)
            bar = progress or oras.NoProgress()
            pusher.upload(oras.file_blob(image.layer, image.layer_digest, image.layer_size),
                          bar, "layer")  # fmt: skip
            pusher.upload(oras.bytes_blob(image.config), oras.NoProgress(), "config")
            raw = pusher.put_manifest(json.loads(image.manifest))
    if raw != image.manifest:  # the SDK re-serialises the manifest; both are compact JSON
        log.debug("the manifest sent differs in bytes from the exported one")
    return _digest(raw)


def write_ocisif(sif: str | os.PathLike[str], out: str | os.PathLike[str]) -> str:
    """The OCI-SIF ``out`` of the native SIF ``sif`` (its squashfs as the one layer);
    return the manifest's digest."""
    with exported(sif, squashfs=True) as image:
        index = _json(
            {"schemaVersion": 2, "mediaType": M.OCI_INDEX, "manifests": [image.descriptor()]}
        )
        blobs = [ocisif.Blob(d, data) for d, data in image.blobs()]
        ocisif.write(out, blobs, index)
        return image.manifest_digest

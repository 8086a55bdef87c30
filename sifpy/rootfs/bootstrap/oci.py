"""``Bootstrap: oci``, ``oci-archive`` and ``docker-archive``: images on local disk.

* ``oci``: an OCI image layout directory (image-spec ``image-layout.md``), ``From:
  dir[:tag]`` or ``From: dir@sha256:...``; without a tag the layout must hold one image.
* ``oci-archive``: a tar of such a layout (``skopeo copy ... oci-archive:x.tar``), ``From:
  x.tar[:tag]`` likewise (:func:`split_ref`: the path ends at the first colon).
* ``docker-archive``: a ``docker save`` tar (``manifest.json``: Config + Layers); Docker
  25+ tars are also OCI layouts and are read as such.

Archives are read in place: members are looked up by name and streamed, never extracted,
so member names can't write anything. Every blob is checked against its digest before
use. A multi-platform index picks the host's platform. Layers go through
:func:`sifpy.rootfs.unpack.apply_layers` (whiteouts, hostile entries); the image config
becomes the metadata (:func:`sifpy.rootfs.metadata.oci_config`) in the build.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tarfile
from collections.abc import Iterator
from typing import IO, Any, BinaryIO, cast

from sifpy.errors import BuildError
from sifpy.rootfs.bootstrap import Context, Result
from sifpy.rootfs.limits import Budget
from sifpy.rootfs.unpack import apply_layer
from sifpy.util import log, progress

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
_JSON_MAX = 16 << 20
REF_NAME = "org.opencontainers.image.ref.name"


class _Layout:
    """Blob access to a layout directory or a tar, by path relative to the layout root."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.tar: tarfile.TarFile | None = None
        self.members: dict[str, tarfile.TarInfo] = {}
        if not os.path.isdir(path):
            try:
                self.tar = tarfile.open(path, "r:*")  # noqa: SIM115 - closed by close()
            except (OSError, tarfile.TarError) as exc:
                raise BuildError(f"can't read archive {path}: {exc}") from exc
            for m in self.tar.getmembers():
                if m.isfile():
                    self.members[os.path.normpath(m.name).lstrip("/")] = m

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()

    def has(self, name: str) -> bool:
        if self.tar is not None:
            return os.path.normpath(name) in self.members
        return os.path.isfile(os.path.join(self.path, name))

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator[IO[bytes]]:
        norm = os.path.normpath(name)
        if norm.startswith("..") or os.path.isabs(norm):
            raise BuildError(f"can't read image: bad blob path {name!r}")
        if self.tar is None:
            with open(os.path.join(self.path, norm), "rb") as f:
                yield f
            return
        member = self.members.get(norm)
        stream = self.tar.extractfile(member) if member is not None else None
        if stream is None:
            raise BuildError(f"can't read image {self.path}: {name} is missing")
        with stream:
            yield stream

    def json(self, name: str, digest: str | None = None) -> Any:
        with self.open(name) as f:
            data = f.read(_JSON_MAX + 1)
        if len(data) > _JSON_MAX:
            raise BuildError(f"can't read image: {name} is too large")
        if digest is not None and "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise BuildError(f"can't read image: {name} does not match its digest {digest}")
        try:
            return json.loads(data)
        except ValueError as exc:
            raise BuildError(f"can't read image: {name}: invalid JSON: {exc}") from exc

    def verify(self, name: str, digest: str) -> None:
        h = hashlib.sha256()
        with self.open(name) as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        if "sha256:" + h.hexdigest() != digest:
            raise BuildError(f"can't use layer {name}: it does not match its digest {digest}")


def _blob(digest: object) -> str:
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise BuildError(f"can't read image: unsupported or invalid digest {digest!r}")
    return "blobs/sha256/" + digest.split(":", 1)[1]


def split_ref(source: str) -> tuple[str, str | None, str | None]:
    """``path[:tag]`` or ``path@sha256:...`` -> (path, tag, digest).

    As containers/image's local transports (``oci:``, ``oci-archive:``,
    ``docker-archive:``) read a reference, the path ends at the *first* colon:
    ``img.tar:v2`` is the archive ``img.tar``, tag ``v2`` (so a path holding a colon can't
    be named, there as here). ``@sha256:...`` names a manifest by digest instead.
    """
    path, at, digest = source.rpartition("@")
    if at and digest.startswith("sha256:") and ":" not in path:
        return path, None, digest
    path, _, tag = source.partition(":")
    return path, tag or None, None


def _platform_ok(desc: dict[str, Any]) -> bool:
    from sifpy.rootfs.metadata import host_arch

    plat = desc.get("platform")
    if not isinstance(plat, dict):
        return True
    return plat.get("os", "linux") == "linux" and plat.get("architecture") == host_arch()


def _pick(layout: _Layout, tag: str | None, digest: str | None) -> dict[str, Any]:
    """The image manifest named by tag/digest (descending into indexes)."""
    index = layout.json("index.json")
    manifests = [m for m in index.get("manifests", []) if isinstance(m, dict)]
    if digest is not None:
        found = [m for m in manifests if m.get("digest") == digest] or [
            {"digest": digest, "mediaType": ""}
        ]
    elif tag is not None:
        found = [m for m in manifests if (m.get("annotations") or {}).get(REF_NAME) == tag]
        if not found:
            raise BuildError(f"can't find tag {tag} in {layout.path}")
    else:
        found = manifests
    if len(found) != 1:
        raise BuildError(
            f"can't choose an image in {layout.path}: it holds {len(found)}",
            hint="name one with 'From: path:tag' or 'From: path@sha256:...'",
        )
    desc = found[0]
    for _ in range(4):  # index -> manifest, with a bound on nesting
        doc = layout.json(_blob(desc.get("digest")), desc.get("digest"))
        if doc.get("mediaType") in _INDEX_TYPES or ("manifests" in doc and "layers" not in doc):
            subs = [m for m in doc.get("manifests", []) if isinstance(m, dict) and _platform_ok(m)]
            if not subs:
                raise BuildError(f"can't find an image for this platform in {layout.path}")
            desc = subs[0]
            continue
        return dict(doc)
    raise BuildError(f"can't read image {layout.path}: indexes nested too deeply")


def _from_oci(layout: _Layout, tag: str | None, digest: str | None, rootfs: str) -> Result:
    manifest = _pick(layout, tag, digest)
    config_desc = manifest.get("config") or {}
    config = layout.json(_blob(config_desc.get("digest")), config_desc.get("digest"))
    layers = manifest.get("layers") or []
    budget = Budget(rootfs)  # all layers together
    with progress.step(f"applying {len(layers)} layers from {layout.path}") as bar:
        for i, desc in enumerate(layers, 1):
            name = _blob(desc.get("digest"))
            layout.verify(name, desc["digest"])
            log.verbose(f"layer {i}/{len(layers)}: {desc['digest']}")
            with layout.open(name) as f:
                apply_layer(rootfs, cast(BinaryIO, f), budget=budget)
            bar.update(i, len(layers))
    labels = {}
    if isinstance(config_desc.get("digest"), str):
        labels["org.opencontainers.image.base.digest"] = config_desc["digest"]
    return Result(config=config if isinstance(config, dict) else {}, labels=labels)


def _from_docker(layout: _Layout, rootfs: str, ref: str | None = None) -> Result:
    entries = layout.json("manifest.json")
    if not isinstance(entries, list) or not entries or not isinstance(entries[0], dict):
        raise BuildError(f"can't read docker archive {layout.path}: bad manifest.json")
    entry = entries[0]
    if ref is not None:
        # containers/image's docker-archive: path:name:tag (a RepoTags entry) or path:@N.
        if ref.startswith("@") and ref[1:].isdigit() and int(ref[1:]) < len(entries):
            entry = entries[int(ref[1:])]
        else:
            found = [e for e in entries if isinstance(e, dict) and ref in (e.get("RepoTags") or [])]
            if not found:
                raise BuildError(f"can't find {ref} in {layout.path}")
            entry = found[0]
    elif len(entries) > 1:
        log.warn(f"{layout.path} holds {len(entries)} images; using the first")
    config = layout.json(str(entry.get("Config", "")))
    layers = [str(x) for x in entry.get("Layers") or []]
    budget = Budget(rootfs)  # all layers together
    with progress.step(f"applying {len(layers)} layers from {layout.path}") as bar:
        for i, name in enumerate(layers, 1):
            with layout.open(name) as f:
                apply_layer(rootfs, cast(BinaryIO, f), budget=budget)
            bar.update(i, len(layers))
    labels = {}
    tags = entry.get("RepoTags") or []
    if tags and isinstance(tags[0], str):
        labels["org.opencontainers.image.base.name"] = tags[0]
    return Result(config=config if isinstance(config, dict) else {}, labels=labels)


def bootstrap(ctx: Context) -> Result:
    """Fill ``ctx.rootfs`` from the layout or archive named by ``From:``."""
    agent = (ctx.stage.bootstrap or "").lower()
    source = ctx.require("from")
    path, tag, digest = split_ref(source)
    if not os.path.exists(path):
        raise BuildError(f"can't bootstrap from {agent}: {path}: no such file or directory")
    layout = _Layout(path)
    try:
        if layout.has("index.json") and (
            agent != "docker-archive" or not layout.has("manifest.json")
        ):
            return _from_oci(layout, tag, digest, ctx.rootfs)
        if agent == "docker-archive" and layout.has("manifest.json"):
            if digest is not None:
                raise BuildError(f"can't bootstrap from {agent}: {source}: no digest references")
            return _from_docker(layout, ctx.rootfs, tag)
        raise BuildError(f"can't bootstrap from {agent}: {path} is not an image layout or archive")
    finally:
        layout.close()

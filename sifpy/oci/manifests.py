"""Manifests and indexes as a registry serves them: the records, and the checks that a
document is one well-formed image manifest or index (and which entry is for a platform)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from sifpy.errors import RegistryError
from sifpy.oci import media as M
from sifpy.oci.reference import Platform, Reference


@dataclass(frozen=True)
class Manifest:
    """A manifest or index as received: raw bytes, their digest, media type, parsed JSON."""

    media_type: str
    digest: str
    raw: bytes
    data: dict[str, Any]


@dataclass(frozen=True)
class Image:
    """An image resolved to one platform: its manifest, config and layers."""

    reference: Reference
    manifest: Manifest
    config: M.Descriptor
    config_raw: bytes
    layers: tuple[M.Descriptor, ...]
    index_digest: str | None = None

    @property
    def digest(self) -> str:
        """The digest of the platform's image manifest (what a pull is pinned to)."""
        return self.manifest.digest

    @property
    def config_json(self) -> dict[str, Any]:
        data = json.loads(self.config_raw)
        return data if isinstance(data, dict) else {}


def sha256_hex(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def json_object(raw: bytes, what: str) -> dict[str, Any]:
    """A registry's JSON object (manifest, index, image config), or RegistryError."""
    try:
        data = json.loads(raw)
    except ValueError:
        raise RegistryError(f"{what}: not JSON") from None
    if not isinstance(data, dict):
        raise RegistryError(f"{what}: not a JSON object")
    return data


def parse_manifest(raw: bytes, digest: str, content_type: str, what: str) -> Manifest:
    data = json_object(raw, f"can't use {what}")
    ctype = content_type.split(";")[0].strip()
    media_type = data.get("mediaType")
    if data.get("schemaVersion") == 1 or ctype in M.SCHEMA1_TYPES:
        raise RegistryError(
            f"can't use {what}: Docker schema 1 manifests are not supported",
            "schema 1 was deprecated in 2017; push the image again with a current tool",
        )
    if data.get("schemaVersion") != 2:
        raise RegistryError(f"can't use {what}: unknown schemaVersion")
    if "manifests" in data and ("layers" in data or "config" in data):
        # Ambiguous documents (CVE-2021-41190): both an index and a manifest.
        raise RegistryError(f"can't use {what}: ambiguous manifest (index and image)")
    if media_type is None:
        media_type = ctype if ctype in M.INDEX_TYPES | M.IMAGE_TYPES else None
        if media_type is None:
            media_type = M.OCI_INDEX if "manifests" in data else M.OCI_MANIFEST
    if not isinstance(media_type, str) or media_type not in M.INDEX_TYPES | M.IMAGE_TYPES:
        raise RegistryError(f"can't use {what}: unsupported media type {media_type!r}")
    if ctype in M.INDEX_TYPES | M.IMAGE_TYPES and ctype != media_type:
        raise RegistryError(
            f"can't use {what}: Content-Type {ctype} disagrees with mediaType {media_type}"
        )
    if (media_type in M.INDEX_TYPES) != ("manifests" in data):
        raise RegistryError(f"can't use {what}: {media_type} without the matching fields")
    return Manifest(media_type, digest, raw, data)


def select_platform(index: Manifest, platform: Platform, name: str) -> M.Descriptor:
    entries = index.data.get("manifests")
    if not isinstance(entries, list):
        raise RegistryError(f"can't use index of {name}: 'manifests' is not a list")
    seen: list[str] = []
    for i, obj in enumerate(entries[: M.LAYERS_MAX]):
        desc = M.Descriptor.from_json(obj, f"index entry {i}")
        p = desc.platform or {}
        os_, arch, variant = p.get("os"), p.get("architecture"), p.get("variant")
        if not isinstance(os_, str) or not isinstance(arch, str):
            continue
        seen.append(f"{os_}/{arch}" + (f"/{variant}" if variant else ""))
        if platform.matches(os_, arch, variant if isinstance(variant, str) else None):
            return desc
    raise RegistryError(
        f"can't pull {name}: no image for {platform}",
        f"available: {', '.join(s for s in seen if s != 'unknown/unknown') or 'none'}; "
        "choose one with --arch or --platform",
    )

"""Media types and descriptors of the OCI image spec and Docker's manifest formats.

Declarations only (image-spec ``media-types.md``, ``descriptor.md``; Docker's
"Image Manifest V2, Schema 2"). A descriptor's digest is validated and its size must be a
non-negative integer before anything else looks at it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sifpy.errors import RegistryError, UsageError
from sifpy.oci.reference import validate_digest

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"

INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
IMAGE_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
SCHEMA1_TYPES = frozenset({DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED})
# Ask for schema 1 too, so that a registry with only schema 1 answers with it and we can
# say so clearly, instead of a confusing "manifest unknown".
ACCEPT = ", ".join([OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST, DOCKER_SCHEMA1_SIGNED])

OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
LAYER_TYPES = frozenset(
    {
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        # Non-distributable ("foreign") layers: fetched from the registry only, their
        # `urls` are never followed (CVE-2020-15157).
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    }
)

MANIFEST_MAX = 4 << 20  # containers/image iolimits: manifests and indexes
CONFIG_MAX = 4 << 20
TOKEN_MAX = 1 << 20
ERROR_BODY_MAX = 1 << 20
LAYERS_MAX = 1000


@dataclass(frozen=True)
class Descriptor:
    """A content descriptor: media type, validated digest, size, optional platform."""

    media_type: str
    digest: str
    size: int
    urls: tuple[str, ...] = ()
    platform: dict[str, Any] | None = None
    annotations: dict[str, Any] | None = None

    @classmethod
    def from_json(cls, obj: object, what: str) -> Descriptor:
        """Validate and build a descriptor from a manifest's JSON (untrusted)."""
        if not isinstance(obj, dict):
            raise RegistryError(f"invalid manifest: {what} is not an object")
        digest, size, media_type = obj.get("digest"), obj.get("size"), obj.get("mediaType", "")
        try:
            validate_digest(digest)  # type: ignore[arg-type]
        except UsageError as exc:
            raise RegistryError(f"invalid manifest: {what}: {exc.message}") from exc
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise RegistryError(f"invalid manifest: {what}: size must be a non-negative integer")
        if not isinstance(media_type, str):
            raise RegistryError(f"invalid manifest: {what}: mediaType is not a string")
        urls = obj.get("urls") or []
        platform = obj.get("platform")
        annotations = obj.get("annotations")
        return cls(
            media_type=media_type,
            digest=digest,  # type: ignore[arg-type]
            size=size,
            urls=tuple(u for u in urls if isinstance(u, str)) if isinstance(urls, list) else (),
            platform=platform if isinstance(platform, dict) else None,
            annotations=annotations if isinstance(annotations, dict) else None,
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest}
        out["size"] = self.size
        return out

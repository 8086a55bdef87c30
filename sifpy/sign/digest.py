"""Integrity metadata: the digests a modern SIF signature covers, and their JSON form.

Follows the reference's ``pkg/integrity`` (sylabs/sif metadata.go, digest.go) byte for byte;
https://github.com/sylabs/sif/blob/main/pkg/integrity/metadata.go:

* header digest = H(launch script[32] | magic[10] | version[3] | UUID[16]) (sif.go
  ``GetHeaderIntegrityReader``); arch, times and table geometry are not covered;
* descriptor digest = H(DataType i32 | Used u8 | relative ID u32 | LinkedID u32 | Size i64 |
  CreatedAt i64 | UID i64 | GID i64 | Name[128] | Extra[384]) (descriptor.go
  ``GetIntegrityReader``); group, absolute ID, offset, padding and ModifiedAt are not covered,
  so objects can move;
* object digest = H(the object's bytes at its current offset and size).

The JSON is Go's compact ``encoding/json`` of ``imageMetadata``, field order fixed:
``{"version":1,"header":{"digest":"sha256:.."},"objects":[{"relativeId":0,...}]}``.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sifpy.errors import SignatureError
from sifpy.sif.image import Descriptor, SifImage

# digest.go supportedDigestAlgorithms: no MD5 or SHA-1 (CVE-2022-39237), no BLAKE2.
DIGEST_ALGORITHMS: dict[str, Callable[[], Any]] = {
    "sha224": hashlib.sha224,
    "sha256": hashlib.sha256,
    "sha384": hashlib.sha384,
    "sha512": hashlib.sha512,
    "sha512_224": lambda: hashlib.new("sha512_224"),
    "sha512_256": lambda: hashlib.new("sha512_256"),
}
DIGEST_SIZES = {"sha224": 28, "sha256": 32, "sha384": 48, "sha512": 64}
DIGEST_SIZES |= {"sha512_224": 28, "sha512_256": 32}
DEFAULT_DIGEST = "sha256"
METADATA_VERSION = 1

# descriptor.go GetIntegrityReader: the covered fields, packed little-endian (557 bytes).
_DESCR_INTEGRITY = struct.Struct("<iBIIqqqq128s384s")
_READ_CHUNK = 4 << 20


class MetadataError(SignatureError):
    """The signed integrity metadata is malformed or uses a refused algorithm."""


def new_hash(alg: str) -> Any:
    """A hashlib object for an allowed digest algorithm name; refuses anything else."""
    try:
        return DIGEST_ALGORITHMS[alg]()
    except KeyError:
        raise MetadataError(
            f"digest algorithm {alg!r} is not allowed",
            hint="allowed: " + ", ".join(DIGEST_ALGORITHMS),
        ) from None


def header_integrity_bytes(img: SifImage) -> bytes:
    """The 61 header bytes the header digest covers."""
    h = img.header
    return h.launch_script + h.magic + h.version + h.id


def descriptor_integrity_bytes(d: Descriptor, relative_id: int) -> bytes:
    """The 557 descriptor bytes a descriptor digest covers, with the group-relative ID."""
    r = d.raw
    return _DESCR_INTEGRITY.pack(
        r.data_type, r.used, relative_id, r.linked_id, r.size, r.created_at, r.uid, r.gid,
        r.name, r.extra,
    )  # fmt: skip


def object_digest(img: SifImage, d: Descriptor, alg: str) -> bytes:
    """Hash an object's data in place, streaming through one reused buffer."""
    return objects_digest(img, [d], alg)


def _hash(alg: str, data: bytes) -> bytes:
    h = new_hash(alg)
    h.update(data)
    out: bytes = h.digest()
    return out


@dataclass(frozen=True)
class Digest:
    """An ``alg:hex`` digest from the metadata."""

    alg: str
    value: bytes

    def __str__(self) -> str:
        return f"{self.alg}:{self.value.hex()}"

    @classmethod
    def parse(cls, text: object) -> Digest:
        """Parse ``alg:hex``; refuse unknown algorithms and wrong lengths (errDigestMalformed)."""
        if not isinstance(text, str) or text.count(":") != 1:
            raise MetadataError(f"malformed digest: {text!r}")
        alg, hexval = text.split(":")
        if alg not in DIGEST_ALGORITHMS:
            raise MetadataError(
                f"digest algorithm {alg!r} is not allowed",
                hint="the image was signed with a weak or unknown hash; re-sign it",
            )
        try:
            value = bytes.fromhex(hexval)
        except ValueError:
            raise MetadataError(f"malformed digest: {text!r}") from None
        if len(value) != DIGEST_SIZES[alg] or hexval != value.hex():
            raise MetadataError(f"malformed digest: {text!r}")
        return cls(alg, value)


@dataclass(frozen=True)
class ObjectMetadata:
    """One signed object: its ID relative to the group's lowest ID, and its two digests."""

    relative_id: int
    descriptor_digest: Digest
    object_digest: Digest


@dataclass(frozen=True)
class ImageMetadata:
    """The signed statement: header digest plus per-object digests (metadata.go)."""

    header: Digest
    objects: tuple[ObjectMetadata, ...]
    version: int = METADATA_VERSION

    def to_json(self) -> bytes:
        """Go ``json.Marshal`` output: compact, fixed field order, no trailing newline."""
        doc = {
            "version": self.version,
            "header": {"digest": str(self.header)},
            "objects": [
                {
                    "relativeId": o.relative_id,
                    "descriptorDigest": str(o.descriptor_digest),
                    "objectDigest": str(o.object_digest),
                }
                for o in self.objects
            ],
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ImageMetadata:
        """Parse verified plaintext strictly: known version, allowed digests, unique IDs."""
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise MetadataError(f"signed metadata is not JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise MetadataError("signed metadata is not a JSON object")
        if doc.get("version") != METADATA_VERSION or isinstance(doc.get("version"), bool):
            raise MetadataError(f"unknown signed metadata version: {doc.get('version')!r}")
        header = doc.get("header")
        objects = doc.get("objects")
        if not isinstance(header, dict) or not isinstance(objects, list):
            raise MetadataError("signed metadata lacks a header or an object list")
        out: list[ObjectMetadata] = []
        for o in objects:
            if not isinstance(o, dict):
                raise MetadataError("signed metadata: object entry is not a JSON object")
            rid = o.get("relativeId")
            if not isinstance(rid, int) or isinstance(rid, bool) or not 0 <= rid < 1 << 32:
                raise MetadataError(f"signed metadata: bad relativeId {rid!r}")
            if any(x.relative_id == rid for x in out):
                raise MetadataError(f"signed metadata: relativeId {rid} listed twice")
            out.append(
                ObjectMetadata(
                    rid,
                    Digest.parse(o.get("descriptorDigest")),
                    Digest.parse(o.get("objectDigest")),
                )
            )
        return cls(Digest.parse(header.get("digest")), tuple(out))


def group_min_id(img: SifImage, group_id: int) -> int:
    """The lowest object ID in a group: signed IDs are relative to it (getGroupMinObjectID)."""
    ids = [d.id for d in img.descriptors if d.group_id == group_id]
    if not ids:
        raise SignatureError(f"can't sign: object group {group_id} not found in {img.path}")
    return min(ids)


def image_metadata(
    img: SifImage, group_id: int, objects: Sequence[Descriptor], alg: str = DEFAULT_DIGEST
) -> ImageMetadata:
    """Compute the metadata a signer signs for ``objects`` (all in ``group_id``)."""
    min_id = group_min_id(img, group_id)
    entries = []
    for d in sorted(objects, key=lambda d: d.id):
        rid = d.id - min_id
        entries.append(
            ObjectMetadata(
                rid,
                Digest(alg, _hash(alg, descriptor_integrity_bytes(d, rid))),
                Digest(alg, object_digest(img, d, alg)),
            )
        )
    return ImageMetadata(Digest(alg, _hash(alg, header_integrity_bytes(img))), tuple(entries))


def header_matches(img: SifImage, d: Digest) -> bool:
    """Whether the image's header still has digest ``d``."""
    return _hash(d.alg, header_integrity_bytes(img)) == d.value


def descriptor_matches(d: Descriptor, relative_id: int, digest: Digest) -> bool:
    return _hash(digest.alg, descriptor_integrity_bytes(d, relative_id)) == digest.value


def object_matches(img: SifImage, d: Descriptor, digest: Digest) -> bool:
    return object_digest(img, d, digest.alg) == digest.value


# Legacy (SIFHASH) signatures name their digest by the descriptor's hashtype (sif HashType).
LEGACY_HASHTYPES = {1: "sha256", 2: "sha384", 3: "sha512"}


def objects_digest(img: SifImage, objects: Sequence[Descriptor], alg: str) -> bytes:
    """One digest over the concatenated data of ``objects`` (legacy group signatures)."""
    h = new_hash(alg)
    for d in objects:
        buf = bytearray(min(_READ_CHUNK, max(d.size, 1)))
        view = memoryview(buf)
        pos, end = d.offset, d.offset + d.size
        while pos < end:
            n = os.preadv(img.fd, [view[: min(len(buf), end - pos)]], pos)
            if n <= 0:
                raise SignatureError(f"can't read object {d.id}: file shrank while reading")
            h.update(view[:n])
            pos += n
    out: bytes = h.digest()
    return out

"""A client for the OCI distribution API v2 (distribution-spec ``spec.md``), on requests:
manifests and blobs, over the transport of :mod:`sifpy.oci.session`.

What it guarantees, and why:

* **Digests by raw bytes.** A manifest fetched by digest must hash to that digest; a blob
  is hashed while it streams to disk and must match both the descriptor's digest and size
  (spec "Pulling blobs": clients "SHOULD verify" the digest; we always do). The
  ``Docker-Content-Digest`` header is advisory and ignored. ``Accept-Encoding: identity``
  and ``decode_content=False`` keep the hashed bytes the registry's bytes.
* **Resume without splicing.** A blob download cut mid-way resumes with
  ``Range: bytes=N-``; only a ``206`` whose single ``Content-Range`` is exactly
  ``bytes N-(size-1)/(size|*)`` is appended. A ``200`` restarts the hash from byte 0;
  anything else restarts from 0 too. A digest mismatch after a resume retries once from 0.
* **Foreign layer** ``urls`` are never fetched (CVE-2020-15157).
* Bounded reads, retries, redirects, auth and TLS: :mod:`sifpy.oci.session`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import BinaryIO

import requests

from sifpy.errors import RegistryError
from sifpy.oci import media as M
from sifpy.oci.manifests import (
    Image,
    Manifest,
    json_object,
    parse_manifest,
    select_platform,
    sha256_hex,
)
from sifpy.oci.reference import Platform, Reference, validate_digest
from sifpy.oci.session import READ_ERRORS, Session, read_limited
from sifpy.util import log

# Small reads: what arrived before a connection reset is kept and the resume starts there.
CHUNK = 64 << 10


class RegistryClient(Session):
    """A distribution API v2 client for one registry: manifests and blobs (see
    :class:`~sifpy.oci.session.Session` for ``registry``, ``options`` and ``credentials``)."""

    # --- manifests ----------------------------------------------------------------------

    def _get_small(
        self, url: str, scope: str, headers: dict[str, str], limit: int, what: str
    ) -> tuple[bytes, str]:
        """A small body (manifest, config) in memory, at most ``limit`` bytes, and its
        Content-Type; a connection lost while reading it is retried like a failed request."""
        attempt = 0
        while True:
            resp = self._request(url, scope, headers)
            self.check(resp, what)
            try:
                return read_limited(resp, limit, what), resp.headers.get("Content-Type", "")
            except READ_ERRORS:
                if attempt >= self.options.retries:
                    raise RegistryError(f"can't fetch {what}: connection lost") from None
                self._wait(attempt)
                attempt += 1

    def get_manifest(self, repository: str, reference: str) -> Manifest:
        """Fetch a manifest or index by tag or digest; by digest, the bytes are checked."""
        by_digest = reference.startswith("sha256:") or ":" in reference
        if by_digest:
            validate_digest(reference)
        url = f"{self.base}/v2/{repository}/manifests/{reference}"
        what = f"manifest {self.registry}/{repository}:{reference}"
        scope = f"repository:{repository}:pull"
        headers = {"Accept": M.ACCEPT, "Accept-Encoding": "identity"}
        raw, content_type = self._get_small(url, scope, headers, M.MANIFEST_MAX, what)
        digest = sha256_hex(raw)
        if by_digest and digest != reference:
            raise RegistryError(
                f"can't use {what}: digest mismatch (got {digest})",
                "the registry or a proxy altered the manifest",
            )
        return parse_manifest(raw, digest, content_type, what)

    def resolve(self, ref: Reference, platform: Platform) -> Image:
        """Resolve ``ref`` to one image manifest for ``platform``, with its config."""
        top = self.get_manifest(ref.repository, ref.reference)
        manifest, index_digest = top, None
        if top.media_type in M.INDEX_TYPES:
            index_digest = top.digest
            chosen = select_platform(top, platform, str(ref))
            manifest = self.get_manifest(ref.repository, chosen.digest)
            if manifest.media_type not in M.IMAGE_TYPES:
                raise RegistryError(
                    f"can't pull {ref}: the index entry for {platform} is not an image manifest "
                    f"({manifest.media_type})",
                    "nested indexes are not supported",
                )
        config = M.Descriptor.from_json(manifest.data.get("config"), "config")
        layers_json = manifest.data.get("layers")
        if not isinstance(layers_json, list) or len(layers_json) > M.LAYERS_MAX:
            raise RegistryError(f"can't pull {ref}: invalid layer list in manifest")
        layers = tuple(
            M.Descriptor.from_json(obj, f"layer {i}") for i, obj in enumerate(layers_json)
        )
        for i, layer in enumerate(layers):
            if layer.media_type not in M.LAYER_TYPES:
                raise RegistryError(
                    f"can't pull {ref}: layer {i} has unsupported media type {layer.media_type!r}",
                    "this may be an artifact rather than a container image (try oras://)",
                )
        if config.size > M.CONFIG_MAX:
            raise RegistryError(f"can't pull {ref}: config larger than {M.CONFIG_MAX} bytes")
        config_raw = self.get_blob_bytes(ref.repository, config, M.CONFIG_MAX)
        cfg = json_object(config_raw, f"can't pull {ref}: image config")
        if index_digest is None and cfg.get("architecture") not in (None, platform.architecture):
            if platform.explicit:
                raise RegistryError(
                    f"can't pull {ref}: the image is for {cfg.get('os')}/"
                    f"{cfg.get('architecture')} only, not {platform}",
                    "pull it without --arch/--platform to get it for its own platform",
                )
            log.warn(
                f"{ref} is for {cfg.get('os')}/{cfg.get('architecture')}, not {platform}; "
                "pulling it anyway"
            )
        return Image(ref, manifest, config, config_raw, layers, index_digest)

    # --- blobs ----------------------------------------------------------------------

    def _blob_url(self, repository: str, digest: str) -> str:
        return f"{self.base}/v2/{repository}/blobs/{validate_digest(digest)}"

    def get_blob_bytes(self, repository: str, desc: M.Descriptor, limit: int) -> bytes:
        """A small blob (a config) in memory, size and digest checked."""
        url = self._blob_url(repository, desc.digest)
        what = f"blob {desc.digest}"
        scope = f"repository:{repository}:pull"
        headers = {"Accept-Encoding": "identity"}
        data, _ = self._get_small(url, scope, headers, min(limit, desc.size), what)
        if len(data) != desc.size or sha256_hex(data) != desc.digest:
            raise RegistryError(f"can't use {what}: digest mismatch (size or content)")
        return data

    def fetch_blob(
        self,
        repository: str,
        desc: M.Descriptor,
        out: BinaryIO,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Stream a blob into ``out`` (a seekable file at offset 0), verified while writing.

        ``progress`` gets the number of bytes held so far (it can go back to 0 on a
        restart). Raises RegistryError with "digest mismatch" if the bytes are wrong; the
        caller must then discard ``out``.
        """
        url = self._blob_url(repository, desc.digest)
        what = f"blob {desc.digest}"
        scope = f"repository:{repository}:pull"
        hasher = hashlib.sha256()
        got = 0
        resumes = 0
        restarted_after_mismatch = False

        def restart() -> None:
            nonlocal hasher, got
            out.seek(0)
            out.truncate()
            hasher = hashlib.sha256()
            got = 0
            if progress:
                progress(0)

        while True:
            headers = {"Accept-Encoding": "identity"}
            if got:
                headers["Range"] = f"bytes={got}-"
            resp = self._request(url, scope, headers)
            if resp.status_code == 404 and desc.urls:
                resp.close()
                raise RegistryError(
                    f"can't fetch {what}: a foreign layer not stored in the registry",
                    "foreign layer URLs are not followed (CVE-2020-15157)",
                )
            self.check(resp, what)
            if got:
                if resp.status_code == 200:
                    # Range ignored: the body is the whole blob. Start over from byte 0.
                    restart()
                elif not _content_range_ok(resp, got, desc.size):
                    log.verbose(f"{what}: unusable Content-Range, restarting from 0")
                    resp.close()
                    restart()
                    continue
            elif resp.status_code != 200:
                resp.close()
                raise RegistryError(f"can't fetch {what}: unexpected HTTP {resp.status_code}")
            try:
                for chunk in resp.raw.stream(CHUNK, decode_content=False):
                    if got + len(chunk) > desc.size:
                        raise RegistryError(
                            f"can't use {what}: digest mismatch (more than {desc.size} bytes)"
                        )
                    out.write(chunk)
                    hasher.update(chunk)
                    got += len(chunk)
                    if progress:
                        progress(got)
            except READ_ERRORS:
                resp.close()
                resumes += 1
                if resumes > self.options.retries:
                    raise RegistryError(
                        f"can't fetch {what}: connection lost {resumes} times"
                    ) from None
                log.verbose(f"{what}: connection lost at byte {got}, resuming")
                self._wait(0)
                continue
            resp.close()
            if got < desc.size:
                # A short body without an error: resume like a reset.
                resumes += 1
                if resumes > self.options.retries:
                    raise RegistryError(f"can't fetch {what}: body shorter than {desc.size}")
                continue
            actual = "sha256:" + hasher.hexdigest()
            if actual == desc.digest:
                out.flush()
                return
            if resumes and not restarted_after_mismatch:
                # Never repair a resumed blob: discard it and download once from 0.
                restarted_after_mismatch = True
                restart()
                continue
            raise RegistryError(
                f"can't use {what}: digest mismatch (got {actual})",
                "the registry or a proxy served wrong bytes; nothing was cached",
            )


def _content_range_ok(resp: requests.Response, offset: int, size: int) -> bool:
    """A 206 is usable only with one ``Content-Range: bytes offset-(size-1)/(size|*)``."""
    if resp.status_code != 206:
        return False
    values = resp.raw.headers.getlist("Content-Range") if resp.raw is not None else []
    if len(values) != 1:
        return False
    unit, _, spec = values[0].strip().partition(" ")
    rng, _, total = spec.partition("/")
    first, _, last = rng.partition("-")
    if unit != "bytes" or not first.isdigit() or not last.isdigit():
        return False
    if total != "*" and (not total.isdigit() or int(total) != size):
        return False
    return int(first) == offset and int(last) == size - 1

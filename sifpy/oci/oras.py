"""``oras://``: a SIF stored in an OCI registry as an artifact, as Apptainer does.

The manifest is an OCI image manifest whose config is an empty JSON object of media type
``application/vnd.sylabs.sif.config.v1+json`` and whose one layer is the SIF file,
``application/vnd.sylabs.sif.layer.v1.sif``, annotated with its file name
(``org.opencontainers.image.title``) — what Apptainer's ``push oras://`` writes and its
``pull oras://`` reads.

Uploads follow the distribution spec ("Pushing blobs"): ``HEAD`` skips a blob the
registry already has; otherwise ``POST /v2/<name>/blobs/uploads/`` opens a session and
either one ``PUT <location>?digest=`` carries the whole blob (at most one chunk) or
``PATCH`` requests carry chunks (``Content-Range: start-end``, each answered with the next
location) and a final empty ``PUT ?digest=`` closes it; the manifest is ``PUT`` by tag
last. A failed session is restarted from the beginning (at most twice). Credentials and
tokens come from :class:`~sifpy.oci.registry.RegistryClient` with the scope
``repository:<name>:push,pull``.

Pulling fetches the manifest (by tag or digest), checks it is a SIF artifact, and fetches
the SIF blob into the verified blob cache (sha256 checked while downloading), then copies
it to the output atomically: the result is byte-identical to what was pushed.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol
from urllib.parse import urljoin

from sifpy.errors import RegistryError, SifpyError, UsageError
from sifpy.oci import media as M
from sifpy.oci.auth import lookup_credentials
from sifpy.oci.cache import Cache, IndexEntry
from sifpy.oci.reference import Reference, _is_domain, parse_reference
from sifpy.oci.registry import ClientOptions, RegistryClient, redact, sha256_hex
from sifpy.util import log

SIF_CONFIG = "application/vnd.sylabs.sif.config.v1+json"
SIF_LAYER = "application/vnd.sylabs.sif.layer.v1.sif"
TITLE = "org.opencontainers.image.title"
EMPTY_CONFIG = b"{}"
DEFAULT_CHUNK = 32 << 20
UPLOAD_TRIES = 3
SIF_MAGIC_OFFSET = 32
SIF_MAGIC = b"SIF_MAGIC"


class Progress(Protocol):
    """What push and pull report; the CLI draws it."""

    def start(self, what: str, total: int) -> None: ...
    def update(self, done: int) -> None: ...
    def finish(self, skipped: bool) -> None: ...


class NoProgress:
    def start(self, what: str, total: int) -> None:
        pass

    def update(self, done: int) -> None:
        pass

    def finish(self, skipped: bool) -> None:
        pass


def parse_oras(text: str) -> Reference:
    """Parse ``oras://host[:port]/name[:tag][@digest]``; the registry host is required."""
    if not text.startswith("oras://"):
        raise UsageError(f"invalid ORAS reference: {text!r}", "expected oras://host/name:tag")
    rest = text[len("oras://") :]
    first, sep, _ = rest.partition("/")
    if not sep or not _is_domain(first):
        raise UsageError(
            f"invalid ORAS reference: {text!r}: no registry host",
            "name the registry: oras://host[:port]/name:tag",
        )
    return parse_reference("docker://" + rest)


def _is_sif(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(SIF_MAGIC_OFFSET)
        return f.read(len(SIF_MAGIC)) == SIF_MAGIC


def _file_digest(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return "sha256:" + h.hexdigest(), size


@dataclass(frozen=True)
class _Blob:
    digest: str
    size: int
    read: Callable[[int, int], bytes]  # (offset, length) -> bytes
    open: Callable[[], BinaryIO | bytes]  # the whole blob, fresh


def _file_blob(path: Path, digest: str, size: int) -> _Blob:
    def read(offset: int, length: int) -> bytes:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(length)

    def whole() -> BinaryIO:
        return open(path, "rb")

    return _Blob(digest, size, read, whole)


def _bytes_blob(data: bytes) -> _Blob:
    return _Blob(sha256_hex(data), len(data), lambda o, n: data[o : o + n], lambda: data)


class Pusher:
    """Blob and manifest uploads to one repository."""

    def __init__(self, client: RegistryClient, repository: str, chunk: int) -> None:
        if chunk <= 0:
            raise UsageError("chunk size must be positive")
        self.client = client
        self.repo = repository
        self.chunk = chunk
        self.scope = f"repository:{repository}:push,pull"
        self.api = f"{client.base}/v2/{repository}"

    def exists(self, blob: _Blob) -> bool:
        resp = self.client.call(
            "HEAD", f"{self.api}/blobs/{blob.digest}", self.scope, idempotent=True
        )
        resp.close()
        if resp.status_code == 200:
            return True
        if resp.status_code == 404:
            return False
        self.client.check(resp, f"blob {blob.digest}", ok=(200, 404), verb="push")
        return False

    def upload(self, blob: _Blob, progress: Progress, what: str) -> None:
        progress.start(what, blob.size)
        if self.exists(blob):
            log.verbose(f"{what}: {blob.digest} already in the registry")
            progress.finish(True)
            return
        for attempt in range(UPLOAD_TRIES):
            try:
                self._session(blob, progress)
                break
            except _Retry as exc:
                if attempt + 1 == UPLOAD_TRIES:
                    raise RegistryError(f"can't push {what}: {exc}") from None
                log.verbose(f"{what}: upload failed ({exc}), starting again")
                progress.update(0)
                time.sleep(0.5 * (attempt + 1))
        progress.finish(False)

    def _location(self, resp: Any, url: str) -> str:
        loc = resp.headers.get("Location")
        resp.close()
        if not loc:
            raise RegistryError(f"can't push: {redact(url)}: no Location in the answer")
        return str(urljoin(url, loc))

    def _send(self, method: str, url: str, what: str, ok: int, **kw: Any) -> Any:
        try:
            resp = self.client.call(method, url, self.scope, **kw)
        except RegistryError as exc:
            if "ConnectionError" in exc.message or "Timeout" in exc.message:
                raise _Retry(exc.message) from None
            raise
        if resp.status_code >= 500 or resp.status_code == 429:
            resp.close()
            raise _Retry(f"HTTP {resp.status_code} for {method}")
        self.client.check(resp, what, ok=(ok,), verb="push")
        return resp

    def _session(self, blob: _Blob, progress: Progress) -> None:
        what = f"blob {blob.digest}"
        resp = self._send("POST", f"{self.api}/blobs/uploads/", what, 202)
        loc = self._location(resp, f"{self.api}/blobs/uploads/")
        octet = {"Content-Type": "application/octet-stream"}
        if blob.size <= self.chunk:
            whole = blob.open

            def body() -> BinaryIO | bytes:
                return whole()

            resp = self._send(
                "PUT",
                _with_digest(loc, blob.digest),
                what,
                201,
                headers={**octet, "Content-Length": str(blob.size)},
                body=body,
            )
            resp.close()
            progress.update(blob.size)
            return
        offset = 0
        while offset < blob.size:
            data = blob.read(offset, min(self.chunk, blob.size - offset))
            if not data:
                raise RegistryError(f"can't push {what}: the file shrank while uploading")
            headers = {
                **octet,
                "Content-Length": str(len(data)),
                "Content-Range": f"{offset}-{offset + len(data) - 1}",
            }
            resp = self._send("PATCH", loc, what, 202, headers=headers, body=lambda d=data: d)
            loc = self._location(resp, loc)
            offset += len(data)
            progress.update(offset)
        resp = self._send(
            "PUT",
            _with_digest(loc, blob.digest),
            what,
            201,
            headers={"Content-Length": "0"},
            body=lambda: b"",
        )
        resp.close()

    def put_manifest(self, reference: str, raw: bytes, media_type: str) -> None:
        resp = self.client.call(
            "PUT",
            f"{self.api}/manifests/{reference}",
            self.scope,
            headers={"Content-Type": media_type},
            body=lambda: raw,
            idempotent=True,
        )
        self.client.check(resp, f"manifest {self.repo}:{reference}", ok=(201, 200), verb="push")
        resp.close()


class _Retry(Exception):
    """A transient upload failure: start the upload session again."""


def _with_digest(location: str, digest: str) -> str:
    return location + ("&" if "?" in location else "?") + "digest=" + digest


def sif_manifest(config: bytes, layer_digest: str, layer_size: int, title: str) -> bytes:
    """The OCI manifest of a SIF artifact, as Apptainer writes it."""
    doc = {
        "schemaVersion": 2,
        "mediaType": M.OCI_MANIFEST,
        "config": {"mediaType": SIF_CONFIG, "digest": sha256_hex(config), "size": len(config)},
        "layers": [
            {
                "mediaType": SIF_LAYER,
                "digest": layer_digest,
                "size": layer_size,
                "annotations": {TITLE: title},
            }
        ],
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def push(
    sif: str | os.PathLike[str],
    ref: Reference,
    *,
    options: ClientOptions | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    progress: Progress | None = None,
) -> str:
    """Push the SIF file ``sif`` to ``ref``; return the manifest's digest."""
    path = Path(sif)
    if not path.is_file():
        raise UsageError(f"can't push {path}: no such file")
    if not _is_sif(path):
        raise UsageError(f"can't push {path}: not a SIF image")
    if ref.tag is None:
        raise UsageError(f"can't push to {ref}: a tag is required")
    progress = progress or NoProgress()
    digest, size = _file_digest(path)
    creds = lookup_credentials(ref.registry)
    with RegistryClient(ref.registry, options, creds) as client:
        client.action = "push"
        pusher = Pusher(client, ref.repository, chunk_size)
        pusher.upload(_bytes_blob(EMPTY_CONFIG), NoProgress(), "config")
        pusher.upload(_file_blob(path, digest, size), progress, path.name)
        raw = sif_manifest(EMPTY_CONFIG, digest, size, path.name)
        pusher.put_manifest(ref.tag, raw, M.OCI_MANIFEST)
    return sha256_hex(raw)


def pull(
    ref: Reference,
    out: str | os.PathLike[str],
    *,
    options: ClientOptions | None = None,
    cache: Cache | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> str:
    """Pull the SIF artifact ``ref`` into ``out``; return the SIF blob's digest."""
    from sifpy.oci.cache import install_copy, output_path

    out_path = output_path(out, force)
    cache = cache or Cache()
    progress = progress or NoProgress()
    creds = lookup_credentials(ref.registry)
    with RegistryClient(ref.registry, options, creds) as client:
        manifest = client.get_manifest(ref.repository, ref.reference)
        layers = manifest.data.get("layers")
        if manifest.media_type not in M.IMAGE_TYPES or not isinstance(layers, list):
            raise RegistryError(f"can't pull oras://{ref}: not a SIF artifact")
        descs = [M.Descriptor.from_json(obj, f"layer {i}") for i, obj in enumerate(layers)]
        sifs = [d for d in descs if d.media_type == SIF_LAYER]
        if len(sifs) != 1:
            raise RegistryError(
                f"can't pull oras://{ref}: expected one {SIF_LAYER} layer, found {len(sifs)}",
                "this is not a SIF pushed with 'sifpy push' or 'apptainer push'",
            )
        desc = sifs[0]
        progress.start(desc.digest[7:19], desc.size)

        def fetch(f: BinaryIO) -> None:
            client.fetch_blob(ref.repository, desc, f, progress.update)

        blob, cached = cache.ensure_blob(desc.digest, desc.size, fetch)
        progress.finish(cached)
    if not _is_sif(blob):
        raise RegistryError(f"can't pull oras://{ref}: the artifact is not a SIF image")
    try:
        install_copy(blob, out_path)
    except OSError as exc:
        raise SifpyError(f"can't write {out_path}: {exc.strerror or exc}") from exc
    cache.record(
        IndexEntry(
            repository=f"{ref.registry}/{ref.repository}",
            tag=ref.tag or "",
            digest=manifest.digest,
            created=time.time(),
            size=desc.size,
            platform="sif",
        )
    )
    return desc.digest

"""A fault-injecting proxy in front of the real registry: resets, 5xx/429, wrong bytes,
ignored or wrong ranges, a huge manifest. sifpy recovers when it can and refuses clearly
when it must, never caching wrong bytes."""

from __future__ import annotations

import contextlib
import gzip
import http.client
import http.server
import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from integration.oci.conftest import Registry, SifpyEnv
from integration.oci.helpers import QuietHandler, sif_rootfs
from sifpy.errors import RegistryError
from sifpy.oci.registry import RegistryClient
from sifpy.oci.session import ClientOptions


@dataclass
class Faults:
    """What the proxy does; ``log`` records (method, path, Range, status) per request."""

    reset_blob: set[str] = field(default_factory=set)  # cut once, mid-body, with a RST
    statuses: dict[str, list[int]] = field(default_factory=dict)  # path part -> statuses first
    corrupt: set[str] = field(default_factory=set)  # digests whose bytes are altered
    range_mode: str = "pass"  # pass | ignore (answer 200) | wrong (206 from byte 0)
    huge_manifest: bool = False
    trailing: set[str] = field(default_factory=set)  # digests served with junk appended
    gzip_encoded: set[str] = field(default_factory=set)  # served Content-Encoding: gzip
    respaced_manifests: bool = False  # manifests re-serialised (same JSON, other bytes)
    redirect_loop: bool = False  # every blob GET answers 307 to itself
    log: list[tuple[str, str, str, int]] = field(default_factory=list)
    stamps: list[float] = field(default_factory=list)  # time.monotonic() of each log entry
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class Proxy:
    host: str
    faults: Faults


def _proxy_handler(upstream: str, faults: Faults) -> type[http.server.BaseHTTPRequestHandler]:
    up_host, up_port = upstream.rsplit(":", 1)

    class Handler(QuietHandler):
        def finish(self) -> None:
            with contextlib.suppress(OSError):
                super().finish()

        def do_HEAD(self) -> None:
            self.do_GET()

        def do_GET(self) -> None:
            path = self.path
            rng = self.headers.get("Range", "")
            with faults.lock:
                faults.stamps.append(time.monotonic())
                for part, queue in faults.statuses.items():
                    if part in path and queue:
                        status = queue.pop(0)
                        faults.log.append((self.command, path, rng, status))
                        extra = {"Retry-After": "1"} if status == 429 else {}
                        self.answer(status, extra, b'{"errors":[{"code":"INJECTED"}]}')
                        return
            if faults.redirect_loop and "/blobs/" in path:
                faults.log.append((self.command, path, rng, 307))
                self.answer(307, {"Location": f"http://{self.headers['Host']}{path}"}, b"")
                return
            if faults.huge_manifest and "/manifests/" in path:
                body = b'{"schemaVersion": 2, "pad": "' + b"x" * (5 << 20) + b'"}'
                faults.log.append((self.command, path, rng, 200))
                ctype = "application/vnd.oci.image.manifest.v1+json"
                self.answer(200, {"Content-Type": ctype}, body)
                return
            digest = path.rsplit("/", 1)[-1] if "/blobs/" in path else ""
            headers = {
                k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")
            }
            if rng and faults.range_mode in ("ignore", "wrong"):
                headers.pop("Range", None)
            conn = http.client.HTTPConnection(up_host, int(up_port), timeout=20)
            conn.request(self.command, path, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            status = resp.status
            out = {
                k: v
                for k, v in resp.getheaders()
                if k.lower() not in ("content-length", "transfer-encoding", "connection")
            }
            conn.close()
            if digest in faults.corrupt and body:
                body = bytes([body[0] ^ 0xFF]) + body[1:]
            if digest in faults.trailing and body and self.command == "GET":
                body += b"trailing junk after the blob"
            if digest in faults.gzip_encoded and body and self.command == "GET":
                body = gzip.compress(body)
                out["Content-Encoding"] = "gzip"
            if faults.respaced_manifests and "/manifests/" in path and body:
                body = json.dumps(json.loads(body), indent=7).encode()
            if rng and faults.range_mode == "wrong" and status == 200:
                # Claims the asked range but sends the blob from byte 0: must not be spliced.
                start = int(rng.split("=")[1].split("-")[0])
                status = 206
                out["Content-Range"] = f"bytes 0-{len(body) - 1}/{len(body)}"
                body = body[: len(body) - start]
            with faults.lock:
                cut = digest in faults.reset_blob and not rng and self.command == "GET"
                faults.reset_blob.discard(digest) if cut else None
                faults.log.append((self.command, path, rng, status))
            if cut:
                self.send_response(status)
                for k, v in out.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                # SO_LINGER 0: close with a TCP reset, a "connection reset by peer" mid-blob.
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                self.connection.close()
                self.close_connection = True
                return
            self.answer(status, out, body)

    return Handler


@pytest.fixture
def proxy(registry: Registry) -> Iterator[Proxy]:
    faults = Faults()
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), _proxy_handler(registry.host, faults)
    )
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield Proxy(f"127.0.0.1:{server.server_address[1]}", faults)
    finally:
        server.shutdown()
        server.server_close()


def layer_digest(registry: Registry, key: str = "test/plain:1") -> str:
    layout, tag = registry.layouts[key]
    index = json.loads((layout / "index.json").read_text())
    (m,) = [
        m
        for m in index["manifests"]
        if m["annotations"]["org.opencontainers.image.ref.name"] == tag
    ]
    manifest = json.loads((layout / "blobs/sha256" / m["digest"][7:]).read_text())
    digest: str = manifest["layers"][0]["digest"]
    return digest


def pull(sifpy: SifpyEnv, proxy: Proxy, out: Path, check: bool = True) -> str:
    proc = sifpy.run(
        "-v", "pull", "--insecure", out, f"docker://{proxy.host}/test/plain:1", check=check
    )
    return proc.stderr if check else f"rc={proc.returncode}\n{proc.stderr}"


def marker(out: Path, tmp_path: Path) -> str:
    return (sif_rootfs(out, tmp_path / "root") / "etc/marker").read_text()


def test_reset_mid_blob_is_resumed(
    registry: Registry, proxy: Proxy, sifpy: SifpyEnv, tmp_path: Path
) -> None:
    digest = layer_digest(registry)
    proxy.faults.reset_blob.add(digest)
    pull(sifpy, proxy, tmp_path / "a.sif")
    blob_requests = [e for e in proxy.faults.log if e[1].endswith(digest) and e[0] == "GET"]
    assert len(blob_requests) == 2
    assert blob_requests[0][2] == "" and blob_requests[1][2].startswith("bytes=")
    assert int(blob_requests[1][2][6:].rstrip("-")) > 0
    assert blob_requests[1][3] == 206
    assert marker(tmp_path / "a.sif", tmp_path) == "plain image\n"


@pytest.mark.parametrize("mode", ["ignore", "wrong"])
def test_unusable_range_answer_restarts_from_zero(
    registry: Registry, proxy: Proxy, sifpy: SifpyEnv, tmp_path: Path, mode: str
) -> None:
    digest = layer_digest(registry)
    proxy.faults.reset_blob.add(digest)
    proxy.faults.range_mode = mode
    log = pull(sifpy, proxy, tmp_path / "a.sif")
    assert marker(tmp_path / "a.sif", tmp_path) == "plain image\n"
    # What was streamed while downloading came from the voided bytes: packed again.
    assert "packing from the cache instead: the download restarted" in log, log
    gets = [e for e in proxy.faults.log if e[1].endswith(digest) and e[0] == "GET"]
    if mode == "wrong":
        assert len(gets) == 3 and gets[2][2] == ""  # discarded, then fetched from 0


def test_500_and_429_are_retried(
    registry: Registry, proxy: Proxy, sifpy: SifpyEnv, tmp_path: Path
) -> None:
    digest = layer_digest(registry)
    proxy.faults.statuses = {"/manifests/": [500, 503], digest: [429]}
    pull(sifpy, proxy, tmp_path / "a.sif")
    statuses = [e[3] for e in proxy.faults.log]
    assert statuses.count(500) == 1 and statuses.count(503) == 1 and statuses.count(429) == 1
    assert marker(tmp_path / "a.sif", tmp_path) == "plain image\n"


def test_persistent_500_fails_clearly(proxy: Proxy) -> None:
    # In-process with a short backoff: the CLI's default (5 retries, 0.5 s doubling) is slow.
    proxy.faults.statuses = {"/manifests/": [500] * 20}
    opts = ClientOptions(insecure=True, retries=2, backoff=0.01)
    with RegistryClient(proxy.host, opts) as client, pytest.raises(RegistryError, match="INJECTED"):
        client.get_manifest("test/plain", "1")
    assert [e[3] for e in proxy.faults.log] == [500, 500, 500]


def test_wrong_bytes_are_refused_and_not_cached(
    registry: Registry, proxy: Proxy, sifpy: SifpyEnv, tmp_path: Path
) -> None:
    digest = layer_digest(registry)
    proxy.faults.corrupt.add(digest)
    out = pull(sifpy, proxy, tmp_path / "a.sif", check=False)
    assert out.startswith("rc=1") and "digest mismatch" in out
    assert not (tmp_path / "a.sif").exists()
    blobs = sifpy.cache / "blobs/sha256"
    assert not (blobs / digest[7:]).exists()
    assert [p.name for p in blobs.iterdir() if p.name.startswith(".tmp")] == []


def test_huge_manifest_is_refused(proxy: Proxy, sifpy: SifpyEnv, tmp_path: Path) -> None:
    proxy.faults.huge_manifest = True
    out = pull(sifpy, proxy, tmp_path / "a.sif", check=False)
    assert out.startswith("rc=1") and "limit" in out
    assert not (tmp_path / "a.sif").exists()


def manifest_digest(registry: Registry, key: str = "test/plain:1") -> str:
    layout, tag = registry.layouts[key]
    index = json.loads((layout / "index.json").read_text())
    (m,) = [
        m
        for m in index["manifests"]
        if m["annotations"]["org.opencontainers.image.ref.name"] == tag
    ]
    return str(m["digest"])


def _nothing_cached(sifpy: SifpyEnv, digest: str) -> None:
    blobs = sifpy.cache / "blobs/sha256"
    assert not (blobs / digest[7:]).exists()
    assert (
        not blobs.is_dir() or [p.name for p in blobs.iterdir() if p.name.startswith(".tmp")] == []
    )


def test_trailing_bytes_after_the_blob_are_refused(
    registry: Registry, proxy: Proxy, sifpy: SifpyEnv, tmp_path: Path
) -> None:
    # umoci's descriptor size hardening: bytes beyond the descriptor's size are an error,
    # even though the first ``size`` bytes hash right.
    digest = layer_digest(registry)
    proxy.faults.trailing.add(digest)
    out = pull(sifpy, proxy, tmp_path / "a.sif", check=False)
    assert out.startswith("rc=1") and "digest mismatch (more than" in out, out
    assert not (tmp_path / "a.sif").exists()
    _nothing_cached(sifpy, digest)


def test_content_encoding_is_not_decoded(
    registry: Registry, proxy: Proxy, sifpy: SifpyEnv, tmp_path: Path
) -> None:
    # The bytes hashed are the bytes on the wire (Accept-Encoding: identity, no decoding):
    # a gzip Content-Encoding over the blob is wrong bytes, not a blob to inflate.
    digest = layer_digest(registry)
    proxy.faults.gzip_encoded.add(digest)
    out = pull(sifpy, proxy, tmp_path / "a.sif", check=False)
    assert out.startswith("rc=1") and "digest mismatch" in out, out
    assert not (tmp_path / "a.sif").exists()
    _nothing_cached(sifpy, digest)


def test_reserialised_manifest_fails_a_pull_by_digest(
    registry: Registry, proxy: Proxy, sifpy: SifpyEnv, tmp_path: Path
) -> None:
    # The digest is over the raw bytes, not over the JSON they parse to.
    proxy.faults.respaced_manifests = True
    ref = f"docker://{proxy.host}/test/plain@{manifest_digest(registry)}"
    proc = sifpy.run("pull", "--insecure", tmp_path / "a.sif", ref, check=False)
    assert proc.returncode == 1 and "digest mismatch" in proc.stderr, proc.stderr
    assert not (tmp_path / "a.sif").exists()
    # By tag there is no digest to hold it to: the same bytes pull fine.
    pull(sifpy, proxy, tmp_path / "b.sif")


def test_redirect_loop_is_bounded(proxy: Proxy, registry: Registry) -> None:
    from sifpy.oci.media import Descriptor

    layout, _ = registry.layouts["test/plain:1"]
    manifest = json.loads((layout / "blobs/sha256" / manifest_digest(registry)[7:]).read_text())
    config = Descriptor.from_json(manifest["config"], "config")
    proxy.faults.redirect_loop = True
    opts = ClientOptions(insecure=True, retries=0, backoff=0.01)
    with (
        RegistryClient(proxy.host, opts) as client,
        pytest.raises(RegistryError, match="more than 10 redirects"),
    ):
        client.get_blob_bytes("test/plain", config, 1 << 20)
    assert [e[3] for e in proxy.faults.log].count(307) == 11


def test_retry_after_is_honoured(proxy: Proxy) -> None:
    proxy.faults.statuses = {"/manifests/": [429]}  # answered with Retry-After: 1
    opts = ClientOptions(insecure=True, retries=2, backoff=0.01)
    with RegistryClient(proxy.host, opts) as client:
        client.get_manifest("test/plain", "1")
    statuses = [e[3] for e in proxy.faults.log]
    assert statuses[:2] == [429, 200], statuses
    assert proxy.faults.stamps[1] - proxy.faults.stamps[0] >= 0.9

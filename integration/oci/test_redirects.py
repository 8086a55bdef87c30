"""Redirects and foreign layers against the real registry, with credentials in play.

A front proxy (127.0.0.1) forwards to a registry with htpasswd basic auth or the Docker
token flow and answers authenticated blob GETs with a 307: to a "CDN" on another host
(127.0.0.2, or 127.0.0.1 on another port: another origin either way) or to a path on its
own origin. The CDN serves blobs from the registry's storage and records every request's
headers. Shown: ``Authorization`` reaches the registry's origin only (redirects to it keep
it; redirects elsewhere drop it; a 401 from the CDN is not answered with credentials);
foreign layer ``urls`` are never fetched; and no secret (password, its base64, bearer
token, a signed URL's query string) appears in ``-v --debug`` output.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import http.client
import http.server
import io
import json
import socket
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from integration.oci.conftest import Registry, SifpyEnv, start_registry
from integration.oci.helpers import QuietHandler, sif_rootfs
from integration.oci.test_auth import PASSWORD, USER, make_ca, make_token_server, pem
from tests.conftest import need_tool

SIGNATURE = "X-Amz-Signature=cdn-secret-5ig"
CDN_HOST = "127.0.0.2"  # loopback, but another host name than the registry's 127.0.0.1


@dataclass
class Seen:
    """Requests a test server received: (method, path, Authorization or None)."""

    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, method: str, path: str, auth: str | None) -> None:
        with self.lock:
            self.requests.append((method, path, auth))


@dataclass
class Server:
    host: str
    seen: Seen
    server: http.server.ThreadingHTTPServer
    mode: dict[str, str] = field(default_factory=dict)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _serve(bind: str, handler: type[http.server.BaseHTTPRequestHandler], server: Server) -> None:
    httpd = http.server.ThreadingHTTPServer((bind, 0), handler)
    httpd.daemon_threads = True
    server.server = httpd
    server.host = f"{bind}:{httpd.server_address[1]}"
    threading.Thread(target=httpd.serve_forever, daemon=True).start()


def start_cdn(storage: Path, bind: str, extra: dict[str, bytes]) -> Server:
    """Serves ``/blob/<digest>`` from the registry's storage (or ``extra``); ``mode["cdn"]
    == "401"`` makes it ask for basic auth instead."""
    srv = Server("", Seen(), None)  # type: ignore[arg-type]

    class Handler(QuietHandler):
        def do_GET(self) -> None:
            srv.seen.add(self.command, self.path, self.headers.get("Authorization"))
            if srv.mode.get("cdn") == "401":
                self.answer(401, {"WWW-Authenticate": 'Basic realm="cdn"'}, b"")
                return
            digest = self.path.split("?")[0].rsplit("/", 1)[-1]
            hexd = digest.removeprefix("sha256:")
            data = storage / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"
            if digest in extra:
                self.answer(200, {}, extra[digest])
            elif len(hexd) == 64 and data.is_file():
                self.answer(200, {"Content-Type": "application/octet-stream"}, data.read_bytes())
            else:
                self.answer(404, {}, b"")

        do_HEAD = do_GET

    _serve(bind, Handler, srv)
    return srv


def start_front(upstream: str) -> Server:
    """Forwards to ``upstream``; with ``mode["redirect"]`` set to ``cdn`` (the CDN at
    ``mode["cdn"]``) or ``same``, an authenticated blob GET (upstream answered 200) gets a
    307 instead of the body."""
    up_host, up_port = upstream.rsplit(":", 1)
    srv = Server("", Seen(), None)  # type: ignore[arg-type]

    class Handler(QuietHandler):
        def do_GET(self) -> None:
            path = self.path
            srv.seen.add(self.command, path, self.headers.get("Authorization"))
            if path.startswith("/mirror/"):
                # The same-origin redirect target: /mirror/<repo...>/<digest>?sig
                repo, _, digest = path.split("?")[0][len("/mirror/") :].rpartition("/")
                path = f"/v2/{repo}/blobs/{digest}"
            headers = {
                k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")
            }
            conn = http.client.HTTPConnection(up_host, int(up_port), timeout=20)
            conn.request(self.command, path, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            out = {
                k: v
                for k, v in resp.getheaders()
                if k.lower() not in ("content-length", "transfer-encoding", "connection")
            }
            conn.close()
            redirect = srv.mode.get("redirect")
            if (
                redirect
                and self.command == "GET"
                and "/blobs/sha256:" in self.path
                and resp.status == 200
            ):
                repo, _, digest = self.path[len("/v2/") :].partition("/blobs/")
                if redirect == "cdn":
                    where = f"http://{srv.mode['cdn']}/blob/{digest}?{SIGNATURE}"
                else:
                    where = f"/mirror/{repo}/{digest}?{SIGNATURE}"
                self.answer(307, {"Location": where}, b"")
                return
            self.answer(resp.status, out, body)

        do_HEAD = do_GET

    _serve("127.0.0.1", Handler, srv)
    return srv


@dataclass
class Stack:
    auth: str  # basic | token
    reg: Registry
    front: Server
    cdn: Server
    extra_blobs: dict[str, bytes]
    tokens: object = None


def _loopback_ok(addr: str) -> bool:
    with socket.socket() as s:
        try:
            s.bind((addr, 0))
        except OSError:
            return False
    return True


@pytest.fixture(scope="module", params=["basic", "token"])
def stack(
    request: pytest.FixtureRequest, registry: Registry, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """A credentialed registry (plain http) over the shared storage, a front proxy, a CDN."""
    work = tmp_path_factory.mktemp(f"redirect-{request.param}")
    token_server = None
    tokens = None
    if request.param == "basic":
        pw = subprocess.run(
            [need_tool("htpasswd"), "-Bbn", USER, PASSWORD],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        (work / "htpasswd").write_text(pw)
        auth = f"auth:\n  htpasswd:\n    realm: sifpy-test\n    path: {work / 'htpasswd'}\n"
    else:
        key, cert = make_ca("sifpy token signer")
        (work / "token-ca.pem").write_bytes(pem(cert))
        tokens, token_server = make_token_server(key, cert)
        auth = (
            "auth:\n  token:\n"
            f"    realm: {tokens.url}\n    service: sifpy-test-registry\n"
            f"    issuer: sifpy-test-issuer\n    rootcertbundle: {work / 'token-ca.pem'}\n"
        )
    reg = start_registry(work / "reg", registry.storage, auth=auth)
    extra: dict[str, bytes] = {}
    cdn = start_cdn(registry.storage, CDN_HOST if _loopback_ok(CDN_HOST) else "127.0.0.1", extra)
    front = start_front(reg.host)
    try:
        yield Stack(request.param, reg, front, cdn, extra, tokens)
    finally:
        front.close()
        cdn.close()
        reg.stop()
        if token_server is not None:
            token_server.shutdown()


@pytest.fixture
def fresh(stack: Stack) -> Stack:
    for srv in (stack.front, stack.cdn):
        srv.mode.clear()
        srv.seen.requests.clear()
    stack.front.mode["cdn"] = stack.cdn.host
    return stack


def secrets_of(stack: Stack) -> set[str]:
    """Everything that must never be printed: the password, basic auth's base64, every
    Authorization value and bearer token the front saw, the CDN URL's signature."""
    found = {
        PASSWORD,
        base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode(),
        SIGNATURE,
        SIGNATURE.split("=", 1)[1],
    }
    for _, _, auth in stack.front.seen.requests:
        if auth:
            found.add(auth)
            found.add(auth.split(" ", 1)[-1])
    return found


def pull(
    stack: Stack, sifpy: SifpyEnv, out: Path, name: str = "test/plain:1", check: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = sifpy.run(
        "-v", "--debug", "pull", "--insecure", out, f"docker://{stack.front.host}/{name}",
        check=check, SIFPY_DOCKER_USERNAME=USER, SIFPY_DOCKER_PASSWORD=PASSWORD,
    )  # fmt: skip
    leaks = [s for s in secrets_of(stack) if s in proc.stderr or s in proc.stdout]
    assert not leaks, f"secrets in the output: {leaks}\n{proc.stderr}"
    return proc


def blob_gets(seen: Seen) -> list[tuple[str, str, str | None]]:
    return [r for r in seen.requests if r[0] == "GET" and "sha256:" in r[1]]


def plain_digests(registry: Registry) -> tuple[dict[str, object], dict[str, object]]:
    """The config and layer descriptors of test/plain:1."""
    layout, tag = registry.layouts["test/plain:1"]
    index = json.loads((layout / "index.json").read_text())
    (m,) = [
        m
        for m in index["manifests"]
        if m["annotations"]["org.opencontainers.image.ref.name"] == tag
    ]
    manifest = json.loads((layout / "blobs/sha256" / m["digest"][7:]).read_text())
    return manifest["config"], manifest["layers"][0]


@pytest.mark.parametrize("where", ["other-host", "other-port"])
def test_redirect_to_another_origin_drops_credentials(
    fresh: Stack,
    registry: Registry,
    sifpy: SifpyEnv,
    tmp_path: Path,
    where: str,
) -> None:
    cdn = fresh.cdn
    if where == "other-port":
        # 127.0.0.1 like the registry, another port: another origin all the same.
        cdn = start_cdn(registry.storage, "127.0.0.1", fresh.extra_blobs)
        fresh.front.mode["cdn"] = cdn.host
    try:
        fresh.front.mode["redirect"] = "cdn"
        proc = pull(fresh, sifpy, tmp_path / "a.sif")
    finally:
        if cdn is not fresh.cdn:
            cdn.close()
    assert "wrote" in proc.stderr
    assert (sif_rootfs(tmp_path / "a.sif", tmp_path / "r") / "etc/marker").read_text() == (
        "plain image\n"
    )
    config, layer = plain_digests(registry)
    got = blob_gets(cdn.seen)
    assert {p.split("?")[0].rsplit("/", 1)[-1] for _, p, _ in got} == {
        config["digest"],
        layer["digest"],
    }
    assert all(a is None for _, _, a in got), got  # nothing leaked to the CDN
    assert all(SIGNATURE in p for _, p, _ in got)  # the signed URL was followed as given
    # The registry's origin did get the credentials for the same blobs.
    scheme = "Basic " if fresh.auth == "basic" else "Bearer "
    authed = [r for r in blob_gets(fresh.front.seen) if r[2]]
    assert authed and all(r[2].startswith(scheme) for r in authed)  # type: ignore[union-attr]
    assert "redirect" in proc.stderr  # the debug line, with the query string redacted


def test_redirect_to_same_origin_keeps_credentials(
    fresh: Stack, registry: Registry, sifpy: SifpyEnv, tmp_path: Path
) -> None:
    fresh.front.mode["redirect"] = "same"
    pull(fresh, sifpy, tmp_path / "a.sif")
    assert (sif_rootfs(tmp_path / "a.sif", tmp_path / "r") / "etc/marker").read_text() == (
        "plain image\n"
    )
    mirrored = [r for r in fresh.front.seen.requests if r[1].startswith("/mirror/")]
    config, layer = plain_digests(registry)
    assert {p.split("?")[0].rsplit("/", 1)[-1] for _, p, _ in mirrored} == {
        config["digest"],
        layer["digest"],
    }
    scheme = "Basic " if fresh.auth == "basic" else "Bearer "
    assert all(a is not None and a.startswith(scheme) for _, _, a in mirrored), mirrored
    assert blob_gets(fresh.cdn.seen) == []


def test_cdn_401_is_not_answered_with_credentials(
    fresh: Stack, sifpy: SifpyEnv, tmp_path: Path
) -> None:
    fresh.front.mode["redirect"] = "cdn"
    fresh.cdn.mode["cdn"] = "401"
    proc = pull(fresh, sifpy, tmp_path / "a.sif", check=False)
    assert proc.returncode == 1 and "error: can't fetch blob" in proc.stderr
    assert "Traceback" in proc.stderr  # --debug prints it; secrets were checked above
    assert fresh.cdn.seen.requests and all(a is None for _, _, a in fresh.cdn.seen.requests)
    assert not (tmp_path / "a.sif").exists()


# --- foreign (non-distributable) layers ----------------------------------------------------

OCI_FOREIGN = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
DOCKER_FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"


def _tiny_layer() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("etc/foreign")
        data = b"from the foreign host\n"
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return gzip.compress(buf.getvalue(), mtime=0)


@pytest.fixture(scope="module")
def pusher(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A plain registry over the shared storage that accepts layer ``urls`` on loopback
    (docker-registry refuses every URL unless ``validation.manifests.urls.allow`` is set)."""
    allow = "validation:\n  manifests:\n    urls:\n      allow:\n        - ^http://127\\.0\\.0\\.\n"
    reg = start_registry(tmp_path_factory.mktemp("pusher"), registry.storage, auth=allow)
    reg.layouts = registry.layouts
    try:
        yield reg
    finally:
        reg.stop()


def push_foreign(
    registry: Registry, repo: str, fmt: str, layer: dict[str, object], url: str
) -> None:
    """Hand-write a manifest whose only layer is foreign (with ``urls``) and PUT it to
    ``registry``; the config (and the layer, if it is test/plain's) are mounted."""
    base = f"http://{registry.host}/v2/{repo}"
    config, plain_layer = plain_digests(registry)
    for digest in {str(config["digest"]), str(plain_layer["digest"])}:
        r = requests.post(
            f"{base}/blobs/uploads/", params={"mount": digest, "from": "test/plain"}, timeout=10
        )
        assert r.status_code == 201, r.text
    if fmt == "oci":
        mtype = "application/vnd.oci.image.manifest.v1+json"
        ctype, ltype = "application/vnd.oci.image.config.v1+json", OCI_FOREIGN
    else:
        mtype = "application/vnd.docker.distribution.manifest.v2+json"
        ctype, ltype = "application/vnd.docker.container.image.v1+json", DOCKER_FOREIGN
    doc = {
        "schemaVersion": 2,
        "mediaType": mtype,
        "config": {"mediaType": ctype, "digest": config["digest"], "size": config["size"]},
        "layers": [
            {"mediaType": ltype, "digest": layer["digest"], "size": layer["size"], "urls": [url]}
        ],
    }
    r = requests.put(
        f"{base}/manifests/1",
        data=json.dumps(doc).encode(),
        headers={"Content-Type": mtype},
        timeout=10,
    )
    assert r.status_code == 201, r.text


@pytest.mark.parametrize("fmt", ["oci", "docker"])
def test_foreign_layer_urls_are_not_followed(
    fresh: Stack, pusher: Registry, sifpy: SifpyEnv, tmp_path: Path, fmt: str
) -> None:
    """A foreign layer absent from the registry: refused clearly, although the URL would
    serve it; present in the registry: pulled from there. The URL's host sees nothing."""
    tiny = _tiny_layer()
    tiny_digest = "sha256:" + hashlib.sha256(tiny).hexdigest()
    fresh.extra_blobs[tiny_digest] = tiny
    _, plain_layer = plain_digests(pusher)
    absent, present = f"test/foreign-{fmt}-absent", f"test/foreign-{fmt}-present"
    url = f"http://{fresh.cdn.host}/blob/{{}}?{SIGNATURE}"
    push_foreign(
        pusher,
        absent,
        fmt,
        {"digest": tiny_digest, "size": len(tiny)},
        url.format(tiny_digest),
    )
    push_foreign(pusher, present, fmt, plain_layer, url.format(plain_layer["digest"]))
    # The CDN would answer (so a client that followed urls would have succeeded).
    cdn_ip, cdn_port = fresh.cdn.host.rsplit(":", 1)
    with contextlib.closing(http.client.HTTPConnection(cdn_ip, int(cdn_port))) as c:
        c.request("GET", f"/blob/{tiny_digest}")
        assert c.getresponse().read() == tiny
    fresh.cdn.seen.requests.clear()

    refused = pull(fresh, sifpy, tmp_path / "a.sif", f"{absent}:1", check=False)
    assert refused.returncode == 1, refused.stderr
    assert "foreign layer not stored in the registry" in refused.stderr
    assert "not followed" in refused.stderr
    assert not (tmp_path / "a.sif").exists()

    pull(fresh, sifpy, tmp_path / "b.sif", f"{present}:1")
    assert (sif_rootfs(tmp_path / "b.sif", tmp_path / "r") / "etc/marker").read_text() == (
        "plain image\n"
    )
    assert fresh.cdn.seen.requests == []

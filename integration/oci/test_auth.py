"""Auth and TLS against the real registry: htpasswd basic auth behind TLS with a test CA,
and the Docker token flow with a small token server (JWTs signed with a test key)."""

from __future__ import annotations

import base64
import datetime as dt
import http.server
import ipaddress
import json
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from integration.oci.conftest import Registry, SifpyEnv, start_registry
from integration.oci.helpers import sif_rootfs
from sifpy.errors import RegistryError
from sifpy.oci.reference import parse_reference
from sifpy.oci.registry import RegistryClient
from sifpy.oci.session import ClientOptions
from tests.conftest import need_tool

USER, PASSWORD = "alice", "s3cret-Pa55word"
NOW = dt.datetime.now(dt.UTC)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([x509.OID_SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def pem(obj: x509.Certificate | ec.EllipticCurvePrivateKey) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass
class TlsRegistry:
    reg: Registry
    ca: Path
    wrong_ca: Path


@pytest.fixture(scope="module")
def tls_registry(
    registry: Registry, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TlsRegistry]:
    """The same storage behind TLS (a CA made here) and htpasswd basic auth."""
    htpasswd = need_tool("htpasswd")
    work = tmp_path_factory.mktemp("tls")
    ca_key, ca = make_ca("sifpy test CA")
    _, other = make_ca("some other CA")
    key, cert = make_server_cert(ca_key, ca)
    (work / "ca.pem").write_bytes(pem(ca))
    (work / "wrong-ca.pem").write_bytes(pem(other))
    (work / "server.pem").write_bytes(pem(cert))
    (work / "server.key").write_bytes(pem(key))
    pw = subprocess.run(
        [htpasswd, "-Bbn", USER, PASSWORD], check=True, capture_output=True, text=True
    ).stdout
    (work / "htpasswd").write_text(pw)
    auth = f"auth:\n  htpasswd:\n    realm: sifpy-test\n    path: {work / 'htpasswd'}\n"
    reg = start_registry(
        work / "reg", registry.storage, auth=auth, tls=(work / "server.pem", work / "server.key")
    )
    try:
        yield TlsRegistry(reg, work / "ca.pem", work / "wrong-ca.pem")
    finally:
        reg.stop()


def _no_secret(proc: subprocess.CompletedProcess[str]) -> None:
    for secret in (PASSWORD, base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()):
        assert secret not in proc.stderr and secret not in proc.stdout


def test_tls_basic_auth_with_env_credentials(
    tls_registry: TlsRegistry, sifpy: SifpyEnv, tmp_path: Path
) -> None:
    ref = f"docker://{tls_registry.reg.host}/test/plain:1"
    out = tmp_path / "a.sif"
    ok = sifpy.run(
        "pull", "--ca-cert", tls_registry.ca, out, ref,
        SIFPY_DOCKER_USERNAME=USER, SIFPY_DOCKER_PASSWORD=PASSWORD,
    )  # fmt: skip
    _no_secret(ok)
    assert (sif_rootfs(out, tmp_path / "r") / "etc/marker").read_text() == "plain image\n"
    # Apptainer's variable names work too.
    sifpy.run(
        "pull", "--no-cache", "--ca-cert", tls_registry.ca, tmp_path / "b.sif", ref,
        APPTAINER_DOCKER_USERNAME=USER, APPTAINER_DOCKER_PASSWORD=PASSWORD,
    )  # fmt: skip


def test_tls_basic_auth_failures_are_clear(
    tls_registry: TlsRegistry, sifpy: SifpyEnv, tmp_path: Path
) -> None:
    ref = f"docker://{tls_registry.reg.host}/test/plain:1"
    out = tmp_path / "x.sif"
    anon = sifpy.run("pull", "--ca-cert", tls_registry.ca, out, ref, check=False)
    assert anon.returncode == 1 and "authentication required" in anon.stderr
    assert "sifpy registry login" in anon.stderr
    wrong = sifpy.run(
        "pull", "--ca-cert", tls_registry.ca, out, ref, check=False,
        SIFPY_DOCKER_USERNAME=USER, SIFPY_DOCKER_PASSWORD="wrong-password-123",
    )  # fmt: skip
    assert wrong.returncode == 1 and "authentication required" in wrong.stderr
    assert "wrong-password-123" not in wrong.stderr
    for ca_flags in (["--ca-cert", str(tls_registry.wrong_ca)], []):
        bad = sifpy.run(
            "pull", *ca_flags, out, ref, check=False,
            SIFPY_DOCKER_USERNAME=USER, SIFPY_DOCKER_PASSWORD=PASSWORD,
        )  # fmt: skip
        assert bad.returncode == 1 and "TLS verification failed" in bad.stderr
        _no_secret(bad)
    assert not out.exists()


def test_login_logout_and_docker_config(
    tls_registry: TlsRegistry, sifpy: SifpyEnv, tmp_path: Path
) -> None:
    host = tls_registry.reg.host
    ref = f"docker://{host}/test/plain:1"
    bad = subprocess.run(
        [*_cli(), "registry", "login", "--ca-cert", str(tls_registry.ca), "-u", USER, "--password-stdin", host],
        input="nope\n", capture_output=True, text=True, env=sifpy.env(),
    )  # fmt: skip
    assert bad.returncode == 1 and "authentication required" in bad.stderr
    login = subprocess.run(
        [*_cli(), "registry", "login", "--ca-cert", str(tls_registry.ca), "-u", USER, "--password-stdin", host],
        input=PASSWORD + "\n", capture_output=True, text=True, env=sifpy.env(),
    )  # fmt: skip
    assert login.returncode == 0, login.stderr
    _no_secret(login)
    creds = sifpy.home / ".sifpy/credentials.json"
    assert oct(creds.stat().st_mode & 0o777) == "0o600"
    assert oct((sifpy.home / ".sifpy").stat().st_mode & 0o777) == "0o700"
    _no_secret(sifpy.run("pull", "--ca-cert", tls_registry.ca, tmp_path / "a.sif", ref))
    # A credentials file others can read is refused.
    creds.chmod(0o644)
    loose = sifpy.run("pull", "--ca-cert", tls_registry.ca, tmp_path / "b.sif", ref, check=False)
    assert loose.returncode == 1 and "readable by others" in loose.stderr
    creds.chmod(0o600)
    sifpy.run("registry", "logout", host)
    assert host not in creds.read_text()
    gone = sifpy.run(
        "pull", "--no-cache", "--ca-cert", tls_registry.ca, tmp_path / "c.sif", ref, check=False
    )
    assert gone.returncode == 1 and "authentication required" in gone.stderr
    # docker's config.json auths are used when nothing else is set.
    docker = sifpy.home / ".docker"
    docker.mkdir()
    auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    (docker / "config.json").write_text(json.dumps({"auths": {f"https://{host}": {"auth": auth}}}))
    sifpy.run("pull", "--no-cache", "--ca-cert", tls_registry.ca, tmp_path / "d.sif", ref)


def _cli() -> list[str]:
    import sys

    return [sys.executable, "-m", "sifpy"]


def test_secure_call_not_weakened(tls_registry: TlsRegistry) -> None:
    """CVE-2024-35195: a verified call after a differently configured one in one process."""
    from sifpy.oci.auth import Credentials

    creds = Credentials(USER, PASSWORD)
    ref = parse_reference(f"{tls_registry.reg.host}/test/plain:1")
    with RegistryClient(ref.registry, ClientOptions(ca_cert=str(tls_registry.ca)), creds) as good:
        good.get_manifest(ref.repository, "1")
    with (
        RegistryClient(ref.registry, ClientOptions(retries=0), creds) as plain,
        pytest.raises(RegistryError, match="TLS verification failed"),
    ):
        plain.get_manifest(ref.repository, "1")


# --- the Docker token flow ------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class TokenServer:
    url: str
    requests: list[dict[str, object]] = field(default_factory=list)
    stop: object = None


def make_token_server(
    key: ec.EllipticCurvePrivateKey, cert: x509.Certificate
) -> tuple[TokenServer, http.server.ThreadingHTTPServer]:
    x5c = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
    state = TokenServer("")

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            q = parse_qs(urlsplit(self.path).query)
            auth = self.headers.get("Authorization", "")
            user = None
            if auth.startswith("Basic "):
                u, _, p = base64.b64decode(auth[6:]).decode().partition(":")
                if (u, p) != (USER, PASSWORD):
                    self.send_response(401)
                    self.end_headers()
                    return
                user = u
            scope = q.get("scope", [""])[0]
            state.requests.append(
                {"user": user, "scope": scope, "service": q.get("service", [""])[0]}
            )
            access = []
            kind, _, rest = scope.partition(":")
            name, _, _actions = rest.rpartition(":")
            # Anonymous users may pull test/plain only; alice may pull anything, and push
            # to test/oras-* (sifpy push asks for "push,pull").
            if kind == "repository" and (user or name == "test/plain"):
                actions = ["pull"]
                if user and name.startswith("test/oras-"):
                    actions = [a for a in _actions.split(",") if a in ("pull", "push")]
                access = [{"type": "repository", "name": name, "actions": actions}]
            header = {"typ": "JWT", "alg": "ES256", "x5c": [x5c]}
            now = int(time.time())
            claims = {
                "iss": "sifpy-test-issuer", "sub": user or "", "aud": "sifpy-test-registry",
                "exp": now + 300, "nbf": now - 10, "iat": now, "jti": uuid.uuid4().hex,
                "access": access,
            }  # fmt: skip
            signing_input = (
                f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
            )
            der = key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
            r, s = decode_dss_signature(der)
            sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")
            token = f"{signing_input}.{_b64(sig)}"
            body = json.dumps({"token": token, "expires_in": 300}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/token"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return state, server


@pytest.fixture(scope="module")
def token_registry(
    registry: Registry, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Registry, TokenServer]]:
    work = tmp_path_factory.mktemp("token")
    key, cert = make_ca("sifpy token signer")
    (work / "token-ca.pem").write_bytes(pem(cert))
    state, server = make_token_server(key, cert)
    auth = (
        "auth:\n  token:\n"
        f"    realm: {state.url}\n    service: sifpy-test-registry\n"
        f"    issuer: sifpy-test-issuer\n    rootcertbundle: {work / 'token-ca.pem'}\n"
    )
    reg = start_registry(work / "reg", registry.storage, auth=auth)
    try:
        yield reg, state
    finally:
        reg.stop()
        server.shutdown()


def test_token_flow(
    token_registry: tuple[Registry, TokenServer], sifpy: SifpyEnv, tmp_path: Path
) -> None:
    reg, tokens = token_registry
    # Anonymous token: test/plain is public.
    anon = sifpy.run("pull", "--insecure", tmp_path / "a.sif", f"docker://{reg.host}/test/plain:1")
    assert "wrote" in anon.stderr
    assert {
        "user": None,
        "scope": "repository:test/plain:pull",
        "service": "sifpy-test-registry",
    } in tokens.requests
    # test/multi needs credentials: refused clearly without, pulled with them.
    ref = f"docker://{reg.host}/test/multi:1"
    denied = sifpy.run("pull", "--insecure", tmp_path / "b.sif", ref, check=False)
    assert denied.returncode == 1 and "authentication required" in denied.stderr
    tokens.requests.clear()
    ok = sifpy.run(
        "pull", "--insecure", tmp_path / "b.sif", ref,
        SIFPY_DOCKER_USERNAME=USER, SIFPY_DOCKER_PASSWORD=PASSWORD,
    )  # fmt: skip
    _no_secret(ok)
    assert tokens.requests and all(r["user"] == USER for r in tokens.requests)
    assert {r["scope"] for r in tokens.requests} == {"repository:test/multi:pull"}
    wrong = sifpy.run(
        "pull", "--insecure", tmp_path / "c.sif", ref, check=False,
        SIFPY_DOCKER_USERNAME=USER, SIFPY_DOCKER_PASSWORD="bad-pass-987",
    )  # fmt: skip
    assert wrong.returncode == 1 and "token server answered HTTP 401" in wrong.stderr
    assert "bad-pass-987" not in wrong.stderr
    assert not os.path.exists(tmp_path / "c.sif")


def test_one_token_per_repository_scope(token_registry: tuple[Registry, TokenServer]) -> None:
    """One client, two repositories: a token is asked for each repository's own scope and
    never reused for the other; a second request in the same scope reuses its token."""
    from sifpy.oci.auth import Credentials
    from sifpy.oci.registry import RegistryClient
    from sifpy.oci.session import ClientOptions

    reg, tokens = token_registry
    tokens.requests.clear()
    creds = Credentials(USER, PASSWORD)
    with RegistryClient(reg.host, ClientOptions(insecure=True), creds) as client:
        client.get_manifest("test/plain", "1")
        client.get_manifest("test/multi", "1")
        client.get_manifest("test/plain", "1")
    assert [r["scope"] for r in tokens.requests] == [
        "repository:test/plain:pull",
        "repository:test/multi:pull",
    ]

"""``sifpy push`` / ``sifpy pull`` over oras:// against the real registry fixture."""

from __future__ import annotations

import json
from pathlib import Path

import requests

from integration.oci.conftest import Registry, SifpyEnv
from integration.oci.test_auth import PASSWORD, USER, TokenServer, _no_secret, token_registry
from sifpy.oci import oras

__all__ = ["token_registry"]  # the fixture, for this module too


def _sif(registry: Registry, sifpy: SifpyEnv, tmp_path: Path) -> Path:
    out = tmp_path / "app.sif"
    sifpy.run("pull", "--insecure", out, f"docker://{registry.host}/test/plain:1")
    return out


def _manifest(host: str, repo: str, tag: str, token: str | None = None) -> dict[str, object]:
    headers = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    resp = requests.get(f"http://{host}/v2/{repo}/manifests/{tag}", headers=headers, timeout=10)
    assert resp.status_code == 200, resp.text
    assert resp.headers["Content-Type"] == "application/vnd.oci.image.manifest.v1+json"
    data = resp.json()
    assert isinstance(data, dict)
    return data


def test_push_then_pull_is_byte_identical(
    registry: Registry, sifpy: SifpyEnv, tmp_path: Path
) -> None:
    sif = _sif(registry, sifpy, tmp_path)
    target = f"oras://{registry.host}/test/oras-app:v1"
    pushed = sifpy.run("push", "--insecure", sif, target)
    assert "pushed" in pushed.stderr and "app.sif: uploaded" in pushed.stderr
    back = tmp_path / "back.sif"
    pulled = sifpy.run("pull", "--insecure", back, target)
    assert "wrote" in pulled.stderr
    assert back.read_bytes() == sif.read_bytes()
    # The registry holds Apptainer's media types and an empty JSON config.
    m = _manifest(registry.host, "test/oras-app", "v1")
    assert m["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    config = m["config"]
    assert isinstance(config, dict) and config["mediaType"] == oras.SIF_CONFIG
    (layer,) = m["layers"]  # type: ignore[misc]
    assert layer["mediaType"] == "application/vnd.sylabs.sif.layer.v1.sif"
    assert layer["annotations"] == {"org.opencontainers.image.title": "app.sif"}
    assert layer["size"] == sif.stat().st_size
    cfg = requests.get(
        f"http://{registry.host}/v2/test/oras-app/blobs/{config['digest']}", timeout=10
    )
    assert cfg.content == b"{}"
    # Pushing again skips the blobs already there; -q prints nothing.
    again = sifpy.run("push", "--insecure", sif, f"oras://{registry.host}/test/oras-app:v2")
    assert "already there" in again.stderr
    quiet = sifpy.run("-q", "push", "--insecure", sif, target)
    assert quiet.stderr == "" and quiet.stdout == ""
    # An existing output is refused without --force.
    refused = sifpy.run("pull", "--insecure", back, target, check=False)
    assert refused.returncode != 0 and "--force" in refused.stderr


def test_chunked_upload(registry: Registry, sifpy: SifpyEnv, tmp_path: Path) -> None:
    sif = _sif(registry, sifpy, tmp_path)
    size = sif.stat().st_size
    chunk = 100_000
    assert size > 5 * chunk
    target = f"oras://{registry.host}/test/oras-chunked:1"
    sifpy.run("push", "--insecure", "--chunk-size", str(chunk), sif, target)
    back = tmp_path / "back.sif"
    sifpy.run("pull", "--insecure", back, target)
    assert back.read_bytes() == sif.read_bytes()


def test_chunked_upload_protocol(registry: Registry, tmp_path: Path) -> None:
    """The client API: PATCH per chunk, then PUT ?digest= (an odd chunk size, a tail)."""
    from sifpy.oci.registry import RegistryClient
    from sifpy.oci.session import ClientOptions

    data = bytes(range(256)) * 1000 + b"tail"
    calls: list[str] = []
    with RegistryClient(registry.host, ClientOptions(insecure=True)) as client:
        orig = client.call

        def spy(method: str, url: str, scope: str, **kw: object) -> requests.Response:
            calls.append(method)
            return orig(method, url, scope, **kw)  # type: ignore[arg-type]

        client.call = spy  # type: ignore[method-assign]
        pusher = oras.Pusher(client, "test/oras-proto", 65_537)
        blob = oras.bytes_blob(data)
        pusher.upload(blob, oras.NoProgress(), "blob")
    assert calls == ["HEAD", "POST"] + ["PATCH"] * 4 + ["PUT"]
    got = requests.get(f"http://{registry.host}/v2/test/oras-proto/blobs/{blob.digest}", timeout=10)
    assert got.content == data


def test_pull_docker_image_as_oras_is_clear(
    registry: Registry, sifpy: SifpyEnv, tmp_path: Path
) -> None:
    proc = sifpy.run(
        "pull", "--insecure", tmp_path / "x.sif", f"oras://{registry.host}/test/plain:1",
        check=False,
    )  # fmt: skip
    assert proc.returncode == 1 and "expected one application/vnd.sylabs.sif.layer" in proc.stderr
    not_sif = tmp_path / "not.sif"
    not_sif.write_bytes(b"hello" * 100)
    bad = sifpy.run(
        "push", "--insecure", not_sif, f"oras://{registry.host}/test/oras-x:1", check=False
    )
    assert bad.returncode != 0 and "not a SIF image" in bad.stderr
    nohost = sifpy.run("push", not_sif, "oras://test/oras-x:1", check=False)
    assert nohost.returncode != 0 and "no registry host" in nohost.stderr


def test_push_needs_credentials(
    registry: Registry,
    token_registry: tuple[Registry, TokenServer],
    sifpy: SifpyEnv,
    tmp_path: Path,
) -> None:
    sif = _sif(registry, sifpy, tmp_path)
    reg, tokens = token_registry
    target = f"oras://{reg.host}/test/oras-auth:1"
    denied = sifpy.run("push", "--insecure", sif, target, check=False)
    assert denied.returncode == 1, denied.stderr
    assert "can't push" in denied.stderr and "authentication required" in denied.stderr
    assert "Traceback" not in denied.stderr
    tokens.requests.clear()
    ok = sifpy.run(
        "push", "--insecure", sif, target,
        SIFPY_DOCKER_USERNAME=USER, SIFPY_DOCKER_PASSWORD=PASSWORD,
    )  # fmt: skip
    _no_secret(ok)
    assert {r["scope"] for r in tokens.requests} == {"repository:test/oras-auth:push,pull"}
    back = tmp_path / "back.sif"
    sifpy.run(
        "pull", "--insecure", back, target,
        SIFPY_DOCKER_USERNAME=USER, SIFPY_DOCKER_PASSWORD=PASSWORD,
    )  # fmt: skip
    assert back.read_bytes() == sif.read_bytes()
    assert json.loads(json.dumps(tokens.requests))  # recorded, never the password


def test_push_of_a_large_sif_keeps_memory_to_a_chunk(
    registry: Registry, sifpy: SifpyEnv, tmp_path: Path
) -> None:
    """A SIF larger than one chunk is never read whole (the ORAS SDK's one-request upload
    would): pushing 160 MiB in 4 MiB chunks stays well under the file's size in memory.

    The peak is the push process's own VmHWM, read as it exits: ru_maxrss would also count
    the forking test process's memory, which a child keeps as its high-water mark across
    exec."""
    import os
    import subprocess
    import sys

    from sifpy.sif import ObjectInput, create
    from sifpy.sif import format as F

    part = tmp_path / "part.bin"
    with open(part, "wb") as f:
        for _ in range(160):
            f.write(os.urandom(1 << 20))
    sif = tmp_path / "big.sif"
    create(sif, [ObjectInput.partition(part, F.FSType.SQUASH, F.PartType.PRIMSYS, "amd64")])
    part.unlink()
    target = f"oras://{registry.host}/test/oras-big:1"
    status = tmp_path / "status"
    argv = ["-q", "push", "--insecure", "--chunk-size", "4M", str(sif), target]
    code = (
        "import sys\n"
        "from sifpy.cli import main\n"
        f"rc = main({argv!r})\n"
        f"open({str(status)!r}, 'w').write(open('/proc/self/status').read())\n"
        "sys.exit(rc)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=sifpy.env(), stdin=subprocess.DEVNULL,
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (hwm,) = [line for line in status.read_text().splitlines() if line.startswith("VmHWM:")]
    peak_mib = int(hwm.split()[1]) / 1024
    assert peak_mib < 100, f"peak RSS {peak_mib:.0f} MiB for a 160 MiB SIF"
    back = tmp_path / "back.sif"
    sifpy.run("pull", "--insecure", back, target)
    assert back.stat().st_size == sif.stat().st_size

"""Credentials sources and WWW-Authenticate parsing (no network)."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

from sifpy.errors import RegistryError
from sifpy.oci.auth import (
    Credentials,
    lookup_credentials,
    normalize_host,
    parse_challenge,
    remove_credentials,
    store_credentials,
)


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path))
    for k in list(os.environ):
        if k.startswith(("SIFPY_DOCKER_", "APPTAINER_DOCKER_", "DOCKER_CONFIG")):
            monkeypatch.delenv(k)
    return tmp_path


def test_parse_challenge() -> None:
    c = parse_challenge(
        'Bearer realm="https://auth.example/token",service="registry.example",'
        'scope="repository:a/b:pull"'
    )
    assert c is not None and c.scheme == "bearer"
    assert c.params == {
        "realm": "https://auth.example/token",
        "service": "registry.example",
        "scope": "repository:a/b:pull",
    }
    basic = parse_challenge('Basic realm="x \\"quoted\\""')
    assert basic is not None and basic.scheme == "basic" and basic.params["realm"] == 'x "quoted"'
    assert parse_challenge("") is None


def test_normalize_host() -> None:
    assert normalize_host("https://index.docker.io/v1/") == "docker.io"
    assert normalize_host("registry-1.docker.io") == "docker.io"
    assert normalize_host("HTTP://Reg.Example:5000/path") == "reg.example:5000"


def test_store_is_private_and_round_trips(home: Path) -> None:
    path = store_credentials("reg.example:5000", "bob", "pw")
    assert path == home / ".sifpy/credentials.json"
    assert path.stat().st_mode & 0o777 == 0o600
    assert (home / ".sifpy").stat().st_mode & 0o777 == 0o700
    creds = lookup_credentials("https://reg.example:5000")
    assert creds is not None and (creds.username, creds.password) == ("bob", "pw")
    assert lookup_credentials("other.example") is None
    assert remove_credentials("reg.example:5000")
    assert not remove_credentials("reg.example:5000")
    assert lookup_credentials("reg.example:5000") is None


def test_loose_permissions_refused(home: Path) -> None:
    path = store_credentials("r.example", "bob", "pw")
    path.chmod(0o644)
    with pytest.raises(RegistryError, match="readable by others"):
        lookup_credentials("r.example")


def test_env_wins_then_file_then_docker(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    docker = home / ".docker"
    docker.mkdir()
    auth = base64.b64encode(b"dock:er-pw").decode()
    (docker / "config.json").write_text(
        json.dumps({"auths": {"https://index.docker.io/v1/": {"auth": auth}}})
    )
    creds = lookup_credentials("docker.io")
    assert creds is not None and (creds.username, creds.password) == ("dock", "er-pw")
    store_credentials("docker.io", "file", "file-pw")
    creds = lookup_credentials("docker.io")
    assert creds is not None and creds.username == "file"
    monkeypatch.setenv("APPTAINER_DOCKER_USERNAME", "app")
    monkeypatch.setenv("APPTAINER_DOCKER_PASSWORD", "app-pw")
    creds = lookup_credentials("docker.io")
    assert creds is not None and creds.username == "app"
    monkeypatch.setenv("SIFPY_DOCKER_USERNAME", "sif")
    monkeypatch.setenv("SIFPY_DOCKER_PASSWORD", "sif-pw")
    creds = lookup_credentials("docker.io")
    assert creds is not None and creds.username == "sif"


def test_repr_hides_password() -> None:
    c = Credentials("u", "topsecret", "x")
    assert "topsecret" not in repr(c) and "topsecret" not in str(c)

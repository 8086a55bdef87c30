"""The registry client's pure parts: manifest checks, platform choice, Content-Range."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sifpy.errors import RegistryError
from sifpy.oci import media as M
from sifpy.oci.manifests import Manifest, sha256_hex
from sifpy.oci.reference import Platform
from sifpy.oci.registry import _content_range_ok, parse_manifest, select_platform
from sifpy.oci.session import redact

D1, D2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64


def parse(doc: dict[str, Any], ctype: str = "") -> Manifest:
    raw = json.dumps(doc).encode()
    return parse_manifest(raw, sha256_hex(raw), ctype, "m")


IMAGE = {
    "schemaVersion": 2,
    "mediaType": M.OCI_MANIFEST,
    "config": {"mediaType": M.OCI_CONFIG, "digest": D1, "size": 2},
    "layers": [],
}


def test_manifest_types() -> None:
    assert parse(IMAGE).media_type == M.OCI_MANIFEST
    untyped = {k: v for k, v in IMAGE.items() if k != "mediaType"}
    assert parse(untyped).media_type == M.OCI_MANIFEST
    assert parse(untyped, M.DOCKER_MANIFEST).media_type == M.DOCKER_MANIFEST
    assert parse({"schemaVersion": 2, "manifests": []}).media_type == M.OCI_INDEX


@pytest.mark.parametrize(
    ("doc", "ctype", "msg"),
    [
        ({"schemaVersion": 1, "fsLayers": []}, "", "schema 1"),
        ({"schemaVersion": 2}, M.DOCKER_SCHEMA1_SIGNED, "schema 1"),
        ({**IMAGE, "manifests": []}, "", "ambiguous"),
        (IMAGE, M.DOCKER_MANIFEST, "disagrees"),
        ({**IMAGE, "mediaType": "application/x-other"}, "", "unsupported media type"),
        ({**IMAGE, "mediaType": M.OCI_INDEX}, "", "matching fields"),
        ({"schemaVersion": 3}, "", "schemaVersion"),
    ],
)
def test_manifest_rejections(doc: dict[str, Any], ctype: str, msg: str) -> None:
    with pytest.raises(RegistryError, match=msg):
        parse(doc, ctype)


def test_not_json() -> None:
    with pytest.raises(RegistryError, match="not JSON"):
        parse_manifest(b"\xff", "sha256:" + "0" * 64, "", "m")


def test_descriptor_validation() -> None:
    for bad in [
        {"digest": "sha256:../x", "size": 1},
        {"digest": D1, "size": -1},
        {"digest": D1, "size": True},
        {"digest": D1, "size": "1"},
        "nope",
    ]:
        with pytest.raises(RegistryError):
            M.Descriptor.from_json(bad, "layer 0")


def test_select_platform() -> None:
    index = parse(
        {
            "schemaVersion": 2,
            "manifests": [
                {"digest": D1, "size": 1, "platform": {"os": "linux", "architecture": "amd64"}},
                {
                    "digest": D2,
                    "size": 1,
                    "platform": {"os": "linux", "architecture": "arm", "variant": "v7"},
                },
                {"digest": D2, "size": 1, "platform": {"os": "unknown", "architecture": "unknown"}},
            ],
        }
    )
    assert select_platform(index, Platform("linux", "amd64"), "x").digest == D1
    assert select_platform(index, Platform("linux", "arm", "v7"), "x").digest == D2
    with pytest.raises(RegistryError, match="no image for linux/arm64") as exc:
        select_platform(index, Platform("linux", "arm64"), "x")
    assert exc.value.hint is not None and "linux/arm/v7" in exc.value.hint
    assert "unknown" not in exc.value.hint


class _Raw:
    def __init__(self, values: list[str]) -> None:
        self.headers = self
        self._values = values

    def getlist(self, name: str) -> list[str]:
        return self._values


class _Resp:
    def __init__(self, status: int, values: list[str]) -> None:
        self.status_code = status
        self.raw = _Raw(values)


@pytest.mark.parametrize(
    ("status", "values", "ok"),
    [
        (206, ["bytes 100-999/1000"], True),
        (206, ["bytes 100-999/*"], True),
        (206, ["bytes 0-999/1000"], False),  # from the start: would splice
        (206, ["bytes 100-998/1000"], False),  # not to the end
        (206, ["bytes 100-999/2000"], False),  # another size
        (206, ["bytes 100-999/1000", "bytes 100-999/1000"], False),  # duplicated
        (206, [], False),
        (206, ["items 100-999/1000"], False),
        (206, ["bytes 100-/1000"], False),
        (200, ["bytes 100-999/1000"], False),
    ],
)
def test_content_range(status: int, values: list[str], ok: bool) -> None:
    assert _content_range_ok(_Resp(status, values), 100, 1000) is ok  # type: ignore[arg-type]


def test_redact() -> None:
    assert (
        redact("https://user:pw@s3.example:8443/b/c?X-Amz-Signature=abc#f")
        == "https://s3.example:8443/b/c"
    )

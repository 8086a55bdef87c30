"""Reference, digest and platform parsing: Docker's normalisation, table-driven."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sifpy.errors import UsageError
from sifpy.oci.reference import (
    Platform,
    Reference,
    digest_hex,
    parse_platform,
    parse_reference,
    validate_digest,
)

D = "sha256:" + "ab" * 32

GOOD = [
    ("alpine", Reference("docker.io", "library/alpine", "latest")),
    ("docker://alpine", Reference("docker.io", "library/alpine", "latest")),
    ("alpine:3.19", Reference("docker.io", "library/alpine", "3.19")),
    ("user/app:v1", Reference("docker.io", "user/app", "v1")),
    ("docker.io/alpine", Reference("docker.io", "library/alpine", "latest")),
    ("index.docker.io/alpine", Reference("docker.io", "library/alpine", "latest")),
    ("docker.io/user/app", Reference("docker.io", "user/app", "latest")),
    ("localhost/app", Reference("localhost", "app", "latest")),
    ("localhost:5000/app:t", Reference("localhost:5000", "app", "t")),
    ("127.0.0.1:5000/a/b/c:t", Reference("127.0.0.1:5000", "a/b/c", "t")),
    ("quay.io/org/img", Reference("quay.io", "org/img", "latest")),
    ("Host/app", Reference("Host", "app", "latest")),  # uppercase first component: a registry
    (f"alpine@{D}", Reference("docker.io", "library/alpine", None, D)),
    (f"alpine:3@{D}", Reference("docker.io", "library/alpine", "3", D)),
    (f"r.io:443/x@{D}", Reference("r.io:443", "x", None, D)),
    ("a/b-c__d.e_f:T_1.x-y", Reference("docker.io", "a/b-c__d.e_f", "T_1.x-y")),
    ("ghcr.io/a/b---c", Reference("ghcr.io", "a/b---c", "latest")),
]


@pytest.mark.parametrize(("text", "want"), GOOD, ids=[g[0] for g in GOOD])
def test_good_references(text: str, want: Reference) -> None:
    assert parse_reference(text) == want


BAD = [
    "",
    "docker://",
    "oras://x/y",
    "Alpine",
    "user/App",
    "a//b",
    "a/b/",
    "/a",
    "a:",
    "a:-tag",
    "a@sha256:abc",
    f"a@sha256:{'AB' * 32}",
    "a@sha256:../../etc/passwd",
    f"a@sha512:{'a' * 128}",
    "a_/b",
    "-a",
    "a:" + "t" * 129,
    "r.io/" + "a" * 260,
    "bad_host.io:port/x",
]


@pytest.mark.parametrize("text", BAD)
def test_bad_references(text: str) -> None:
    with pytest.raises(UsageError):
        parse_reference(text)


def test_api_host_and_str() -> None:
    ref = parse_reference("alpine")
    assert ref.api_host == "registry-1.docker.io"
    assert str(ref) == "docker.io/library/alpine:latest"
    assert ref.reference == "latest"
    pinned = parse_reference(f"localhost:5000/x:t@{D}")
    assert pinned.api_host == "localhost:5000"
    assert pinned.reference == D
    assert parse_reference(str(pinned)) == pinned


def test_registry_and_namespace_overrides() -> None:
    assert parse_reference("app", registry="r.example:5000") == Reference(
        "r.example:5000", "app", "latest"
    )
    assert parse_reference("app", registry="r.example", namespace="team") == Reference(
        "r.example", "team/app", "latest"
    )
    assert parse_reference("app", namespace="team") == Reference("docker.io", "team/app", "latest")
    # An explicit registry wins over Registry:, and a namespaced name keeps its own.
    assert parse_reference("q.io/x/app", registry="r.io", namespace="t").registry == "q.io"
    assert parse_reference("x/app", namespace="t").repository == "x/app"
    with pytest.raises(UsageError):
        parse_reference("app", registry="bad host")
    with pytest.raises(UsageError):
        parse_reference("app", namespace="Bad")


def test_validate_digest() -> None:
    assert validate_digest(D) == D
    assert digest_hex(D) == "ab" * 32
    for bad in [
        "sha256:../hello",
        "sha256:" + "a" * 63,
        "sha256:" + "A" * 64,
        "md5:abc",
        "",
        D + "\n",
    ]:
        with pytest.raises(UsageError):
            validate_digest(bad)


@given(st.text(max_size=80))
def test_digest_validation_never_lets_slashes_through(s: str) -> None:
    try:
        h = digest_hex(s)
    except UsageError:
        return
    assert len(h) == 64 and set(h) <= set("0123456789abcdef")


@given(st.text(max_size=60))
def test_parser_total(s: str) -> None:
    """Any string either parses to a valid reference or raises UsageError."""
    try:
        ref = parse_reference(s)
    except UsageError:
        return
    assert ".." not in ref.repository.split("/")
    assert ref.tag is not None or ref.digest is not None


def test_platforms() -> None:
    assert parse_platform("linux/arm64") == Platform("linux", "arm64")
    assert parse_platform("linux/arm/v7") == Platform("linux", "arm", "v7")
    assert parse_platform(None, "aarch64").architecture == "arm64"
    assert parse_platform(None, "x86_64").architecture == "amd64"
    assert parse_platform(None, "armhf") == Platform("linux", "arm", "v7")
    assert parse_platform("linux/amd64", "arm64") == Platform("linux", "arm64")
    assert parse_platform("arm64") == Platform("linux", "arm64")
    assert str(parse_platform("linux/arm/v6")) == "linux/arm/v6"
    for bad in ["a/b/c/d", "linux/", "lin ux/amd64"]:
        with pytest.raises(UsageError):
            parse_platform(bad)
    with pytest.raises(UsageError):
        parse_platform(None, "amd 64")


def test_platform_matching() -> None:
    assert Platform("linux", "arm64").matches("linux", "arm64", "v8")
    assert Platform("linux", "arm64", "v8").matches("linux", "arm64", None)
    assert not Platform("linux", "arm", "v7").matches("linux", "arm", "v6")
    assert not Platform("linux", "amd64").matches("windows", "amd64", None)
    assert Platform("linux", "arm").matches("linux", "arm", "v7")


@pytest.mark.parametrize(
    ("image", "name"),
    [
        ("docker://debian:bookworm", "debian_bookworm.sif"),
        ("docker://alpine", "alpine_latest.sif"),
        ("docker://localhost:5000/a/b/tool:1.2", "tool_1.2.sif"),
        ("oras://ghcr.io/x/app:v1", "app_v1.sif"),
        ("docker://busybox@sha256:" + "ab" * 32, "busybox_" + "ab" * 6 + ".sif"),
    ],
)
def test_default_sif_name_is_apptainers(image: str, name: str) -> None:
    from sifpy.oci.reference import default_sif_name

    assert default_sif_name(image) == name

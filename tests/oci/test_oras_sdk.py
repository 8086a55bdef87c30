"""ORAS push through the ORAS SDK: what it adds before any request is sent."""

from __future__ import annotations

import pytest

from sifpy.errors import RegistryError
from sifpy.oci import oras
from sifpy.oci.registry import RegistryClient
from sifpy.oci.session import ClientOptions


def test_manifest_checked_against_the_oci_schema_before_upload() -> None:
    """The SDK validates the manifest (here a size that is not a number) before its PUT: the
    client points at a closed port, so reaching the network would be a connection error."""
    manifest = oras.sif_manifest(b"{}", "sha256:" + "0" * 64, 10, "app.sif")
    manifest["layers"][0]["size"] = "10"
    with RegistryClient("127.0.0.1:9", ClientOptions(insecure=True, retries=0)) as client:
        pusher = oras.Pusher(client, "test/x", 1 << 20, "v1")
        with pytest.raises(RegistryError, match=r"can't push manifest test/x:v1: invalid manifest"):
            pusher.put_manifest(manifest)


def test_sif_manifest_is_valid_for_the_sdk() -> None:
    """What sifpy pushes passes the SDK's schema (an empty config, one SIF layer)."""
    import jsonschema
    from oras.schemas import manifest as schema  # the SDK package, not sifpy.oci.oras

    jsonschema.validate(oras.sif_manifest(b"{}", "sha256:" + "0" * 64, 10, "app.sif"), schema)


def test_manifest_upload_failure_is_an_error_not_a_traceback() -> None:
    """A manifest PUT that can't connect ends in sifpy's RegistryError (the client's retries
    spent), as before the SDK carried it."""
    manifest = oras.sif_manifest(b"{}", "sha256:" + "0" * 64, 10, "app.sif")
    with RegistryClient("127.0.0.1:9", ClientOptions(insecure=True, retries=0)) as client:
        pusher = oras.Pusher(client, "test/x", 1 << 20, "v1")
        with pytest.raises(RegistryError, match="connection refused"):
            pusher.put_manifest(manifest)

"""``Bootstrap: docker`` in a definition file, against the real registry fixture."""

from __future__ import annotations

import json
from pathlib import Path

from integration.oci.conftest import Registry, SifpyEnv


def test_build_from_registry_with_post(registry: Registry, sifpy: SifpyEnv, tmp_path: Path) -> None:
    deffile = tmp_path / "app.def"
    deffile.write_text(
        "Bootstrap: docker\n"
        "From: test/plain:1\n"
        f"Registry: {registry.host}\n\n"
        "%post\n    echo built-in-post > /post-marker\n\n"
        "%environment\n    export FROM_DEF=yes\n\n"
        '%runscript\n    echo "$FROM_DEF $(cat /post-marker) $*"\n'
    )
    out = tmp_path / "app.sif"
    sifpy.run("build", out, deffile, SIFPY_NOHTTPS="1")
    r = sifpy.run("run", out, "arg")
    assert r.stdout == "yes built-in-post arg\n", r.stderr
    # The base image's own files are there, and its origin is recorded in the labels.
    assert sifpy.run("exec", out, "cat", "/etc/marker").stdout == "plain image\n"
    labels = json.loads(sifpy.run("inspect", "--json", out).stdout)["data"]["attributes"]["labels"]
    assert labels["org.opencontainers.image.base.name"].endswith("test/plain:1")
    assert labels["org.opencontainers.image.base.digest"].startswith("sha256:")
    # A second build reuses the blob cache (no layer is fetched twice).
    blobs = sorted(p.name for p in (sifpy.cache / "blobs" / "sha256").iterdir())
    sifpy.run("build", "--force", out, deffile, SIFPY_NOHTTPS="1")
    assert sorted(p.name for p in (sifpy.cache / "blobs" / "sha256").iterdir()) == blobs


def test_unknown_image_fails_clearly(registry: Registry, sifpy: SifpyEnv, tmp_path: Path) -> None:
    deffile = tmp_path / "bad.def"
    deffile.write_text(f"Bootstrap: docker\nFrom: {registry.host}/test/nope:1\n")
    r = sifpy.run("build", tmp_path / "bad.sif", deffile, check=False, SIFPY_NOHTTPS="1")
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert r.returncode != 0 and len(errors) == 1 and "Traceback" not in r.stderr
    assert "manifest unknown" in errors[0]
    assert not (tmp_path / "bad.sif").exists()

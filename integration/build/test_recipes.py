"""Every recipe in recipes/ builds as root and as the unprivileged test user, and runs.

Each SIF is checked with the reference ``siftool list`` (definition file object, primary
squashfs partition) and its partition is mounted with ``squashfuse_ll -o offset=N`` to
look at the files, the metadata and the runscript; then ``sifpy run`` runs it.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from .conftest import Builder, mounted, need_debian

_BUILT: dict[tuple[str, str], Path] = {}

# recipe -> (files in the image, run arguments, expected run output)
EXPECT: dict[str, tuple[list[str], list[str], str]] = {
    "busybox-hello": (["bin/busybox", "bin/sh"], [], "hello from sifpy"),
    "args": (["greeting.txt"], [], "hello, world"),
    "scif-apps": (
        [
            "scif/apps/greet/bin/greet",
            "scif/apps/count/count.txt",
            "scif/apps/greet/scif/runscript",
        ],
        ["--app", "greet"],
        "hello from greet: good day",
    ),
    "debian-apt": (["usr/bin/hello", "etc/debian_version"], [], "Hello, world!"),
    "multistage": (["usr/local/bin/hello", "bin/busybox"], [], "hello from a static binary"),
}
DEBIAN = ("debian-apt", "multistage")


def built(builder: Builder, name: str) -> Path:
    """Build each recipe once per identity (the Debian ones are slow)."""
    key = (builder.identity, name)
    if key not in _BUILT:
        _BUILT[key] = builder.build(name)
    return _BUILT[key]


@pytest.mark.parametrize("name", list(EXPECT))
def test_recipe_builds_and_runs(builder: Builder, name: str) -> None:
    if name in DEBIAN:
        need_debian()
    files, run_args, output = EXPECT[name]
    sif = built(builder, name)
    listing = subprocess.run(["siftool", "list", str(sif)], capture_output=True, text=True)
    assert listing.returncode == 0, listing.stderr
    assert "Def.FILE" in listing.stdout
    assert "FS (Squashfs/*System/" in listing.stdout
    assert "JSON.Generic" in listing.stdout
    with mounted(sif) as mnt:
        for path in files:
            assert (mnt / path).exists(), f"{path} missing from {name}"
        sd = mnt / ".singularity.d"
        for path in ("runscript", "startscript", "labels.json", "Singularity", "actions/run"):
            assert (sd / path).is_file(), path
        for path in ("env/01-base.sh", "env/90-environment.sh", "env/99-base.sh"):
            assert (sd / path).is_file(), path
        labels = json.loads((sd / "labels.json").read_text())
        assert labels["org.label-schema.schema-version"] == "1.0"
        assert "org.label-schema.build-date" in labels
        assert "Bootstrap:" in (sd / "Singularity").read_text()
        assert (mnt / "singularity").is_symlink()
        assert not (mnt / ".post.script").exists() and not (mnt / ".build.labels").exists()
        assert not (mnt / "etc/apt/apt.conf.d/00sifpy-sandbox").exists()
        st = (sd / "runscript").stat()
        assert st.st_uid == 0 and st.st_mode & 0o111
        if name == "multistage":
            assert not (mnt / "usr/bin/gcc").exists()  # only the binary was copied
        if name == "debian-apt":
            assert labels["org.example.recipe"] == "debian-apt"
            assert "LC_ALL" in (sd / "env/90-environment.sh").read_text()
    res = builder.run(["run", *run_args, str(sif)], timeout=60)
    assert res.returncode == 0, res.stderr
    assert output in res.stdout


def test_build_arg_override(builder: Builder) -> None:
    sif = builder.out / "args-cli.sif"
    recipe = builder.recipes / "args.def"
    res = builder.run(["build", "--force", "--build-arg", "WHO=sifpy", str(sif), str(recipe)])
    assert res.returncode == 0, res.stderr
    run = builder.run(["run", str(sif)])
    assert run.stdout.strip() == "hello, sifpy"
    bad = builder.run(["build", "--force", "--build-arg", "NOPE=1", str(sif), str(recipe)])
    assert bad.returncode != 0 and "unused build args" in bad.stderr


def test_sandbox_round_trip(builder: Builder) -> None:
    sif = built(builder, "busybox-hello")
    sandbox = builder.out / "hello-sandbox"
    res = builder.run(["build", "--force", "--sandbox", str(sandbox), str(sif)])
    assert res.returncode == 0, res.stderr
    assert (sandbox / ".singularity.d/bootstrap_history/Apptainer0").is_file()
    back = builder.out / "hello-again.sif"
    res = builder.run(["build", "--force", str(back), str(sandbox)])
    assert res.returncode == 0, res.stderr
    assert builder.run(["run", str(back)]).stdout.strip() == "hello from sifpy"

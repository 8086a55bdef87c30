"""An OCI-SIF as Apptainer's ``--oci`` mode writes it (one squashfs layer, no
/.singularity.d; the image config in an OCI.Blob) runs its config: ``exec`` gets the
config's Env and WorkingDir, ``run`` runs Entrypoint then Cmd (the arguments replace Cmd),
as the test user, through Python and through the starter."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from integration.conftest import UserRunner
from integration.runtime.conftest import busybox_rootfs
from sifpy.sif import ocisif


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def ocisif_image(runtime_ready: UserRunner, workdir: Path) -> Path:
    def extra(root: Path) -> None:
        (root / "srv" / "app").mkdir(parents=True)
        (root / "srv" / "app" / "greet").write_text('#!/bin/sh\necho "greet($GREETING) $*"\n')

    rootfs = busybox_rootfs(workdir / "ocisif-rootfs", extra)
    (rootfs / "srv" / "app" / "greet").chmod(0o755)
    assert not (rootfs / ".singularity.d").exists()
    sqfs = workdir / "ocisif-layer.sqfs"
    subprocess.run(
        ["mksquashfs", str(rootfs), str(sqfs), "-noappend", "-quiet", "-all-root"],
        check=True,
        capture_output=True,
    )
    layer = sqfs.read_bytes()
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {
                "Env": ["PATH=/srv/app:/bin", "GREETING=it's hello", "EMPTY="],
                "Entrypoint": ["greet", "from-entrypoint"],
                "Cmd": ["from-cmd"],
                "WorkingDir": "/srv/app",
            },
            "rootfs": {"type": "layers", "diff_ids": [_digest(layer)]},
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": ocisif.OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": _digest(config),
                "size": len(config),
            },
            "layers": [
                {"mediaType": ocisif.SQUASHFS_LAYER, "digest": _digest(layer), "size": len(layer)}
            ],
        }
    ).encode()
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": ocisif.OCI_INDEX,
            "manifests": [
                {"mediaType": ocisif.OCI_MANIFEST, "digest": _digest(manifest), "size": 1}
            ],
        }
    ).encode()
    out = workdir / "apptainer-like.oci.sif"
    blobs = [ocisif.Blob(_digest(layer), layer)]
    blobs += [ocisif.Blob(_digest(config), config), ocisif.Blob(_digest(manifest), manifest)]
    ocisif.write(out, blobs, index)
    os.chmod(out, 0o644)
    return out


@pytest.fixture(params=["python", "starter"])
def program(request: pytest.FixtureRequest, runtime_ready: UserRunner) -> list[str]:
    if request.param == "starter":
        return [request.getfixturevalue("starter")]
    return ["/usr/bin/python3", "-m", "sifpy"]


@pytest.mark.unpriv
def test_ocisif_runs_its_config(
    runtime_ready: UserRunner, ocisif_image: Path, program: list[str]
) -> None:
    img = str(ocisif_image)
    res = runtime_ready([*program, "run", img])
    assert (res.returncode, res.stdout) == (0, "greet(it's hello) from-entrypoint from-cmd\n"), (
        res.stderr
    )
    res = runtime_ready([*program, "run", img, "a b", "c"])
    assert (res.returncode, res.stdout) == (0, "greet(it's hello) from-entrypoint a b c\n"), (
        res.stderr
    )
    script = 'echo "$PATH|$GREETING|${EMPTY-unset}|$(pwd)"'
    res = runtime_ready([*program, "exec", img, "sh", "-c", script])
    assert (res.returncode, res.stdout) == (0, "/srv/app:/bin|it's hello||/srv/app\n"), res.stderr
    # The user's own --env and --pwd win over the image's.
    res = runtime_ready(
        [*program, "exec", "--env", "GREETING=mine", "--pwd", "/bin", img, "sh", "-c", script]
    )
    assert (res.returncode, res.stdout) == (0, "/srv/app:/bin|mine||/bin\n"), res.stderr

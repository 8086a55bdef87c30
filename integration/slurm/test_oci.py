"""Slurm's ``srun --container=BUNDLE`` through ``sifpy oci``, with the shipped example
``oci.conf`` (docs/examples/slurm/oci.conf; ``sifpy`` there is the compiled sifpy here), as
the unprivileged test user on the session's single-node cluster."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from integration.conftest import REPO, UserRunner, require
from integration.runtime.conftest import busybox_rootfs
from integration.slurm.cluster import Cluster

EXAMPLE = REPO / "docs" / "examples" / "slurm" / "oci.conf"
OS_RELEASE = 'NAME="sifpy srun image"\nID=sifpysrun\n'


@pytest.fixture()
def oci_conf(slurm: Cluster, starter: str) -> Iterator[Path]:
    """The example oci.conf next to the cluster's slurm.conf (each step reads it when it
    starts), removed afterwards: the other Slurm tests run without it."""
    text = EXAMPLE.read_text()
    assert text.count('"sifpy oci ') == 4
    path = slurm.base / "oci.conf"
    path.write_text(text.replace('"sifpy oci ', f'"{starter} oci '))
    path.chmod(0o644)
    yield path
    path.unlink()


def test_srun_container(
    runtime_ready: UserRunner, slurm: Cluster, oci_conf: Path, workdir: Path
) -> None:
    require(None if shutil.which("runc") else "runc is not installed (Debian: runc)")
    base = workdir / "srun-oci"
    base.mkdir()
    os.chown(base, runtime_ready.user.uid, runtime_ready.user.gid)

    def os_release(root: Path) -> None:
        (root / "etc" / "os-release").write_text(OS_RELEASE)

    bundle = base / "bundle"
    bundle.mkdir()
    os.chown(bundle, runtime_ready.user.uid, runtime_ready.user.gid)
    busybox_rootfs(bundle / "rootfs", os_release)
    res = runtime_ready(["runc", "spec", "--rootless"], cwd=bundle)
    assert res.returncode == 0, res.stderr
    res = runtime_ready(
        ["srun", f"--container={bundle}", "cat", "/etc/os-release"], env=slurm.env(), timeout=120
    )
    assert (res.returncode, res.stdout) == (0, OS_RELEASE), res.stderr + slurm.log()
    # The container's state is gone with the step.
    state = Path(f"/tmp/sifpy-oci-{runtime_ready.user.name}")
    assert not state.exists() or list(state.iterdir()) == []

"""Fixtures for the MPI and Slurm tests: a Slurm cluster of our own on this machine
(:mod:`.cluster`) and an MPI image built by sifpy, each made once per test session."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from integration.conftest import REPO, UserRunner, require
from integration.runtime.conftest import starter as starter  # the compiled sifpy, shared
from integration.slurm import cluster

HERE = Path(__file__).resolve().parent
# Debian's names: the MPI alternatives (mpiexec, mpicc) may point at either.
LAUNCHERS = {"mpich": "mpiexec.mpich", "openmpi": "mpiexec.openmpi"}


@pytest.fixture(scope="session")
def slurm() -> Iterator[cluster.Cluster]:
    """munged, slurmctld and slurmd, up for the session; stopped by pid at the end."""
    require(cluster.missing())
    c = cluster.start()
    try:
        yield c
    finally:
        c.stop()
        shutil.rmtree(c.base, ignore_errors=True)


@pytest.fixture(scope="session")
def mpi_image(runtime_ready: UserRunner, workdir: Path) -> str:
    """integration/slurm/mpi.def built by sifpy (a Debian image with MPICH and Open MPI and
    the test program built against each): as root when the suite is root, else as the user."""
    require(None if shutil.which("mmdebstrap") else "mmdebstrap is not installed")
    for tool in LAUNCHERS.values():
        require(None if shutil.which(tool) else f"{tool} is not installed (mpich, openmpi-bin)")
    out = workdir / "mpi"
    out.mkdir(exist_ok=True)
    for name in ("mpi.def", "mpi_check.c"):
        shutil.copy(HERE / name, out / name)
        (out / name).chmod(0o644)
    sif = out / "mpi.sif"
    argv = ["build", "--build-arg", f"SRC={out / 'mpi_check.c'}", str(sif), str(out / "mpi.def")]
    if os.getuid() == 0:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        res = subprocess.run(
            [sys.executable, "-m", "sifpy", *argv],
            capture_output=True,
            text=True,
            timeout=900,
            env=env,
            cwd=out,
        )
    else:
        res = runtime_ready(["/usr/bin/python3", "-m", "sifpy", *argv], timeout=900, cwd=out)
    assert res.returncode == 0, f"building the MPI image failed:\n{res.stdout}{res.stderr}"
    sif.chmod(0o644)
    return str(sif)

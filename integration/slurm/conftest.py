"""Fixtures for the MPI and Slurm tests: a Slurm cluster of our own on this machine
(:mod:`.cluster`) and an MPI image built by sifpy, each made once per test session."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from integration.conftest import REPO, UserRunner, require
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


def _build(
    runtime_ready: UserRunner, out: Path, sif: Path, definition: str, args: dict[str, str]
) -> None:
    """Build ``definition`` (from this directory) with sifpy into ``sif``: as root when the
    suite is root, else as the user."""
    out.mkdir(exist_ok=True)
    for name in (definition, "mpi_check.c"):
        shutil.copy(HERE / name, out / name)
        (out / name).chmod(0o644)
    args = {"SRC": str(out / "mpi_check.c"), **args}
    build_args = [x for k, v in args.items() for x in ("--build-arg", f"{k}={v}")]
    argv = ["build", *build_args, str(sif), str(out / definition)]
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
    assert res.returncode == 0, f"building {definition} failed:\n{res.stdout}{res.stderr}"
    sif.chmod(0o644)


def _require_tools() -> None:
    require(None if shutil.which("mmdebstrap") else "mmdebstrap is not installed")
    for tool in LAUNCHERS.values():
        require(None if shutil.which(tool) else f"{tool} is not installed (mpich, openmpi-bin)")


@pytest.fixture(scope="session")
def mpi_image(runtime_ready: UserRunner, workdir: Path) -> str:
    """integration/slurm/mpi.def built by sifpy (a Debian image with MPICH and Open MPI and
    the test program built against each)."""
    _require_tools()
    sif = workdir / "mpi" / "mpi.sif"
    _build(runtime_ready, workdir / "mpi", sif, "mpi.def", {})
    return str(sif)


@pytest.fixture(scope="session")
def bullseye_images(
    runtime_ready: UserRunner, workdir: Path, pytestconfig: pytest.Config
) -> Callable[[str], str]:
    """``image(mpi)``: integration/slurm/mpi_bullseye.def built with MPI=mpich or openmpi
    (Debian bullseye: an older MPI and glibc than the host's), for bind mode. Kept in
    pytest's cache dir, keyed by what goes into it, so only the first run pays for the
    build (each takes ~30 s here); copied into the session's world-readable workdir."""
    _require_tools()
    cache = getattr(pytestconfig, "cache", None)
    made: dict[str, str] = {}

    def image(mpi: str) -> str:
        if mpi in made:
            return made[mpi]
        key = hashlib.sha256(mpi.encode())
        for name in ("mpi_bullseye.def", "mpi_check.c"):
            key.update((HERE / name).read_bytes())
        name = f"bullseye-{mpi}-{key.hexdigest()[:16]}.sif"
        sif = workdir / name
        cached = Path(cache.mkdir("sifpy-mpi-bullseye")) / name if cache is not None else None
        if cached is not None and cached.is_file():
            shutil.copy(cached, sif)
            sif.chmod(0o644)
        else:
            _build(
                runtime_ready, workdir / f"bullseye-{mpi}", sif, "mpi_bullseye.def", {"MPI": mpi}
            )
            if cached is not None:
                for old in cached.parent.glob(f"bullseye-{mpi}-*.sif"):
                    old.unlink()
                shutil.copy(sif, cached)
        made[mpi] = str(sif)
        return made[mpi]

    return image

"""MPI bind mode (``--mpi``) as an HPC user runs it: an image built on Debian bullseye with
its MPICH (3.4.1) and glibc (2.31), run with the host's MPICH (Debian 12's) through the
host's ``mpiexec`` and Slurm's ``srun``, 4 ranks in one shared container, default UCX
settings, as the unprivileged test user. Every rank checks its results (mpi_check.c) and
rank 0 reports the MPI library that ran (MPI_Get_library_version): the host's.

An image with bullseye's Open MPI (4.1.0, ``libmpi.so.40``) runs with the host's Open MPI
(Debian 12's, the default ``mpi`` alternative): with nothing configured, under the host's
``mpirun`` and ``srun --mpi=pmix``; rank 0 reports the host's version. The same image
against the host's MPICH (``libmpich.so.12``) is refused, naming both libraries with their
versions.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from integration.conftest import UserRunner
from integration.slurm.cluster import Cluster
from integration.slurm.conftest import LAUNCHERS
from tests.probe import require

pytestmark = pytest.mark.unpriv

RANKS = 4  # the test machine has 2 CPUs: oversubscribed on purpose


def host_mpich() -> str:
    """The host's MPICH library, as its ld.so cache lists it (ldconfig -p)."""
    out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=True).stdout
    found = re.search(r"^\s*libmpich\.so\.12 \(.*x86-64.*\) => (\S+)$", out, re.M)
    require(None if found else "the host has no MPICH (libmpich.so.12; apt install libmpich-dev)")
    assert found is not None
    return found.group(1)


def host_mpich_version() -> str:
    """The host MPICH's version, from its own tool (mpichversion), not from the library."""
    out = subprocess.run(["mpichversion"], capture_output=True, text=True, check=True).stdout
    found = re.search(r"MPICH Version:\s*(\S+)", out)
    assert found is not None, out
    return found.group(1)


def host_open_mpi() -> str:
    """The host's Open MPI library, as its ld.so cache lists it (ldconfig -p)."""
    out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=True).stdout
    found = re.search(r"^\s*libmpi\.so\.40 \(.*x86-64.*\) => (\S+)$", out, re.M)
    require(
        None if found else "the host has no Open MPI (libmpi.so.40; apt install libopenmpi-dev)"
    )
    assert found is not None
    return found.group(1)


def host_open_mpi_version() -> str:
    """The host Open MPI's version, from its own tool (ompi_info), not from the library."""
    out = subprocess.run(["ompi_info", "--version"], capture_output=True, text=True).stdout
    found = re.search(r"Open MPI v(\S+)", out)
    assert found is not None, out
    return found.group(1)


@pytest.fixture(scope="module")
def open_mpi_env(workdir: Path) -> dict[str, str]:
    """Nothing when the host's mpi alternative is Open MPI's (the default this test is
    about; Debian ranks Open MPI first), else a user's sifpy.conf naming only the library:
    its dependencies are still the default closure."""
    lib = os.path.realpath(host_open_mpi())
    alternative = os.path.realpath("/etc/alternatives/libmpi.so-x86_64-linux-gnu")
    if alternative == lib:
        return {}
    conf = workdir / "openmpi.conf"
    conf.write_text(f"mpi library = {lib}\n")
    conf.chmod(0o644)
    return {"SIFPY_CONFIG": str(conf)}


@pytest.fixture(scope="module")
def mpich_conf(workdir: Path) -> str:
    """A user's sifpy.conf ($SIFPY_CONFIG) naming the host's MPICH: this host's mpi
    alternative may be Open MPI's (Debian ranks it first)."""
    conf = workdir / "mpibind.conf"
    conf.write_text(f"mpi library = {host_mpich()}\n")
    conf.chmod(0o644)
    return str(conf)


def _check(res: subprocess.CompletedProcess[str], version: str) -> None:
    """Every rank reported its checks passed, and the host's MPICH ran."""
    assert res.returncode == 0, f"rc={res.returncode}\n{res.stdout}\n{res.stderr}"
    lines = res.stdout.splitlines()
    libraries = [ln for ln in lines if ln.startswith("library: ")]
    assert libraries == [f"library: MPICH Version:\t{version}"], res.stdout + res.stderr
    ranks = sorted(ln for ln in lines if ln.startswith("rank "))
    want = sorted(f"rank {r} of {RANKS}: ring ok, allreduce ok, sendrecv ok" for r in range(RANKS))
    assert ranks == want, res.stdout + res.stderr


def test_bullseye_mpich_runs_the_hosts_mpich_under_mpiexec(
    runtime_ready: UserRunner,
    starter: str,
    bullseye_images: Callable[[str], str],
    mpich_conf: str,
) -> None:
    image = bullseye_images("mpich")
    launcher = [LAUNCHERS["mpich"], "-n", str(RANKS)]
    # Without --mpi the image's own MPICH runs (hybrid mode): the one bind mode replaces.
    own = runtime_ready([*launcher, starter, "exec", image, "mpi_check.mpich"], timeout=180)
    assert own.returncode == 0, own.stdout + own.stderr
    image_version = re.search(r"^library: MPICH Version:\s*(\S+)$", own.stdout, re.M)
    assert image_version is not None, own.stdout
    version = host_mpich_version()
    assert image_version.group(1) != version  # bullseye's is older: the test shows a swap
    # UCX's log says which transports carry the messages (it changes none): CMA, a module
    # in the host's ucx/ directory that only works between ranks of one user namespace.
    res = runtime_ready(
        [*launcher, starter, "exec", "--mpi", image, "mpi_check.mpich"],
        env={"SIFPY_CONFIG": mpich_conf, "UCX_LOG_LEVEL": "info"},
        timeout=180,
    )
    _check(res, version)
    lanes = re.findall(r"ep_cfg\[\d+\]: (.*)", res.stdout + res.stderr)
    assert lanes and all("cma/memory" in ln for ln in lanes), res.stdout + res.stderr
    assert not any("tcp" in ln for ln in lanes), lanes


def test_bullseye_mpich_runs_the_hosts_mpich_under_srun(
    runtime_ready: UserRunner,
    starter: str,
    bullseye_images: Callable[[str], str],
    mpich_conf: str,
    slurm: Cluster,
) -> None:
    image = bullseye_images("mpich")
    launcher = ["srun", "--mpi=pmi2", "-n", str(RANKS), "-O"]
    res = runtime_ready(
        [*launcher, starter, "exec", "--mpi", image, "mpi_check.mpich"],
        env={**slurm.env(), "SIFPY_CONFIG": mpich_conf},
        timeout=180,
    )
    _check(res, host_mpich_version())


def _check_open_mpi(res: subprocess.CompletedProcess[str], version: str) -> None:
    """Every rank reported its checks passed, the host's Open MPI ran, and PMIx said
    nothing wrong."""
    assert res.returncode == 0, f"rc={res.returncode}\n{res.stdout}\n{res.stderr}"
    lines = res.stdout.splitlines()
    libraries = [ln for ln in lines if ln.startswith("library: ")]
    assert len(libraries) == 1, res.stdout + res.stderr
    assert libraries[0].startswith(f"library: Open MPI v{version}, "), libraries
    ranks = sorted(ln for ln in lines if ln.startswith("rank "))
    want = sorted(f"rank {r} of {RANKS}: ring ok, allreduce ok, sendrecv ok" for r in range(RANKS))
    assert ranks == want, res.stdout + res.stderr
    assert "PMIX ERROR" not in res.stderr and "unable to open" not in res.stderr, res.stderr


def test_bullseye_open_mpi_runs_the_hosts_open_mpi_under_mpirun(
    runtime_ready: UserRunner,
    starter: str,
    bullseye_images: Callable[[str], str],
    open_mpi_env: dict[str, str],
) -> None:
    image = bullseye_images("openmpi")
    launcher = ["mpirun.openmpi", "--oversubscribe", "-n", str(RANKS)]
    # Without --mpi the image's own Open MPI runs (hybrid mode): the one bind mode replaces.
    own = runtime_ready([*launcher, starter, "exec", image, "mpi_check.openmpi"], timeout=180)
    assert own.returncode == 0, own.stdout + own.stderr
    image_version = re.search(r"^library: Open MPI v([^,\s]+),", own.stdout, re.M)
    assert image_version is not None, own.stdout
    version = host_open_mpi_version()
    assert image_version.group(1) != version  # bullseye's is older: the test shows a swap
    res = runtime_ready(
        [*launcher, starter, "exec", "--mpi", image, "mpi_check.openmpi"],
        env=open_mpi_env,
        timeout=180,
    )
    _check_open_mpi(res, version)


def test_bullseye_open_mpi_runs_the_hosts_open_mpi_under_srun(
    runtime_ready: UserRunner,
    starter: str,
    bullseye_images: Callable[[str], str],
    open_mpi_env: dict[str, str],
    slurm: Cluster,
) -> None:
    image = bullseye_images("openmpi")
    launcher = ["srun", "--mpi=pmix", "-n", str(RANKS), "-O"]
    res = runtime_ready(
        [*launcher, starter, "exec", "--mpi", image, "mpi_check.openmpi"],
        env={**slurm.env(), **open_mpi_env},
        timeout=180,
    )
    _check_open_mpi(res, host_open_mpi_version())


def test_open_mpi_image_with_host_mpich_is_refused(
    runtime_ready: UserRunner,
    starter: str,
    bullseye_images: Callable[[str], str],
    mpich_conf: str,
) -> None:
    image = bullseye_images("openmpi")
    # The names with every version number, found independently of sifpy's reading: the
    # host file's name, and the image's libmpi.so.40 resolved inside the image.
    host_name = os.path.basename(os.path.realpath(host_mpich()))
    real = runtime_ready(
        [starter, "exec", image, "readlink", "-f", "/usr/lib/x86_64-linux-gnu/libmpi.so.40"]
    )
    assert real.returncode == 0, real.stderr
    image_name = os.path.basename(real.stdout.strip())
    assert image_name.startswith("libmpi.so.40.")
    res = runtime_ready(
        [starter, "exec", "--mpi", image, "mpi_check.openmpi"],
        env={"SIFPY_CONFIG": mpich_conf},
    )
    assert res.returncode == 125, res.stdout + res.stderr
    assert "not ABI-compatible" in res.stderr, res.stderr
    assert f"the host's {host_name} " in res.stderr, res.stderr
    assert f"the image's {image_name} " in res.stderr, res.stderr
    assert "rank " not in res.stdout and "library:" not in res.stdout


def test_image_without_ld_cache_is_refused(
    runtime_ready: UserRunner, starter: str, images: dict[str, Any], mpich_conf: str
) -> None:
    # Only what the image's loader finds through its cache can be replaced (Sarus's rule):
    # the busybox image has none.
    busybox = images["plain"]["sif"]
    res = runtime_ready(
        [starter, "exec", "--mpi", busybox, "true"], env={"SIFPY_CONFIG": mpich_conf}
    )
    assert res.returncode == 125, res.stdout + res.stderr
    assert "can't bind MPI: the image has no ld.so cache" in res.stderr, res.stderr
    assert "hint: run ldconfig" in res.stderr, res.stderr


def test_older_glibc_is_replaced_by_the_hosts(
    runtime_ready: UserRunner,
    starter: str,
    bullseye_images: Callable[[str], str],
    mpich_conf: str,
) -> None:
    # The host's MPI needs the host's glibc (GLIBC_2.34 symbols): bullseye's 2.31 is
    # replaced, loader included. libc.so.6 run as a program prints its own banner.
    image = bullseye_images("mpich")
    libc = "/lib/x86_64-linux-gnu/libc.so.6"
    host = subprocess.run([libc], capture_output=True, text=True).stdout.splitlines()[0]
    own = runtime_ready([starter, "exec", image, libc])
    assert own.returncode == 0 and own.stdout.splitlines()[0] != host, own.stdout + own.stderr
    res = runtime_ready([starter, "exec", "--mpi", image, libc], env={"SIFPY_CONFIG": mpich_conf})
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.splitlines()[0] == host

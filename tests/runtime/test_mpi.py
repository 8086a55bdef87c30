"""The job directories an MPI launcher names, bound into the container."""

from __future__ import annotations

from pathlib import Path

from sifpy.runtime.mpi import launcher_binds


def test_pmix_job_directories_are_bound_once(tmp_path: Path) -> None:
    # As Slurm's srun --mpi=pmix sets them: the data stores live in the server's directory.
    server = tmp_path / "spool" / "pmix.3.0"
    (server / "pmix_dstor_ds21_1").mkdir(parents=True)
    (server / "pmix_dstor_ds12_1").mkdir()
    environ = {
        "PMIX_SERVER_TMPDIR": f"{server}/",
        "PMIX_DSTORE_21_BASE_PATH": f"{server}//pmix_dstor_ds21_1",
        "PMIX_DSTORE_ESH_BASE_PATH": f"{server}//pmix_dstor_ds12_1",
        "PMIX_SYSTEM_TMPDIR": "/tmp",
    }
    assert launcher_binds(environ) == [(str(server), str(server), False)]


def test_only_existing_absolute_directories(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    environ = {
        "PMIX_SERVER_TMPDIR": str(tmp_path / "gone"),
        "PMIX_DSTORE_21_BASE_PATH": "relative/dir",
        "PMIX_DSTORE_ESH_BASE_PATH": str(store),
    }
    assert launcher_binds(environ) == [(str(store), str(store), False)]
    assert launcher_binds({}) == []


def test_every_job_directory_variable_starts_with_pmix() -> None:
    """``sifpy exec`` imports this module only when a variable starting with ``PMIX_`` is
    set (one module less on every other start): a variable named here that didn't would be
    missed."""
    from sifpy.runtime import mpi

    assert mpi.PMIX_DIRS and all(name.startswith("PMIX_") for name in mpi.PMIX_DIRS)

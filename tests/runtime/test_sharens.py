"""Which processes share a container (sifpy.runtime.sharens): the job step a rank belongs
to, and the key that names its container (no namespaces here: see integration/runtime)."""

from __future__ import annotations

import os

import pytest

from sifpy.errors import RuntimeSetupError
from sifpy.runtime import instances, sharens
from sifpy.runtime.spec import LaunchOptions, LaunchSpec
from sifpy.runtime.start import SifPartition


def test_job_step_from_each_launcher() -> None:
    node = os.uname().nodename  # a job's name is the same on every node: the node's isn't
    parent = sharens.parent_step()
    assert parent.startswith(f"parent:{os.getppid()}:") and parent.endswith(f" on {node}")
    cases = {
        f"slurm:12.3 on {node}": {"SLURM_JOB_ID": "12", "SLURM_STEP_ID": "3", "SLURM_PROCID": "1"},
        f"pmix:prterun-x@1 on {node}": {"PMIX_RANK": "0", "PMIX_NAMESPACE": "prterun-x@1"},
        f"ompi:77 on {node}": {"OMPI_COMM_WORLD_RANK": "2", "OMPI_MCA_ess_base_jobid": "77"},
        parent: {"PMI_RANK": "0", "PMI_SIZE": "4"},  # Hydra names no job: its proxy does
    }
    for want, env in cases.items():
        assert sharens.job_step(env) == want
    assert sharens.job_step({}) is None
    # A batch script (a job, no step) is no rank; so is an empty variable.
    assert sharens.job_step({"SLURM_JOB_ID": "12", "PMI_RANK": ""}) is None


@pytest.mark.parametrize(
    ("env", "want"),
    [
        ({"PMI_RANK": "1", "MPI_LOCALNRANKS": "4"}, 4),  # Hydra
        ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_LOCAL_SIZE": "3"}, 3),  # Open MPI
        # Slurm: 2 tasks on each of nodes 0-2, 1 on node 3, 5 on node 4
        ({"SLURM_STEP_ID": "0", "SLURM_NODEID": "0", "SLURM_STEP_TASKS_PER_NODE": "2(x3),1,5"}, 2),
        ({"SLURM_STEP_ID": "0", "SLURM_NODEID": "2", "SLURM_STEP_TASKS_PER_NODE": "2(x3),1,5"}, 2),
        ({"SLURM_STEP_ID": "0", "SLURM_NODEID": "3", "SLURM_STEP_TASKS_PER_NODE": "2(x3),1,5"}, 1),
        ({"SLURM_STEP_ID": "0", "SLURM_NODEID": "4", "SLURM_STEP_TASKS_PER_NODE": "2(x3),1,5"}, 5),
        (
            {"SLURM_STEP_ID": "0", "SLURM_NODEID": "5", "SLURM_STEP_TASKS_PER_NODE": "2(x3),1,5"},
            None,
        ),
        ({"SLURM_STEP_ID": "0", "SLURM_NODEID": "0", "SLURM_STEP_TASKS_PER_NODE": "x"}, None),
        # An mpiexec inside a Slurm step: the innermost launcher counts
        (
            {
                "SLURM_STEP_ID": "0",
                "SLURM_NODEID": "0",
                "SLURM_STEP_TASKS_PER_NODE": "1",
                "MPI_LOCALNRANKS": "8",
            },
            8,
        ),
        ({"PMI_RANK": "0", "PMI_SIZE": "4"}, None),  # nobody says: the holder only lingers
        ({"MPI_LOCALNRANKS": "0"}, None),
    ],
)
def test_local_ranks(env: dict[str, str], want: int | None) -> None:
    assert sharens.local_ranks(env) == want


def test_key_follows_image_user_step_and_mounts(tmp_path: os.PathLike[str]) -> None:
    img = os.path.join(tmp_path, "a.sif")
    with open(img, "wb") as f:
        f.write(b"x" * 4096)
    st = os.stat(img)
    spec = LaunchSpec(SifPartition(img, 0, 4096), ["true"], {"HOME": "/h"}, "/w")
    key = sharens.container_key(spec, "slurm:1.0", st)
    # What the command is and its environment (but HOME) don't make another container.
    same = spec.replace(argv=["other"], env={"HOME": "/h", "X": "1"})
    assert sharens.container_key(same, "slurm:1.0", st) == key
    others = [
        (spec, "slurm:1.1", st),
        (spec.replace(cwd="/elsewhere"), "slurm:1.0", st),
        (spec.replace(binds=[("/a", "/a", True)]), "slurm:1.0", st),
        (spec.replace(options=LaunchOptions(fakeroot=True)), "slurm:1.0", st),
        (spec.replace(image=SifPartition(img, 512, 1024)), "slurm:1.0", st),
    ]
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    others.append((spec, "slurm:1.0", os.stat(img)))
    keys = {sharens.container_key(*args) for args in others}
    assert key not in keys and len(keys) == len(others)


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "x" * 65, "a b"])
def test_instance_names_are_plain(name: str) -> None:
    with pytest.raises(RuntimeSetupError, match="instance name"):
        instances.instance_base(name)

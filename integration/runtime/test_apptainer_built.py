"""SIFs built by Apptainer itself run and inspect through sifpy as through Apptainer.

``apptainer_built/NAME.def`` is built by Debian sid's ``apptainer`` (the fixture
``apptainer_built``, cached), which also runs every line of ``apptainer_built/probes.txt``
on the images (``run``, ``test``, ``--app``, the environment, ``inspect`` and ``sif
list``): Apptainer's own stdout and exit status are what sifpy must print and return here,
as the unprivileged test user. Apptainer exits 255 when it fails itself; sifpy 125 (README,
"Differences from the reference").
"""

from __future__ import annotations

import json
import shlex
import subprocess

import pytest

from integration.conftest import UserRunner
from integration.runtime.conftest import APPTAINER_BUILT, ApptainerBuilt

PROBES = [
    line.partition(" ")[0]
    for line in (APPTAINER_BUILT / "probes.txt").read_text().splitlines()
    if line and not line.startswith("#")
]
# Apptainer's images, and sifpy's (the reverse direction: Apptainer's answers on them are
# what sifpy must give too).
NAMES = [
    *sorted(p.stem for p in APPTAINER_BUILT.glob("*.def")),
    *sorted(f"sifpy-{p.stem}" for p in (APPTAINER_BUILT / "sifpy").glob("*.def")),
]


def sifpy(runner: UserRunner, *args: str) -> subprocess.CompletedProcess[str]:
    return runner(["/usr/bin/python3", "-m", "sifpy", *args], stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("probe", PROBES)
@pytest.mark.parametrize("name", NAMES)
def test_sifpy_answers_as_apptainer(
    runtime_ready: UserRunner, apptainer_built: ApptainerBuilt, name: str, probe: str
) -> None:
    want_rc, want_out = apptainer_built.expected(name, probe)
    image = apptainer_built.images[name]
    args = [image if a == "$SIF" else a for a in shlex.split(apptainer_built.probes[probe])]
    r = sifpy(runtime_ready, *args)
    assert r.returncode == (125 if want_rc == 255 else want_rc), r.stderr
    if probe.endswith("-json"):
        assert json.loads(r.stdout) == json.loads(want_out)
    else:
        assert r.stdout == want_out, r.stderr


@pytest.mark.parametrize("name", NAMES)
def test_siftool_lists_what_sifpy_lists(
    runtime_ready: UserRunner, apptainer_built: ApptainerBuilt, name: str
) -> None:
    """The reference tool and sifpy agree on the objects of a SIF Apptainer wrote."""
    image = apptainer_built.images[name]
    ref = subprocess.run(["siftool", "list", image], capture_output=True, text=True, check=True)
    ours = sifpy(runtime_ready, "sif", "list", image)
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout == ref.stdout

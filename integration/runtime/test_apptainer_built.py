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
from integration.runtime.conftest import APPTAINER_BUILT, ApptainerBuilt, table_cases

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


# Deliberate differences (README, "Differences from the reference"): (image, probe) ->
# sifpy's exit status and the start of its stderr, where Apptainer prints nothing (or, with
# --json, an empty object).
# - a command that is not found: 127 (the shell's and docker's status), not 255;
# - inspect of an app the image doesn't have: an error, where Apptainer prints nothing
#   and exits 0.
DIFFERENCES = {
    **{(n, "not-found"): (127, "sifpy: can't execute: no-such-command: not found") for n in NAMES},
    **{("default", p): (1, "error: no app named foo in this image")
       for p in ("app-labels", "app-runscript", "app-json", "app-environment")},
}  # fmt: skip


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
    if (name, probe) in DIFFERENCES:
        code, stderr = DIFFERENCES[name, probe]
        assert (r.returncode, r.stdout) == (code, ""), r.stderr
        assert want_out in (
            "",
            '{\n\t"data": {\n\t\t"attributes": {}\n\t},\n\t"type": "container"\n}\n',
        )
        assert r.stderr.startswith(stderr)
        return
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


@pytest.mark.parametrize("name", [n for n in NAMES if n.startswith("sifpy-")])
def test_apptainer_reads_the_metadata_sifpy_stores(
    apptainer_built: ApptainerBuilt, name: str
) -> None:
    """Apptainer's inspect decodes a sifpy-built SIF's inspect-metadata.json (an app's
    environment is a map of files there); a shape it can't decode makes it warn "Unable to
    read inspect-metadata.json SIF descriptor" on every inspect, and read the image."""
    for probe, args in apptainer_built.probes.items():
        if args.startswith("inspect"):
            err = (apptainer_built.results / f"{name}.{probe}.err").read_text()
            assert "inspect-metadata.json" not in err, (probe, err)


def test_a_current_siftool_lists_sifpys_oci_sif_as_such(
    runtime_ready: UserRunner, apptainer_built: ApptainerBuilt
) -> None:
    """An OCI-SIF sifpy writes (``pull --oci``, ``export.write_ocisif``) lists as one with
    Debian sid's siftool, which knows the OCI data types: the root index and the blobs by
    name, and sifpy lists the same objects."""
    listing = (apptainer_built.results / "sifpy-custom.ocisif.siftool-list").read_text()
    kinds = [line.rsplit("|", 1)[-1].strip() for line in listing.splitlines() if "|" in line]
    assert kinds[1:] == ["OCI.Blob"] * 3 + ["OCI.RootIndex"], listing  # kinds[0]: header
    # sifpy's own listing names the same objects in the same order.
    image = apptainer_built.results / "sifpy-custom.ocisif"
    ours = sifpy(runtime_ready, "sif", "list", str(image))
    assert ours.returncode == 0, ours.stderr
    assert [
        line.rsplit("|", 1)[-1].strip() for line in ours.stdout.splitlines() if "|" in line
    ] == kinds


@pytest.mark.parametrize(
    ("case", "want", "command"), table_cases(), ids=[c[0] for c in table_cases()]
)
def test_the_ported_tables_hold_on_apptainer(
    apptainer_built: ApptainerBuilt, case: str, want: str, command: str
) -> None:
    """The expected values ported from Apptainer's e2e tables (which the conformance tests
    hold sifpy to) are what Apptainer itself prints, on the images it built."""
    out = (apptainer_built.results / f"table.{case}.out").read_text()
    err = (apptainer_built.results / f"table.{case}.err").read_text()
    assert out.removesuffix("\n") == want, err

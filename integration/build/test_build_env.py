"""``%setup`` sees ``$APPTAINER_ROOTFS``/``$SIFPY_ROOTFS``; ``%post`` writes to
``$APPTAINER_ENVIRONMENT`` and ``$APPTAINER_LABELS`` and the image keeps both, as Apptainer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

DEF = """Bootstrap: busybox
MirrorURL: file:///bin/busybox

%setup
    echo from-setup > "$SIFPY_ROOTFS/setup-marker"
    test "$APPTAINER_ROOTFS" = "$SIFPY_ROOTFS"

%post
    echo 'export FROMPOST=yes' >> "$APPTAINER_ENVIRONMENT"
    echo 'post.label from-post' >> "$APPTAINER_LABELS"
    cat /setup-marker > /post-saw-setup

%environment
    export FROMENV=env

%labels
    def.label from-def
"""


def sifpy(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sifpy", *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
    )


def test_build_environment_variables(tmp_path: Path) -> None:
    deffile, sif = tmp_path / "e.def", tmp_path / "e.sif"
    deffile.write_text(DEF)
    r = sifpy("build", sif, deffile)
    assert r.returncode == 0, r.stderr
    r = sifpy("exec", sif, "sh", "-c", 'echo "$FROMPOST $FROMENV"; cat /post-saw-setup')
    assert r.stdout == "yes env\nfrom-setup\n", r.stderr
    labels = json.loads(sifpy("inspect", "--json", sif).stdout)["data"]["attributes"]["labels"]
    assert labels["post.label"] == "from-post" and labels["def.label"] == "from-def"

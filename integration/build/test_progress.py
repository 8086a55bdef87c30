"""Progress: a rich display on a terminal, plain log lines otherwise, nothing with -q."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import require

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "busybox-hello.def"


def test_terminal_gets_a_live_display(tmp_path: Path) -> None:
    require(shutil.which("script") is not None, "script (util-linux) is not installed")
    out = tmp_path / "p.sif"
    cmd = f"{sys.executable} -m sifpy build {out} {RECIPE}"
    r = subprocess.run(
        ["script", "-qec", cmd, "/dev/null"], capture_output=True, text=True, cwd=REPO, check=False
    )
    assert r.returncode == 0, r.stdout
    assert "\x1b[" in r.stdout  # cursor control from the live display
    assert "creating squashfs (zstd:3): done (" in r.stdout


def test_pipe_gets_plain_lines(tmp_path: Path) -> None:
    out = tmp_path / "p.sif"
    r = subprocess.run([sys.executable, "-m", "sifpy", "build", str(out), str(RECIPE)],
                       capture_output=True, text=True, cwd=REPO, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "\x1b[" not in r.stderr
    assert "creating squashfs (zstd:3)\n" in r.stderr and "build complete" in r.stderr
    r = subprocess.run([sys.executable, "-m", "sifpy", "-q", "build", "--force", str(out), str(RECIPE)],
                       capture_output=True, text=True, cwd=REPO, check=False)  # fmt: skip
    assert r.returncode == 0 and r.stderr == ""

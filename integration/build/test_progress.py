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
    require(None if shutil.which("script") is not None else "script (util-linux) is not installed")
    out = tmp_path / "p.sif"
    cmd = f"{sys.executable} -m sifpy build {out} {RECIPE}"
    r = subprocess.run(
        ["script", "-qec", cmd, "/dev/null"], capture_output=True, text=True, cwd=REPO, check=False
    )
    assert r.returncode == 0, r.stdout
    assert "\x1b[" in r.stdout  # cursor control from the live display
    assert "creating squashfs (zstd:3): done (" in r.stdout
    assert "0/?" not in r.stdout  # no count while the total is unknown


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


def test_debootstrap_shows_a_spinner(tmp_path: Path) -> None:
    """mmdebstrap --quiet is silent for 20-35 s: on a terminal a spinner and a clock run."""
    import os
    import signal
    import time

    require(None if shutil.which("script") is not None else "script (util-linux) is not installed")
    require(None if shutil.which("mmdebstrap") is not None else "mmdebstrap is not installed")
    deffile = tmp_path / "d.def"
    deffile.write_text("Bootstrap: debootstrap\nOSVersion: bookworm\n")
    cmd = f"{sys.executable} -m sifpy build {tmp_path / 'd.sif'} {deffile}"
    proc = subprocess.Popen(
        ["script", "-qfec", cmd, "/dev/null"],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        cwd=REPO,
        start_new_session=True,
    )
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    seen = b""
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
            seen += proc.stdout.read() or b""
            text = seen.decode(errors="replace")
            frames = {ch for ch in text if 0x2800 <= ord(ch) <= 0x28FF}  # rich's dots spinner
            if "bootstrapping Debian bookworm" in text and len(frames) >= 3 and "0:00:" in text:
                break
        else:
            raise AssertionError(f"no spinner while bootstrapping: {seen[-2000:]!r}")
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

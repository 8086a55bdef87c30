"""A killed build leaves nothing at the destination, and no process or stray data behind.

SIGKILL can't be caught: the container (own PID namespace) and mksquashfs die through
PR_SET_PDEATHSIG, and the work directory is removed by the next build in the same place.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from .conftest import Builder

POST_DEF = "Bootstrap: busybox\n\n%post\n    echo POST-STARTED\n    sleep 97\n"
SQUASH_DEF = """\
Bootstrap: busybox

%setup
    head -c 150000000 /dev/urandom > "$SIFPY_ROOTFS/big"
"""


def _wait_for(proc: subprocess.Popen[str], marker: str, timeout: float = 120) -> list[str]:
    assert proc.stdout is not None
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            return seen
        assert time.monotonic() < deadline, "".join(seen)
    raise AssertionError(f"build ended before {marker!r}:\n{''.join(seen)}")


def _running(uid: int, pattern: str) -> bool:
    found = subprocess.run(["pgrep", "-u", str(uid), "-f", pattern], capture_output=True)
    return found.returncode == 0


def _gone(uid: int, pattern: str, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _running(uid, pattern):
            return True
        time.sleep(0.2)
    return False


def _kill_and_check(builder: Builder, name: str, text: str, marker: str, pattern: str) -> None:
    deffile = builder.out / f"{name}.def"
    deffile.write_text(text)
    os.chmod(deffile, 0o644)
    dest = builder.out / f"{name}.sif"
    proc = builder.popen(["build", str(dest), str(deffile)])
    try:
        _wait_for(proc, marker)
        uid = builder.runner.user.uid if builder.identity == "user" else 0
        deadline = time.monotonic() + 10
        while not _running(uid, pattern):  # kill it in the middle of the step, not before
            assert time.monotonic() < deadline, f"{pattern} never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not dest.exists()
    assert _gone(uid, pattern), f"a process of the killed build survived: {pattern}"
    # The next build in the same place removes the killed build's work directory.
    res = builder.run(
        [
            "build",
            "--force",
            str(builder.out / "after.sif"),
            str(builder.recipes / "busybox-hello.def"),
        ]
    )
    assert res.returncode == 0, res.stderr
    assert not list(Path(builder.out).glob(".sifpy-build-*"))
    assert not dest.exists()


def test_sigkill_during_post(user_builder: Builder) -> None:
    _kill_and_check(user_builder, "kill-post", POST_DEF, "POST-STARTED", "sleep 97")


def test_sigkill_during_mksquashfs(user_builder: Builder) -> None:
    _kill_and_check(user_builder, "kill-squash", SQUASH_DEF, "creating squashfs", "mksquashfs")

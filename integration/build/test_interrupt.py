"""Ctrl-C and SIGTERM during a build, sent to the process group (as a terminal or a batch
system does), as the unprivileged test user: "interrupted", 130/143, within seconds,
nothing at the destination, no process and no work directory left."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from integration.build.conftest import Builder, need_debian
from integration.oci.test_interrupt import interrupt

POST_DEF = "Bootstrap: busybox\n\n%post\n    echo POST-STARTED\n    sleep 97\n"
DEBIAN_DEF = "Bootstrap: debootstrap\nOSVersion: bookworm\n"


def _interrupt_build(
    builder: Builder, name: str, text: str, marker: str, sig: int, wait: float = 1
) -> None:
    d = builder.out / f"int-{name}-{sig}"
    d.mkdir()
    os.chown(d, builder.runner.user.uid, builder.runner.user.gid)
    (d / "x.def").write_text(text)
    proc = builder.runner.popen(
        builder.argv(["build", str(d / "x.sif"), str(d / "x.def")]),
        stdout=None,
        stderr=subprocess.PIPE,
        start_new_session=True,
        cwd=str(d),
    )
    assert proc.stderr is not None
    seen = ""
    deadline = time.monotonic() + 120
    while marker not in seen:
        line = proc.stderr.readline()
        assert line and time.monotonic() < deadline, seen
        seen += line
    time.sleep(wait)  # into the step's work
    status, err, took = interrupt(proc, sig)
    err = seen + err
    assert status == 128 + sig, err
    assert err.splitlines()[-1] == "error: interrupted", err
    assert len(err) - len(seen) < 200, err  # no page of a tool's errors
    assert took < 5, f"took {took:.1f}s to stop"
    assert sorted(os.listdir(d)) == ["x.def"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_post(user_builder: Builder, sig: signal.Signals) -> None:
    _interrupt_build(user_builder, "post", POST_DEF, "POST-STARTED", sig)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_debootstrap(user_builder: Builder, sig: signal.Signals) -> None:
    need_debian()
    _interrupt_build(user_builder, "debian", DEBIAN_DEF, "bootstrapping Debian", sig, 8)

"""The action script's ``test`` action says and returns what Apptainer does when there is
no test to run (https://github.com/apptainer/apptainer, ``internal/pkg/build/sources/test.sh``
for the image, ``internal/pkg/util/fs/files/action_script.sh`` for an app). The host has
no ``/.singularity.d/test`` nor ``/scif``: the script runs here on the host's shell."""

from __future__ import annotations

import os
import subprocess

from sifpy.runtime.action import action_argv


def _test(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    assert not os.path.exists("/.singularity.d/test") and not os.path.exists("/scif")
    env = {"PATH": "/usr/bin:/bin", **env}
    return subprocess.run(action_argv("test", []), env=env, capture_output=True, text=True)


def test_no_test_script_is_a_success_said_on_stdout() -> None:
    r = _test({})
    assert (r.returncode, r.stdout) == (
        0,
        "No test found in container, executing /bin/sh -c true\n",
    )


def test_no_test_in_the_app_is_a_failure_said_on_stderr() -> None:
    r = _test({"APPTAINER_APPNAME": "foo"})
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr == "No tests for contained app: foo\n"

"""OCI hooks from hooks.d directories (``--hooks-dir``, JSON 1.0.0) end to end, as the test
user, through ``python3 -m sifpy`` and through the starter (which serves the image before
Python starts: the hooks must run all the same).

Every hook writes its proof (its stage, the state it read on stdin, what the bundle's
config.json says) to a directory in the user's home: not under /tmp, which the runtime's
session covers before the first hooks run, as a real hook lives in /usr/libexec.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from integration.conftest import UserRunner
from integration.runtime.conftest import user_processes

# Host-side hooks (every stage but startContainer): argv is [name, tag, stage].
PROOF = """#!/usr/bin/python3 -I
import json, os, sys
state = json.load(sys.stdin)
tag, stage = sys.argv[1], sys.argv[2]
config = json.load(open(os.path.join(state["bundle"], "config.json")))
root = config["root"]["path"]
proof = {"stage": stage, "state": state, "config_annotations": config.get("annotations"),
         "root_has_busybox": os.path.exists(root + "/bin/busybox"), "env": dict(os.environ)}
out = os.environ["OUT"]
with open(os.path.join(out, tag + "." + stage + ".json"), "w") as f:
    json.dump(proof, f)
with open(os.path.join(out, "order"), "a") as f:
    f.write(tag + "." + stage + "\\n")
"""

STAGES = ("prestart", "createRuntime", "createContainer", "poststart", "poststop")


def _hook(tag: str, stage: str, proof: str, out: Path, when: dict[str, Any]) -> dict[str, Any]:
    return {
        "version": "1.0.0",
        "hook": {"path": proof, "args": ["proof", tag, stage], "env": [f"OUT={out}"]},
        "when": when,
        "stages": [stage],
    }


@pytest.fixture()
def hooks_home(runtime_ready: UserRunner) -> Path:
    """A fresh directory in the test user's home: site/ and user/ hook dirs, out/, proof."""
    user = runtime_ready.user
    top = Path(user.home) / "hooksd-it"
    if top.exists():
        shutil.rmtree(top)
    for sub in ("site", "user", "out"):
        (top / sub).mkdir(parents=True)
    (top / "proof").write_text(PROOF)
    (top / "proof").chmod(0o755)
    for dirpath, dirnames, filenames in os.walk(top):
        for name in [*dirnames, *filenames, "."]:
            os.chown(os.path.join(dirpath, name), user.uid, user.gid)
    return top


def _write(path: Path, data: dict[str, Any], runner: UserRunner) -> None:
    path.write_text(json.dumps(data))
    os.chown(path, runner.user.uid, runner.user.gid)


@pytest.fixture(params=["python", "starter"])
def program(request: pytest.FixtureRequest, runtime_ready: UserRunner) -> list[str]:
    if request.param == "starter":
        return [request.getfixturevalue("starter")]
    return ["/usr/bin/python3", "-m", "sifpy"]


def _proofs(out: Path) -> dict[str, Any]:
    return {
        p.name[: -len(".json")]: json.loads(p.read_text())
        for p in out.iterdir()
        if p.suffix == ".json"
    }


@pytest.mark.unpriv
def test_every_stage_and_condition(
    runtime_ready: UserRunner,
    images: dict[str, Any],
    hooks_home: Path,
    program: list[str],
    no_leftovers: None,
) -> None:
    site, user, out = hooks_home / "site", hooks_home / "user", hooks_home / "out"
    proof = str(hooks_home / "proof")
    w = runtime_ready
    for stage in STAGES:  # one per stage, always
        _write(
            site / f"10-always-{stage}.json",
            _hook("always", stage, proof, out, {"always": True}),
            w,
        )
    # startContainer runs inside the container: a program of the image, writing to the
    # home the container shares.
    start = {
        "version": "1.0.0",
        "hook": {
            "path": "/bin/sh",
            "args": ["sh", "-c", 'cat > "$OUT/always.startContainer.json"'],
            "env": [f"OUT={out}"],
        },
        "when": {"always": True},
        "stages": ["startContainer"],
    }
    _write(site / "10-always-startContainer.json", start, w)
    # One per `when` kind, each matching the first run only.
    when_kinds = {
        "20-annotation": ("createRuntime", {"annotations": {"^com\\.example\\.dept$": "fluid"}}),
        "21-command": ("createContainer", {"commands": ["^/bin/sh$", "^sh$"]}),
        "22-binds": ("prestart", {"hasBindMounts": True}),
    }
    for name, (stage, when) in when_kinds.items():
        _write(site / f"{name}.json", _hook(name, stage, proof, out, when), w)
    # Never matching: each must NOT run.
    never = {
        "30-never-annotation": {"annotations": {"^com\\.example\\.dept$": "^chemistry$"}},
        "31-never-command": {"commands": ["python"]},
        "32-never-always": {"always": False},
        "33-never-binds": {"hasBindMounts": False},
        "34-never-all-of": {"always": True, "commands": ["^nope$"]},  # every condition must hold
    }
    for name, when in never.items():
        _write(site / f"{name}.json", _hook(name, "prestart", proof, out, when), w)
    # A same-named file of a later directory masks the earlier one's.
    _write(
        site / "40-masked.json", _hook("masked-site", "poststop", proof, out, {"always": True}), w
    )
    _write(
        user / "40-masked.json", _hook("masked-user", "poststop", proof, out, {"always": True}), w
    )
    os.chmod(hooks_home, 0o755)
    data = hooks_home / "data"
    data.mkdir()
    os.chown(data, w.user.uid, w.user.gid)

    image = images["plain"]["sif"]
    dirs = ["--hooks-dir", str(site), "--hooks-dir", str(user)]
    res = w(
        [
            *program,
            "-v",
            "exec",
            *dirs,
            "--annotation",
            "com.example.dept=fluid-dynamics",
            "-B",
            f"{data}:/data",
            image,
            "sh",
            "-c",
            "echo the command ran",
        ],
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout == "the command ran\n"
    # Through the starter, the image was served before Python started: hooks run all the same.
    served = "the starter entered the namespaces and served the image" in res.stderr
    assert served == (program[0] != "/usr/bin/python3"), res.stderr
    proofs = _proofs(out)
    expected = {f"always.{s}" for s in (*STAGES, "startContainer")}
    expected |= {"20-annotation.createRuntime", "21-command.createContainer", "22-binds.prestart"}
    expected |= {"masked-user.poststop"}
    assert set(proofs) == expected
    # The runtime spec's order: prestart, createRuntime, createContainer (then the command,
    # poststart, poststop); within a stage, by file name.
    order = (out / "order").read_text().split()
    assert order[:6] == [
        "always.prestart",
        "22-binds.prestart",
        "always.createRuntime",
        "20-annotation.createRuntime",
        "always.createContainer",
        "21-command.createContainer",
    ]
    assert order[-2:] == ["always.poststop", "masked-user.poststop"]
    status = {
        "prestart": "creating",
        "createRuntime": "creating",
        "createContainer": "creating",
        "poststart": "running",
        "poststop": "stopped",
    }
    for name, p in proofs.items():
        if name == "always.startContainer":
            continue
        state = p["state"]
        assert state["status"] == status[p["stage"]], name
        assert state["ociVersion"] and state["id"].startswith("sifpy-") and state["pid"] > 0
        assert state["annotations"] == {"com.example.dept": "fluid-dynamics"}
        assert p["config_annotations"] == {"com.example.dept": "fluid-dynamics"}
        assert p["root_has_busybox"], name  # the bundle's root.path is the container's root
        # Exactly the definition's environment (Python, the hook, coerces the C locale
        # and says so in LC_CTYPE: PEP 538).
        assert {k: v for k, v in p["env"].items() if k != "LC_CTYPE"} == {"OUT": str(out)}
    started = proofs["always.startContainer"]
    assert started["status"] == "created"
    assert started["annotations"] == {"com.example.dept": "fluid-dynamics"}

    # Again without annotation, bind or sh: only the unconditional hooks run.
    for p in out.iterdir():
        p.unlink()
    res = w([*program, "exec", *dirs, image, "true"])
    assert res.returncode == 0, res.stderr
    expected = {f"always.{s}" for s in (*STAGES, "startContainer")} | {"masked-user.poststop"}
    assert set(_proofs(out)) == expected


@pytest.mark.unpriv
def test_failing_hook_stops_the_start(
    runtime_ready: UserRunner,
    images: dict[str, Any],
    hooks_home: Path,
    program: list[str],
    no_leftovers: None,
) -> None:
    site, out = hooks_home / "site", hooks_home / "out"
    w = runtime_ready
    failing = hooks_home / "failing"
    failing.write_text("#!/bin/sh\necho 'site-hook: the licence server is down' >&2\nexit 3\n")
    failing.chmod(0o755)
    _write(
        site / "50-fail.json",
        {
            "version": "1.0.0",
            "hook": {"path": str(failing)},
            "when": {"always": True},
            "stages": ["createRuntime"],
        },
        w,
    )
    # poststart must not run for a container whose command never started.
    _write(
        site / "60-post.json",
        _hook("post", "poststart", str(hooks_home / "proof"), out, {"always": True}),
        w,
    )
    res = w(
        [
            *program,
            "exec",
            "--hooks-dir",
            str(site),
            images["plain"]["sif"],
            "sh",
            "-c",
            "echo the command ran",
        ]
    )
    assert res.returncode == 125
    assert res.stdout == ""
    assert (
        f"error: can't run createRuntime hook: {failing}: exit status 3: "
        "site-hook: the licence server is down" in res.stderr
    ), res.stderr
    assert f"hint: the hook is defined in {site}/50-fail.json" in res.stderr
    assert list(out.iterdir()) == []


@pytest.mark.unpriv
def test_hook_timeout(
    runtime_ready: UserRunner,
    images: dict[str, Any],
    hooks_home: Path,
    program: list[str],
    no_leftovers: None,
) -> None:
    site = hooks_home / "site"
    w = runtime_ready
    slow = hooks_home / "slow"
    # A child in the background too: the whole hook goes at its timeout.
    slow.write_text("#!/bin/sh\nsleep 300 &\nsleep 300\n")
    slow.chmod(0o755)
    _write(
        site / "50-slow.json",
        {
            "version": "1.0.0",
            "hook": {"path": str(slow), "timeout": 2},
            "when": {"always": True},
            "stages": ["prestart"],
        },
        w,
    )
    t0 = time.monotonic()
    res = w([*program, "exec", "--hooks-dir", str(site), images["plain"]["sif"], "true"])
    elapsed = time.monotonic() - t0
    assert res.returncode == 125
    assert f"error: can't run prestart hook: {slow}: timed out after 2 s" in res.stderr, res.stderr
    assert elapsed < 2 + 8, elapsed  # the timeout, plus a start on a loaded machine
    # Nothing left: neither running nor as a zombie nobody reaps.
    assert user_processes(w.user.uid, "sleep") == []


@pytest.mark.unpriv
def test_bad_hook_file_names_file_and_field(
    runtime_ready: UserRunner, images: dict[str, Any], hooks_home: Path, no_leftovers: None
) -> None:
    site = hooks_home / "site"
    w = runtime_ready
    _write(
        site / "70-typo.json",
        {
            "version": "1.0.0",
            "hook": {"path": "/bin/true"},
            "when": {"always": True},
            "stages": ["prestart", "prestrat"],
        },
        w,
    )
    res = w(
        [
            "/usr/bin/python3",
            "-m",
            "sifpy",
            "exec",
            "--hooks-dir",
            str(site),
            images["plain"]["sif"],
            "echo",
            "ran",
        ]
    )
    assert res.returncode == 125
    assert res.stdout == ""
    assert (
        f"error: can't read hook: {site}/70-typo.json: stages[1]: unknown stage 'prestrat'"
        in res.stderr
    )
    res = w(
        [
            "/usr/bin/python3",
            "-m",
            "sifpy",
            "exec",
            "--hooks-dir",
            str(hooks_home / "nope"),
            images["plain"]["sif"],
            "true",
        ]
    )
    assert res.returncode == 125
    assert f"can't read hooks directory: {hooks_home / 'nope'}: no such directory" in res.stderr


@pytest.mark.unpriv
def test_poststart_poststop_with_a_pid_namespace(
    runtime_ready: UserRunner,
    images: dict[str, Any],
    hooks_home: Path,
    no_leftovers: None,
) -> None:
    """With ``--pid`` the hooks after the start still run: a poststart hook outlives a short
    command (the namespace's end kills every process in it), and a poststop hook starts
    once the namespace's init is gone (it takes no new process then)."""
    site, out = hooks_home / "site", hooks_home / "out"
    proof = str(hooks_home / "proof")
    for stage in ("poststart", "poststop"):
        hook = _hook("pid", stage, proof, out, {"always": True})
        if stage == "poststart":  # slower than the command: must not be killed with it
            hook["hook"]["path"] = "/bin/sh"
            hook["hook"]["args"] = ["sh", "-c", f"sleep 0.5; {proof} pid poststart"]
        _write(site / f"10-{stage}.json", hook, runtime_ready)
    image = images["plain"]["sif"]
    res = runtime_ready(
        [
            "/usr/bin/python3",
            "-m",
            "sifpy",
            "exec",
            "--pid",
            "--hooks-dir",
            str(site),
            image,
            "true",
        ]
    )
    assert res.returncode == 0 and "warning" not in res.stderr, res.stderr
    proofs = _proofs(out)
    assert set(proofs) == {"pid.poststart", "pid.poststop"}, res.stderr
    assert proofs["pid.poststop"]["state"]["status"] == "stopped"
    assert proofs["pid.poststart"]["state"]["pid"] > 1  # the host's pid of the command

"""runtime.hooksd (hook files: validation, order, masking, ``when``), runtime.hooks (the
runner: state on stdin, status and stderr in the error, the timeout) and how ``sifpy exec``
finds them (sifpy.conf's ``hooks dir``, ``--hooks-dir``; nothing imported without hooks).
The end-to-end runs, as the test user, are in integration/runtime/test_hooksd.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from sifpy.cli import exec as exec_
from sifpy.errors import RuntimeSetupError, UsageError
from sifpy.runtime import hooks, hooksd
from sifpy.sign import policy

REPO = Path(__file__).resolve().parents[2]
GOOD: dict[str, Any] = {
    "version": "1.0.0",
    "hook": {"path": "/bin/true"},
    "when": {"always": True},
    "stages": ["prestart"],
}


def write(d: Path, name: str, data: Any) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    p = d / name
    p.write_text(data if isinstance(data, str) else json.dumps(data))
    return p


def edit(**changes: Any) -> dict[str, Any]:
    """GOOD with top-level or dotted (``hook.path``) fields changed; None deletes."""
    data = json.loads(json.dumps(GOOD))
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        target = data
        for p in parents:
            target = target[p]
        if value is None:
            target.pop(key)
        else:
            target[key] = value
    return data


BAD = [
    ("{", "not valid JSON"),
    ([1], r"\(top level\): must be an object"),
    (edit(version=None), "version: is required"),
    (edit(version="0.1.0"), "version: is '0.1.0', sifpy reads only '1.0.0'"),
    (edit(hook=None), r"hook: is required \(an object\)"),
    (edit(hook__path=None), r"hook.path: is required"),
    (edit(hook__path="bin/true"), "hook.path: must be absolute: 'bin/true'"),
    (edit(hook__args="true"), "hook.args: must be a list of strings"),
    (edit(hook__env=["NOEQUALS"]), "hook.env: each entry must be KEY=VALUE"),
    (edit(hook__timeout=0), "hook.timeout: must be a whole number of seconds greater than zero"),
    (edit(hook__timeout=True), "hook.timeout: must be a whole number"),
    (edit(when=None), r"when: is required \(an object\)"),
    (edit(when={}), "when: needs at least one condition: always, annotations"),
    (edit(when={"alway": True}), "when: needs at least one condition"),
    (edit(when={"always": "yes"}), "when.always: must be true or false"),
    (edit(when={"hasBindMounts": 1}), "when.hasBindMounts: must be true or false"),
    (edit(when={"annotations": ["a"]}), "when.annotations: must map key patterns"),
    (edit(when={"annotations": {"[": "a"}}), r"when.annotations key '\[': invalid regular"),
    (edit(when={"annotations": {"a": "("}}), r"when.annotations\['a'\]: invalid regular"),
    (edit(when={"commands": "sh"}), "when.commands: must be a list of patterns"),
    (edit(when={"commands": ["ok", "*bad"]}), r"when.commands\[1\]: invalid regular"),
    (edit(stages=None), "stages: is required"),
    (edit(stages=[]), "stages: is required"),
    (edit(stages=["prestart", "precreate"]), r"stages\[1\]: unknown stage 'precreate'"),
]


@pytest.mark.parametrize(("data", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_hook_names_file_and_field(tmp_path: Path, data: Any, message: str) -> None:
    path = write(tmp_path / "d", "01-bad.json", data)
    with pytest.raises(RuntimeSetupError, match=f"^can't read hook: {path}: {message}") as e:
        hooksd.matching([str(tmp_path / "d")], ["sh"])
    assert e.value.exit_status == 125
    assert e.value.hint and "version, hook" in e.value.hint


def test_order_masking_and_missing_dirs(tmp_path: Path) -> None:
    site, user = tmp_path / "site", tmp_path / "user"
    for name in ("02-b.json", "01-UPPER.json", "01-a.json", "10-masked.json"):
        write(site, name, edit(hook__args=["site", name]))
    write(site, "README", "not a hook")
    write(user, "10-masked.json", edit(hook__args=["user"], stages=["prestart", "poststop"]))
    found = hooksd.matching([str(tmp_path / "nope"), str(site), str(user)], ["sh"])
    # By lower-cased file name (podman's order); the later directory's file wins.
    assert [(h["stage"], h["args"]) for h in found] == [
        ("prestart", ["site", "01-a.json"]),
        ("prestart", ["site", "01-UPPER.json"]),
        ("prestart", ["site", "02-b.json"]),
        ("prestart", ["user"]),
        ("poststop", ["user"]),
    ]
    assert found[-1]["source"] == str(user / "10-masked.json")
    assert found[0] == {
        "stage": "prestart",
        "path": "/bin/true",
        "args": ["site", "01-a.json"],
        "env": [],
        "timeout": None,
        "source": str(site / "01-a.json"),
    }
    # Named explicitly (--hooks-dir), a missing directory is an error.
    with pytest.raises(RuntimeSetupError, match=r"can't read hooks directory: .*nope: no such"):
        hooksd.matching([str(tmp_path / "nope")], ["sh"], required=[str(tmp_path / "nope")])


def test_no_args_means_the_path(tmp_path: Path) -> None:
    write(tmp_path, "a.json", GOOD)
    assert hooksd.matching([str(tmp_path)], ["x"])[0]["args"] == ["/bin/true"]


CASES = [
    # (when, argv0, annotations, has_binds, expected)
    ({"always": True}, "sh", {}, False, True),
    ({"always": False}, "sh", {}, False, False),
    ({"hasBindMounts": True}, "sh", {}, True, True),
    ({"hasBindMounts": True}, "sh", {}, False, False),
    ({"hasBindMounts": False}, "sh", {}, True, False),
    ({"commands": [".*/init$", "^sh$"]}, "sh", {}, False, True),
    ({"commands": [".*/init$"]}, "/sbin/init", {}, False, True),
    ({"commands": ["init"]}, "/bin/sh", {}, False, False),
    ({"commands": ["bin"]}, "/usr/bin/python3", {}, False, True),  # a search, as Go's
    ({"annotations": {"^a\\.b$": "fluid"}}, "x", {"a.b": "cfd-fluid-x"}, False, True),
    ({"annotations": {"^a\\.b$": "^fluid$"}}, "x", {"a.b": "cfd-fluid-x"}, False, False),
    ({"annotations": {"^a\\.b$": ".*"}}, "x", {"a.bc": "1"}, False, False),
    ({"annotations": {"a": "1", "b": "2"}}, "x", {"a": "1"}, False, False),  # each pair
    ({"annotations": {"a": "1", "b": "2"}}, "x", {"a": "1", "b": "2"}, False, True),
    ({"always": True, "commands": ["^sh$"]}, "bash", {}, False, False),  # all must hold
    ({"always": True, "commands": ["sh$"], "hasBindMounts": True}, "bash", {}, True, True),
]


@pytest.mark.parametrize(("when", "argv0", "annotations", "binds", "expected"), CASES)
def test_when(
    tmp_path: Path,
    when: dict[str, Any],
    argv0: str,
    annotations: dict[str, str],
    binds: bool,
    expected: bool,
) -> None:
    write(tmp_path, "h.json", edit(when=when))
    found = hooksd.matching([str(tmp_path)], [argv0], annotations, binds)
    assert bool(found) == expected


def _hook(tmp_path: Path, script: str, stage: str = "prestart", **kw: Any) -> dict[str, object]:
    prog = tmp_path / f"hook-{stage}"
    prog.write_text("#!/bin/sh\n" + script)
    prog.chmod(0o755)
    return {"stage": stage, "path": str(prog), "args": ["h"], "env": [], "timeout": None, **kw}


def test_runner_state_env_and_order(tmp_path: Path) -> None:
    out = tmp_path / "out"
    script = f'cat > {out}-$1.json; env > {out}-$1.env; echo "$1" >> {out}.order\n'
    a = _hook(tmp_path, script, "createContainer", args=["h", "a"], env=["K=v"])
    b = _hook(tmp_path, script, "prestart", args=["h", "b"])
    hooks.run([a, b], hooks.BEFORE_PIVOT, hooks.state("/bundle", "creating", {"x": "1"}, pid=4242))
    assert (tmp_path / "out.order").read_text().split() == ["b", "a"]  # prestart first
    state = json.loads((tmp_path / "out-a.json").read_text())
    assert state == {
        "ociVersion": hooks.OCI_VERSION,
        "id": "sifpy-4242",
        "status": "creating",
        "pid": 4242,
        "bundle": "/bundle",
        "annotations": {"x": "1"},
    }
    env = (tmp_path / "out-a.env").read_text().split()
    assert "K=v" in env and not any(e.startswith("HOME=") for e in env)


def test_runner_failure_has_status_and_stderr(tmp_path: Path) -> None:
    hook = _hook(
        tmp_path, "echo first >&2; echo 'quota exceeded' >&2; exit 4\n", source="/d/x.json"
    )
    with pytest.raises(RuntimeSetupError) as e:
        hooks.run([hook], ("prestart",), hooks.state("/b", "creating"))
    assert e.value.message == (
        f"can't run prestart hook: {hook['path']}: exit status 4: first\nquota exceeded"
    )
    assert e.value.hint == "the hook is defined in /d/x.json"
    missing = {**hook, "path": str(tmp_path / "nope")}
    with pytest.raises(RuntimeSetupError, match=r"prestart hook: .*/nope: not found"):
        hooks.run([missing], ("prestart",), hooks.state("/b", "creating"))


def test_runner_timeout_kills_the_whole_hook(tmp_path: Path) -> None:
    pidfile = tmp_path / "child"
    hook = _hook(tmp_path, f"sleep 300 & echo $! > {pidfile}; sleep 300\n", timeout=1)
    t0 = time.monotonic()
    with pytest.raises(RuntimeSetupError, match=r"prestart hook: .*: timed out after 1 s"):
        hooks.run([hook], ("prestart",), hooks.state("/b", "creating"))
    assert time.monotonic() - t0 < 5
    child = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):  # killed, and reaped: not even a zombie
        os.kill(child, 0)


def _args(**kw: Any) -> Any:
    return SimpleNamespace(**{"annotation": [], "hooks_dir": [], "command": "sh", **kw})


def test_exec_reads_conf_and_option_dirs(tmp_path: Path) -> None:
    conf_dir, opt_dir = tmp_path / "conf.d", tmp_path / "opt.d"
    write(conf_dir, "a.json", edit(hook__args=["conf"]))
    write(opt_dir, "b.json", edit(hook__args=["opt"], when={"annotations": {"^k$": "^v$"}}))
    conf = tmp_path / "sifpy.conf"
    conf.write_text(f"hooks dir = {conf_dir}\n")
    rules = policy.load(str(conf), user="")
    assert rules.system.hooks_dirs == [str(conf_dir)]
    a = _args(hooks_dir=[str(opt_dir)], annotation=["k=v"])
    found, annotations = exec_._oci_hooks("exec", a, ["/bin/sh"], rules, False)
    assert [h["args"] for h in found] == [["conf"], ["opt"]]
    assert annotations == (("k", "v"),)
    with pytest.raises(UsageError, match="invalid --annotation: 'novalue'"):
        exec_._oci_hooks("exec", _args(annotation=["novalue"]), ["sh"], rules, False)
    conf.write_text("hooks dir = relative/dir\n")
    with pytest.raises(Exception, match="hooks dir must be an absolute path"):
        policy.load(str(conf), user="")


def test_exec_default_dir_agrees_and_costs_no_import() -> None:
    assert exec_._HOOKS_DIR == hooksd.DEFAULT_DIR
    if hooksd.has_hooks([hooksd.DEFAULT_DIR]):
        pytest.skip(f"{hooksd.DEFAULT_DIR} holds hooks on this machine")
    code = (
        f"import sys; sys.path.insert(0, {str(REPO)!r}); "
        "from types import SimpleNamespace as S; "
        "import sifpy.cli.exec as e, sifpy.sign.policy as p; "
        "r = e._oci_hooks('exec', S(annotation=[], hooks_dir=[], command='sh'), ['sh'], "
        "p.load('/nonexistent'), False); "
        "print(r, 'sifpy.runtime.hooksd' in sys.modules, 'json' in sys.modules)"
    )
    r = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, check=True
    )
    assert r.stdout.strip() == "((), ()) False False"

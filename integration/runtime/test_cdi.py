"""``--device`` (CDI) end to end, as the test user: specs written here (JSON and YAML, two
versions), every edit kind checked inside the container against a run without it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from integration.conftest import UserRunner

LISTING = "cd /dev && find . ! -type d | sort; echo ==; env | sort; echo ==; ls /opt/cdi-ro 2>/dev/null || true"


@pytest.fixture()
def cdi_dir(workdir: Path, runtime_ready: UserRunner) -> Path:
    top = workdir / "cdi"
    if top.exists():
        import shutil

        shutil.rmtree(top)
    (top / "specs").mkdir(parents=True)
    (top / "ro").mkdir()
    (top / "ro" / "data.txt").write_text("from the host\n")
    (top / "rw").mkdir()
    # Not under /tmp: the runtime's session covers /tmp before the hooks run (a real hook
    # lives in /usr/bin).
    hook = Path(runtime_ready.user.home) / "cdi-hook.sh"
    # createContainer: on the host side, with the state on stdin and the bundle's root.
    # It finds the container's root as nvidia-ctk's hooks do: the state's bundle, then
    # config.json's root.path; it writes there, into the rw mount.
    hook.write_text(
        "#!/usr/bin/python3 -I\nimport json, os, sys\nstate = json.load(sys.stdin)\n"
        "root = json.load(open(state['bundle'] + '/config.json'))['root']['path']\n"
        "out = root + '/opt/cdi-rw/'\njson.dump(state, open(out + 'state.json', 'w'))\n"
        "open(out + 'hook-env', 'w').write(os.environ['HOOK_VAR'] + '\\n')\n"
    )
    hook.chmod(0o755)
    # poststart and poststop: the same way in, each writes the state it got to STAGE.json.
    post = Path(runtime_ready.user.home) / "cdi-post.sh"
    post.write_text(
        "#!/usr/bin/python3 -I\nimport json, sys\nstate = json.load(sys.stdin)\n"
        "root = json.load(open(state['bundle'] + '/config.json'))['root']['path']\n"
        "json.dump(state, open(root + '/opt/cdi-rw/' + sys.argv[1] + '.json', 'w'))\n"
    )
    post.chmod(0o755)
    for p in (top, top / "rw", top / "specs"):
        os.chmod(p, 0o777)
    os.chmod(top / "ro", 0o755)
    spec = {
        "cdiVersion": "0.5.0",
        "kind": "example.com/fake",
        "containerEdits": {
            "env": ["FAKE_SPEC=1"],
            "mounts": [
                {
                    "hostPath": str(top / "ro"),
                    "containerPath": "/opt/cdi-ro",
                    "options": ["ro", "rbind"],
                }
            ],
            "hooks": [
                {
                    "hookName": "createContainer",
                    "path": str(hook),
                    "args": ["hook.sh"],
                    "env": ["HOOK_VAR=from-spec"],
                },
            ],
        },
        "devices": [
            {
                "name": "gpu0",
                "containerEdits": {
                    "env": ["FAKE_DEV=0"],
                    "deviceNodes": [{"path": "/dev/fakegpu0", "hostPath": "/dev/null"}],
                    "mounts": [
                        {"hostPath": str(top / "rw"), "containerPath": "/opt/cdi-rw"},
                        {
                            "hostPath": "tmpfs",
                            "containerPath": "/opt/cdi-scratch",
                            "type": "tmpfs",
                            "options": ["nosuid", "size=1m", "mode=1777"],
                        },
                    ],
                    "hooks": [
                        {
                            "hookName": "startContainer",
                            "path": "/bin/sh",
                            "args": ["sh", "-c", "cat > /opt/cdi-rw/started"],
                        },
                        {"hookName": "poststart", "path": str(post), "args": ["p", "poststart"]},
                        {"hookName": "poststop", "path": str(post), "args": ["p", "poststop"]},
                    ],
                },
            },
            {
                "name": "gpu1",
                "containerEdits": {
                    "env": ["FAKE_DEV=1"],
                    "deviceNodes": [{"path": "/dev/fakegpu1", "hostPath": "/dev/zero"}],
                    # A failing poststop hook is a warning (the runtime spec), not a failure.
                    "hooks": [{"hookName": "poststop", "path": "/bin/false"}],
                },
            },
        ],
    }
    (top / "specs" / "fake.json").write_text(json.dumps(spec))
    (top / "specs" / "other.yaml").write_text(
        "cdiVersion: 0.7.0\nkind: example.com/other\ndevices:\n- name: one\n"
        f"  containerEdits:\n    env: [OTHER=yes]\n    additionalGids: [{runtime_ready.user.gid}]\n"
    )
    (top / "specs" / "broken.json").write_text(
        '{"cdiVersion": "0.3.0", "kind": "x.com/y", "devices": [{"name": "a"}]}'
    )
    return top


def _run(runner: UserRunner, image: str, specs: Path, opts: list[str], script: str) -> Any:
    return runner(
        ["/usr/bin/python3", "-m", "sifpy", "exec", *opts, image, "sh", "-c", script],
        env={"SIFPY_CDI_SPEC_DIRS": str(specs)},
        cwd="/",
    )


def _parts(res: Any) -> list[list[str]]:
    assert res.returncode == 0, res.stderr
    return [p.strip("\n").split("\n") if p.strip() else [] for p in res.stdout.split("==\n")]


@pytest.mark.unpriv
def test_cdi_every_edit(runtime_ready: UserRunner, images: dict[str, Any], cdi_dir: Path) -> None:
    image = images["plain"]["sif"]
    specs = cdi_dir / "specs"
    base = _parts(_run(runtime_ready, image, specs, ["--contain"], LISTING))
    res = _run(
        runtime_ready,
        image,
        specs,
        ["--contain", "--device", "example.com/fake=gpu0", "--device", "example.com/other=one"],
        LISTING + "; echo ==; [ -c /dev/fakegpu0 ] && echo hi > /dev/fakegpu0 && echo CHAR;"
        " echo x > /opt/cdi-ro/new 2>/dev/null || echo RO;"
        " awk '$2 == \"/opt/cdi-scratch\" {print $3}' /proc/self/mounts; stat -c %a /opt/cdi-scratch",
    )
    devs, env, ro, checks = _parts(res)
    assert set(devs) - set(base[0]) == {"./fakegpu0"}
    a = dict(x.partition("=")[::2] for x in base[1])
    b = dict(x.partition("=")[::2] for x in env)
    assert {k: b[k] for k in set(b) - set(a)} == {"FAKE_SPEC": "1", "FAKE_DEV": "0", "OTHER": "yes"}
    assert all(a[k] == b[k] for k in a)
    assert ro == ["data.txt"]
    assert checks == ["CHAR", "RO", "tmpfs", "1777"]
    # The broken spec is reported with its file and field, and does not stop the run.
    assert f"{specs}/broken.json: devices[0].containerEdits: is required" in res.stderr
    # The hooks ran: createContainer with the OCI state and the spec's env, startContainer
    # inside the container.
    state = json.loads((cdi_dir / "rw" / "state.json").read_text())
    assert state["status"] == "creating" and state["ociVersion"] and state["bundle"]
    assert (cdi_dir / "rw" / "hook-env").read_text() == "from-spec\n"
    assert json.loads((cdi_dir / "rw" / "started").read_text())["status"] == "created"
    # poststart once the command runs, poststop once it has ended, both on the host side.
    assert json.loads((cdi_dir / "rw" / "poststart.json").read_text())["status"] == "running"
    assert json.loads((cdi_dir / "rw" / "poststop.json").read_text())["status"] == "stopped"


@pytest.mark.unpriv
def test_cdi_all_and_errors(
    runtime_ready: UserRunner, images: dict[str, Any], cdi_dir: Path
) -> None:
    image = images["plain"]["sif"]
    specs = cdi_dir / "specs"
    res = _run(
        runtime_ready,
        image,
        specs,
        ["--contain", "--device", "example.com/fake=all"],
        "ls /dev | grep fake; echo $FAKE_DEV",
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["fakegpu0", "fakegpu1", "1"]
    assert "warning: can't run poststop hook: /bin/false: exit status 1" in res.stderr
    res = _run(runtime_ready, image, specs, ["--device", "example.com/fake=gpu9"], "true")
    assert res.returncode == 125
    assert "error: can't find CDI device: example.com/fake=gpu9" in res.stderr
    # The host's /dev has no /dev/fakegpu0 or 1: without --contain they are made in a /dev
    # of the container's own (the host's entries bound into it), never in the host's.
    res = _run(
        runtime_ready,
        image,
        specs,
        ["--device", "example.com/fake=all"],
        "head -c 2 /dev/fakegpu1 | od -An -tx1; echo x > /dev/fakegpu0 && cat /dev/fakegpu0;"
        " test -c /dev/fuse && echo host nodes",
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\n")[:2] == [" 00 00", "host nodes"], res.stdout
    assert not os.path.exists("/dev/fakegpu0") and not os.path.exists("/dev/fakegpu1")

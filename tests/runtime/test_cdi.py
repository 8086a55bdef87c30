"""CDI specs: loading (JSON and YAML, versions 0.3.0 to 1.0.0), validation errors that name
the file and the field, device resolution, and the edits gathered for the runtime."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sifpy.errors import RuntimeSetupError, UsageError
from sifpy.runtime import cdi

EDITS = {
    "env": ["FOO=bar"],
    "deviceNodes": [{"path": "/dev/null"}],
    "mounts": [
        {"hostPath": "/etc/hostname", "containerPath": "/etc/host-name", "options": ["ro", "bind"]}
    ],
}


def spec(version: str = "0.3.0", **over: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "cdiVersion": version,
        "kind": "example.com/gpu",
        "devices": [{"name": "dev0", "containerEdits": {"env": ["DEV=0"]}}],
        "containerEdits": EDITS,
    }
    doc.update(over)
    return doc


def write(d: Path, name: str, doc: object) -> Path:
    p = d / name
    p.write_text(json.dumps(doc))
    return p


@pytest.mark.parametrize("version", cdi.VERSIONS)
def test_every_version_loads(tmp_path: Path, version: str) -> None:
    s = cdi.load_file(str(write(tmp_path, "a.json", spec(version))))
    assert (s.kind, s.version, list(s.devices)) == ("example.com/gpu", version, ["dev0"])


def test_yaml_spec(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(
        "cdiVersion: 0.5.0\nkind: example.com/gpu\ndevices:\n- name: 0\n"
        "  containerEdits:\n    env: [A=1]\n"
    )
    with pytest.raises(RuntimeSetupError) as exc:  # YAML reads the name 0 as a number
        cdi.load_file(str(tmp_path / "a.yaml"))
    assert exc.value.message.endswith("a.yaml: devices[0].name: must be a string")
    (tmp_path / "b.yaml").write_text(
        "cdiVersion: 0.5.0\nkind: example.com/gpu\ndevices:\n- name: '0'\n"
        "  containerEdits:\n    env: [A=1]\n"
    )
    assert list(cdi.load_file(str(tmp_path / "b.yaml")).devices) == ["0"]


@pytest.mark.parametrize(
    ("over", "field", "reason"),
    [
        ({"cdiVersion": "0.2.0"}, "cdiVersion", "unsupported version '0.2.0'"),
        ({"kind": "nokind"}, "kind", "must be VENDOR/CLASS"),
        ({"devices": []}, "devices", "must be a non-empty list"),
        ({"extra": 1}, "extra", "unknown field"),
        ({"annotations": {"a": "b"}}, "annotations", "needs cdiVersion 0.6.0"),
        (
            {"containerEdits": {"additionalGids": [5]}},
            "containerEdits.additionalGids",
            "needs cdiVersion 0.7.0",
        ),
        (
            {
                "containerEdits": {
                    "mounts": [{"hostPath": "/a", "containerPath": "/b", "type": "bind"}]
                }
            },
            "containerEdits.mounts[0].type",
            "needs cdiVersion 0.4.0",
        ),
        (
            {"containerEdits": {"deviceNodes": [{"path": "/dev/x", "hostPath": "/dev/null"}]}},
            "containerEdits.deviceNodes[0].hostPath",
            "needs cdiVersion 0.5.0",
        ),
        (
            {"containerEdits": {"mounts": [{"hostPath": "/a", "containerPath": "rel"}]}},
            "containerEdits.mounts[0].containerPath",
            "must be an absolute path",
        ),
        ({"containerEdits": {"env": ["NOVALUE"]}}, "containerEdits.env[0]", "must be NAME=VALUE"),
        (
            {"containerEdits": {"hooks": [{"hookName": "later", "path": "/bin/true"}]}},
            "containerEdits.hooks[0].hookName",
            "must be one of",
        ),
        (
            {"containerEdits": {"deviceNodes": [{"path": "/dev/x", "permissions": "rwx"}]}},
            "containerEdits.deviceNodes[0].permissions",
            "must be letters of 'rwm'",
        ),
        (
            {"devices": [{"name": "0dev", "containerEdits": {}}]},
            "devices[0].name",
            "invalid device name",
        ),
        (
            {"devices": [{"name": "d", "containerEdits": {"mounts": [{"hostPath": "/a"}]}}]},
            "devices[0].containerEdits.mounts[0].containerPath",
            "is required",
        ),
    ],
)
def test_bad_spec_names_file_and_field(
    tmp_path: Path, over: dict[str, object], field: str, reason: str
) -> None:
    path = write(tmp_path, "bad.json", spec("0.3.0", **over))
    with pytest.raises(RuntimeSetupError) as exc:
        cdi.load_file(str(path))
    assert exc.value.message.startswith(f"can't load CDI spec: {path}: {field}: {reason}")


def test_invalid_json_names_the_line(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text('{\n "cdiVersion": "0.3.0",\n')
    with pytest.raises(RuntimeSetupError, match=r"x.json: line 3: invalid JSON"):
        cdi.load_file(str(tmp_path / "x.json"))


def test_registry_later_dir_wins_and_bad_specs_warn(tmp_path: Path) -> None:
    etc, run = tmp_path / "etc", tmp_path / "run"
    etc.mkdir(), run.mkdir()
    write(etc, "a.json", spec())
    write(run, "a.json", spec(devices=[{"name": "dev0", "containerEdits": {"env": ["DEV=run"]}}]))
    write(etc, "bad.json", {"cdiVersion": "0.3.0"})
    reg = cdi.Registry.load([str(etc), str(run)])
    inj = reg.inject(["example.com/gpu=dev0"])
    assert inj.env == {"FOO": "bar", "DEV": "run"}
    assert inj.devices == [("/dev/null", "/dev/null")]
    assert inj.binds == [("/etc/hostname", "/etc/host-name", True)]
    assert inj.warnings == [f"can't load CDI spec: {etc}/bad.json: kind: is required"]
    with pytest.raises(RuntimeSetupError, match=r"can't find CDI device: example\.com/gpu=nope"):
        reg.inject(["example.com/gpu=nope"])
    with pytest.raises(UsageError):
        reg.inject(["gpu0"])


def test_all_and_groups(tmp_path: Path) -> None:
    mine, other = os.getgid(), max([*os.getgroups(), os.getgid()]) + 12345
    write(
        tmp_path,
        "a.json",
        spec(
            "0.7.0",
            devices=[
                {"name": "a", "containerEdits": {"additionalGids": [mine]}},
                {"name": "b", "containerEdits": {"additionalGids": [other]}},
            ],
        ),
    )
    inj = cdi.Registry.load([str(tmp_path)]).inject(["example.com/gpu=all"])
    assert inj.gids == [mine]
    assert inj.warnings == [
        f"CDI spec {tmp_path}/a.json adds group {other}, which you are not a member of: the container can't have it"
    ]


def test_mount_types_and_post_hooks(tmp_path: Path) -> None:
    """tmpfs mounts (with their size and mode) and poststart/poststop hooks are taken; a
    mount type an unprivileged user can't mount is refused with the spec named."""
    write(
        tmp_path,
        "a.json",
        spec(
            "0.4.0",
            containerEdits={
                "mounts": [
                    {
                        "hostPath": "tmpfs",
                        "containerPath": "/scratch",
                        "type": "tmpfs",
                        "options": ["nosuid", "size=16m", "mode=1777"],
                    }
                ],
                "hooks": [
                    {"hookName": "poststart", "path": "/bin/true"},
                    {"hookName": "poststop", "path": "/bin/true"},
                ],
            },
        ),
    )
    inj = cdi.Registry.load([str(tmp_path)]).inject(["example.com/gpu=dev0"])
    assert inj.tmpfs == [("/scratch", "size=16m,mode=1777")]
    assert [h["stage"] for h in inj.hooks] == ["poststart", "poststop"]
    write(
        tmp_path,
        "a.json",
        spec(
            "0.4.0",
            containerEdits={
                "mounts": [{"hostPath": "proc", "containerPath": "/x", "type": "proc"}]
            },
        ),
    )
    with pytest.raises(RuntimeSetupError, match="type 'proc' needs privileges"):
        cdi.Registry.load([str(tmp_path)]).inject(["example.com/gpu=dev0"])


def test_cdi_list_command(tmp_path: Path) -> None:
    import subprocess
    import sys

    write(
        tmp_path,
        "a.json",
        spec(
            "0.3.0",
            devices=[{"name": "a", "containerEdits": {}}, {"name": "b", "containerEdits": {}}],
        ),
    )
    write(tmp_path, "bad.json", {"cdiVersion": "9"})
    res = subprocess.run(
        [sys.executable, "-m", "sifpy", "cdi", "list"],
        capture_output=True,
        text=True,
        env={**os.environ, "SIFPY_CDI_SPEC_DIRS": str(tmp_path)},
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [f"example.com/gpu={n}\t{tmp_path}/a.json" for n in "ab"]
    assert f"{tmp_path}/bad.json: cdiVersion: unsupported version '9'" in res.stderr

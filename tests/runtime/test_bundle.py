"""config.json to a launch (sifpy.runtime.bundle): what is honoured, and the field named in
each refusal. Pure: bundles on disk, nothing run."""

from __future__ import annotations

import json
import os
import resource
from pathlib import Path
from typing import Any

import pytest

from sifpy.errors import RuntimeSetupError
from sifpy.runtime import bundle
from sifpy.runtime.start import Sandbox


def _rootless(uid: int, gid: int) -> dict[str, Any]:
    """What ``runc spec --rootless`` writes (runc 1.1), less the terminal."""
    return {
        "ociVersion": "1.0.2-dev",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": ["sh"],
            "env": ["PATH=/usr/bin:/bin", "TERM=xterm"],
            "cwd": "/",
            "capabilities": {
                k: ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
                for k in ("bounding", "effective", "permitted", "ambient")
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "runc",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts"},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm"},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue"},
            {"destination": "/sys", "type": "none", "source": "/sys", "options": ["rbind", "ro"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup"},
        ],
        "linux": {
            "uidMappings": [{"containerID": 0, "hostID": uid, "size": 1}],
            "gidMappings": [{"containerID": 0, "hostID": gid, "size": 1}],
            "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "user")],
            "maskedPaths": ["/proc/kcore"],
            "readonlyPaths": ["/proc/sys"],
        },
    }


def _write(tmp_path: Path, config: dict[str, Any]) -> str:
    (tmp_path / "rootfs").mkdir(exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


def test_rootless_spec(tmp_path: Path) -> None:
    config = _rootless(os.getuid(), os.getgid())
    config["mounts"].append(
        {"destination": "/data", "type": "none", "source": str(tmp_path), "options": ["bind", "ro"]}
    )
    config["mounts"].append({"destination": "/scratch", "type": "tmpfs", "options": ["size=1m"]})
    config["hooks"] = {"prestart": [{"path": "/bin/true", "args": ["true", "x"]}]}
    b = bundle.load(_write(tmp_path, config))
    spec, opts = b.spec, b.spec.options
    assert spec.image == Sandbox(str(tmp_path / "rootfs"))
    assert (spec.argv, spec.env, spec.cwd) == (
        ["sh"],
        {"PATH": "/usr/bin:/bin", "TERM": "xterm"},
        "/",
    )
    assert list(spec.binds) == [(str(tmp_path), "/data", True)]
    assert opts.fakeroot and opts.pid_ns and opts.no_init and opts.ipc_ns and opts.uts_ns
    assert not opts.net_ns and not opts.writable and opts.contain
    assert (opts.masked_paths, opts.readonly_paths) == (("/proc/kcore",), ("/proc/sys",))
    assert opts.hostname == "runc"
    assert opts.rlimits == ((resource.RLIMIT_NOFILE, 1024, 1024),)
    assert opts.caps == (1 << 29) | (1 << 5) | (1 << 10)  # AUDIT_WRITE, KILL, NET_BIND_SERVICE
    assert "tmp" in opts.no_mount and "proc" not in opts.no_mount and "sys" not in opts.no_mount
    assert opts.inject is not None and opts.inject.tmpfs == [("/scratch", "size=1m")]
    assert opts.inject.hooks == [
        {
            "stage": "prestart",
            "path": "/bin/true",
            "args": ["true", "x"],
            "env": [],
            "timeout": bundle.DEFAULT_HOOK_TIMEOUT,
        }
    ]


def test_own_ids_run_as_the_caller(tmp_path: Path) -> None:
    uid, gid = os.getuid(), os.getgid()
    config = _rootless(uid, gid)
    config["process"]["user"] = {"uid": uid, "gid": gid}
    config["linux"]["uidMappings"] = [{"containerID": uid, "hostID": uid, "size": 1}]
    config["linux"]["gidMappings"] = [{"containerID": gid, "hostID": gid, "size": 1}]
    config["mounts"] = []
    b = bundle.load(_write(tmp_path, config))
    assert b.spec.options.fakeroot is (uid == 0)
    assert {"proc", "sys", "dev", "devpts", "tmp"} <= set(b.spec.options.no_mount)


def _linux(key: str, value: Any) -> Any:
    def change(c: dict[str, Any]) -> None:
        c["linux"][key] = value

    return change


def _set(path: str, value: Any) -> Any:
    def change(c: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        obj = c
        for p in parents:
            obj = obj[p]
        obj[last] = value

    return change


@pytest.mark.parametrize(
    ("field", "change"),
    [
        ("ociVersion", _set("ociVersion", "2.0.0")),
        ("root.path", _set("root.path", "missing")),
        ("process.args", _set("process.args", [])),
        ("process.env[1]", _set("process.env", ["A=1", "B"])),
        ("process.cwd", _set("process.cwd", "relative")),
        ("process.user.uid", _set("process.user", {"uid": 4242, "gid": 0})),
        ("process.rlimits[0].type", _set("process.rlimits", [{"type": "RLIMIT_NOPE"}])),
        ("process.capabilities.bounding[0]", _set("process.capabilities", {"bounding": ["X"]})),
        ("process.selinuxLabel", _set("process.selinuxLabel", "system_u")),
        ("linux.resources.memory", _linux("resources", {"memory": {"limit": 1}})),
        ("linux.resources.pids", _linux("resources", {"pids": {"limit": 10}})),
        (
            "linux.uidMappings[0]",
            _linux("uidMappings", [{"containerID": 0, "hostID": 0, "size": 9}]),
        ),
        ("linux.namespaces[0].path", _linux("namespaces", [{"type": "network", "path": "/x"}])),
        ("linux.namespaces[0].type", _linux("namespaces", [{"type": "time"}])),
        ("linux.seccomp", _linux("seccomp", {"defaultAction": "SCMP_ACT_ALLOW"})),
        ("linux.devices", _linux("devices", [{"path": "/dev/fuse", "type": "c"}])),
        ("linux.sysctl", _linux("sysctl", {"net.ipv4.ip_forward": "1"})),
        ("mounts[0].type", _set("mounts", [{"destination": "/x", "type": "nfs"}])),
        (
            "mounts[0].source",
            _set("mounts", [{"destination": "/x", "type": "bind", "source": "/no/such"}]),
        ),
        ("hostname", lambda c: c["linux"].update(namespaces=[{"type": "user"}])),
        ("hooks.prestart[0].path", _set("hooks", {"prestart": [{"path": "rel"}]})),
        ("linux.maskedPaths[1]", _linux("maskedPaths", ["/proc/kcore", "proc/keys"])),
        ("linux.readonlyPaths", _linux("readonlyPaths", "/proc/sys")),
    ],
)
def test_refused_field_is_named(tmp_path: Path, field: str, change: Any) -> None:
    config = _rootless(os.getuid(), os.getgid())
    change(config)
    path = _write(tmp_path, config)
    with pytest.raises(RuntimeSetupError) as err:
        bundle.load(path)
    want = f"can't use bundle: {tmp_path}/config.json: {field}: "
    assert err.value.message.startswith(want), err.value.message
    assert err.value.hint


def test_unknown_fields_are_ignored(tmp_path: Path) -> None:
    config = _rootless(os.getuid(), os.getgid())
    config["vm"] = {"hypervisor": {}}
    config["process"]["consoleSize"] = {"height": 1, "width": 1}
    assert bundle.load(_write(tmp_path, config)).spec.argv == ["sh"]


def test_unreadable_config(tmp_path: Path) -> None:
    with pytest.raises(RuntimeSetupError, match=r"can.t read bundle: .*config\.json"):
        bundle.load(str(tmp_path))
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(RuntimeSetupError, match="not JSON"):
        bundle.load(str(tmp_path))

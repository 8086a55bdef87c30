"""``sifpy oci`` against runc, as the unprivileged test user, on one bundle: a busybox OCI
image made by umoci (``insert``, then ``unpack --rootless``), with ``runc spec --rootless``'s
configuration. Both runtimes must give the same output, exit status and state transitions;
create/start/kill/delete must leave nothing behind; a config.json field sifpy can't honour
is one error naming it. ``sifpy oci mount`` turns a SIF into a bundle both can run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from integration.conftest import UserRunner, require
from integration.runtime.conftest import busybox_rootfs, make_sif, user_processes

SIFPY = ["/usr/bin/python3", "-m", "sifpy", "oci"]
OS_RELEASE = 'NAME="sifpy test image"\nID=sifpytest\n'


def _os_release(root: Path) -> None:
    (root / "etc" / "os-release").write_text(OS_RELEASE)


@pytest.fixture(scope="module")
def oci_bundle(runtime_ready: UserRunner, workdir: Path) -> Path:
    """A bundle: umoci's rootless unpack of a one-layer image of busybox, and the
    configuration of ``runc spec --rootless`` (made by the test user)."""
    for tool in ("runc", "umoci"):
        require(None if shutil.which(tool) else f"{tool} is not installed (Debian: {tool})")
    base = workdir / "oci-runtime"
    base.mkdir()
    os.chown(base, runtime_ready.user.uid, runtime_ready.user.gid)
    rootfs = busybox_rootfs(workdir / "oci-rootfs", _os_release)
    script = (
        "set -e\n"
        f"cp -R {rootfs} src\n"  # the user's own: a rootless insert changes modes on its way
        "umoci init --layout img\n"
        "umoci new --image img:t\n"
        "umoci insert --rootless --image img:t src /\n"
        "umoci unpack --rootless --image img:t bundle\n"
        "rm bundle/config.json\n"
        "cd bundle && runc spec --rootless\n"
    )
    res = runtime_ready(["sh", "-c", script], cwd=base, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    return base / "bundle"


def _configure(bundle: Path, args: list[str], **top: Any) -> None:
    """Set the command (no terminal: the tests have none) and top-level fields."""
    path = bundle / "config.json"
    config = json.loads(path.read_text())
    config["process"]["terminal"] = False
    config["process"]["args"] = args
    for key, value in top.items():
        config[key] = value
    path.write_text(json.dumps(config))


def _runtimes(workdir: Path, user: UserRunner, name: str) -> dict[str, list[str]]:
    """Each runtime's command line, with a state directory of its own (made by the user)."""
    out = {}
    for rt, argv in (("runc", ["runc"]), ("sifpy", SIFPY)):
        root = workdir / f"oci-state-{name}-{rt}"
        root.mkdir(mode=0o700)
        os.chown(root, user.user.uid, user.user.gid)
        out[rt] = [*argv, "--root", str(root)]
    return out


def _quiet(user: UserRunner, argv: list[str]) -> tuple[int, str]:
    """``create``/``start``: the container inherits stdout and stderr, so they go to a file
    (a captured pipe would stay open as long as the container runs). Returns the status
    and what was written to stderr by then."""
    import tempfile

    with tempfile.TemporaryFile("w+") as err:
        code = subprocess.run(
            user.argv(argv),
            env=user.env(),
            cwd=user.user.home,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            timeout=60,
        ).returncode
        err.seek(0)
        return code, err.read()


def _live(pid: int) -> bool:
    """``pid`` runs (a zombie waiting for this machine's reaper does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _status(user: UserRunner, rt: list[str], cid: str) -> tuple[str, int]:
    res = user([*rt, "state", cid])
    assert res.returncode == 0, res.stderr
    state = json.loads(res.stdout)
    assert state["id"] == cid and state["ociVersion"].startswith("1.")
    return state["status"], state["pid"]


def test_run_same_as_runc(
    runtime_ready: UserRunner, oci_bundle: Path, workdir: Path, no_leftovers: None
) -> None:
    cmd = (
        "cat /etc/os-release; id -u; id -g; hostname; echo pid $$; ulimit -n; echo oops >&2; exit 7"
    )
    _configure(oci_bundle, ["sh", "-c", cmd])
    results = {}
    for rt, argv in _runtimes(workdir, runtime_ready, "run").items():
        res = runtime_ready([*argv, "run", "--bundle", str(oci_bundle), f"run-{rt}"])
        results[rt] = (res.returncode, res.stdout, res.stderr)
        assert runtime_ready([*argv, "list", "-q"]).stdout == ""  # deleted after the run
    assert results["sifpy"] == results["runc"]
    code, out, err = results["runc"]
    assert code == 7 and err == "oops\n"
    assert out == OS_RELEASE + "0\n0\nrunc\npid 1\n1024\n"


def test_lifecycle_same_as_runc(
    runtime_ready: UserRunner, oci_bundle: Path, workdir: Path, no_leftovers: None
) -> None:
    _configure(oci_bundle, ["sleep", "300"])
    uid = runtime_ready.user.uid
    seen = {}
    for rt, argv in _runtimes(workdir, runtime_ready, "life").items():
        cid = f"life-{rt}"
        pid_file = oci_bundle.parent / f"{rt}.pid"  # a directory of the user's
        code, err = _quiet(
            runtime_ready,
            [*argv, "create", "-b", str(oci_bundle), "--pid-file", str(pid_file), cid],
        )
        assert code == 0, err
        steps = [_status(runtime_ready, argv, cid)[0]]
        assert runtime_ready([*argv, "list", "-q"]).stdout == f"{cid}\n"
        assert _quiet(runtime_ready, [*argv, "start", cid])[0] == 0
        status, pid = _status(runtime_ready, argv, cid)
        steps.append(status)
        assert int(pid_file.read_text()) == pid
        for _ in range(100):  # exec(sleep) follows start's return closely
            if Path(f"/proc/{pid}/comm").read_text() == "sleep\n":
                break
            time.sleep(0.02)
        assert Path(f"/proc/{pid}/comm").read_text() == "sleep\n"
        assert runtime_ready([*argv, "kill", cid, "KILL"]).returncode == 0
        for _ in range(250):
            status, _pid = _status(runtime_ready, argv, cid)
            if status == "stopped":
                break
            time.sleep(0.02)
        steps.append(status)
        res = runtime_ready([*argv, "delete", cid])
        assert res.returncode == 0, res.stderr
        assert runtime_ready([*argv, "state", cid]).returncode != 0
        seen[rt] = steps
        root = Path(argv[argv.index("--root") + 1])
        assert list(root.iterdir()) == []  # no state left
        assert not _live(pid)
        assert user_processes(uid, "sleep", live=True) == []
        assert user_processes(uid, "python3", live=True) == []  # no daemon or monitor left
    assert seen["sifpy"] == seen["runc"] == ["created", "running", "stopped"]


def test_exec_in_running(
    runtime_ready: UserRunner, oci_bundle: Path, workdir: Path, no_leftovers: None
) -> None:
    _configure(oci_bundle, ["sleep", "300"])
    argv = _runtimes(workdir, runtime_ready, "exec")["sifpy"]
    assert _quiet(runtime_ready, [*argv, "run", "-d", "-b", str(oci_bundle), "ex"])[0] == 0
    try:
        res = runtime_ready([*argv, "exec", "ex", "sh", "-c", "cat /etc/os-release; hostname"])
        assert (res.returncode, res.stdout) == (0, OS_RELEASE + "runc\n"), res.stderr
    finally:
        runtime_ready([*argv, "delete", "--force", "ex"])
    assert user_processes(runtime_ready.user.uid, "sleep", live=True) == []


@pytest.mark.parametrize(
    ("field", "change"),
    [
        ("linux.resources.memory", {"resources": {"memory": {"limit": 100000000}}}),
        ("linux.namespaces[5].path", {"namespaces": "+net-path"}),
        ("linux.uidMappings[0]", {"uidMappings": [{"containerID": 0, "hostID": 0, "size": 65536}]}),
        ("linux.seccomp", {"seccomp": {"defaultAction": "SCMP_ACT_ALLOW"}}),
    ],
)
def test_bad_config_names_the_field(
    runtime_ready: UserRunner,
    oci_bundle: Path,
    workdir: Path,
    no_leftovers: None,
    field: str,
    change: dict[str, Any],
) -> None:
    _configure(oci_bundle, ["true"])
    path = oci_bundle / "config.json"
    config = json.loads(path.read_text())
    saved = path.read_text()
    for key, value in change.items():
        if value == "+net-path":
            config["linux"]["namespaces"].append({"type": "network", "path": "/proc/1/ns/net"})
        else:
            config["linux"][key] = value
    path.write_text(json.dumps(config))
    try:
        argv = _runtimes(workdir, runtime_ready, f"bad{abs(hash(field))}")["sifpy"]
        res = runtime_ready([*argv, "run", "-b", str(oci_bundle), "bad"])
    finally:
        path.write_text(saved)
    assert res.returncode == 125
    lines = res.stderr.splitlines()
    assert len([ln for ln in lines if ln.startswith("error:")]) == 1, res.stderr
    assert lines[0].startswith(f"error: can't use bundle: {path}: {field}: "), res.stderr
    assert runtime_ready([*argv, "list", "-q"]).stdout == ""


def test_oci_mount_sif(runtime_ready: UserRunner, workdir: Path, no_leftovers: None) -> None:
    """A SIF served as a bundle's rootfs (``oci mount``), run by sifpy and by runc, then
    unmounted with its server gone."""
    require(None if shutil.which("runc") else "runc is not installed (Debian: runc)")

    def image_dirs(root: Path) -> None:
        # runc makes missing mount points in the rootfs, which a read-only squashfs refuses:
        # an image has them (sifpy does without, its root is assembled).
        _os_release(root)
        for name in ("proc", "dev", "sys", "tmp"):
            (root / name).mkdir()

    rootfs = busybox_rootfs(workdir / "oci-mount-rootfs", image_dirs)
    sif = make_sif(rootfs, workdir / "oci-mount.sif")["sif"]
    mine = workdir / "oci-mount"
    mine.mkdir()
    os.chown(mine, runtime_ready.user.uid, runtime_ready.user.gid)
    bundle = mine / "bundle"
    res = runtime_ready([*SIFPY, "mount", sif, str(bundle)])
    assert res.returncode == 0, res.stderr
    try:
        # The mount is the user's (FUSE without allow_other): only they can read it.
        res = runtime_ready(["cat", str(bundle / "rootfs" / "etc" / "os-release")])
        assert res.stdout == OS_RELEASE, res.stderr
        _configure(bundle, ["sh", "-c", "cat /etc/os-release; id -u"])
        outs = []
        for rt, argv in _runtimes(workdir, runtime_ready, "mount").items():
            res = runtime_ready([*argv, "run", "-b", str(bundle), f"m-{rt}"])
            outs.append((res.returncode, res.stdout, res.stderr))
        assert outs[0] == outs[1] == (0, f"{OS_RELEASE}0\n", "")
    finally:
        res = runtime_ready([*SIFPY, "umount", str(bundle)])
    assert res.returncode == 0, res.stderr
    assert not os.path.ismount(bundle / "rootfs")
    assert not (bundle / "config.json").exists()
    for _ in range(500):  # the server exits with its mount; this machine's init reaps it
        if not user_processes(runtime_ready.user.uid, "squashfuse_ll"):
            break
        time.sleep(0.01)
    assert user_processes(runtime_ready.user.uid, "squashfuse_ll") == []


def test_config_hooks(
    runtime_ready: UserRunner, oci_bundle: Path, workdir: Path, no_leftovers: None
) -> None:
    """config.json's own hooks run at their stages with the state on stdin; a failing
    createRuntime hook stops the start with its stderr in the error."""
    home = Path(runtime_ready.user.home)  # the hooks' output: /tmp is the session's there
    out = home / "oci-hooks"
    shutil.rmtree(out, ignore_errors=True)
    runtime_ready(["mkdir", str(out)])
    sh = shutil.which("sh") or "/bin/sh"

    def hook(name: str) -> dict[str, Any]:
        return {"path": sh, "args": ["sh", "-c", f"cat > {out}/{name}.json"]}

    _configure(
        oci_bundle,
        ["sh", "-c", "echo ran"],
        hooks={"prestart": [hook("prestart")], "poststop": [hook("poststop")]},
    )
    argv = _runtimes(workdir, runtime_ready, "hooks")["sifpy"]
    res = runtime_ready([*argv, "run", "-b", str(oci_bundle), "hk"])
    assert (res.returncode, res.stdout) == (0, "ran\n"), res.stderr
    for stage, status in (("prestart", "creating"), ("poststop", "stopped")):
        state = json.loads((out / f"{stage}.json").read_text())
        assert state["status"] == status and state["ociVersion"].startswith("1.")
    bad = {"path": sh, "args": ["sh", "-c", "echo the hook broke >&2; exit 3"]}
    _configure(oci_bundle, ["sh", "-c", "echo ran"], hooks={"createRuntime": [bad]})
    res = runtime_ready([*argv, "run", "-b", str(oci_bundle), "hk2"])
    _configure(oci_bundle, ["true"], hooks={})
    assert res.returncode == 125 and res.stdout == ""
    assert "can't run createRuntime hook" in res.stderr and "the hook broke" in res.stderr
    shutil.rmtree(out)


def test_console_socket_same_as_runc(
    runtime_ready: UserRunner, oci_bundle: Path, workdir: Path, no_leftovers: None
) -> None:
    """``process.terminal``: the pseudo-terminal's master arrives on --console-socket (runc's
    protocol), and the command's output comes through it."""
    import socket

    config = json.loads((oci_bundle / "config.json").read_text())
    config["process"]["terminal"] = True
    config["process"]["args"] = ["sh", "-c", "test -t 0 && test -t 1 && echo on a tty"]
    (oci_bundle / "config.json").write_text(json.dumps(config))
    sock_dir = oci_bundle.parent / "console"
    runtime_ready(["mkdir", "-p", str(sock_dir)])
    outs = {}
    try:
        for rt, argv in _runtimes(workdir, runtime_ready, "tty").items():
            path = sock_dir / f"{rt}.sock"
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
                server.bind(str(path))
                os.chmod(path, 0o777)
                server.listen(1)
                server.settimeout(30)
                code, err = _quiet(
                    runtime_ready,
                    [*argv, "run", "-d", "--console-socket", str(path), "-b", str(oci_bundle), rt],
                )
                assert code == 0, err
                conn, _ = server.accept()
                with conn:
                    _msg, fds, _flags, _addr = socket.recv_fds(conn, 1024, 1)
            assert len(fds) == 1
            data = b""
            with open(fds[0], "rb", buffering=0) as master:
                while b"on a tty" not in data:
                    try:
                        chunk = master.read(1024)
                    except OSError:  # EIO: every slave closed
                        break
                    if not chunk:
                        break
                    data += chunk
            outs[rt] = data.replace(b"\r\n", b"\n")
            for _ in range(250):
                if json.loads(runtime_ready([*argv, "state", rt]).stdout)["status"] == "stopped":
                    break
                time.sleep(0.02)
            assert runtime_ready([*argv, "delete", rt]).returncode == 0
    finally:
        _configure(oci_bundle, ["true"])
    assert outs["sifpy"] == outs["runc"] == b"on a tty\n"


def test_delete_created_leaves_nothing(
    runtime_ready: UserRunner, oci_bundle: Path, workdir: Path, no_leftovers: None
) -> None:
    """A container deleted before start never runs its command, and nothing stays."""
    marker = Path(runtime_ready.user.home) / "oci-never-ran"
    _configure(oci_bundle, ["sh", "-c", f"echo ran > {marker}"])
    argv = _runtimes(workdir, runtime_ready, "del")["sifpy"]
    code, err = _quiet(runtime_ready, [*argv, "create", "-b", str(oci_bundle), "dc"])
    assert code == 0, err
    status, pid = _status(runtime_ready, argv, "dc")
    assert status == "created" and _live(pid)
    res = runtime_ready([*argv, "start", "nosuch"])
    assert res.returncode == 125 and "nosuch: no such container" in res.stderr
    res = runtime_ready([*argv, "delete", "dc"])
    assert res.returncode == 0, res.stderr
    assert not _live(pid) and not marker.exists()
    assert runtime_ready([*argv, "list", "-q"]).stdout == ""
    assert user_processes(runtime_ready.user.uid, "python3", live=True) == []


# A hooks.d hook: records the state it read on stdin, and the annotations of the config.json
# found at the state's bundle path (the hook fails if it can't read it).
PROOF = """#!/usr/bin/python3 -I
import json, os, sys
state = json.load(sys.stdin)
config = json.load(open(os.path.join(state["bundle"], "config.json")))
name = sys.argv[1] + "." + sys.argv[2]
with open(os.path.join(os.environ["OUT"], name + ".json"), "w") as f:
    json.dump({"state": state, "config_annotations": config.get("annotations")}, f)
"""


def test_hooksd_hooks_with_the_containers_state(
    runtime_ready: UserRunner, oci_bundle: Path, workdir: Path, no_leftovers: None
) -> None:
    """``sifpy oci`` runs the hooks.d hooks as ``sifpy exec`` does (sifpy.conf's ``hooks
    dir``, then ``--hooks-dir``), matched against config.json's process.args, annotations
    and binds; every hook reads the OCI container's own state: its id, bundle, pid."""
    home = Path(runtime_ready.user.home)
    top = home / "oci-hooksd"
    shutil.rmtree(top, ignore_errors=True)
    runtime_ready(["mkdir", "-p", f"{top}/conf", f"{top}/given", f"{top}/out"])
    out = top / "out"
    proof = top / "proof"
    proof.write_text(PROOF)
    proof.chmod(0o755)

    def write(d: str, name: str, stages: list[str], when: dict[str, Any]) -> None:
        hook = {
            "version": "1.0.0",
            "hook": {"path": str(proof), "args": ["proof", name, "x"], "env": [f"OUT={out}"]},
            "when": when,
            "stages": stages,
        }
        # The stage goes in the hook's argv: one definition per stage.
        for stage in stages:
            hook["hook"]["args"] = ["proof", name, stage]  # type: ignore[index]
            hook["stages"] = [stage]
            (top / d / f"{name}-{stage}.json").write_text(json.dumps(hook))

    every = ["prestart", "createRuntime", "createContainer", "poststart", "poststop"]
    write("conf", "always", every, {"always": True})
    write("given", "annotated", ["createRuntime"], {"annotations": {"^org\\.site\\.mpi$": "^on$"}})
    write("given", "command", ["prestart"], {"commands": ["^sh$"]})
    write("given", "never-command", ["prestart"], {"commands": ["^python"]})
    write("given", "binds", ["poststop"], {"hasBindMounts": True})
    for dirpath, _dirs, files in os.walk(top):
        for name in [".", *files]:
            os.chown(os.path.join(dirpath, name), runtime_ready.user.uid, runtime_ready.user.gid)
    conf = top / "sifpy.conf"
    conf.write_text(f"hooks dir = {top / 'conf'}\n")
    config = json.loads((oci_bundle / "config.json").read_text())
    mounts = [*config["mounts"], {"destination": "/mnt", "type": "bind", "source": str(top)}]
    annotations = {"org.site.mpi": "on"}
    _configure(oci_bundle, ["sh", "-c", "echo ran"], annotations=annotations)
    argv = _runtimes(workdir, runtime_ready, "hooksd")["sifpy"]
    argv.insert(-2, "--hooks-dir")
    argv.insert(-2, str(top / "given"))
    env = {"SIFPY_CONFIG": str(conf)}
    try:
        res = runtime_ready([*argv, "run", "-b", str(oci_bundle), "hooked"], env=env)
        assert (res.returncode, res.stdout) == (0, "ran\n"), res.stderr
        found = {p.stem: json.loads(p.read_text()) for p in out.iterdir()}
        assert set(found) == {
            *(f"always.{s}" for s in every),
            "annotated.createRuntime",
            "command.prestart",
        }, res.stderr
        status = {"poststart": "running", "poststop": "stopped"}
        for name, proof_of in found.items():
            state, stage = proof_of["state"], name.split(".")[1]
            assert state["id"] == "hooked", name
            assert state["bundle"] == str(oci_bundle), name
            assert state["status"] == status.get(stage, "creating"), name
            assert state["annotations"] == annotations == proof_of["config_annotations"], name
            if stage != "poststop":
                assert state["pid"] > 1, name  # the host's pid of the container's process
        # With a bind and no annotation: the binds hook runs, the annotated one does not.
        for p in out.iterdir():
            p.unlink()
        _configure(oci_bundle, ["true"], annotations={}, mounts=mounts)
        res = runtime_ready([*argv, "run", "-b", str(oci_bundle), "hooked2"], env=env)
        assert res.returncode == 0, res.stderr
        assert {p.stem for p in out.iterdir()} == {
            *(f"always.{s}" for s in every),
            "binds.poststop",
        }
        # A --hooks-dir that does not exist is an error naming it.
        bad = [*argv[:-2], "--hooks-dir", str(top / "nosuch"), *argv[-2:]]
        res = runtime_ready([*bad, "run", "-b", str(oci_bundle), "hooked3"], env=env)
        assert res.returncode == 125 and f"{top / 'nosuch'}: no such directory" in res.stderr
    finally:
        config.pop("annotations", None)
        _configure(oci_bundle, ["true"], **config)
        shutil.rmtree(top)


def test_masked_and_readonly_paths_as_runc(
    runtime_ready: UserRunner, oci_bundle: Path, workdir: Path, no_leftovers: None
) -> None:
    """``runc spec --rootless``'s linux.maskedPaths and linux.readonlyPaths: masked files read
    as empty, masked directories are empty, a read-only path refuses writes; the same under
    runc and sifpy oci."""
    config = json.loads((oci_bundle / "config.json").read_text())
    linux = config["linux"]
    assert "/proc/kcore" in linux["maskedPaths"] and "/proc/sys" in linux["readonlyPaths"]
    saved = dict(linux)
    # A directory of the image masked and one made read-only, so both kinds are seen
    # whatever the host's /proc and /sys have.
    linux["maskedPaths"] = [*linux["maskedPaths"], "/etc", "/bin/busybox-missing"]
    linux["readonlyPaths"] = [*linux["readonlyPaths"], "/root"]
    config["root"]["readonly"] = False
    cmd = (
        "for f in /proc/kcore /proc/keys /proc/timer_list; do"
        ' [ -e $f ] && echo "$f $(wc -c < $f)"; done;'
        " echo etc: $(ls -A /etc | wc -l);"
        " touch /etc/x 2>/dev/null && echo etc writable;"
        " touch /root/x 2>/dev/null && echo root writable;"
        " { echo 1 > /proc/sys/kernel/ns_last_pid; } 2>/dev/null && echo proc/sys writable;"
        " grep -c ' /proc/sys ' /proc/self/mountinfo; echo done"
    )
    config["process"]["args"] = ["sh", "-c", cmd]
    config["process"]["terminal"] = False
    (oci_bundle / "config.json").write_text(json.dumps(config))
    try:
        results = {}
        for rt, argv in _runtimes(workdir, runtime_ready, "masked").items():
            res = runtime_ready([*argv, "run", "--bundle", str(oci_bundle), f"masked-{rt}"])
            results[rt] = (res.returncode, res.stdout, res.stderr)
        assert results["sifpy"] == results["runc"]
        code, out, err = results["runc"]
        assert code == 0 and err == "", err
        lines = out.splitlines()
        # /proc/timer_list is unreadable to the user unless masked by /dev/null (then empty).
        assert "/proc/timer_list 0" in lines and "etc: 0" in lines and lines[-1] == "done", out
        if os.path.exists("/proc/kcore"):  # not on every kernel
            assert "/proc/kcore 0" in lines, out
        assert not [ln for ln in lines if "writable" in ln], out
        assert int(lines[-2]) >= 1, out  # /proc/sys is a mount of its own (the read-only bind)
    finally:
        config["linux"] = saved
        config["root"]["readonly"] = True
        (oci_bundle / "config.json").write_text(json.dumps(config))

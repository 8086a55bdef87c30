"""``sifpy exec/run/shell/test`` end to end, as the unprivileged test user.

Every test runs through ``python3 -m sifpy`` and through the starter (the compiled
``sifpy`` program that enters the namespaces and serves the image before Python starts,
sifpy/cli/starter.c), which must not be told apart by anything a container sees; and each
of those with both FUSE servers: sifpy's own (sifpy/runtime/serve/sqfs_serve.c: exec'd by
Python, forked without exec by the starter) and the squashfuse_ll fallback
(``SIFPY_FUSE_SERVER=squashfuse_ll``, what runs where sifpy's was not built)."""

from __future__ import annotations

import os
import select
import shlex
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from integration.conftest import UserRunner, require
from integration.runtime.conftest import _mounts, user_processes

# The FUSE servers' command names (/proc/PID/status Name: 15 characters at most).
SERVER_NAMES = {"sifpy": "sifpy-sqfs-serv", "squashfuse_ll": "squashfuse_ll"}


class Sifpy:
    """``sifpy ...`` (``program``) as the test user, in a world-readable working directory,
    serving images with ``server`` (a key of :data:`SERVER_NAMES`)."""

    def __init__(
        self,
        runner: UserRunner,
        image: str,
        cwd: str,
        program: list[str],
        server: str = "sifpy",
    ) -> None:
        self.runner, self.image, self.cwd, self.program = runner, image, cwd, program
        self.server, self.server_name = server, SERVER_NAMES[server]
        self.env = {"SIFPY_FUSE_SERVER": server}

    def __call__(
        self, *args: str, env: dict[str, str] | None = None, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        kw.setdefault("cwd", self.cwd)
        return self.runner([*self.program, *args], env={**self.env, **(env or {})}, **kw)

    def popen(self, argv: list[str], **kw: Any) -> Any:
        """Start ``argv`` as the test user with this server (:meth:`UserRunner.popen`)."""
        return self.runner.popen(argv, env=self.env, **kw)

    def exec(
        self, *cmd: str, opts: tuple[str, ...] = (), **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        return self("exec", *opts, self.image, *cmd, **kw)


@pytest.fixture(
    params=[
        ("python", "sifpy"),
        ("starter", "sifpy"),
        ("python", "squashfuse_ll"),
        ("starter", "squashfuse_ll"),
    ],
    ids=lambda p: "-".join(p),
)
def sifpy(
    request: pytest.FixtureRequest,
    runtime_ready: UserRunner,
    images: dict[str, Any],
    no_leftovers: None,
    workdir: Path,
) -> Sifpy:
    cwd = workdir / "cwd"
    cwd.mkdir(exist_ok=True)
    (cwd / "here.txt").write_text("in the cwd\n")
    os.chmod(cwd, 0o777)
    kind, server = request.param
    program = ["/usr/bin/python3", "-m", "sifpy"]
    if kind == "starter":
        program = [request.getfixturevalue("starter")]
    if server == "sifpy":
        request.getfixturevalue("own_server")
    return Sifpy(runtime_ready, images["plain"]["sif"], str(cwd), program, server)


def test_same_user_inside(sifpy: Sifpy) -> None:
    r = sifpy.exec("id", "-u")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(sifpy.runner.user.uid)
    assert sifpy.exec("id", "-u", opts=("--fakeroot",)).stdout.strip() == "0"


def test_home_and_cwd_visible(sifpy: Sifpy) -> None:
    r = sifpy.exec("sh", "-c", 'echo "$HOME"; pwd; cat here.txt; ls -d "$HOME"')
    assert r.returncode == 0, r.stderr
    home = sifpy.runner.user.home
    assert r.stdout.splitlines() == [home, sifpy.cwd, "in the cwd", home]


def test_binds_ro_rw(sifpy: Sifpy, workdir: Path) -> None:
    data = workdir / "binddata"
    data.mkdir(exist_ok=True)
    os.chmod(data, 0o777)
    r = sifpy.exec(
        "sh",
        "-c",
        "echo rw > /rw/f && cat /rw/f && (echo x > /ro/g) 2>/dev/null; echo $?",
        opts=("-B", f"{data}:/rw", "--bind", f"{data}:/ro:ro"),
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["rw", "1"]
    assert (data / "f").read_text() == "rw\n" and not (data / "g").exists()
    # Also from the environment, comma lists.
    r = sifpy.exec("cat", "/e1/f", "/e2/f", env={"APPTAINER_BIND": f"{data}:/e1,{data}:/e2:ro"})
    assert r.stdout == "rw\nrw\n", r.stderr


def test_contain_hides_host_tmp(sifpy: Sifpy) -> None:
    marker = Path("/tmp") / f"sifpy-marker-{os.getpid()}"
    marker.write_text("host")
    try:
        assert sifpy.exec("ls", "/tmp").stdout.count(marker.name) == 1
        r = sifpy.exec("ls", "-A", "/tmp", opts=("--contain",))
        assert r.returncode == 0 and r.stdout == "", r.stderr
    finally:
        marker.unlink()


def test_env_end_to_end(sifpy: Sifpy, workdir: Path) -> None:
    envfile = workdir / "env.txt"
    envfile.write_text("FROMFILE='a b'\nBOTH=file\n")
    envfile.chmod(0o644)
    r = sifpy.exec(
        "env",
        opts=("--env", "BOTH=opt", "--env-file", str(envfile)),
        env={"HOSTVAR": "h", "APPTAINERENV_INJ": "i", "SIFPYENV_BOTH": "prefix"},
    )
    env = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
    assert env["HOSTVAR"] == "h" and env["INJ"] == "i" and env["FROMFILE"] == "a b"
    assert env["BOTH"] == "opt"
    assert not any(k.startswith("__SIFPY") for k in env)
    r = sifpy.exec("env", opts=("--cleanenv",), env={"HOSTVAR": "h"})
    assert "HOSTVAR=" not in r.stdout and "LANG=C" in r.stdout


def test_no_eval_covers_env_file(sifpy: Sifpy, workdir: Path) -> None:
    """``--no-eval --env-file F``: the ``$(...)`` in F runs nowhere and X is its literal
    text; without ``--no-eval`` F is shell code, as in Apptainer."""
    marker = Path("/tmp") / f"sifpy-envfile-marker-{os.getpid()}"  # the container shares /tmp
    envfile = workdir / "env-cmd.txt"
    envfile.write_text(f"X=$(touch {marker})\n")
    envfile.chmod(0o644)
    try:
        r = sifpy.exec("sh", "-c", 'printf %s "$X"', opts=("--no-eval", "--env-file", str(envfile)))
        assert (r.returncode, r.stdout) == (0, f"$(touch {marker})"), r.stderr
        assert not marker.exists()
        r = sifpy.exec("sh", "-c", 'printf %s "$X"', opts=("--env-file", str(envfile)))
        assert (r.returncode, r.stdout) == (0, ""), r.stderr
        assert marker.exists()
    finally:
        marker.unlink(missing_ok=True)


def test_every_exit_status_passes_through(sifpy: Sifpy) -> None:
    def status(code: int) -> tuple[int, int]:
        return code, sifpy.exec("sh", "-c", f"exit {code}").returncode

    with ThreadPoolExecutor(8) as pool:
        results = dict(pool.map(status, range(256)))
    assert results == {c: c for c in range(256)}


@pytest.mark.parametrize(
    ("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGKILL, 137), (signal.SIGSEGV, 139)]
)
def test_signal_death_is_128_plus_n(sifpy: Sifpy, sig: int, code: int) -> None:
    assert sifpy.exec("sh", "-c", f"kill -{int(sig)} $$").returncode == code


def test_not_found_and_not_executable(sifpy: Sifpy) -> None:
    r = sifpy.exec("nosuchcommand")
    assert r.returncode == 127 and "not found" in r.stderr
    r = sifpy.exec("/noexec")
    assert r.returncode == 126, r.stderr


def test_process_state(sifpy: Sifpy) -> None:
    r = sifpy.exec("sh", "-c", "ls /proc/$$/fd; grep NoNewPrivs /proc/self/status; yes | head -1")
    lines = r.stdout.split()
    assert lines[:3] == ["0", "1", "2"] and "10" not in lines[:4]
    assert "NoNewPrivs:" in lines and lines[lines.index("NoNewPrivs:") + 1] == "1"
    assert lines[-1] == "y"


def test_closed_stdin_becomes_dev_null(sifpy: Sifpy) -> None:
    """Started with fd 0 closed, sifpy must not hand its own files out as 0: the command
    gets 0, 1 and 2, with /dev/null for the closed one."""
    r = sifpy.exec("sh", "-c", "ls /proc/$$/fd; readlink /proc/$$/fd/0; cat", stdin=None,
                   preexec_fn=lambda: os.close(0))  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split()
    assert lines[:3] == ["0", "1", "2"] and lines[-1] == "/dev/null", r.stdout


def test_trap_sees_forwarded_sigterm(sifpy: Sifpy) -> None:
    p = sifpy.popen(
        [
            *sifpy.program,
            "exec",
            sifpy.image,
            "sh",
            "-c",
            "trap 'echo got-term; exit 3' TERM; echo ready; while :; do sleep 0.1; done",
        ],
        stdout=subprocess.PIPE,
        cwd=sifpy.cwd,
    )
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "ready"
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=20)
    assert out.strip() == "got-term" and p.returncode == 3


def test_run_and_test_actions(sifpy: Sifpy) -> None:
    r = sifpy("run", sifpy.image, "a", "b")
    assert "No runscript found" in r.stderr  # the plain busybox image has none
    assert sifpy("test", sifpy.image).returncode == 0  # no test script: success


def test_twenty_concurrent_execs_leave_nothing(sifpy: Sifpy) -> None:
    before = _mounts()
    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda i: sifpy.exec("cat", "/etc/image-marker"), range(20)))
    assert all(r.returncode == 0 and r.stdout == "from the image\n" for r in results)
    assert _mounts() == before
    assert user_processes(sifpy.runner.user.uid, sifpy.server_name) == []


def test_sigkill_of_sifpy_leaves_nothing_mounted(sifpy: Sifpy) -> None:
    p = sifpy.popen(
        [*sifpy.program, "exec", sifpy.image, "sh", "-c", "echo up; sleep 30"],
        stdout=subprocess.PIPE,
        cwd=sifpy.cwd,
    )
    assert p.stdout is not None and p.stdout.readline().strip() == "up"
    p.kill()
    p.wait()
    deadline = time.time() + 10
    uid = sifpy.runner.user.uid
    while time.time() < deadline and (
        user_processes(uid, sifpy.server_name) or user_processes(uid, "sleep")
    ):
        time.sleep(0.1)
    assert user_processes(uid, sifpy.server_name) == [] and user_processes(uid, "sleep") == []


def test_bad_image_is_125_with_one_line(sifpy: Sifpy, workdir: Path) -> None:
    bad = workdir / "bad.sif"
    bad.write_bytes(b"not a sif")
    bad.chmod(0o644)
    r = sifpy("exec", str(bad), "true")
    assert (
        r.returncode == 125
        and r.stderr.startswith("error: invalid SIF")
        and "Traceback" not in r.stderr
    )
    assert sifpy("exec", "--bogus", str(bad), "true").returncode == 125


def test_error_after_the_image_is_served_stops_its_server(sifpy: Sifpy) -> None:
    """The image is served (squashfuse started) before the environment is read: an error
    found then (a missing --env-file) still ends with 125, one message, and no server."""
    r = sifpy.exec("true", opts=("--env-file", "/nonexistent/env"))
    assert r.returncode == 125 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert "/nonexistent/env" in r.stderr
    assert user_processes(sifpy.runner.user.uid, sifpy.server_name) == []


@pytest.mark.parametrize("opts", [(), ("--contain", "--pid")])
def test_passed_fds_reach_the_command(sifpy: Sifpy, workdir: Path, opts: tuple[str, ...]) -> None:
    """The command inherits every fd the caller passed, at the same number (an MPI
    launcher's PMI socket, named by PMI_FD), and none of sifpy's own (image, mount, pipes):
    the shell in the container holds exactly 0, 1, 2, 3 and 7."""
    tag = f"{Path(sifpy.program[-1]).name}-{len(opts)}"
    src, rw = workdir / f"fd3-{tag}.txt", workdir / f"fd7-{tag}.txt"
    src.write_text("passed as 3\n")
    rw.write_text("")
    src.chmod(0o644)
    rw.chmod(0o666)
    probe = 'read line <&3; echo "$line"; echo written >&7; exec ls -l /proc/self/fd'
    argv = [*sifpy.program, "exec", *opts, sifpy.image, "sh", "-c", probe]
    redirect = f'exec "$@" 3<{shlex.quote(str(src))} 7<>{shlex.quote(str(rw))}'
    r = sifpy.runner(["sh", "-c", redirect, "sh", *argv], cwd=sifpy.cwd)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "passed as 3"
    # `N -> target` for each fd inherited; ls's own (the directory it lists) has no target.
    entries = [ln for ln in lines[1:] if ln.startswith("l")]
    named = sorted(int(ln.split(" -> ")[0].split()[-1]) for ln in entries if " -> " in ln)
    assert named == [0, 1, 2, 3, 7] and len(entries) == 6, r.stdout
    assert rw.read_text() == "written\n"


@pytest.mark.parametrize("as_root", [False, True])
def test_only_the_command_holds_a_passed_fd(sifpy: Sifpy, as_root: bool) -> None:
    """sifpy keeps no copy of a passed fd (nor do its FUSE server and helpers): when the
    command closes a pipe's write end, the reader sees end-of-file while it still runs.
    As root, a monitor process is forked (to write the identity map): the same."""
    if as_root:
        require(None if os.getuid() == 0 else "not running as root")
    r, w = os.pipe()
    argv = [*sifpy.program, "exec", sifpy.image, "sh", "-c", f"exec {w}>&-; read x"]
    kw: dict[str, Any] = {"pass_fds": (w,), "cwd": sifpy.cwd, "stdin": subprocess.PIPE}
    if as_root:
        env = {**sifpy.runner.env(), **sifpy.env}
        proc = subprocess.Popen(argv, env=env, text=True, **kw)
    else:
        proc = sifpy.popen(argv, **kw)
    os.close(w)
    try:
        assert select.select([r], [], [], 30)[0], "a copy of the write end is still open"
        assert os.read(r, 1) == b""
        assert proc.poll() is None  # the command is still waiting for its stdin
    finally:
        os.close(r)
        proc.communicate("go\n", timeout=30)
    assert proc.returncode == 0


@pytest.mark.parametrize("opts", [(), ("--contain",)])
def test_device_binds_keep_device_access(
    sifpy: Sifpy, workdir: Path, opts: tuple[str, ...]
) -> None:
    """A bind of a host device node is usable (not nodev), whether its mount point exists
    (/dev/zero) or is created in the container's own /dev (/dev/sifpy-null, /dev/x/zero);
    other binds stay nodev."""
    data = workdir / "binddata"
    data.mkdir(exist_ok=True)
    probe = (
        "head -c 4 /dev/zero | od -An -tx1; head -c 4 /dev/x/zero | od -An -tx1; "
        "echo discarded > /dev/sifpy-null && cat /dev/sifpy-null; exec 3<>/dev/fuse && "
        "echo fuse opened; grep -E ' /(dev/zero|dev/x/zero|dev/fuse|data) ' /proc/self/mountinfo"
    )
    binds = ("/dev/zero", "/dev/zero:/dev/x/zero", "/dev/null:/dev/sifpy-null", "/dev/fuse")
    binds += (f"{data}:/data",)
    r = sifpy.exec("sh", "-c", probe, opts=(*opts, *(o for b in binds for o in ("-B", b))))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[:3] == [" 00 00 00 00", " 00 00 00 00", "fuse opened"], r.stdout
    options = {ln.split()[4]: ln.split()[5].split(",") for ln in lines[3:]}
    assert sorted(options) == ["/data", "/dev/fuse", "/dev/x/zero", "/dev/zero"], r.stdout
    assert all("nodev" not in o and "nosuid" in o for d, o in options.items() if d != "/data")
    assert "nodev" in options["/data"]
    assert not os.path.exists("/dev/sifpy-null") and not os.path.exists("/dev/x")


def test_starter_serves_before_python(sifpy: Sifpy) -> None:
    """Through the starter, the image is served before Python starts (its note with -v);
    through python3 -m sifpy, Python serves it."""
    r = sifpy("-v", "exec", sifpy.image, "true")
    assert r.returncode == 0, r.stderr
    served_by_starter = "the starter entered the namespaces and served the image" in r.stderr
    # The starter serves with either server (sifpy's own is linked into it).
    by_starter = sifpy.program[0] != "/usr/bin/python3"
    assert served_by_starter == by_starter, r.stderr


@pytest.fixture()
def both(
    runtime_ready: UserRunner,
    images: dict[str, Any],
    no_leftovers: None,
    workdir: Path,
    starter: str,
) -> tuple[Sifpy, Sifpy]:
    """The same start through python3 -m sifpy and through the starter."""
    cwd = workdir / "cwd"
    cwd.mkdir(exist_ok=True)
    os.chmod(cwd, 0o777)
    image = images["plain"]["sif"]
    return (
        Sifpy(runtime_ready, image, str(cwd), ["/usr/bin/python3", "-m", "sifpy"]),
        Sifpy(runtime_ready, image, str(cwd), [starter]),
    )


@pytest.mark.parametrize(
    "opts", [(), ("--fakeroot",), ("--contain", "--pid"), ("--ipc",), ("--writable-tmpfs",)]
)
def test_starter_gives_the_same_process(both: tuple[Sifpy, Sifpy], opts: tuple[str, ...]) -> None:
    """What the command sees of its own process is the same through the starter: ids,
    capabilities (the starter's ambient set is gone), no_new_privs, fds, home, mounts."""
    probe = (
        "id; grep -E '^(Cap|NoNewPrivs)' /proc/self/status; ls /proc/$$/fd; echo $HOME; "
        "touch /probe 2>&1; cut -d' ' -f5,9 /proc/self/mountinfo"
    )
    a, b = (s.exec("sh", "-c", probe, opts=opts) for s in both)
    assert a.returncode == b.returncode == 0, (a.stderr, b.stderr)
    assert a.stdout == b.stdout
    assert "CapAmb:\t0000000000000000" in b.stdout and "CapInh:\t0000000000000000" in b.stdout


@pytest.mark.parametrize(
    "opts", [("--unsquash",), ("--mount-driver", "python"), ("-B/tmp",), ("--frobnicate",)]
)
def test_starter_leaves_other_starts_to_python(
    both: tuple[Sifpy, Sifpy], opts: tuple[str, ...]
) -> None:
    """Options the starter does not serve for (another driver, an option it can't parse
    alone, an unknown one) start exactly as python3 -m sifpy does."""
    py, st = both
    a = py("exec", *opts, py.image, "cat", "/etc/image-marker")
    b = st("-v", "exec", *opts, st.image, "cat", "/etc/image-marker")
    assert (a.returncode, a.stdout) == (b.returncode, b.stdout), (a.stderr, b.stderr)
    assert "starter entered" not in b.stderr


def test_starter_runs_a_sandbox_through_python(
    runtime_ready: UserRunner, images: dict[str, Any], starter: str, no_leftovers: None
) -> None:
    sandbox = images["sandbox"]["sandbox"]
    r = runtime_ready([starter, "-v", "exec", sandbox, "cat", "/etc/image-marker"])
    assert r.returncode == 0 and r.stdout == "from the image\n", r.stderr
    assert "starter entered" not in r.stderr


def test_corrupt_squashfs_is_125_and_leaves_nothing(sifpy: Sifpy, workdir: Path) -> None:
    """A valid SIF whose squashfs partition squashfuse can't read: the server, started
    before the container is planned (by Python or the starter), fails; the start ends with
    125, one message and a hint, and nothing left running."""
    from sifpy.sif import ObjectInput, create
    from sifpy.sif import format as F

    junk = workdir / "junk.sqfs"
    junk.write_bytes(b"hsqs" + bytes(range(256)) * 64)
    bad = workdir / "corrupt-squashfs.sif"
    create(bad, [ObjectInput.partition(junk, F.FSType.SQUASH, F.PartType.PRIMSYS, "amd64")])
    bad.chmod(0o644)
    r = sifpy("exec", str(bad), "true")
    assert r.returncode == 125, r.stderr
    # squashfuse's own diagnostic comes first (it is the server's stderr), then ours.
    lines = r.stderr.splitlines()
    assert lines[-2].startswith("error: can't mount: squashfs at offset "), r.stderr
    assert lines[-1].startswith("hint: ") and "Traceback" not in r.stderr
    assert user_processes(sifpy.runner.user.uid, sifpy.server_name) == []


def _bad_descriptor_images(plain: dict[str, Any], workdir: Path) -> dict[str, tuple[Path, str]]:
    """Broken copies of a runnable image (the plain busybox squashfs, primary, between a
    definition file and a second, non-primary ext3 partition), byte-mutated: name -> (path,
    a phrase the error must contain)."""
    from sifpy.sif import ObjectInput, create
    from sifpy.sif import format as F
    from tests.sif.mutate import (
        D_ID,
        D_OFFSET,
        D_PARTTYPE,
        D_SIZE,
        H_DATASIZE,
        H_FREE,
        descr_off,
        set_q,
        set_u32,
    )

    with open(plain["sif"], "rb") as f:
        f.seek(plain["offset"])
        squashfs = f.read(plain["size"])
    good = workdir / "three-objects.sif"
    create(
        good,
        [
            ObjectInput(F.DataType.DEFFILE, b"Bootstrap: scratch\n"),
            ObjectInput.partition(squashfs, F.FSType.SQUASH, F.PartType.PRIMSYS, "amd64"),
            ObjectInput.partition(b"\0" * 4096, F.FSType.EXT3, F.PartType.SYSTEM, "amd64"),
        ],
    )
    data = good.read_bytes()
    squash, ext3 = descr_off(1, 0), descr_off(2, 0)
    int64_max = (1 << 63) - 1
    cases = {
        "over-the-descriptors": (set_q(data, squash + D_OFFSET, 4096), "overlaps the header"),
        "over-the-header": (set_q(data, squash + D_OFFSET, 0), "overlaps the header"),
        "size-overflows": (set_q(data, squash + D_SIZE, int64_max), "outside the file"),
        "offset-overflows": (set_q(data, squash + D_OFFSET, int64_max - 8), "outside the file"),
        "second-primary-ext3": (
            set_u32(data, ext3 + D_PARTTYPE, F.PartType.PRIMSYS),
            "2 primary partitions",
        ),
        # The partition the starter serves is sound, the table is not: the starter refuses
        # what sifpy.sif.image refuses, and leaves it to Python, which says why.
        "duplicate-id": (set_u32(data, ext3 + D_ID, 2), "duplicate object id 2"),
        "objects-overlap": (
            set_q(data, ext3 + D_OFFSET, int.from_bytes(data[squash + D_OFFSET :][:8], "little")),
            "overlap",
        ),
        "bad-version": (data[:42] + b"02\0" + data[45:], "unsupported SIF version"),
        "data-outside": (set_q(data, H_DATASIZE, len(data)), "outside the file"),
        "free-count": (set_q(data, H_FREE, -1), "free descriptor count"),
    }
    out = {}
    for name, (mutated, phrase) in cases.items():
        path = workdir / f"bad-{name}.sif"
        path.write_bytes(mutated)
        path.chmod(0o644)
        out[name] = (path, phrase)
    return out


BAD_DESCRIPTORS = [
    "over-the-descriptors",
    "over-the-header",
    "size-overflows",
    "offset-overflows",
    "second-primary-ext3",
    "duplicate-id",
    "objects-overlap",
    "bad-version",
    "data-outside",
    "free-count",
]


@pytest.mark.parametrize("case", BAD_DESCRIPTORS)
def test_bad_descriptor_is_125_with_one_error_line(
    sifpy: Sifpy, images: dict[str, Any], workdir: Path, case: str
) -> None:
    """A SIF whose primary partition lies over the header or the descriptor table, whose
    offset + size overflows 64 bits, that has a second (ext3) primary partition, or whose
    table is otherwise invalid: through Python and through the starter, one ``error:`` line
    (and its hint), status 125, no traceback, no server left (``no_leftovers``); the starter
    neither serves nor runs a file sifpy.sif.image refuses (Python refuses it, before
    anything is mounted)."""
    path, phrase = _bad_descriptor_images(images["plain"], workdir)[case]
    r = sifpy("-v", "exec", str(path), "true", timeout=30)
    assert r.returncode == 125, r.stderr
    errors = [line for line in r.stderr.splitlines() if not line.startswith("note: ")]
    assert errors[0].startswith("error: ") and phrase in errors[0], r.stderr
    assert errors[1:] in ([], [errors[-1]]) and all(
        line.startswith("hint: ") for line in errors[1:]
    ), r.stderr
    assert "starter entered" not in r.stderr, r.stderr
    # Without -v, a start the starter would make itself: the same refusal, word for word.
    quiet = sifpy("exec", str(path), "true", timeout=30)
    assert (quiet.returncode, quiet.stderr) == (125, "\n".join(errors) + "\n")


def test_fifo_as_image_returns_at_once(sifpy: Sifpy, workdir: Path) -> None:
    """A FIFO given as the image (nobody writes to it) must not block the open: 125 at once,
    through Python and through the starter."""
    fifo = workdir / f"image-fifo-{len(sifpy.program)}"
    if not fifo.exists():
        os.mkfifo(fifo)
        fifo.chmod(0o666)
    started = time.monotonic()
    r = sifpy("exec", str(fifo), "true", timeout=20)
    assert r.returncode == 125, r.stderr
    assert r.stderr.startswith("error: can't open image: ") and "not a regular file" in r.stderr
    assert time.monotonic() - started < 10


def _caps(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    return {
        key: int(value, 16)
        for key, _, value in (line.partition(":\t") for line in status.splitlines())
        if key.startswith("Cap")
    }


@pytest.mark.parametrize("opts", [(), ("--fakeroot",)])
def test_squashfuse_runs_without_capabilities(sifpy: Sifpy, opts: tuple[str, ...]) -> None:
    """squashfuse parses the (untrusted) image: while a container runs, the server has no
    capability at all in its namespace (none effective, permitted, inheritable or ambient,
    an empty bounding set), even when sifpy is uid 0 there (``--fakeroot``)."""
    p = sifpy.popen(
        [*sifpy.program, "exec", *opts, sifpy.image, "sh", "-c", "echo up; exec sleep 30"],
        stdout=subprocess.PIPE,
        cwd=sifpy.cwd,
    )
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "up"
        # Ours: sifpy's child (the starter's, or Python's); others may run at the same time.
        servers = [
            pid
            for pid in user_processes(sifpy.runner.user.uid, sifpy.server_name)
            if f"\nPPid:\t{p.pid}\n" in Path(f"/proc/{pid}/status").read_text()
        ]
        assert len(servers) == 1, servers
        caps = _caps(servers[0])
        assert caps == {"CapInh": 0, "CapPrm": 0, "CapEff": 0, "CapBnd": 0, "CapAmb": 0}, caps
    finally:
        p.kill()
        p.wait()
        deadline = time.time() + 10
        uid = sifpy.runner.user.uid
        while time.time() < deadline and (
            user_processes(uid, sifpy.server_name) or user_processes(uid, "sleep")
        ):
            time.sleep(0.1)


@pytest.fixture(scope="module")
def wide_image(workdir: Path) -> str:
    """A busybox image with 3,000 more top-level entries (files and directories)."""
    from integration.runtime.conftest import busybox_rootfs, make_sif

    def many(root: Path) -> None:
        for i in range(1500):
            (root / f"f{i}").write_text("x")
            (root / f"d{i}").mkdir()

    rootfs = busybox_rootfs(workdir / "wide-rootfs", many)
    return str(make_sif(rootfs, workdir / "wide.sif")["sif"])


def test_too_many_top_level_entries_is_refused_with_a_hint(sifpy: Sifpy, wide_image: str) -> None:
    """3,000 top-level entries would cost 3,000 binds on every start (and more than
    fs.mount-max fail): refused before any is made, 125, one message, a hint that works
    (--writable-tmpfs: the image is the root, under an overlay, no bind per entry)."""
    started = time.monotonic()
    r = sifpy("exec", wide_image, "true")
    assert r.returncode == 125, r.stderr
    assert time.monotonic() - started < 10
    lines = r.stderr.splitlines()
    assert lines[0].startswith("error: can't assemble the container root: / of the image has")
    assert "more than the 1000" in lines[0] and "Traceback" not in r.stderr
    assert lines[1].startswith("hint: ") and "--writable-tmpfs" in lines[1], r.stderr
    r = sifpy("exec", "--writable-tmpfs", wide_image, "sh", "-c", "ls / | wc -l")
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) > 3000


@pytest.fixture(scope="module")
def data_image(workdir: Path) -> tuple[str, dict[str, bytes]]:
    """A busybox image with data on every read path of a squashfs: files of several blocks
    with a tail in a fragment, small files packed into shared fragments, an empty file and
    a sparse one (zero blocks, stored as holes); and the files' bytes."""
    import random

    from integration.runtime.conftest import busybox_rootfs, make_sif

    rng = random.Random(14)
    files = {f"small{i}": rng.randbytes(rng.randrange(1, 6000)) for i in range(40)}
    files |= {"big": rng.randbytes(5 * 131072 + 1234), "empty": b""}
    files["sparse"] = bytes(4 * 131072) + b"end" + bytes(131072)
    files["text"] = b"".join(b"line %d of a compressible file\n" % i for i in range(30000))

    def data(root: Path) -> None:
        (root / "data").mkdir()
        for name, content in files.items():
            (root / "data" / name).write_bytes(content)

    rootfs = busybox_rootfs(workdir / "read-paths-rootfs", data)
    return str(make_sif(rootfs, workdir / "read-paths.sif")["sif"]), files


def test_every_read_path_serves_the_image_bytes(
    sifpy: Sifpy, data_image: tuple[str, dict[str, bytes]]
) -> None:
    """Whichever server, the container reads the image's own bytes: whole files read by
    four readers at once (sifpy's server decompresses in several threads, outside the
    library's lock), and ranges that start and end inside blocks (dd)."""
    import hashlib

    image, files = data_image
    names = " ".join(sorted(files))
    script = (
        f'cd /data && for i in 1 2 3 4; do (md5sum {names} | sed "s/^/$i /") & done; wait; '
        "dd if=big bs=1000 skip=131 count=400 2>/dev/null | md5sum | sed 's/ .*/ range1/'; "
        "dd if=text bs=777 skip=300 count=900 2>/dev/null | md5sum | sed 's/ .*/ range2/'"
    )
    r = sifpy("exec", image, "sh", "-c", script)
    assert r.returncode == 0, r.stderr
    want = {name: hashlib.md5(content).hexdigest() for name, content in files.items()}
    got: dict[str, dict[str, str]] = {}
    for line in r.stdout.splitlines():
        fields = line.split()
        if fields[-1].startswith("range"):
            got.setdefault("ranges", {})[fields[-1]] = fields[0]
        else:
            got.setdefault(fields[0], {})[fields[2]] = fields[1]
    for reader in "1234":
        assert got[reader] == want, reader
    assert got["ranges"] == {
        "range1": hashlib.md5(files["big"][131000:531000]).hexdigest(),
        "range2": hashlib.md5(files["text"][300 * 777 : 1200 * 777]).hexdigest(),
    }


def _server_of(sifpy: Sifpy, pid: int) -> int:
    """The FUSE server serving the image of the sifpy process ``pid`` (its child)."""
    servers = [
        s
        for s in user_processes(sifpy.runner.user.uid, sifpy.server_name)
        if f"\nPPid:\t{pid}\n" in Path(f"/proc/{s}/status").read_text()
    ]
    assert len(servers) == 1, servers
    return servers[0]


def _server_syscalls(pid: int) -> int:
    """Read syscalls of the server's whole thread group: one per FUSE request it takes."""
    io = dict(ln.split(": ") for ln in Path(f"/proc/{pid}/io").read_text().splitlines())
    return int(io["syscr"])


def test_own_server_keeps_the_page_cache_across_opens(
    sifpy: Sifpy, data_image: tuple[str, dict[str, bytes]]
) -> None:
    """With sifpy's server, a file read once is read again from the page cache: opening it
    asks the server nothing (no FUSE_OPEN: the kernel then opens with FOPEN_KEEP_CACHE),
    nor does reading it, so the server takes no request at all. squashfuse_ll keeps the
    cache too, but is asked to open and release the file every time."""
    image, _ = data_image
    script = "cat /data/big /data/text >/dev/null; echo up; read x; "
    script += "cat /data/big /data/text >/dev/null; echo again; read x"
    p = sifpy.popen(
        [*sifpy.program, "exec", image, "sh", "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=sifpy.cwd,
    )
    try:
        assert p.stdin is not None and p.stdout is not None
        assert p.stdout.readline().strip() == "up"
        server = _server_of(sifpy, p.pid)
        before = _server_syscalls(server)
        p.stdin.write("\n")
        p.stdin.flush()
        assert p.stdout.readline().strip() == "again"
        asked = _server_syscalls(server) - before
        if sifpy.server == "sifpy":
            assert asked == 0
        else:
            assert asked >= 4  # open and release of each file
    finally:
        p.communicate("\n", timeout=20)

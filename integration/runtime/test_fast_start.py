"""The starter's own start of the common container (sifpy/cli/starter_fast.c) against the
Python runtime, which it must not be told apart from.

Each case starts the same container twice as the test user: through the starter, which
takes its C path (checked: the container's parent is the starter itself, not Python), and
through ``python3 -m sifpy``. What the command sees is compared whole: identity, the
generated /etc/passwd and /etc/group, capabilities, seccomp and no_new_privs, signal
state, the environment, every mount (point, options, file system), the modes and owners of
the root's entries, the working directory, the fds. Then the cases the C path must leave
to Python (a symlink on a mount point's way, an odd /etc/passwd, a setting in the
environment), the run and test actions, statuses, signals, the runscript deadline.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from integration.conftest import User, UserRunner
from integration.runtime.conftest import build_starter, busybox_rootfs, make_sif, user_processes

pytestmark = pytest.mark.unpriv

PYTHON = ["/usr/bin/python3", "-m", "sifpy"]

# Everything a command can see of how it was started (mount ids and device numbers aside).
PROBE = r"""
echo "parent: $(cat /proc/$PPID/comm)"
id; pwd; echo "umask $(umask)"; echo "home $HOME"
echo ---passwd; cat /etc/passwd; echo ---group; cat /etc/group
grep -E '^(Cap|NoNewPrivs|Seccomp|Sig(Blk|Ign))' /proc/self/status
echo ---env; env | grep -v '^SIFPY_PYTHON_START=' | sort
echo ---mounts
while read -r _id _parent _dev _root point opts rest; do
  echo "$point $opts ${rest#*- }"
done < /proc/self/mountinfo
echo ---root; ls -la / /etc /home /var | sed 's/  */ /g' | cut -d' ' -f1,3,4,9-
echo ---fds; ls /proc/self/fd
"""


def servers(uid: int, live: bool = False) -> list[int]:
    """The FUSE servers of ``uid``: squashfuse_ll, or sifpy's own (the starter's own starts
    serve with it, linked in)."""
    names = ("squashfuse_ll", "sifpy-sqfs-serv")
    return [pid for name in names for pid in user_processes(uid, name, live=live)]


def parent(out: str) -> str:
    return out.splitlines()[0]


def without_parent(out: str) -> str:
    return "\n".join(out.splitlines()[1:])


class Both:
    """One start through the starter (its C path) and through Python, as the test user."""

    def __init__(self, runner: UserRunner, starter: str, image: str, cwd: str) -> None:
        self.runner, self.starter, self.image, self.cwd = runner, starter, image, cwd

    def run(
        self, program: list[str], *args: str, env: dict[str, str] | None = None, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        kw.setdefault("cwd", self.cwd)
        return self.runner([*program, *args], env=env, **kw)

    def compare(
        self, *args: str, env: dict[str, str] | None = None, fast: bool = True, **kw: Any
    ) -> str:
        """Run ``args`` (sifpy's arguments, PROBE among them) both ways; assert that the
        outputs and statuses are the same and that the starter did (``fast``) or did not
        start the container itself; return the output."""
        st = self.run([self.starter], *args, env=env, **kw)
        py = self.run(PYTHON, *args, env=env, **kw)
        assert st.returncode == py.returncode == 0, (st.stderr, py.stderr)
        assert parent(py.stdout) == "parent: python3", py.stdout
        expected = f"parent: {os.path.basename(self.starter)[:15]}" if fast else "parent: python3"
        assert parent(st.stdout) == expected, st.stdout
        assert without_parent(st.stdout) == without_parent(py.stdout)
        assert st.stderr == py.stderr
        return st.stdout


@pytest.fixture()
def both(
    runtime_ready: UserRunner,
    images: dict[str, Any],
    starter: str,
    workdir: Path,
    no_leftovers: None,
) -> Both:
    cwd = workdir / "fast-cwd"
    cwd.mkdir(exist_ok=True)
    os.chmod(cwd, 0o777)
    return Both(runtime_ready, starter, images["plain"]["sif"], str(cwd))


def test_the_same_container_as_python(both: Both) -> None:
    out = both.compare("exec", both.image, "sh", "-c", PROBE)
    # A few of the things compared, spelled out.
    assert "Seccomp:\t2" in out and "NoNewPrivs:\t1" in out
    assert "CapAmb:\t0000000000000000" in out and "CapInh:\t0000000000000000" in out
    assert "__SIFPY" not in out


@pytest.fixture(params=["top", "etc"])
def host_cwd(request: pytest.FixtureRequest, test_user: User) -> Any:
    """A working directory the image lacks: at the top (made in the root's tmpfs), or in
    the image's /etc (which the underlay then makes a real directory)."""
    path = Path("/" if request.param == "top" else "/etc") / f"sifpy-fast-cwd-{os.getpid()}"
    path.mkdir()
    os.chown(path, test_user.uid, test_user.gid)
    yield path
    path.rmdir()


def test_cwd_missing_in_the_image_is_bound(both: Both, host_cwd: Path) -> None:
    out = both.compare("exec", both.image, "sh", "-c", PROBE, cwd=str(host_cwd))
    assert f"\n{host_cwd}\n" in out  # pwd
    assert f"\n{host_cwd} rw,nosuid,nodev" in out  # its bind


def test_cwd_in_home_and_in_the_image(both: Both, test_user: User) -> None:
    both.compare("exec", both.image, "sh", "-c", PROBE, cwd=test_user.home)
    both.compare("exec", both.image, "sh", "-c", PROBE, cwd="/bin")  # the image's own /bin
    both.compare("exec", both.image, "sh", "-c", PROBE, cwd="/")


def test_run_and_test_actions(both: Both, workdir: Path) -> None:
    image = workdir / "fast-runscript.sif"
    if not image.exists():

        def scripts(root: Path) -> None:
            meta = root / ".singularity.d"
            meta.mkdir()
            (meta / "runscript").write_text('#!/bin/sh\necho "run: $*"\nexec sh -c "$PROBE"\n')
            (meta / "test").write_text('#!/bin/sh\necho "test: $*"\nexec sh -c "$PROBE"\n')

        rootfs = busybox_rootfs(workdir / "fast-runscript-rootfs", scripts)
        for name in ("runscript", "test"):
            os.chmod(rootfs / ".singularity.d" / name, 0o755)
        make_sif(rootfs, image)
    env = {"PROBE": PROBE}
    for action in ("run", "test"):
        st = both.run([both.starter], action, str(image), "a b", "c", env=env)
        py = both.run(PYTHON, action, str(image), "a b", "c", env=env)
        assert st.returncode == py.returncode == 0, (st.stderr, py.stderr)
        assert st.stdout.splitlines()[0] == py.stdout.splitlines()[0] == f"{action}: a b c"
        assert st.stdout.splitlines()[2:] == py.stdout.splitlines()[2:]
        assert st.stdout.splitlines()[1] == f"parent: {os.path.basename(both.starter)[:15]}"


def test_environment_rules(both: Both) -> None:
    """Host variables as env.host_env forwards them: odd names, runtime prefixes and the
    never-forwarded names dropped; the first of two values of a name (os.environ's)."""
    env = {
        "PLAIN": "a b  c",
        "WITH_EQ": "x=y",
        "EMPTY": "",
        "TERM": "xterm",
        "APPTAINER_FOO": "dropped",
        "SINGULARITY_BAR": "dropped",
        "SIFPY_TEST_X": "dropped",
        "__SIFPY_H_PATH": "dropped",
        "PYTHONSTARTUP": "dropped",
        "OLDPWD": "dropped",
        "_9": "kept",
    }
    out = both.compare("exec", both.image, "sh", "-c", PROBE, env=env)
    assert "PLAIN=a b  c\n" in out and "WITH_EQ=x=y\n" in out and "_9=kept\n" in out
    assert "dropped" not in out


def test_odd_names_in_the_environment(both: Both) -> None:
    """Names that are no shell names reach neither path (env(1) builds such an
    environment; subprocess can't)."""
    probe = "env | grep -E '^(A-B|DUP|9X)=' | sort; echo parent"
    env = ["/usr/bin/env", "A-B=1", "9X=2", "DUP=first"]
    st = both.run([*env, both.starter], "exec", both.image, "sh", "-c", probe)
    py = both.run([*env, *PYTHON], "exec", both.image, "sh", "-c", probe)
    assert st.returncode == py.returncode == 0, (st.stderr, py.stderr)
    assert st.stdout == py.stdout == "DUP=first\nparent\n"


def test_statuses_and_errors(both: Both) -> None:
    for cmd, code in (("exit 0", 0), ("exit 3", 3), ("kill -TERM $$", 143)):
        st = both.run([both.starter], "exec", both.image, "sh", "-c", cmd)
        py = both.run(PYTHON, "exec", both.image, "sh", "-c", cmd)
        assert st.returncode == py.returncode == code
    for cmd, code in (("no-such-command", 127), ("/noexec", 126)):
        st = both.run([both.starter], "exec", both.image, cmd)
        py = both.run(PYTHON, "exec", both.image, cmd)
        assert (st.returncode, st.stderr) == (py.returncode, py.stderr)
        assert st.returncode == code and cmd in st.stderr


def test_passed_fd_and_closed_stdin(both: Both, workdir: Path) -> None:
    data = workdir / "fast-fd.txt"
    data.write_text("through fd 3\n")
    data.chmod(0o644)
    probe = "cat <&3; ls /proc/self/fd; cat /dev/stdin | wc -c"
    outs = []
    for program in ([both.starter], PYTHON):
        cmd = [*program, "exec", both.image, "sh", "-c", probe]
        line = " ".join(f"'{c}'" for c in cmd)
        res = both.run(["sh", "-c", f"exec 3<{data} 0<&-; exec {line}"])
        assert res.returncode == 0, res.stderr
        outs.append(res.stdout)
    assert outs[0] == outs[1] and outs[0].startswith("through fd 3\n")


def test_forwarded_signal_and_nothing_left(both: Both, test_user: User) -> None:
    proc = both.runner.popen(
        [
            both.starter,
            "exec",
            both.image,
            "sh",
            "-c",
            "trap 'echo got TERM; exit 7' TERM; echo ready; while :; do sleep 0.05; done",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=both.cwd,
    )
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 7 and out == "got TERM\n", err
    time.sleep(0.2)
    assert not servers(test_user.uid, live=True)


def test_sigkill_of_the_starter_leaves_nothing(both: Both, test_user: User) -> None:
    proc = both.runner.popen(
        [both.starter, "exec", both.image, "sh", "-c", "echo ready; exec sleep 100"],
        stdout=subprocess.PIPE,
        cwd=both.cwd,
    )
    assert proc.stdout.readline() == "ready\n"
    proc.kill()
    proc.wait(timeout=10)
    deadline = time.monotonic() + 10  # killed by PDEATHSIG, reaped by init
    while time.monotonic() < deadline and (
        servers(test_user.uid) or user_processes(test_user.uid, "sleep")
    ):
        time.sleep(0.05)
    assert not servers(test_user.uid)
    assert not user_processes(test_user.uid, "sleep")


@pytest.fixture(scope="module")
def odd_images(workdir: Path) -> dict[str, str]:
    """Images the C path leaves to Python: /etc a symlink, /etc/passwd with a non-ASCII
    name, /var/tmp a symlink; and one it takes: /etc/localtime a symlink into /usr."""

    def etc_link(root: Path) -> None:
        shutil.move(root / "etc", root / "real-etc")
        (root / "etc").symlink_to("real-etc")

    def utf8_passwd(root: Path) -> None:
        (root / "etc" / "passwd").write_text("root:x:0:0:Ren\u00e9:/root:/bin/sh\n")

    def var_tmp_link(root: Path) -> None:
        (root / "var").mkdir()
        (root / "var" / "tmp").symlink_to("/tmp")

    def localtime(root: Path) -> None:
        zone = root / "usr" / "share" / "zoneinfo"
        zone.mkdir(parents=True)
        (zone / "UTC").write_text("not a zone file\n")
        (root / "etc" / "localtime").symlink_to("/usr/share/zoneinfo/UTC")

    out = {}
    for name, extra in (
        ("etc-link", etc_link),
        ("utf8-passwd", utf8_passwd),
        ("var-tmp-link", var_tmp_link),
        ("localtime", localtime),
    ):
        rootfs = busybox_rootfs(workdir / f"fast-{name}-rootfs", extra)
        out[name] = make_sif(rootfs, workdir / f"fast-{name}.sif")["sif"]
    return out


@pytest.mark.parametrize(
    ("name", "fast"),
    [("etc-link", False), ("utf8-passwd", False), ("var-tmp-link", False), ("localtime", True)],
)
def test_images_left_to_python(
    both: Both, odd_images: dict[str, str], name: str, fast: bool
) -> None:
    both.compare("exec", odd_images[name], "sh", "-c", PROBE, fast=fast)


@pytest.mark.parametrize(
    "env",
    [
        {"SIFPY_PYTHON_START": "1"},
        {"APPTAINER_BIND": "/tmp"},
        {"APPTAINERENV_FOO": "bar"},
        {"SIFPY_NOENV": "TERM"},
        {"PMIX_NAMESPACE": "x"},
    ],
    ids=lambda e: next(iter(e)),
)
def test_settings_leave_the_start_to_python(both: Both, env: dict[str, str]) -> None:
    both.compare("exec", both.image, "sh", "-c", PROBE, env=env, fast=False)


def test_options_leave_the_start_to_python(both: Both) -> None:
    both.compare("exec", "--contain", both.image, "sh", "-c", PROBE, fast=False)
    both.compare("exec", "--", both.image, "sh", "-c", PROBE, fast=False)


def test_runscript_deadline(
    runtime_ready: UserRunner, sifpy_copy: str, workdir: Path, no_leftovers: None
) -> None:
    """An image whose environment script hangs: at the deadline (a starter built with 2 s
    instead of Apptainer's minute), the action script and what it runs are killed, and the
    start fails as Python's does with --runscript-timeout 2s."""
    short = build_starter(
        sifpy_copy,
        workdir,
        "sifpy-short-deadline",
        {"SIFPY_RUNSCRIPT_TIMEOUT": "2", "SIFPY_RUNSCRIPT_TIMEOUT_TEXT": '"2s"'},
    )

    def slow_env(root: Path) -> None:
        env = root / ".singularity.d" / "env"
        env.mkdir(parents=True)
        (env / "50-slow.sh").write_text("sleep 30\n")

    image = make_sif(
        busybox_rootfs(workdir / "fast-slow-env-rootfs", slow_env), workdir / "fast-slow.sif"
    )
    st = runtime_ready([short, "exec", image["sif"], "true"], cwd="/")
    py = runtime_ready(
        [*PYTHON, "exec", "--runscript-timeout", "2s", image["sif"], "true"], cwd="/"
    )
    assert st.returncode == py.returncode == 125
    assert st.stderr == py.stderr
    assert 'command "sleep 30" was killed after 2s timeout' in st.stderr

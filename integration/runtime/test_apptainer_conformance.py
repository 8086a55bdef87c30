"""Apptainer's end-to-end expectations, run against sifpy as the unprivileged test user.

Ported from github.com/apptainer/apptainer's own test tables, each case under its upstream
name: ``e2e/env/env.go`` and ``e2e/env/regressions.go`` (the environment), and
``e2e/actions/actions.go`` (``actionExec``, ``actionExecMultiProfile``, ``actionBinds``,
``actionNoMount``, ``actionFakerootHome``) and ``e2e/actions/regressions.go``
(``issue5599``, ``issue3501``). Apptainer exits 255 when it fails itself; sifpy exits 125
(README, "Differences from the reference"), so an upstream 255 is expected as 125 here.

Images: busybox images built by sifpy as the test user (``default``: no environment;
``custom``: upstream's test image PATH and CGO_ENABLED; ``debian``: Debian's library
layout with a glibc ldconfig, for the LD_LIBRARY_PATH cases upstream runs on Debian), a
sifpy-built sandbox for the bind cases, and the image in Apptainer's own layout made
without sifpy's builder (``test_apptainer_image.py``). Every table that runs on
``default`` and ``custom`` runs again on the same two images built by Apptainer itself
(``apptainer_built/default.def`` and ``custom.def``; the ids say ``apptainer-built``).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from integration.conftest import UserRunner
from integration.runtime.conftest import busybox_rootfs, user_processes
from integration.runtime.test_apptainer_image import _chmod_scripts, apptainer_layout
from tests.runtime.test_env_apptainer import (
    CUSTOM_PATH,
    DEFAULT_PATH,
    ENV_EVAL,
    ENV_FILE,
    ENV_OPTION,
    ENV_PATH,
    LIBS,
    NO_ENV,
)

BUSYBOX = "Bootstrap: busybox\nMirrorURL: file:///bin/busybox\n"
TRIPLET = f"{platform.machine()}-linux-gnu"
DEFS = {
    "default": BUSYBOX,
    "custom": BUSYBOX + f'\n%environment\n    export PATH="{CUSTOM_PATH}"\n    export CGO_ENABLED=0\n',
    # Debian's library directories (merged /usr) and its ld.so.conf, with the host's static
    # glibc ldconfig: what upstream's Debian image gives Apptainer's ldconfig -Nv.
    "debian": BUSYBOX + f"""
%files
    /sbin/ldconfig /sbin/ldconfig

%post
    mkdir -p /usr/local/lib /usr/lib/{TRIPLET} /etc/ld.so.conf.d
    ln -s usr/lib /lib
    echo 'include /etc/ld.so.conf.d/*.conf' > /etc/ld.so.conf
    echo /usr/local/lib > /etc/ld.so.conf.d/libc.conf
    printf '/usr/local/lib/{TRIPLET}\\n/lib/{TRIPLET}\\n/usr/lib/{TRIPLET}\\n' > /etc/ld.so.conf.d/{TRIPLET}.conf
""",
}  # fmt: skip
# Upstream's defaultLdLibPath on its Debian image.
DEBIAN_LD_PATH = f"/usr/local/lib:/lib/{TRIPLET}:/lib"


class Sifpy:
    """``python3 -m sifpy ARGS`` as the test user, in a world-writable working directory."""

    def __init__(self, runner: UserRunner, cwd: Path) -> None:
        self.runner, self.cwd = runner, cwd

    def __call__(
        self, *args: str, env: dict[str, str] | None = None, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        kw.setdefault("cwd", str(self.cwd))
        return self.runner(["/usr/bin/python3", "-m", "sifpy", *args], env=env, **kw)


@pytest.fixture(scope="module")
def conf(runtime_ready: UserRunner, workdir: Path) -> Sifpy:
    cwd = workdir / "conformance"
    cwd.mkdir(exist_ok=True)
    cwd.chmod(0o777)
    return Sifpy(runtime_ready, cwd)


@pytest.fixture(scope="module")
def sifpy_images(conf: Sifpy) -> dict[str, str]:
    """The sifpy-built images (built by the test user) and the Apptainer-layout SIF."""
    require_ldconfig = shutil.which("ldconfig", path="/sbin")
    assert require_ldconfig, "glibc's /sbin/ldconfig is needed for the Debian-like image"
    out: dict[str, str] = {}
    for name, text in DEFS.items():
        (conf.cwd / f"{name}.def").write_text(text)
        r = conf("build", "--force", f"{name}.sif", f"{name}.def", timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        out[name] = str(conf.cwd / f"{name}.sif")
    r = conf("build", "--force", "--sandbox", "sandbox", "default.def", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    out["sandbox"] = str(conf.cwd / "sandbox")
    root = busybox_rootfs(conf.cwd / "apptainer-rootfs", apptainer_layout)
    _chmod_scripts(root)
    sqfs, sif = conf.cwd / "app.sqfs", conf.cwd / "app.sif"
    run = lambda *a: subprocess.run(a, check=True, capture_output=True)  # noqa: E731
    run("mksquashfs", str(root), str(sqfs), "-comp", "gzip", "-noappend", "-quiet", "-all-root")
    run("siftool", "new", str(sif))
    run("siftool", "add", "--datatype", "4", "--partfs", "1", "--parttype", "2", "--partarch",
        "2", "--groupid", "1", str(sif), str(sqfs))  # fmt: skip
    sif.chmod(0o644)
    out["apptainer"] = str(sif)
    return out


@pytest.fixture(scope="module", params=["sifpy", "apptainer"], ids=["sifpy", "apptainer-built"])
def images(request: pytest.FixtureRequest, sifpy_images: dict[str, str]) -> dict[str, str]:
    """The images of the tables: ``default`` and ``custom`` built by sifpy, then the same
    two built by Apptainer itself (``apptainer_built/``, the fixture ``apptainer_built``)."""
    if request.param == "sifpy":
        return sifpy_images
    built = request.getfixturevalue("apptainer_built")
    return {**sifpy_images, "default": built.images["default"], "custom": built.images["custom"]}


def echo(conf: Sifpy, image: str, var: str, *opts: str, env: dict[str, str] | None = None) -> str:
    """Upstream's ``exec [OPTS] IMAGE /bin/sh -c 'echo "${VAR}"'``: the value, exit 0."""
    r = conf("exec", *opts, image, "/bin/sh", "-c", f'echo "${{{var}}}"', env=env)
    assert r.returncode == 0, r.stderr
    assert "readonly variable" not in r.stderr
    return r.stdout.removesuffix("\n")


# --- e2e/env ------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "img", "environ", "want"), ENV_PATH, ids=[c[0] for c in ENV_PATH])
def test_apptainer_env(
    conf: Sifpy, images: dict[str, str], name: str, img: str, environ: dict[str, str], want: str
) -> None:
    """e2e/env/env.go apptainerEnv."""
    assert echo(conf, images[img], "PATH", env=environ) == want


@pytest.mark.parametrize(
    ("name", "img", "opts", "environ", "var", "want"), ENV_OPTION, ids=[c[0] for c in ENV_OPTION]
)
def test_apptainer_env_option(
    conf: Sifpy,
    images: dict[str, str],
    name: str,
    img: str,
    opts: list[str],
    environ: dict[str, str],
    var: str,
    want: str,
) -> None:
    """e2e/env/env.go apptainerEnvOption (the --env values of a case joined by commas)."""
    env_opt = ("--env", ",".join(opts)) if opts else ()
    assert echo(conf, images[img], var, *env_opt, env=environ) == want


# e2e/env/env.go apptainerEnvOption, the cases on upstream's Debian image that need its
# ldconfig: (name, --env, exec options, LD_LIBRARY_PATH)
LD_CASES = [
    ("TestDefaultLdLibraryPath", [], [], LIBS),
    ("TestDefaultLdLibraryPathWithBind", [], ["-B", "/etc/os-release:" + LIBS + "/os-release"],
     DEBIAN_LD_PATH + ":" + LIBS),
    ("TestPrependLdLibraryPath", ["PREPEND_LD_LIBRARY_PATH=/foo"], [],
     "/foo:" + DEBIAN_LD_PATH + ":" + LIBS),
    ("TestAppendLdLibraryPath", ["APPEND_LD_LIBRARY_PATH=/foo"], [],
     DEBIAN_LD_PATH + ":" + LIBS + ":/foo"),
    ("TestCustomTrailingCommaPath", ["LD_LIBRARY_PATH=/foo,"], [], "/foo,:" + LIBS),
    ("TestCustomLdLibraryPath", ["LD_LIBRARY_PATH=/foo"], [], "/foo:" + LIBS),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "opts", "exec_opts", "want"), LD_CASES, ids=[c[0] for c in LD_CASES]
)
def test_apptainer_env_option_ld_library_path(
    conf: Sifpy,
    sifpy_images: dict[str, str],
    name: str,
    opts: list[str],
    exec_opts: list[str],
    want: str,
) -> None:
    env_opt = ["--env", ",".join(opts)] if opts else []
    assert echo(conf, sifpy_images["debian"], "LD_LIBRARY_PATH", *env_opt, *exec_opts) == want


@pytest.mark.parametrize(
    ("name", "no_env", "environ", "var", "want"), NO_ENV, ids=[c[0] for c in NO_ENV]
)
def test_apptainer_no_env_option(
    conf: Sifpy,
    images: dict[str, str],
    name: str,
    no_env: list[str],
    environ: dict[str, str],
    var: str,
    want: str,
) -> None:
    """e2e/env/env.go apptainerNoEnvOption."""
    opts = ("--no-env", ",".join(no_env)) if no_env else ()
    assert echo(conf, images["default"], var, *opts, env=environ) == want


@pytest.mark.parametrize(("name", "opts", "files", "var", "want"), ENV_FILE,
                         ids=[c[0] for c in ENV_FILE])  # fmt: skip
def test_apptainer_env_file(
    conf: Sifpy,
    images: dict[str, str],
    name: str,
    opts: list[str],
    files: list[str],
    var: str,
    want: str,
) -> None:
    """e2e/env/env.go apptainerEnvFile (and regressions.go issue1263)."""
    args: list[str] = ["--env", ",".join(opts)] if opts else []
    for i, text in enumerate(files):
        path = conf.cwd / f"{name}.env{i}"
        path.write_text(text)
        path.chmod(0o644)
        args += ["--env-file", str(path)]
    assert echo(conf, images["custom"], var, *args) == want


@pytest.mark.parametrize(("name", "who", "no_eval", "want"), ENV_EVAL, ids=[c[0] for c in ENV_EVAL])
@pytest.mark.parametrize("img", ["custom", "apptainer"])
def test_apptainer_env_eval(
    conf: Sifpy,
    images: dict[str, str],
    runtime_ready: UserRunner,
    img: str,
    name: str,
    who: str,
    no_eval: bool,
    want: str,
) -> None:
    """e2e/env/env.go apptainerEnvEval: $UID and $(id -u) are the test user's."""
    want = want.replace(str(os.getuid()), str(runtime_ready.user.uid))
    opts = ("--no-eval",) if no_eval else ()
    assert echo(conf, images[img], "WHO", *opts, env={"APPTAINERENV_WHO": who}) == want


@pytest.mark.parametrize("img", ["custom", "apptainer"])
def test_issue43(conf: Sifpy, images: dict[str, str], img: str) -> None:
    """e2e/env/regressions.go issue43."""
    env = {"APPTAINERENV_LD_PRELOAD": "/foo/bar/\\$LIB/baz.so"}
    assert echo(conf, images[img], "LD_PRELOAD", env=env) == "/foo/bar/$LIB/baz.so"


def test_path_forms_on_the_apptainer_layout(conf: Sifpy, sifpy_images: dict[str, str]) -> None:
    """apptainerEnvOption's PATH cases on the image in Apptainer's layout: relative to its
    own PATH (its 10-docker2singularity.sh, completed by the default PATH)."""
    img = sifpy_images["apptainer"]
    base = echo(conf, img, "PATH")
    assert base.startswith("/opt/tool/bin:") and all(
        d in base.split(":") for d in DEFAULT_PATH.split(":")
    )
    assert echo(conf, img, "PATH", "--env", "APPEND_PATH=/foo") == base + ":/foo"
    assert echo(conf, img, "PATH", "--env", "PREPEND_PATH=/foo") == "/foo:" + base
    assert echo(conf, img, "PATH", "--env", "PATH=$PATH:/foo") == base + ":/foo"
    assert echo(conf, img, "LD_LIBRARY_PATH", "--env", "LD_LIBRARY_PATH=/foo") == "/foo:" + LIBS


# --- e2e/actions: options ----------------------------------------------------------------


# (upstream test, options, command, exit status, stdout or None)
OPTION_CASES = [
    ("actionExecMultiProfile CwdGood", ["--cwd", "/etc"], ["pwd"], 0, "/etc"),
    ("actionExecMultiProfile PwdGood", ["--pwd", "/etc"], ["pwd"], 0, "/etc"),
    # Apptainer: "failed to set working directory" (255).
    ("custom cwd missing", ["--pwd", "/nonexistent"], ["true"], 125, ""),
    ("custom cwd missing (--cwd)", ["--cwd", "/nonexistent"], ["true"], 125, ""),
    ("actionExec ContainAllPID", ["--containall", "--no-init"], ["sh", "-c", "echo $$"], 0, "1"),
    ("actionFakerootHome", ["--fakeroot"], ["sh", "-c", "echo $HOME"], 0, "/root"),
    ("actionFakerootHome contained", ["--fakeroot", "--contain"], ["sh", "-c", "echo $HOME"], 0,
     "/root"),
    ("runscript timeout accepted", ["--runscript-timeout", "1m"], ["true"], 0, ""),
    ("runscript timeout in ms", ["--runscript-timeout", "1500ms"], ["true"], 0, ""),
    ("runscript timeout not a duration", ["--runscript-timeout", "soon"], ["true"], 125, ""),
]  # fmt: skip


@pytest.mark.parametrize(("name", "opts", "cmd", "code", "out"), OPTION_CASES,
                         ids=[c[0] for c in OPTION_CASES])  # fmt: skip
def test_options_users_type(
    conf: Sifpy,
    images: dict[str, str],
    no_leftovers: None,
    name: str,
    opts: list[str],
    cmd: list[str],
    code: int,
    out: str,
) -> None:
    r = conf("exec", *opts, images["default"], *cmd)
    assert r.returncode == code, r.stderr
    assert r.stdout.strip() == out
    if code == 125:
        assert r.stderr.startswith("error: ") and len(r.stderr.splitlines()) <= 2


@pytest.mark.parametrize(
    "opts", [[], ["--pid"], ["--pid", "--no-init"]], ids=["host-pid", "pid", "no-init"]
)
def test_runscript_timeout(
    conf: Sifpy, images: dict[str, str], runtime_ready: UserRunner, no_leftovers: None,
    opts: list[str],
) -> None:  # fmt: skip
    """e2e/env/env.go apptainerRuntimeTimeoutEnv: an env script that runs `sleep 2s` under
    --runscript-timeout 1s: the command is killed, Apptainer exits 255 (125 here) with
    `command "sleep 2s" was killed after 1s timeout`; nothing of it is left running."""
    script = conf.cwd / "sleep.sh"
    script.write_text("sleep 2s")
    script.chmod(0o755)
    bind = f"{script}:/.singularity.d/env/91-slow_env.sh"
    r = conf("run", *opts, "-B", bind, "--runscript-timeout", "1s", images["default"], "true")
    assert r.returncode == 125, r.stderr
    assert 'command "sleep 2s" was killed after 1s timeout' in r.stderr
    assert r.stderr.startswith("error: ")
    assert user_processes(runtime_ready.user.uid, "sleep", live=True) == []
    # Under the limit it runs; the limit bounds the scripts, not the command they exec.
    r = conf("run", *opts, "-B", bind, "--runscript-timeout", "3s", images["default"], "true")
    assert r.returncode == 0, r.stderr
    r = conf("exec", *opts, "--runscript-timeout", "1s", images["default"], "sleep", "2")
    assert r.returncode == 0, r.stderr
    # $APPTAINER_RUNSCRIPT_TIMEOUT (Apptainer's flag's environment key) sets it too.
    env = {"APPTAINER_RUNSCRIPT_TIMEOUT": "1s"}
    r = conf("run", *opts, "-B", bind, images["default"], "true", env=env)
    assert r.returncode == 125 and "was killed after 1s timeout" in r.stderr, r.stderr


def test_contain_all_no_pid(conf: Sifpy, images: dict[str, str]) -> None:
    """actionExec ContainAllNoPID: --no-pid undoes --containall's PID namespace."""
    r = conf(
        "exec", "--containall", "--no-init", "--no-pid", images["default"], "sh", "-c", "echo $$"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout != "1\n"


@pytest.mark.parametrize("contain", [(), ("--contain",)], ids=["", "contain"])
@pytest.mark.parametrize(
    ("no_mount", "unwanted"),
    [("proc", " on /proc "), ("sys", " on /sys "), ("dev", " on /dev "), ("tmp", " on /tmp "),
     ("home", " on {home} "), ("/etc/hosts", " on /etc/hosts "),
     ("/etc/localtime", " on /etc/localtime "), ("bind-paths", " on /etc/hosts ")],
)  # fmt: skip
def test_action_no_mount(
    conf: Sifpy,
    images: dict[str, str],
    runtime_ready: UserRunner,
    contain: tuple[str, ...],
    no_mount: str,
    unwanted: str,
) -> None:
    """e2e/actions/actions.go actionNoMount: ``mount`` runs (it exits 1 without /proc, as
    upstream says) and does not list the skipped mount. The image's own entries show as
    mounts of sifpy's underlay (``squashfuse on /etc/hosts``: the image's file), which are
    not what is skipped; and upstream looks for "on /home", the image's own directory
    here, so the user's home is looked for instead."""
    unwanted = unwanted.format(home=runtime_ready.user.home)
    r = conf("exec", *contain, "--no-mount", no_mount, images["default"], "mount")
    assert r.returncode == (1 if no_mount == "proc" else 0), r.stderr
    lines = [ln for ln in r.stdout.splitlines() if "type fuse.squashfuse" not in ln]
    assert not [ln for ln in lines if unwanted in ln + " "]
    if no_mount != "proc":  # the check sees the mounts at all
        assert any(" on / " in ln for ln in r.stdout.splitlines())


def test_issue5599_bind_destinations(conf: Sifpy, images: dict[str, str], workdir: Path) -> None:
    """e2e/actions/regressions.go issue5599: $APPTAINER_BIND holds the destinations, the
    options' first."""
    r = conf("exec", "--bind", f"{workdir}:/mnt", images["default"], "env",
             env={"APPTAINER_BIND": f"{workdir}:/srv"})  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "APPTAINER_BIND=/mnt,/srv" in r.stdout.splitlines()


def test_issue3501_nonested(conf: Sifpy, images: dict[str, str], workdir: Path) -> None:
    """e2e/actions/regressions.go issue3501: a nonested --mount is left out."""
    mnt = f"type=bind,source={workdir},destination=/hidden,nonested"
    r = conf("exec", "--bind", f"{workdir}:/visible", "--mount", mnt, images["default"], "env")
    assert r.returncode == 0, r.stderr
    assert "APPTAINER_BIND=/visible" in r.stdout.splitlines() and "/hidden" not in r.stdout


# --- e2e/actions actionBinds -------------------------------------------------------------


@pytest.fixture()
def ws(conf: Sifpy, runtime_ready: UserRunner) -> dict[str, str]:
    """upstream's createWorkspaceDirs: canary dir and files, home and workdir, the user's."""
    base = conf.cwd / "bind-workspace"
    shutil.rmtree(base, ignore_errors=True)
    canary = base / "canary"
    canary.mkdir(parents=True)
    for name in ("file", "file,comma", "file:colon"):
        (canary / name).touch()
    (base / "home").mkdir()
    (base / "workdir").mkdir()
    u = runtime_ready.user
    for dirpath, dirnames, filenames in os.walk(base):
        for n in [dirpath, *(os.path.join(dirpath, f) for f in dirnames + filenames)]:
            os.chown(n, u.uid, u.gid)
    return {"canary": str(canary), "file": str(canary / "file"), "home": str(base / "home"),
            "work": str(base / "workdir")}  # fmt: skip


# (upstream name, arguments with {canary} {file} {home} {work} {sandbox}, exit status,
#  host path that must exist afterwards (upstream's postRun) or None). Upstream's 255 is 125.
BIND_CASES = [
    ("NonExistentSource", ["--bind", "/non/existent/source/path", "{sandbox}", "true"], 125, None),
    ("RelativeBindDestination", ["--bind", "{file}:relative", "{sandbox}", "true"], 125, None),
    ("SimpleFile", ["--bind", "{file}:/canary/file", "{sandbox}", "test", "-f", "/canary/file"], 0, None),
    ("SimpleFilePwd", ["--bind", "{file}:/canary/file", "--pwd", "/canary", "{sandbox}", "true"], 0, None),
    ("SimpleDir", ["--bind", "{canary}:/canary", "{sandbox}", "test", "-f", "/canary/file"], 0, None),
    ("SimpleDirCwd", ["--bind", "{canary}:/canary", "--cwd", "/canary", "{sandbox}", "true"], 0, None),
    ("SimpleFileWritableOK", ["--writable", "--bind", "{file}", "{sandbox}", "true"], 0, None),
    ("SimpleFileWritableKO", ["--writable", "--bind", "{file}:/canary/file", "{sandbox}", "true"], 125, None),
    ("SimpleDirWritableOK", ["--writable", "--bind", "{canary}", "{sandbox}", "true"], 0, None),
    ("SimpleDirWritableKO", ["--writable", "--bind", "{canary}:/canary", "{sandbox}", "true"], 125, None),
    ("HomeContainOverride", ["--contain", "--bind", "{canary}:/home", "{sandbox}", "true"], 0, None),
    ("TmpContainOverride", ["--contain", "--bind", "{canary}:/tmp", "{sandbox}", "test", "-f", "/tmp/file"], 0, None),
    ("VarTmpContainOverride", ["--contain", "--bind", "{canary}:/var/tmp", "{sandbox}", "true"], 0, None),
    ("NestedBindFile", ["--bind", "{canary}:/canary", "--bind", "{file}:/canary/file2", "{sandbox}",
                        "test", "-f", "/canary/file2"], 0, "{canary}/file2"),
    ("NestedBindDir", ["--bind", "{canary}:/canary", "--bind", "{canary}:/canary/dir2", "{sandbox}",
                       "test", "-d", "/canary/dir2"], 0, "{canary}/dir2"),
    ("MultipleNestedBindDir", ["--bind", "{canary}:/canary", "--bind", "{canary}:/canary/dir2",
                               "--bind", "{file}:/canary/dir2/nested", "{sandbox}",
                               "test", "-f", "/canary/dir2/nested"], 0, "{canary}/nested"),
    ("CustomHomeOneToOne", ["--home", "{home}", "--bind", "{canary}:{home}/canary121RO", "{sandbox}",
                            "test", "-f", "{home}/canary121RO/file"], 0, "{home}/canary121RO"),
    ("CustomHomeBind", ["--home", "{home}:/home/e2e", "--bind", "{canary}:/home/e2e/canaryRO",
                        "{sandbox}", "test", "-f", "/home/e2e/canaryRO/file"], 0, "{home}/canaryRO"),
    ("CustomHomeBindWritableOK", ["--home", "{home}:/home/e2e", "--bind", "{canary}:/home/e2e/canaryRW",
                                  "--writable", "{sandbox}", "test", "-f", "/home/e2e/canaryRW/file"],
     0, "{home}/canaryRW"),
    # The home's top-level directory (/canary) is missing in the sandbox: nothing is created.
    ("CustomHomeBindWritableKO", ["--home", "{canary}:/canary", "--writable", "{sandbox}", "true"],
     125, None),
    ("WorkdirTmpBind", ["--workdir", "{work}", "--contain", "--bind", "{canary}:/tmp/canary/dir",
                        "{sandbox}", "test", "-f", "/tmp/canary/dir/file"], 0, "{work}/tmp/canary/dir"),
    ("WorkdirTmpBindWritable", ["--writable", "--workdir", "{work}", "--contain", "--bind",
                                "{canary}:/tmp/canary/dir", "{sandbox}", "test", "-f",
                                "/tmp/canary/dir/file"], 0, "{work}/tmp/canary/dir"),
    ("WorkdirVarTmpBind", ["--workdir", "{work}", "--contain", "--bind", "{canary}:/var/tmp/canary/dir",
                           "{sandbox}", "test", "-f", "/var/tmp/canary/dir/file"], 0,
     "{work}/var_tmp/canary/dir"),
    ("WorkdirVarTmpBindWritable", ["--writable", "--workdir", "{work}", "--contain", "--bind",
                                   "{canary}:/var/tmp/canary/dir", "{sandbox}", "test", "-f",
                                   "/var/tmp/canary/dir/file"], 0, "{work}/var_tmp/canary/dir"),
    ("BindFileWithCommaOK", ["--bind", "{canary}/file\\,comma:/canary/file", "{sandbox}",
                             "test", "-f", "/canary/file"], 0, None),
    ("BindFileWithCommaKO", ["--bind", "{canary}/file,comma:/canary/file", "{sandbox}", "true"], 125, None),
    ("BindFileWithColonOK", ["--bind", "{canary}/file\\:colon:/canary/file", "{sandbox}",
                             "test", "-f", "/canary/file"], 0, None),
    ("BindFileWithColonKO", ["--bind", "{canary}/file:colon:/canary/file", "{sandbox}", "true"], 125, None),
    ("MountSingle", ["--mount", "type=bind,source={file},destination=/canary/file", "{sandbox}",
                     "test", "-f", "/canary/file"], 0, None),
    ("MountNested", ["--mount", "type=bind,source={canary},destination=/canary",
                     "--mount", "source={file},destination=/canary/file3", "{sandbox}",
                     "test", "-f", "/canary/file3"], 0, "{canary}/file3"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "args", "code", "created"), BIND_CASES, ids=[c[0] for c in BIND_CASES]
)
def test_action_binds(
    conf: Sifpy,
    sifpy_images: dict[str, str],
    ws: dict[str, str],
    name: str,
    args: list[str],
    code: int,
    created: str | None,
) -> None:
    fields = {**ws, "sandbox": sifpy_images["sandbox"]}
    before = set(os.listdir(sifpy_images["sandbox"]))
    r = conf("exec", *(a.format(**fields) for a in args))
    assert r.returncode == code, r.stderr
    if code == 125:
        assert r.stderr.startswith("error: "), r.stderr
    if created is not None:
        assert os.path.exists(created.format(**fields))
    # Nothing is left behind in the sandbox (with --writable too).
    assert set(os.listdir(sifpy_images["sandbox"])) == before
    assert not os.path.exists(os.path.join(sifpy_images["sandbox"], "canary"))
    assert not os.path.exists(os.path.join(sifpy_images["sandbox"], "home", "e2e"))


def test_nested_bind_on_a_sif(conf: Sifpy, images: dict[str, str], ws: dict[str, str]) -> None:
    """actionBinds NestedBindFile on the SIF (a read-only image under the binds)."""
    r = conf("exec", "--bind", f"{ws['canary']}:/canary", "--bind", f"{ws['file']}:/canary/file2",
             images["default"], "test", "-f", "/canary/file2")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert os.path.isfile(os.path.join(ws["canary"], "file2"))

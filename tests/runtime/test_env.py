"""Environment precedence as Apptainer's (internal/pkg/util/env/create.go), table-driven.

The action script runs with the host's /bin/sh against an image directory
(``__SIFPY_ROOT``), so these tests need no namespaces.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from sifpy.errors import UsageError
from sifpy.runtime.action import action_argv
from sifpy.runtime.env import (
    DEFAULT_PATH,
    host_env,
    injected_env,
    parse_env_option,
    process_env,
    read_env_files,
)


def make_image(root: Path, scripts: dict[str, str]) -> None:
    env = root / ".singularity.d" / "env"
    env.mkdir(parents=True)
    for name, body in scripts.items():
        (env / name).write_text(body)


IMAGE_SCRIPTS = {
    "10-docker2singularity.sh": 'export DOCKER="docker"\nexport BOTH="docker"\nexport PATH="/opt/app/bin"\n',
    "90-environment.sh": 'export BOTH="deffile"\nexport IMG="image"\nexport FROMHOST="${FROMHOST:-default}"\n',
    "99-base.sh": 'if [ -z "$LD_LIBRARY_PATH" ]; then LD_LIBRARY_PATH=/.singularity.d/libs; fi\nexport LD_LIBRARY_PATH\n',
}


def run_env(
    root: Path,
    environ: dict[str, str],
    *,
    env_opts: list[str] = (),  # type: ignore[assignment]
    env_file: str | None = None,
    cleanenv: bool = False,
    no_eval: bool = False,
) -> dict[str, str]:
    opts = parse_env_option(env_opts)
    penv = process_env(
        host=host_env(environ, cleanenv),
        injected=injected_env(environ, opts),
        env_file=env_file,
        late=opts,
        no_eval=no_eval,
        home="/home/u",
        runtime={"APPTAINER_NAME": "x.sif"},
    )
    penv["__SIFPY_ROOT"] = str(root)
    out = subprocess.run(
        action_argv("exec", ["/usr/bin/env", "-0"], shell=SHELL["path"]),
        env=penv,
        capture_output=True,
        check=True,
    ).stdout
    return dict(item.split("=", 1) for item in out.decode().split("\0") if item)


SHELLS = ["/bin/sh", "/bin/bash", "/bin/busybox"]
SHELL = {"path": "/bin/sh"}


@pytest.fixture(params=SHELLS, ids=lambda s: s.rsplit("/", 1)[1])
def image(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """An image directory; the action script runs under dash, bash and busybox ash."""
    shell = request.param
    if not Path(shell).exists():
        pytest.skip(f"{shell} not installed")
    if shell == "/bin/busybox":
        (tmp_path / "sh").symlink_to(shell)  # busybox picks the applet from argv[0]
        shell = str(tmp_path / "sh")
    SHELL["path"] = shell
    root = tmp_path / "img"
    make_image(root, IMAGE_SCRIPTS)
    return root


# (description, host environ, --env, --env-file, var, expected value or None for unset)
TABLE = [
    ("image env beats host env", {"IMG": "host"}, [], None, "IMG", "image"),
    ("later image script wins", {}, [], None, "BOTH", "deffile"),
    ("host fills what the image leaves unset", {"ONLYHOST": "h"}, [], None, "ONLYHOST", "h"),
    ("image scripts don't see host vars", {"FROMHOST": "h"}, [], None, "FROMHOST", "default"),
    ("APPTAINERENV_ beats image", {"APPTAINERENV_IMG": "inj"}, [], None, "IMG", "inj"),
    ("SINGULARITYENV_ works", {"SINGULARITYENV_NEW": "s"}, [], None, "NEW", "s"),
    ("APPTAINERENV_ beats SINGULARITYENV_",
     {"SINGULARITYENV_X": "s", "APPTAINERENV_X": "a"}, [], None, "X", "a"),
    ("SIFPYENV_ beats APPTAINERENV_", {"APPTAINERENV_X": "a", "SIFPYENV_X": "p"}, [], None, "X", "p"),
    ("--env beats APPTAINERENV_", {"APPTAINERENV_IMG": "inj"}, ["IMG=opt"], None, "IMG", "opt"),
    ("--env-file beats APPTAINERENV_", {"APPTAINERENV_IMG": "inj"}, [], "IMG=file\n", "IMG", "file"),
    ("--env beats --env-file", {}, ["IMG=opt"], "IMG=file\n", "IMG", "opt"),
    ("--env-file is shell-evaluated", {}, [], "# c\nF='a b'\nG=\"$F c\"\n", "G", "a b c"),
    ("--env comma list", {}, ["A=1,B=2"], None, "B", "2"),
    ("--env value with comma", {}, ["A=1,2"], None, "A", "1,2"),
    ("injected values are evaluated once", {"APPTAINERENV_E": "$HOME/x"}, [], None, "E", "/home/u/x"),
    ("injected quotes survive", {}, ['Q=say "hi"'], None, "Q", 'say "hi"'),
    ("host values are never evaluated", {"H": "$(echo pwned)"}, [], None, "H", "$(echo pwned)"),
    ("host PATH is not forwarded", {"PATH": "/host/bin"}, [], None, "PATH",
     "/opt/app/bin:" + DEFAULT_PATH),
    ("--env PATH replaces", {}, ["PATH=/x"], None, "PATH", "/x"),
    ("--env PREPEND_PATH", {}, ["PREPEND_PATH=/p"], None, "PATH", "/p:/opt/app/bin:" + DEFAULT_PATH),
    ("APPEND_PATH", {"APPTAINERENV_APPEND_PATH": "/a"}, [], None, "PATH",
     "/opt/app/bin:" + DEFAULT_PATH + ":/a"),
    ("host HOME is not forwarded", {"HOME": "/root"}, [], None, "HOME", "/home/u"),
    ("HOME can't be injected", {"APPTAINERENV_HOME": "/x"}, [], None, "HOME", "/home/u"),
    ("host LD_LIBRARY_PATH is not forwarded", {"LD_LIBRARY_PATH": "/h"}, [], None,
     "LD_LIBRARY_PATH", "/.singularity.d/libs"),
    ("injected LD_LIBRARY_PATH keeps the libs dir", {"APPTAINERENV_LD_LIBRARY_PATH": "/l"}, [], None,
     "LD_LIBRARY_PATH", "/l:/.singularity.d/libs"),
    ("runtime vars from host are dropped", {"APPTAINER_FOO": "1"}, [], None, "APPTAINER_FOO", None),
    ("carriers don't leak", {"X": "1"}, [], None, "__SIFPY_H_X", None),
    ("runtime vars are set", {}, [], None, "APPTAINER_NAME", "x.sif"),
]  # fmt: skip


@pytest.mark.parametrize(("desc", "environ", "opts", "env_file", "var", "want"), TABLE,
                         ids=[t[0] for t in TABLE])  # fmt: skip
def test_precedence(
    image: Path,
    desc: str,
    environ: dict[str, str],
    opts: list[str],
    env_file: str | None,
    var: str,
    want: str | None,
) -> None:
    env = run_env(image, environ, env_opts=opts, env_file=env_file)
    assert env.get(var) == want, desc


def test_cleanenv(image: Path) -> None:
    env = run_env(image, {"TERM": "xterm", "SECRET": "s", "https_proxy": "p"}, cleanenv=True)
    assert env["TERM"] == "xterm" and env["https_proxy"] == "p" and env["LANG"] == "C"
    assert "SECRET" not in env


def test_no_eval(image: Path) -> None:
    env = run_env(image, {"APPTAINERENV_E": "$HOME/x"}, no_eval=True)
    assert env["E"] == "$HOME/x"


ENV_FILE = """# a comment
X=$(touch {marker})
export Q='it''s'
D="$HOME `id`"
P=a'b'c
E=
"""


@pytest.mark.parametrize("no_eval", [True, False], ids=["no-eval", "eval"])
def test_env_file_no_eval(image: Path, tmp_path: Path, no_eval: bool) -> None:
    """--no-eval covers --env-file: nothing in it runs and each value is its literal text;
    without it the file is shell code, as in Apptainer."""
    marker = tmp_path / "marker"
    path = tmp_path / "env"
    path.write_text(ENV_FILE.format(marker=marker))
    text = read_env_files([str(path)], no_eval=no_eval)
    env = run_env(image, {}, env_file=text, no_eval=no_eval)
    if no_eval:
        assert not marker.exists()
        assert env["X"] == f"$(touch {marker})"
        assert (env["Q"], env["D"], env["P"], env["E"]) == ("it''s", "$HOME `id`", "a'b'c", "")
    else:
        assert marker.exists() and env["X"] == "" and env["Q"] == "its"


def test_env_file_no_eval_rejects_shell_code(tmp_path: Path) -> None:
    path = tmp_path / "env"
    path.write_text("A=1\ntouch /tmp/x\n")
    with pytest.raises(UsageError, match=r"env:2: expected NAME=VALUE"):
        read_env_files([str(path)], no_eval=True)
    assert read_env_files([str(path)], no_eval=False) == "A=1\ntouch /tmp/x\n"


def test_no_env_dir_uses_default_path(tmp_path: Path) -> None:
    SHELL["path"] = "/bin/sh"
    env = run_env(tmp_path, {"X": "1"})
    assert env["PATH"] == DEFAULT_PATH and env["X"] == "1"


def test_bad_env_option() -> None:
    with pytest.raises(UsageError):
        parse_env_option(["novalue"])
    with pytest.raises(UsageError):
        parse_env_option(["1A=x"])


@pytest.mark.parametrize(("code", "status"), [("exit 0", 0), ("exit 3", 3), ("exit 255", 255)])
def test_exec_passes_exit_status(image: Path, code: str, status: int) -> None:
    penv = process_env(host={}, injected={}, env_file=None, no_eval=False, home="/h", runtime={})
    penv["__SIFPY_ROOT"] = str(image)
    r = subprocess.run(
        action_argv("exec", ["/bin/sh", "-c", code], shell=SHELL["path"]), env=penv, check=False
    )
    assert r.returncode == status


def test_exec_not_found_is_127(image: Path) -> None:
    penv = process_env(host={}, injected={}, env_file=None, no_eval=False, home="/h", runtime={})
    penv["__SIFPY_ROOT"] = str(image)
    r = subprocess.run(
        action_argv("exec", ["/nonexistent"], shell=SHELL["path"]),
        env=penv,
        capture_output=True,
        check=False,
    )
    assert r.returncode == 127

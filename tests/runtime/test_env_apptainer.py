"""Apptainer's own environment test tables, ported with the values Apptainer expects.

Upstream: github.com/apptainer/apptainer ``e2e/env/env.go`` (``apptainerEnv``,
``apptainerEnvOption``, ``apptainerNoEnvOption``, ``apptainerEnvFile``,
``apptainerEnvEval``) and ``e2e/env/regressions.go`` (``issue43``, ``issue1263``). Each
case keeps its upstream name. The action script runs here with the host's shells against
image directories laid out as Apptainer's test images are (no namespaces); the same
tables run end to end on real images in ``integration/runtime/test_apptainer_conformance.py``.

Two images, as upstream: ``default`` (busybox: only 99-base.sh, so the default PATH) and
``custom`` (Apptainer's e2e test image: its 10-docker2singularity.sh sets a PATH with
/go/bin and CGO_ENABLED=0).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from sifpy.runtime.action import action_argv
from sifpy.runtime.env import (
    host_env,
    injected_env,
    parse_env_option,
    parse_no_env,
    process_env,
    read_env_files,
)

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CUSTOM_PATH = DEFAULT_PATH + ":/go/bin:/usr/local/go/bin"
LIBS = "/.singularity.d/libs"
UID = str(os.getuid())

BASE_99 = 'if [ -z "$LD_LIBRARY_PATH" ]; then LD_LIBRARY_PATH=/.singularity.d/libs; fi\nPS1="Apptainer> "\nexport LD_LIBRARY_PATH PS1\n'
IMAGES = {
    "default": {"01-base.sh": "", "90-environment.sh": "", "99-base.sh": BASE_99},
    "custom": {
        "01-base.sh": "",
        "10-docker2singularity.sh": f'export PATH="{CUSTOM_PATH}"\nexport CGO_ENABLED="0"\n',
        "90-environment.sh": "",
        "99-base.sh": BASE_99,
    },
}  # fmt: skip
SHELLS = ["/bin/sh", "/bin/bash", "/bin/busybox"]


@pytest.fixture(params=SHELLS, ids=lambda s: s.rsplit("/", 1)[1])
def shell(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    path = str(request.param)
    if not Path(path).exists():
        pytest.skip(f"{path} not installed")
    if path == "/bin/busybox":
        (tmp_path / "sh").symlink_to(path)  # busybox picks the applet from argv[0]
        path = str(tmp_path / "sh")
    return path


def image(tmp_path: Path, name: str) -> Path:
    root = tmp_path / name
    env = root / ".singularity.d" / "env"
    env.mkdir(parents=True, exist_ok=True)
    for script, body in IMAGES[name].items():
        (env / script).write_text(body)
    return root


def run(
    shell: str,
    root: Path,
    var: str,
    *,
    environ: dict[str, str] | None = None,
    env_opt: list[str] | None = None,
    env_files: list[str] | None = None,
    no_env: list[str] | None = None,
    no_eval: bool = False,
    tmp: Path | None = None,
) -> str:
    """``apptainer exec [--env A,B] [--env-file F]... IMAGE /bin/sh -c 'echo "${VAR}"'``."""
    environ = environ or {}
    # Upstream joins the --env values of a case with commas into one option.
    opts = parse_env_option([",".join(env_opt)] if env_opt else [])
    files = []
    for i, text in enumerate(env_files or []):
        assert tmp is not None
        path = tmp / f"env.file{i}"
        path.write_text(text)
        files.append(str(path))
    penv = process_env(
        host=host_env(environ, False, parse_no_env([",".join(no_env)] if no_env else [], environ)),
        injected=injected_env(environ, opts),
        env_file=read_env_files(files, no_eval),
        late=opts,
        no_eval=no_eval,
        home="/home/u",
        runtime={},
        uid=os.getuid(),
    )
    penv["__SIFPY_ROOT"] = str(root)
    # printf, not upstream's echo: the host's dash would expand the backslashes echo gets
    # (TestEscapedNewline); busybox's echo, as in upstream's image, does not.
    argv = action_argv("exec", ["/bin/sh", "-c", f'printf "%s\\n" "${{{var}}}"'], shell=shell)
    r = subprocess.run(argv, env=penv, capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    assert "readonly variable" not in r.stderr  # regressions.go issue1263
    return r.stdout.removesuffix("\n")


# e2e/env/env.go apptainerEnv: (name, image, host environment, PATH)
ENV_PATH = [
    ("DefaultPath", "default", {}, DEFAULT_PATH),
    ("CustomPath", "custom", {}, CUSTOM_PATH),
    ("AppendToDefaultPath", "default", {"APPTAINERENV_APPEND_PATH": "/foo"}, DEFAULT_PATH + ":/foo"),
    ("AppendToCustomPath", "custom", {"APPTAINERENV_APPEND_PATH": "/foo"}, CUSTOM_PATH + ":/foo"),
    ("PrependToDefaultPath", "default", {"APPTAINERENV_PREPEND_PATH": "/foo"}, "/foo:" + DEFAULT_PATH),
    ("PrependToCustomPath", "custom", {"APPTAINERENV_PREPEND_PATH": "/foo"}, "/foo:" + CUSTOM_PATH),
    ("OverwriteDefaultPath", "default", {"APPTAINERENV_PATH": "/usr/bin:/bin"}, "/usr/bin:/bin"),
    ("OverwriteCustomPath", "custom", {"APPTAINERENV_PATH": "/usr/bin:/bin"}, "/usr/bin:/bin"),
    ("OverwriteTrailingCommaPath", "default", {"APPTAINERENV_PATH": "/usr/bin:/bin,"}, "/usr/bin:/bin,"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "img", "environ", "want"), ENV_PATH, ids=[c[0] for c in ENV_PATH])
def test_apptainer_env(
    shell: str, tmp_path: Path, name: str, img: str, environ: dict[str, str], want: str
) -> None:
    assert run(shell, image(tmp_path, img), "PATH", environ=environ) == want


# e2e/env/env.go apptainerEnvOption: (name, image, --env, host environment, var, value).
# The cases on upstream's Debian image that need its ldconfig (TestDefaultLdLibraryPathWithBind,
# TestPrependLdLibraryPath, TestAppendLdLibraryPath) run end to end only.
ENV_OPTION = [
    ("DefaultPath", "default", [], {}, "PATH", DEFAULT_PATH),
    ("DefaultPathOverride", "default", ["PATH=/"], {}, "PATH", "/"),
    ("AppendDefaultPath", "default", ["APPEND_PATH=/foo"], {}, "PATH", DEFAULT_PATH + ":/foo"),
    ("PrependDefaultPath", "default", ["PREPEND_PATH=/foo"], {}, "PATH", "/foo:" + DEFAULT_PATH),
    ("DefaultPathImage", "custom", [], {}, "PATH", CUSTOM_PATH),
    ("DefaultPathTestImageOverride", "custom", ["PATH=/"], {}, "PATH", "/"),
    ("AppendDefaultPathTestImage", "custom", ["APPEND_PATH=/foo"], {}, "PATH", CUSTOM_PATH + ":/foo"),
    ("AppendLiteralDefaultPathTestImage", "custom", ["PATH=$PATH:/foo"], {}, "PATH", CUSTOM_PATH + ":/foo"),
    ("PrependDefaultPathTestImage", "custom", ["PREPEND_PATH=/foo"], {}, "PATH", "/foo:" + CUSTOM_PATH),
    ("PrependLiteralDefaultPathTestImage", "custom", ["PATH=/foo:$PATH"], {}, "PATH", "/foo:" + CUSTOM_PATH),
    ("TestImageCgoEnabledDefault", "custom", [], {}, "CGO_ENABLED", "0"),
    ("TestImageCgoEnabledOverride", "custom", ["CGO_ENABLED=1"], {}, "CGO_ENABLED", "1"),
    ("TestImageCgoEnabledOverride_KO", "custom", [], {"CGO_ENABLED": "1"}, "CGO_ENABLED", "0"),
    ("TestImageCgoEnabledOverrideFromEnv", "custom", [], {"APPTAINERENV_CGO_ENABLED": "1"},
     "CGO_ENABLED", "1"),
    ("TestImageCgoEnabledOverrideEnvOptionPrecedence", "custom", ["CGO_ENABLED=2"],
     {"APPTAINERENV_CGO_ENABLED": "1"}, "CGO_ENABLED", "2"),
    ("TestImageCgoEnabledOverrideEmpty", "custom", ["CGO_ENABLED="], {}, "CGO_ENABLED", ""),
    ("TestImageOverrideHost", "custom", ["FOO=foo"], {"FOO": "bar"}, "FOO", "foo"),
    ("TestMultiLine", "custom", [], {"MULTI": "Hello\nWorld"}, "MULTI", "Hello\nWorld"),
    ("TestEscapedNewline", "custom", [], {"ESCAPED": "Hello\\nWorld"}, "ESCAPED", "Hello\\nWorld"),
    ("TestDefaultLdLibraryPath", "custom", [], {}, "LD_LIBRARY_PATH", LIBS),
    ("TestCustomTrailingCommaPath", "custom", ["LD_LIBRARY_PATH=/foo,"], {}, "LD_LIBRARY_PATH",
     "/foo,:" + LIBS),
    ("TestCustomLdLibraryPath", "custom", ["LD_LIBRARY_PATH=/foo"], {}, "LD_LIBRARY_PATH",
     "/foo:" + LIBS),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "img", "opts", "environ", "var", "want"), ENV_OPTION, ids=[c[0] for c in ENV_OPTION]
)
def test_apptainer_env_option(
    shell: str,
    tmp_path: Path,
    name: str,
    img: str,
    opts: list[str],
    environ: dict[str, str],
    var: str,
    want: str,
) -> None:
    assert run(shell, image(tmp_path, img), var, environ=environ, env_opt=opts) == want


# e2e/env/env.go apptainerNoEnvOption: (name, --no-env, host environment, var, value)
NO_ENV = [
    ("NormalImport", [], {"FOO": "bar", "BAR": "foo"}, "FOO", "bar"),
    ("NoEnvAlone", ["FOO"], {"FOO": "bar", "BAR": "foo"}, "FOO", ""),
    ("NoEnvSecond", ["BAR", "FOO"], {"FOO": "bar", "BAR": "foo"}, "FOO", ""),
    ("NoEnvViaEnv", [], {"FOO": "bar", "BAR": "foo", "APPTAINER_NOENV": "FOO,BAR"}, "FOO", ""),
    ("OverridePermitted", ["BAR", "FOO"], {"FOO": "bar", "BAR": "foo", "APPTAINERENV_FOO": "Bar"},
     "FOO", "Bar"),
    ("OverrideNotPermitted", ["APPTAINER_APPNAME"], {"APPTAINERENV_APPTAINER_APPNAME": "foo"},
     "APPTAINER_APPNAME", ""),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "no_env", "environ", "var", "want"), NO_ENV, ids=[c[0] for c in NO_ENV]
)
def test_apptainer_no_env_option(
    shell: str,
    tmp_path: Path,
    name: str,
    no_env: list[str],
    environ: dict[str, str],
    var: str,
    want: str,
) -> None:
    root = image(tmp_path, "default")
    assert run(shell, root, var, environ=environ, no_env=no_env) == want


# e2e/env/env.go apptainerEnvFile, on upstream's test image: (name, --env, env files, var, value)
ENV_FILE = [
    ("DefaultPathOverride", [], ["PATH=/"], "PATH", "/"),
    ("DefaultPathOverrideEnvOptionPrecedence", ["PATH=/etc"], ["PATH=/"], "PATH", "/etc"),
    ("DefaultPathOverrideEnvFileOptionPrecedence", [], ["PATH=/", "PATH=/etc"], "PATH", "/etc"),
    ("DefaultPathOverrideEnvAndEnvFileOptionPrecedence", ["PATH=/etc"], ["PATH=/", "PATH=/foo"],
     "PATH", "/etc"),
    ("AppendDefaultPath", [], ["APPEND_PATH=/"], "PATH", CUSTOM_PATH + ":/"),
    ("AppendLiteralDefaultPath", [], ['PATH="\\$PATH:/"'], "PATH", CUSTOM_PATH + ":/"),
    ("PrependLiteralDefaultPath", [], ['PATH="/:\\$PATH"'], "PATH", "/:" + CUSTOM_PATH),
    ("PrependDefaultPath", [], ["PREPEND_PATH=/"], "PATH", "/:" + CUSTOM_PATH),
    ("DefaultLdLibraryPath", [], [], "LD_LIBRARY_PATH", LIBS),
    ("CustomLdLibraryPath", [], ["LD_LIBRARY_PATH=/foo"], "LD_LIBRARY_PATH", "/foo:" + LIBS),
    ("CustomTrailingCommaPath", [], ["LD_LIBRARY_PATH=/foo,"], "LD_LIBRARY_PATH", "/foo,:" + LIBS),
    # e2e/env/regressions.go issue1263: an empty env file, no "readonly variable" error.
    ("issue1263", [], [""], "PATH", CUSTOM_PATH),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "opts", "files", "var", "want"), ENV_FILE, ids=[c[0] for c in ENV_FILE]
)
def test_apptainer_env_file(
    shell: str, tmp_path: Path, name: str, opts: list[str], files: list[str], var: str, want: str
) -> None:
    root = image(tmp_path, "custom")
    assert run(shell, root, var, env_opt=opts, env_files=files, tmp=tmp_path) == want


# e2e/env/env.go apptainerEnvEval: (name, APPTAINERENV_WHO, --no-eval, $WHO)
ENV_EVAL = [
    ("string env", "ME", False, "ME"),
    ("env var", "$UID", False, UID),
    ("double quoted env var", '"$UID"', False, f'"{UID}"'),
    ("single quoted env var", "'$UID'", False, f"'{UID}'"),
    ("escaped env var", "\\$UID", False, "$UID"),
    ("subshell env", "$(id -u)", False, UID),
    ("double quoted subshell env", '"$(id -u)"', False, f'"{UID}"'),
    ("single quoted subshell env", "'$(id -u)'", False, f"'{UID}'"),
    ("escaped subshell env", "\\$(id -u)", False, "$(id -u)"),
    ("no-eval/env var", "$UID", True, "$UID"),
    ("no-eval/double quoted env var", '"$UID"', True, '"$UID"'),
    ("no-eval/single quoted env var", "'$UID'", True, "'$UID'"),
    ("no-eval/escaped env var", "\\$UID", True, "\\$UID"),
    ("no-eval/subshell env", "$(id -u)", True, "$(id -u)"),
    ("no-eval/double quoted subshell env", '"$(id -u)"', True, '"$(id -u)"'),
    ("no-eval/single quoted subshell env", "'$(id -u)'", True, "'$(id -u)'"),
    ("no-eval/escaped subshell env", "\\$(id -u)", True, "\\$(id -u)"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "who", "no_eval", "want"), ENV_EVAL, ids=[c[0] for c in ENV_EVAL])
def test_apptainer_env_eval(
    shell: str, tmp_path: Path, name: str, who: str, no_eval: bool, want: str
) -> None:
    root = image(tmp_path, "custom")
    got = run(shell, root, "WHO", environ={"APPTAINERENV_WHO": who}, no_eval=no_eval)
    assert got == want


def test_apptainer_env_eval_no_env(shell: str, tmp_path: Path) -> None:
    """apptainerEnvEval "no env": $WHO unset is empty."""
    assert run(shell, image(tmp_path, "custom"), "WHO") == ""


def test_issue43_escaped_dollar_stays_literal(shell: str, tmp_path: Path) -> None:
    """e2e/env/regressions.go issue43: APPTAINERENV_LD_PRELOAD=/foo/bar/\\$LIB/baz.so."""
    environ = {"APPTAINERENV_LD_PRELOAD": "/foo/bar/\\$LIB/baz.so"}
    got = run(shell, image(tmp_path, "custom"), "LD_PRELOAD", environ=environ)
    assert got == "/foo/bar/$LIB/baz.so"


def test_env_file_unescaped_path_is_the_containers(shell: str, tmp_path: Path) -> None:
    """An unescaped ``$PATH`` in an env file: sifpy evaluates the file in the container, so
    it is the image's PATH (Apptainer evaluates it on the host: the host's PATH; one of the
    differences the README lists)."""
    root = image(tmp_path, "custom")
    got = run(shell, root, "PATH", env_files=["PATH=$PATH:/x"], tmp=tmp_path)
    assert got == CUSTOM_PATH + ":/x"


def test_env_file_sets_other_names_once(shell: str, tmp_path: Path) -> None:
    """A variable the file leaves as it was is not injected again (a second evaluation of a
    value from the image would be wrong); one it sets is, like APPTAINERENV_."""
    root = image(tmp_path, "custom")
    text = 'if false; then CGO_ENABLED=9; fi\nA="x\\"y z"\nB="it\'s"\n'
    assert run(shell, root, "CGO_ENABLED", env_files=[text], tmp=tmp_path) == "0"
    assert run(shell, root, "A", env_files=[text], tmp=tmp_path) == 'x"y z'
    assert run(shell, root, "B", env_files=[text], tmp=tmp_path) == "it's"

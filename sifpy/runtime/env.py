"""The container's environment, by Apptainer's rules (github.com/apptainer/apptainer:
internal/pkg/util/fs/files/action_script.sh and internal/pkg/util/env/create.go).

Python decides *which* values travel; the action script (:mod:`.action`), run by the
image's ``/bin/sh``, sources the image's ``/.singularity.d/env/*.sh`` and applies them in
Apptainer's order. Highest wins:

1. ``--env K=V``; 2. ``--env-file`` (evaluated by the shell, unless ``no_eval``);
3. ``SIFPYENV_K`` / ``APPTAINERENV_K`` / ``SINGULARITYENV_K`` from the host; 4. the image's
env scripts;
5. host variables, only where still unset after all of the above.

Host values never pass through a shell evaluation: they travel as ``__SIFPY_H_<K>`` and
are copied with ``export K="${__SIFPY_H_K}"``. Injected values (1 and 3) are evaluated
once, as Apptainer does (``export K="VALUE"`` with only ``"`` escaped: ``\\$UID`` stays
``$UID``), unless ``no_eval``. The env file is evaluated first, and each variable it sets
is then injected like an ``APPTAINERENV_`` one (evaluated again, ``PATH`` forms,
``LD_LIBRARY_PATH`` suffix), which is how ``PATH="\\$PATH:/foo"`` in a file reaches the
image's PATH in Apptainer. With ``no_eval`` the env file is read as literal ``NAME=VALUE``
lines (:func:`read_env_files`).
"""

from __future__ import annotations

import os

from sifpy import TYPE_CHECKING, config
from sifpy.errors import UsageError
from sifpy.runtime.start import DEFAULT_PATH
from sifpy.util import log

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping


def is_name(s: str) -> bool:
    """A shell variable name: ``[A-Za-z_][A-Za-z0-9_]*`` (without importing re)."""
    return s.isidentifier() and s.isascii()


# Forwarded even with --cleanenv (Apptainer: TERM and the proxy variables).
ALWAYS_FORWARDED = frozenset(
    ["TERM"]
    + [
        v
        for p in ("http_proxy", "https_proxy", "no_proxy", "all_proxy", "ftp_proxy")
        for v in (p, p.upper())
    ]
)
# Apptainer's alwaysOmitKeys (HOME, PATH, LD_LIBRARY_PATH), plus the loader's and
# Python's code-injection variables: they name host files that the image's programs would
# load (a same-named file in the image, or a host Python's stdlib for another Python).
# Set them in the container with SIFPYENV_<NAME> or --env when they are wanted.
NEVER_FORWARDED = frozenset(
    {"HOME", "PATH", "LD_LIBRARY_PATH", "PWD", "OLDPWD", "SHLVL", "_"}
    | {"LD_PRELOAD", "LD_AUDIT", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP"}
)
RUNTIME_PREFIXES = ("APPTAINER_", "SINGULARITY_", "SIFPY_")
# Host prefixes that inject into the container, lowest priority first.
INJECT_PREFIXES = ("SINGULARITYENV_", "APPTAINERENV_", "SIFPYENV_")
# Names the injected forms may not set (Apptainer: HOME, PATH via *_PATH forms only, ...).
NOT_INJECTABLE = frozenset({"HOME", "UID", "GID"})
PATH_FORMS = {
    "PATH": "SING_USER_DEFINED_PATH",
    "PREPEND_PATH": "SING_USER_DEFINED_PREPEND_PATH",
    "APPEND_PATH": "SING_USER_DEFINED_APPEND_PATH",
}
# Apptainer appends this to an injected non-empty LD_LIBRARY_PATH (process_linux.go,
# injectEnvHandler), so that libraries bound there (GPU drivers) are always found.
LIBS_DIR = "/.singularity.d/libs"
# What an env file may not set: Apptainer drops the shell's read-only variables from the
# evaluated file (env.ReadOnlyVars, github.com/sylabs/singularity/issues/1263).
READONLY_VARS = frozenset({"EUID", "GID", "HOME", "IFS", "OPTIND", "PWD", "UID"})


def host_env(
    environ: Mapping[str, str], cleanenv: bool, no_env: Iterable[str] = ()
) -> dict[str, str]:
    """Host variables the container may inherit (where the image leaves them unset).

    ``no_env``: names never inherited (``--no-env``); they can still be injected
    (``APPTAINERENV_K``, ``--env``), as Apptainer permits."""
    if cleanenv:
        env = {k: v for k, v in environ.items() if k in ALWAYS_FORWARDED}
        env["LANG"] = "C"
    else:
        env = {
            k: v
            for k, v in environ.items()
            if is_name(k)
            and k not in NEVER_FORWARDED
            and not k.startswith(RUNTIME_PREFIXES + INJECT_PREFIXES)
            and not k.startswith("__SIFPY_")
        }
    for name in no_env:
        env.pop(name, None)
    return env


def parse_no_env(values: Iterable[str], environ: Mapping[str, str]) -> list[str]:
    """``--no-env A,B`` (repeatable) and ``$APPTAINER_NOENV`` / ``$SINGULARITY_NOENV`` /
    ``$SIFPY_NOENV``: the names not to inherit from the host."""
    specs = [*values, *config.get_all("SIFPY_NOENV", environ)]
    return [n.strip() for spec in specs for n in spec.split(",") if n.strip()]


def parse_env_option(values: Iterable[str]) -> dict[str, str]:
    """``--env K=V[,K2=V2]`` (repeatable). A comma starts a new pair only before ``NAME=``."""
    out: dict[str, str] = {}
    for value in values:
        import re  # only with --env

        for item in re.split(r",(?=[A-Za-z_][A-Za-z0-9_]*=)", value):
            key, sep, val = item.partition("=")
            if not sep or not is_name(key):
                raise UsageError(
                    f"invalid --env value: {item!r}", hint="use --env NAME=VALUE[,NAME2=VALUE2]"
                )
            out[key] = val
    return out


def injected_env(environ: Mapping[str, str], env_opts: Mapping[str, str]) -> dict[str, str]:
    """Injected variables (prefix forms, then ``--env``), before the PATH forms are split."""
    env: dict[str, str] = {}
    for prefix in INJECT_PREFIXES:
        for k, v in environ.items():
            if k.startswith(prefix) and is_name(name := k[len(prefix) :]):
                if name in env and env[name] != v:
                    log.verbose(f"{k} overrides a lower-priority injected {name}")
                env[name] = v
    env.update(env_opts)
    for name in [n for n in env if n in NOT_INJECTABLE or n.endswith(("SHELL", "APPNAME"))]:
        if name not in ("UID", "GID"):
            log.warn(f"environment variable {name} can't be set this way; ignored")
        del env[name]
    return env


def _escape_for_eval(value: str) -> str:
    """Quote for ``eval "export K=\\"...\\""`` as Apptainer does (shell.EscapeDoubleQuotes:
    only ``"`` is escaped): ``$``, backquotes and backslashes keep their meaning inside
    double quotes, so ``\\$UID`` gives ``$UID`` and ``$UID`` the uid. A trailing odd
    backslash, which would escape the closing quote (a syntax error in Apptainer), is
    doubled."""
    value = value.replace('"', '\\"')
    if (len(value) - len(value.rstrip("\\"))) % 2:
        value += "\\"
    return value


def env_file_names(text: str) -> list[str]:
    """The variables an env file assigns (``NAME=`` at the start of a word), in order:
    the action script injects those the file's evaluation changed. Names a shell keeps
    read-only, and those never injectable, are left out, as Apptainer does."""
    import re  # only with --env-file

    names: dict[str, None] = {}
    for name in re.findall(r"(?:^|[\s;&|(`])(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=", text):
        if name in READONLY_VARS or name in NOT_INJECTABLE or name.startswith("__SIFPY"):
            continue
        if name.endswith(("SHELL", "APPNAME")):
            continue
        names[name] = None
    return list(names)


def process_env(
    *,
    host: Mapping[str, str],
    injected: Mapping[str, str],
    env_file: str | None,
    late: Iterable[str] = (),
    no_eval: bool,
    home: str,
    runtime: Mapping[str, str],
    uid: int | None = None,
) -> dict[str, str]:
    """The environment the action script starts with (see :mod:`.action`).

    ``uid``: the uid inside the container, the shell's ``$UID`` where the image's shell
    does not define it (Apptainer's interpreter does, and injected values may use it).

    ``injected`` is the merged result of :func:`injected_env`; names in ``late`` (the
    ``--env`` options) are applied after the env file, the rest before it.
    """
    # PATH starts at the default: "unset" can't be told apart in every shell (bash
    # invents one), and Apptainer sets this default before the image's scripts anyway.
    env: dict[str, str] = {"HOME": home, "PATH": DEFAULT_PATH}
    env.update(runtime)
    for k, v in host.items():
        env[f"__SIFPY_H_{k}"] = v
    env["__SIFPY_HOST_NAMES"] = " ".join(host)
    # The PATH forms become SING_USER_DEFINED_* variables, injected (evaluated) like the
    # others, so "$PATH" in them is the image's PATH at that point; the action script
    # applies them after the image's scripts (Apptainer's runtime_vars.sh).
    user: dict[str, str] = {}
    for k, v in injected.items():
        if k == "LD_LIBRARY_PATH" and v:
            v = f"{v}:{LIBS_DIR}"
        user[PATH_FORMS.get(k, k)] = v
    for k, v in user.items():
        env[f"__SIFPY_U_{k}"] = v if no_eval else _escape_for_eval(v)
    late_names = [PATH_FORMS.get(k, k) for k in late if k in injected]
    env["__SIFPY_USER_NAMES"] = " ".join(k for k in user if k not in late_names)
    env["__SIFPY_LATE_NAMES"] = " ".join(late_names)
    if no_eval:
        env["__SIFPY_NO_EVAL"] = "1"
    if env_file is not None:
        env["__SIFPY_ENV_FILE"] = env_file
        env["__SIFPY_FILE_NAMES"] = " ".join(env_file_names(env_file))
    if uid is not None:
        env["__SIFPY_UID"] = str(uid)
    return env


def read_env_files(paths: Iterable[str], no_eval: bool = False) -> str | None:
    """The concatenated text of ``--env-file`` files (later files win when sourced).

    With ``no_eval`` each file is read as literal ``NAME=VALUE`` lines and turned into
    single-quoted assignments, so the action script's ``eval`` of the text runs nothing:
    ``--no-eval`` must cover every injected value, the env file's included.
    """
    texts = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"can't read env file: {path}: {exc}") from exc
        texts.append(_literal_env_file(path, text) if no_eval else text)
    return "\n".join(texts) if texts else None


def _literal_env_file(path: str, text: str) -> str:
    """``NAME=VALUE`` lines (``#`` comments, blank lines and a leading ``export`` allowed;
    one pair of surrounding quotes dropped, as systemd's EnvironmentFile= does) as shell
    assignments that expand nothing."""
    out = []
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export") and line[6:7].isspace():
            line = line[6:].lstrip()
        name, sep, value = line.partition("=")
        if not sep or not is_name(name):
            raise UsageError(
                f"can't read env file: {path}:{n}: expected NAME=VALUE",
                hint="with --no-eval an env file holds literal NAME=VALUE lines, no shell code",
            )
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out.append(f"{name}='" + value.replace("'", "'\\''") + "'")
    return "\n".join(out)


def runtime_vars(image: str, action: str, app: str | None, binds: str) -> dict[str, str]:
    """``APPTAINER_*`` / ``SINGULARITY_*`` variables the runtime sets for the container."""
    values = {
        "CONTAINER": image,
        "NAME": os.path.basename(image.rstrip("/")),
        "COMMAND": action,
        "ENVIRONMENT": "/.singularity.d/env/91-environment.sh",
        "BIND": binds,
    }
    if app:
        values["APPNAME"] = app
    env = {}
    for prefix in ("APPTAINER_", "SINGULARITY_"):
        for k, v in values.items():
            env[prefix + k] = v
    return env

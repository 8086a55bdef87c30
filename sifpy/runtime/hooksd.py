"""OCI hooks from ``hooks.d`` directories, in the JSON 1.0.0 format that podman, CRI-O,
Buildah and Sarus read (https://github.com/containers/common/blob/main/pkg/hooks/docs/oci-hooks.5.md)::

    {"version": "1.0.0",
     "hook": {"path": "/usr/libexec/site/hook", "args": ["hook", "prestart"],
              "env": ["KEY=value"], "timeout": 10},
     "when": {"always": true, "annotations": {"KEY-REGEX": "VALUE-REGEX"},
              "commands": ["ARGV0-REGEX"], "hasBindMounts": true},
     "stages": ["prestart", "poststop"]}

Each ``*.json`` file of each directory is one hook. The directories are read in order and a
file masks a same-named file of an earlier directory (the later one is preferred); the hooks
then run in the order of their file names, compared in lower case (``01-a.json`` before
``02-b.json``), as podman orders them. A hook is added to every stage it names when *all*
the conditions it gives in ``when`` hold (at least one is required): ``always`` true;
each ``annotations`` pattern pair matches some annotation's key and value; the command
(``argv[0]`` as given) matches one of ``commands``; ``hasBindMounts`` true and the caller
asked for binds. Patterns are regular expressions searched anywhere in the text, as Go's
``regexp.MatchString`` does (anchor them with ``^...$``).

The result is a list of hook dicts in the shape :mod:`sifpy.runtime.hooks` runs (``stage``,
``path``, ``args``, ``env``, ``timeout``, ``source``): ``sifpy exec`` and any other caller
with a container to start (an OCI runtime's ``config.json`` hooks go beside them) use
:func:`matching`.

A file that can't be read or is not a valid 1.0.0 hook stops the start with one error that
names the file and the field: a site's hook that silently does not run is worse than a
start that says why it refused.
"""

from __future__ import annotations

import os

from sifpy import TYPE_CHECKING
from sifpy.errors import RuntimeSetupError
from sifpy.runtime.hooks import STAGES

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from typing import Any

DEFAULT_DIR = "/etc/sifpy/hooks.d"
VERSION = "1.0.0"
_WHEN = ("always", "annotations", "commands", "hasBindMounts")
_HINT = "a hook file is JSON 1.0.0: version, hook {path, args, env, timeout}, when, stages"


def has_hooks(dirs: Sequence[str]) -> bool:
    """Whether any of ``dirs`` holds a ``*.json`` file: the cheap check callers on the
    exec path make before importing anything else (one failed open per missing
    directory)."""
    for d in dirs:
        try:
            names = os.listdir(d)
        except OSError:
            continue
        if any(n.endswith(".json") for n in names):
            return True
    return False


def files(dirs: Sequence[str], required: Sequence[str] = ()) -> list[str]:
    """The hook files of ``dirs``, a later directory's file masking an earlier one's of the
    same name, in the order they run. A missing directory is skipped, unless it is one of
    ``required`` (the caller named it explicitly)."""
    chosen: dict[str, str] = {}
    for d in dirs:
        try:
            names = os.listdir(d)
        except FileNotFoundError as exc:
            if d in required:
                raise RuntimeSetupError(
                    f"can't read hooks directory: {d}: no such directory",
                    hint="give --hooks-dir an existing directory of *.json hook files",
                ) from exc
            continue
        except OSError as exc:
            raise RuntimeSetupError(
                f"can't read hooks directory: {d}: {exc.strerror}",
                hint="the directory must be readable by the user who starts the container",
            ) from exc
        for name in names:
            if name.endswith(".json"):
                chosen[name] = os.path.join(d, name)
    return [chosen[n] for n in sorted(chosen, key=lambda n: (n.lower(), n))]


def load(path: str) -> dict[str, Any]:
    """Read and validate one hook file; returns the parsed object, regexes checked."""
    import json

    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as exc:
        raise RuntimeSetupError(f"can't read hook: {path}: {exc.strerror}") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise RuntimeSetupError(f"can't read hook: {path}: not valid JSON: {exc}", _HINT) from exc
    if not isinstance(data, dict):
        _bad(path, "(top level)", "must be an object")
    version = data.get("version")
    if version != VERSION:
        why = "is required" if version is None else f"is {version!r}, sifpy reads only {VERSION!r}"
        _bad(path, "version", why)
    hook = data.get("hook")
    if not isinstance(hook, dict):
        _bad(path, "hook", "is required (an object)" if hook is None else "must be an object")
    hook_path = hook.get("path")
    if not isinstance(hook_path, str) or not hook_path:
        _bad(path, "hook.path", "is required (a string)")
    if not os.path.isabs(hook_path):
        _bad(path, "hook.path", f"must be absolute: {hook_path!r}")
    for key in ("args", "env"):
        value = hook.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            _bad(path, f"hook.{key}", "must be a list of strings")
    if not all("=" in e for e in hook.get("env", [])):
        _bad(path, "hook.env", "each entry must be KEY=VALUE")
    timeout = hook.get("timeout")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, int) or timeout <= 0
    ):
        _bad(path, "hook.timeout", "must be a whole number of seconds greater than zero")
    when = data.get("when")
    if not isinstance(when, dict):
        _bad(path, "when", "is required (an object)" if when is None else "must be an object")
    if not any(k in when for k in _WHEN):
        _bad(path, "when", f"needs at least one condition: {', '.join(_WHEN)}")
    for key in ("always", "hasBindMounts"):
        if key in when and not isinstance(when[key], bool):
            _bad(path, f"when.{key}", "must be true or false")
    annotations = when.get("annotations", {})
    if not isinstance(annotations, dict) or not all(
        isinstance(v, str) for v in annotations.values()
    ):
        _bad(path, "when.annotations", "must map key patterns to value patterns (strings)")
    for key, value in annotations.items():
        _regex(path, f"when.annotations key {key!r}", key)
        _regex(path, f"when.annotations[{key!r}]", value)
    commands = when.get("commands", [])
    if not isinstance(commands, list) or not all(isinstance(c, str) for c in commands):
        _bad(path, "when.commands", "must be a list of patterns (strings)")
    for i, command in enumerate(commands):
        _regex(path, f"when.commands[{i}]", command)
    stages = data.get("stages")
    if not isinstance(stages, list) or not stages or not all(isinstance(s, str) for s in stages):
        _bad(path, "stages", "is required (a non-empty list of stage names)")
    for i, stage in enumerate(stages):
        if stage not in STAGES:
            _bad(path, f"stages[{i}]", f"unknown stage {stage!r} (sifpy runs {', '.join(STAGES)})")
    return dict(data)


def _bad(path: str, field: str, why: str) -> Any:
    raise RuntimeSetupError(f"can't read hook: {path}: {field}: {why}", _HINT)


def _regex(path: str, field: str, pattern: str) -> None:
    import re

    try:
        re.compile(pattern)
    except re.error as exc:
        _bad(path, field, f"invalid regular expression {pattern!r}: {exc}")


def matches(
    when: Mapping[str, Any], argv0: str, annotations: Mapping[str, str], has_bind_mounts: bool
) -> bool:
    """Whether every condition of a (validated) ``when`` holds."""
    import re

    if "always" in when and not when["always"]:
        return False
    if "hasBindMounts" in when and not (when["hasBindMounts"] and has_bind_mounts):
        return False
    for key_re, value_re in when.get("annotations", {}).items():
        if not any(re.search(key_re, k) and re.search(value_re, v) for k, v in annotations.items()):
            return False
    commands = when.get("commands")
    return not commands or any(re.search(c, argv0) for c in commands)


def matching(
    dirs: Sequence[str],
    argv: Sequence[str],
    annotations: Mapping[str, str] | None = None,
    has_bind_mounts: bool = False,
    required: Sequence[str] = (),
) -> list[dict[str, object]]:
    """The hooks of ``dirs`` that apply to a container running ``argv`` with
    ``annotations``, one dict per (hook, stage), in the order they run, in the shape
    :func:`sifpy.runtime.hooks.run` takes. ``required``: directories that must exist."""
    if not argv:
        raise RuntimeSetupError("can't match hooks: the container has no command")
    out: list[dict[str, object]] = []
    for path in files(dirs, required):
        data = load(path)
        if not matches(data["when"], argv[0], annotations or {}, has_bind_mounts):
            continue
        hook = data["hook"]
        for stage in data["stages"]:
            out.append(
                {
                    "stage": stage,
                    "path": hook["path"],
                    # As runc (Go's exec.Cmd): no args means argv is just the path.
                    "args": hook.get("args") or [hook["path"]],
                    "env": hook.get("env", []),
                    "timeout": hook.get("timeout"),
                    "source": path,
                }
            )
    return out

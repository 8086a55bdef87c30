"""The way back from Apptainer's in-image metadata to an OCI image config (the reverse of
:mod:`sifpy.rootfs.imageconfig`).

- ``Env``: the assignments of ``/.singularity.d/env/*.sh`` (``01-base.sh``, ``99-base.sh``
  and ``99-runtimevars.sh`` are the runtime's own and are skipped), in the order a shell
  would source them. The scripts are the image author's shell code and are never run
  here: a line is read only when its value is plain text, a quoted string, the
  ``"${K:-"V"}"`` form that Apptainer writes for an image's ENV, or refers to variables
  already set (``$PATH``, ``${HOME}``). Anything else (commands, conditionals and what
  they hold, ``$(...)``) can't be carried into a static config and is reported, not
  guessed.
- ``Entrypoint``/``Cmd``: a runscript Apptainer (or sifpy) made from an OCI image keeps the
  original lists in its ``OCI_ENTRYPOINT=``/``OCI_CMD=`` lines, and they come back as they
  were; any other runscript becomes ``Entrypoint: ["/.singularity.d/runscript"]``, which
  runs it with the arguments given, as ``apptainer run`` does.
- ``Labels``: ``/.singularity.d/labels.json``.
- ``PATH`` defaults to the runtime's default when no script sets it (an OCI runtime gives a
  process no PATH of its own), and ``$PATH`` means that default until a script sets it.
"""

from __future__ import annotations

import json
import re
import shlex
from datetime import UTC, datetime
from typing import Any

from sifpy.squashfs.read import ImageFiles
from sifpy.util import log

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
ENV_DIR = "/.singularity.d/env"
RUNSCRIPT = "/.singularity.d/runscript"
LABELS = "/.singularity.d/labels.json"
# The runtime's own scripts: the base, the SCIF app activation (only with --app), the
# library path and prompt, the runtime's variables.
_RUNTIME_SCRIPTS = frozenset({"01-base.sh", "95-apps.sh", "99-base.sh", "99-runtimevars.sh"})
_OPENERS = frozenset({"if", "for", "while", "until", "case"})
_CLOSERS = frozenset({"fi", "done", "esac"})
_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_DOCKER_FORM = re.compile(rf'(?:export\s+)?({_NAME})="\$\{{\1:-"(.*)"\}}"')
_ASSIGN = re.compile(rf"(?:export\s+)?({_NAME})=(.*)")
_EXPORT_ONLY = re.compile(rf"export(\s+{_NAME})+")
_REF = re.compile(rf"\$(?:({_NAME})|\{{({_NAME})\}})")
_UNSAFE = re.compile(r"\$\(|`|\$\{[^}]*[^A-Za-z0-9_}]|\$[^A-Za-z_{]|[;&|<>]")


def _dq_unescape(text: str) -> str:
    return re.sub(r'\\([\\"`$])', r"\1", text)


def _value(raw: str, env: dict[str, str]) -> str | None:
    """The value of the right-hand side ``raw`` of an assignment, or None when only a shell
    could tell."""
    raw = raw.strip()
    if len(raw) >= 2 and raw[0] == raw[-1] == "'" and "'" not in raw[1:-1]:
        return raw[1:-1]
    if len(raw) >= 2 and raw[0] == raw[-1] == '"':
        inner = raw[1:-1]
        if re.search(r'(?<!\\)"', inner):
            return None
    else:
        if any(c in raw for c in " \t'\"\\"):
            return None
        inner = raw
    if _UNSAFE.search(re.sub(r"\\[\\\"`$]", "", inner)):
        return None

    def ref(m: re.Match[str]) -> str:
        name = m[1] or m[2]
        return env.get(name, DEFAULT_PATH if name == "PATH" else "")

    pieces = re.split(r"(\\[\\\"`$])", inner)  # escaped characters are literal
    return "".join(p[1] if p.startswith("\\") else _REF.sub(ref, p) for p in pieces)


def parse_env_script(text: str, env: dict[str, str]) -> list[str]:
    """Apply the assignments of one env script to ``env``; return the lines skipped."""
    skipped = []
    depth = 0  # inside a conditional, a loop or a function: nothing there is certain
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word = line.split(None, 1)[0].rstrip(";")
        if word in _OPENERS or line.endswith("{"):
            depth += 1
        if depth:
            if word in _CLOSERS or line.startswith("}"):
                depth -= 1
                if not depth:
                    skipped.append(line)
            continue
        if _EXPORT_ONLY.fullmatch(line):
            continue
        m = _DOCKER_FORM.fullmatch(line)
        if m and not re.search(r'(?<!\\)"', m[2]):
            env[m[1]] = _dq_unescape(m[2])
            continue
        m = _ASSIGN.fullmatch(line)
        value = _value(m[2], env) if m else None
        if m is None or value is None:
            skipped.append(line)
            continue
        env[m[1]] = value
    return skipped


def environment(files: ImageFiles) -> list[str]:
    """The image's environment as OCI ``Env`` entries (``K=V``), in the scripts' order."""
    env: dict[str, str] = {}
    skipped: list[str] = []
    for name in sorted(files.listdir(ENV_DIR)):
        if name in _RUNTIME_SCRIPTS or not name.endswith(".sh"):
            continue
        data = files.read(f"{ENV_DIR}/{name}")
        if data is not None:
            skipped += parse_env_script(data.decode("utf-8", "replace"), env)
    if skipped:
        log.warn(
            f"{len(skipped)} statement(s) of the image's environment scripts are shell code "
            f"that a static OCI config can't hold; left out (last line: {skipped[0][:80]!r})"
        )
    env.setdefault("PATH", DEFAULT_PATH)
    return [f"{k}={v}" for k, v in env.items()]


def _oci_list(script: str, name: str) -> list[str] | None:
    m = re.search(rf"^{name}=(.*)$", script, re.M)
    if m is None:
        return None
    try:
        (quoted,) = shlex.split(m[1]) or [""]
        return shlex.split(quoted)
    except ValueError:
        return None


def entrypoint_cmd(files: ImageFiles) -> tuple[list[str], list[str]]:
    """``(Entrypoint, Cmd)`` from the runscript (see the module's docstring)."""
    data = files.read(RUNSCRIPT)
    if data is None:
        return [], []
    script = data.decode("utf-8", "replace")
    entrypoint = _oci_list(script, "OCI_ENTRYPOINT")
    cmd = _oci_list(script, "OCI_CMD")
    if entrypoint is not None and cmd is not None:
        return entrypoint, cmd
    return [RUNSCRIPT], []


def labels(files: ImageFiles) -> dict[str, str]:
    data = files.read(LABELS)
    if not data:
        return {}
    try:
        doc = json.loads(data)
    except ValueError:
        log.warn(f"{LABELS} is not JSON; the image's labels are left out")
        return {}
    if not isinstance(doc, dict):
        return {}
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in doc.items()}


def rfc3339(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def image_config(files: ImageFiles, arch: str, created: int, diff_id: str) -> dict[str, Any]:
    """The OCI image config of an image whose one layer has the uncompressed digest
    ``diff_id`` (image-spec ``config.md``)."""
    entrypoint, cmd = entrypoint_cmd(files)
    section: dict[str, Any] = {"Env": environment(files)}
    if entrypoint:
        section["Entrypoint"] = entrypoint
    if cmd:
        section["Cmd"] = cmd
    lab = labels(files)
    if lab:
        section["Labels"] = lab
    when = rfc3339(created)
    return {
        "created": when,
        "architecture": arch,
        "os": "linux",
        "config": section,
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": when, "created_by": "sifpy export"}],
    }


def relayered(config: dict[str, Any], diff_id: str) -> dict[str, Any]:
    """An image's own ``config`` for the one layer ``diff_id``: its layers and their
    history (one entry per layer, which readers match up) become that one."""
    out = {k: v for k, v in config.items() if k not in ("rootfs", "history")}
    out["rootfs"] = {"type": "layers", "diff_ids": [diff_id]}
    when = config.get("created")
    entry: dict[str, Any] = {"created_by": "sifpy export"}
    if isinstance(when, str):
        entry["created"] = when
    out["history"] = [entry]
    return out

"""The values of ``sifpy exec``'s options: ``--bind`` and ``--mount`` specs, ``--overlay``
lists, durations (``--runscript-timeout``), and the binds and MPI host that ``sifpy.conf``
adds.
"""

from __future__ import annotations

import os

from sifpy import TYPE_CHECKING, config
from sifpy.errors import UsageError
from sifpy.util import log

if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

    from sifpy.sign.policy import Policy


_BIND_OPTIONS = ("ro", "rw")


def _split_unescaped(text: str, sep: str) -> list[str]:
    """Split at each ``sep`` not preceded by a backslash (Apptainer's ``\\,`` and ``\\:``)."""
    parts, cur, i = [], "", 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in ",:":
            cur += text[i : i + 2]
            i += 2
            continue
        if text[i] == sep:
            parts.append(cur)
            cur = ""
        else:
            cur += text[i]
        i += 1
    parts.append(cur)
    return parts


def _unescape(text: str) -> str:
    return text.replace("\\,", ",").replace("\\:", ":")


def parse_binds(specs: list[str]) -> list[tuple[str, str, bool]]:
    """``src[:dest[:opts]]`` items, comma separated, as Apptainer's ParseBindPath reads them:
    dest defaults to src; ``\\,`` and ``\\:`` are a literal comma and colon; options are
    ``ro`` / ``rw``, and after a bind with options a comma may also start another option
    (``/a:/b:ro,rw``)."""
    items: list[list[str]] = []
    for spec in specs:
        for token in _split_unescaped(spec, ","):
            token = token.strip()
            if not token:
                continue
            if token in _BIND_OPTIONS and items and len(items[-1]) == 3:
                items[-1][2] += "," + token
                continue
            items.append(_split_unescaped(token, ":"))
    binds = []
    for parts in items:
        item = ":".join(parts)
        if len(parts) > 3 or not parts[0]:
            raise UsageError(f"invalid bind: {item!r}", hint="use SRC[:DEST[:ro|rw]]")
        src = _unescape(parts[0])
        dest = _unescape(parts[1]) if len(parts) > 1 and parts[1] else src
        readonly = False
        for opt in parts[2].split(",") if len(parts) > 2 else []:
            if opt not in _BIND_OPTIONS:
                raise UsageError(f"invalid bind option {opt!r} in {item!r}", hint="use ro or rw")
            readonly = opt == "ro"
        if not dest.startswith("/"):
            raise UsageError(f"bind destination must be absolute: {item!r}")
        binds.append((os.path.abspath(src), os.path.normpath(dest), readonly))
    return binds


def parse_overlays(specs: list[str]) -> tuple[tuple[str, bool], ...]:
    """``--overlay PATH[:ro|:rw]`` options: (absolute path, writable), in order; at most one
    writable, as Apptainer allows."""
    out = []
    for spec in specs:
        path, _, mode = spec.rpartition(":") if spec.endswith((":ro", ":rw")) else (spec, "", "")
        out.append((os.path.abspath(path), mode != "ro"))
    if sum(w for _, w in out) > 1:
        raise UsageError(
            "only one --overlay can be writable", hint="add :ro to all the others but one"
        )
    return tuple(out)


def config_binds(rules: Policy) -> list[str]:
    """``bind path = SRC[:DEST]`` lines of sifpy.conf (and ``$SIFPY_CONFIG``); as Apptainer,
    a source missing on this host is skipped, not an error (one file serves many nodes)."""
    out = []
    for spec in rules.system.binds + rules.user.binds:
        if os.path.exists(spec.split(":", 1)[0]):
            out.append(spec)
        else:
            log.verbose(f"bind path {spec}: no such file or directory here, skipped")
    return out


def mpi_host(rules: Policy) -> Any:
    """``--mpi``: the host's MPI as sifpy.conf names it (default: its mpi alternative)."""
    from sifpy.runtime import mpibind

    libraries, dependencies, mode = rules.mpi()
    return mpibind.host(libraries, dependencies, mode)


def parse_mounts(specs: list[str]) -> list[tuple[str, str, bool, bool]]:
    """Docker-style ``[type=bind,]source=S,destination=D[,ro|readonly[=true|false]]
    [,nonested]`` specs (one per item, CSV-quoted as Apptainer reads them): (src, dest,
    readonly, nonested). Without ``type=`` a mount is a bind, as in Docker and Apptainer."""
    if not specs:
        return []
    import csv  # only when --mount is used

    binds = []
    for spec in specs:
        fields: dict[str, str] = {}
        for row in csv.reader([spec]):
            for field in row:
                key, eq, value = field.strip().partition("=")
                fields[key] = value if eq else "true"
        kind = fields.pop("type", "bind")
        src = fields.pop("source", "") or fields.pop("src", "")
        dst = fields.pop("destination", "") or fields.pop("dst", "") or fields.pop("target", "")
        ro = fields.pop("ro", "") or fields.pop("readonly", "") or "false"
        no_nest = fields.pop("nonested", "false")
        for key in ("src", "dst", "target", "readonly"):
            fields.pop(key, None)
        if fields.pop("rw", "false") in ("true", "1"):
            ro = "false"
        if kind != "bind" or not src or not dst.startswith("/") or fields:
            extra = f" (unsupported: {', '.join(fields)})" if fields else ""
            raise UsageError(
                f"invalid --mount: {spec!r}", hint=f"use type=bind,src=PATH,dst=/PATH[,ro]{extra}"
            )
        if ro not in ("true", "false", "1", "0") or no_nest not in ("true", "false", "1", "0"):
            raise UsageError(f"invalid --mount: {spec!r}: ro={ro}", hint="use ro or ro=true")
        binds.append(
            (
                os.path.abspath(src),
                os.path.normpath(dst),
                ro in ("true", "1"),
                no_nest in ("true", "1"),
            )
        )
    return binds


_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: str) -> float:
    """A Go duration (``1m``, ``30s``, ``1h30m``, ``1.5s``) as Apptainer's
    ``--runscript-timeout`` takes it, in seconds; anything else is refused, as there."""
    import re

    unit = r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)"
    if value == "0":
        return 0.0
    if not re.fullmatch(rf"[+-]?(?:{unit})+", value):
        raise UsageError(
            f"invalid --runscript-timeout: {value!r}", hint="use a duration such as 30s or 1m"
        )
    seconds = sum(float(n) * _UNITS[u] for n, u in re.findall(unit, value))
    return -seconds if value.startswith("-") else seconds


RUNSCRIPT_TIMEOUT = 60.0  # Apptainer's default (the starter's fast path has it too)


def runscript_timeout(a: Any, environ: Mapping[str, str]) -> float:
    """Apptainer's deadline for the action script: ``--runscript-timeout``, else
    $APPTAINER_RUNSCRIPT_TIMEOUT ($SIFPY_ first), else one minute."""
    value = a.runscript_timeout
    if value is None:
        value = config.get("SIFPY_RUNSCRIPT_TIMEOUT", environ)
    return RUNSCRIPT_TIMEOUT if value is None else parse_duration(value)

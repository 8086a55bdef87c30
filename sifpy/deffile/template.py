"""``{{ var }}`` templating and ``--build-arg-file`` reading.

Mirrors apptainer:internal/pkg/build/build.go (``MakeAllDefs``) and
internal/pkg/build/args: each stage's raw text is parsed once for its
``%arguments`` defaults, ``{{ NAME }}`` is then replaced everywhere (header
included), and the result is parsed again. Build args override defaults.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from sifpy.errors import DefFileError
from sifpy.util import log

# Go's `\w` is ASCII-only; Python's is not, so spell it out.
PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z0-9_]+)\s*\}\}")
# Apptainer skips a placeholder when the text before it on its line matches
# `\s*#[^!]`. The match is not anchored, so any `#x` earlier on the line counts;
# sifpy keeps that quirk so the same file expands the same way.
_COMMENT_BEFORE = re.compile(r"#[^!]")

Line = tuple[int, str]


class Substituter:
    """Replaces placeholders in one stage; records which build args were used."""

    def __init__(self, path: str, build_args: Mapping[str, str], used: set[str]) -> None:
        self.path = path
        self.build_args = build_args
        self.used = used

    def lines(self, lines: list[Line], defaults: Mapping[str, str]) -> list[Line]:
        """Substitute in every line; a value with newlines keeps its source line number."""
        out: list[Line] = []
        for number, text in lines:
            if "{{" not in text:
                out.append((number, text))
                continue
            new = self._line(number, text, defaults)
            out.extend((number, part.removesuffix("\r")) for part in new.split("\n"))
        return out

    def _line(self, number: int, text: str, defaults: Mapping[str, str]) -> str:
        def replace(match: re.Match[str]) -> str:
            if _COMMENT_BEFORE.search(text, 0, match.start()):
                return match.group(0)
            value = self._value(match.group(1), number, defaults)
            # One level of nesting: placeholders inside a value are expanded once.
            return PLACEHOLDER.sub(
                lambda inner: self._value(inner.group(1), number, defaults), value
            )

        return PLACEHOLDER.sub(replace, text)

    def _value(self, name: str, number: int, defaults: Mapping[str, str]) -> str:
        if name in self.build_args:
            self.used.add(name)
            return self.build_args[name]
        if name in defaults:
            return defaults[name]
        raise DefFileError(
            f"build var {name} is not defined through either --build-arg "
            "(--build-arg-file) or '%arguments' section",
            self.path,
            number,
            hint=f"pass --build-arg {name}=VALUE, or add '{name}=VALUE' under %arguments",
        )


def read_build_arg_file(path: str | Path) -> dict[str, str]:
    """Read a ``--build-arg-file``: ``KEY=VALUE`` lines, key and value trimmed.

    Blank lines and ``#`` lines are skipped; other lines without ``=`` are skipped
    with a warning, as Apptainer does (internal/pkg/build/args/args.go).
    """
    name = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DefFileError(f"can't read build arg file: {exc.strerror}", name) from exc
    text = decode(data, name)
    args: dict[str, str] = {}
    for number, raw in enumerate(text.split("\n"), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, eq, value = line.partition("=")
        if not eq or not key.strip():
            log.warn(f"{name}:{number}: skipping {line!r} in build arg file: not KEY=VALUE")
            continue
        args[key.strip()] = value.strip()
    return args


def decode(data: bytes, path: str) -> str:
    """UTF-8 text of ``data`` (a leading BOM dropped); bad bytes name their line."""
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DefFileError(
            f"not UTF-8: invalid byte at offset {exc.start}",
            path,
            line,
            hint="save the file as UTF-8",
        ) from exc

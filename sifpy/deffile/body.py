"""Line grammars inside data sections: ``%files``, ``%labels`` and ``%arguments``.

Each function takes a section body and the line number of its first body line,
and yields ``(line, ...)`` tuples; malformed lines raise :class:`DefFileError`.
The parser calls these once to validate, so the model's helpers never fail on a
parsed recipe.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from sifpy.errors import DefFileError

# A %files word: a double- or single-quoted run (quotes dropped) or a bare run.
# Apptainer's splitter (deffile.go fileSplitter) also keeps spaces inside quotes.
_FILES_WORD = re.compile(r'"([^"]*)"|\'([^\']*)\'|([^\s"\']+)|(["\'])')


def _data_lines(body: str, first_line: int) -> Iterator[tuple[int, str]]:
    """Non-blank, non-comment lines of ``body``, stripped, with their line numbers."""
    for offset, raw in enumerate(body.split("\n")):
        line = raw.strip()
        if line and not line.startswith("#"):
            yield first_line + offset, line


def files_lines(body: str, first_line: int, path: str) -> Iterator[tuple[int, str, str]]:
    """``(line, src, dst)`` for each copy in a ``%files`` body; dst defaults to src."""
    for number, line in _data_lines(body, first_line):
        words: list[str] = []
        for match in _FILES_WORD.finditer(line):
            if match.group(4):
                raise DefFileError(
                    f"unbalanced quote in %files line: {line}",
                    path,
                    number,
                    hint="close the quote, or escape it",
                )
            words.append(next(g for g in match.groups()[:3] if g is not None))
        if len(words) > 2:
            raise DefFileError(
                f"too many paths in %files line: {line}",
                path,
                number,
                hint="each line is 'SOURCE [DESTINATION]'; quote paths that contain spaces",
            )
        yield number, words[0], words[-1]


def label_lines(body: str, first_line: int) -> Iterator[tuple[int, str, str]]:
    """``(line, name, value)`` per ``%labels`` line: the first space splits name from value."""
    for number, line in _data_lines(body, first_line):
        name, _, value = line.partition(" ")
        yield number, name.strip(), value.strip()


def argument_lines(body: str, first_line: int, path: str) -> Iterator[tuple[int, str, str]]:
    """``(line, key, value)`` per ``%arguments`` line: ``KEY=VALUE``, both trimmed.

    Quotes are kept literally, as in apptainer:internal/pkg/build/args/args.go.
    Apptainer only warns about a line without ``=``; sifpy rejects it, since a
    default that silently disappears surfaces later as an undefined variable.
    """
    for number, line in _data_lines(body, first_line):
        key, eq, value = line.partition("=")
        if not eq or not key.strip():
            raise DefFileError(
                f"invalid %arguments line: {line}",
                path,
                number,
                hint="each line is KEY=VALUE",
            )
        yield number, key.strip(), value.strip()

"""Parse Apptainer definition files into a :class:`~sifpy.deffile.model.Recipe`.

Follows apptainer:pkg/build/types/parser/deffile.go (``All`` and
``ParseDefinitionFile``) and internal/pkg/build/build.go (``MakeAllDefs``):

1. split the file into stages at every line starting with ``Bootstrap:``;
2. per stage, the header is every line before the first line whose first word
   starts with ``%``; each such line starts a section;
3. per stage, read ``%arguments``, substitute ``{{ var }}``, parse again.

Every syntax error is a :class:`DefFileError` carrying ``path:line``.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path

from sifpy.deffile import body as _body
from sifpy.deffile.grammar import ALL_SECTIONS, APP_SECTIONS, HEADER_KEYWORDS, canonical_keyword
from sifpy.deffile.model import HeaderEntry, Recipe, Section, Stage
from sifpy.deffile.template import Line, Substituter, decode
from sifpy.errors import DefFileError
from sifpy.util import log

_START_HINT = "a definition file starts with 'Bootstrap: <agent>', e.g. 'Bootstrap: docker'"


def parse(
    text: str,
    path: str = "<string>",
    build_args: Mapping[str, str] | None = None,
    warn_unused_build_args: bool = False,
) -> Recipe:
    """Parse definition-file ``text``; ``path`` only labels error messages.

    ``build_args`` (from ``--build-arg`` / ``--build-arg-file``) override the
    ``%arguments`` defaults. A build arg no stage uses is an error, or a warning
    with ``warn_unused_build_args`` (Apptainer's ``--warn-unused-build-args``).
    """
    args = dict(build_args or {})
    used: set[str] = set()
    subst = Substituter(path, args, used)
    stages: list[Stage] = []
    for chunk in _split_stages(_lines(text)):
        raw = _parse_stage(chunk, path, None)
        if raw is None:
            continue  # only comments and blank lines (e.g. before the first Bootstrap)
        if any("{{" in t for _, t in chunk):
            chunk = subst.lines(chunk, raw.arguments())
        stage = _parse_stage(chunk, path, stages)
        if stage is not None:
            stages.append(stage)
    _check_stages(stages, path)
    unused = sorted(set(args) - used)
    if unused:
        message = f"unused build args: {', '.join(unused)}"
        if not warn_unused_build_args:
            raise DefFileError(message, path, hint="remove them, or pass --warn-unused-build-args")
        log.warn(f"{path}: {message}")
    return Recipe(tuple(stages), path)


def parse_file(
    path: str | Path,
    build_args: Mapping[str, str] | None = None,
    warn_unused_build_args: bool = False,
) -> Recipe:
    """Read and parse the definition file at ``path`` (UTF-8)."""
    name = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DefFileError(f"can't read definition file: {exc.strerror}", name) from exc
    return parse(decode(data, name), name, build_args, warn_unused_build_args)


def _lines(text: str) -> list[Line]:
    # Like Go's bufio.ScanLines: split at "\n" only and drop one trailing "\r"
    # (str.splitlines would also split at \v, \f, \x1c, U+2028, ...).
    parts = text.split("\n")
    if parts and parts[-1] == "":
        parts.pop()
    return [(n, p.removesuffix("\r")) for n, p in enumerate(parts, 1)]


def _starts_stage(line: str) -> bool:
    # deffile.go All: `(?mi)^bootstrap:`; only at column 0, so an indented
    # Bootstrap is an ordinary header line of the current stage.
    head = line[:10]
    return head.isascii() and head.lower() == "bootstrap:"


def _split_stages(lines: list[Line]) -> list[list[Line]]:
    chunks: list[list[Line]] = [[]]
    for item in lines:
        if _starts_stage(item[1]) and chunks[-1]:
            chunks.append([])
        chunks[-1].append(item)
    return chunks


def _section_word(line: str) -> str | None:
    """The first word of ``line`` if it starts with ``%`` (a section line)."""
    words = line.split(maxsplit=1)
    return words[0] if words and words[0].startswith("%") else None


def _parse_stage(lines: list[Line], path: str, earlier: list[Stage] | None) -> Stage | None:
    """One stage; None when it holds nothing. ``earlier`` is None on the raw pass
    (before substitution), which only needs ``%arguments``; the final pass checks
    everything else against the stages before this one."""
    first = next((i for i, (_, t) in enumerate(lines) if _section_word(t)), len(lines))
    header = _parse_header(lines[:first], path)
    starts: list[Section] = []
    bodies: list[list[str]] = []
    for number, text in lines[first:]:
        word = _section_word(text)
        if word is None:
            bodies[-1].append(text + "\n")
        else:
            starts.append(_start_section(number, text, word, path))
            bodies.append([])
    sections = [
        Section(s.name, s.args, "".join(b), s.line) for s, b in zip(starts, bodies, strict=True)
    ]
    if not header and not sections:
        return None
    for sec in sections:
        if sec.name == "arguments":
            for _ in _body.argument_lines(sec.body, sec.line + 1, path):
                pass
        if earlier is not None:
            _check_section(sec, path, earlier)
    return Stage(tuple(header), tuple(sections), (header or sections)[0].line)


def _start_section(number: int, text: str, word: str, path: str) -> Section:
    name = word[1:].lower()
    args = text.strip()[len(word) :].strip()
    if name not in ALL_SECTIONS:
        close = difflib.get_close_matches(name, ALL_SECTIONS, n=1)
        hint = f"did you mean '%{close[0]}'? " if close else ""
        hint += "expected one of: " + ", ".join("%" + s for s in ALL_SECTIONS)
        if text[:1].isspace():
            hint += "; an indented line whose first word starts with '%' starts a section too"
        raise DefFileError(f"invalid section: {word}", path, number, hint=hint)
    if name in APP_SECTIONS and not args:
        raise DefFileError(
            f"section {word} needs an app name", path, number, hint=f"write '%{name} <app>'"
        )
    return Section(name, args, "", number)


def _parse_header(lines: list[Line], path: str) -> list[HeaderEntry]:
    """``Keyword: value`` lines; ``#`` starts a comment, ``\\`` continues a value
    and ``\\n\\`` continues it after a real newline (deffile.go doHeader)."""
    entries: dict[str, HeaderEntry] = {}
    pending: HeaderEntry | None = None  # an entry whose value ended in a backslash

    def store(entry: HeaderEntry) -> None:
        if entry.value != entry.value.rstrip() and not entry.value.endswith("\n"):
            # A continuation cut short by a blank line or the end of the header.
            entry = HeaderEntry(entry.key, entry.value.rstrip(), entry.line)
        if entry.key in entries:
            # Apptainer keeps the header in a map: the last value wins.
            log.warn(f"{path}:{entry.line}: header keyword {entry.key} repeated; last value wins")
        entries[entry.key] = entry

    for number, text in lines:
        line = text.strip()
        if not line or line.startswith("#"):
            if pending:
                store(pending)
                pending = None
            continue
        line = line.split("#", 1)[0]
        if pending:
            entry = HeaderEntry(pending.key, pending.value + line.strip(), pending.line)
        else:
            key, colon, value = line.partition(":")
            if not colon:
                raise DefFileError(
                    f"header line has no ':': {line.strip()}",
                    path,
                    number,
                    hint="header lines are 'Keyword: value'; "
                    "a script line belongs under a section such as %post",
                )
            entry = HeaderEntry(_keyword(key.strip(), path, number), value.strip(), number)
        pending = None
        if entry.value.endswith("\\"):
            value = entry.value[:-1]
            value = value[:-2] + "\n" if value.endswith("\\n") else value
            pending = HeaderEntry(entry.key, value, entry.line)
            continue
        store(entry)
    if pending:  # a continuation at the end of the header: the backslash is dropped
        store(pending)
    return list(entries.values())


def _keyword(key: str, path: str, number: int) -> str:
    canonical = canonical_keyword(key)
    if canonical is not None:
        return canonical
    names = [*HEADER_KEYWORDS.values(), "OtherURL<N>"]
    close = difflib.get_close_matches(key.lower(), HEADER_KEYWORDS, n=1)
    hint = f"did you mean '{HEADER_KEYWORDS[close[0]]}'? " if close else ""
    raise DefFileError(
        f"invalid header keyword: {key}" if key else "header line has no keyword",
        path,
        number,
        hint=hint + "expected one of: " + ", ".join(names),
    )


def _check_section(sec: Section, path: str, earlier: list[Stage]) -> None:
    """Argument checks Apptainer makes at build time; sifpy makes them at parse time."""
    if sec.name == "post" and sec.args and (sec.args.split()[0] != "-c" or sec.args == "-c"):
        raise DefFileError(
            f"invalid %post arguments: {sec.args}", path, sec.line, hint="use '%post -c <shell>'"
        )
    if sec.name == "files" and sec.args:
        stage = sec.from_stage
        if stage is None:
            raise DefFileError(
                f"invalid %files arguments: {sec.args}",
                path,
                sec.line,
                hint="use '%files' or '%files from <stage>'",
            )
        if not any(s.name == stage for s in earlier):
            raise DefFileError(
                f"stage {stage} was not found",
                path,
                sec.line,
                hint="'%files from' names an earlier stage's 'Stage:' value",
            )
    if sec.name in ("files", "appfiles"):
        for _ in _body.files_lines(sec.body, sec.line + 1, path):
            pass


def _check_stages(stages: list[Stage], path: str) -> None:
    if not stages:
        raise DefFileError("empty definition file", path, 1, hint=_START_HINT)
    names: set[str] = set()
    for stage in stages:
        if stage.header and stage.bootstrap is None:
            first = stage.header[0]
            raise DefFileError(
                f"header keyword {first.key} comes before 'Bootstrap:'"
                if len(stages) > 1
                else "header has no 'Bootstrap:' keyword",
                path,
                first.line,
                hint="'Bootstrap:' must be the first header line: it starts a stage",
            )
        if not stage.header and len(stages) > 1:
            raise DefFileError(
                "multiple stages detected, all must have headers",
                path,
                stage.line,
                hint="start every stage with 'Bootstrap: <agent>'",
            )
        if stage.name is not None and stage.name in names:
            raise DefFileError(
                f"stage name {stage.name} used twice",
                path,
                next(e.line for e in stage.header if e.key == "Stage"),
                hint="give every stage its own 'Stage:' name",
            )
        if stage.name is not None:
            names.add(stage.name)

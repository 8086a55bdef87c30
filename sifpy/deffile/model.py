"""The parsed form of a definition file: frozen dataclasses, no I/O.

A :class:`Recipe` is a list of :class:`Stage`; a stage is an ordered header plus its
sections in file order. Repeated sections are kept as separate :class:`Section`
objects; the helpers on :class:`Stage` combine them the way Apptainer does
(apptainer:pkg/build/types/parser/deffile.go ``parseTokenSection``): bodies of a
repeated section are concatenated in file order and the last arguments win, except
``%files``, where each ``from <stage>`` group stays separate.

Line numbers are informative only (``compare=False``), so a recipe written out and
parsed again compares equal to the original.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sifpy.deffile import body as _body
from sifpy.deffile.grammar import APP_SECTIONS

# Where a helper reports an error on a hand-made (never parsed) recipe.
_NO_PATH = "<recipe>"


@dataclass(frozen=True)
class HeaderEntry:
    """One ``Keyword: value`` header line; ``key`` has the canonical spelling."""

    key: str
    value: str
    line: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Section:
    """One ``%name args`` line and the body below it (each line ends with a newline)."""

    name: str
    args: str = ""
    body: str = ""
    line: int = field(default=0, compare=False)

    @property
    def app(self) -> str | None:
        """The app name of a SCIF ``%app*`` section, else None."""
        if self.name not in APP_SECTIONS:
            return None
        words = self.args.split()
        return words[0] if words else None

    @property
    def from_stage(self) -> str | None:
        """The stage named by ``%files from <stage>`` (text after ``#`` ignored)."""
        words = self.args.split("#", 1)[0].split()
        if self.name == "files" and len(words) == 2 and words[0] == "from":
            return words[1]
        return None


@dataclass(frozen=True)
class FileCopy:
    """One ``%files`` line: copy ``src`` (from ``stage``, or the host) to ``dst``."""

    src: str
    dst: str
    stage: str | None = None
    line: int = field(default=0, compare=False)


@dataclass(frozen=True)
class App:
    """A SCIF app: its sections (by name without the ``app`` prefix) combined."""

    name: str
    scripts: tuple[tuple[str, str], ...]
    files: tuple[FileCopy, ...]
    labels: tuple[tuple[str, str], ...]

    def script(self, name: str) -> str | None:
        """Body of ``%app<name>`` (``install``, ``run``, ``env``, ...), or None."""
        return dict(self.scripts).get(name)


def _labels(sections: list[Section]) -> tuple[tuple[str, str], ...]:
    # Apptainer stores labels in a map: a repeated name keeps its first position
    # (dict order) and takes the last value.
    labels: dict[str, str] = {}
    for sec in sections:
        for _, name, value in _body.label_lines(sec.body, sec.line + 1):
            labels[name] = value
    return tuple(labels.items())


def _files(sections: list[Section], stage: str | None) -> tuple[FileCopy, ...]:
    return tuple(
        FileCopy(src, dst, stage, number)
        for sec in sections
        for number, src, dst in _body.files_lines(sec.body, sec.line + 1, _NO_PATH)
    )


@dataclass(frozen=True)
class Stage:
    """One build stage: everything from a ``Bootstrap:`` line to the next one."""

    header: tuple[HeaderEntry, ...] = ()
    sections: tuple[Section, ...] = ()
    line: int = field(default=0, compare=False)

    def get(self, key: str, default: str | None = None) -> str | None:
        """The value of header keyword ``key`` (case-insensitive)."""
        low = key.lower()
        return next((e.value for e in self.header if e.key.lower() == low), default)

    @property
    def bootstrap(self) -> str | None:
        """The ``Bootstrap:`` agent (``docker``, ``localimage``, ...)."""
        return self.get("bootstrap")

    @property
    def name(self) -> str | None:
        """The ``Stage:`` name that ``%files from`` refers to."""
        return self.get("stage")

    def all(self, name: str) -> list[Section]:
        """Every ``%name`` section, in file order."""
        return [s for s in self.sections if s.name == name]

    def script(self, name: str) -> str | None:
        """Concatenated bodies of ``%name`` (e.g. ``post``), or None if absent."""
        found = self.all(name)
        return "".join(s.body for s in found) if found else None

    def args(self, name: str) -> str:
        """Arguments of the last ``%name`` line (e.g. ``-c /bin/bash`` for post)."""
        found = self.all(name)
        return found[-1].args if found else ""

    def files(self) -> tuple[FileCopy, ...]:
        """All ``%files`` copies in file order; ``stage`` is set for ``%files from``."""
        return tuple(copy for sec in self.all("files") for copy in _files([sec], sec.from_stage))

    def labels(self) -> tuple[tuple[str, str], ...]:
        """``%labels`` as ordered ``(name, value)`` pairs."""
        return _labels(self.all("labels"))

    def arguments(self) -> dict[str, str]:
        """``%arguments`` defaults (``KEY=VALUE``); a repeated key takes the last value."""
        return {
            key: value
            for sec in self.all("arguments")
            for _, key, value in _body.argument_lines(sec.body, sec.line + 1, _NO_PATH)
        }

    def apps(self) -> tuple[App, ...]:
        """SCIF apps in the order they first appear (the order %appinstall runs)."""
        names = list(dict.fromkeys(s.app for s in self.sections if s.app))
        return tuple(self._app(name) for name in names if name)

    def _app(self, name: str) -> App:
        mine = [s for s in self.sections if s.app == name]
        scripts: dict[str, str] = {}
        for sec in mine:
            if sec.name not in ("appfiles", "applabels"):
                kind = sec.name.removeprefix("app")
                scripts[kind] = scripts.get(kind, "") + sec.body
        return App(
            name,
            tuple(scripts.items()),
            _files([s for s in mine if s.name == "appfiles"], None),
            _labels([s for s in mine if s.name == "applabels"]),
        )


@dataclass(frozen=True)
class Recipe:
    """A parsed definition file; only the last stage is assembled into the image."""

    stages: tuple[Stage, ...]
    path: str = field(default="<string>", compare=False)

    @property
    def final(self) -> Stage:
        """The stage whose root filesystem becomes the image."""
        return self.stages[-1]

    def stage(self, name: str) -> Stage | None:
        """The stage called ``name`` (``Stage: name``), or None."""
        return next((s for s in self.stages if s.name == name), None)

    def arguments(self) -> dict[str, str]:
        """``%arguments`` defaults of all stages (each stage uses its own when parsing)."""
        merged: dict[str, str] = {}
        for stage in self.stages:
            merged.update(stage.arguments())
        return merged

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view (with line numbers and derived helpers), for goldens and tools."""
        return {"stages": [_stage_dict(s) for s in self.stages], "arguments": self.arguments()}


def _stage_dict(stage: Stage) -> dict[str, Any]:
    return {
        "line": stage.line,
        "header": [[e.key, e.value, e.line] for e in stage.header],
        "sections": [
            {"name": s.name, "args": s.args, "body": s.body, "line": s.line} for s in stage.sections
        ],
        "files": [[c.src, c.dst, c.stage, c.line] for c in stage.files()],
        "labels": [list(p) for p in stage.labels()],
        "arguments": stage.arguments(),
        "apps": [
            {
                "name": a.name,
                "scripts": dict(a.scripts),
                "files": [[c.src, c.dst, c.line] for c in a.files],
                "labels": [list(p) for p in a.labels],
            }
            for a in stage.apps()
        ],
    }

"""Write a :class:`~sifpy.deffile.model.Recipe` back to definition-file text.

The output parses back to an equal recipe (``parse(write(r)) == r``): section bodies
are written verbatim, and header values that hold newlines use Apptainer's
``\\n\\`` continuation.
"""

from __future__ import annotations

from sifpy.deffile.model import HeaderEntry, Recipe, Section, Stage


def write(recipe: Recipe) -> str:
    """The definition-file text of ``recipe``."""
    return "".join(_stage(s) for s in recipe.stages)


def _stage(stage: Stage) -> str:
    lines = [_header(e, i) for i, e in enumerate(stage.header)]
    if lines:
        lines.append("")
    head = "".join(line + "\n" for line in lines)
    return head + "".join(_section(s) for s in stage.sections)


def _header(entry: HeaderEntry, index: int) -> str:
    # A later `Bootstrap:` at column 0 would start a new stage on re-parse; an
    # indented one stays a header line, which is what it was.
    indent = " " if index and entry.key == "Bootstrap" else ""
    parts = entry.value.split("\n")
    # Each line but the last ends in `\n\`: a literal "\n" then the continuation mark.
    lines = [part + "\\n\\" for part in parts[:-1]] + [parts[-1]]
    lines[0] = f"{indent}{entry.key}: {lines[0]}".rstrip()
    return "\n".join(lines)


def _section(sec: Section) -> str:
    line = f"%{sec.name} {sec.args}" if sec.args else f"%{sec.name}"
    # Parsed bodies always end in a newline; a hand-made one might not, and would
    # otherwise swallow the next section line.
    body = sec.body if not sec.body or sec.body.endswith("\n") else sec.body + "\n"
    return line + "\n" + body

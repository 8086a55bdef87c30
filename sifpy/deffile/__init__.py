"""Apptainer definition files: parse to a model, and write the model back.

``parse`` / ``parse_file`` turn definition-file text into a :class:`Recipe` (stages,
ordered headers, sections in file order, ``{{ var }}`` substituted); ``write`` turns
a recipe back into text that parses to an equal recipe. Every syntax error is a
:class:`sifpy.errors.DefFileError` with ``path:line``.
"""

from __future__ import annotations

from sifpy.deffile.model import App, FileCopy, HeaderEntry, Recipe, Section, Stage
from sifpy.deffile.parser import parse, parse_file
from sifpy.deffile.template import read_build_arg_file
from sifpy.deffile.writer import write

__all__ = [
    "App",
    "FileCopy",
    "HeaderEntry",
    "Recipe",
    "Section",
    "Stage",
    "parse",
    "parse_file",
    "read_build_arg_file",
    "write",
]

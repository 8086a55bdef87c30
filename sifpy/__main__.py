"""``python -m sifpy``: the same as the ``sifpy`` command."""

from sifpy.cli import entry

entry()

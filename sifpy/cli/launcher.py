"""``python -m sifpy.cli.launcher DEST``: write a ``sifpy`` program that starts faster than
the console script pip writes.

``sifpy exec`` starts once per MPI rank. pip's script runs the interpreter with the ``site``
module, which reads the environment's ``.pth`` files and imports a few modules before sifpy
gets control (~1.3 ms of every start). This launcher runs the same interpreter with ``-I -S``
(no ``site``, no ``PYTHON*`` variables, no user site directory) and puts on ``sys.path``
exactly the directories ``site`` adds for this interpreter now (site-packages, an editable
install's path). It must be rewritten when those change (``make venv`` does).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

TEMPLATE = """\
#!{python} -IS
# sifpy's launcher, written by `{python} -m sifpy.cli.launcher`: the interpreter without the
# site module, and the package directories site would add (rewrite this after changing them).
import sys
sys.path += {paths!r}
from sifpy.cli import entry
entry()
"""


def site_paths(python: str) -> list[str]:
    """The directories the ``site`` module adds to ``python``'s ``sys.path`` (the user's
    site directory included, as for pip's script), in order."""

    def path(*flags: str) -> list[str]:
        code = "import json, sys; print(json.dumps(sys.path))"
        out = subprocess.run([python, *flags, "-c", code], capture_output=True, check=True)
        return list(json.loads(out.stdout))

    bare = set(path("-I", "-S"))
    return [p for p in path("-E") if p and p not in bare]


def write(dest: str, python: str = sys.executable) -> None:
    """Write the launcher to ``dest`` (atomically, mode 0755)."""
    if len(python) > 240:  # the kernel reads the first 256 bytes of a #! line
        raise SystemExit(f"can't write a launcher: interpreter path too long: {python}")
    text = TEMPLATE.format(python=python, paths=site_paths(python))
    tmp = f"{dest}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o755)
    os.replace(tmp, dest)


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        sys.exit("usage: python -m sifpy.cli.launcher DEST")
    write(sys.argv[1])

"""Plain Python on the exec path: what ``sifpy exec`` may import, and how it does without
the rest.

``sifpy exec`` starts once per MPI rank, so the standard modules that cost milliseconds to
import (measured with ``python -X importtime -I -S``) stay off its path; the code there is
still ordinary Python: records are ``__slots__`` classes (:mod:`sifpy.util.record`), the
SIF enums are int constants with a names table, type-only imports sit under the one
``sifpy.TYPE_CHECKING`` flag, and a private standard module is used only with its measured
reason written next to the import.
"""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from sifpy.sif import format as F
from sifpy.util.record import Record

REPO = Path(__file__).resolve().parent.parent
ROOT = REPO / "sifpy"

# What the exec path must not import: sifpy's heavy stages, and the standard modules that
# cost milliseconds at each start (typing ~7.6 ms, enum ~3.3 ms, signal ~2.8 ms on top,
# contextlib ~2.7 ms, ctypes ~0.9 ms on top, ...; the whole start: bench/exec).
HEAVY = [
    "requests", "rich", "cryptography", "construct", "PySquashfsImage", "dataclasses", "json",
    "sifpy.sif.write", "sifpy.sif.modify", "sifpy.sif.table", "sifpy.sif.objects",
    "sifpy.sif.atomic", "sifpy.build", "sifpy.deffile", "sifpy.oci", "sifpy.sign.verify",
    "sifpy.sign.sign", "sifpy.rootfs", "typing", "enum", "re", "contextlib", "collections",
    "functools", "ctypes", "signal", "socket", "inspect", "argparse", "importlib",
    "subprocess", "types",
]  # fmt: skip


def test_exec_path_imports_nothing_heavy() -> None:
    """What ``sifpy exec`` imports to start a container (a rank of a job included), run
    without site, so that nothing a .pth file imports hides a regression."""
    code = (
        f"import sys; sys.path.insert(0, {str(REPO)!r}); "
        "import sifpy.cli.exec, sifpy.sif.image, sifpy.sign.policy, sifpy.runtime.env, "
        "sifpy.runtime.process, sifpy.runtime.sharens, sifpy.config; "
        f"print(sorted(set({HEAVY!r}) & set(sys.modules)))"
    )
    r = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, check=True
    )
    assert r.stdout.strip() == "[]"


def test_no_stand_ins_for_the_standard_library() -> None:
    """No home-made NamedTuple/IntEnum/suppress module, and one TYPE_CHECKING flag
    (sifpy/__init__.py's), not a copy in each module."""
    assert importlib.util.find_spec("sifpy.util.lean") is None
    copies = []
    for path in sorted(ROOT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "TYPE_CHECKING" for t in node.targets
            ):
                copies.append(str(path.relative_to(REPO)))
    assert copies == ["sifpy/__init__.py"]


def private_imports_without_reason(source: str) -> list[int]:
    """Lines importing a private standard module (``_ctypes``, ``_signal``, ...) with no
    measured reason (a comment with a number of ms and "importtime") in the comment
    lines right above, or on the import line itself."""
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source)):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        if not any(n.startswith("_") and not n.startswith("__") for n in names):
            continue
        i = node.lineno - 1
        text = [lines[i]]
        while i > 0 and lines[i - 1].strip().startswith("#"):
            i -= 1
            text.append(lines[i])
        said = " ".join(text)
        if not (" ms" in said and "importtime" in said):
            found.append(node.lineno)
    return found


def test_private_modules_carry_their_measured_reason() -> None:
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        found += [
            f"{path.relative_to(REPO)}:{n}"
            for n in private_imports_without_reason(path.read_text())
        ]
    assert found == [], "use the public module, or say next to the import what it costs"


@pytest.mark.parametrize(
    ("code", "flagged"),
    [
        ("import _signal as signal\n", True),
        ("from _ctypes import get_errno\n", True),
        ("import os  # costs 2 ms (importtime)\nimport _socket\n", True),
        ("# signal: +2.8 ms (python -X importtime)\nimport _signal\n", False),
        ("import signal\nfrom __future__ import annotations\n", False),
    ],
)
def test_the_reason_check(code: str, flagged: bool) -> None:
    assert bool(private_imports_without_reason(code)) == flagged


def test_sif_enums_are_plain_ints_with_names() -> None:
    assert type(F.DataType.PARTITION) is int
    assert F.DATA_TYPE_NAMES[F.DataType.PARTITION] == "FS"
    assert list(F.PART_TYPE_NAMES) == [1, 2, 3, 4]


class Point(Record):
    __slots__ = ("x", "y")

    def __init__(self, x: int, y: str = "a") -> None:
        self.x = x
        self.y = y


def test_record_behaves_as_a_value() -> None:
    p = Point(1)
    assert list(p) == [1, "a"] and tuple(Point(2, "b")) == (2, "b")
    x, y = p
    assert (x, y) == (1, "a")
    assert p == Point(1, "a") and p != Point(1, "b") and hash(p) == hash(Point(1))
    assert p != (1, "a")  # a record is not a tuple
    assert repr(p) == "Point(x=1, y='a')"
    assert p.replace(y="z") == Point(1, "z") and p.y == "a"
    assert p.asdict() == {"x": 1, "y": "a"}
    with pytest.raises(TypeError, match="no field w"):
        p.replace(w=2)
    with pytest.raises(AttributeError):
        p.w = 3  # type: ignore[attr-defined]


def test_packed_record_round_trip() -> None:
    extra = F.PartitionExtra(F.FSType.SQUASH, F.PartType.PRIMSYS, b"02\0")
    assert F.PartitionExtra.SIZE == len(extra.pack()) == 11
    assert F.PartitionExtra.unpack(extra.pack()) == extra

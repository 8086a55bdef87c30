"""Golden tests: good/<case>.def -> <case>.json, bad/<case>.def -> <case>.err.

Regenerate expectations with ``SIFPY_REGEN_GOLDEN=1`` (then review the diff).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from sifpy.deffile import parse, parse_file, write
from sifpy.errors import DefFileError

HERE = Path(__file__).parent
GOOD = HERE / "good"
BAD = HERE / "bad"

# Goldens are only rewritten on request, never silently: SIFPY_REGEN_GOLDEN=1 pytest ...
REGEN = os.environ.get("SIFPY_REGEN_GOLDEN") == "1"


def cases(folder: Path) -> list[str]:
    """Case names (``<case>.def`` stems) in ``folder``, sorted."""
    return sorted(p.stem for p in folder.glob("*.def"))


def case_options(folder: Path, case: str) -> dict[str, Any]:
    """Keyword arguments for parse from the optional ``<case>.args.json``."""
    sidecar = folder / f"{case}.args.json"
    if not sidecar.exists():
        return {}
    data = json.loads(sidecar.read_text())
    return {
        "build_args": data.get("build_args"),
        "warn_unused_build_args": data.get("warn_unused", False),
    }


@pytest.mark.parametrize("case", cases(GOOD))
def test_good(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(GOOD)
    recipe = parse_file(f"{case}.def", **case_options(GOOD, case))
    actual = json.dumps(recipe.to_dict(), indent=2, ensure_ascii=False) + "\n"
    golden = GOOD / f"{case}.json"
    if REGEN:
        golden.write_text(actual, encoding="utf-8")
    assert actual == golden.read_text(encoding="utf-8")


@pytest.mark.parametrize("case", cases(GOOD))
def test_good_round_trip(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(GOOD)
    recipe = parse_file(f"{case}.def", **case_options(GOOD, case))
    text = write(recipe)
    again = parse(text, f"{case}.written")
    assert again == recipe
    # Writing is stable: the written text is a fixed point.
    assert write(again) == text


@pytest.mark.parametrize("case", cases(BAD))
def test_bad(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(BAD)
    with pytest.raises(DefFileError) as info:
        parse_file(f"{case}.def", **case_options(BAD, case))
    err = info.value
    actual = str(err) + "\n" + (f"hint: {err.hint}\n" if err.hint else "")
    golden = BAD / f"{case}.err"
    if REGEN:
        golden.write_text(actual, encoding="utf-8")
    assert actual == golden.read_text(encoding="utf-8")


def test_enough_cases() -> None:
    assert len(cases(GOOD)) >= 15
    assert len(cases(BAD)) >= 12

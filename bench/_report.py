"""What every bench does last: print its result and keep it in bench/results/NAME.txt,
which the README links."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def report(name: str, text: str) -> None:
    print(text, end="")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.txt").write_text(text)

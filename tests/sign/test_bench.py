"""bench/sign.py runs (with a tiny size; the real run is 1 GiB and not a test)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from tests.conftest import require

BENCH = Path(__file__).parents[2] / "bench" / "sign.py"


def test_bench_tiny(tmp_path: Path) -> None:
    require(None if shutil.which("sha256sum") else "sha256sum is not installed")
    spec = importlib.util.spec_from_file_location("bench_sign", BENCH)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "sign.txt"
    assert (
        mod.main(["--size", "64K", "--repeat", "1", "--dir", str(tmp_path), "--out", str(out)]) == 0
    )
    assert "sign + verify:" in out.read_text()

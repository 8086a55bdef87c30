"""The ld.so cache reader against ``ldconfig -p`` (an independent reading of the same
file), and the liblist format."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from sifpy.errors import RuntimeSetupError
from sifpy.runtime import gpu


def test_ld_cache_matches_ldconfig() -> None:
    if not shutil.which("ldconfig"):
        pytest.skip("no ldconfig")
    out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=True).stdout
    expected = re.findall(r"^\s*(\S+) \([^)]*\) => (\S+)$", out, re.M)
    assert gpu.read_ld_cache("/etc/ld.so.cache") == expected
    assert expected


def test_not_a_cache(tmp_path: Path) -> None:
    (tmp_path / "c").write_bytes(b"garbage" * 10)
    with pytest.raises(RuntimeSetupError, match=r"not a glibc ld\.so cache"):
        gpu.read_ld_cache(str(tmp_path / "c"))


def test_shipped_lists() -> None:
    progs, libs, files = gpu.read_list(f"{gpu.ETC}/nvliblist.conf")
    assert "nvidia-smi" in progs and "libcuda.so" in libs and all(f.startswith("/") for f in files)
    progs, libs, files = gpu.read_list(f"{gpu.ETC}/rocmliblist.conf")
    assert "rocm-smi" in progs and "libamdhip64.so" in libs and files == []


def test_elf_filter() -> None:
    cache = [
        ("libpython-ish.so.1", "/proc/self/exe"),
        ("libtext.so.1", f"{gpu.ETC}/nvliblist.conf"),
    ]
    assert gpu.find_libraries(["libpython", "libtext"], cache, gpu.native_elf()) == [cache[0]]

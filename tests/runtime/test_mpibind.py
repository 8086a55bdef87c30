"""MPI bind mode's rules (runtime/mpibind.py), against the host's own tools: the closure
against ``ldd``, the default library against ``update-alternatives``, the ELF reading
against ``readelf``; and Sarus's compatibility rules on libraries named as an image has
them."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from sifpy.errors import RuntimeSetupError, SifpyError
from sifpy.runtime import mpibind
from sifpy.sign import policy
from tests.conftest import need_tool, require


def lib(name: str, soname: str | None = None) -> mpibind.Lib:
    """A library as found at ``/lib/NAME`` (its soname: the name up to the major)."""
    if soname is None:
        linker, version = mpibind.split_name(name)
        soname = ".".join([linker, *map(str, version[:1])])
    return mpibind.Lib(f"/lib/{name}", soname, f"/lib/{name}")


def test_split_name() -> None:
    assert mpibind.split_name("libmpich.so.12.2.2") == ("libmpich.so", (12, 2, 2))
    assert mpibind.split_name("libucs.so.0") == ("libucs.so", (0,))
    assert mpibind.split_name("libfoo.so") == ("libfoo.so", ())
    assert mpibind.split_name("libfoo.so.1.x.3") == ("libfoo.so", (1,))
    assert mpibind.split_name("ld-linux-x86-64.so.2") == ("ld-linux-x86-64.so", (2,))
    # The file's full version wins over the soname's major.
    assert lib("libmpich.so.12.1.10").version == (12, 1, 10)
    assert lib("libmpich.so.12.1.10").name == "libmpich.so.12.1.10"


def test_modes() -> None:
    host, same, older_image, newer_image = (
        lib("libmpich.so.12.2.2"),
        lib("libmpich.so.12.2.2"),
        lib("libmpich.so.12.1.10"),
        lib("libmpich.so.12.3.0"),
    )
    for mode in mpibind.MODES:
        assert mpibind.check(mode, host, same) is None
    assert mpibind.check("major", host, older_image) is None
    assert mpibind.check("major", host, newer_image) is None
    assert mpibind.check("full", host, older_image) is None
    warning = mpibind.check("full", host, newer_image)  # an older host only warns
    assert warning and "libmpich.so.12.2.2" in warning and "libmpich.so.12.3.0" in warning
    with pytest.raises(RuntimeSetupError, match="not strictly ABI-compatible"):
        mpibind.check("strict", host, older_image)
    # Missing numbers count as 0.
    assert mpibind.check("strict", lib("libfoo.so.1"), lib("libfoo.so.1.0")) is None


def test_mpich_abi_names_and_the_incompatible_pair() -> None:
    host = lib("libmpich.so.12.2.2")
    # MPICH ABI under the other name (Cray MPICH, Debian 13): compatible.
    assert mpibind.check("major", host, lib("libmpi.so.12.1.0")) is None
    # Open MPI's libmpi.so.40: refused, naming both with their versions.
    with pytest.raises(RuntimeSetupError) as e:
        mpibind.check("major", host, lib("libmpi.so.40.30.0"))
    assert "the host's libmpich.so.12.2.2 (/lib/libmpich.so.12.2.2)" in e.value.message
    assert "the image's libmpi.so.40.30.0 (/lib/libmpi.so.40.30.0)" in e.value.message
    # Unrelated libraries never pair, whatever their versions.
    with pytest.raises(RuntimeSetupError):
        mpibind.check("major", lib("libfoo.so.1"), lib("libbar.so.1"))


def test_pick_prefers_exact_then_newest_not_newer() -> None:
    host = lib("libmpich.so.12.2.2")
    a, b, c, d = (lib(f"libmpich.so.{v}") for v in ("12.0.5", "12.1.10", "12.2.2", "12.3.0"))
    assert mpibind.pick(host, [a, b, c, d]) is c
    assert mpibind.pick(host, [a, b, d]) is b
    assert mpibind.pick(host, [d, lib("libmpich.so.12.4.0")]) is d  # only newer: the oldest


def _ldd(path: str) -> dict[str, str]:
    out = subprocess.run(["ldd", path], capture_output=True, text=True, check=True).stdout
    return dict(re.findall(r"^\s*(\S+) => (\S+) \(", out, re.M))


def test_closure_matches_ldd() -> None:
    """The dependency closure of the host's MPI is what the host's loader resolves (ldd),
    glibc apart (the glibc rule handles it); the UCX module directory comes with libucs."""
    need_tool("ldd")
    target = "/usr/lib/x86_64-linux-gnu/libmpich.so.12"
    require(None if os.path.exists(target) else "no host MPICH (apt-get install libmpich-dev)")
    mpi = mpibind.host([target], [])
    want = {
        name: os.path.realpath(path)
        for name, path in _ldd(target).items()
        if name not in mpibind.GLIBC and not name.startswith("ld-linux")
    }
    assert {d.soname: d.path for d in mpi.deps} == want
    assert [lib.path for lib in mpi.libs] == [os.path.realpath(target)]
    if "libucs.so.0" in want:
        assert mpi.dirs == [os.path.join(os.path.dirname(want["libucs.so.0"]), "ucx")]
    # The host's glibc: the release its ldd reports, and the loader programs name.
    out = subprocess.run(["ldd", "--version"], capture_output=True, text=True).stdout
    found = re.search(r"(\d+)\.(\d+)\s*$", out.splitlines()[0])
    assert found is not None
    assert mpi.glibc_version == (int(found.group(1)), int(found.group(2)))
    assert os.path.basename(mpi.interp) in {lib.soname for lib in mpi.glibc}


def test_elf_info_matches_readelf() -> None:
    need_tool("readelf")
    path = os.path.realpath("/usr/lib/x86_64-linux-gnu/libc.so.6")
    out = subprocess.run(["readelf", "-d", path], capture_output=True, text=True).stdout
    soname, needed, interp = mpibind.elf_info(path)
    assert soname == re.search(r"Library soname: \[(.*)\]", out).group(1)  # type: ignore[union-attr]
    assert needed == re.findall(r"Shared library: \[(.*)\]", out)
    heads = subprocess.run(["readelf", "-l", path], capture_output=True, text=True).stdout
    found = re.search(r"Requesting program interpreter: (\S+)\]", heads)
    assert interp == (found.group(1) if found else None)
    with pytest.raises(RuntimeSetupError, match="not a 64-bit ELF"):
        mpibind.elf_info(__file__)


def test_default_library_is_the_mpi_alternative() -> None:
    tool = need_tool("update-alternatives")
    res = subprocess.run([tool, "--query", "mpi-x86_64-linux-gnu"], capture_output=True, text=True)
    require(None if res.returncode == 0 else "no mpi alternative (apt-get install libmpich-dev)")
    value = re.search(r"^Value: (\S+)$", res.stdout, re.M).group(1)  # type: ignore[union-attr]
    block = res.stdout.split(f"Alternative: {value}\n", 1)[1].split("\n\n", 1)[0]
    slave = re.search(r"libmpi\.so-x86_64-linux-gnu (\S+)", block).group(1)  # type: ignore[union-attr]
    assert mpibind.default_library() == os.path.realpath(slave)


def test_config(tmp_path: Path) -> None:
    system = tmp_path / "sys"
    system.write_text(
        "mpi library = /site/libmpi.so.12\nmpi dependency = /site/libfabric.so.1\n"
        "mpi dependency = /site/fabric\nmpi compatibility = full\n"
    )
    user = tmp_path / "user"
    user.write_text("mpi library = /mine/libmpich.so.12\n")
    libs, deps, mode = policy.load(str(system), "").mpi()
    assert (libs, deps, mode) == (
        ["/site/libmpi.so.12"],
        ["/site/libfabric.so.1", "/site/fabric"],
        "full",
    )
    # A user's libraries replace the site's, dependencies included (as a bind could).
    assert policy.load(str(system), str(user)).mpi() == (["/mine/libmpich.so.12"], [], "full")
    assert policy.load(str(tmp_path / "no"), "").mpi() == ([], [], "major")
    user.write_text("mpi compatibility = loose\n")
    with pytest.raises(SifpyError, match="mpi compatibility must be 'major' or 'full' or 'strict'"):
        policy.load(str(system), str(user))

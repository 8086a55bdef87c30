"""Bind mode with an Open MPI host (runtime/mpiopen.py, runtime/elf.py), against Open MPI's
own tools: the install directories read from ``libopen-pal`` against ``ompi_info --path
all``, the closure of its MCA components against ``ldd``, PMIx's component directory
against the host's PMIx settings."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from sifpy.runtime import elf, mpibind, mpiopen
from tests.conftest import need_tool, require

LIBMPI = "/usr/lib/x86_64-linux-gnu/libmpi.so.40"  # Debian's Open MPI (libopenmpi-dev)


def _ompi_info(env: dict[str, str] | None = None) -> dict[str, str]:
    tool = need_tool("ompi_info")
    out = subprocess.run(
        [tool, "--path", "all", "--parsable"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **(env or {})},
    ).stdout
    return dict(re.findall(r"^path:(\w+):(.*)$", out, re.M))


def _libopen_pal() -> str:
    require(None if os.path.exists(LIBMPI) else "no host Open MPI (apt-get install libopenmpi-dev)")
    found = [
        os.path.realpath(os.path.join(os.path.dirname(LIBMPI), n))
        for n in elf.elf_info(os.path.realpath(LIBMPI))[1]
        if n.startswith("libopen-pal.so")
    ]
    assert found, "libmpi.so.40 needs no libopen-pal"
    return found[0]


# ompi_info's names for the fields that differ from the templates'.
_INFO_NAMES = {"includedir": "incdir"}


@pytest.mark.parametrize("env", [{}, {"OPAL_PREFIX": "/opt/site-ompi"}])
def test_install_dirs_match_ompi_info(env: dict[str, str]) -> None:
    """What libopen-pal computes (ompi_info prints it) is what sifpy reads from the file,
    templates expanded, also with OPAL_PREFIX moving the installation."""
    want = _ompi_info(env)
    got = mpiopen.install_dirs(_libopen_pal(), env)
    assert got is not None
    for name, value in got.items():
        info = _INFO_NAMES.get(name, name)
        if info in want:
            assert value == want[info], name
    assert got["pkglibdir"] == want["pkglibdir"] and got["pkgdatadir"] == want["pkgdatadir"]


def test_no_install_dirs_in_other_libraries() -> None:
    # libc exports no such object: the Open MPI rules stay out of an MPICH host's closure.
    libc = os.path.realpath("/usr/lib/x86_64-linux-gnu/libc.so.6")
    assert mpiopen.install_dirs(libc) is None
    assert elf.pointed_strings(libc, "mca_installdirs_config_component", 17) is None


def _ldd(path: str) -> dict[str, str]:
    out = subprocess.run(["ldd", path], capture_output=True, text=True).stdout
    return dict(re.findall(r"^\s*(\S+) => (/\S+) \(", out, re.M))


def test_open_mpi_closure_has_its_components_and_their_libraries() -> None:
    """The default closure of an Open MPI host: its component, help and PMIx directories,
    and every library its components load (as the host's loader resolves them, ldd)."""
    need_tool("ldd")
    info = _ompi_info()
    _libopen_pal()
    mpi = mpibind.host([LIBMPI], [])
    assert info["pkglibdir"] in mpi.trees and info["pkgdatadir"] in mpi.trees
    deps = {d.soname: d.path for d in (*mpi.libs, *mpi.deps)}
    comps = [e.path for e in os.scandir(info["pkglibdir"]) if e.name.endswith(".so")]
    assert len(comps) > 10
    for comp in comps:
        for name, path in _ldd(comp).items():
            if name in mpibind.GLIBC or name.startswith("ld-linux"):
                continue
            assert deps.get(name) == os.path.realpath(path), (comp, name)
    # PMIx, which the pmix component loads: its components' directory is the one the
    # host's PMIx settings name.
    pmix = deps.get("libpmix.so.2")
    require(None if pmix else "Open MPI without an external PMIx")
    conf = os.path.join(os.path.dirname(os.path.dirname(str(pmix))), "share/pmix-mca-params.conf")
    require(None if os.path.isfile(conf) else f"no {conf}")
    with open(conf) as f:
        named = re.search(r"^\s*mca_base_component_path\s*=\s*(\S+)", f.read(), re.M)
    assert named is not None
    assert named.group(1) in mpi.trees


def test_mpich_closure_has_no_open_mpi_paths() -> None:
    target = "/usr/lib/x86_64-linux-gnu/libmpich.so.12"
    require(None if os.path.exists(target) else "no host MPICH (apt-get install libmpich-dev)")
    assert mpibind.host([target], []).trees == []


def test_pmix_paths_follow_the_layout(tmp_path: Path) -> None:
    """PMIx's components are only ever the ``pmix/`` directory beside the library; its
    help texts are ``share/pmix`` of its prefix. A component that is no library is passed
    over, as the host's PMIx passes it over."""
    prefix = tmp_path / "pmix"
    (prefix / "lib").mkdir(parents=True)
    (prefix / "share" / "pmix").mkdir(parents=True)
    libpmix = prefix / "lib" / "libpmix.so.2"
    libpmix.write_bytes(b"")
    paths, comps = mpiopen.pmix_paths(str(libpmix))
    assert (paths, comps) == ([str(prefix / "share" / "pmix")], [])
    (prefix / "lib" / "pmix").mkdir()
    real = os.path.realpath("/usr/lib/x86_64-linux-gnu/libz.so.1")
    require(None if os.path.isfile(real) else "no libz.so.1")
    shutil.copy(real, prefix / "lib" / "pmix" / "a.so")
    (prefix / "lib" / "pmix" / "b.so").write_text("not a library\n")
    paths, comps = mpiopen.pmix_paths(str(libpmix))
    assert comps == [str(prefix / "lib" / "pmix")] and comps[0] in paths
    assert list(mpiopen.components(comps[0])) == [(elf.dynamic(real).needed, [])]

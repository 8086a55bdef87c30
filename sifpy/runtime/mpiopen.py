"""Open MPI and PMIx in bind mode: what the host's libraries open at run time, beyond
what the loader finds.

Open MPI's libraries load most of their work as MCA components (``mca_*.so``) from the
directory compiled into ``libopen-pal`` (``ompi_info --path all`` shows it as
``pkglibdir``), read their help texts (``pkgdatadir``) and site settings
(``${sysconfdir}/openmpi-mca-params.conf``), and a singleton rank starts ``orted``. Components of
one release don't load into another's libraries (``ompi_op_init() failed`` in MPI_Init),
so the image's copies of those paths are covered by the host's. The paths are read from the
library itself, not from ``ompi_info`` (a quarter of a second, in every rank): the exported
``mca_installdirs_config_component`` ends with the installation's directories, as
templates (``${libdir}/openmpi3``) expanded the way Open MPI does, after the
``OPAL_PREFIX``-style overrides of its environment, which the rank inherits too.

PMIx (``libpmix``, which Open MPI's ``pmix`` component and Slurm's ``--mpi=pmix`` use)
has components in ``pmix/`` beside the library and help texts in ``share/pmix`` of its
prefix. The components' own dependencies (``libpmix``, UCX, libfabric, ...) join the
host's closure, so they are the host's as well.

Each directory or file is bound at its own path, over the image's, when the image has it:
the host's libraries look there and nowhere else.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from sifpy.errors import RuntimeSetupError
from sifpy.runtime import elf, rootpath
from sifpy.runtime.plan import Mount
from sifpy.util import log

if TYPE_CHECKING:
    from sifpy.runtime.mpibind import HostMpi

# opal_install_dirs_t's fields in order (opal/mca/installdirs/installdirs.h), as
# ``${name}`` in templates and ``OPAL_NAME`` in the environment.
OPAL_FIELDS = (
    "prefix",
    "exec_prefix",
    "bindir",
    "sbindir",
    "libexecdir",
    "datarootdir",
    "datadir",
    "sysconfdir",
    "sharedstatedir",
    "localstatedir",
    "libdir",
    "includedir",
    "infodir",
    "mandir",
    "pkgdatadir",
    "pkglibdir",
    "pkgincludedir",
)
_CONFIG = "mca_installdirs_config_component"


def install_dirs(libopen_pal: str, env: Mapping[str, str] | None = None) -> dict[str, str] | None:
    """Open MPI's installation directories as ``libopen_pal`` computes them, or None when
    the library has none compiled in."""
    values = elf.pointed_strings(libopen_pal, _CONFIG, len(OPAL_FIELDS))
    if values is None or not all(values):
        return None
    dirs = {name: value or "" for name, value in zip(OPAL_FIELDS, values, strict=True)}
    overrides = os.environ if env is None else env
    for name in OPAL_FIELDS:
        if overrides.get(f"OPAL_{name.upper()}"):
            dirs[name] = overrides[f"OPAL_{name.upper()}"]
    for _ in OPAL_FIELDS:  # templates refer to other fields, a few levels deep
        changed = False
        for name, value in dirs.items():
            new = value
            for ref in OPAL_FIELDS:
                if ref != name:
                    new = new.replace(f"${{{ref}}}", dirs[ref]).replace(f"@{{{ref}}}", dirs[ref])
            changed |= new != value
            dirs[name] = new
        if not changed:
            break
    return dirs


def open_mpi_paths(libopen_pal: str) -> tuple[list[str], list[str]]:
    """(paths to bind, component directories) of the Open MPI that ``libopen_pal`` is part of."""
    dirs = install_dirs(libopen_pal)
    if dirs is None:
        return [], []
    comps = [dirs["pkglibdir"]] if os.path.isdir(dirs["pkglibdir"]) else []
    paths = [
        dirs["pkglibdir"],
        dirs["pkgdatadir"],
        os.path.join(dirs["sysconfdir"], "openmpi-mca-params.conf"),
        os.path.join(dirs["bindir"], "orted"),
    ]
    return [p for p in paths if os.path.exists(p)], comps


def pmix_paths(libpmix: str) -> tuple[list[str], list[str]]:
    """(paths to bind, component directories) of the PMIx that ``libpmix`` is part of: its
    components beside it, its help texts and settings in ``share`` of its prefix (or of
    the level above, for a multiarch ``/usr/lib/<triplet>``)."""
    libdir = os.path.dirname(os.path.realpath(libpmix))
    comps = [os.path.join(libdir, "pmix")] if os.path.isdir(os.path.join(libdir, "pmix")) else []
    paths = list(comps)
    up = os.path.dirname(libdir)
    for prefix in (up, os.path.dirname(up)):
        share = os.path.join(prefix, "share")
        if os.path.isdir(os.path.join(share, "pmix")):
            paths.append(os.path.join(share, "pmix"))
            for conf in (f"{share}/pmix-mca-params.conf", f"{prefix}/etc/pmix-mca-params.conf"):
                if os.path.isfile(conf):
                    paths.append(conf)
            break
    return paths, comps


def components(directory: str) -> Iterator[tuple[list[str], list[str]]]:
    """(DT_NEEDED, RUNPATH) of each component (``*.so``) in ``directory``; a file that is
    no library of this kind is passed over (it can't load on the host either)."""
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        if entry.name.endswith(".so") and entry.is_file():
            try:
                d = elf.dynamic(entry.path)
            except RuntimeSetupError:
                continue
            yield d.needed, d.runpath


def trees(mpi: HostMpi, root_fd: int) -> list[Mount]:
    """The host's Open MPI and PMIx directories and files over the image's, where the
    image has them (the host's libraries look nowhere else; an image without them has no
    Open MPI or PMIx of that layout, and its programs never asked for them)."""
    plan = []
    for path in mpi.trees:
        is_dir = os.path.isdir(path)
        found = resolved(root_fd, path, is_dir)
        if found is None:
            log.verbose(f"--mpi: the image has no {path}: not bound")
            continue
        log.verbose(f"--mpi: {path} on {found}")
        plan.append(Mount(found, "bind", mpi.fds[path], readonly=True, is_dir=is_dir))
    return plan


def resolved(root_fd: int, path: str, is_dir: bool = True) -> str | None:
    """``path`` in the image, its links followed, when it is a directory (or ``is_dir``
    False: a regular file); else None."""
    res = rootpath.resolve(root_fd, path)
    try:
        if res.missing:
            return None
        mode = os.stat(res.name, dir_fd=res.parent_fd, follow_symlinks=False).st_mode
        if (stat.S_ISDIR if is_dir else stat.S_ISREG)(mode):
            return "/" + "/".join(res.parts)
        return None
    finally:
        res.close()

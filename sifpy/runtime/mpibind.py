"""MPI bind mode (``--mpi``): the host's MPI library and its dependencies replace the image's.

An image built with one MPI runs with the host's, which knows the site's interconnect and
launcher, provided both have the same ABI. The rules are Sarus's MPI and glibc hooks
(https://github.com/eth-cscs/sarus/tree/master/src/hooks/mpi and ``src/hooks/glibc``):

- The host's side is configured (``mpi library`` / ``mpi dependency`` in sifpy.conf) or, by
  default, the library behind the host's ``mpi`` alternative and its dependency closure.
- The image's libraries are those of its ld.so cache (``/etc/ld.so.cache``, read from the
  mounted image: no ``ldconfig`` runs), matched by linker name (``libmpich.so``); an MPI
  library the image's cache doesn't list is an error, as in Sarus: only libraries the
  image's programs find through the loader can be replaced. MPICH's ABI has two names
  (``libmpich.so.12``, and ``libmpi.so.12`` since the MPICH ABI initiative, which Cray MPICH
  and Debian 13 ship): when the image has no library of the host's name, the other name
  matches, so an Open MPI image (``libmpi.so.40``) against a host MPICH is refused by
  version instead of missing the image's MPI.
- ``major`` (the default) needs the same major version, ``full`` also a host minor at
  least the image's (an older host only warns), ``strict`` the same minor. Missing numbers
  count as 0. Among several versions in the image, the one replaced is the exact match,
  else the newest not newer than the host's, else the oldest.
- A dependency replaces the image's copy when ``full``-compatible; otherwise it is added.
- An image glibc older than the host's gets the host's (the loader, libc, libm, ...): the
  host's MPI was linked against the newer one (``GLIBC_2.34 not found`` otherwise). An image
  with no glibc at all is refused.

How the files get in: sifpy's root is a read-only squashfs, so Sarus's way (symlinks in
``/lib``, then ``ldconfig`` in the container) is out, and so is rewriting the image's cache.
A replacement is a read-only file bind over the image's own file (the path its cache
leads to): the image's cache, its programs' RPATHs and its ``LD_LIBRARY_PATH`` all find it
unchanged. An added library is bound into ``/.singularity.d/libs`` (Apptainer's directory
for bound libraries, on ``LD_LIBRARY_PATH`` through the image's ``99-base.sh``), after the
image's own directories: nothing the image has is hidden by it. A dependency directory (UCX
loads its transports from ``ucx/`` beside ``libucs``, and from the directory it was built
for) is bound beside each place its library may be found, and over the same path in the
image when the image has it, so no module of the image's UCX mixes with the host's.

Nothing here runs unless ``--mpi`` is given: :func:`host` is computed by the command line,
:func:`pin` before the session covers ``/tmp``, :func:`mounts` once the image is mounted.
"""

from __future__ import annotations

import os
import re
import sys

from sifpy.errors import RuntimeSetupError
from sifpy.runtime import elf, mpiopen, rootpath
from sifpy.runtime.elf import dynamic, elf_info
from sifpy.runtime.gpu import LD_CACHE, LIBS_DIR, native_elf, parse_ld_cache
from sifpy.runtime.plan import Mount
from sifpy.util import log

MODES = ("major", "full", "strict")
# The MPICH ABI's two names (see the module docstring).
MPICH_NAMES = ("libmpi.so", "libmpich.so")
# glibc's libraries (Debian's libc6): replaced together, never one without the others (an
# nss module or libpthread of one release can't load with the libc of another). The
# loader is added by name (PT_INTERP).
GLIBC = (
    "libc.so.6",
    "libm.so.6",
    "libmvec.so.1",
    "libdl.so.2",
    "libpthread.so.0",
    "librt.so.1",
    "libutil.so.1",
    "libanl.so.1",
    "libresolv.so.2",
    "libnsl.so.1",
    "libnss_compat.so.2",
    "libnss_dns.so.2",
    "libnss_files.so.2",
    "libnss_hesiod.so.2",
    "libBrokenLocale.so.1",
    "libthread_db.so.1",
    "libc_malloc_debug.so.0",
)
_GLIBC_VERSION = re.compile(rb"release version (\d+)\.(\d+)")
_HINT_BUILD = "run ldconfig at the end of the image's %post (or use the image's MPI: no --mpi)"


class Lib:
    """A shared library: its path (host or image), soname, linker name and version."""

    __slots__ = ("linker", "path", "soname", "version")

    def __init__(self, path: str, soname: str, real: str | None = None) -> None:
        self.path, self.soname = path, soname
        self.linker, self.version = split_name(soname)
        # The file's own name says more (libmpich.so.12 -> libmpich.so.12.2.2), as Sarus's
        # resolveAbi reads it from the link chain.
        linker, version = split_name(os.path.basename(real or path))
        if linker == self.linker and len(version) > len(self.version):
            self.version = version

    @property
    def major(self) -> int:
        return self.version[0] if self.version else 0

    @property
    def minor(self) -> int:
        return self.version[1] if len(self.version) > 1 else 0

    @property
    def name(self) -> str:
        """The name with every version number: what messages show."""
        return ".".join([self.linker, *map(str, self.version)])


class HostMpi:
    """The host's side of bind mode, computed once per start: libraries, directories, the
    glibc, the compatibility mode, and (after :func:`pin`) an O_PATH fd of each file."""

    __slots__ = ("deps", "dirs", "fds", "glibc", "glibc_version", "interp", "libs", "mode", "trees")

    def __init__(self, mode: str = "major") -> None:
        self.mode = mode
        self.libs: list[Lib] = []  # the MPI libraries
        self.deps: list[Lib] = []  # their dependencies (less glibc)
        self.dirs: list[str] = []  # dependency directories (UCX's modules)
        self.trees: list[str] = []  # bound at their own paths (Open MPI's, PMIx's)
        self.glibc: list[Lib] = []  # the host's glibc libraries, loader last
        self.glibc_version: tuple[int, int] = (0, 0)
        self.interp = ""  # the loader, as programs name it (PT_INTERP)
        self.fds: dict[str, int] = {}

    def __repr__(self) -> str:
        # Part of a shared container's key (sharens.container_key): what decides its
        # mounts, never the fds of one process.
        files = [lib.path for lib in (*self.libs, *self.deps, *self.glibc)]
        return f"HostMpi({self.mode!r}, {files!r}, {self.dirs!r}, {self.trees!r})"


def split_name(name: str) -> tuple[str, tuple[int, ...]]:
    """``libmpich.so.12.2.2`` -> (``libmpich.so``, (12, 2, 2)); numbers stop at the first
    part that is not one; a name without ``.so`` is its own linker name."""
    head, sep, tail = name.partition(".so")
    if not sep:
        return name, ()
    numbers: list[int] = []
    for part in tail.split(".")[1:]:
        if not part.isdigit():
            break
        numbers.append(int(part))
    return head + ".so", tuple(numbers)


# --- the host's side ------------------------------------------------------------------------


def default_library() -> str:
    """The library behind the host's ``mpi`` alternative. Debian keeps the MPI compiler
    wrappers (``mpi``) and headers with ``libmpi.so`` (``mpi-<triplet>``, whose slave
    ``libmpi.so-<triplet>`` is what ``update-alternatives --query mpi-<triplet>`` shows as
    the current choice's library) in step; the slave's link in /etc/alternatives is read
    directly, which spares every rank a process."""
    triplet = getattr(sys.implementation, "_multiarch", "") or "x86_64-linux-gnu"
    link = f"/etc/alternatives/libmpi.so-{triplet}"
    path = os.path.realpath(link)
    if not os.path.isfile(path):
        raise RuntimeSetupError(
            f"can't bind MPI: the host has no MPI library: no mpi alternative ({link} is missing)",
            hint="install the host's MPI (libmpich-dev or libopenmpi-dev), or name it in "
            "sifpy.conf: mpi library = PATH",
        )
    return path


def _host_cache() -> dict[str, str]:
    """soname -> path from the host's ld.so cache, for this interpreter's kind of ELF."""
    from sifpy.runtime import gpu

    out: dict[str, str] = {}
    native = native_elf()
    for name, path in gpu.read_ld_cache(LD_CACHE):
        if name not in out and gpu.elf_kind(path) == native:
            out[name] = path
    return out


def _library(path: str) -> tuple[Lib, list[str], str | None]:
    real = os.path.realpath(path)
    soname, needed, interp = elf_info(real)
    return Lib(real, soname or os.path.basename(path), real), needed, interp


def host(libraries: list[str], dependencies: list[str], mode: str = "major") -> HostMpi:
    """The host's side: ``libraries`` (default: :func:`default_library`) and
    ``dependencies`` (files or directories; default: the libraries' closure through the
    host's ld.so cache, and the ``ucx`` module directory beside ``libucs``)."""
    if mode not in MODES:
        raise RuntimeSetupError(
            f"can't bind MPI: unknown mpi compatibility {mode!r}", hint="use major, full or strict"
        )
    out = HostMpi(mode)
    cache = _host_cache()
    todo: list[str] = []
    for path in libraries or [default_library()]:
        lib, needed, _ = _library(path)
        if not lib.version:
            raise RuntimeSetupError(
                f"can't bind MPI: the host's MPI library {path} has no version in its name",
                hint="name the library with its major version in sifpy.conf "
                "(mpi library = .../libmpi.so.12)",
            )
        out.libs.append(lib)
        todo += needed
    glibc = set(GLIBC)
    libc = cache.get("libc.so.6")
    if libc is None:
        raise RuntimeSetupError("can't bind MPI: the host's ld.so cache lists no libc.so.6")
    _, _, interp = elf_info("/proc/self/exe")  # this interpreter's loader is the host's
    out.interp = interp or "/lib64/ld-linux-x86-64.so.2"
    loader = os.path.basename(out.interp)
    glibc.add(loader)
    version = glibc_version(os.path.realpath(libc))
    if version is None:
        raise RuntimeSetupError(f"can't bind MPI: the host's {libc}: no glibc version found")
    out.glibc_version = version
    for name in (*GLIBC, loader):
        path = cache.get(name) or os.path.join(os.path.dirname(libc), name)
        if os.path.isfile(path):
            out.glibc.append(Lib(os.path.realpath(path), name))
    if dependencies:
        for path in dependencies:
            if os.path.isdir(path):
                out.dirs.append(os.path.normpath(path))
            else:
                out.deps.append(_library(path)[0])
        return out
    seen = {lib.soname for lib in out.libs} | glibc
    _closure(out, cache, seen, [(name, []) for name in todo], required=True)
    # Open MPI and PMIx load components from their own directories (runtime/mpiopen.py):
    # those come with the libraries, and what the components need joins the closure.
    for linker, paths in (
        ("libopen-pal.so", mpiopen.open_mpi_paths),
        ("libpmix.so", mpiopen.pmix_paths),
    ):
        found = next((d for d in (*out.libs, *out.deps) if d.linker == linker), None)
        if found is None:
            continue
        trees, comps = paths(found.path)
        out.trees += [t for t in trees if t not in out.trees]
        need = [(n, rp) for c in comps for needed, rp in mpiopen.components(c) for n in needed]
        # A component whose library the host lacks doesn't load on the host either.
        _closure(out, cache, seen, need, required=False)
    return out


def _closure(
    out: HostMpi,
    cache: dict[str, str],
    seen: set[str],
    todo: list[tuple[str, list[str]]],
    required: bool,
) -> None:
    """Add to ``out.deps`` the libraries named in ``todo`` (soname, the RUNPATH of what
    needs it) and theirs, breadth first, as the loader searches."""
    while todo:
        name, runpath = todo.pop(0)
        if name in seen:
            continue
        found = next(
            (p for p in (os.path.join(d, name) for d in runpath) if os.path.isfile(p)),
            cache.get(name),
        )
        if found is None:
            if not required:
                continue
            raise RuntimeSetupError(
                f"can't bind MPI: {out.libs[0].path} needs {name}, which the host's "
                "ld.so cache doesn't list",
                hint="name the dependencies in sifpy.conf (mpi dependency = PATH)",
            )
        seen.add(name)
        real = os.path.realpath(found)
        d = dynamic(real)
        lib = Lib(real, name, real)
        out.deps.append(lib)
        todo += [(n, d.runpath) for n in d.needed]
        modules = os.path.join(os.path.dirname(lib.path), "ucx")
        if name.startswith("libucs.so") and os.path.isdir(modules):
            out.dirs.append(modules)


def glibc_version(path: str, root_fd: int | None = None) -> tuple[int, int] | None:
    """The release a glibc's ``libc.so.6`` was built from (its banner, which every build
    carries: file names don't, since glibc 2.34), or None."""
    fd = (
        os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        if root_fd is None
        else rootpath.open_in_root(root_fd, path)
    )
    if fd is None:
        return None
    with os.fdopen(fd, "rb") as f:
        found = _GLIBC_VERSION.search(f.read(16 << 20))
    return (int(found.group(1)), int(found.group(2))) if found else None


def pin(mpi: HostMpi) -> None:
    """Open every host file and directory (O_PATH) while the host's paths are visible."""
    from sifpy.runtime.plan import pin as pin_path

    for lib in (*mpi.libs, *mpi.deps, *mpi.glibc):
        if lib.path not in mpi.fds:
            mpi.fds[lib.path] = pin_path(lib.path, "MPI library")
    for path in (*mpi.dirs, *mpi.trees):
        mpi.fds[path] = pin_path(path, "MPI dependency")


def close(mpi: HostMpi) -> None:
    for fd in mpi.fds.values():
        os.close(fd)
    mpi.fds.clear()


# --- the image's side -----------------------------------------------------------------------


def check(mode: str, host: Lib, image: Lib) -> str | None:
    """None when ``host`` may replace ``image`` in ``mode``, a warning when it may but is
    older (``full``); raises when it may not."""
    same = host.major == image.major and (
        host.linker == image.linker or {host.linker, image.linker} <= set(MPICH_NAMES)
    )
    if not same or (mode == "strict" and host.minor != image.minor):
        strictly = " strictly" if same else ""
        raise RuntimeSetupError(
            f"can't bind MPI: the host's {host.name} ({host.path}) is not{strictly} "
            f"ABI-compatible with the image's {image.name} ({image.path})",
            hint="run the image's own MPI (without --mpi), or use an image built with an "
            f"MPI of the host's ABI ({host.linker}.{host.major})",
        )
    if mode == "full" and host.minor < image.minor:
        return (
            f"the host's {host.name} is older than the image's {image.name}: a program "
            "using symbols only the image's has will fail"
        )
    return None


def pick(host: Lib, candidates: list[Lib]) -> Lib:
    """The image library ``host`` replaces (Sarus's pickNewestAbiCompatibleLibrary)."""
    for lib in candidates:
        if lib.version == host.version:
            return lib
    older = [lib for lib in candidates if lib.version <= host.version]
    if older:
        return max(older, key=lambda lib: lib.version)
    return min(candidates, key=lambda lib: lib.version)


def image_libs(root_fd: int, wanted: set[str]) -> dict[str, list[Lib]]:
    """The image's ld.so cache: linker name -> libraries (resolved paths), for the linker
    names in ``wanted`` and of this interpreter's ELF kind (a 32-bit copy is no match)."""
    fd = rootpath.open_in_root(root_fd, LD_CACHE)
    if fd is None:
        raise RuntimeSetupError("can't bind MPI: the image has no ld.so cache", hint=_HINT_BUILD)
    with os.fdopen(fd, "rb") as f:
        data = f.read()
    native = native_elf()
    out: dict[str, list[Lib]] = {}
    seen: set[str] = set()
    for name, path in parse_ld_cache(data, f"the image's {LD_CACHE}"):
        if name in seen or split_name(name)[0] not in wanted:
            continue
        res = rootpath.resolve(root_fd, path)
        res.close()
        real = "/" + "/".join(res.parts)
        if res.missing or elf.kind_in_root(root_fd, real) != native:  # stale, or another kind
            continue
        seen.add(name)
        lib = Lib(real, name, real)
        out.setdefault(lib.linker, []).append(lib)
    return out


def mounts(mpi: HostMpi, root_fd: int) -> list[Mount]:
    """The binds that put the host's MPI (pinned by :func:`pin`) into the image mounted at
    ``root_fd``; raises when the two can't be paired."""
    wanted = {lib.linker for lib in (*mpi.libs, *mpi.deps, *mpi.glibc)} | set(MPICH_NAMES)
    libs = image_libs(root_fd, wanted)
    binds: dict[str, str] = {}  # destination -> host path

    def put(lib: Lib, dest: str) -> None:
        binds.setdefault(dest, lib.path)
        log.verbose(f"--mpi: {lib.path} on {dest}")

    found = False
    for lib in mpi.libs:
        cands = libs.get(lib.linker)
        if not cands and lib.linker in MPICH_NAMES:
            cands = [c for name in MPICH_NAMES for c in libs.get(name, [])]
        if not cands:
            put(lib, f"{LIBS_DIR}/{lib.soname}")
            continue
        found = True
        best = pick(lib, cands)
        for cand in cands:  # every version the image has must be replaceable (Sarus)
            if cand.version or cand is best:
                warning = check(mpi.mode, lib, cand)
                if warning and cand is best:
                    log.warn(f"--mpi: {warning}")
        put(lib, best.path)
    if not found:
        names = ", ".join(lib.soname for lib in mpi.libs)
        raise RuntimeSetupError(
            f"can't bind MPI: the image's ld.so cache lists no MPI library ({names})",
            hint=_HINT_BUILD,
        )
    over_dirs: set[str] = set()
    for lib in mpi.deps:
        cands = libs.get(lib.linker, [])
        over = pick(lib, cands) if cands else None
        if over is not None and over.major == lib.major and lib.minor >= over.minor:
            put(lib, over.path)
            over_dirs.add(os.path.dirname(over.path))
        else:
            put(lib, f"{LIBS_DIR}/{lib.soname}")
    plan = [
        Mount(dest, "bind", mpi.fds[src], readonly=True, is_dir=False)
        for dest, src in binds.items()
    ]
    for path in mpi.dirs:
        base = os.path.basename(path)
        for dest in (f"{LIBS_DIR}/{base}", path, *(f"{d}/{base}" for d in sorted(over_dirs))):
            if dest in binds or (
                dest != f"{LIBS_DIR}/{base}" and mpiopen.resolved(root_fd, dest) is None
            ):
                continue
            binds[dest] = path
            plan.append(Mount(dest, "bind", mpi.fds[path], readonly=True))
    # Open MPI's and PMIx's own paths go first: a library bound into one stays visible.
    return mpiopen.trees(mpi, root_fd) + plan + _glibc(mpi, root_fd, libs)


def _glibc(mpi: HostMpi, root_fd: int, libs: dict[str, list[Lib]]) -> list[Mount]:
    """The host's glibc over the image's, when the image's is older (Sarus's glibc hook)."""
    libc = next((lib for lib in libs.get("libc.so", []) if lib.soname == "libc.so.6"), None)
    want = ".".join(map(str, mpi.glibc_version))
    if libc is None:
        raise RuntimeSetupError(
            "can't bind MPI: the image has no glibc (its ld.so cache lists no libc.so.6), "
            f"and the host's MPI needs glibc {want}",
            hint="use an image based on a glibc distribution, or run without --mpi",
        )
    have = glibc_version(libc.path, root_fd)
    if have is None:
        raise RuntimeSetupError(f"can't bind MPI: the image's {libc.path}: no glibc version found")
    if have >= mpi.glibc_version:
        return []
    log.verbose(f"--mpi: the image's glibc {have[0]}.{have[1]} is older than {want}: replaced")
    by_soname = {lib.soname: lib for group in libs.values() for lib in group}
    plan = []
    for host_lib in mpi.glibc:
        path = by_soname[host_lib.soname].path if host_lib.soname in by_soname else None
        if host_lib.soname == os.path.basename(mpi.interp):  # the path programs name
            res = rootpath.resolve(root_fd, mpi.interp)
            res.close()
            path = None if res.missing else "/" + "/".join(res.parts)
            if path is None:
                raise RuntimeSetupError(
                    f"can't bind MPI: the image's glibc {have[0]}.{have[1]} is older than the "
                    f"host's {want}, and the image has no {mpi.interp} to replace",
                    hint="use an image with a glibc at least as new as the host's",
                )
        if path is not None:
            plan.append(Mount(path, "bind", mpi.fds[host_lib.path], readonly=True, is_dir=False))
    return plan

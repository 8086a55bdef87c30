"""GPU driver files from the host: ``--nv``, ``--nvccli`` and ``--rocm``, as Apptainer does.

The driver's user-space libraries must match the host's kernel driver exactly, so they come
from the host at run time, never from the image (Apptainer's ``--nv``,
https://github.com/apptainer/apptainer/blob/main/internal/pkg/util/gpu/paths.go):

- a list (``etc/nvliblist.conf``, ``etc/rocmliblist.conf``, shipped here) names programs,
  library name prefixes and absolute files;
- each prefix is matched against the host's ld.so cache (``/etc/ld.so.cache``, read here
  without running ``ldconfig -p``); the first path of each name whose ELF class and machine
  are this interpreter's is bound read-only at ``/.singularity.d/libs/NAME``, a directory the
  action script appends to ``LD_LIBRARY_PATH``;
- programs are found on the host's ``PATH`` and bound into ``/.singularity.d/bin``, which is
  put in front of the container's ``PATH`` (Apptainer binds them over ``/usr/bin/NAME``;
  a directory of our own avoids rebuilding a large ``/usr/bin`` of a read-only image);
- the device nodes are bound into the container's ``/dev`` when it is a minimal one
  (``--contain``); the host's ``/dev`` already shows them otherwise.

With ``--nvccli`` the list comes from ``nvidia-container-cli list`` (NVIDIA's own view of
the driver, devices included) instead; sifpy still binds the files itself, unprivileged,
since ``nvidia-container-cli configure`` would write into the (read-only) image.

Nothing here mounts: :func:`mounts` turns an :class:`Injection` into entries of the mount
plan (:mod:`sifpy.runtime.plan`), which the container carries out with its other binds.
"""

from __future__ import annotations

import glob
import os
import struct

from sifpy import TYPE_CHECKING
from sifpy.errors import RuntimeSetupError, SifpyError

if TYPE_CHECKING:
    from sifpy.runtime.plan import Mount

LIBS_DIR = "/.singularity.d/libs"
BIN_DIR = "/.singularity.d/bin"
LD_CACHE = "/etc/ld.so.cache"
ETC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "etc")

# The NVIDIA kernel driver's device nodes (what nvidia-container-cli lists, and Apptainer's
# --nv binds under --contain).
NVIDIA_DEVICES = (
    "/dev/nvidia[0-9]*",
    "/dev/nvidiactl",
    "/dev/nvidia-uvm",
    "/dev/nvidia-uvm-tools",
    "/dev/nvidia-modeset",
    "/dev/nvidia-caps/*",
)
# AMD: the compute driver and the DRM render nodes.
ROCM_DEVICES = ("/dev/kfd", "/dev/dri/*")
# The persistence daemon's socket: a CUDA program asks it for a fast start when it runs.
NVIDIA_IPC = ("/var/run/nvidia-persistenced/socket",)


class Injection:
    """What the container gets from the host for its devices: files to bind, device nodes,
    variables, OCI hooks (CDI). A plain class: the exec path avoids dataclasses."""

    __slots__ = ("binds", "devices", "env", "gids", "hooks", "path", "tmpfs", "warnings")

    def __init__(self) -> None:
        self.binds: list[tuple[str, str, bool]] = []  # (host path, container path, read-only)
        self.devices: list[tuple[str, str]] = []  # (host node, container path)
        self.tmpfs: list[tuple[str, str]] = []  # (container path, tmpfs options: size=, mode=)
        self.env: dict[str, str] = {}  # set as if injected (--env wins over them)
        self.path: list[str] = []  # directories put in front of the container's PATH
        self.hooks: list[dict[str, object]] = []  # CDI hooks: {"stage", "path", "args", ...}
        self.gids: list[int] = []  # CDI additionalGIDs the caller has
        self.warnings: list[str] = []  # for the CLI to print

    def add_bind(self, host: str, dest: str, readonly: bool = True) -> None:
        if all(d != dest for _, d, _ in self.binds):
            self.binds.append((host, dest, readonly))

    def add_device(self, host: str, dest: str) -> None:
        if all(d != dest for _, d in self.devices):
            self.devices.append((host, dest))

    def merge(self, other: Injection) -> None:
        for b in other.binds:
            self.add_bind(*b)
        for d in other.devices:
            self.add_device(*d)
        self.tmpfs += [t for t in other.tmpfs if t not in self.tmpfs]
        self.env.update(other.env)
        self.path += [p for p in other.path if p not in self.path]
        self.hooks += other.hooks
        self.gids += [g for g in other.gids if g not in self.gids]
        self.warnings += other.warnings


# --- the ld.so cache ----------------------------------------------------------------------

_NEW_MAGIC = b"glibc-ld.so.cache1.1"
_OLD_MAGIC = b"ld.so-1.7.0"
# glibc sysdeps/generic/dl-cache.h: struct cache_file_new (48 bytes) and file_entry_new
# (24 bytes): flags, key, value (string offsets from the start of the file), osversion,
# hwcap.
_NEW_HEADER = struct.Struct("<20sIIB3xI12x")
_NEW_ENTRY = struct.Struct("<iIIIQ")
_OLD_ENTRY_SIZE = 12


def read_ld_cache(path: str = LD_CACHE) -> list[tuple[str, str]]:
    """The (name, path) entries of an ld.so cache, in its order (the loader's priority).

    glibc >= 2.32 writes only the new format; older ones wrote the old format first, the
    new one after it (aligned to 8 bytes), which is the one read here.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise RuntimeSetupError(f"can't read the ld.so cache: {path}: {exc.strerror}") from exc
    return parse_ld_cache(data, path)


def parse_ld_cache(data: bytes, path: str) -> list[tuple[str, str]]:
    """:func:`read_ld_cache` of the cache's bytes (``path`` names it in errors)."""
    start = 0
    if data.startswith(_OLD_MAGIC):
        (n_old,) = struct.unpack_from("<I", data, 12)
        start = (16 + n_old * _OLD_ENTRY_SIZE + 7) & ~7
    if data[start : start + len(_NEW_MAGIC)] != _NEW_MAGIC:
        raise RuntimeSetupError(
            f"can't read the ld.so cache: {path}: not a glibc ld.so cache",
            hint="run ldconfig as root to rebuild it",
        )
    _, nlibs, _, _, _ = _NEW_HEADER.unpack_from(data, start)
    out = []
    base = start + _NEW_HEADER.size
    for i in range(nlibs):
        _, key, value, _, _ = _NEW_ENTRY.unpack_from(data, base + i * _NEW_ENTRY.size)
        out.append((_cstr(data, key), _cstr(data, value)))
    return out


def _cstr(data: bytes, at: int) -> str:
    end = data.find(b"\0", at)
    return data[at : end if end >= 0 else len(data)].decode(errors="surrogateescape")


def elf_kind(path: str) -> tuple[int, int] | None:
    """(ELF class, machine) of a file, or None when it is no ELF file."""
    try:
        with open(path, "rb") as f:
            head = f.read(20)
    except OSError:
        return None
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    order = "<" if head[5] == 1 else ">"
    return head[4], struct.unpack_from(order + "H", head, 18)[0]


def native_elf() -> tuple[int, int] | None:
    """This interpreter's ELF class and machine: the libraries bound must load in a program
    of the same kind (64-bit x86-64 here; a 32-bit copy of a library is skipped)."""
    return elf_kind("/proc/self/exe")


# --- the lists ----------------------------------------------------------------------------


def read_list(path: str) -> tuple[list[str], list[str], list[str]]:
    """(programs, library prefixes, absolute files) of a liblist file (Apptainer's format:
    one entry a line, ``#`` comments)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise RuntimeSetupError(
            f"can't read GPU library list: {path}: {reason}",
            hint="fix the nvliblist/rocmliblist setting in sifpy.conf",
        ) from exc
    progs, libs, files = [], [], []
    for raw in lines:
        entry = raw.strip()
        if not entry or entry.startswith("#"):
            continue
        if entry.startswith("/"):
            files.append(entry)
        elif ".so" in entry:
            libs.append(entry)
        else:
            progs.append(entry)
    return progs, libs, files


def find_libraries(
    prefixes: list[str], cache: list[tuple[str, str]], kind: tuple[int, int] | None
) -> list[tuple[str, str]]:
    """(name, host path) of every cache name that starts with one of ``prefixes``: the
    first path of each name whose ELF kind is ``kind``, each name once."""
    found: dict[str, str] = {}
    for name, path in cache:
        if name in found or not any(name.startswith(p) for p in prefixes):
            continue
        if kind is not None and elf_kind(path) != kind:
            continue
        found[name] = path
    return list(found.items())


def find_program(name: str, search: str) -> str | None:
    for d in search.split(":"):
        cand = os.path.join(d or ".", name)
        if os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def device_nodes(patterns: tuple[str, ...]) -> list[str]:
    """The host's device nodes matching ``patterns`` (character devices only), sorted."""
    out: list[str] = []
    for pattern in patterns:
        for path in sorted(glob.glob(pattern)):
            if not os.path.isdir(path) and path not in out:
                out.append(path)
    return out


# --- --nv, --rocm -------------------------------------------------------------------------


def from_list(
    liblist: str,
    devices: tuple[str, ...],
    vendor: str,
    cache: str = LD_CACHE,
    search: str | None = None,
) -> Injection:
    """The legacy injection (Apptainer's ``--nv``/``--rocm`` without a vendor tool):
    ``liblist`` matched against the ld.so cache ``cache`` and the host's ``PATH``
    (``search``), plus every device node matching ``devices``."""
    inj = Injection()
    progs, prefixes, files = read_list(liblist)
    try:
        entries = read_ld_cache(cache)
    except RuntimeSetupError as exc:
        inj.warnings.append(f"{exc.message}: no {vendor} libraries bound")
        entries = []
    for name, path in find_libraries(prefixes, entries, native_elf()):
        inj.add_bind(path, f"{LIBS_DIR}/{name}")
    search = os.environ.get("PATH", "/usr/bin:/bin") if search is None else search
    for prog in progs:
        found = find_program(prog, search)
        if found:
            inj.add_bind(found, f"{BIN_DIR}/{prog}")
    for path in files:
        if os.path.isfile(path):
            inj.add_bind(path, path)
    for node in device_nodes(devices):
        inj.add_device(node, node)
    if not inj.devices and not any(d.startswith(LIBS_DIR) for _, d, _ in inj.binds):
        inj.warnings.append(f"no {vendor} driver found on this host: running without GPU")
    elif not inj.devices:
        inj.warnings.append(f"no {vendor} device nodes on this host: the GPU is not usable")
    if any(d.startswith(BIN_DIR) for _, d, _ in inj.binds):
        inj.path.append(BIN_DIR)
    return inj


def nvidia(liblist: str | None = None, cache: str = LD_CACHE) -> Injection:
    """``--nv`` from ``nvliblist.conf`` (the shipped one unless ``liblist``)."""
    inj = from_list(liblist or f"{ETC}/nvliblist.conf", NVIDIA_DEVICES, "NVIDIA", cache)
    for path in NVIDIA_IPC:
        if os.path.exists(path):
            inj.add_bind(path, path, readonly=False)
    return inj


def rocm(liblist: str | None = None, cache: str = LD_CACHE) -> Injection:
    """``--rocm`` from ``rocmliblist.conf`` (the shipped one unless ``liblist``)."""
    return from_list(liblist or f"{ETC}/rocmliblist.conf", ROCM_DEVICES, "AMD ROCm", cache)


def nvccli(
    contain: bool, environ: dict[str, str] | None = None, cache: str = LD_CACHE
) -> Injection:
    """``--nvccli``: NVIDIA's own list of the driver's files (``nvidia-container-cli list``).

    As in Apptainer, only the host's ``NVIDIA_*`` variables count: ``NVIDIA_VISIBLE_DEVICES``
    selects the GPUs (``all`` by default; under ``--contain`` it must be set, or the
    container gets no GPU), and it is passed on to the container.
    """
    from sifpy.util.proc import PIPE, TimeoutExpired, run

    environ = dict(os.environ) if environ is None else environ
    inj = Injection()
    cli = find_program("nvidia-container-cli", environ.get("PATH", "/usr/bin:/bin"))
    if cli is None:
        raise RuntimeSetupError(
            "can't use --nvccli: nvidia-container-cli is not installed",
            hint="install the NVIDIA Container Toolkit, or use --nv",
        )
    visible = environ.get("NVIDIA_VISIBLE_DEVICES", "")
    if not visible and contain:
        inj.warnings.append(
            "with --nvccli and --contain, NVIDIA_VISIBLE_DEVICES must be set: no GPU in the "
            "container"
        )
    elif not visible:
        visible = "all"
    argv = [cli, "list"]
    if visible and visible not in ("none", "void"):
        argv.append(f"--device={visible}")
    try:
        done = run(argv, "list the driver's files", stdout=PIPE, text=True, timeout=60, ok=None)
    except (SifpyError, TimeoutExpired) as exc:
        raise RuntimeSetupError(f"can't run nvidia-container-cli: {exc}") from exc
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        raise RuntimeSetupError(
            f"can't list the NVIDIA driver's files: nvidia-container-cli: {tail[0]}",
            hint="check the driver (nvidia-smi), or use --nv",
        )
    if visible:
        inj.env["NVIDIA_VISIBLE_DEVICES"] = visible
    # Libraries go into the libs directory under every ld.so cache name that leads to
    # them (libcuda.so.1 -> libcuda.so.535.104.05): the loader asks for the soname.
    aliases: dict[str, list[str]] = {}
    try:
        for name, path in read_ld_cache(cache):
            aliases.setdefault(os.path.realpath(path), []).append(name)
    except RuntimeSetupError as exc:
        inj.warnings.append(exc.message)
    for line in done.stdout.splitlines():
        path = line.strip()
        if not path.startswith("/"):
            continue
        base = os.path.basename(path)
        if path.startswith("/dev/"):
            inj.add_device(path, path)
        elif ".so" in base:
            for name in [base, *aliases.get(os.path.realpath(path), [])]:
                inj.add_bind(path, f"{LIBS_DIR}/{name}")
        elif "/run/" in path:  # the persistence daemon's and MPS's sockets
            inj.add_bind(path, path, readonly=False)
        else:
            inj.add_bind(path, f"{BIN_DIR}/{base}")
    if any(d.startswith(BIN_DIR) for _, d, _ in inj.binds):
        inj.path.append(BIN_DIR)
    return inj


# --- into the mount plan ------------------------------------------------------------------


def mounts(inj: Injection, dev_is_host: bool) -> list[Mount]:
    """Plan entries for ``inj``: read-only file binds, and device nodes bound without
    ``nodev`` (a device bound ``nodev`` can't be opened). ``dev_is_host``: the container's
    ``/dev`` is the host's (no ``--contain``), so a node already there at the same path is
    not bound again, and one that is not can't be created (it would be created on the
    host's ``/dev``)."""
    import stat

    from sifpy.runtime.plan import Mount, pin

    plan = []
    for host, dest in inj.devices:
        fd = pin(host, "device")
        if dev_is_host and dest.startswith("/dev/"):
            try:
                same = os.stat(dest).st_rdev == os.fstat(fd).st_rdev
            except OSError:
                same = False
            if same and os.path.realpath(host) == os.path.realpath(dest):
                os.close(fd)
                continue
            if not same:
                os.close(fd)
                raise RuntimeSetupError(
                    f"can't bind device: {host} on {dest}: the container's /dev is the "
                    "host's, which has no such node",
                    hint="add --contain (a minimal /dev the device is bound into)",
                )
        plan.append(Mount(dest, "bind", fd, is_dir=False, devices=True))  # nosuid, not nodev
    for dest, data in inj.tmpfs:  # a user namespace may mount tmpfs (nosuid, nodev)
        plan.append(Mount(dest, "tmpfs", data=data))
    for host, dest, readonly in inj.binds:
        fd = pin(host, "GPU file")
        is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
        plan.append(Mount(dest, "bind", fd, readonly=readonly, is_dir=is_dir))
    return plan

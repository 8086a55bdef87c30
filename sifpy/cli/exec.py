"""``sifpy exec | run | shell | test``: run a command in a container, as Apptainer does.

This is the hot path (once per MPI rank): it parses its options without argparse (built only
for --help and errors) and opens the image once (the partition mounted is the one in that
open file). The compiled starter (cli/starter.c) may have served that image already, before
Python started (:func:`sifpy.runtime.start.adopt`): the rest (environment, the container's
mounts) is then computed while the FUSE server starts; otherwise the container is mounted
in order.
Exit status: the command's own (128+N when killed by signal N); 125 when sifpy fails
before the command starts, 126 not executable, 127 not found.
"""

from __future__ import annotations

import os
import stat
import sys

from sifpy import TYPE_CHECKING, config
from sifpy.errors import ExitStatus, ImageError, RuntimeSetupError, SifpyError, UsageError
from sifpy.runtime import start
from sifpy.runtime.start import DRIVERS, Sandbox, SifPartition
from sifpy.util import log

if TYPE_CHECKING:
    from collections.abc import Mapping
    from types import SimpleNamespace
    from typing import Any

    from sifpy.cli._args import ArgumentParser
    from sifpy.runtime.gpu import Injection
    from sifpy.runtime.spec import LaunchSpec
    from sifpy.sign.policy import Policy
else:
    SimpleNamespace = type(sys.implementation)  # what types.py does, without importing it

HELP = {
    "exec": "run a command in a container",
    "run": "run the container's runscript",
    "shell": "start an interactive shell in a container",
    "test": "run the container's test script",
}


# The options of exec/run/shell/test: (flags, argparse keywords). One table serves both
# the fast parser used to start containers and argparse (for --help and usage errors).
OPTIONS: list[tuple[tuple[str, ...], dict[str, Any]]] = [
    (
        ("-B", "--bind"),
        {
            "action": "append",
            "default": [],
            "metavar": "SRC[:DEST[:ro|rw]]",
            "help": "bind a host path (repeatable, comma lists; also $SIFPY_BIND, $APPTAINER_BIND)",
        },
    ),
    (("-H", "--home"), {"metavar": "SRC[:DEST]", "help": "use this home directory"}),
    (("--no-home",), {"action": "store_true", "help": "don't bind the home directory"}),
    (
        ("-c", "--contain"),
        {"action": "store_true", "help": "minimal /dev, private /tmp, /var/tmp and home"},
    ),
    (
        ("-C", "--containall"),
        {"action": "store_true", "help": "--contain, --cleanenv, --pid and --ipc"},
    ),
    (
        ("--mount",),
        {
            "action": "append",
            "default": [],
            "metavar": "type=bind,src=S,dst=D[,ro]",
            "help": "bind, Docker-style (repeatable; also $SIFPY_MOUNT, $APPTAINER_MOUNT)",
        },
    ),
    (
        ("--no-mount",),
        {
            "action": "append",
            "default": [],
            "metavar": "LIST",
            "help": "skip default mounts: proc,sys,dev,devpts,home,tmp,hostfs,cwd,bind-paths,PATH",
        },
    ),
    (
        ("-W", "--workdir"),
        {
            "metavar": "DIR",
            "help": "with --contain: /tmp, /var/tmp and home from DIR instead of tmpfs",
        },
    ),
    (
        ("--writable-tmpfs",),
        {
            "action": "store_true",
            "help": "a writable overlay in memory (64 MiB), gone after the run",
        },
    ),
    (
        ("-o", "--overlay"),
        {
            "action": "append",
            "default": [],
            "metavar": "DIR|IMAGE[:ro]",
            "help": "a persistent overlay (repeatable): a directory or an ext3 image (`sifpy "
            "overlay create`); changes go to the writable one, :ro ones are layers below it",
        },
    ),
    (("-e", "--cleanenv"), {"action": "store_true", "help": "don't pass the host environment"}),
    (
        ("--env",),
        {"action": "append", "default": [], "metavar": "K=V[,K=V]", "help": "set a variable"},
    ),
    (
        ("--env-file",),
        {
            "action": "append",
            "default": [],
            "metavar": "FILE",
            "help": "variables from a file (shell syntax; NAME=VALUE literals with --no-eval)",
        },
    ),
    (
        ("--no-eval",),
        {"action": "store_true", "help": "don't shell-evaluate injected variables or --env-file"},
    ),
    (
        ("--no-env",),
        {
            "action": "append",
            "default": [],
            "metavar": "NAME[,NAME]",
            "help": "don't pass these host variables (also $APPTAINER_NOENV, $SIFPY_NOENV)",
        },
    ),
    (
        ("--cwd", "--pwd"),
        {
            "dest": "pwd",  # argparse's default would be the first flag's name
            "metavar": "DIR",
            "help": "initial working directory in the container (must exist)",
        },
    ),
    (("-p", "--pid"), {"action": "store_true", "help": "run in a new PID namespace"}),
    (("--no-pid",), {"action": "store_true", "help": "no new PID namespace (with --containall)"}),
    (
        ("--no-init",),
        {"action": "store_true", "help": "with --pid: no init process, the command is PID 1"},
    ),
    (("-i", "--ipc"), {"action": "store_true", "help": "run in a new IPC namespace"}),
    (
        ("--unsquash",),
        {
            "action": "store_true",
            "help": "extract the image to a temporary sandbox instead of mounting it",
        },
    ),
    (
        ("--mount-driver",),
        {"default": "auto", "choices": DRIVERS, "help": "how to mount a SIF image (default: auto)"},
    ),
    (
        ("--runscript-timeout",),
        {
            "metavar": "DURATION",
            "help": "time the image's environment scripts may take (default 1m; e.g. 30s)",
        },
    ),
    (
        ("-f", "--fakeroot"),
        {"action": "store_true", "help": "run as uid 0 in the container, with HOME=/root"},
    ),
    (("-w", "--writable"), {"action": "store_true", "help": "writable sandbox directory"}),
    (("--app",), {"metavar": "NAME", "help": "run a SCIF app"}),
    (("-s", "--shell"), {"metavar": "PATH", "help": "the shell for 'shell'"}),
    (("--nv",), {"action": "store_true", "help": "bind the host's NVIDIA driver (GPU)"}),
    (
        ("--nvccli",),
        {"action": "store_true", "help": "--nv, with the files nvidia-container-cli lists"},
    ),
    (("--rocm",), {"action": "store_true", "help": "bind the host's AMD ROCm driver (GPU)"}),
    (
        ("--mpi",),
        {
            "action": "store_true",
            "help": "bind mode: the host's MPI replaces the image's (sifpy.conf: mpi library)",
        },
    ),
    (
        ("--device",),
        {
            "action": "append",
            "default": [],
            "metavar": "VENDOR/CLASS=NAME",
            "help": "a CDI device (repeatable; NAME may be 'all'); see `sifpy cdi list`",
        },
    ),
    (
        ("--sharens",),
        {
            "action": "store_true",
            "help": "one container per node, joined by every rank of the job step (the "
            "default for a rank of an MPI or Slurm job)",
        },
    ),
    (("--no-sharens",), {"action": "store_true", "help": "a container of its own per rank"}),
    (
        ("--hooks-dir",),
        {
            "action": "append",
            "default": [],
            "metavar": "DIR",
            "help": "OCI hook definitions (*.json), besides /etc/sifpy/hooks.d and sifpy.conf's "
            "(repeatable; later directories win)",
        },
    ),
    (
        ("--annotation",),
        {
            "action": "append",
            "default": [],
            "metavar": "KEY=VALUE",
            "help": "an annotation of the container, for OCI hooks (repeatable)",
        },
    ),
    (
        ("--verify",),
        {"action": "store_true", "help": "refuse to run unless the image's signatures verify"},
    ),
    (
        ("--verify-key",),
        {
            "action": "append",
            "default": [],
            "metavar": "PEM",
            "help": "a DSSE public key to verify with (implies --verify)",
        },
    ),
]


def build_parser(action: str, prog: str) -> ArgumentParser:
    """The argparse parser: only for --help and for reporting usage errors."""
    import argparse

    from sifpy.cli import _args

    p = _args.ArgumentParser(prog=prog, description=HELP[action].capitalize() + ".")
    for flags, kw in OPTIONS:
        p.add_argument(*flags, **kw)
    p.add_argument("image", help="a SIF file or a sandbox directory")
    if action == "exec":
        p.add_argument("command", help="the command to run")
    p.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    return p


def fast_parse(action: str, argv: list[str]) -> SimpleNamespace | None:
    """Parse ``argv`` as :func:`build_parser` would, without building argparse (~5 ms of
    every start). None for anything unusual (help, an unknown or malformed option, a
    missing argument): argparse then handles it and reports errors."""
    table: dict[str, tuple[str, dict[str, Any]]] = {}
    ns = SimpleNamespace()
    for flags, kw in OPTIONS:
        dest = flags[-1].lstrip("-").replace("-", "_")
        for flag in flags:
            table[flag] = (dest, kw)
        act = kw.get("action")
        default = [] if act == "append" else False if act == "store_true" else kw.get("default")
        setattr(ns, dest, default)
    i = 0
    while i < len(argv) and argv[i].startswith("-") and argv[i] != "-":
        tok = argv[i]
        if tok == "--":
            i += 1
            break
        name, eq, value = tok.partition("=") if tok.startswith("--") else (tok[:2], "", tok[2:])
        if name not in table:
            return None
        dest, kw = table[name]
        if kw.get("action") == "store_true":
            if eq or (value and not tok.startswith("--")):
                shorts = [f"-{c}" for c in tok[1:]]  # combined short flags: -ce
                kinds = [table.get(f, ("", {}))[1].get("action") for f in shorts]
                if eq or any(k != "store_true" for k in kinds):
                    return None
                for f in shorts:
                    setattr(ns, table[f][0], True)
            else:
                setattr(ns, dest, True)
            i += 1
            continue
        if not eq and not value:
            if i + 1 >= len(argv):
                return None
            i += 1
            value = argv[i]
        if "choices" in kw and value not in kw["choices"]:
            return None
        if kw.get("action") == "append":
            getattr(ns, dest).append(value)
        else:
            setattr(ns, dest, value)
        i += 1
    rest = argv[i:]
    need = 2 if action == "exec" else 1
    if len(rest) < need:
        return None
    ns.image = rest[0]
    if action == "exec":
        ns.command = rest[1]
    ns.args = rest[need:]
    return ns


_BIND_OPTIONS = ("ro", "rw")


def _split_unescaped(text: str, sep: str) -> list[str]:
    """Split at each ``sep`` not preceded by a backslash (Apptainer's ``\\,`` and ``\\:``)."""
    parts, cur, i = [], "", 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in ",:":
            cur += text[i : i + 2]
            i += 2
            continue
        if text[i] == sep:
            parts.append(cur)
            cur = ""
        else:
            cur += text[i]
        i += 1
    parts.append(cur)
    return parts


def _unescape(text: str) -> str:
    return text.replace("\\,", ",").replace("\\:", ":")


def parse_binds(specs: list[str]) -> list[tuple[str, str, bool]]:
    """``src[:dest[:opts]]`` items, comma separated, as Apptainer's ParseBindPath reads them:
    dest defaults to src; ``\\,`` and ``\\:`` are a literal comma and colon; options are
    ``ro`` / ``rw``, and after a bind with options a comma may also start another option
    (``/a:/b:ro,rw``)."""
    items: list[list[str]] = []
    for spec in specs:
        for token in _split_unescaped(spec, ","):
            token = token.strip()
            if not token:
                continue
            if token in _BIND_OPTIONS and items and len(items[-1]) == 3:
                items[-1][2] += "," + token
                continue
            items.append(_split_unescaped(token, ":"))
    binds = []
    for parts in items:
        item = ":".join(parts)
        if len(parts) > 3 or not parts[0]:
            raise UsageError(f"invalid bind: {item!r}", hint="use SRC[:DEST[:ro|rw]]")
        src = _unescape(parts[0])
        dest = _unescape(parts[1]) if len(parts) > 1 and parts[1] else src
        readonly = False
        for opt in parts[2].split(",") if len(parts) > 2 else []:
            if opt not in _BIND_OPTIONS:
                raise UsageError(f"invalid bind option {opt!r} in {item!r}", hint="use ro or rw")
            readonly = opt == "ro"
        if not dest.startswith("/"):
            raise UsageError(f"bind destination must be absolute: {item!r}")
        binds.append((os.path.abspath(src), os.path.normpath(dest), readonly))
    return binds


def parse_overlays(specs: list[str]) -> tuple[tuple[str, bool], ...]:
    """``--overlay PATH[:ro|:rw]`` options: (absolute path, writable), in order; at most one
    writable, as Apptainer allows."""
    out = []
    for spec in specs:
        path, _, mode = spec.rpartition(":") if spec.endswith((":ro", ":rw")) else (spec, "", "")
        out.append((os.path.abspath(path), mode != "ro"))
    if sum(w for _, w in out) > 1:
        raise UsageError(
            "only one --overlay can be writable", hint="add :ro to all the others but one"
        )
    return tuple(out)


def _config_binds(rules: Policy) -> list[str]:
    """``bind path = SRC[:DEST]`` lines of sifpy.conf (and ``$SIFPY_CONFIG``); as Apptainer,
    a source missing on this host is skipped, not an error (one file serves many nodes)."""
    out = []
    for spec in rules.system.binds + rules.user.binds:
        if os.path.exists(spec.split(":", 1)[0]):
            out.append(spec)
        else:
            log.verbose(f"bind path {spec}: no such file or directory here, skipped")
    return out


def _mpi_host(rules: Policy) -> Any:
    """``--mpi``: the host's MPI as sifpy.conf names it (default: its mpi alternative)."""
    from sifpy.runtime import mpibind

    libraries, dependencies, mode = rules.mpi()
    return mpibind.host(libraries, dependencies, mode)


def parse_mounts(specs: list[str]) -> list[tuple[str, str, bool, bool]]:
    """Docker-style ``[type=bind,]source=S,destination=D[,ro|readonly[=true|false]]
    [,nonested]`` specs (one per item, CSV-quoted as Apptainer reads them): (src, dest,
    readonly, nonested). Without ``type=`` a mount is a bind, as in Docker and Apptainer."""
    if not specs:
        return []
    import csv  # only when --mount is used

    binds = []
    for spec in specs:
        fields: dict[str, str] = {}
        for row in csv.reader([spec]):
            for field in row:
                key, eq, value = field.strip().partition("=")
                fields[key] = value if eq else "true"
        kind = fields.pop("type", "bind")
        src = fields.pop("source", "") or fields.pop("src", "")
        dst = fields.pop("destination", "") or fields.pop("dst", "") or fields.pop("target", "")
        ro = fields.pop("ro", "") or fields.pop("readonly", "") or "false"
        no_nest = fields.pop("nonested", "false")
        for key in ("src", "dst", "target", "readonly"):
            fields.pop(key, None)
        if fields.pop("rw", "false") in ("true", "1"):
            ro = "false"
        if kind != "bind" or not src or not dst.startswith("/") or fields:
            extra = f" (unsupported: {', '.join(fields)})" if fields else ""
            raise UsageError(
                f"invalid --mount: {spec!r}", hint=f"use type=bind,src=PATH,dst=/PATH[,ro]{extra}"
            )
        if ro not in ("true", "false", "1", "0") or no_nest not in ("true", "false", "1", "0"):
            raise UsageError(f"invalid --mount: {spec!r}: ro={ro}", hint="use ro or ro=true")
        binds.append(
            (
                os.path.abspath(src),
                os.path.normpath(dst),
                ro in ("true", "1"),
                no_nest in ("true", "1"),
            )
        )
    return binds


_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: str) -> float:
    """A Go duration (``1m``, ``30s``, ``1h30m``, ``1.5s``) as Apptainer's
    ``--runscript-timeout`` takes it, in seconds; anything else is refused, as there."""
    import re

    unit = r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)"
    if value == "0":
        return 0.0
    if not re.fullmatch(rf"[+-]?(?:{unit})+", value):
        raise UsageError(
            f"invalid --runscript-timeout: {value!r}", hint="use a duration such as 30s or 1m"
        )
    seconds = sum(float(n) * _UNITS[u] for n, u in re.findall(unit, value))
    return -seconds if value.startswith("-") else seconds


def _runscript_timeout(a: Any, environ: Mapping[str, str]) -> float:
    """Apptainer's deadline for the action script: ``--runscript-timeout``, else
    $APPTAINER_RUNSCRIPT_TIMEOUT ($SIFPY_ first), else one minute."""
    value = a.runscript_timeout
    if value is None:
        value = config.get("SIFPY_RUNSCRIPT_TIMEOUT", environ)
    return 60.0 if value is None else parse_duration(value)


def open_image(
    path: str,
    verify: bool = False,
    verify_keys: list[str] | None = None,
    fd: int = -1,
    oci_config: dict[str, Any] | None = None,
) -> tuple[SifPartition | Sandbox, int]:
    """Open the image once (verifying it if asked or required); returns what to mount
    and the fd that must stay open. ``fd``: the image, already open (the starter's).
    ``oci_config``: filled with an OCI-SIF's image config (Env, Entrypoint, ...)."""
    if fd < 0:
        try:
            # O_NONBLOCK: opening a FIFO (or a device) given as the image must not block;
            # it is no image, refused below.
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise ImageError(f"can't open image: {path}: {exc.strerror}") from exc
    st = os.fstat(fd)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        os.close(fd)
        raise ImageError(
            f"can't open image: {path}: not a regular file or directory",
            hint="give a SIF file or a sandbox directory",
        )
    if stat.S_ISREG(st.st_mode):
        os.set_blocking(fd, True)  # squashfuse shares this open file
    from sifpy.sign import policy

    rules = policy.load()
    if stat.S_ISDIR(st.st_mode):
        os.close(fd)
        if rules.verify_required or verify:
            raise ImageError(
                f"can't verify {path}: a sandbox directory carries no signatures",
                hint="run a signed SIF image",
            )
        return Sandbox(os.path.abspath(path)), -1
    from sifpy.sif import format as F
    from sifpy.sif.image import SifImage

    try:
        policy.enforce(fd, path, rules, verify, verify_keys or [])
        img = SifImage.from_fd(fd, path)
        if img.find(F.DataType.OCI_ROOT_INDEX):  # an OCI-SIF, maybe: JSON only then
            from sifpy.sif import ocisif

            if ocisif.is_ocisif(img):
                oci = ocisif.read_image(img)
                part = oci.rootfs(img.path)
                if oci_config is not None:  # what the image runs (see _oci_image_config)
                    own = oci.config.get("config")
                    oci_config.update(own if isinstance(own, dict) else {})
            else:
                part = ocisif.rootfs(img)
        else:
            part = img.primary_partition()
            if part.partition().fstype != F.FSType.SQUASH:
                raise ImageError(
                    f"can't run {path}: the primary partition is not squashfs",
                    hint="sifpy runs squashfs images; rebuild the image",
                )
    except BaseException:
        os.close(fd)
        raise
    # The monitor opens /proc/self/fd/N: the same open file, so what was checked here is
    # what squashfuse serves even if the path is replaced meanwhile.
    return SifPartition(f"/proc/self/fd/{fd}", part.offset, part.size), fd


def _oci_image_config(
    action: str, a: Any, args: list[str], config: dict[str, Any]
) -> list[str] | None:
    """An OCI-SIF's image config, as Apptainer's OCI mode runs it: ``Env`` set before the
    user's own variables (passed as the first part of the env file, so --env-file and
    --env override it), ``WorkingDir`` as the default --pwd, and for ``run`` the
    ``Entrypoint`` followed by the arguments, or by ``Cmd`` without any. Returns the
    command for ``run`` (None: the action's own)."""
    from sifpy.runtime.action import action_argv

    lines = []
    for entry in config.get("Env") or []:
        name, eq, value = str(entry).partition("=")
        if eq and name.isidentifier():  # literal values: single-quoted, nothing evaluated
            lines.append(f"{name}='{value.replace(chr(39), chr(39) + chr(92) + chr(39) * 2)}'")
    a.image_env = "\n".join(lines) + "\n" if lines else None
    workdir = config.get("WorkingDir")
    if isinstance(workdir, str) and workdir.startswith("/") and not a.pwd:
        a.pwd = workdir
    if action != "run" or a.app:  # a SCIF app's runscript is the image's own
        return None
    entrypoint = [str(x) for x in config.get("Entrypoint") or []]
    cmd = [str(x) for x in config.get("Cmd") or []]
    argv = entrypoint + (args or cmd)
    return action_argv("exec", argv) if argv else None


def _join_env(image: str | None, user: str | None) -> str | None:
    return user if image is None else image + (user or "")


def devices(a: Any) -> Injection:
    """What ``--nv``, ``--nvccli``, ``--rocm`` and ``--device`` bind from the host (warnings
    printed here); the settings come from sifpy.conf."""
    from sifpy.runtime import gpu
    from sifpy.sign import policy

    rules = policy.load()
    inject = gpu.Injection()
    if a.nvccli:
        inject.merge(gpu.nvccli(a.contain or a.containall))
    elif a.nv:
        inject.merge(gpu.nvidia(rules.device_setting("nvliblist")))
    if a.rocm:
        inject.merge(gpu.rocm(rules.device_setting("rocmliblist")))
    if a.device:
        from sifpy.runtime import cdi

        dirs = config.get("SIFPY_CDI_SPEC_DIRS") or rules.device_setting("cdi spec dirs")
        registry = cdi.Registry.load(dirs.split(":") if dirs else None)
        inject.merge(registry.inject(a.device))
    for message in inject.warnings:
        log.warn(message)
    inject.warnings.clear()
    return inject


def main(argv: list[str], prog: str = "sifpy exec") -> int:
    try:
        return _main(argv, prog)
    except SifpyError as exc:
        # Docker's convention: any failure of sifpy itself, before or while starting the
        # command, is 125, so that it can't be mistaken for the command's own status.
        exc.exit_status = ExitStatus.LAUNCH_FAILED
        raise


def _std_fds() -> None:
    """Open /dev/null in place of a closed 0, 1 or 2: else the image would be opened as one
    of them, and the command would start without it (it gets 0, 1 and 2, always)."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            if os.open(os.devnull, os.O_RDWR) != fd:  # the lowest free number: this one
                raise RuntimeSetupError(f"can't open /dev/null as fd {fd}") from None
            os.set_inheritable(fd, True)  # os.open's are not (PEP 446)


def _main(argv: list[str], prog: str) -> int:
    action = prog.rsplit(" ", 1)[-1]
    _std_fds()
    # The image the starter (starter.c) served before Python started, if it did.
    served, fd, caller = start.adopt() or (None, -1, None)
    fast_lock = _fast_lock()
    passed = start.passed_fds()  # before sifpy opens anything of its own
    try:
        fast = fast_parse(action, argv)
        a = fast or build_parser(action, prog).parse_args(argv)
        # Before serve(): with --fakeroot, getuid() says 0 once the namespace is entered.
        ident = start.host_identity(*caller) if caller else start.host_identity()
        if a.image.startswith("instance://"):
            return _run_in_instance(action, a, ident, passed, served)
        step = _sharens_step(a, served is not None)
        if served is None and "://" in a.image:  # docker://: from the SIF cache, as Apptainer
            from sifpy.cli.pull import pull_to_cache

            a.image = pull_to_cache(a.image)
        oci_config: dict[str, Any] = {}
        if served is None:
            verify = a.verify or bool(a.verify_key)
            image, fd = open_image(a.image, verify, a.verify_key, -1, oci_config)
        else:  # the file served is the file validated and run
            log.verbose("note: the starter entered the namespaces and served the image")
            # open_image owns the fd from here: it closes it when it fails.
            taken, fd = fd, -1
            image, fd = open_image(a.image, False, None, taken, oci_config)
            if served.offset != getattr(image, "offset", None) or served.fakeroot != a.fakeroot:
                raise RuntimeSetupError("can't start container: the starter served another image")
        overlays = parse_overlays(a.overlay)
        if a.writable_tmpfs and any(w for _, w in overlays):
            raise UsageError(
                "--writable-tmpfs can't be combined with a writable --overlay",
                hint="add :ro to the --overlay, or leave out --writable-tmpfs",
            )
        if a.writable and not isinstance(image, Sandbox):
            raise UsageError("--writable needs a sandbox directory", hint="build with --sandbox")
        if a.writable and (a.writable_tmpfs or a.overlay):
            raise UsageError("--writable can't be combined with --writable-tmpfs or --overlay")
        from sifpy.runtime.action import action_argv

        args = ([a.command] if action == "exec" else []) + a.args
        command = action_argv(action, args)
        if oci_config:
            command = _oci_image_config(action, a, args, oci_config) or command
        # The action script's shell, then the command: both start cold on a fresh mount.
        prefetch = (command[0], *args[:1]) if action == "exec" else (command[0],)
        driver = "unsquash" if a.unsquash else a.mount_driver
        # Before serve(): nvidia-container-cli runs on the host, outside the namespaces.
        inject = devices(a) if a.nv or a.nvccli or a.rocm or a.device else None
        if step is not None:
            from sifpy.runtime import sharens

            spec = _spec(action, a, ident, image, command, prefetch, driver, inject, passed)
            identity = os.fstat(fd) if fd >= 0 else os.stat(image.path)
            base = f"{sharens.runtime_dir()}/{sharens.container_key(spec, step, identity)}"
            alias = None
            if fast is not None:  # the starter's name for it: sifpy's argv up to the image
                at = len(sys.argv) - len(argv) + len(argv) - len(a.args)
                head = sys.argv[1:at] if action != "exec" else sys.argv[1 : at - 1]
                key = sharens.fast_key(head, step, os.getcwd(), identity, os.environ)
                alias = f"{key}.sock"
            prepare = _joiner(ident)
            sharens.run_joined(spec, ident, base, prepare=prepare, alias=alias, release=fast_lock)
        _release(fast_lock)
        return _run(action, a, ident, image, served, command, prefetch, driver, inject, passed)
    finally:
        if served is not None:
            served.stop()
        if fd >= 0:
            os.close(fd)


# Options a shared container can't honour: each asks for namespaces or a root of the rank's
# own. With them, a rank of a job gets its own container; --sharens refuses them.
_UNSHARED = ("pid", "ipc", "containall", "writable", "unsquash", "nvccli")
_GLOBAL_FLAGS = ("-q", "--quiet", "-v", "--verbose", "--debug")


def _sharens_step(a: Any, served: bool) -> str | None:
    """The job step whose ranks share this container (``--sharens``, or by default when
    this process is a rank of an MPI or Slurm job: see :func:`sifpy.runtime.sharens.job_step`),
    or None for a container of its own."""
    if a.no_sharens:
        if a.sharens:
            raise UsageError("--sharens and --no-sharens can't be combined")
        return None
    step = None
    rank_vars = ("SLURM_STEP_ID", "PMIX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
    if a.sharens or any(os.environ.get(v) for v in rank_vars):
        from sifpy.runtime import sharens

        step = sharens.job_step(os.environ)
        if step is None and a.sharens:
            step = sharens.parent_step()
    if step is None:
        return None
    bad = [f"--{o.replace('_', '-')}" for o in _UNSHARED if getattr(a, o)]
    if a.sharens and bad:
        raise UsageError(f"--sharens can't be combined with {', '.join(bad)}")
    if a.sharens and os.getuid() == 0:
        # Root's container maps every id to itself from outside (process.launch); the
        # holder's namespaces are made for one unprivileged user.
        raise UsageError("--sharens is for unprivileged users", hint="run it as your own user")
    if bad or os.getuid() == 0:
        return None  # by default only; real root keeps its identity-mapped container
    if served:  # the starter entered namespaces of its own already (it did not see a rank)
        log.verbose("note: the starter served the image: not sharing the container")
        return None
    return step


def _fast_lock() -> tuple[int, str] | None:
    """The lock the starter took for this rank (``SIFPY_FAST_LOCK``: ``FD:PATH``, see
    starter_join.c): the other ranks of the job wait on it until this one has the shared
    container up, or gives up sharing. Never the command's."""
    value = config.take("SIFPY_FAST_LOCK")
    if value is None:
        return None
    fd_s, _, path = value.partition(":")
    try:
        fd = int(fd_s)
        os.set_inheritable(fd, False)
    except (ValueError, OSError):
        return None
    return fd, path


def _release(lock: tuple[int, str] | None) -> None:
    """Not sharing: let the waiting ranks go (and start Python, as this one did, all at
    once: the file stays, so that they don't take turns creating it)."""
    if lock is not None:
        os.close(lock[0])


def _joiner(ident: start.Identity) -> Any:
    """For the holder: what a rank the starter sent it would run (``prepare`` of
    :func:`sifpy.runtime.sharens.run_joined`): its argv (sifpy's), environment and cwd
    parsed and planned as this module does; anything the starter must not skip (devices,
    env files, another kind of start) raises, and the rank then starts Python."""

    def prepare(
        args: list[str], environ: dict[str, str], cwd: str, step: str
    ) -> tuple[list[str], list[str], dict[str, str], LaunchSpec]:
        i = 0
        while i < len(args) and args[i] in _GLOBAL_FLAGS:
            i += 1
        action = args[i] if i < len(args) else ""
        a = fast_parse(action, args[i + 1 :]) if action in HELP else None
        if a is None or a.no_sharens or a.image.startswith("instance://"):
            raise UsageError("not a shared start")
        if a.nv or a.rocm or a.device or a.env_file or any(getattr(a, o) for o in _UNSHARED):
            raise UsageError("not a start the starter may do")
        from sifpy.runtime.action import action_argv

        a.image = os.path.join(cwd, a.image)
        command = action_argv(action, ([a.command] if action == "exec" else []) + a.args)
        image = Sandbox(a.image)  # the holder puts its own (checked) image in
        spec = _spec(action, a, ident, image, command, (), a.mount_driver, None, (), environ, cwd)
        home = spec.options.home_dest or spec.options.home or ident.home
        return [spec.cwd, home, "/"], spec.argv, spec.env, spec

    return prepare


def _run_in_instance(
    action: str, a: Any, ident: start.Identity, passed: tuple[int, ...], served: Any
) -> int:
    """``exec|run|shell instance://NAME ...``: join the instance's container."""
    import json

    from sifpy.runtime import sharens
    from sifpy.runtime.action import action_argv

    if served is not None:
        served.stop()
    if a.mpi:  # the binds are made when a container is set up, not when it is joined
        raise UsageError(
            "--mpi can't be used with instance://", hint="start the instance with --mpi"
        )
    name = a.image[len("instance://") :]
    base = sharens.instance_base(name)
    try:
        with open(f"{base}.json", encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError):
        info = None
    if info is None or not sharens.running(base):
        raise UsageError(
            f"can't join instance: {name}: not running", hint="see `sifpy instance list`"
        )
    a.image = info["img"]
    args = ([a.command] if action == "exec" else []) + a.args
    image = Sandbox(info["img"])  # only named: the instance's root is joined
    inject = None
    if info.get("inject"):  # the instance's --nv/--rocm/--device: their variables and PATH
        from sifpy.runtime.gpu import Injection

        inject = Injection()
        inject.env.update(info["inject"]["env"])
        inject.path += info["inject"]["path"]
    spec = _spec(action, a, ident, image, action_argv(action, args), (), "auto", inject, passed)
    sharens.run_joined(spec, ident, base, create=False)


def _run(
    action: str,
    a: Any,  # fast_parse's SimpleNamespace or argparse's Namespace
    ident: start.Identity,
    image: SifPartition | Sandbox,
    served: start.Served | None,
    command: list[str],
    prefetch: tuple[str, ...],
    driver: str,
    inject: Injection | None = None,
    passed: tuple[int, ...] = (),
) -> int:
    """Everything computed while squashfuse starts and reads ahead: the rest of the
    runtime, the environment, the launch."""
    from sifpy.runtime.process import launch

    spec = _spec(action, a, ident, image, command, prefetch, driver, inject, passed)
    return launch(spec, inline=True, served=served)


def _spec(
    action: str,
    a: Any,
    ident: start.Identity,
    image: SifPartition | Sandbox,
    command: list[str],
    prefetch: tuple[str, ...],
    driver: str,
    inject: Injection | None = None,
    passed: tuple[int, ...] = (),
    environ: Mapping[str, str] | None = None,
    workdir: str | None = None,
) -> LaunchSpec:
    """The container to start: its mounts, environment and command; ``environ`` and
    ``workdir``: the caller's (default: this process's)."""
    from sifpy.runtime import env as renv
    from sifpy.runtime.spec import LaunchOptions, LaunchSpec

    if a.containall:
        a.contain = a.cleanenv = a.pid = a.ipc = True
    if a.no_pid:
        a.pid = False
    environ = os.environ if environ is None else environ
    start_timeout = _runscript_timeout(a, environ)
    no_mount = tuple(n.strip() for item in a.no_mount for n in item.split(",") if n.strip())
    # Apptainer's order: the site's `bind path` lines, the options' binds, then
    # $APPTAINER_BIND's.
    bind_specs = config.get_all("SIFPY_BIND", environ)
    from sifpy.sign import policy

    rules = policy.load()
    site_binds = parse_binds([] if "bind-paths" in no_mount else _config_binds(rules))
    binds = parse_binds(a.bind + bind_specs)
    mount_specs = [
        line
        for value in config.get_all("SIFPY_MOUNT", environ)
        for line in value.split("\n")
        if line.strip()
    ]
    mounts = parse_mounts(a.mount + mount_specs)
    # $APPTAINER_BIND in the container: the destinations, for nested containers to bind
    # again (Apptainer's setBinds), less the --mount ones marked nonested.
    nested = [d for _, d, _ in binds] + [d for _, d, _, no_nest in mounts if not no_nest]
    hooks, annotations = _oci_hooks(action, a, command, rules, bool(binds or mounts))
    binds = site_binds + binds + [(s, d, ro) for s, d, ro, _ in mounts]
    home_src = home_dest = None
    if a.home:
        home_src, _, home_dest = a.home.partition(":")
        home_src = os.path.abspath(home_src)
        home_dest = home_dest or home_src
    elif a.fakeroot:
        # Apptainer's setHome: with --fakeroot the caller's home is root's, at /root.
        home_src, home_dest = ident.home, "/root"
    cwd = workdir or os.getcwd()  # the rank's own (the holder plans for ranks)
    env_opts = renv.parse_env_option(a.env)
    runtime = renv.runtime_vars(os.path.abspath(a.image), action, a.app, ",".join(nested))
    if a.shell:
        runtime["SINGULARITY_SHELL"] = runtime["APPTAINER_SHELL"] = a.shell
    injected = renv.injected_env(environ, env_opts)
    if inject is not None:  # the devices' variables and PATH, under the user's own
        injected = {**inject.env, **injected}
        if inject.path:
            mine = ":".join(inject.path)
            user = injected.get("PREPEND_PATH")
            injected["PREPEND_PATH"] = f"{user}:{mine}" if user else mine
    env = renv.process_env(
        host=renv.host_env(environ, a.cleanenv, renv.parse_no_env(a.no_env, environ)),
        injected=injected,
        env_file=_join_env(
            getattr(a, "image_env", None), renv.read_env_files(a.env_file, a.no_eval)
        ),
        late=env_opts,
        no_eval=a.no_eval,
        home=home_dest or ident.home,
        runtime=runtime,
        uid=0 if a.fakeroot else ident.uid,
    )
    launcher: list[tuple[str, str, bool]] = []
    if any(name.startswith("PMIX_") for name in environ):  # the module only where it matters
        from sifpy.runtime.mpi import launcher_binds

        launcher = launcher_binds(environ)
    spec = LaunchSpec(
        image=image,
        argv=command,
        env=env,
        cwd=cwd,
        binds=[*launcher, *binds],  # the user's binds win
        options=LaunchOptions(
            fakeroot=a.fakeroot,
            contain=a.contain,
            pid_ns=a.pid,
            no_init=a.no_init,
            ipc_ns=a.ipc,
            writable=a.writable,
            writable_tmpfs=a.writable_tmpfs,
            overlays=parse_overlays(a.overlay),
            no_mount=no_mount,
            workdir=os.path.abspath(a.workdir) if a.workdir else None,
            mount_driver=driver,
            home=home_src,
            home_dest=home_dest,
            no_home=a.no_home,
            identity=ident,
            prefetch=prefetch,
            inject=inject,
            mpi=_mpi_host(rules) if a.mpi else None,
            pass_fds=passed,
            pwd=a.pwd,
            hooks=hooks,
            annotations=annotations,
            start_timeout=start_timeout,
        ),
    )
    return spec


# hooksd.DEFAULT_DIR, named here so that a start without hooks imports nothing for them
# (tests/cli/test_hooks_cli.py checks that they agree).
_HOOKS_DIR = "/etc/sifpy/hooks.d"
# What a hook's `when.commands` sees as the command of each action (the OCI config's
# process.args[0]): exec's COMMAND, else the Apptainer metadata script the action runs.
_ACTION_COMMAND = {
    "run": "/.singularity.d/runscript",
    "test": "/.singularity.d/test",
    "shell": "/.singularity.d/actions/shell",
    "start": "/.singularity.d/startscript",
}


def _oci_hooks(
    action: str, a: Any, command: list[str], rules: Policy, has_binds: bool
) -> tuple[tuple[dict[str, object], ...], tuple[tuple[str, str], ...]]:
    """The OCI hooks (hooks.d: /etc/sifpy/hooks.d, sifpy.conf's ``hooks dir``s, then
    ``--hooks-dir``) that apply to this start, and its ``--annotation``s. Without any hook
    file this costs one failed (or empty) directory read and no import."""
    annotations = []
    for item in a.annotation:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise UsageError(f"invalid --annotation: {item!r}", hint="use KEY=VALUE")
        annotations.append((key, value))
    conf = [*rules.system.hooks_dirs, *rules.user.hooks_dirs]
    given = [os.path.abspath(d) for d in a.hooks_dir]
    if not conf and not given:
        try:
            if not any(n.endswith(".json") for n in os.listdir(_HOOKS_DIR)):
                return (), tuple(annotations)
        except OSError:  # no such directory (the usual case): no hooks
            return (), tuple(annotations)
    from sifpy.runtime import hooksd

    argv0 = a.command if action == "exec" else _ACTION_COMMAND.get(action, command[0])
    found = hooksd.matching(
        [_HOOKS_DIR, *conf, *given], [argv0], dict(annotations), has_binds, required=given
    )
    return tuple(found), tuple(annotations)

"""``sifpy exec``'s option table (:data:`OPTIONS`), the one source of its two parsers: the
fast one that runs on every start (:func:`fast_parse`, no argparse) and argparse, built only
for ``--help`` and errors (:func:`build_parser`). The compiled starter's table is generated
from it too (:mod:`sifpy.cli.launcher`).
"""

from __future__ import annotations

import sys

from sifpy import TYPE_CHECKING
from sifpy.runtime.start import DRIVERS

if TYPE_CHECKING:
    from types import SimpleNamespace
    from typing import Any

    from sifpy.cli._args import ArgumentParser
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

"""``python -m sifpy.cli.launcher DEST``: write the ``sifpy`` program, faster to start than
the console script pip writes.

``sifpy exec`` starts once per MPI rank. pip's script runs the interpreter with the ``site``
module, which reads the environment's ``.pth`` files and imports a few modules before sifpy
gets control (~1.3 ms of every start). Both programs written here run the same interpreter
with ``-I -S`` (no ``site``, no ``PYTHON*`` variables, no user site directory) and put on
``sys.path`` exactly the directories ``site`` adds for this interpreter now (site-packages,
an editable install's path); they must be rewritten when those change (``make venv`` does).

With a C compiler (``cc``), DEST is the starter (``starter.c``): a small program that, for
``exec``/``run``/``shell``/``test`` of a SIF image, enters the namespaces and starts
squashfuse before it starts Python (see that file). Without one, DEST is a Python script.
``--script`` forces the script.

Where libsquashfuse and libfuse3 can be linked (Debian: libsquashfuse-dev, libfuse3-dev,
pkg-config), sifpy's own FUSE server (``sifpy/runtime/serve/sqfs_serve.c``) is built too:
as the program :data:`SERVER` next to its source, which the Python side runs instead of
squashfuse_ll (:func:`sifpy.runtime.start.server_program`), and linked into the starter,
which then serves from a forked child without exec. Without them, both use squashfuse_ll.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from typing import Any

from sifpy.errors import ToolError
from sifpy.util.proc import PIPE, run

CFLAGS: list[str] = []  # the tests add -Werror
SERVE_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "runtime", "serve")
SERVER = os.path.join(SERVE_DIR, "sifpy-sqfs-serve")
BOOT = "import sys\nsys.path += {paths!r}\nfrom sifpy.cli import entry\nentry()\n"

SCRIPT = """\
#!{python} -IS
# sifpy's launcher, written by `{python} -m sifpy.cli.launcher`: the interpreter without the
# site module, and the package directories site would add (rewrite this after changing them).
{boot}"""


def site_paths(python: str) -> list[str]:
    """The directories the ``site`` module adds to ``python``'s ``sys.path`` (the user's
    site directory included, as for pip's script), in order."""

    def path(*flags: str) -> list[str]:
        code = "import json, sys; print(json.dumps(sys.path))"
        out = run([python, *flags, "-c", code], "ask Python for its path", stdout=PIPE)
        return list(json.loads(out.stdout))

    bare = set(path("-I", "-S"))
    return [p for p in path("-E") if p and p not in bare]


def c_string(text: str) -> str:
    """A C string literal for ``text`` (octal escapes for anything but plain ASCII)."""
    out = []
    for byte in text.encode():
        ch = chr(byte)
        out.append(ch if 0x20 <= byte < 0x7F and ch not in '"\\?' else f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


def _offsets(layout: Any) -> dict[str, int]:
    """Byte offset of each field of a :class:`sifpy.sif.format.Packed` record."""
    import re
    import struct

    items = re.findall(r"\d*[a-zA-Z]", layout.STRUCT.format.lstrip("<"))
    return {
        field: struct.calcsize("<" + "".join(items[:i])) for i, field in enumerate(layout.__slots__)
    }


def starter_config(python: str, boot: str, overrides: dict[str, str] | None = None) -> str:
    """``starter_config.h``: what the starter must agree on with the Python side (the SIF
    layout included: it finds the primary partition itself). ``overrides``: defines a test
    build changes (a shorter deadline)."""
    from sifpy import config
    from sifpy.cli.exec_options import OPTIONS
    from sifpy.runtime import mount, start
    from sifpy.runtime.action import action_argv
    from sifpy.sif import format as F
    from sifpy.sif.image import MAX_DESCRIPTORS

    # Options whose start the starter leaves to Python: it never verifies, unsquashes or
    # runs a sandbox.
    # nvidia-container-cli must run on the host, before the namespaces are entered.
    kinds = {"fakeroot": "OPT_FAKEROOT", "mount_driver": "OPT_DRIVER", "nvccli": "OPT_NO_EARLY"}
    kinds |= dict.fromkeys(("unsquash", "verify", "verify_key", "writable"), "OPT_NO_EARLY")
    # --mpi reads the image's ld.so cache once it is mounted: Python sets the container up.
    kinds["mpi"] = "OPT_NO_EARLY"
    # A shared container is joined, not served (starter_join.c).
    kinds["sharens"] = "OPT_SHARENS"
    rows = []
    for flags, kw in OPTIONS:
        dest = flags[-1].lstrip("-").replace("-", "_")
        takes_value = int(kw.get("action") != "store_true")
        for flag in flags:
            rows.append(f"    {{{c_string(flag)}, {takes_value}, {kinds.get(dest, 'OPT_PLAIN')}}},")
    defines = {
        "SIFPY_PYTHON": c_string(python),
        "SIFPY_BOOT": c_string(boot),
        "SIFPY_SQUASHFUSE": c_string(start.SQUASHFUSE),
        "SIFPY_SINGLE_THREAD": str(int(start.FUSE_SINGLE_THREAD)),
        "SIFPY_SERVER_THREADS": str(start.SERVER_THREADS),
        "SIFPY_SYSTEM_CONFIG": c_string(config.SYSTEM_CONFIG),
        "SIFPY_SYSTEM_DIRS": c_string(":".join(mount.SYSTEM_DIRS)),
        "SIFPY_DEFAULT_PATH": c_string(start.DEFAULT_PATH),
        "SIFPY_ACTION_SHELL": c_string(action_argv("exec", ["true"])[0]),
    }
    # The fields the starter reads, as SIF_<FIELD>_AT: their byte offsets in each record.
    read = {
        F.Header: ("magic", "version", "descriptors_free", "descriptors_total",
                   "descriptors_offset", "descriptors_size", "data_offset", "data_size"),
        F.RawDescriptor: ("used", "id", "offset", "size", "extra"),
        F.PartitionExtra: ("fstype", "parttype"),
    }  # fmt: skip
    for layout, fields in read.items():
        offsets = _offsets(layout)
        defines |= {f"SIF_{name.upper()}_AT": str(offsets[name]) for name in fields}
    defines |= {
        "SIF_HEADER_SIZE": str(F.Header.SIZE),
        "SIF_DESCRIPTOR_SIZE": str(F.RawDescriptor.SIZE),
        "SIF_MAGIC": c_string(F.HDR_MAGIC.decode()),
        "SIF_VERSION": c_string(F.HDR_VERSION.rstrip(b"\0").decode()),
        "SIF_PARTITION": str(int(F.DataType.PARTITION)),
        "SIF_SQUASH": str(int(F.FSType.SQUASH)),
        "SIF_PRIMSYS": str(int(F.PartType.PRIMSYS)),
        "SIF_MAX_DESCRIPTORS": str(MAX_DESCRIPTORS),
    }
    defines |= fast_start_config()
    defines |= overrides or {}
    lines = ["/* Generated by sifpy.cli.launcher; do not edit. */"]
    lines += [f"#define {k} {v}" for k, v in defines.items()]
    lines += ["static const struct option_kind SIFPY_OPTIONS[] = {", *rows, "    {0, 0, 0},", "};"]
    return "\n".join(lines) + "\n"


def _c_list(items: Any) -> str:
    return "{" + ", ".join(c_string(i) if isinstance(i, str) else str(i) for i in items) + "}"


def fast_start_config() -> dict[str, str]:
    """What starter_fast.c (the starter's own start of the common container) takes from
    the Python runtime, so that both paths start the same container."""
    from sifpy import config
    from sifpy.cli.exec_args import RUNSCRIPT_TIMEOUT
    from sifpy.runtime import (
        action,
        assemble,
        env,
        hooksd,
        rootpath,
        seccomp,
        sharens,
        sharens_holder,
        spec,
        supervise,
    )

    start_vars = [n for v in config.VARS.values() if v.start for n in (v.name, *v.also)]
    timeout = supervise.Start(RUNSCRIPT_TIMEOUT, []).error()
    runtime = env.runtime_vars("/image", "exec", None, "")
    return {
        "SIFPY_FAST_ENV_NAMES": _c_list(start_vars),
        # Injected variables, and a PMIx launcher's directories (bound by Python).
        "SIFPY_FAST_ENV_PREFIXES": _c_list([*env.INJECT_PREFIXES, "PMIX_"]),
        "SIFPY_HOOKS_DIR": c_string(hooksd.DEFAULT_DIR),
        "SIFPY_RESERVED": _c_list(sorted(rootpath.RESERVED)),
        "SIFPY_MAX_UNDERLAY_ENTRIES": str(assemble.MAX_UNDERLAY_ENTRIES),
        "SIFPY_SESSION": c_string(spec.SESSION),
        "SIFPY_IMAGE": c_string(spec.IMAGE),
        "SIFPY_FILES": c_string(spec.FILES),
        "SIFPY_ROOT": c_string(spec.ROOT),
        "SIFPY_NEVER_FORWARDED": _c_list(sorted(env.NEVER_FORWARDED)),
        "SIFPY_NOT_FORWARDED_PREFIXES": _c_list(
            [*env.RUNTIME_PREFIXES, *env.INJECT_PREFIXES, "__SIFPY_"]
        ),
        "SIFPY_ENVIRONMENT_SCRIPT": c_string(runtime["APPTAINER_ENVIRONMENT"]),
        "SIFPY_ACTION_SCRIPT": c_string(action.SCRIPT),
        "SIFPY_PAYLOAD_FILTER": _c_list(seccomp.payload_filter(False)),
        "SIFPY_FORWARDED_SIGNALS": _c_list(sorted(int(s) for s in supervise.FORWARDED)),
        "SIFPY_SI_KERNEL": str(supervise.SI_KERNEL),
        "SIFPY_RUNSCRIPT_TIMEOUT": str(int(RUNSCRIPT_TIMEOUT)),
        "SIFPY_RUNSCRIPT_TIMEOUT_TEXT": c_string(supervise._go_duration(RUNSCRIPT_TIMEOUT)),
        "SIFPY_RUNSCRIPT_TIMEOUT_HINT": c_string(timeout.hint or ""),
        "SIFPY_PHASES": "0",  # bench/exec_breakdown's build: 1
        # starter_holder.c: as sifpy.runtime.sharens_holder's
        "SIFPY_HOLDER_NAME": c_string(sharens.HOLDER_NAME),
        "SIFPY_HOLDER_LINGER_MS": str(sharens_holder._LINGER_MS),
        "SIFPY_HOLDER_WAIT_ALL_S": str(int(sharens_holder._WAIT_ALL_S)),
        "SIFPY_JOIN_TIMEOUT": str(int(sharens.TIMEOUT)),
    }


def server_flags() -> list[str] | None:
    """The compiler and linker flags of libsquashfuse_ll and libfuse3 (pkg-config); None
    where either is missing."""
    try:
        done = run(
            ["pkg-config", "--cflags", "--libs", "squashfuse_ll", "fuse3"],
            "ask pkg-config for libsquashfuse_ll and libfuse3",
            stdout=PIPE,
            text=True,
            ok=None,
        )
    except ToolError:  # no pkg-config
        return None
    return [*done.stdout.split(), "-lpthread"] if done.returncode == 0 else None


def write_server(dest: str = SERVER, cc: str | None = None) -> bool:
    """Compile sifpy's FUSE server (``sqfs_serve.c``) to ``dest``; False (and a note on
    stderr) where it can't be built."""
    cc = cc or shutil.which("cc") or shutil.which("gcc")
    flags = server_flags()
    if cc is None or flags is None:
        sys.stderr.write(
            "note: no libsquashfuse-dev/libfuse3-dev: sifpy serves with squashfuse_ll\n"
        )
        return False
    tmp = f"{dest}.tmp{os.getpid()}"
    source = os.path.join(SERVE_DIR, "sqfs_serve.c")
    argv = [cc, "-std=gnu11", "-O2", "-Wall", "-Wextra", *CFLAGS, "-o", tmp, source, *flags]
    done = run(argv, "compile the FUSE server", text=True, ok=None)
    if done.returncode != 0:
        sys.stderr.write(
            f"note: can't compile the FUSE server, using squashfuse_ll:\n{done.stderr}"
        )
        return False
    _replace(tmp, dest)
    return True


def _replace(tmp: str, dest: str) -> None:
    os.chmod(tmp, 0o755)
    os.replace(tmp, dest)


def write(
    dest: str,
    python: str = sys.executable,
    script: bool = False,
    paths: list[str] | None = None,
    serve_inline: bool = True,
    overrides: dict[str, str] | None = None,
) -> str:
    """Write the program to ``dest`` (atomically, mode 0755); return ``"starter"`` or
    ``"script"``: what was written. ``paths``: the package directories (default: those
    ``site`` adds for ``python``). ``serve_inline``: link sifpy's FUSE server into the
    starter where the libraries are there: the starter's own starts serve with it (forked,
    no exec: ~1.5 ms less than exec'ing squashfuse_ll, bench/exec), and so does
    ``SIFPY_FUSE_SERVER=sifpy``; loading libfuse3 and libsquashfuse costs every start of
    the program ~0.5 ms of CPU. Without the libraries, squashfuse_ll serves."""
    if len(python) > 240:  # the kernel reads the first 256 bytes of a #! line
        raise SystemExit(f"can't write a launcher: interpreter path too long: {python}")
    boot = BOOT.format(paths=site_paths(python) if paths is None else paths)
    tmp = f"{dest}.tmp{os.getpid()}"
    cc = None if script else shutil.which("cc") or shutil.which("gcc")
    if cc is not None:
        source = os.path.join(os.path.dirname(__file__), "starter.c")
        # The server linked in: the starter forks it instead of exec'ing squashfuse_ll.
        flags = server_flags() if serve_inline else None
        with tempfile.TemporaryDirectory() as build:
            with open(os.path.join(build, "starter_config.h"), "w", encoding="utf-8") as f:
                f.write(starter_config(python, boot, overrides))
            argv = [cc, "-std=gnu11", "-O2", "-Wall", "-Wextra", *CFLAGS, f"-I{build}"]
            argv += ["-o", tmp, source]
            if flags is not None:
                argv += ["-DSIFPY_SERVE_INLINE", "-DSQFS_SERVE_NO_MAIN", f"-I{SERVE_DIR}"]
                argv += [os.path.join(SERVE_DIR, "sqfs_serve.c"), *flags]
            done = run(argv, "compile the starter", text=True, ok=None)
        if done.returncode == 0:
            _replace(tmp, dest)
            return "starter"
        sys.stderr.write(f"note: can't compile the starter, writing a script:\n{done.stderr}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(SCRIPT.format(python=python, boot=boot))
    _replace(tmp, dest)
    return "script"


if __name__ == "__main__":
    args = sys.argv[1:]
    forced = "--script" in args
    args = [a for a in args if a != "--script"]
    if len(args) != 1 or args[0].startswith("-"):
        sys.exit("usage: python -m sifpy.cli.launcher [--script] DEST")
    if not forced:
        write_server()
    print(f"{args[0]}: {write(args[0], script=forced)}")

"""``sifpy build``: build a SIF (or a sandbox) from a definition file or another image.

Apptainer's flags (cmd/internal/cli/build.go)::

    sifpy build [--sandbox] [--force] [--update] [--notest] [--section S[,S]] [--tmpdir D]
                [--build-arg K=V]... [--build-arg-file F] [--warn-unused-build-args]
                [--fakeroot] [--compression C] [--mksquashfs-args A] [OUT] DEF|SANDBOX|SIF

With one argument, ``sifpy build recipe.def`` writes ``recipe.sif`` in the current directory.

Progress goes to stderr; ``%post`` and ``%test`` output is streamed as it comes.
"""

from __future__ import annotations

import os
from typing import Any

from sifpy import config
from sifpy.cli._args import ArgumentParser, add_registry_options
from sifpy.errors import UsageError


def build_parser(prog: str) -> ArgumentParser:
    p = ArgumentParser(prog=prog, description="Build a SIF image or a sandbox directory.")
    p.add_argument(
        "output",
        metavar="OUT",
        help="the SIF file (or sandbox directory) to write; alone, the definition file or image"
        " to build into NAME.sif in the current directory",
    )
    p.add_argument(
        "source",
        metavar="SOURCE",
        nargs="?",
        help="a definition file, a SIF, a sandbox, or docker://...",
    )
    p.add_argument("-s", "--sandbox", action="store_true", help="write a sandbox directory")
    p.add_argument("-F", "--force", action="store_true", help="overwrite OUT; %%labels win")
    p.add_argument("-u", "--update", action="store_true", help="build into an existing sandbox")
    p.add_argument("-T", "--notest", action="store_true", help="skip %%test")
    p.add_argument(
        "--section",
        action="append",
        default=[],
        metavar="S",
        help="run only these sections (all, none, setup, post, files, environment, test, labels)",
    )
    p.add_argument(
        "--tmpdir",
        metavar="DIR",
        help="where to build a SIF (default: $SIFPY_TMPDIR, $APPTAINER_TMPDIR, $TMPDIR, /tmp)",
    )
    p.add_argument(
        "--no-cleanup", action="store_true", help="keep the work directory of a failed build"
    )
    p.add_argument(
        "--fix-perms", action="store_true", help="give the owner rwX on the base image's files"
    )
    p.add_argument(
        "-B",
        "--bind",
        action="append",
        default=[],
        metavar="SRC[:DEST[:ro|rw]]",
        help="bind a host path during %%post and %%test (repeatable, comma lists)",
    )
    p.add_argument("--nv", action="store_true", help="bind the host's NVIDIA driver in %%post")
    p.add_argument("--nvccli", action="store_true", help="--nv through nvidia-container-cli")
    p.add_argument("--rocm", action="store_true", help="bind the host's ROCm driver in %%post")
    add_registry_options(p)
    p.add_argument("--build-arg", action="append", default=[], metavar="K=V")
    p.add_argument("--build-arg-file", metavar="FILE")
    p.add_argument("--warn-unused-build-args", action="store_true")
    p.add_argument(
        "-f", "--fakeroot", action="store_true", help="root inside (always the case for builds)"
    )
    p.add_argument("--sign", action="store_true", help="sign the new SIF (as 'sifpy sign')")
    p.add_argument("--keyidx", type=int, help="with --sign: the secret key to use")
    p.add_argument("--sign-key", metavar="FILE.pem", help="with --sign: a DSSE private key")
    p.add_argument(
        "--compression",
        default=None,
        metavar="NAME[:LEVEL]",
        help="squashfs compression (default: $SIFPY_COMPRESSION or zstd:3)",
    )
    p.add_argument(
        "--mksquashfs-args",
        default=config.get("APPTAINER_MKSQUASHFS_ARGS") or "",
        metavar="ARGS",
        help="extra mksquashfs arguments, e.g. '-b 1M'",
    )
    return p


def _build_args(pairs: list[str], path: str | None) -> dict[str, str]:
    from sifpy.deffile import read_build_arg_file

    args = read_build_arg_file(path) if path else {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise UsageError(f"invalid --build-arg: {pair!r}", hint="use --build-arg KEY=VALUE")
        args[key] = value  # the last occurrence wins, over the file
    return args


def _binds(specs: list[str]) -> list[tuple[str, str, bool]]:
    if not specs:
        return []
    from sifpy.cli.exec_args import parse_binds  # the same SRC[:DEST[:ro|rw]] as sifpy exec

    return parse_binds(specs)


def default_output(source: str, sandbox: bool) -> str:
    """Where ``sifpy build SOURCE`` writes: NAME.sif in the current directory, NAME being
    the definition file's name without ``.def`` (or a pulled image's Apptainer name)."""
    if "://" in source:
        from sifpy.oci.reference import default_sif_name

        name = default_sif_name(source)
    else:
        base = os.path.basename(os.path.normpath(source))
        stem, ext = os.path.splitext(base)
        name = (stem if ext in (".def", ".sif") and stem else base) + ".sif"
        if name in (".sif", "..sif"):
            raise UsageError(f"can't name the output of {source!r}", hint="give it: OUT SOURCE")
    return name.removesuffix(".sif") if sandbox else name


def main(argv: list[str], prog: str = "sifpy build") -> int:
    """Parse the flags and run the build; errors propagate to :func:`sifpy.cli.main`."""
    a = build_parser(prog).parse_args(argv)
    if a.source is None:  # `sifpy build recipe.def` -> ./recipe.sif
        a.source = a.output
        a.output = default_output(a.source, a.sandbox or a.update)
        if os.path.abspath(a.output) == os.path.abspath(a.source):
            raise UsageError(
                f"can't build {a.source} into itself", hint="name the output: OUT SOURCE"
            )
    from sifpy.build.options import BuildOptions
    from sifpy.build.pipeline import build

    # The bootstrap agents (docker, oras) read their registry settings from the environment,
    # as Apptainer's do (APPTAINER_NOHTTPS): the flags set the same variables.
    if a.insecure:
        config.export("SIFPY_NOHTTPS", "1")
    if a.ca_cert:
        config.export("SIFPY_DOCKER_CA_CERT", os.path.abspath(a.ca_cert))

    sections = frozenset(s.strip() for v in a.section for s in v.split(",") if s.strip())
    opts = BuildOptions(
        sandbox=a.sandbox or a.update,
        force=a.force,
        update=a.update,
        notest=a.notest,
        sections=sections or frozenset({"all"}),
        tmpdir=a.tmpdir,
        fakeroot=a.fakeroot,
        compression=a.compression,
        mksquashfs_args=a.mksquashfs_args,
        build_args=_build_args(a.build_arg, a.build_arg_file),
        warn_unused_build_args=a.warn_unused_build_args,
        no_cleanup=a.no_cleanup,
        fix_perms=a.fix_perms,
        binds=tuple(_binds(a.bind)),
        inject=_gpu(a) if a.nv or a.nvccli or a.rocm else None,
    )
    if a.sign and opts.sandbox:
        raise UsageError("--sign needs a SIF output", hint="sandboxes carry no signatures")
    build(a.output, a.source, opts)
    if a.sign:
        from sifpy.cli import sign

        sign_argv = ["--key", a.sign_key] if a.sign_key else []
        sign_argv += ["--keyidx", str(a.keyidx)] if a.keyidx is not None else []
        return sign.main([*sign_argv, a.output], prog="sifpy sign")
    return 0


def _gpu(a: Any) -> Any:
    """``--nv``/``--nvccli``/``--rocm`` for ``%post`` and ``%test``: what ``sifpy exec``
    binds (the build's container is contained: the device nodes go into its own /dev)."""
    from types import SimpleNamespace

    from sifpy.cli.exec_image import devices

    return devices(
        SimpleNamespace(
            nv=a.nv, nvccli=a.nvccli, rocm=a.rocm, device=[], contain=False, containall=False
        )
    )

"""The whole ``sifpy build``: the recipe loaded, the destination checked, each stage built
in a private work directory, the last one assembled (see :mod:`sifpy.build`)."""

from __future__ import annotations

import os
import time

from sifpy.build.options import SECTIONS, BuildOptions
from sifpy.build.output import assemble_sandbox, assemble_sif
from sifpy.build.sections import StageRun, build_stage
from sifpy.build.workspace import work_parent, workspace
from sifpy.deffile import Recipe, parse, parse_file, write
from sifpy.errors import BuildError, UsageError
from sifpy.rootfs.bootstrap.local import is_sif
from sifpy.util import log


def load_recipe(source: str, opts: BuildOptions) -> Recipe:
    """The recipe for ``source``: a definition file, ``localimage`` for an image, or the
    agent of a URI (``docker://debian:12``), as Apptainer builds them."""
    scheme, sep, rest = source.partition("://")
    if sep and scheme in ("docker", "oras"):
        if opts.build_args and not opts.warn_unused_build_args:
            raise UsageError("--build-arg only applies to definition files")
        return parse(f"Bootstrap: {scheme}\nFrom: {rest}\n", source)
    if sep:
        raise UsageError(
            f"can't build from {source}: unsupported URI",
            hint="use docker://, oras://, a definition file, a SIF or a sandbox",
        )
    if os.path.isdir(source) or is_sif(source):
        if opts.build_args and not opts.warn_unused_build_args:
            raise UsageError("--build-arg only applies to definition files")
        # What Apptainer does for an image source: a localimage definition.
        return parse(f"Bootstrap: localimage\nFrom: {os.path.abspath(source)}\n", source)
    if not os.path.exists(source):
        raise UsageError(f"can't build from {source}: no such file or directory")
    return parse_file(source, opts.build_args, opts.warn_unused_build_args)


def _check_dest(dest: str, opts: BuildOptions) -> None:
    if opts.update:
        if not opts.sandbox:
            raise UsageError("--update only works with --sandbox")
        if os.path.exists(dest) and not os.path.isdir(dest):
            raise UsageError(f"can't update {dest}: not a sandbox directory")
        return
    if os.path.lexists(dest) and not opts.force:
        raise BuildError(f"can't build: {dest} already exists", hint="use --force to overwrite it")
    if os.path.isdir(dest) and not opts.sandbox:
        raise BuildError(f"can't write a SIF over the directory {dest}", hint="remove it first")
    parent = os.path.dirname(os.path.abspath(dest))
    if not os.path.isdir(parent):
        raise BuildError(f"can't build: {parent} is not a directory")


def build(dest: str, source: str, opts: BuildOptions) -> None:
    """Build ``source`` (definition file, SIF or sandbox) into ``dest``."""
    if opts.sandbox is False and opts.update:
        raise UsageError("--update only works with --sandbox")
    if not opts.sections or not opts.sections <= SECTIONS:
        bad = ", ".join(sorted(opts.sections - SECTIONS)) or "(empty)"
        raise UsageError(f"unknown --section: {bad}", hint=f"use {', '.join(sorted(SECTIONS))}")
    from sifpy.squashfs.pack import default_compression, parse_compression

    parse_compression(opts.compression or default_compression())  # fail before building
    recipe = load_recipe(source, opts)
    _check_dest(dest, opts)
    if opts.fakeroot:
        log.verbose("--fakeroot: the build always runs as (emulated) root")
    text = write(recipe)
    started = time.monotonic()
    with workspace(work_parent(dest, opts), opts.no_cleanup) as ws:
        roots: dict[str, str] = {}
        total = len(recipe.stages)
        for i, stage in enumerate(recipe.stages):
            final = i == total - 1
            rootfs = os.path.join(ws.path, f"stage{i}")
            if final and opts.update and os.path.isdir(dest):
                rootfs = dest
            st = StageRun(i, stage, rootfs, total)
            build_stage(st, text, opts, ws, roots)
            if stage.name:
                roots[stage.name] = rootfs
        final_root = st.rootfs
        if opts.update and final_root == dest:
            pass
        elif opts.sandbox:
            assemble_sandbox(final_root, dest, ws)
        else:
            assemble_sif(final_root, dest, text, opts, ws)
    log.info(f"build complete: {dest} ({time.monotonic() - started:.1f}s)")

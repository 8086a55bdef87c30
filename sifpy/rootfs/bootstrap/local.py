"""``Bootstrap: localimage``: start from an existing SIF or sandbox directory.

A SIF's primary squashfs partition is extracted with ``unsquashfs -o <offset>``; a sandbox
is copied with symlinks kept (and owners, as real root). The old definition file
``/.singularity.d/Singularity`` moves to ``/.singularity.d/bootstrap_history/Apptainer<N>``
(N counting from 0), as Apptainer's localimage packer does, so the image keeps its lineage.
``Fingerprints:`` (signature checks) is not supported yet and is refused rather than
ignored.
"""

from __future__ import annotations

import os

from sifpy.errors import BuildError, SifpyError
from sifpy.rootfs._walk import PathError, open_dir
from sifpy.rootfs.bootstrap import Context, Result
from sifpy.rootfs.bootstrap import files as F
from sifpy.util import log

HISTORY = "/.singularity.d/bootstrap_history"


def is_sif(path: str) -> bool:
    """True when ``path`` is a regular file that starts like a SIF."""
    try:
        with open(path, "rb") as f:
            head = f.read(128)
    except OSError:
        return False
    return b"SIF_MAGIC" in head[:64]


def unpack_sif(path: str, rootfs: str) -> None:
    """Extract the primary partition of SIF ``path`` into the existing dir ``rootfs``."""
    from sifpy.sif import SifImage
    from sifpy.sif import format as SF
    from sifpy.squashfs import extract

    try:
        with SifImage.open(path) as img:
            part = img.primary_partition()
            if part.partition().fstype != SF.FSType.SQUASH:
                raise BuildError(f"can't use {path}: its primary partition is not squashfs")
            offset = part.offset
    except SifpyError as exc:
        raise BuildError(f"can't use image {path}: {exc.message}", exc.hint) from exc
    log.info(f"extracting {path}")
    extract(path, rootfs, offset=offset)


def keep_history(rootfs: str) -> None:
    """Move the image's old deffile into ``bootstrap_history`` (Apptainer<N>)."""
    with F.opened_root(rootfs) as rfd:
        old = F.read_file(rfd, "/.singularity.d/Singularity")
        if old is None:
            return
        F.make_dirs(rfd, HISTORY)
        try:
            fd, _ = open_dir(rfd, HISTORY.strip("/").split("/"), create=False)
        except (PathError, OSError) as exc:
            raise BuildError(f"can't keep bootstrap history: {exc}") from exc
        try:
            n = len(os.listdir(fd))
        finally:
            os.close(fd)
        F.write_file(rfd, f"{HISTORY}/Apptainer{n}", old, 0o644)
        F.remove(rfd, "/.singularity.d/Singularity")


def bootstrap(ctx: Context) -> Result:
    """Fill ``ctx.rootfs`` from the SIF or sandbox named by ``From:``."""
    source = ctx.require("from")
    if ctx.stage.get("fingerprints"):
        raise BuildError(
            "can't verify 'Fingerprints:': signature checks at build time are not supported yet",
            hint="remove the Fingerprints: line and verify the base with 'sifpy verify'",
        )
    if os.path.isdir(source):
        log.info(f"copying sandbox {source}")
        F.copy_tree(source, ctx.rootfs, owners=os.geteuid() == 0)
    elif is_sif(source):
        unpack_sif(source, ctx.rootfs)
    else:
        raise BuildError(f"can't use localimage {source}: not a SIF file or a directory")
    keep_history(ctx.rootfs)
    return Result()

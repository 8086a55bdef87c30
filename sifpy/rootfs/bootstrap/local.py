"""``Bootstrap: localimage``: start from an existing SIF or sandbox directory.

A SIF's primary squashfs partition is extracted with ``unsquashfs -o <offset>``; a sandbox
is copied with symlinks kept (and owners, as real root). The old definition file
``/.singularity.d/Singularity`` moves to ``/.singularity.d/bootstrap_history/Apptainer<N>``
(N counting from 0), as Apptainer's localimage packer does, so the image keeps its lineage.
``Fingerprints: FP1, FP2`` (SIF sources only) requires the image to verify, with a
valid signature by every listed key (OpenPGP fingerprints from the sifpy and Apptainer
keyrings, or DSSE key IDs), as Apptainer does. The image is verified and extracted through
one open descriptor, so a file swapped in between is never used.
"""

from __future__ import annotations

import os

from sifpy.errors import BuildError, SifpyError
from sifpy.rootfs.bootstrap import Context, Result
from sifpy.rootfs.bootstrap import files as F
from sifpy.util import log
from sifpy.util.paths import PathError, open_dir

HISTORY = "/.singularity.d/bootstrap_history"


def is_sif(path: str) -> bool:
    """True when ``path`` is a regular file that starts like a SIF."""
    try:
        with open(path, "rb") as f:
            head = f.read(128)
    except OSError:
        return False
    return b"SIF_MAGIC" in head[:64]


def unpack_sif(path: str, rootfs: str, fingerprints: list[str] | None = None) -> None:
    """Extract the primary partition of SIF ``path`` into the existing dir ``rootfs``,
    after checking that every key in ``fingerprints`` signed it."""
    from sifpy.sif import SifImage
    from sifpy.sif import format as SF
    from sifpy.squashfs import extract

    try:
        fd = os.open(path, os.O_RDONLY)  # inheritable: unsquashfs reads /proc/self/fd/N
    except OSError as exc:
        raise BuildError(f"can't use image {path}: {exc.strerror}") from exc
    try:
        try:
            if fingerprints:
                check_fingerprints(fd, path, fingerprints)
            img = SifImage.from_fd(fd, path)
            part = img.primary_partition()
            if part.partition().fstype != SF.FSType.SQUASH:
                raise BuildError(f"can't use {path}: its primary partition is not squashfs")
            offset = part.offset
        except BuildError:
            raise
        except SifpyError as exc:
            raise BuildError(f"can't use image {path}: {exc.message}", exc.hint) from exc
        log.info(f"extracting {path}")
        extract(f"/proc/self/fd/{fd}", rootfs, offset=offset, pass_fds=(fd,))
    finally:
        os.close(fd)


def parse_fingerprints(text: str) -> list[str]:
    """``Fingerprints:`` values: comma or space separated, case and spaces ignored."""
    return [f.strip().upper() for f in text.replace(",", " ").split() if f.strip()]


def check_fingerprints(fd: int, path: str, fingerprints: list[str]) -> None:
    """Raise unless the image verifies and each listed key made a valid signature."""
    from sifpy.sign.verify import TrustedKeys, verify_fd

    try:
        res = verify_fd(fd, TrustedKeys.load(), path=path)
    except SifpyError as exc:
        raise BuildError(
            f"can't bootstrap from {path}: signature verification failed: {exc.message}",
            hint="the base image must be signed by every key in 'Fingerprints:'",
        ) from exc
    signers = {s.upper() for sig in res.signatures for s in sig.signers}
    missing = [f for f in fingerprints if f not in signers]
    if missing:
        raise BuildError(
            f"can't bootstrap from {path}: not signed by {', '.join(missing)}",
            hint="the base image must be signed by every key in 'Fingerprints:'",
        )
    log.info(f"{path}: signed by {', '.join(fingerprints)}")


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
    fingerprints = parse_fingerprints(ctx.stage.get("fingerprints") or "")
    if fingerprints and os.path.isdir(source):
        raise BuildError(
            f"can't verify 'Fingerprints:': {source} is a sandbox, which carries no signatures",
            hint="bootstrap from a signed SIF",
        )
    if os.path.isdir(source):
        log.info(f"copying sandbox {source}")
        F.copy_tree(source, ctx.rootfs, owners=os.geteuid() == 0)
    elif is_sif(source):
        unpack_sif(source, ctx.rootfs, fingerprints)
    else:
        raise BuildError(f"can't use localimage {source}: not a SIF file or a directory")
    keep_history(ctx.rootfs)
    return Result()

"""The finished rootfs of the last stage into place: packed into a SIF, or moved as a
sandbox."""

from __future__ import annotations

import errno
import os

from sifpy.build.options import BuildOptions
from sifpy.build.workspace import Workspace
from sifpy.errors import BuildError
from sifpy.rootfs import metadata
from sifpy.util import log


def assemble_sif(rootfs: str, dest: str, deffile: str, opts: BuildOptions, ws: Workspace) -> None:
    from sifpy.sif import ObjectInput, create
    from sifpy.sif import format as SF
    from sifpy.squashfs import pack

    inspect = metadata.inspect_json(rootfs)
    sqfs = os.path.join(ws.path, "rootfs.sqfs")
    pack(rootfs, sqfs, compression=opts.compression, extra_args=opts.mksquashfs_args)
    arch = metadata.host_arch()
    if arch not in SF.ARCH_CODES:
        arch = "unknown"
    log.info(f"writing {dest}")
    create(
        dest,
        [
            ObjectInput(SF.DataType.DEFFILE, deffile.encode()),
            ObjectInput(SF.DataType.GENERIC_JSON, inspect, name="inspect-metadata.json"),
            ObjectInput.partition(sqfs, SF.FSType.SQUASH, SF.PartType.PRIMSYS, arch),
        ],
        launch_script=SF.DEFAULT_LAUNCH_SCRIPT,
    )


def assemble_sandbox(rootfs: str, dest: str, ws: Workspace) -> None:
    old = None
    if os.path.lexists(dest):
        old = os.path.join(ws.path, "old-sandbox")
        os.rename(dest, old)
    try:
        os.rename(rootfs, dest)
    except OSError as exc:
        if old is not None:
            os.rename(old, dest)
        if exc.errno == errno.EXDEV:
            raise BuildError(f"can't move the sandbox to {dest}: another filesystem") from exc
        raise BuildError(f"can't move the sandbox to {dest}: {exc.strerror}") from exc
    os.chmod(dest, 0o755)

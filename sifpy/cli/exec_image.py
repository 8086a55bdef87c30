"""What ``sifpy exec`` runs in: the image opened once (a SIF's partition, checked against
the run policy, or a sandbox directory), an OCI-SIF's config, and the devices
(``--nv``, ``--rocm``, ``--device``) injected into it.
"""

from __future__ import annotations

import os
import stat

from sifpy import TYPE_CHECKING, config
from sifpy.errors import ImageError
from sifpy.runtime.start import Sandbox, SifPartition
from sifpy.util import log

if TYPE_CHECKING:
    from typing import Any

    from sifpy.runtime.gpu import Injection


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
                if oci_config is not None:  # what the image runs (see oci_image_config)
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


def oci_image_config(
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


def join_env(image: str | None, user: str | None) -> str | None:
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

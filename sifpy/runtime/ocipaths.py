"""An OCI bundle's ``linux.maskedPaths`` and ``linux.readonlyPaths``, applied inside the
container's own mount namespace once its root is entered, as runc applies them
(https://github.com/opencontainers/runc/blob/main/libcontainer/rootfs_linux.go,
``maskPaths`` and ``readonlyPath``): a masked file gets ``/dev/null`` bound over it, a
masked directory an empty read-only tmpfs; a read-only path is bound on itself and remounted
read-only. A path that does not exist is skipped, as runc skips it.

All of this is allowed in the container's user namespace: the mount namespace is its own.
Masking still matters without privilege: /proc/kcore or /proc/timer_list are unreadable to
the user anyway, but /proc/keys, /proc/asound or /sys/firmware are not.
"""

from __future__ import annotations

import os
import stat

from sifpy.errors import RuntimeSetupError
from sifpy.runtime import mount, ns


def mask(paths: tuple[str, ...]) -> None:
    """Hide each of ``paths`` (absolute, in the current root)."""
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:  # absent (or unreachable, which hides it already)
            continue
        if stat.S_ISDIR(st.st_mode):
            flags = ns.MS_RDONLY | ns.MS_NOSUID | ns.MS_NODEV | ns.MS_NOEXEC
            ns.mount("tmpfs", path, "tmpfs", flags, "mode=0755,size=0", f"masked path {path}")
        else:
            if not os.path.exists("/dev/null"):
                raise RuntimeSetupError(
                    f"can't mask: {path}: the container has no /dev/null",
                    "mount /dev in config.json, or remove the path from linux.maskedPaths",
                )
            ns.mount("/dev/null", path, None, ns.MS_BIND, what=f"masked path {path}")


def make_readonly(paths: tuple[str, ...]) -> None:
    """Make each of ``paths`` (absolute, in the current root) read-only."""
    for path in paths:
        if not os.path.lexists(path):
            continue
        mount.bind(path, path, readonly=True, what=f"read-only path {path}")

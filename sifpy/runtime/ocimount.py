"""``sifpy oci mount IMG.sif BUNDLE``: a bundle whose root file system is the image, as
Apptainer's ``oci mount``; ``sifpy oci umount BUNDLE`` undoes it.

The image's squashfs is served by ``squashfuse_ll`` on ``BUNDLE/rootfs`` in the caller's
own mount namespace (an unprivileged FUSE mount goes through the setuid ``fusermount3``), so
any OCI runtime can use the bundle, runc included; the server stays until ``umount``. A
``config.json`` is written unless the bundle has one: a rootless configuration that runs the
image's runscript (as 0 in the container, the caller outside, as runc's rootless spec).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time

from sifpy.errors import RuntimeSetupError, ToolError
from sifpy.util.proc import run as run_program

# Marks a config.json written by mount_image, which unmount_image removes (a user's own stays).
MARK = "org.sifpy.oci.mount"


def mount_image(image: str, offset: int, bundle: str) -> str:
    """Serve ``image`` (its squashfs at ``offset``) on ``bundle/rootfs``; return the bundle."""
    bundle = os.path.abspath(bundle)
    rootfs = os.path.join(bundle, "rootfs")
    try:
        os.makedirs(rootfs, 0o755, exist_ok=True)
        busy = os.path.ismount(rootfs) or bool(os.listdir(rootfs))
    except OSError as exc:
        raise RuntimeSetupError(f"can't create bundle: {rootfs}: {exc.strerror}") from exc
    if busy:
        raise RuntimeSetupError(
            f"can't mount image: {rootfs}: not an empty directory",
            f"run 'sifpy oci umount {bundle}' first, or give another bundle",
        )
    program = shutil.which("squashfuse_ll") or shutil.which("squashfuse")
    if program is None:
        raise ToolError(
            "can't mount image: squashfuse_ll: not found", "install squashfuse (Debian: squashfuse)"
        )
    run_program(
        [program, "-o", f"offset={offset}", os.path.abspath(image), rootfs],
        f"mount {image} on {rootfs}",
        error=RuntimeSetupError,
        hint="an unprivileged FUSE mount needs /dev/fuse (mode 0666) and fusermount3",
    )
    config = os.path.join(bundle, "config.json")
    if not os.path.exists(config):
        runscript = os.path.join(rootfs, ".singularity.d", "runscript")
        args = ["/.singularity.d/runscript"] if os.path.exists(runscript) else ["/bin/sh"]
        with open(config, "w", encoding="utf-8") as f:
            json.dump(default_config(args, image), f, indent=2)
    return bundle


def unmount_image(bundle: str) -> None:
    """Unmount ``bundle/rootfs`` (its server then exits); remove what :func:`mount_image` made."""
    bundle = os.path.abspath(bundle)
    rootfs = os.path.join(bundle, "rootfs")
    if not os.path.ismount(rootfs):
        raise RuntimeSetupError(f"can't unmount: {rootfs}: not mounted")
    tool = shutil.which("fusermount3") or shutil.which("fusermount") or "fusermount3"
    run_program([tool, "-u", rootfs], f"unmount {rootfs}", error=RuntimeSetupError)
    for _ in range(100):  # fusermount returns before the kernel lets go of busy inodes
        if not os.path.ismount(rootfs):
            break
        time.sleep(0.01)
    config = os.path.join(bundle, "config.json")
    try:
        with open(config, encoding="utf-8") as f:
            ours = MARK in (json.load(f).get("annotations") or {})
    except (OSError, ValueError):
        ours = False
    if ours:
        os.unlink(config)
    with contextlib.suppress(OSError):
        os.rmdir(rootfs)


def default_config(args: list[str], image: str) -> dict[str, object]:
    """A rootless runtime-spec 1.0 configuration, as ``runc spec --rootless`` writes it: the
    caller's ids mapped to 0 (runc requires a mapping of 0), new pid, ipc and uts
    namespaces, the kernel file systems a container expects, a read-only root."""
    uid, gid = os.getuid(), os.getgid()
    nosuid = ["nosuid", "noexec", "nodev"]
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "cwd": "/",
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "sifpy",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {
                "destination": "/dev",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
            },
            {
                "destination": "/dev/pts",
                "type": "devpts",
                "source": "devpts",
                "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
            },
            {
                "destination": "/dev/shm",
                "type": "tmpfs",
                "source": "shm",
                "options": [*nosuid, "mode=1777", "size=65536k"],
            },
            {
                "destination": "/sys",
                "type": "none",
                "source": "/sys",
                "options": ["rbind", *nosuid, "ro"],
            },
            {
                "destination": "/tmp",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "nodev", "mode=1777"],
            },
        ],
        "linux": {
            "uidMappings": [{"containerID": 0, "hostID": uid, "size": 1}],
            "gidMappings": [{"containerID": 0, "hostID": gid, "size": 1}],
            "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "user")],
        },
        "annotations": {MARK: os.path.abspath(image)},
    }


def show_bundle(fd: int, bundle: str, session: str, taken: set[str]) -> None:
    """Bind the bundle (pinned as ``fd``) at its own path inside the runtime's ``session``
    tmpfs when that tmpfs covers it (a bundle under /tmp): the hooks read ``config.json``
    at the path their state gives, and run before the container's root is entered, where
    the session covers /tmp. ``taken``: the session's own entries, never replaced (a
    bundle named like one stays hidden)."""
    from sifpy.runtime import mount

    rel = os.path.relpath(bundle, session)
    if rel.startswith("..") or rel == "." or rel.split(os.sep, 1)[0] in taken:
        return
    target = os.path.join(session, rel)
    os.makedirs(target, 0o700, exist_ok=True)
    mount.bind(mount.fd_path(fd), target, what="bundle")

"""Overlay images: an ext3 file system holding ``upper/`` and ``work/``, the layout
Apptainer's ``overlay create`` writes (apptainer ``cmd/internal/cli/overlay_create.go``),
so images made by either tool serve both."""

from __future__ import annotations

import os
import shutil
import tempfile

from sifpy.errors import ImageError, ToolError, UsageError
from sifpy.util.proc import run

SIZE_DEFAULT_MIB = 64
SIZE_MIN_MIB = 1  # mke2fs wants a few dozen blocks


def create(path: str, size_mib: int, sparse: bool = False, dirs: tuple[str, ...] = ()) -> None:
    """Write an ext3 overlay image of ``size_mib`` MiB at ``path`` (which must not exist),
    owned by the caller, with ``upper/`` (plus ``dirs`` inside it) and ``work/``."""
    if size_mib < SIZE_MIN_MIB:
        raise UsageError(f"invalid overlay size: {size_mib} MiB", hint="use --size 64 or more")
    mkfs = shutil.which("mkfs.ext3") or shutil.which("mkfs.ext3", path="/usr/sbin:/sbin")
    if mkfs is None:
        raise ToolError("can't create overlay: mkfs.ext3 not found", hint="install e2fsprogs")
    for d in dirs:
        if not d.startswith("/") or ".." in d.split("/"):
            raise UsageError(f"invalid --create-dir: {d!r}", hint="use an absolute path")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise ImageError(f"can't create overlay: {path}: {exc.strerror}") from exc
    done = False
    try:
        try:
            if sparse:
                os.ftruncate(fd, size_mib << 20)
            else:  # the blocks exist up front: a full disk shows now, not mid-run
                os.posix_fallocate(fd, 0, size_mib << 20)
        except OSError as exc:
            raise ImageError(f"can't create overlay: {path}: {exc.strerror}") from exc
        finally:
            os.close(fd)
        with tempfile.TemporaryDirectory(prefix="sifpy-overlay-") as tree:
            os.mkdir(os.path.join(tree, "upper"), 0o755)
            os.mkdir(os.path.join(tree, "work"), 0o700)
            for d in dirs:
                os.makedirs(os.path.join(tree, "upper", d.lstrip("/")), 0o755, exist_ok=True)
            argv = [mkfs, "-q", "-F", "-d", tree, "-E",
                    f"root_owner={os.getuid()}:{os.getgid()}", path]  # fmt: skip
            proc = run(argv, "create overlay", text=True, ok=None)
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
            raise ToolError(f"can't create overlay: {path}: mkfs.ext3: {tail[0]}")
        done = True
    finally:
        if not done:
            os.unlink(path)

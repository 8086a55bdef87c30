"""Writing into a root filesystem that may hold hostile symlinks: files, copies, trees.

A rootfs under construction is untrusted: an image layer or a ``%post`` script can plant
``/.singularity.d -> /home/me`` or ``/opt/x -> /etc``. Everything here therefore works on
directory descriptors: parents are resolved inside the root with chroot semantics by
:func:`sifpy.util.paths.open_dir`, leaves are opened ``O_NOFOLLOW`` and created
``O_EXCL``, so no write ever lands outside the root (Apptainer resolves ``%files``
destinations with securejoin for the same reason).

``%files`` copies follow Apptainer's ``cp -fLr SRC DST`` (internal/pkg/build/files/copy.go):
host sources are dereferenced; a copy from an earlier stage keeps symlinks and resolves
its source inside that stage's root.
"""

from __future__ import annotations

import contextlib
import glob
import os
import stat
from collections.abc import Iterator

from sifpy.errors import BuildError
from sifpy.util import log
from sifpy.util.paths import PathError, lstat_at, open_dir

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def _parts(path: str) -> list[str]:
    return [p for p in path.split("/") if p not in ("", ".")]


@contextlib.contextmanager
def opened_root(root: str | os.PathLike[str]) -> Iterator[int]:
    """A descriptor of the directory ``root`` (closed on exit)."""
    fd = os.open(root, _DIR)
    try:
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def parent_of(root_fd: int, path: str, *, create: bool = True) -> Iterator[tuple[int, str]]:
    """``(dir_fd, name)`` for ``path`` inside the root; parents made when ``create``."""
    parts = _parts(path)
    if not parts:
        raise BuildError(f"can't write {path!r}: that is the image root")
    try:
        fd, _ = open_dir(root_fd, parts[:-1], create=create)
    except (PathError, OSError) as exc:
        raise BuildError(f"can't resolve {path} in the image: {exc}") from exc
    try:
        yield fd, parts[-1]
    finally:
        os.close(fd)


def _clear(dir_fd: int, name: str, for_dir: bool) -> bool:
    """Remove a non-directory in the way; True if a real directory is already there."""
    st = lstat_at(dir_fd, name)
    if st is None:
        return False
    if stat.S_ISDIR(st.st_mode):
        if not for_dir:
            raise BuildError(f"can't overwrite directory {name!r} with a file")
        return True
    os.unlink(name, dir_fd=dir_fd)
    return False


def write_file(root_fd: int, path: str, data: str | bytes, mode: int = 0o644) -> None:
    """Create or replace the file ``path`` in the root with ``data`` and ``mode``."""
    raw = data.encode() if isinstance(data, str) else data
    with parent_of(root_fd, path) as (dfd, name):
        _clear(dfd, name, for_dir=False)
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode, dir_fd=dfd)
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            os.fchmod(f.fileno(), mode)


def append_file(root_fd: int, path: str, data: str, mode: int = 0o755) -> None:
    """Append to the regular file ``path`` (created if missing; a symlink is replaced)."""
    old = read_file(root_fd, path)
    write_file(root_fd, path, (old or "") + data, mode)


def read_file(root_fd: int, path: str, limit: int = 64 << 20) -> str | None:
    """The text of regular file ``path`` in the root; None if missing or not a plain file."""
    try:
        with parent_of(root_fd, path, create=False) as (dfd, name):
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    except (BuildError, OSError):
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None
        return f.read(limit).decode(errors="replace")


def remove(root_fd: int, path: str) -> None:
    """Remove the non-directory ``path`` from the root if it is there."""
    with (
        contextlib.suppress(BuildError, OSError),
        parent_of(root_fd, path, create=False) as (
            dfd,
            name,
        ),
    ):
        os.unlink(name, dir_fd=dfd)


def make_dirs(root_fd: int, path: str, mode: int = 0o755) -> None:
    """Create directory ``path`` and its parents inside the root."""
    try:
        fd, _ = open_dir(root_fd, _parts(path), create=True)
    except (PathError, OSError) as exc:
        raise BuildError(f"can't create {path} in the image: {exc}") from exc
    os.close(fd)


def symlink(root_fd: int, path: str, target: str) -> None:
    """Create or replace the symlink ``path`` -> ``target`` (a directory is left alone)."""
    with parent_of(root_fd, path) as (dfd, name):
        if _clear(dfd, name, for_dir=True):
            return
        os.symlink(target, name, dir_fd=dfd)


# --- copies ------------------------------------------------------------------------------


def _copy_data(src_fd: int, dst_fd: int) -> None:
    while True:
        try:
            n = os.copy_file_range(src_fd, dst_fd, 1 << 30)
        except OSError:
            n = -1
        if n == 0:
            return
        if n < 0:
            break
    while chunk := os.read(src_fd, 1 << 20):
        os.write(dst_fd, chunk)


def copy_entry(
    src_dir: int, src_name: str, dst_dir: int, dst_name: str, *, follow: bool, owners: bool
) -> None:
    """Copy one entry (recursively for a directory) between two directory descriptors.

    ``follow`` dereferences symlinks in the source (host copies, ``cp -L``); ``owners``
    keeps uid/gid (real root copying an image). Special files are skipped with a warning.
    """
    st = os.stat(src_name, dir_fd=src_dir, follow_symlinks=follow)
    mode = stat.S_IMODE(st.st_mode) if owners else stat.S_IMODE(st.st_mode) & 0o1777
    if stat.S_ISDIR(st.st_mode):
        if not _clear(dst_dir, dst_name, for_dir=True):
            os.mkdir(dst_name, 0o700, dir_fd=dst_dir)
        sfd = os.open(src_name, _DIR | (0 if follow else os.O_NOFOLLOW), dir_fd=src_dir)
        dfd = os.open(dst_name, _DIR | os.O_NOFOLLOW, dir_fd=dst_dir)
        try:
            for entry in sorted(os.listdir(sfd)):
                copy_entry(sfd, entry, dfd, entry, follow=follow, owners=owners)
            if owners:
                os.fchown(dfd, st.st_uid, st.st_gid)
            os.fchmod(dfd, mode | 0o700 if not owners else mode)
        finally:
            os.close(sfd)
            os.close(dfd)
    elif stat.S_ISREG(st.st_mode):
        _clear(dst_dir, dst_name, for_dir=False)
        sfd = os.open(src_name, os.O_RDONLY | (0 if follow else os.O_NOFOLLOW), dir_fd=src_dir)
        try:
            dfd = os.open(
                dst_name,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                0o600,
                dir_fd=dst_dir,
            )
            try:
                _copy_data(sfd, dfd)
                if owners:
                    os.fchown(dfd, st.st_uid, st.st_gid)
                os.fchmod(dfd, mode)
            finally:
                os.close(dfd)
        finally:
            os.close(sfd)
    elif stat.S_ISLNK(st.st_mode):
        _clear(dst_dir, dst_name, for_dir=False)
        os.symlink(os.readlink(src_name, dir_fd=src_dir), dst_name, dir_fd=dst_dir)
        if owners:
            os.chown(dst_name, st.st_uid, st.st_gid, dir_fd=dst_dir, follow_symlinks=False)
    else:
        log.warn(f"not copying special file {src_name!r}")


def copy_tree(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, owners: bool) -> None:
    """Copy the contents of directory ``src`` into the existing directory ``dst``."""
    with opened_root(src) as sfd, opened_root(dst) as dfd:
        for entry in sorted(os.listdir(sfd)):
            copy_entry(sfd, entry, dfd, entry, follow=False, owners=owners)


def _matches(pattern: str, base: str | None) -> list[str]:
    """Expand ``pattern`` (a glob, as Apptainer's shell expansion does) to paths."""
    if not glob.has_magic(pattern):
        return [pattern]
    if base is None:
        return sorted(glob.glob(pattern, recursive=True))
    rel = pattern.lstrip("/")
    return ["/" + m for m in sorted(glob.glob(rel, root_dir=base, recursive=True))]


def copy_in(
    root_fd: int,
    src: str,
    dst: str,
    *,
    from_root: str | None = None,
    dst_base: str = "/",
    line: str = "",
) -> None:
    """One ``%files`` line: copy ``src`` to ``dst`` inside the root ``root_fd``.

    With ``from_root`` (``%files from <stage>``) the source is resolved inside that
    directory and symlinks are kept; otherwise it is a host path (relative to the current
    directory) and symlinks are followed. A relative ``dst`` is taken under ``dst_base``
    (an app's root for ``%appfiles``). As ``cp``: into ``dst`` when it is a directory (or
    ends in ``/``), else to ``dst``; missing parents are created.
    """
    what = line or f"{src} {dst}"
    sources = _matches(src, from_root)
    if not sources:
        raise BuildError(f"can't copy %files: {what}: no match for {src}")
    dst_path = dst if dst.startswith("/") else os.path.join(dst_base, dst)
    into = dst.endswith("/") or len(sources) > 1
    if into:
        make_dirs(root_fd, dst_path)
    else:
        try:
            fd, _ = open_dir(root_fd, _parts(dst_path), create=False)
            os.close(fd)
            into = True
        except (PathError, OSError):
            pass
    for one in sources:
        try:
            if from_root is None:
                spath = os.path.abspath(one)
                sdir = os.open(os.path.dirname(spath), _DIR)
                sname = os.path.basename(spath)
            else:
                sparts = _parts(one)
                if not sparts:
                    raise BuildError(f"can't copy %files: {what}: source is the stage root")
                with opened_root(from_root) as sroot:
                    sdir, _ = open_dir(sroot, sparts[:-1], create=False)
                sname = sparts[-1]
            try:
                target = os.path.join(dst_path, sname) if into else dst_path
                with parent_of(root_fd, target) as (ddir, dname):
                    copy_entry(sdir, sname, ddir, dname, follow=from_root is None, owners=False)
            finally:
                os.close(sdir)
        except (PathError, OSError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise BuildError(f"can't copy %files: {what}: {one}: {reason}") from exc

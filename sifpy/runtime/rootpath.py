"""Paths inside the container's root, resolved by the runtime itself, one component at a
time with ``O_PATH`` fds (never by the kernel's lookup through the image's symlinks): where
a bind or a generated file lands, the mount points it needs, and which mount a directory is
on. The image is hostile input: its symlinks are followed as if the root were ``/``.
"""

from __future__ import annotations

import errno
import os
import stat

from sifpy.errors import RuntimeSetupError

# Linux follows at most 40 symlinks in one lookup (fs/namei.c MAXSYMLINKS); so do we.
_MAX_SYMLINKS = 40

# Top-level names the runtime always provides itself: the image's own entries (which may be
# symlinks in a hostile image) are never used for them (runc refuses symlinked /proc too).
RESERVED = frozenset({"proc", "sys", "dev", "tmp"})

_O_PATH_DIR = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def mount_id(fd: int) -> int:
    """The id of the mount an open file lives on (``mnt_id`` in ``/proc/self/fdinfo``, 3.15+).

    Unlike ``st_dev`` it tells two binds of the same file system apart, so a host directory
    bound into the container is never mistaken for the container's own tmpfs.
    """
    with open(f"/proc/self/fdinfo/{fd}", "rb") as f:
        for line in f:
            if line.startswith(b"mnt_id:"):
                return int(line.split()[1])
    raise RuntimeSetupError(f"can't read: mount id of fd {fd}: no mnt_id in fdinfo")


class Resolved:
    """The outcome of :func:`resolve`: where a path lands inside a root."""

    def __init__(self, parent_fd: int, name: str, parts: list[str], missing: list[str]) -> None:
        self.parent_fd = parent_fd  # O_PATH fd of the directory holding the final entry
        self.name = name  # the final entry ("" for the root itself)
        self.parts = parts  # canonical components of what exists
        self.missing = missing  # components that do not exist (probe mode only)

    def close(self) -> None:
        """Close the parent directory's fd."""
        os.close(self.parent_fd)


def resolve(
    root_fd: int,
    path: str,
    create: str | None = None,
    writable_mounts: frozenset[int] = frozenset(),
    reserved_stop: bool = False,
    follow_last: bool = True,
    host_mounts: frozenset[int] = frozenset(),
) -> Resolved:
    """Resolve ``path`` inside the directory ``root_fd`` as if it were ``/``.

    ``create`` is None (probe: stop at the first missing component and report the rest in
    ``missing``), ``"dir"`` or ``"file"`` (create missing components; the last one as that
    type; only in directories on a mount whose id is in ``writable_mounts``). With
    ``reserved_stop``, a top-level name in :data:`RESERVED` ends the walk (it is not taken from
    the image). With ``follow_last`` false, a symlink as the final component is the result
    itself (``name``), not followed: the entry, whatever it points to. Creating is also
    allowed in directories on a mount in ``host_mounts`` (host directories bound in), but
    only on a path that followed no symlink: an image's link must never make the runtime
    write on the host.
    """
    todo = [p for p in path.split("/") if p not in ("", ".")]
    stack = [os.dup(root_fd)]
    parts: list[str] = []
    hops = 0
    try:
        while todo:
            comp = todo.pop(0)
            if comp == "..":  # never above the root
                if len(stack) > 1:
                    os.close(stack.pop())
                    parts.pop()
                continue
            cur = stack[-1]
            if reserved_stop and not parts and comp in RESERVED:
                return Resolved(os.dup(cur), comp, [comp], todo)
            try:
                st = os.stat(comp, dir_fd=cur, follow_symlinks=False)
            except FileNotFoundError:
                if create is None:
                    return Resolved(os.dup(cur), comp, parts, [comp, *todo])
                mid = mount_id(cur)
                if mid not in writable_mounts and (mid not in host_mounts or hops):
                    where = "/" + "/".join(parts)
                    raise RuntimeSetupError(
                        f"can't create mount point: {path}: {comp} is missing in {where}, "
                        "which is read-only or not the container's own"
                    ) from None
                try:
                    if not todo and create == "file":
                        flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
                        os.close(os.open(comp, flags, 0o644, dir_fd=cur))
                    else:
                        os.mkdir(comp, 0o755, dir_fd=cur)
                except OSError as exc:  # in a host directory: the user's permissions apply
                    where = "/" + "/".join(parts)
                    raise RuntimeSetupError(
                        f"can't create mount point: {path}: {comp} in {where}: {exc.strerror}"
                    ) from exc
                st = os.stat(comp, dir_fd=cur, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode) and (todo or follow_last):
                hops += 1
                if hops > _MAX_SYMLINKS:
                    raise RuntimeSetupError(f"can't resolve: {path}: {os.strerror(errno.ELOOP)}")
                target = os.readlink(comp, dir_fd=cur)
                if target.startswith("/"):  # re-root an absolute target
                    while len(stack) > 1:
                        os.close(stack.pop())
                    parts.clear()
                todo[:0] = [p for p in target.split("/") if p not in ("", ".")]
                continue
            if not todo:
                return Resolved(os.dup(cur), comp, [*parts, comp], [])
            if not stat.S_ISDIR(st.st_mode):
                raise RuntimeSetupError(
                    f"can't resolve: {path}: {comp}: {os.strerror(errno.ENOTDIR)}"
                )
            stack.append(os.open(comp, _O_PATH_DIR, dir_fd=cur))
            parts.append(comp)
        return Resolved(os.dup(stack[-1]), "", parts, [])
    finally:
        for fd in stack:
            os.close(fd)


def open_in_root(root_fd: int, path: str) -> int | None:
    """Open a regular file of the image for reading, resolved inside the root; None if absent
    or not a regular file. O_NONBLOCK: an image's FIFO in its place must not hang us (the flag
    changes nothing for a regular file)."""
    res = resolve(root_fd, path)
    try:
        if res.missing or not res.name:
            return None
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        fd = os.open(res.name, flags, dir_fd=res.parent_fd)
    except OSError:
        return None
    finally:
        res.close()
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd


def expansions(
    image_fd: int, dests: list[str], nofollow: tuple[str, ...] = ()
) -> set[tuple[str, ...]]:
    """The image directories the underlay must expand so that every destination can be
    created: the existing ancestors of each destination that is missing in the image, and
    of each ``nofollow`` destination that is a symlink there (it will be replaced)."""
    out: set[tuple[str, ...]] = set()
    for dest in dests:
        res = resolve(image_fd, dest, reserved_stop=True)
        res.close()
        if res.missing and not (res.parts and res.parts[0] in RESERVED):
            for i in range(1, len(res.parts) + 1):
                out.add(tuple(res.parts[:i]))
    for dest in nofollow:
        res = resolve(image_fd, dest, reserved_stop=True, follow_last=False)
        try:
            if res.missing or not res.name or res.parts[0] in RESERVED:
                continue
            st = os.stat(res.name, dir_fd=res.parent_fd, follow_symlinks=False)
        finally:
            res.close()
        if stat.S_ISLNK(st.st_mode):
            for i in range(1, len(res.parts)):
                out.add(tuple(res.parts[:i]))
    return out

"""Resolve paths inside a root directory with file descriptors only (openat style).

Every component is opened with ``O_NOFOLLOW | O_DIRECTORY`` relative to the descriptor
of its parent, so the kernel never follows a symlink for us. When a component is a
symlink we read its target and resolve it ourselves with chroot semantics: an absolute
target restarts at the root, and ``..`` pops our own stack of open directories and
stops at the root. The kernel is never asked to resolve ``..`` either, so even a
directory moved out of the tree mid-walk cannot lead outside. This is the fd-based
answer to the "resolve, then use" races of CVE-2018-15664 and CVE-2026-42306.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence

# The kernel's own limit on symlinks followed in one lookup (fs/namei.c MAXSYMLINKS);
# a longer chain is the CVE-2025-4517 class of attack, not a real image.
MAX_SYMLINKS = 40

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class PathError(Exception):
    """A path can't be resolved inside the root (not a directory, symlink loop)."""


def open_dir(root_fd: int, parts: Sequence[str], *, create: bool) -> tuple[int, tuple[str, ...]]:
    """Open the directory at ``parts`` below ``root_fd``, never leaving the root.

    Returns a new descriptor (the caller closes it) and the real path of the directory
    as components below the root, with every symlink resolved. Missing directories are
    made (mode 0755, as Docker does for parents a layer does not list) when ``create``
    is true; otherwise :class:`FileNotFoundError` comes out.
    """
    # stack[i] is (fd, name) of the i-th directory on the real path; stack[0] is the root.
    stack: list[tuple[int, str]] = [(os.dup(root_fd), "")]
    todo = list(reversed(parts))
    followed = 0
    try:
        while todo:
            comp = todo.pop()
            if comp in ("", "."):
                continue
            if comp == "..":
                # chroot semantics: '..' of the root is the root.
                if len(stack) > 1:
                    os.close(stack.pop()[0])
                continue
            cur = stack[-1][0]
            try:
                fd = os.open(comp, _DIR_FLAGS, dir_fd=cur)
            except FileNotFoundError:
                if not create:
                    raise
                os.mkdir(comp, 0o755, dir_fd=cur)
                fd = os.open(comp, _DIR_FLAGS, dir_fd=cur)
            except OSError as exc:
                # O_NOFOLLOW gives ELOOP on a symlink, O_DIRECTORY gives ENOTDIR on a file.
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                mode = os.stat(comp, dir_fd=cur, follow_symlinks=False).st_mode
                if not stat.S_ISLNK(mode):
                    raise PathError(f"{comp}: not a directory") from exc
                followed += 1
                if followed > MAX_SYMLINKS:
                    raise PathError("too many levels of symbolic links") from exc
                target = os.readlink(comp, dir_fd=cur)
                if target.startswith("/"):
                    while len(stack) > 1:
                        os.close(stack.pop()[0])
                todo.extend(reversed(target.split("/")))
                continue
            stack.append((fd, comp))
        real = tuple(name for _, name in stack[1:])
        top = stack.pop()[0]
    finally:
        for fd, _ in stack:
            os.close(fd)
    return top, real


def lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    """``lstat`` of ``name`` in ``dir_fd``, or None when it does not exist."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None

"""Read ahead (``LaunchOptions.prefetch``, with a FUSE server): the files the container is
about to execute, into the page cache, in a background thread while it is assembled.
"""

from __future__ import annotations

import os

from sifpy.runtime.rootpath import open_in_root

PREFETCH_MAX = 16 << 20  # bytes read ahead per file


def prefetch(root_fd: int, names: tuple[str, ...], search: str) -> None:
    """Read, in a background thread, the files the container is about to execute.

    A FUSE mount starts with an empty page cache, and ``execve`` then faults the program in
    page by page, one FUSE round trip (and squashfs block) at a time: ~8 ms for a 2 MB
    busybox, several times what a sequential read of the same file costs. Reading it here,
    while the container is still being assembled, fills the cache on the other CPU.
    ``root_fd``: the image's root (an ``O_PATH`` fd that the thread takes over and closes);
    ``names`` are image paths, or command names looked up in ``search`` (a PATH); every
    lookup stays inside the image (:func:`open_in_root`). Best effort: errors are ignored.
    """
    # Not threading: it adds ~2.1 ms to exec's imports (python -X importtime -I -S, 2-CPU
    # Xeon), for one fire-and-forget thread that nobody joins.
    import _thread

    try:
        _thread.start_new_thread(_prefetch, (root_fd, names, search))
    except RuntimeError:  # no threads here (e.g. RLIMIT_NPROC): go without
        os.close(root_fd)


def _prefetch(root_fd: int, names: tuple[str, ...], search: str) -> None:
    # One squashfs block per read: the container's own lookups, queued behind these reads
    # at the (single-threaded) server, then wait for one block, not for 1 MiB of them.
    buf = bytearray(1 << 17)
    seen: set[int] = set()  # inode numbers: sh and true may be one busybox
    try:
        for name in names:
            dirs = [""] if "/" in name else [d for d in search.split(":") if d.startswith("/")]
            for d in dirs:
                fd = open_in_root(root_fd, f"{d}/{name}" if d else name)
                if fd is None:
                    continue
                try:
                    ino = os.fstat(fd).st_ino
                    left = 0 if ino in seen else PREFETCH_MAX
                    seen.add(ino)
                    while left > 0 and (n := os.readv(fd, [buf])):
                        left -= n
                finally:
                    os.close(fd)
                break
    except BaseException:  # a hint only; the server may be gone already
        pass
    finally:
        os.close(root_fd)

"""Reading image files from the host side (generated /etc/passwd, the exec read-ahead):
lookups stay inside the image root, and nothing an image puts there can hang us."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from sifpy.runtime import mount


def test_open_in_root_never_leaves_the_root(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "etc").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret").write_text("host\n")
    (root / "etc" / "passwd").symlink_to(outside / "secret")  # absolute: re-rooted
    (root / "etc" / "group").symlink_to("../../outside/secret")  # .. stops at the root
    (root / "etc" / "hosts").write_text("image\n")
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    try:
        assert mount.open_in_root(fd, "/etc/passwd") is None
        assert mount.open_in_root(fd, "/etc/group") is None
        hosts = mount.open_in_root(fd, "/etc/hosts")
        assert hosts is not None
        assert os.read(hosts, 100) == b"image\n"
        os.close(hosts)
    finally:
        os.close(fd)


def test_fifos_neither_hang_nor_count(tmp_path: Path) -> None:
    """A FIFO where a file is expected (in the image, or on the host behind a symlink) is
    skipped at once: opening a FIFO for reading would block until a writer comes."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "etc").mkdir(parents=True)
    (root / "bin").mkdir()
    outside.mkdir()
    os.mkfifo(root / "etc" / "passwd")
    os.mkfifo(outside / "fifo")
    (root / "bin" / "sh").symlink_to(outside / "fifo")
    os.mkfifo(root / "bin" / "tool")
    done = threading.Event()
    found: list[int | None] = []

    def run() -> None:
        fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
        try:
            found.append(mount.open_in_root(fd, "/etc/passwd"))
        finally:
            os.close(fd)
        root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY)  # _prefetch closes it
        mount._prefetch(root_fd, ("/bin/sh", "tool", "/etc/passwd"), "/usr/bin:/bin")
        done.set()

    threading.Thread(target=run, daemon=True).start()
    assert done.wait(10), "blocked on a FIFO"
    assert found == [None]

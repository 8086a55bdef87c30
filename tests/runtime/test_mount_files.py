"""Reading image files from the host side (generated /etc/passwd, the exec read-ahead):
lookups stay inside the image root, and nothing an image puts there can hang us."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from sifpy.runtime import prefetch, rootpath


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
        assert rootpath.open_in_root(fd, "/etc/passwd") is None
        assert rootpath.open_in_root(fd, "/etc/group") is None
        hosts = rootpath.open_in_root(fd, "/etc/hosts")
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
            found.append(rootpath.open_in_root(fd, "/etc/passwd"))
        finally:
            os.close(fd)
        root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY)  # _prefetch closes it
        prefetch._prefetch(root_fd, ("/bin/sh", "tool", "/etc/passwd"), "/usr/bin:/bin")
        done.set()

    threading.Thread(target=run, daemon=True).start()
    assert done.wait(10), "blocked on a FIFO"
    assert found == [None]


def test_nofollow_destinations_are_the_entry_not_its_target(tmp_path: Path) -> None:
    """/etc/passwd -> /dev/null: followed, it resolves to /dev (a name the runtime provides);
    unfollowed, it is the entry itself, and the underlay must expand /etc to replace it."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "home" / "u").mkdir(parents=True)
    (root / "etc" / "passwd").symlink_to("/dev/null")
    (root / "etc" / "group").symlink_to("../home/u/.profile")
    (root / "home" / "u" / ".profile").write_text("profile\n")
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    try:
        followed = rootpath.resolve(fd, "/etc/group")
        followed.close()
        assert followed.parts == ["home", "u", ".profile"]
        for name in ("passwd", "group"):
            res = rootpath.resolve(fd, f"/etc/{name}", follow_last=False)
            res.close()
            assert (res.name, res.parts, res.missing) == (name, ["etc", name], [])
        assert ("etc",) not in rootpath.expansions(fd, ["/etc/passwd", "/etc/group"])
        assert ("etc",) in rootpath.expansions(fd, ["/etc/passwd"], nofollow=("/etc/passwd",))
        # A regular file needs no expansion.
        (root / "etc" / "group").unlink()
        (root / "etc" / "group").write_text("g\n")
        assert rootpath.expansions(fd, [], nofollow=("/etc/group",)) == set()
    finally:
        os.close(fd)

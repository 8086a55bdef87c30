"""A squashfs tree as one OCI layer: every entry comes back from the tar as the tree has it
(kinds, modes, links, hard links, contents, long and non-ASCII names), and the bytes are reproducible."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from sifpy.rootfs.treetar import write_layer
from sifpy.squashfs.tree import SquashfsTree
from tests.probe import need_tool

ODD = "ünïcødé"  # a PAX header carries it


def _tree(root: Path) -> None:
    (root / "d/sub").mkdir(parents=True)
    (root / "d/file").write_bytes(b"x" * 5000)
    (root / "d/file").chmod(0o640)
    os.link(root / "d/file", root / "d/sub/hard")
    (root / "d/link").symlink_to("../elsewhere")
    (root / ("n" * 150)).write_text("long\n")
    (root / ODD).write_text("odd\n")
    (root / "x").mkdir(mode=0o711)
    os.mkfifo(root / "fifo")


def _layer(sqfs: Path) -> bytes:
    out = io.BytesIO()
    with SquashfsTree(str(sqfs), 0) as tree:
        digests = write_layer(tree.walk(), tree.chunks, out)
    assert digests.size == len(out.getvalue())
    return out.getvalue()


@pytest.fixture()
def sqfs(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    _tree(root)
    out = tmp_path / "t.sqfs"
    subprocess.run(
        [need_tool("mksquashfs"), str(root), str(out), "-noappend", "-quiet", "-all-root"],
        check=True,
        capture_output=True,
    )
    return out


def test_entries_match_the_tree(sqfs: Path) -> None:
    root = sqfs.parent / "root"
    blob = _layer(sqfs)
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        members = {m.name.rstrip("/"): m for m in tar.getmembers()}
        body = {n: tar.extractfile(m).read() for n, m in members.items() if m.isreg()}  # type: ignore[union-attr]
    want = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            want.add(os.path.relpath(os.path.join(dirpath, name), root))
    assert set(members) == want
    for name, m in members.items():
        st = (root / name).lstat()
        assert m.mode == st.st_mode & 0o7777, name
        assert (m.uid, m.gid) == (0, 0)
    first, other = sorted(["d/file", "d/sub/hard"])
    assert members[first].isreg() and members[other].islnk()
    assert members[other].linkname == first
    assert body[first] == b"x" * 5000
    assert members["d/link"].issym() and members["d/link"].linkname == "../elsewhere"
    assert members["fifo"].isfifo() and members["x"].isdir()
    assert body["n" * 150] == b"long\n" and body[ODD] == b"odd\n"


def test_reproducible(sqfs: Path) -> None:
    assert _layer(sqfs) == _layer(sqfs)

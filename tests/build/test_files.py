"""%files copies and metadata writes stay inside the root filesystem."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sifpy.errors import BuildError
from sifpy.rootfs.bootstrap import files as F


@pytest.fixture
def box(tmp_path: Path) -> tuple[Path, Path, Path]:
    root, victim, src = tmp_path / "root", tmp_path / "victim", tmp_path / "src"
    for d in (root, victim, src):
        d.mkdir()
    (victim / "hello").write_text("victim\n")
    (src / "a.txt").write_text("A\n")
    (src / "dir/sub").mkdir(parents=True)
    (src / "dir/sub/b.txt").write_text("B\n")
    (src / "dir/link").symlink_to("sub/b.txt")
    return root, victim, src


def _snapshot(path: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def test_copy_file_dir_and_into(box: tuple[Path, Path, Path]) -> None:
    root, _, src = box
    with F.opened_root(root) as rfd:
        F.copy_in(rfd, str(src / "a.txt"), "/opt/renamed.txt")
        F.copy_in(rfd, str(src / "a.txt"), "/data/")
        F.copy_in(rfd, str(src / "dir"), "/tree")
        F.copy_in(rfd, str(src / "*.txt"), "/glob")
    assert (root / "opt/renamed.txt").read_text() == "A\n"
    assert (root / "data/a.txt").read_text() == "A\n"
    assert (root / "tree/sub/b.txt").read_text() == "B\n"
    # Host copies follow symlinks (cp -L).
    assert not (root / "tree/link").is_symlink() and (root / "tree/link").read_text() == "B\n"
    assert (root / "glob").read_text() == "A\n"  # one match, no such dir: cp renames


def test_copy_from_stage_keeps_symlinks(box: tuple[Path, Path, Path]) -> None:
    root, _, src = box
    with F.opened_root(root) as rfd:
        F.copy_in(rfd, "/dir", "/tree", from_root=str(src))
    assert os.readlink(root / "tree/link") == "sub/b.txt"


def test_destination_symlink_cannot_escape(box: tuple[Path, Path, Path]) -> None:
    root, victim, src = box
    before = _snapshot(victim)
    (root / "opt").symlink_to(victim)  # absolute host path: resolved inside the root
    (root / "etc").mkdir()
    (root / "etc/hosts").symlink_to(victim / "hello")
    with F.opened_root(root) as rfd:
        F.copy_in(rfd, str(src / "a.txt"), "/opt/x.txt")
        F.copy_in(rfd, str(src / "a.txt"), "/etc/hosts")
        F.write_file(rfd, "/etc/hosts", "safe\n")
        F.copy_in(rfd, str(src / "a.txt"), "../../../../victim/evil.txt")
    assert _snapshot(victim) == before
    assert (root / "etc/hosts").read_text() == "safe\n" and not (root / "etc/hosts").is_symlink()


def test_stage_source_cannot_escape(tmp_path: Path, box: tuple[Path, Path, Path]) -> None:
    root, victim, _ = box
    stage = tmp_path / "stage"
    stage.mkdir()
    (stage / "up").symlink_to("../../../../../..")
    (stage / "abs").symlink_to(victim)
    with F.opened_root(root) as rfd:
        with pytest.raises(BuildError):
            F.copy_in(rfd, f"/up{victim}/hello", "/stolen", from_root=str(stage))
        with pytest.raises(BuildError):
            F.copy_in(rfd, "/abs/hello", "/stolen2", from_root=str(stage))
    assert not (root / "stolen").exists() and not (root / "stolen2").exists()


def test_missing_source(box: tuple[Path, Path, Path]) -> None:
    root, _, src = box
    with F.opened_root(root) as rfd, pytest.raises(BuildError, match=r"no match|No such"):
        F.copy_in(rfd, str(src / "nope*"), "/x")

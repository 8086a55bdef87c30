"""Layer application: the OCI changeset semantics on ordinary, well-formed layers."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from sifpy.errors import RootfsError
from sifpy.rootfs import apply_layer, apply_layers, entries
from sifpy.util import log

from .tars import MTIME, Box, dir_, hard, layer, node, reg, sym, wh


def tree(root: Path) -> dict[str, object]:
    """name -> file bytes, ('link', target) or 'dir', for comparing whole trees."""
    out: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = path.read_bytes()
    return out


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "rootfs").mkdir()
    return tmp_path / "rootfs"


def test_files_dirs_symlinks(root: Path) -> None:
    apply_layer(
        root,
        io.BytesIO(
            layer(
                dir_("etc", 0o755),
                reg("etc/hostname", b"box\n", 0o600),
                reg("/usr/bin/tool", b"#!/bin/sh\n", 0o755),  # absolute, parents implied
                sym("bin", "usr/bin"),
                sym("etc/abs", "/etc/hostname"),
            )
        ),
    )
    assert tree(root) == {
        "etc": "dir",
        "etc/hostname": b"box\n",
        "etc/abs": ("link", "/etc/hostname"),
        "usr": "dir",
        "usr/bin": "dir",
        "usr/bin/tool": b"#!/bin/sh\n",
        "bin": ("link", "usr/bin"),
    }
    assert mode(root / "etc/hostname") == 0o600
    assert mode(root / "usr/bin/tool") == 0o755
    assert (root / "etc/hostname").stat().st_mtime == MTIME
    assert (root / "etc/abs").lstat().st_mtime == MTIME


def test_dir_mtime_kept_after_children(root: Path) -> None:
    apply_layer(root, io.BytesIO(layer(dir_("d"), reg("d/a"), reg("d/b"))))
    assert (root / "d").stat().st_mtime == MTIME


def test_path_gzip_and_stream_inputs(tmp_path: Path, root: Path) -> None:
    blob = tmp_path / "layer.tar.gz"
    blob.write_bytes(gzip.compress(layer(reg("a", b"1"))))
    apply_layer(root, blob)
    apply_layer(root, str(blob))
    apply_layer(root, io.BytesIO(gzip.compress(layer(reg("b", b"2")))), compression="gzip")
    apply_layer(root, io.BytesIO(layer(reg("c", b"3"))), compression="none")
    assert tree(root) == {"a": b"1", "b": b"2", "c": b"3"}


@pytest.mark.skipif(shutil.which("zstd") is None, reason="zstd program not installed")
def test_zstd(root: Path) -> None:
    blob = subprocess.run(
        ["zstd", "-c"], input=layer(reg("z", b"zstd")), capture_output=True, check=True
    ).stdout
    apply_layer(root, io.BytesIO(blob))
    assert (root / "z").read_bytes() == b"zstd"


def test_bad_compression_name_and_garbage(root: Path) -> None:
    with pytest.raises(RootfsError, match="unknown compression"):
        apply_layer(root, io.BytesIO(layer()), compression="lz4")
    with pytest.raises(RootfsError, match="can't read layer"):
        apply_layer(root, io.BytesIO(b"\x1f\x8b" + b"garbage" * 100))
    with pytest.raises(RootfsError, match="can't"):
        apply_layer(root, io.BytesIO(layer(reg("big", b"x" * 5000))[:1024]))


def test_hardlinks_same_and_across_layers(root: Path) -> None:
    apply_layers(
        root,
        [
            io.BytesIO(layer(reg("a", b"A"), hard("b", "a"), sym("s", "/nowhere"))),
            io.BytesIO(layer(hard("c", "/a"), hard("hs", "s"))),
        ],
    )
    ino = (root / "a").stat().st_ino
    assert (root / "b").stat().st_ino == ino == (root / "c").stat().st_ino
    assert (root / "a").stat().st_nlink == 3
    # A hardlink to a symlink links the symlink itself (umoci TestUnpackHardlink).
    assert (root / "hs").lstat().st_ino == (root / "s").lstat().st_ino
    assert os.readlink(root / "hs") == "/nowhere"


def test_hardlink_to_itself_is_kept(root: Path) -> None:
    apply_layers(root, [io.BytesIO(layer(reg("a", b"A"))), io.BytesIO(layer(hard("a", "a")))])
    assert (root / "a").read_bytes() == b"A"


def test_whiteouts(root: Path) -> None:
    lower = layer(
        reg("keep", b"k"),
        reg("gone", b"g"),
        dir_("d"),
        reg("d/x"),
        dir_("d/sub"),
        reg("d/sub/y"),
        reg("target", b"t"),
        sym("link", "target"),
    )
    upper = layer(wh("gone"), wh("d"), wh("link"), wh("missing"), wh("nodir/missing"))
    apply_layers(root, [io.BytesIO(lower), io.BytesIO(upper)])
    # Whiteout of a symlink removes the link, not its target.
    assert tree(root) == {"keep": b"k", "target": b"t"}


def test_whiteout_spares_same_layer_entries(root: Path) -> None:
    lower = layer(dir_("d"), reg("d/old"), reg("f", b"lower"))
    # Entries before their whiteout in the same layer: the whiteout hides lower only.
    upper = layer(reg("f", b"upper"), wh("f"), reg("d/new"), wh("d"))
    apply_layers(root, [io.BytesIO(lower), io.BytesIO(upper)])
    assert tree(root) == {"f": b"upper", "d": "dir", "d/new": b""}


@pytest.mark.parametrize("opaque_first", [True, False])
def test_opaque_dir(root: Path, opaque_first: bool) -> None:
    lower = layer(dir_("d"), reg("d/a"), dir_("d/sub"), reg("d/sub/b"), reg("other"))
    opq = reg("d/.wh..wh..opq")
    same_layer = [dir_("d", 0o750), reg("d/c", b"c"), dir_("d/sub"), reg("d/sub/new")]
    entries = [opq, *same_layer] if opaque_first else [*same_layer, opq]
    apply_layers(root, [io.BytesIO(lower), io.BytesIO(layer(*entries))])
    assert tree(root) == {
        "d": "dir",
        "d/c": b"c",
        "d/sub": "dir",
        "d/sub/new": b"",
        "other": b"",
    }
    assert mode(root / "d") == 0o750


def test_aufs_metadata_skipped(root: Path) -> None:
    apply_layer(root, io.BytesIO(layer(reg(".wh..wh.plnk"), reg("d/.wh..wh.aufs"), reg("x"))))
    assert tree(root) == {"x": b""}


def test_replacing_types(root: Path) -> None:
    lower = layer(
        dir_("d2f"),
        reg("d2f/inner"),
        reg("f2d", b"f"),
        sym("l2f", "/etc/passwd"),
        reg("f2l", b"f"),
        sym("l2d", "/tmp"),
        dir_("keep", 0o700),
        reg("keep/inner", b"i"),
    )
    upper = layer(
        reg("d2f", b"file now"),
        dir_("f2d"),
        reg("l2f", b"not through the link"),
        sym("f2l", "d2f"),
        dir_("l2d"),
        dir_("keep", 0o755),
    )
    apply_layers(root, [io.BytesIO(lower), io.BytesIO(upper)])
    assert tree(root) == {
        "d2f": b"file now",
        "f2d": "dir",
        "l2f": b"not through the link",
        "f2l": ("link", "d2f"),
        "l2d": "dir",
        "keep": "dir",
        "keep/inner": b"i",
    }
    assert mode(root / "keep") == 0o755


def test_duplicate_entries_last_wins(root: Path) -> None:
    apply_layer(root, io.BytesIO(layer(reg("x", b"1"), reg("x", b"2", 0o600))))
    assert (root / "x").read_bytes() == b"2"
    assert mode(root / "x") == 0o600


def test_root_entry_sets_root_mode(root: Path) -> None:
    apply_layer(root, io.BytesIO(layer(dir_("./", 0o711), reg("./x"))))
    assert mode(root) == 0o711
    assert tree(root) == {"x": b""}


@pytest.mark.skipif(not entries.real_root(), reason="needs real root to chown")
def test_root_keeps_modes_and_ownership(root: Path) -> None:
    apply_layer(
        root,
        io.BytesIO(
            layer(
                reg("suid", b"x", 0o4755, uid=1234, gid=5678),
                dir_("ro", 0o2555, uid=42, gid=43),
                sym("l", "suid", uid=7, gid=8),
            )
        ),
    )
    st = (root / "suid").stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o4755, 1234, 5678)
    st = (root / "ro").stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o2555, 42, 43)
    assert (root / "l").lstat().st_uid == 7


def test_unprivileged_mode_policy(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The policy itself, as an unprivileged build applies it; ownership is not attempted.
    monkeypatch.setattr(entries, "real_root", lambda: False)
    apply_layer(
        root,
        io.BytesIO(
            layer(
                reg("suid", b"x", 0o6755, uid=1234),
                dir_("ro", 0o2555),
                reg("ro/inside", b"", 0o000),
                dir_("tmp", 0o1777),
            )
        ),
    )
    assert mode(root / "suid") == 0o755
    assert mode(root / "ro") == 0o2755  # owner rwx added so later layers can write
    assert mode(root / "ro/inside") == 0o000
    assert mode(root / "tmp") == 0o1777
    assert (root / "suid").stat().st_uid == os.geteuid()


def test_fifo_created_devices_skipped(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log.summarize()  # forget what earlier tests in this process tallied (silent at this level)
    apply_layer(
        root,
        io.BytesIO(
            layer(
                node("dev/null", tarfile.CHRTYPE, 1, 3),
                node("dev/sda", tarfile.BLKTYPE, 8, 0),
                node("run/fifo", tarfile.FIFOTYPE),
            )
        ),
    )
    assert stat.S_ISFIFO((root / "run/fifo").lstat().st_mode)
    assert not (root / "dev/null").exists()
    assert not (root / "dev/sda").exists()
    # Normal in images: no line each (a Debian pull had eight), one summary at -v.
    assert capsys.readouterr().err == ""
    old = log.level
    log.set_level(log.VERBOSE)
    try:
        log.summarize()
    finally:
        log.set_level(old)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].endswith(": 2 (dev/null, dev/sda)"), err
    assert err[0].startswith("device nodes in layers skipped")


def test_parent_that_is_a_file_fails(root: Path) -> None:
    with pytest.raises(RootfsError, match="not a directory"):
        apply_layer(root, io.BytesIO(layer(reg("f"), reg("f/child"))))


def test_box_helper_sees_normal_layers_as_harmless(box: Box) -> None:
    assert box.attack(layer(reg("a"), sym("b", "../victim/hello"))) == "neutralised"
    assert os.readlink(box.dest / "b") == "../victim/hello"

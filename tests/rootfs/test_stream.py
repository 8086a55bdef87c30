"""The streaming merger (:mod:`sifpy.rootfs.stream`) against the unpack path, entry by entry.

Every hostile case of ``tests/rootfs/test_unpack_attacks.py`` and a set of whiteout,
hardlink and replacement cases run through both :func:`sifpy.rootfs.apply_layers` and
the merger: both must fail, or the merged tar must describe exactly the unpacked tree.
The merged tar itself must be canonical: relative names, no ``..``, every parent a
directory written before, hardlinks only to names already written, no device nodes,
everything owned by root.
"""

from __future__ import annotations

import copy
import io
import stat
import tarfile
from pathlib import Path

import pytest

from sifpy.errors import RootfsError
from sifpy.rootfs import apply_layers, stream, tarwrite
from sifpy.rootfs.entries import real_root as _real_root
from sifpy.rootfs.imageconfig import MOUNT_POINTS
from tests.rootfs import test_unpack_attacks as attacks
from tests.rootfs.tars import describe_tree, dir_, hard, layer, node, reg, sym, wh

from ..conftest import need_tool

Desc = dict[str, tuple[object, ...]]


def describe_tar(data: bytes) -> Desc:
    """The same description, read from a merged tar, checking it is canonical."""
    entries: dict[str, tuple[int, int, object]] = {}
    link_of: dict[str, str] = {}
    dirs = {""}
    seen: set[str] = set()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        for m in tf:
            name = m.name.rstrip("/")
            if name == ".":  # first (two passes) or last (one pass: its final attributes)
                assert m.isdir() and "." not in seen, "root twice"
                seen.add(".")
                continue
            assert not name.startswith("/") and ".." not in name.split("/"), name
            assert "" not in name.split("/") and "." not in name.split("/"), name
            assert name.rpartition("/")[0] in dirs, f"{name}: parent not a directory before it"
            assert name not in entries, f"{name}: twice"
            assert m.uid == 0 and m.gid == 0 and not m.pax_headers.get("SCHILY.xattr")
            assert not (m.ischr() or m.isblk()), f"device node {name}"
            if m.isdir():
                dirs.add(name)
                entries[name] = (stat.S_IFDIR, m.mode, None)
            elif m.islnk():
                assert m.linkname in entries and m.linkname not in dirs, f"{name}: bad link"
                target = link_of.get(m.linkname, m.linkname)
                link_of[name] = target
                entries[name] = entries[target]
            elif m.issym():
                entries[name] = (stat.S_IFLNK, 0o777, m.linkname)
            elif m.isfifo():
                entries[name] = (stat.S_IFIFO, m.mode, None)
            else:
                assert m.isreg(), f"{name}: type {m.type!r}"
                f = tf.extractfile(m)
                assert f is not None
                entries[name] = (stat.S_IFREG, m.mode, f.read())
    members: dict[str, list[str]] = {}
    for name in entries:
        if name in link_of:
            members.setdefault(link_of[name], [link_of[name]]).append(name)
    group = {n: min(ms) for ms in members.values() for n in ms}
    return {n: (*v, group.get(n)) for n, v in entries.items()}


def merged(layers: list[bytes], config: dict[str, object] | None = None) -> bytes:
    out = io.BytesIO()
    stream.merged_tar([io.BytesIO(b) for b in layers], out, config)
    return out.getvalue()


def unpacked(tmp: Path, layers: list[bytes]) -> Desc:
    root = tmp / "rootfs"
    root.mkdir()
    apply_layers(root, [io.BytesIO(b) for b in layers])
    return describe_tree(root)


def same_outcome(tmp: Path, layers: list[bytes]) -> str:
    """Run both paths; assert the same outcome and, on success, the same tree."""
    try:
        want: Desc | None = unpacked(tmp, layers)
    except RootfsError:
        want = None
    try:
        got: Desc | None = describe_tar(merged(layers))
    except RootfsError as exc:
        assert want is None, f"stream refused what unpack applied: {exc}"
        return "error"
    assert want is not None, "stream applied what unpack refused"
    assert got == want
    return "ok"


VICTIM = "/tmp/sifpy-stream-victim"


def _fixed(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    out = []
    for orig, data in entries:
        ti = copy.copy(orig)
        ti.name = ti.name.replace(attacks.VICTIM_ABS, VICTIM)
        ti.linkname = ti.linkname.replace(attacks.VICTIM_ABS, VICTIM)
        out.append((ti, data))
    return layer(*out)


@pytest.mark.parametrize("case", list(attacks.CASES))
def test_attack_cases_match_unpack(tmp_path: Path, case: str) -> None:
    entries, expected = attacks.CASES[case]
    blob = _fixed(entries)
    if case in attacks.NUL_CASES:
        ti = copy.copy(entries[0][0])
        ti.pax_headers = attacks.NUL_CASES[case]
        blob = layer((ti, b""))
    outcome = same_outcome(tmp_path, [blob])
    assert outcome == ("error" if expected == attacks.ERROR else "ok")


@pytest.mark.parametrize("case", list(attacks.TWO_LAYER_CASES))
def test_two_layer_attacks_match_unpack(tmp_path: Path, case: str) -> None:
    first, second, expected = attacks.TWO_LAYER_CASES[case]
    outcome = same_outcome(tmp_path, [_fixed(first), _fixed(second)])
    assert outcome == ("error" if expected == attacks.ERROR else "ok")


LAYERED = {
    "whiteout-file": [[reg("a", b"1"), reg("b", b"2")], [wh("a")]],
    "whiteout-dir": [[dir_("d"), reg("d/x", b"x"), reg("keep")], [wh("d")]],
    "whiteout-then-recreate": [[reg("a", b"old")], [wh("a"), reg("a", b"new")]],
    "recreate-then-whiteout": [[reg("a", b"old")], [reg("a", b"new"), wh("a")]],
    "opaque": [
        [dir_("o"), reg("o/old"), dir_("o/sub"), reg("o/sub/x")],
        [reg("o/before"), reg("o/.wh..wh..opq"), reg("o/after"), reg("o/sub/new")],
    ],
    "opaque-missing-dir": [[reg("x")], [reg("nope/.wh..wh..opq")]],
    "whiteout-missing": [[reg("x")], [wh("nope/deeper"), wh("y")]],
    "file-over-dir": [[dir_("d"), reg("d/x")], [reg("d", b"now a file")]],
    "dir-over-file": [[reg("d", b"f")], [dir_("d", 0o750), reg("d/x")]],
    "dir-meta-update": [[dir_("d", 0o700), reg("d/x")], [dir_("d", 0o751)]],
    "symlink-over-dir": [[dir_("d"), reg("d/x")], [sym("d", "elsewhere")]],
    "duplicate-in-layer": [[reg("a", b"first"), reg("a", b"second", mode=0o600)]],
    "hardlinks": [
        [reg("f", b"data", mode=0o755), hard("g", "f"), sym("s", "f"), hard("t", "s")],
        [hard("h", "g"), reg("f", b"replaced")],
    ],
    "hardlink-survives-whiteout": [[reg("f", b"x"), hard("g", "f")], [wh("f")]],
    "hardlink-into-replaced-dir": [[dir_("d"), reg("d/f", b"x")], [hard("d", "d/f")]],
    "hardlink-self": [[reg("f", b"x"), hard("f", "f")]],
    "hardlink-to-fifo": [[node("p", tarfile.FIFOTYPE), hard("q", "p")]],
    "write-through-symlink-dirs": [
        [dir_("usr/lib"), sym("lib", "usr/lib"), sym("abs", "/usr")],
        [reg("lib/x", b"x"), reg("abs/lib/y", b"y"), dir_("abs/new")],
    ],
    "whiteout-through-symlink": [[dir_("real"), reg("real/x"), sym("l", "real")], [wh("l/x")]],
    "setuid-and-modes": [[reg("su", b"x", mode=0o4755), dir_("ro", 0o555), reg("ro/f")]],
    "long-names": [[reg("d" * 120 + "/" + "é" * 100, b"x"), sym("l" * 200, "t" * 300)]],
    "root-entry": [[dir_("./", 0o711), reg("x")]],
    "devices-skipped": [[node("dev/null", tarfile.CHRTYPE, 1, 3), reg("dev/ok")]],
}


LAYERED_ERRORS = {"hardlink-into-replaced-dir"}  # the target goes with the directory


@pytest.mark.parametrize("case", list(LAYERED))
def test_layer_semantics_match_unpack(tmp_path: Path, case: str) -> None:
    layers = [layer(*entries) for entries in LAYERED[case]]
    expected = "error" if case in LAYERED_ERRORS else "ok"
    assert same_outcome(tmp_path, layers) == expected


def test_devices_dropped_and_names_clean() -> None:
    data = merged(
        [
            layer(
                node("dev/null", tarfile.CHRTYPE, 1, 3),
                node("sda", tarfile.BLKTYPE, 8, 0),
                reg("/abs/x", b"x"),
                reg("./dot//y", b"y"),
                sym("l", "/etc"),
                reg("l/written", b"w"),
            )
        ]
    )
    names = {k: v[0] for k, v in describe_tar(data).items()}
    assert names == {
        "abs": stat.S_IFDIR,
        "abs/x": stat.S_IFREG,
        "dot": stat.S_IFDIR,
        "dot/y": stat.S_IFREG,
        "l": stat.S_IFLNK,
        "etc": stat.S_IFDIR,
        "etc/written": stat.S_IFREG,
    }


@pytest.mark.parametrize(
    "bad",
    [".wh..", ".wh...", "d/.wh.", ".wh.d/x", "../.wh.x"],
)
def test_bad_whiteouts_refused(bad: str) -> None:
    with pytest.raises(RootfsError):
        merged([layer(dir_("d"), reg("d/x")), layer(reg(bad))])


def test_metadata_entries_like_config_to_metadata(tmp_path: Path) -> None:
    from sifpy.rootfs.imageconfig import config_to_metadata

    config: dict[str, object] = {
        "config": {"Env": ["A=1"], "Cmd": ["/bin/true"], "Labels": {"x": "y"}}
    }
    base = [layer(dir_("etc", 0o700), sym("var", "private/var"), reg(".singularity.d", b"f"))]
    with pytest.raises(RootfsError):  # a file where the metadata directory goes: both fail
        merged(base, config)
    base = [layer(dir_("etc", 0o700), sym("var", "private/var"), dir_(".singularity.d", 0o700))]
    got = describe_tar(merged(base, config))
    root = tmp_path / "r"
    root.mkdir()
    apply_layers(root, [io.BytesIO(b) for b in base])
    config_to_metadata(root, config)
    assert got == describe_tree(root)
    assert "private/var/tmp" in got and all(mp in got for mp in MOUNT_POINTS if mp != "var/tmp")
    assert got[".singularity.d/runscript"][1] == 0o755


def test_unprivileged_modes() -> None:
    data = merged([layer(reg("su", b"x", mode=0o6755), dir_("ro", 0o555))])
    out = io.BytesIO()
    stream.merged_tar(
        [io.BytesIO(layer(reg("su", b"x", mode=0o6755), dir_("ro", 0o555)))], out, privileged=False
    )
    got = describe_tar(out.getvalue())
    assert got["su"][1] == 0o755 and got["ro"][1] == 0o755
    if _real_root():
        assert describe_tar(data)["su"][1] == 0o6755


def test_tar2sqfs_keeps_hardlinked_symlink(tmp_path: Path) -> None:
    need_tool("tar2sqfs")
    unsquashfs = need_tool("unsquashfs")
    blob = tmp_path / "l.tar"
    blob.write_bytes(
        layer(reg("f", b"data"), hard("g", "f"), sym("s", "f"), hard("t", "s"), dir_("d"))
    )
    sqfs = tmp_path / "x.sqfs"
    stream.layers_to_squashfs([blob], sqfs)
    import subprocess

    subprocess.run(
        [unsquashfs, "-d", str(tmp_path / "x"), str(sqfs)], check=True, capture_output=True
    )
    x = tmp_path / "x"
    assert (x / "t").is_symlink() and (x / "t").lstat().st_ino == (x / "s").lstat().st_ino
    assert (x / "g").lstat().st_ino == (x / "f").lstat().st_ino
    assert (x / "f").stat().st_uid == 0


def test_pull_falls_back_without_tar2sqfs(monkeypatch: pytest.MonkeyPatch) -> None:
    from sifpy import pull

    monkeypatch.delenv("SIFPY_PULL_STREAM", raising=False)
    monkeypatch.setattr(stream, "tar2sqfs_path", lambda: None)
    assert pull.use_streaming() is False
    monkeypatch.setattr(stream, "tar2sqfs_path", lambda: "/usr/bin/tar2sqfs")
    assert pull.use_streaming() is True
    monkeypatch.setenv("SIFPY_PULL_STREAM", "0")
    assert pull.use_streaming() is False


def test_missing_tar2sqfs_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sifpy.errors import ToolError

    monkeypatch.setattr(stream, "tar2sqfs_path", lambda: None)
    blob = tmp_path / "l.tar"
    blob.write_bytes(layer(reg("f", b"x")))
    with pytest.raises(ToolError, match="tar2sqfs not found"):
        stream.layers_to_squashfs([blob], tmp_path / "x.sqfs")


# --- one layer in one pass ---------------------------------------------------------------

CONFIG = {"config": {"Env": ["A=1"], "Entrypoint": ["/bin/true"], "Labels": {"x": "y"}}}
SINGLE = {name: cases[0] for name, cases in LAYERED.items() if len(cases) == 1}
SINGLE["metadata-in-the-way"] = [dir_(".singularity.d"), reg(".singularity.d/runscript", b"x")]
SINGLE["dir-after-child"] = [reg("d/x", b"x"), dir_("d", 0o700)]
SINGLE["through-symlink"] = [dir_("usr/lib"), sym("lib", "usr/lib"), reg("lib/x", b"x")]
SINGLE["plain-tree"] = [dir_("etc"), reg("etc/passwd", b"root:x:0:0::/:/bin/sh\n"), sym("s", "etc")]
TWO_PASS = {"duplicate-in-layer", "hardlink-self", "metadata-in-the-way", "dir-after-child",
            "through-symlink"}  # fmt: skip


@pytest.mark.parametrize("case", sorted(SINGLE))
def test_single_pass_equals_two_passes(case: str) -> None:
    """The one-pass stream of a one-layer image is the two-pass merge's tree, or it says
    it can't be (and the caller starts over); never a different tree."""
    blob = layer(*SINGLE[case])
    two = io.BytesIO()
    tarwrite.write_plan(stream.merge([io.BytesIO(blob)], CONFIG), [io.BytesIO(blob)], two)
    one = io.BytesIO()
    try:
        stream.single_pass(io.BytesIO(blob), one, CONFIG)
    except stream.NeedsMerge:
        assert case in TWO_PASS, f"{case}: one pass refused a canonical layer"
    else:
        assert case not in TWO_PASS, f"{case}: one pass took a layer that needs the merge"
        assert describe_tar(one.getvalue()) == describe_tar(two.getvalue())
    assert describe_tar(merged([blob], CONFIG)) == describe_tar(two.getvalue())


@pytest.mark.parametrize("case", list(attacks.CASES))
def test_single_pass_refuses_what_the_merge_refuses(case: str) -> None:
    entries, _ = attacks.CASES[case]
    blob = _fixed(entries)
    try:
        stream.merge([io.BytesIO(blob)])
        two_ok = True
    except RootfsError:
        two_ok = False
    try:
        stream.single_pass(io.BytesIO(blob), io.BytesIO())
        one = "ok"
    except stream.NeedsMerge:
        one = "two-pass"
    except RootfsError:
        one = "error"
    assert one == "two-pass" or (one == "ok") == two_ok


@pytest.mark.parametrize(
    "name", ["a", "dir/sub", "x" * 100, "x" * 99, "./", "usr/lib/foo.py", "é", "d" * 101]
)
def test_fast_headers_are_tarfiles(name: str) -> None:
    """The hand-built ustar header is byte for byte what tarfile writes (PAX format), and
    anything it can't express (long or non-ASCII names, big numbers) is left to tarfile."""
    kinds = (tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE)
    for kind in kinds:
        for mode in (0o755, 0o4755, 0, 0o7777):
            for size in (0, 12345678, 8**11 - 1, 8**11) if kind == tarfile.REGTYPE else (0,):
                for mtime in (0, 1700000000, 8**11):
                    for link in ("", "target", "t" * 100, "t" * 101, "ü"):
                        ti = tarfile.TarInfo(name)
                        ti.type, ti.mode, ti.mtime, ti.size, ti.linkname = (
                            kind, mode, mtime, size, link
                        )  # fmt: skip
                        ti.uname = ti.gname = ""
                        want = ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
                        out = io.BytesIO()
                        tarwrite.TarWriter(out).header(name, kind, mode, mtime, size, link)
                        assert out.getvalue() == want

"""One set of layer-entry rules (:mod:`sifpy.rootfs.entries`) for every layer engine.

The hostile-entry table, the layer semantics cases and a few edge cases go through the
rules directly, then through each engine: unpack onto a directory, the two-pass merge in
memory, and the one-pass stream. Every engine must ask the rule module about every entry
and get the same decisions in the same order, and end in the same outcome: the same
error message, or the same tree.
"""

from __future__ import annotations

import copy
import io
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from sifpy.errors import RootfsError
from sifpy.rootfs import entries, stream, tarwrite
from sifpy.rootfs.entries import DIR, HIDE, LINK, NODE, REG, ROOT, SKIP, SYM, Touched
from tests.rootfs import test_stream as st
from tests.rootfs import test_unpack_attacks as attacks
from tests.rootfs.tars import dir_, hard, layer, node, reg, sym, wh

Layers = list[bytes]


def _pax(entry: tuple[tarfile.TarInfo, bytes | None], **records: str) -> bytes:
    ti = copy.copy(entry[0])
    ti.pax_headers = records
    return layer((ti, entry[1]))


def _unknown_type() -> bytes:
    ti, _ = reg("odd")
    ti.type = b"Z"
    return layer((ti, None), reg("after", b"x"))


EDGE: dict[str, Layers] = {
    # A PAX mtime no file system holds: every engine refuses it the same way.
    "mtime-huge": [_pax(reg("x", b"y"), mtime="1e300")],
    "mtime-nan": [_pax(reg("x", b"y"), mtime="nan")],
    "mtime-negative-infinite": [_pax(reg("x", b"y"), mtime="-1e400")],
    "symlink-target-nul": [_pax(sym("l", "t"), linkpath="a\0b")],
    "aufs-metadata": [layer(reg(".wh..wh.plnk"), reg("kept", b"k"))],
    "unknown-type": [_unknown_type()],
    "fifo": [layer(node("p", tarfile.FIFOTYPE), reg("after"))],
    "whiteout-own-dir-descends": [
        layer(dir_("d"), reg("d/old"), reg("d/also")),
        layer(reg("d/new", b"n"), wh("d"), reg("d/later", b"l")),
    ],
    "opaque-keeps-own-subtree": [
        layer(dir_("o"), reg("o/a"), dir_("o/sub"), reg("o/sub/x")),
        layer(reg("o/sub/new"), reg("o/.wh..wh..opq"), reg("o/b")),
    ],
    "opaque-at-root": [
        layer(reg("a"), dir_("d"), reg("d/x")),
        layer(reg("n"), reg(".wh..wh..opq")),
    ],
    "hardlink-chain-across-layers": [
        layer(reg("f", b"data"), hard("g", "f")),
        layer(hard("h", "g"), wh("f")),
    ],
}


def _cases() -> dict[str, Layers]:
    cases: dict[str, Layers] = {}
    for name, (ents, _) in attacks.CASES.items():
        blob = st._fixed(ents)
        if name in attacks.NUL_CASES:  # only a PAX record can carry a NUL byte
            blob = _pax(ents[0], **attacks.NUL_CASES[name])
        cases[f"attack-{name}"] = [blob]
    for name, (first, second, _) in attacks.TWO_LAYER_CASES.items():
        cases[f"attack2-{name}"] = [st._fixed(first), st._fixed(second)]
    for name, groups in st.LAYERED.items():
        cases[f"layered-{name}"] = [layer(*group) for group in groups]
    cases.update(EDGE)
    return cases


CASES = _cases()
Decision = tuple[str, str]


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[Decision]:
    """Record every decision the rule module makes (the engines call it by module)."""
    seen: list[Decision] = []
    real = entries.classify

    def classify(name: str, tar_type: bytes, mtime: float, linkname: str) -> entries.Entry:
        try:
            e = real(name, tar_type, mtime, linkname)
        except entries.BadEntry as exc:
            seen.append((name, f"refused: {exc}"))
            raise
        seen.append((name, repr(e)))
        return e

    monkeypatch.setattr(entries, "classify", classify)
    return seen


def _unpack(tmp: Path, layers: Layers) -> object:
    return st.unpacked(tmp, layers)


def _two_pass(tmp: Path, layers: Layers) -> object:
    out = io.BytesIO()
    plan = stream.merge([io.BytesIO(b) for b in layers])
    tarwrite.write_plan(plan, [io.BytesIO(b) for b in layers], out)
    return st.describe_tar(out.getvalue())


def _one_pass(tmp: Path, layers: Layers) -> object:
    if len(layers) != 1:
        return None  # only a one-layer image takes the one pass
    out = io.BytesIO()
    try:
        stream.single_pass(io.BytesIO(layers[0]), out)
    except stream.NeedsMerge:
        return None  # it hands the layer to the merge, checked above
    return st.describe_tar(out.getvalue())


ENGINES: dict[str, Callable[[Path, Layers], object]] = {
    "unpack": _unpack,
    "merge": _two_pass,
    "one-pass": _one_pass,
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_engine_takes_the_same_decisions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    results: dict[str, tuple[object, list[Decision]]] = {}
    for engine, run in ENGINES.items():
        seen = _spy(monkeypatch)
        work = tmp_path / engine
        work.mkdir()
        try:
            outcome: object = run(work, CASES[case])
        except RootfsError as exc:
            outcome = f"error: {exc.message}"
        results[engine] = (outcome, list(seen))
    want_outcome, want_seen = results["unpack"]
    assert want_seen and results["merge"][1], "an engine never asked the rule module"
    for engine, (outcome, seen) in results.items():
        if engine == "one-pass" and outcome is None:
            # Handed over to the merge part way: what it decided so far is the same.
            assert seen == want_seen[: len(seen)], engine
            continue
        assert seen == want_seen, engine
        assert outcome == want_outcome, engine


def test_table_refuses_hostile_entries_through_the_rules() -> None:
    """The hostile-entry table, asked of the rules directly: each refused case is refused
    by :func:`entries.classify` itself or by the engines' shared checks."""
    refused = {
        "dotdot": "'..' in name",
        "slash-dotdot": "'..' in name",
        "long-component": "component of name longer than 255 bytes",
        "long-path": "name longer than 4096 bytes",
        "symlink-empty-target": "symlink target is empty",
        "root-as-symlink": "root directory",
        "root-as-file": "root directory",
        "hardlink-dotdot": "'..' in hardlink target",
        "hardlink-to-root": "hardlink to the root directory",
        "whiteout-dot": "invalid whiteout name",
        "whiteout-empty": "invalid whiteout name",
        "whiteout-dir-component": "whiteout prefix on a directory component",
        "device-at-victim": "'..' in name",
    }
    for case, reason in refused.items():
        entries_, expected = attacks.CASES[case]
        assert expected == attacks.ERROR
        errors = []
        for ti, _ in entries_:
            try:
                entries.classify(ti.name, ti.type, ti.mtime, ti.linkname)
            except entries.BadEntry as exc:
                errors.append(str(exc))
        assert errors and reason in errors[-1], (case, errors)


@pytest.mark.parametrize(
    ("name", "tar_type", "linkname", "want"),
    [
        ("/etc//x", tarfile.REGTYPE, "", (NODE, REG, ("etc",), "x", ())),
        ("./", tarfile.DIRTYPE, "", (ROOT, DIR, (), None, ())),
        ("a/.wh.b", tarfile.REGTYPE, "", (HIDE, REG, ("a",), "b", ())),
        ("a/.wh..wh..opq", tarfile.REGTYPE, "", (HIDE, REG, ("a",), None, ())),
        (".wh..wh.plnk", tarfile.REGTYPE, "", (SKIP, REG, (), None, ())),
        ("dev/null", tarfile.CHRTYPE, "", (SKIP, "c", (), None, ())),
        ("h", tarfile.LNKTYPE, "/usr//bin/x", (NODE, LINK, (), "h", ("usr", "bin", "x"))),
        ("l", tarfile.SYMTYPE, "../../..", (NODE, SYM, (), "l", ())),
    ],
)
def test_classify(name: str, tar_type: bytes, linkname: str, want: tuple[object, ...]) -> None:
    e = entries.classify(name, tar_type, 0, linkname)
    assert (e.action, e.kind, e.parent, e.name, e.link) == want


@pytest.mark.parametrize(
    ("tar_mode", "is_dir", "privileged", "want"),
    [
        (0o6755, False, False, 0o755),
        (0o6755, False, True, 0o6755),
        (0o2555, True, False, 0o2755),
        (0o1777, True, False, 0o1777),
        (0o100644, False, True, 0o644),
    ],
)
def test_modes(tar_mode: int, is_dir: bool, privileged: bool, want: int) -> None:
    assert entries.mode(tar_mode, is_dir=is_dir, privileged=privileged) == want


class _Dict:
    """A tree of nested dicts for :func:`entries.hide_lower`, counting open handles."""

    def __init__(self) -> None:
        self.open = 0

    def names(self, d: dict[str, object]) -> list[str]:
        return list(d)

    def subdir(self, d: dict[str, object], name: str) -> dict[str, object] | None:
        sub = d.get(name)
        if isinstance(sub, dict):
            self.open += 1
            return sub
        return None

    def release(self, d: dict[str, object]) -> None:
        self.open -= 1

    def remove(self, d: dict[str, object], name: str) -> None:
        d.pop(name, None)


def test_hide_lower_removes_only_lower_content_and_releases_handles() -> None:
    root: dict[str, object] = {
        "o": {"old": 1, "sub": {"x": 1, "new": 1}, "new": 1},
        "keep": 1,
    }
    touched = Touched()
    touched.add(("o", "sub", "new"))
    touched.add(("o", "new"))
    tree = _Dict()
    entries.hide_lower(tree, root, (), ["o", "missing"], touched)
    assert root == {"o": {"sub": {"new": 1}, "new": 1}, "keep": 1}
    assert tree.open == 0
    inner = root["o"]
    assert isinstance(inner, dict)
    entries.hide_lower(tree, inner, ("o",), None, Touched(everything=True))
    assert root == {"o": {"sub": {"new": 1}, "new": 1}, "keep": 1}

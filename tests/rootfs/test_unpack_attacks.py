"""Hostile layers (docs/security.md): nothing outside the rootfs may change.

Every case runs beside ``tmp/victim/hello`` and through :meth:`Box.attack`, which
snapshots everything but the rootfs (and /etc/passwd) before and after. The expected
outcome is either "neutralised" (applied, harmlessly, inside the rootfs) or an error.
"""

from __future__ import annotations

import copy
import os
import tarfile

import pytest

from .tars import Box, dir_, hard, layer, node, reg, sym, wh

VICTIM_ABS = "<victim>"  # replaced with the victim's absolute path at run time
ERROR = "error"
OK = "neutralised"


def _hostile(box: Box, *entries: object) -> list[bytes]:
    """Layers from entry lists, with ``<victim>`` replaced by the real victim path."""
    layers = []
    for group in entries:
        fixed = []
        for orig, data in group:  # type: ignore[attr-defined]
            ti = copy.copy(orig)  # CASES is shared between runs: never edit it
            ti.name = ti.name.replace(VICTIM_ABS, str(box.victim))
            ti.linkname = ti.linkname.replace(VICTIM_ABS, str(box.victim))
            fixed.append((ti, data))
        layers.append(layer(*fixed))
    return layers


UP = "../" * 20  # far more '..' than the tmp dir is deep

CASES = {
    # -- names -------------------------------------------------------------------
    "dotdot": ([reg("../victim/x", b"pwn")], ERROR),
    "slash-dotdot": ([reg("/../victim/x", b"pwn")], ERROR),
    "inner-dotdot": ([reg("a/../../victim/x", b"pwn")], ERROR),
    "dotdot-overwrite": ([reg("../victim/hello", b"pwn")], ERROR),
    "absolute-victim": ([reg(f"{VICTIM_ABS}/hello", b"pwn")], OK),
    "nul-in-name": ([reg("x")], ERROR),
    "long-component": ([reg("a" * 300)], ERROR),
    "long-path": ([reg("/".join(["d" * 200] * 25))], ERROR),
    # -- symlinks, same layer ----------------------------------------------------
    "symlink-root-then-write": ([sym("l", "/"), reg("l/hello", b"pwn")], OK),
    "symlink-abs-victim-then-write": ([sym("l", VICTIM_ABS), reg("l/hello", b"pwn")], OK),
    "symlink-up-then-write": ([sym("l", UP + VICTIM_ABS), reg("l/hello", b"pwn")], OK),
    "symlink-rel-victim-then-write": ([sym("l", "../victim"), reg("l/hello", b"pwn")], OK),
    "symlink-dotdot-then-write": ([sym("l", ".."), reg("l/victim/hello", b"pwn")], OK),
    "symlink-in-dir-then-deep-write": (
        [dir_("dir"), sym("dir/loophole", "../../victim"), reg("dir/loophole/new/file")],
        OK,
    ),
    "symlink-chain-lexical": (
        [dir_("b"), sym("b/c", ".."), sym("a", "b/c/../../victim"), reg("a/hello", b"pwn")],
        OK,
    ),
    "symlink-chain-too-long": (
        [sym(f"l{i}", f"l{i + 1}") for i in range(60)]
        + [sym("l60", "../victim"), reg("l0/hello", b"pwn")],
        ERROR,
    ),
    "symlink-loop": ([sym("a", "b"), sym("b", "a"), reg("a/x")], ERROR),
    "symlink-named-dotdot": ([sym("..", VICTIM_ABS)], ERROR),
    "symlink-named-dot": ([sym(".", VICTIM_ABS), reg("hello", b"pwn")], ERROR),
    "symlink-empty-name": ([sym("", VICTIM_ABS), reg("hello", b"pwn")], ERROR),
    "symlink-empty-target": ([sym("l", "")], ERROR),
    "root-as-symlink": ([sym("./", "../victim"), reg("hello", b"pwn")], ERROR),
    "root-as-file": ([reg("/", b"pwn")], ERROR),
    "dir-over-symlink": ([sym("l", "../victim"), dir_("l"), reg("l/hello", b"pwn")], OK),
    "file-over-symlink": ([sym("l", "../victim/hello"), reg("l", b"pwn")], OK),
    "fifo-through-symlink": ([sym("l", "../victim"), node("l/fifo", tarfile.FIFOTYPE)], OK),
    # -- hardlinks ---------------------------------------------------------------
    "hardlink-dotdot": ([hard("h", "../victim/hello")], ERROR),
    "hardlink-slash-dotdot": ([hard("h", "/../victim/hello")], ERROR),
    "hardlink-abs-victim": ([hard("h", f"{VICTIM_ABS}/hello")], ERROR),
    "hardlink-host-passwd": ([hard("h", "/etc/passwd")], ERROR),
    "hardlink-long-up": ([hard("h", UP + "etc/passwd")], ERROR),
    "hardlink-forward": ([hard("h", "later"), reg("later")], ERROR),
    "hardlink-via-symlink-dir": ([sym("l", "../victim"), hard("h", "l/hello")], ERROR),
    "hardlink-to-outside-symlink": (
        [sym("s", "../victim/hello"), hard("h", "s", mode=0o777), reg("h", b"pwn")],
        OK,
    ),
    "hardlink-to-dir": ([dir_("d"), hard("h", "d")], ERROR),
    "hardlink-to-root": ([hard("h", "/")], ERROR),
    "hardlink-nul-target": ([hard("h", "a")], ERROR),
    # -- whiteouts ---------------------------------------------------------------
    "whiteout-dot": ([reg(".wh..")], ERROR),
    "whiteout-dotdot": ([reg(".wh...")], ERROR),
    "whiteout-dir-dot": ([dir_("dir"), reg("dir/.wh..")], ERROR),
    "whiteout-dir-dotdot": ([dir_("dir"), reg("dir/.wh...")], ERROR),
    "whiteout-empty": ([dir_("dir"), reg("dir/.wh.")], ERROR),
    "whiteout-up": ([wh("../victim/hello")], ERROR),
    "whiteout-dir-component": ([reg(".wh.../victim/hello")], ERROR),
    "whiteout-through-symlink": ([sym("l", "../victim"), wh("l/hello")], OK),
    "whiteout-through-abs-symlink": ([sym("l", VICTIM_ABS), wh("l/hello")], OK),
    "opaque-through-symlink": ([sym("l", "../victim"), reg("l/.wh..wh..opq")], OK),
    "opaque-through-dead-symlink": ([sym("l", "/nowhere"), reg("l/.wh..wh..opq")], OK),
    # -- special files -----------------------------------------------------------
    "char-device": ([node("null", tarfile.CHRTYPE, 1, 3)], OK),
    "block-device": ([node("sda", tarfile.BLKTYPE, 8, 0)], OK),
    "device-at-victim": ([node("../victim/null", tarfile.CHRTYPE, 1, 3)], ERROR),
}


NUL_CASES = {
    "nul-in-name": {"path": "../victim/a\0b"},
    "hardlink-nul-target": {"linkpath": "a\0b"},
}


@pytest.mark.parametrize("case", list(CASES))
def test_single_layer_attack(box: Box, case: str) -> None:
    entries, expected = CASES[case]
    layers = _hostile(box, entries)
    if case in NUL_CASES:  # only a PAX record can carry a NUL byte
        ti = copy.copy(entries[0][0])
        ti.pax_headers = NUL_CASES[case]
        layers = [layer((ti, b""))]
    outcome = box.attack(*layers)
    assert outcome.split(":")[0] == expected, outcome
    # A neutralised write lands in the rootfs: the victim's name there, never the host's.
    assert (box.victim / "hello").read_bytes() == b"hello, victim\n"


TWO_LAYER_CASES = {
    # GNU tar CVE-2025-45582: layer 1 plants the symlink, layer 2 writes through it.
    "symlink-then-write": ([sym("x", "../victim")], [reg("x/hello", b"pwn")], OK),
    "abs-symlink-then-write": ([sym("x", VICTIM_ABS)], [reg("x/hello", b"pwn")], OK),
    "symlink-then-deep-write": ([sym("x", UP)], [reg("x/victim/new/file", b"pwn")], OK),
    "symlink-then-hardlink": ([sym("x", "../victim")], [hard("h", "x/hello")], ERROR),
    "symlink-then-whiteout": ([sym("x", "../victim")], [wh("x/hello")], OK),
    "symlink-then-opaque": ([sym("x", "../victim")], [reg("x/.wh..wh..opq")], OK),
    # CVE-2021-29136: '.' as a symlink in one layer, a write in the next.
    "root-symlink-then-write": ([sym(".", VICTIM_ABS)], [reg("hello", b"pwn")], ERROR),
}


@pytest.mark.parametrize("case", list(TWO_LAYER_CASES))
def test_two_layer_attack(box: Box, case: str) -> None:
    first, second, expected = TWO_LAYER_CASES[case]
    outcome = box.attack(*_hostile(box, first, second))
    assert outcome.split(":")[0] == expected, outcome


def test_neutralised_write_lands_inside(box: Box) -> None:
    box.attack(*_hostile(box, [sym("x", "../victim")], [reg("x/hello", b"pwn")]))
    assert (box.dest / "victim/hello").read_bytes() == b"pwn"
    assert os.readlink(box.dest / "x") == "../victim"


def test_hardlink_to_outside_symlink_is_the_symlink(box: Box) -> None:
    box.attack(*_hostile(box, [sym("s", "../victim/hello"), hard("h", "s", mode=0o777)]))
    assert (box.dest / "h").is_symlink()
    assert (box.dest / "h").lstat().st_ino == (box.dest / "s").lstat().st_ino


def test_preexisting_symlink_in_rootfs(box: Box) -> None:
    # A symlink already in the rootfs (e.g. left by a bootstrap agent) is no way out.
    (box.dest / "etc").symlink_to(box.victim)
    assert box.attack(*_hostile(box, [reg("etc/hello", b"pwn"), wh("etc/x")])) == OK
    assert (box.dest / box.victim.relative_to("/") / "hello").read_bytes() == b"pwn"

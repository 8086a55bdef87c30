"""The public helpers around the parser: model accessors, build-arg files, writer."""

from __future__ import annotations

from pathlib import Path

import pytest

from sifpy.deffile import (
    FileCopy,
    HeaderEntry,
    Recipe,
    Section,
    Stage,
    parse,
    parse_file,
    read_build_arg_file,
    write,
)
from sifpy.errors import DefFileError

MULTI = """\
Bootstrap: docker
From: golang
Stage: devel
%post
    go build
%post -c /bin/bash
    echo more
%labels
    A 1
    B 2
%labels
    A 3

Bootstrap: docker
From: alpine
Stage: final
%files from devel
    /go/hello /bin/hello
%files
    /etc/motd
%apprun x
    run-x
%apprun x
    again
"""


def test_stage_helpers() -> None:
    recipe = parse(MULTI)
    devel = recipe.stage("devel")
    assert devel is not None and recipe.final.name == "final"
    assert devel.get("FROM") == "golang" and devel.bootstrap == "docker"
    # Repeated sections: bodies concatenate in file order, the last args win.
    assert devel.script("post") == "    go build\n    echo more\n"
    assert devel.args("post") == "-c /bin/bash"
    assert devel.script("runscript") is None
    assert devel.labels() == (("A", "3"), ("B", "2"))
    files = recipe.final.files()
    assert files == (
        FileCopy("/go/hello", "/bin/hello", "devel"),
        FileCopy("/etc/motd", "/etc/motd"),
    )
    assert [f.line for f in files] == [18, 20]
    (app,) = recipe.final.apps()
    assert app.name == "x" and app.script("run") == "    run-x\n    again\n"
    assert app.script("install") is None


def test_line_numbers_do_not_count_in_equality() -> None:
    assert Section("post", "", "x\n", 3) == Section("post", "", "x\n", 9)
    assert HeaderEntry("From", "a", 1) == HeaderEntry("From", "a", 2)


def test_write_hand_made_recipe() -> None:
    recipe = Recipe(
        (
            Stage(
                (HeaderEntry("Bootstrap", "docker"), HeaderEntry("Setopt", "a\n\nb\n")),
                (Section("post", "-c /bin/sh", "echo hi\n"), Section("help", "", "")),
            ),
        )
    )
    text = write(recipe)
    assert text.startswith("Bootstrap: docker\nSetopt: a\\n\\\n\\n\\\nb\\n\\\n\n")
    assert parse(text) == recipe


def test_build_args_override_and_warn(capsys: pytest.CaptureFixture[str]) -> None:
    text = "Bootstrap: docker\nFrom: a:{{ V }}\n%arguments\n  V=1\n"
    assert parse(text).final.get("from") == "a:1"
    recipe = parse(text, build_args={"V": "2", "W": "x"}, warn_unused_build_args=True)
    assert recipe.final.get("from") == "a:2"
    assert "unused build args: W" in capsys.readouterr().err


def test_each_stage_uses_its_own_arguments() -> None:
    text = (
        "Bootstrap: docker\nFrom: {{ A }}\nStage: one\n%arguments\n  A=x\n"
        "Bootstrap: docker\nFrom: {{ A }}\n"
    )
    with pytest.raises(DefFileError, match=r"<string>:7: build var A is not defined"):
        parse(text)


def test_value_with_newline_keeps_line_numbers() -> None:
    recipe = parse("Bootstrap: docker\n%post\n  {{ X }}\n%test\n", build_args={"X": "a\nb"})
    assert recipe.final.script("post") == "  a\nb\n"
    assert recipe.final.all("test")[0].line == 4


def test_read_build_arg_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "args"
    path.write_text("# comment\n\nA = 1\nB='two words'\nnot a pair\nC=x=y\n")
    assert read_build_arg_file(path) == {"A": "1", "B": "'two words'", "C": "x=y"}
    assert "args:5: skipping 'not a pair'" in capsys.readouterr().err


def test_read_errors_are_deffileerrors(tmp_path: Path) -> None:
    with pytest.raises(DefFileError, match="can't read definition file"):
        parse_file(tmp_path / "missing.def")
    with pytest.raises(DefFileError, match="can't read build arg file"):
        read_build_arg_file(tmp_path / "missing")
    bad = tmp_path / "bad"
    bad.write_bytes(b"A=1\nB=\xff\n")
    with pytest.raises(DefFileError, match=r"bad:2: not UTF-8"):
        read_build_arg_file(bad)


def test_bom_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "bom.def"
    path.write_bytes(b"\xef\xbb\xbfBootstrap: docker\n")
    assert parse_file(path).final.bootstrap == "docker"

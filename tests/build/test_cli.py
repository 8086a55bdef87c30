"""``sifpy build`` on the command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from sifpy.cli import main
from sifpy.cli.build import _build_args, build_parser
from sifpy.errors import UsageError


def test_parser_flags() -> None:
    a = build_parser("sifpy build").parse_args(
        ["--sandbox", "-F", "-T", "--section", "setup,post", "--build-arg", "A=1", "o", "d.def"]
    )
    assert a.sandbox and a.force and a.notest and a.section == ["setup,post"]


def test_build_args_file_and_override(tmp_path: Path) -> None:
    f = tmp_path / "args"
    f.write_text("A=file\nB=file\n")
    assert _build_args(["A=cli"], str(f)) == {"A": "cli", "B": "file"}
    with pytest.raises(UsageError):
        _build_args(["novalue"], None)


def test_cli_builds_a_sandbox(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "s.def"
    d.write_text("Bootstrap: scratch\n%labels\n    a b\n")
    assert main(["build", "--sandbox", str(tmp_path / "out"), str(d)]) == 0
    assert (tmp_path / "out/.singularity.d/labels.json").is_file()
    assert main(["build", "--sandbox", str(tmp_path / "out"), str(d)]) == 1
    err = capsys.readouterr().err
    assert "already exists" in err and "--force" in err
    assert main(["build", "--section", "nope", "--sandbox", str(tmp_path / "o2"), str(d)]) == 2

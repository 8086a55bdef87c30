"""The exec/run/shell/test fast option parser agrees with argparse on every argv."""

from __future__ import annotations

import pytest

from sifpy.cli.exec import build_parser, fast_parse
from sifpy.errors import UsageError

CASES = [
    ("exec", ["img.sif", "true"]),
    ("exec", ["img.sif", "ls", "-l", "--color"]),
    ("exec", ["-B", "/a:/b", "--bind=/c", "-B/d:/e:ro", "img.sif", "cmd"]),
    ("exec", ["-ce", "--env", "A=1", "--env=B=2", "--env-file", "f", "img", "cmd", "x"]),
    ("exec", ["-C", "-p", "--no-init", "-i", "--pwd", "/w", "img", "cmd"]),
    ("exec", ["--mount-driver", "python", "--unsquash", "img", "cmd"]),
    ("exec", ["--mount", "type=bind,src=/a,dst=/b", "--no-mount", "home,tmp", "img", "c"]),
    ("exec", ["-H", "/h:/home/x", "--no-home", "-W", "/w", "-o", "/ov", "img", "c"]),
    ("exec", ["-f", "-w", "--writable-tmpfs", "--app", "a", "-s", "/bin/zsh", "img", "c"]),
    ("exec", ["--verify", "--verify-key", "k.pem", "img", "c"]),
    ("exec", ["--", "img", "cmd"]),
    ("run", ["img.sif"]),
    ("run", ["img.sif", "a", "-b", "--cleanenv"]),
    ("shell", ["-c", "img"]),
    ("test", ["img"]),
]


@pytest.mark.parametrize(("action", "argv"), CASES)
def test_fast_parse_matches_argparse(action: str, argv: list[str]) -> None:
    fast = fast_parse(action, argv)
    assert fast is not None
    slow = build_parser(action, f"sifpy {action}").parse_args(argv)
    assert vars(fast) == vars(slow)


def test_combined_flags_with_a_value_go_to_argparse() -> None:
    assert fast_parse("exec", ["-cB", "/x", "img", "c"]) is None
    assert build_parser("exec", "sifpy exec").parse_args(["-cB", "/x", "img", "c"]).bind == ["/x"]


def test_everything_after_the_image_is_the_command() -> None:
    """As Apptainer: options after IMAGE belong to the command, even prefixes of ours
    (argparse would call ``--c`` ambiguous)."""
    ns = fast_parse("run", ["img.sif", "a", "--c", "-B"])
    assert ns is not None and ns.args == ["a", "--c", "-B"] and ns.bind == []


@pytest.mark.parametrize(
    ("action", "argv"),
    [
        ("exec", ["img.sif"]),  # no command
        ("exec", ["--bogus", "img", "c"]),
        ("exec", ["-B"]),  # missing value
        ("exec", ["--mount-driver", "nfs", "img", "c"]),  # bad choice
        ("exec", ["--help"]),
        ("run", []),
    ],
)
def test_unusual_input_goes_to_argparse(action: str, argv: list[str]) -> None:
    assert fast_parse(action, argv) is None
    if "--help" not in argv:
        with pytest.raises(UsageError):
            build_parser(action, f"sifpy {action}").parse_args(argv)

"""The exec/run/shell/test fast option parser agrees with argparse on every argv."""

from __future__ import annotations

import os

import pytest

from sifpy.cli.exec_args import parse_binds, parse_duration, parse_mounts, parse_overlays
from sifpy.cli.exec_options import build_parser, fast_parse
from sifpy.errors import ExitStatus, UsageError

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
    ("exec", ["--mpi", "--sharens", "img", "c"]),
    ("exec", ["--", "img", "cmd"]),
    # Apptainer's spellings: --cwd (alias of --pwd), --no-pid, --no-env, --runscript-timeout
    ("exec", ["--cwd", "/w", "-C", "--no-pid", "--no-env", "A,B", "img", "c"]),
    ("run", ["--runscript-timeout", "1m", "--pwd=/x", "img"]),
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


# Bind specs as Apptainer's ParseBindPath reads them (pkg/runtime/engine/apptainer/config/
# bind.go), the cases of e2e/actions/actions.go actionBinds "BindFileWithComma*" and
# "BindFileWithColon*" included: (spec, binds)
BIND_SPECS = [
    ("/a", [("/a", "/a", False)]),
    ("/a:/b", [("/a", "/b", False)]),
    ("/a:/b:ro", [("/a", "/b", True)]),
    ("/a:/b:ro,/c", [("/a", "/b", True), ("/c", "/c", False)]),
    ("/a:/b:ro,rw", [("/a", "/b", False)]),
    ("/d/file\\,comma:/canary/file", [("/d/file,comma", "/canary/file", False)]),
    ("/d/file\\:colon:/canary/file", [("/d/file:colon", "/canary/file", False)]),
    ("/a:/dst\\,x", [("/a", "/dst,x", False)]),
    # BindFileWithCommaKO: unescaped, the comma starts a second bind ("comma:/canary/file").
    ("/d/file,/e:/f", [("/d/file", "/d/file", False), ("/e", "/f", False)]),
]


@pytest.mark.parametrize(("spec", "want"), BIND_SPECS, ids=[s for s, _ in BIND_SPECS])
def test_parse_binds_as_apptainer(spec: str, want: list[tuple[str, str, bool]]) -> None:
    assert parse_binds([spec]) == want


@pytest.mark.parametrize("spec", ["/a:/b:/c:/d", "/a:relative", "/a:/b:rx", ":/b"])
def test_parse_binds_refuses(spec: str) -> None:
    with pytest.raises(UsageError):
        parse_binds([spec])


# --mount as Apptainer reads it: e2e/actions/actions.go actionBinds "MountSingle" and
# "MountNested" (no type=: a bind), issue3501 (nonested).
MOUNT_SPECS = [
    ("type=bind,source=/a,destination=/b", ("/a", "/b", False, False)),
    ("source=/a,destination=/b", ("/a", "/b", False, False)),
    ("src=/a,dst=/b,ro", ("/a", "/b", True, False)),
    ("type=bind,source=/a,destination=/hidden,nonested", ("/a", "/hidden", False, True)),
]


@pytest.mark.parametrize(("spec", "want"), MOUNT_SPECS, ids=[s for s, _ in MOUNT_SPECS])
def test_parse_mounts_as_apptainer(spec: str, want: tuple[str, str, bool, bool]) -> None:
    assert parse_mounts([spec]) == [want]


def test_parse_mounts_refuses_other_types() -> None:
    with pytest.raises(UsageError):
        parse_mounts(["type=tmpfs,destination=/b"])


@pytest.mark.parametrize(("value", "seconds"), [("1m", 60), ("30s", 30), ("1h30m", 5400),
                                                ("1.5s", 1.5), ("250ms", 0.25), ("0", 0),
                                                ("10", None), ("soon", None), ("1m30", None)])  # fmt: skip
def test_runscript_timeout_is_a_go_duration(value: str, seconds: float | None) -> None:
    if seconds is not None:
        assert parse_duration(value) == pytest.approx(seconds)
    else:
        with pytest.raises(UsageError):
            parse_duration(value)


def test_overlays_in_order_with_one_writable() -> None:
    got = parse_overlays(["/a.img:ro", "rel", "/b:ro", "/c:rw:ro"])
    assert got == (("/a.img", False), (os.path.abspath("rel"), True), ("/b", False),
                   ("/c:rw", False))  # fmt: skip
    assert parse_overlays(["/x:rw"]) == (("/x", True),)
    with pytest.raises(UsageError, match="only one --overlay can be writable"):
        parse_overlays(["/a", "/b:rw"])


def test_mpi_with_an_instance_is_refused() -> None:
    # The binds are made when a container is set up: joining an instance can't add them.
    import subprocess
    import sys

    res = subprocess.run(
        [sys.executable, "-m", "sifpy", "exec", "--mpi", "instance://nothing-here", "true"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == ExitStatus.LAUNCH_FAILED, res.stderr  # exec: 125, as docker
    assert "--mpi can't be used with instance://" in res.stderr
    assert "hint: start the instance with --mpi" in res.stderr

"""sifpy.util.proc is the one way sifpy starts a program, and it behaves as its docstring says."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from sifpy.errors import SignatureError, ToolError
from sifpy.util import log, proc

ROOT = Path(__file__).resolve().parent.parent / "sifpy"


def test_no_module_but_proc_uses_subprocess() -> None:
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        if path == ROOT / "util" / "proc.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            if any(n.split(".")[0] == "subprocess" for n in names):
                found.append(f"{path.relative_to(ROOT.parent)}:{node.lineno}")
    assert found == []


def test_the_test_would_see_a_subprocess_import(tmp_path: Path) -> None:
    tree = ast.parse("def f():\n    from subprocess import run\n")
    assert any(isinstance(n, ast.ImportFrom) and n.module == "subprocess" for n in ast.walk(tree))


def test_missing_program_names_the_debian_package() -> None:
    with pytest.raises(ToolError) as exc:
        proc.run(["/nonexistent/mksquashfs", "a", "b"], "pack the image")
    assert exc.value.message == "can't pack the image: mksquashfs: not found"
    assert exc.value.hint == "install the Debian package squashfs-tools"


def test_failure_carries_status_and_stderr_tail() -> None:
    with pytest.raises(ToolError) as exc:
        proc.run(["/bin/sh", "-c", "echo early >&2; echo 'the reason' >&2; exit 3"], "do it")
    assert exc.value.message == "can't do it: sh failed (exit status 3): early\nthe reason"


def test_signal_death_is_a_failure_and_the_error_class_is_the_callers() -> None:
    with pytest.raises(SignatureError) as exc:
        proc.run(["/bin/sh", "-c", "kill -9 $$"], "sign", error=SignatureError)
    assert exc.value.message == "can't sign: sh failed (killed by signal 9)"


def test_ok_none_returns_any_status_and_stdin_is_closed() -> None:
    # `cat` with its stdin closed (DEVNULL) ends at once instead of waiting for a terminal.
    p = proc.run(["/bin/sh", "-c", "cat; exit 7"], "x", stdout=proc.PIPE, ok=None, timeout=10)
    assert (p.returncode, p.stdout) == (7, b"")
    p = proc.run(["/bin/cat"], "x", input=b"fed", stdout=proc.PIPE)
    assert p.stdout == b"fed"


def test_logged_shell_quoted_at_verbose_with_secrets_hidden(
    capsys: pytest.CaptureFixture[str],
) -> None:
    old = log.level
    log.set_level(log.VERBOSE)
    try:
        proc.run(["/bin/true", "a b", "--token=s3cret"], "x", redact=["s3cret"])
    finally:
        log.set_level(old)
    assert capsys.readouterr().err == "+ /bin/true 'a b' --token=***\n"


def test_quiet_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    proc.run(["/bin/true"], "x")
    assert capsys.readouterr().err == ""


def test_popen_missing_program() -> None:
    with pytest.raises(ToolError, match="can't apply layer: zstd: not found"):
        proc.popen(["/nonexistent/zstd", "-dc"], "apply layer")

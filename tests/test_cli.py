"""The CLI frame: global options, help everywhere, errors, and a lean import path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sifpy import __version__
from sifpy.cli import COMMANDS, main
from tests.probe import require

REPO = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sifpy", *args], capture_output=True, text=True, check=False
    )


def test_version() -> None:
    r = run("--version")
    assert r.returncode == 0 and r.stdout == f"sifpy version {__version__}\n"


def test_help_lists_every_command() -> None:
    r = run("--help")
    assert r.returncode == 0
    for name in COMMANDS:
        assert f"  {name} " in r.stdout


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help(name: str) -> None:
    r = run(name, "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: sifpy " + name)


def test_unknown_command_and_option() -> None:
    for args in (["frobnicate"], ["--frob"]):
        r = run(*args)
        assert r.returncode == 2
        assert r.stderr.startswith("error: unknown ")
        assert "hint: " in r.stderr


def test_usage_error_is_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sif", "list"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: sifpy sif list: ") and "Traceback" not in err


def test_debug_shows_traceback() -> None:
    r = run("--debug", "sif", "list", "/nonexistent.sif")
    assert r.returncode == 1
    assert "Traceback" in r.stderr and "error: can't open SIF" in r.stderr
    r = run("sif", "list", "/nonexistent.sif")
    assert "Traceback" not in r.stderr


def test_quiet_and_verbose_accepted() -> None:
    assert run("-q", "sif", "--help").returncode == 0
    assert run("-v", "sif", "--help").returncode == 0


def test_cli_import_is_lean() -> None:
    """Importing the command table must not pull in heavy modules (exec's start-up cost)."""
    code = (
        "import sys, sifpy.cli; "
        "heavy = {'argparse', 'json', 'requests', 'rich', 'cryptography', 'construct', "
        "'PySquashfsImage', 'sifpy.sif', 'sifpy.deffile', 'sifpy.oci'} & set(sys.modules); "
        "print(sorted(heavy))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"


def test_exec_family_exits_with_its_messages_flushed() -> None:
    """exec/run/shell/test end with os._exit (no interpreter teardown on every start): what
    they wrote must still come out, with their exit status."""
    r = run("exec", "/nonexistent.sif", "true")
    assert r.returncode == 125
    assert r.stderr.startswith("error: can't open image: /nonexistent.sif")


def test_exec_family_starts_without_cyclic_collections() -> None:
    """The collector is paused while exec/run/shell/test start a container: the exec path's
    imports alone trigger several collections (~0.3 ms of every start, bench/exec). A
    collection that starts after sifpy.cli is imported is printed; none may run."""
    code = (
        f"import gc, os, sys; sys.path.insert(0, {str(REPO)!r}); from sifpy.cli import entry; "
        "gc.callbacks.append(lambda phase, info: phase == 'start' and os.write(2, b'collect\\n')); "
        "sys.argv = ['sifpy', 'exec', '/nonexistent.sif', 'true']; entry()"
    )
    r = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, check=False
    )
    assert r.returncode == 125
    assert r.stderr.startswith("error: can't open image: /nonexistent.sif"), r.stderr
    assert "collect" not in r.stderr


def test_other_commands_and_the_monitor_collect() -> None:
    """Every other command runs with the collector on (a build or a pull may run for hours),
    and so does a start once it only waits for the container (the monitor)."""
    import gc
    import signal

    from sifpy.cli import _dispatch
    from sifpy.runtime import supervise

    try:
        gc.disable()
        assert _dispatch(["version"]) == ("version", 0)
        assert gc.isenabled()
        gc.disable()
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        try:
            pid = os.fork()
            if pid == 0:
                os._exit(3)
            assert os.waitstatus_to_exitcode(supervise.supervise(pid, pid, False)) == 3
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        assert gc.isenabled()
    finally:
        gc.enable()


def test_launcher_script_runs_without_site(tmp_path: Path) -> None:
    """The launcher script (make venv writes .venv/bin/sifpy when no C compiler is there):
    Python with -I -S and the directories site would have added listed in the script, so
    sifpy and its installed dependencies import as from pip's script."""
    import sysconfig

    from sifpy.cli import launcher

    dest = tmp_path / "sifpy"
    assert launcher.write(str(dest), script=True) == "script"
    text = dest.read_text()
    assert text.startswith(f"#!{sys.executable} -IS\n")
    assert dest.stat().st_mode & 0o777 == 0o755
    paths = launcher.site_paths(sys.executable)
    if sys.prefix != sys.base_prefix:  # in a venv: its site-packages is listed
        assert sysconfig.get_paths()["purelib"] in paths
    r = subprocess.run([str(dest), "--version"], capture_output=True, text=True, check=False)
    assert r.returncode == 0 and r.stdout == f"sifpy version {__version__}\n", r.stderr
    # What pip installed next to sifpy imports, and the site module never ran.
    probe = tmp_path / "probe"
    probe.write_text(
        text.replace(
            "from sifpy.cli import entry\nentry()\n",
            "import requests, sifpy.cli\nprint('site' in sys.modules)\n",
        )
    )
    probe.chmod(0o755)
    r = subprocess.run([str(probe)], capture_output=True, text=True, check=False)
    assert r.returncode == 0 and r.stdout == "False\n", r.stderr


def test_starter_builds_cleanly_and_runs_python(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a C compiler the launcher is the starter (sifpy/cli/starter.c), warning-free
    with -Wall -Wextra; it runs the CLI with every argument (the namespace part is shown
    end to end in integration/runtime/test_cli_exec.py)."""
    import shutil

    from sifpy.cli import launcher

    require(None if shutil.which("cc") else "no C compiler (cc) for the starter")
    monkeypatch.setattr(launcher, "CFLAGS", ["-Werror"])
    dest = tmp_path / "sifpy"
    assert launcher.write(str(dest)) == "starter"
    assert dest.read_bytes()[:4] == b"\x7fELF"
    r = subprocess.run([str(dest), "--version"], capture_output=True, text=True, check=False)
    assert r.returncode == 0 and r.stdout == f"sifpy version {__version__}\n", r.stderr
    r = subprocess.run(
        [str(dest), "sif", "list", "/nonexistent.sif"], capture_output=True, text=True, check=False
    )
    assert r.returncode == 1 and r.stderr.startswith("error: can't open SIF"), r.stderr
    # A stale SIFPY_SERVED from the environment is never taken for the starter's own.
    r = subprocess.run(
        [str(dest), "exec", "/nonexistent.sif", "true"],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "SIFPY_SERVED": "3,1,4,0,0,0,0"},
    )
    assert r.returncode == 125 and r.stderr.startswith("error: can't open image"), r.stderr


def test_starter_config_agrees_with_the_python_side() -> None:
    """The starter's option table is generated from exec's OPTIONS: every flag is in it,
    with whether it takes a value; strings are escaped for C."""
    from sifpy.cli import launcher
    from sifpy.cli.exec_options import OPTIONS

    config = launcher.starter_config("/usr/bin/python3", "print('x')\n")
    for flags, kw in OPTIONS:
        value = int(kw.get("action") != "store_true")
        for flag in flags:
            assert f'{{"{flag}", {value}, ' in config
    assert '{"--unsquash", 0, OPT_NO_EARLY}' in config
    assert '{"-f", 0, OPT_FAKEROOT}' in config
    assert "#define SIFPY_BOOT \"print('x')\\012\"" in config
    assert launcher.c_string('a"b\\c?\u00e9') == '"a\\042b\\134c\\077\\303\\251"'


def test_a_stale_served_state_is_refused() -> None:
    """SIFPY_SERVED names the starter's own child and fds; anything else (here: pid 1, from
    a stale environment) is refused with 125 and a hint, never used."""
    r = subprocess.run(
        [sys.executable, "-m", "sifpy", "exec", "/nonexistent.sif", "true"],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "SIFPY_SERVED": "3,1,4,0,0,0,0"},
    )
    assert r.returncode == 125
    assert r.stderr.startswith("error: can't use the image the starter served: "), r.stderr
    assert "hint: " in r.stderr


def test_only_the_starter_serves_early() -> None:
    """One owner for the early serve: the starter (starter.c) creates the image's detached
    FUSE mount and starts its server before Python starts, and hands them over in
    SIFPY_SERVED. No Python module creates a FUSE mount detached (without the starter,
    Python mounts in order), so two copies of that sequence can't drift apart."""
    hits = []
    for path in sorted((REPO / "sifpy").rglob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if 'detached_mount("fuse"' in line or "def fuse_serve(" in line:
                hits.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert hits == []
    starter = (REPO / "sifpy/cli/starter.c").read_text()
    assert "syscall(SYS_fsmount, fs" in starter and 'setenv("SIFPY_SERVED"' in starter


def test_did_you_mean() -> None:
    r = run("biuld", "x.def")
    assert r.returncode == 2
    assert r.stderr == "error: unknown command: biuld\nhint: did you mean 'build'?\n"
    r = run("zzzz")
    assert "did you mean" not in r.stderr and r.returncode == 2


def test_version_and_help_commands_and_short_debug() -> None:
    r = run("version")
    assert r.returncode == 0 and r.stdout == f"{__version__}\n"
    r = run("help", "pull")
    assert r.returncode == 0 and r.stdout == run("pull", "--help").stdout
    assert run("help").stdout == run("--help").stdout
    r = run("-d", "sif", "list", "/nonexistent.sif")
    assert "Traceback" in r.stderr


def test_quiet_silences_warnings(capsys: pytest.CaptureFixture[str]) -> None:
    from sifpy.util import log

    old = log.level
    try:
        for opt in ("-q", "-s"):
            main([opt, "version"])  # sets the level, as the CLI does
            capsys.readouterr()
            log.warn("something odd")
            assert capsys.readouterr().err == ""
        log.set_level(log.NORMAL)
        log.warn("something odd")
        assert capsys.readouterr().err == "warning: something odd\n"
    finally:
        log.set_level(old)


def test_bash_completion(tmp_path: Path) -> None:
    script = run("completion", "bash").stdout
    (tmp_path / "c.bash").write_text(script)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "sifpy").write_text(f'#!/bin/sh\nexec {sys.executable} -m sifpy "$@"\n')
    (bindir / "sifpy").chmod(0o755)
    probe = (
        f"source {tmp_path}/c.bash; PATH={bindir}:$PATH\n"
        'COMP_WORDS=(sifpy bu); COMP_CWORD=1; _sifpy; echo "${COMPREPLY[*]}"\n'
        'COMP_WORDS=(sifpy build --no-h); COMP_CWORD=2; _sifpy; echo "${COMPREPLY[*]}"\n'
    )
    r = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, cwd=REPO)
    assert r.stdout.splitlines() == ["build", "--no-https"], r.stderr


def test_apptainer_options_sifpy_lacks_are_named() -> None:
    for cmd in (["exec", "--uts", "x.sif", "true"], ["build", "--encrypt", "x.sif", "x.def"]):
        r = run(*cmd)
        assert r.returncode == (125 if cmd[0] == "exec" else 2)  # exec: sifpy's own failure
        first = r.stderr.splitlines()[0]
        assert first == f"error: sifpy {cmd[0]}: Apptainer's {cmd[1]} is not supported yet"
        assert "unrecognized" not in r.stderr
    r = run("build", "--frobnicate", "x.sif", "x.def")
    assert r.stderr.splitlines()[0] == "error: sifpy build: unknown option: --frobnicate"

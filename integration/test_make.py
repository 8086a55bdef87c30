"""The README's first steps, as an ordinary user on a machine whose Debian packages are
installed: ``make demo`` in a fresh copy of the repository, then ``make install
PREFIX=...`` and an image that runs itself (``./app.sif``, through ``run-singularity``).

These run the real Makefile (a venv, pip, the compiled starter), so they take a minute or
two and need the package index pip is configured with.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from integration.conftest import REPO, UserRunner, require

_SKIP_ANYWHERE = shutil.ignore_patterns(
    ".git", ".venv", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache", "*.sif",
    "*.egg-info",
)  # fmt: skip


def _skip(directory: str, names: list[str]) -> set[str]:
    """What a fresh clone lacks: caches, venvs and images anywhere, and setuptools' build/
    at the top only (sifpy/build/ and integration/build/ are sources, as .gitignore says)."""
    skipped = set(_SKIP_ANYWHERE(directory, names))
    if os.path.samefile(directory, REPO):
        skipped |= {"build"} & set(names)
    return skipped


@pytest.fixture(scope="module")
def repo_copy(runtime_ready: UserRunner, workdir: Path) -> Iterator[Path]:
    """A copy of the repository owned by the test user, as if they had cloned it."""
    require(None if shutil.which("make") else "make is not installed")
    missing = subprocess.run(["make", "-s", "-C", str(REPO), "apt"], capture_output=True, text=True)
    require(missing.stderr.strip() if missing.returncode else None)
    dest = workdir / "clone"
    shutil.copytree(REPO, dest, ignore=_skip, symlinks=True)
    if os.getuid() == 0:
        u = runtime_ready.user
        for dirpath, dirnames, filenames in os.walk(dest):
            for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
                os.lchown(name, u.uid, u.gid)
    yield dest
    shutil.rmtree(dest, ignore_errors=True)


def _env(runner: UserRunner, **extra: str) -> dict[str, str]:
    env = runner.env(extra)
    env.pop("PYTHONPATH")  # a user's shell has none: the venv must stand alone
    env.pop("PYTHONDONTWRITEBYTECODE")
    return env


def test_make_demo_as_an_ordinary_user(runtime_ready: UserRunner, repo_copy: Path) -> None:
    r = subprocess.run(
        runtime_ready.argv(["make", "demo"]),
        cwd=repo_copy,
        env=_env(runtime_ready),
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    # `sifpy run demo.sif`, then `./demo.sif` through run-singularity.
    assert out.count("hello from sifpy") == 2, out[-4000:]
    assert f"\n{runtime_ready.user.uid}\n" in r.stdout  # the same user inside
    # Set-up stays quiet: no setuptools deprecation walls.
    assert "Deprecat" not in out and "!!" not in out, out
    # A second `make demo` does no set-up again.
    again = subprocess.run(
        runtime_ready.argv(["make", "-n", "venv"]),
        cwd=repo_copy,
        env=_env(runtime_ready),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 0 and "Nothing to be done" in again.stdout, again.stdout


def test_make_test_as_an_ordinary_user(runtime_ready: UserRunner, repo_copy: Path) -> None:
    """The set-up, lint and type check of ``make test``, and a part of the suite (all of it
    would run the suite within the suite)."""
    env = _env(runtime_ready, PYTEST_ADDOPTS="tests/test_cli.py tests/test_layering.py")
    r = subprocess.run(
        runtime_ready.argv(["make", "test"]),
        cwd=repo_copy,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "All checks passed!" in out and "Success: no issues found" in out, out[-4000:]
    assert " passed" in out.splitlines()[-1], out[-2000:]


def test_make_install_and_a_self_running_image(
    runtime_ready: UserRunner, repo_copy: Path, workdir: Path
) -> None:
    mine = workdir / "first-steps"
    mine.mkdir()
    if os.getuid() == 0:
        os.chown(mine, runtime_ready.user.uid, runtime_ready.user.gid)
    prefix = mine / "prefix"
    home = runtime_ready.user.home
    r = subprocess.run(
        runtime_ready.argv(["make", "install", f"PREFIX={prefix}"]),
        cwd=repo_copy,
        env=_env(runtime_ready),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert (prefix / "bin" / "sifpy").exists() and (prefix / "bin" / "run-singularity").exists()
    assert "_sifpy" in (prefix / "share/bash-completion/completions/sifpy").read_text()
    # The checkout is not needed any more: a build and a run from the installed program.
    shutil.rmtree(repo_copy / "sifpy")
    env = _env(runtime_ready, PATH=f"{prefix}/bin:/usr/bin:/bin")
    shutil.copy(REPO / "recipes" / "busybox-hello.def", mine / "hello.def")
    os.chmod(mine / "hello.def", 0o644)
    sh = 'cd "$1" && sifpy build --force hello.def && ./hello.sif'
    r = subprocess.run(
        runtime_ready.argv(["sh", "-c", sh, "sh", str(mine)]),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=home,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout == "hello from sifpy\n"

"""Fixtures for the build tests: sifpy build as root and as the unprivileged test user.

Each recipe is built once per module and identity (the Debian ones take ~40 s each);
images land in a world-readable scratch directory, one subdirectory per identity.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from integration.conftest import REPO, UserRunner, require

RECIPES = REPO / "recipes"
IDENTITIES = ("root", "user")


@dataclass
class Builder:
    """Runs ``sifpy`` as root (this interpreter) or as the test user."""

    identity: str
    runner: UserRunner
    out: Path
    recipes: Path

    def argv(self, args: list[str]) -> list[str]:
        python = sys.executable if self.identity == "root" else "/usr/bin/python3"
        return [python, "-m", "sifpy", *args]

    def env(self) -> dict[str, str]:
        if self.identity == "user":
            env = self.runner.env()
        else:  # the checkout under test, whatever the interpreter has installed
            env = dict(os.environ, PYTHONPATH=str(REPO))
        env.pop("SIFPY_TMPDIR", None)
        return env

    def run(self, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess[str]:
        if self.identity == "user":
            return self.runner(self.argv(args), timeout=timeout, cwd=str(self.out))
        return subprocess.run(
            self.argv(args),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=str(self.out),
            env=self.env(),
        )

    def popen(self, args: list[str]) -> subprocess.Popen[str]:
        kw = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "cwd": str(self.out)}
        if self.identity == "user":
            proc: subprocess.Popen[str] = self.runner.popen(self.argv(args), **kw)
            return proc
        return subprocess.Popen(self.argv(args), text=True, env=self.env(), **kw)  # type: ignore[call-overload]

    def build(self, name: str, *extra: str) -> Path:
        """Build ``recipes/<name>.def`` into ``<out>/<name>.sif``; fail with its output."""
        sif = self.out / f"{name}.sif"
        res = self.run(["build", "--force", *extra, str(sif), str(self.recipes / f"{name}.def")])
        assert res.returncode == 0, (
            f"build of {name} as {self.identity} failed:\n{res.stdout}{res.stderr}"
        )
        return sif


@pytest.fixture(scope="session")
def build_ready(runtime_ready: UserRunner) -> UserRunner:
    for tool in ("mksquashfs", "unsquashfs", "siftool", "squashfuse_ll", "busybox"):
        require(None if shutil.which(tool) else f"{tool} is not installed")
    return runtime_ready


@pytest.fixture(scope="session")
def recipes_copy(workdir: Path) -> Path:
    """A world-readable copy of recipes/ (the checkout may not be readable by the user)."""
    dest = workdir / "recipes"
    if not dest.exists():
        shutil.copytree(RECIPES, dest)
        for p in [dest, *dest.iterdir()]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
    return dest


def _builder(identity: str, runner: UserRunner, workdir: Path, recipes: Path) -> Builder:
    out = workdir / f"build-{identity}"
    out.mkdir(exist_ok=True)
    if identity == "user" and os.getuid() == 0:
        os.chown(out, runner.user.uid, runner.user.gid)
    return Builder(identity, runner, out, recipes)


@pytest.fixture(scope="session", params=IDENTITIES)
def builder(
    request: pytest.FixtureRequest, build_ready: UserRunner, workdir: Path, recipes_copy: Path
) -> Builder:
    """One builder per identity (root, then the unprivileged test user)."""
    identity = str(request.param)
    if identity == "root":
        require(None if os.getuid() == 0 else "not running as root")
    return _builder(identity, build_ready, workdir, recipes_copy)


@pytest.fixture(scope="session")
def user_builder(build_ready: UserRunner, workdir: Path, recipes_copy: Path) -> Builder:
    return _builder("user", build_ready, workdir, recipes_copy)


def need_debian() -> None:
    """Skip (fail in CI) without mmdebstrap or a reachable Debian mirror."""
    require(None if shutil.which("mmdebstrap") else "mmdebstrap is not installed")


@contextlib.contextmanager
def mounted(sif: Path) -> Iterator[Path]:
    """The image's primary squashfs, mounted with ``squashfuse_ll -o offset=N``."""
    from sifpy.sif import SifImage

    with SifImage.open(sif) as img:
        offset = img.primary_partition().offset
    mnt = Path(tempfile.mkdtemp(prefix="sifpy-mnt-"))
    subprocess.run(["squashfuse_ll", "-o", f"offset={offset}", str(sif), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
        mnt.rmdir()

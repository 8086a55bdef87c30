"""Shared fixtures for the end-to-end tests.

Unprivileged behaviour is tested as an unprivileged user: when the suite runs as root (CI),
a test user is created and sifpy runs through ``setpriv``. The checkout may sit under a
directory that user cannot traverse (``/root``, mode 0700), so the ``sifpy`` package is
copied into a world-readable temporary directory and run with Debian's ``/usr/bin/python3``
(the runtime needs no third-party package). Missing capabilities skip with a precise reason,
but fail when ``CI=true``.
"""

from __future__ import annotations

import dataclasses
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.probe import require

REPO = Path(__file__).resolve().parent.parent
TEST_USER = os.environ.get("SIFPY_TEST_USER", "sifpytest")
PYTHON = "/usr/bin/python3"


# The one probe: skip locally, fail in CI (tests/probe.py).
__all__ = ["require"]


@dataclasses.dataclass(frozen=True)
class User:
    """The account the unprivileged tests run as."""

    name: str
    uid: int
    gid: int
    home: str


def _world_readable_dir(prefix: str) -> str:
    path = tempfile.mkdtemp(prefix=prefix)
    os.chmod(path, 0o755)
    return path


@pytest.fixture(scope="session")
def test_user() -> User:
    """The unprivileged test user (created with useradd when running as root)."""
    if os.getuid() != 0:
        pw = pwd.getpwuid(os.getuid())
        return User(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir)
    try:
        pw = pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(["useradd", "-m", "-s", "/bin/sh", TEST_USER], check=True)
        pw = pwd.getpwnam(TEST_USER)
    os.makedirs(pw.pw_dir, exist_ok=True)
    os.chown(pw.pw_dir, pw.pw_uid, pw.pw_gid)
    # Debian's useradd gives new users subordinate id ranges; the test user must have none,
    # so that unprivileged builds take the normal path (root emulation, no newuidmap).
    for path in ("/etc/subuid", "/etc/subgid"):
        if os.path.exists(path):
            with open(path) as f:
                lines = f.read().splitlines(keepends=True)
            keep = [ln for ln in lines if not ln.startswith((f"{TEST_USER}:", f"{pw.pw_uid}:"))]
            if keep != lines:
                with open(path, "w") as f:
                    f.writelines(keep)
    # Machines here ship /dev/fuse 0600; an unprivileged FUSE mount needs it 0666 (the
    # Debian default).
    if os.path.exists("/dev/fuse"):
        os.chmod("/dev/fuse", 0o666)
    return User(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir)


def _runtime_closure() -> list[Path]:
    """Installed files of sifpy's runtime dependencies, recursively (not the test tools)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = [r for r in metadata.requires("sifpy") or [] if "extra ==" not in r]
    files: list[Path] = []
    while todo:
        req = Requirement(todo.pop())
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = req.name.lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        dist = metadata.distribution(req.name)
        files += [Path(str(dist.locate_file(f))) for f in dist.files or []]
        todo += [r for r in dist.requires or [] if "extra ==" not in r]
    return files


@pytest.fixture(scope="session")
def sifpy_copy() -> Iterator[str]:
    """A world-readable copy of ``sifpy`` and its runtime dependencies (as installed in the
    test venv); the directory goes on PYTHONPATH for Debian's ``/usr/bin/python3``."""
    import sysconfig

    path = _world_readable_dir("sifpy-lib-")
    shutil.copytree(
        REPO / "sifpy", Path(path) / "sifpy", ignore=shutil.ignore_patterns("__pycache__")
    )
    site = Path(sysconfig.get_paths()["purelib"])
    for f in _runtime_closure():
        try:
            rel = f.resolve().relative_to(site.resolve())
        except ValueError:
            continue  # scripts in bin/ and the like
        if f.suffix == ".pyc" or not f.is_file():
            continue
        (Path(path) / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, Path(path) / rel)
    for dirpath, dirnames, filenames in os.walk(path):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o755)
        for f in filenames:  # programs (sifpy's FUSE server) stay executable
            f = os.path.join(dirpath, f)
            os.chmod(f, 0o755 if os.stat(f).st_mode & 0o100 else 0o644)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def workdir() -> Iterator[Path]:
    """A world-readable scratch directory for images, shared by the session."""
    path = _world_readable_dir("sifpy-it-")
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def images(workdir: Path) -> dict[str, dict[str, Any]]:
    """The busybox test images (integration/runtime/conftest.py builds them), made once per
    session for every directory that uses them (runtime, slurm)."""
    from integration.runtime.conftest import build_images

    return build_images(workdir)


@pytest.fixture(scope="session")
def starter(sifpy_copy: str, workdir: Path) -> str:
    """The compiled ``sifpy`` (integration/runtime/conftest.py builds it), once per session."""
    from integration.runtime.conftest import build_starter

    return build_starter(sifpy_copy, workdir)


class UserRunner:
    """Runs commands as the test user with a minimal, explicit environment."""

    def __init__(self, user: User, pythonpath: str) -> None:
        self.user = user
        self.pythonpath = pythonpath

    def argv(self, argv: list[str]) -> list[str]:
        """Prefix ``argv`` so that it runs as the test user (``setpriv`` execs, no fork)."""
        if os.getuid() != 0:
            return argv
        u = self.user
        return ["setpriv", f"--reuid={u.uid}", f"--regid={u.gid}", "--init-groups", "--", *argv]

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The environment the test user's processes get."""
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
            "HOME": self.user.home,
            "USER": self.user.name,
            "LANG": "C.UTF-8",
            "PYTHONPATH": self.pythonpath,
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        env.update(extra or {})
        return env

    def __call__(
        self, argv: list[str], env: dict[str, str] | None = None, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` as the user, capture text output; ``kw`` goes to subprocess.run."""
        kw.setdefault("cwd", self.user.home)
        kw.setdefault("timeout", 60)
        return subprocess.run(
            self.argv(argv), env=self.env(env), capture_output=True, text=True, **kw
        )

    def popen(self, argv: list[str], env: dict[str, str] | None = None, **kw: Any) -> Any:
        """Start ``argv`` as the user; the returned Popen's pid is the command's own."""
        kw.setdefault("cwd", self.user.home)
        return subprocess.Popen(self.argv(argv), env=self.env(env), text=True, **kw)

    def python(self, code: str, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run a Python snippet as the user with Debian's interpreter and the sifpy copy."""
        return self(["/usr/bin/python3", "-c", code, *args], **kw)


@pytest.fixture(scope="session")
def run_as_user(test_user: User, sifpy_copy: str) -> UserRunner:
    """``run_as_user(argv, **kw)``: run a command as the unprivileged test user."""
    return UserRunner(test_user, sifpy_copy)


@pytest.fixture(scope="session")
def runtime_ready(run_as_user: UserRunner) -> UserRunner:
    """The test user can create user namespaces and mount FUSE in them; else skip/fail."""
    for tool in ("setpriv", "mksquashfs", "siftool", "squashfuse_ll", "busybox"):
        if os.getuid() == 0 or tool != "setpriv":
            require(None if shutil.which(tool) else f"{tool} is not installed")
    probe = (
        "from sifpy.runtime import probes\n"
        "r = probes.userns_available()\n"
        "r = r and 'user namespaces: ' + r or (probes.fuse_available() and 'FUSE in a user "
        "namespace: ' + probes.fuse_available())\n"
        "print(r or '')\n"
    )
    res = run_as_user.python(probe)
    require(res.stderr.strip() or res.stdout.strip() or None)
    return run_as_user

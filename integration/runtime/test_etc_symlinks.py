"""An image whose ``/etc/passwd`` or ``/etc/group`` is a symlink must not redirect the
generated files the runtime binds there: ``/etc/passwd -> /dev/null`` would cover the
container's ``/dev/null``, ``/etc/group -> ../home/USER/.profile-victim`` a file of the
user's home. The entry itself is replaced (in the container's throw-away root), the
symlink's target is untouched, and ``id``/``whoami`` still work inside."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from integration.conftest import User, UserRunner
from integration.runtime.conftest import busybox_rootfs, make_sif

pytestmark = pytest.mark.unpriv

VICTIM = ".profile-victim"
PROBE = (
    "whoami; id -gn; "
    # the generated files sit on /etc/passwd and /etc/group themselves, as regular files
    "test -f /etc/passwd -a ! -L /etc/passwd -a -f /etc/group -a ! -L /etc/group && echo plain; "
    'grep -c "^$(id -un):" /etc/passwd; '
    # and not on what the image's symlinks pointed at
    "test -c /dev/null && echo null-is-a-device; "
    f'cat "$HOME/{VICTIM}"; '
    "grep -E ' /etc/(passwd|group) ' /proc/self/mountinfo | cut -d' ' -f5 | sort"
)


@pytest.fixture(scope="module")
def linked(workdir: Path, test_user: User) -> dict[str, str]:
    """A SIF and a sandbox whose /etc/passwd and /etc/group are the hostile symlinks."""

    def links(root: Path) -> None:
        (root / "etc" / "passwd").unlink()
        (root / "etc" / "passwd").symlink_to("/dev/null")
        (root / "etc" / "group").unlink()
        (root / "etc" / "group").symlink_to(f"..{test_user.home}/{VICTIM}")

    rootfs = busybox_rootfs(workdir / "etc-links-rootfs", links)
    return {"sif": make_sif(rootfs, workdir / "etc-links.sif")["sif"], "sandbox": str(rootfs)}


@pytest.fixture()
def victim(test_user: User) -> Iterator[Path]:
    """The file in the user's home the image's /etc/group points at."""
    path = Path(test_user.home) / VICTIM
    path.write_text("the user's own file\n")
    os.chown(path, test_user.uid, test_user.gid)
    before = path.stat()
    yield path
    after = path.stat()
    assert path.read_text() == "the user's own file\n"
    assert (after.st_mtime_ns, after.st_ino) == (before.st_mtime_ns, before.st_ino)
    path.unlink()


@pytest.fixture(params=["python", "starter"])
def program(request: pytest.FixtureRequest, runtime_ready: UserRunner) -> list[str]:
    if request.param == "starter":
        return [request.getfixturevalue("starter")]
    return ["/usr/bin/python3", "-m", "sifpy"]


@pytest.mark.parametrize(
    "image, opts",
    [("sif", ()), ("sif", ("--writable-tmpfs",)), ("sandbox", ())],
    ids=["sif", "writable-tmpfs", "sandbox"],
)
def test_generated_files_replace_the_symlinks(
    runtime_ready: UserRunner,
    linked: dict[str, str],
    victim: Path,
    program: list[str],
    no_leftovers: None,
    image: str,
    opts: tuple[str, ...],
) -> None:
    user = runtime_ready.user
    r = runtime_ready([*program, "exec", *opts, linked[image], "sh", "-c", PROBE])
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        user.name,
        runtime_ready.python(
            "import grp, os; print(grp.getgrgid(os.getgid()).gr_name)"
        ).stdout.strip(),
        "plain",
        "1",
        "null-is-a-device",
        "the user's own file",
        "/etc/group",
        "/etc/passwd",
    ], r.stderr
    # The image itself still has its symlinks (a sandbox is the user's directory).
    if image == "sandbox":
        assert os.readlink(Path(linked["sandbox"]) / "etc" / "passwd") == "/dev/null"


def test_writable_sandbox_is_refused_not_followed(
    runtime_ready: UserRunner, linked: dict[str, str], victim: Path, workdir: Path
) -> None:
    """``--writable`` on the user's own sandbox: replacing its entry would change the
    user's directory for good, following it would cover the target: refuse (125)."""
    sandbox = workdir / "etc-links-own"
    if not sandbox.exists():  # the user's own copy: --writable needs a directory it owns
        shutil.copytree(linked["sandbox"], sandbox, symlinks=True)
        for dirpath, dirnames, filenames in os.walk(sandbox):
            for name in [".", *dirnames, *filenames]:
                os.lchown(os.path.join(dirpath, name), victim.stat().st_uid, victim.stat().st_gid)
    r = runtime_ready(["/usr/bin/python3", "-m", "sifpy", "exec", "--writable", str(sandbox), "id"])
    assert r.returncode == 125, r.stdout + r.stderr
    assert "error: can't mount: /etc/passwd: it is a symlink in the image" in r.stderr
    assert os.readlink(sandbox / "etc" / "passwd") == "/dev/null"

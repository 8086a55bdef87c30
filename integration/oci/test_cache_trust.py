"""A cache another user can change is refused, and a cached SIF whose bytes changed is not
handed out: ``sifpy pull`` from the real registry, as the unprivileged test user."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from pathlib import Path

import pytest

from integration.conftest import UserRunner, require
from integration.oci.conftest import Registry, SifpyEnv
from sifpy.oci.cache import Cache
from sifpy.sif import SifImage


def pull(runner: UserRunner, cache: Path, out: Path, ref: str) -> subprocess.CompletedProcess[str]:
    return runner(
        ["/usr/bin/python3", "-m", "sifpy", "pull", "--insecure", str(out), ref],
        env={"SIFPY_CACHEDIR": str(cache)},
        timeout=120,
    )


@pytest.fixture()
def user_out(run_as_user: UserRunner, workdir: Path, request: pytest.FixtureRequest) -> Path:
    """A directory of the test user's for pull outputs and caches."""
    path = workdir / f"cache-trust-{request.node.name.translate({ord(c): '-' for c in '[]/'})}"
    path.mkdir()
    os.chown(path, run_as_user.user.uid, run_as_user.user.gid)
    return path


@pytest.mark.parametrize("kind", ["world-writable", "foreign-owned"])
def test_planted_sif_in_a_cache_others_control_is_refused(
    registry: Registry,
    sifpy: SifpyEnv,
    run_as_user: UserRunner,
    workdir: Path,
    user_out: Path,
    tmp_path: Path,
    kind: str,
) -> None:
    """Another user (nobody) plants ``sif/sha256/<manifest>.sif`` in a cache the test user
    is pointed at; the pull refuses the cache instead of handing the planted file out."""
    require(None if os.getuid() == 0 else "a second user's files need root to set up")
    ref = f"docker://{registry.host}/test/plain:1"
    sifpy.run("pull", "--insecure", tmp_path / "genuine.sif", ref)
    digest = Cache(sifpy.cache).entries()[0].digest
    evil = workdir / f"evil-{kind}.sif"
    shutil.copy(Path(__file__), evil)  # anything but the image
    evil.chmod(0o644)
    nobody = pwd.getpwnam("nobody")
    cache = workdir / f"cache-{kind}"
    sifdir = cache / "sif" / "sha256"
    sifdir.mkdir(parents=True)
    planted = sifdir / f"{digest.split(':')[1]}.sif"
    if kind == "world-writable":  # the test user's own cache, but mode 0777
        for d in (cache, cache / "sif", sifdir):
            os.chown(d, run_as_user.user.uid, run_as_user.user.gid)
            d.chmod(0o777)
        subprocess.run(
            ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups",
             "cp", str(evil), str(planted)],
            check=True,
        )  # fmt: skip
    else:
        shutil.copy(evil, planted)
        for p in (cache, cache / "sif", sifdir, planted):
            os.chown(p, nobody.pw_uid, nobody.pw_gid)
    out = user_out / "out.sif"
    r = pull(run_as_user, cache, out, ref)
    assert r.returncode == 1 and not out.exists(), r.stderr
    why = "writable by other users" if kind == "world-writable" else "not by you"
    lines = r.stderr.splitlines()
    (n,) = [i for i, line in enumerate(lines) if line.startswith("error:")]
    assert lines[n].startswith(f"error: can't use cache: {cache}: ") and why in lines[n], r.stderr
    assert lines[n + 1].startswith("hint: another user could plant images"), r.stderr
    assert planted.read_bytes() == evil.read_bytes()


def test_cached_sif_with_changed_bytes_is_not_handed_out(
    registry: Registry, run_as_user: UserRunner, user_out: Path
) -> None:
    """The test user's own cache: a cached SIF changed in place (its mtime put back) is
    removed and built again, never copied out; the rebuilt one is then reused."""
    ref = f"docker://{registry.host}/test/plain:1"
    cache = user_out / "cache"
    r = pull(run_as_user, cache, user_out / "a.sif", ref)
    assert r.returncode == 0, r.stderr
    (cached,) = Cache(cache).sifs.glob("*.sif")
    st = cached.stat()
    with open(cached, "r+b") as f:
        f.seek(st.st_size - 100)
        f.write(b"tampered!")
    os.utime(cached, ns=(st.st_atime_ns, st.st_mtime_ns))
    tampered = cached.read_bytes()
    r = pull(run_as_user, cache, user_out / "b.sif", ref)
    assert r.returncode == 0, r.stderr
    assert "its bytes are not the ones written; making it again" in r.stderr, r.stderr
    assert "from the cache" not in r.stderr
    b = (user_out / "b.sif").read_bytes()
    assert b != tampered and b"tampered!" not in b
    with SifImage.open(user_out / "b.sif") as img:
        assert img.primary_partition().size > 0
    r = pull(run_as_user, cache, user_out / "c.sif", ref)
    assert r.returncode == 0 and "from the cache" in r.stderr, r.stderr
    assert (user_out / "c.sif").read_bytes() == b

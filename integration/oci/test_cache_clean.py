"""``sifpy cache clean`` as Apptainer's: --dry-run, --type, and a question on a terminal
unless -f; as the unprivileged test user, on a cache filled from the real registry."""

from __future__ import annotations

import shutil
from pathlib import Path

from integration.conftest import UserRunner, require
from integration.oci.conftest import Registry

SIFPY = ["/usr/bin/python3", "-m", "sifpy"]


def _files(top: Path) -> list[str]:
    return sorted(str(p.relative_to(top)) for p in top.rglob("*") if p.is_file())


def test_cache_clean_options(registry: Registry, run_as_user: UserRunner, user_dir: Path) -> None:
    cache = user_dir / "cache"
    env = {"SIFPY_CACHEDIR": str(cache)}
    ref = f"docker://{registry.host}/test/plain:1"
    res = run_as_user([*SIFPY, "pull", "--insecure", str(user_dir / "a.sif"), ref], env=env)
    assert res.returncode == 0, res.stderr
    full = _files(cache)
    assert any(f.startswith("blobs/") for f in full) and any(f.startswith("sif/") for f in full)

    res = run_as_user([*SIFPY, "cache", "clean", "--dry-run"], env=env)
    assert res.returncode == 0 and res.stderr.startswith("would remove "), res.stderr
    assert _files(cache) == full

    res = run_as_user([*SIFPY, "cache", "clean", "--type", "nope"], env=env)
    assert res.returncode == 2 and "unknown cache type: nope" in res.stderr

    # A terminal is asked; "n" keeps everything, "y" removes what --type names.
    require(None if shutil.which("script") else "script (util-linux) is not installed")
    clean = " ".join([*SIFPY, "cache", "clean", "--type", "blob"])
    for answer, kept in (("n", full), ("y", [f for f in full if not f.startswith("blobs/")])):
        res = run_as_user(["script", "-qec", clean, "/dev/null"], env=env, input=f"{answer}\n")
        assert res.returncode == 0, res.stdout
        assert "? [y/N]" in res.stdout
        assert _files(cache) == kept, res.stdout
    # Without a terminal, or with -f, no question.
    res = run_as_user([*SIFPY, "cache", "clean", "-f", "-T", "oci"], env=env)
    assert res.returncode == 0 and "[y/N]" not in res.stderr
    assert not any(f.startswith(("blobs/", "sif/")) for f in _files(cache))

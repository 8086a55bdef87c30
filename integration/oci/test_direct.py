"""docker:// used directly, as in Apptainer, by the unprivileged test user against the real
registry: ``pull`` without a name, ``build OUT docker://``, ``exec|run docker://`` through
the SIF cache, ``--no-https`` on build, ``APPTAINER_CACHEDIR``."""

from __future__ import annotations

from pathlib import Path

from integration.conftest import UserRunner
from integration.oci.conftest import Registry

SIFPY = ["/usr/bin/python3", "-m", "sifpy"]


def test_pull_without_a_name_uses_apptainers(
    registry: Registry, run_as_user: UserRunner, user_dir: Path
) -> None:
    ref = f"docker://{registry.host}/test/plain:1"
    env = {"SIFPY_CACHEDIR": str(user_dir / "cache")}
    res = run_as_user([*SIFPY, "pull", "--insecure", ref], env=env, cwd=user_dir, timeout=120)
    assert res.returncode == 0, res.stderr
    assert (user_dir / "plain_1.sif").is_file()
    run = run_as_user([*SIFPY, "exec", "plain_1.sif", "cat", "/etc/marker"], cwd=user_dir)
    assert run.stdout == "plain image\n", run.stderr


def test_build_from_docker_uri_and_no_https(
    registry: Registry, run_as_user: UserRunner, user_dir: Path
) -> None:
    ref = f"docker://{registry.host}/test/plain:1"
    env = {"SIFPY_CACHEDIR": str(user_dir / "cache")}
    out = user_dir / "out.sif"
    # Without the flag: https to a plain-http registry fails, and the hint names the flag.
    res = run_as_user([*SIFPY, "build", str(out), ref], env=env, cwd=user_dir, timeout=120)
    assert res.returncode != 0 and not out.exists()
    hint = res.stderr.splitlines()[-1]
    assert hint.startswith("hint: ") and "--no-https" in hint, res.stderr
    for flag in ("--no-https", "--nohttps"):
        res = run_as_user(
            [*SIFPY, "build", "--force", flag, str(out), ref], env=env, cwd=user_dir, timeout=120
        )
        assert res.returncode == 0, res.stderr
    run = run_as_user([*SIFPY, "exec", str(out), "cat", "/etc/marker"], cwd=user_dir)
    assert run.stdout == "plain image\n", run.stderr


def test_exec_and_run_a_docker_uri_through_the_cache(
    registry: Registry, run_as_user: UserRunner, user_dir: Path
) -> None:
    ref = f"docker://{registry.host}/test/plain:1"
    cache = user_dir / "apptainer-cache"
    env = {"APPTAINER_CACHEDIR": str(cache), "APPTAINER_NOHTTPS": "1"}
    first = run_as_user([*SIFPY, "exec", ref, "cat", "/etc/marker"], env=env, cwd=user_dir)
    assert first.returncode == 0 and first.stdout == "plain image\n", first.stderr
    sifs = list((cache / "sif" / "sha256").iterdir())
    assert [p for p in sifs if not p.name.endswith(".json")], sifs
    again = run_as_user([*SIFPY, "-v", "exec", ref, "cat", "/etc/marker"], env=env, cwd=user_dir)
    assert again.returncode == 0 and again.stdout == "plain image\n", again.stderr
    assert "using cached SIF" in again.stderr
    run = run_as_user([*SIFPY, "run", ref, "-c", "echo ran"], env=env, cwd=user_dir)
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in user_dir.iterdir()) == ["apptainer-cache"]  # nothing here

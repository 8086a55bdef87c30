"""``exec --verify`` and the mandatory-verification policy, as the unprivileged test user."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from integration.conftest import UserRunner, require
from integration.runtime.conftest import busybox_rootfs
from sifpy.sif import ObjectInput, create
from sifpy.sif import format as F


@pytest.fixture(scope="module")
def signed(workdir: Path) -> dict[str, str]:
    """Two images (marker A and B), A signed with a fresh Ed25519 key, B unsigned."""
    out: dict[str, str] = {}
    for name in ("A", "B"):
        root = busybox_rootfs(
            workdir / f"policy-{name}", lambda r, n=name: (r / "marker").write_text(n)
        )
        (root / "marker").chmod(0o644)
        sqfs, sif = workdir / f"policy-{name}.sqfs", workdir / f"policy-{name}.sif"
        subprocess.run(
            ["mksquashfs", str(root), str(sqfs), "-noappend", "-quiet", "-all-root"], check=True
        )
        create(sif, [ObjectInput.partition(sqfs, F.FSType.SQUASH, F.PartType.PRIMSYS, "amd64")])
        sif.chmod(0o644)
        out[name] = str(sif)
    key = ed25519.Ed25519PrivateKey.generate()
    priv, pub = workdir / "policy.pem", workdir / "policy.pub.pem"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))  # fmt: skip
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))  # fmt: skip
    pub.chmod(0o644)
    subprocess.run(
        [sys.executable, "-m", "sifpy", "sign", "--key", str(priv), out["A"]], check=True
    )
    Path(out["A"]).chmod(0o644)
    tampered = workdir / "policy-A-tampered.sif"
    shutil.copy(out["A"], tampered)
    data = bytearray(tampered.read_bytes())
    data[-2000] ^= 0xFF  # a byte inside the squashfs partition
    tampered.write_bytes(bytes(data))
    tampered.chmod(0o644)
    return {**out, "tampered": str(tampered), "pub": str(pub)}


def sifpy(runner: UserRunner, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return runner(["/usr/bin/python3", "-m", "sifpy", *args], **kw)


def test_verify_flag(runtime_ready: UserRunner, signed: dict[str, str]) -> None:
    r = sifpy(runtime_ready, "exec", "--verify-key", signed["pub"], signed["A"], "cat", "/marker")
    assert (r.returncode, r.stdout) == (0, "A"), r.stderr
    r = sifpy(runtime_ready, "exec", "--verify-key", signed["pub"], signed["B"], "cat", "/marker")
    assert r.returncode == 125 and r.stdout == ""
    assert r.stderr.startswith("error: refusing to run") and "signature not found" in r.stderr
    r = sifpy(runtime_ready, "exec", "--verify-key", signed["pub"], signed["tampered"], "true")
    assert r.returncode == 125 and "integrity compromised" in r.stderr, r.stderr
    # Without --verify an unsigned image runs.
    assert sifpy(runtime_ready, "exec", signed["B"], "cat", "/marker").stdout == "B"


def test_mandatory_policy(runtime_ready: UserRunner, signed: dict[str, str], workdir: Path) -> None:
    conf = workdir / "sifpy.conf"
    conf.write_text(f"# site policy\nverify = required\ntrusted key = {signed['pub']}\n")
    conf.chmod(0o644)
    env = {"SIFPY_CONFIG": str(conf)}
    for action in (["exec", signed["B"], "true"], ["run", signed["B"]], ["shell", signed["B"]]):
        r = sifpy(runtime_ready, *action, env=env)
        assert r.returncode == 125 and "refusing to run" in r.stderr, (action, r.stderr)
    r = sifpy(runtime_ready, "exec", signed["A"], "cat", "/marker", env=env)
    assert (r.returncode, r.stdout) == (0, "A"), r.stderr
    r = sifpy(runtime_ready, "exec", signed["tampered"], "true", env=env)
    assert r.returncode == 125
    # A user's file may only add requirements: here it makes verification mandatory for
    # this user (no system file), with the user's own key; --verify-key counts for it too.
    conf.write_text("verify = required\n")
    r = sifpy(runtime_ready, "exec", "--verify-key", signed["pub"], signed["A"], "true", env=env)
    assert r.returncode == 0, r.stderr
    r = sifpy(runtime_ready, "exec", signed["A"], "true", env=env)
    assert r.returncode == 125 and "refusing to run" in r.stderr, r.stderr


def test_swapped_path_after_verify_runs_the_verified_file(
    runtime_ready: UserRunner, signed: dict[str, str], workdir: Path
) -> None:
    """Verify A, then replace the path with the unsigned B before mounting: A still runs."""
    # A sticky shared directory (as /tmp): the user may replace the name of a file it owns,
    # and nobody else can change either file, so --verify accepts the image.
    shared = workdir / "swap"
    shared.mkdir()
    shared.chmod(0o1777)
    victim = shared / "swap.sif"
    shutil.copy(signed["A"], victim)
    other = shared / "swap-other.sif"
    shutil.copy(signed["B"], other)
    for p in (victim, other):
        p.chmod(0o644)
        os.chown(p, runtime_ready.user.uid, runtime_ready.user.gid)
    code = (
        "import os, sys\n"
        "from sifpy.cli.exec_image import open_image\n"
        "from sifpy.runtime import LaunchSpec, launch\n"
        "image, fd = open_image(sys.argv[1], verify=True, verify_keys=[sys.argv[3]])\n"
        "os.replace(sys.argv[2], sys.argv[1])  # the attacker's swap, after verification\n"
        "sys.exit(launch(LaunchSpec(image=image, argv=['cat', '/marker'],\n"
        "                           env={'PATH': '/bin'}, cwd='/')))\n"
    )
    r = runtime_ready.python(code, str(victim), str(other), signed["pub"])
    assert (r.returncode, r.stdout) == (0, "A"), r.stderr
    assert not other.exists()  # the swap really happened


# --- the system file is the floor -----------------------------------------------------

# Runs as root: a private mount namespace whose /etc is an overlay of the real one with
# /etc/sifpy/sifpy.conf added ($1), then execs the rest of the arguments (the test user's
# command): the real /etc is never written.
SYSTEM_CONF_SCRIPT = r"""
set -e
t=$(mktemp -d)
mount -t tmpfs tmpfs "$t"
mkdir "$t/upper" "$t/work"
mount -t overlay overlay -o "lowerdir=/etc,upperdir=$t/upper,workdir=$t/work" /etc
mkdir -p /etc/sifpy
printf '%s' "$1" > /etc/sifpy/sifpy.conf
chmod 0644 /etc/sifpy/sifpy.conf
shift
exec "$@"
"""


def with_system_conf(
    runner: UserRunner, conf: str, argv: list[str], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as the test user with ``conf`` as the system config file, placed in a
    private mount namespace."""
    require(None if os.getuid() == 0 else "a system config in a private mount namespace needs root")
    return subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", SYSTEM_CONF_SCRIPT, "sh", conf,
         *runner.argv(argv)],
        env=runner.env(env), cwd=runner.user.home, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


@pytest.fixture(scope="module")
def user_signed(signed: dict[str, str], workdir: Path) -> dict[str, str]:
    """``C``: the unsigned image B signed with the user's own key (not the site's)."""
    key = ed25519.Ed25519PrivateKey.generate()
    priv, pub = workdir / "user.pem", workdir / "user.pub.pem"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))  # fmt: skip
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))  # fmt: skip
    pub.chmod(0o644)
    c = workdir / "policy-C.sif"
    shutil.copy(signed["B"], c)
    subprocess.run([sys.executable, "-m", "sifpy", "sign", "--key", str(priv), str(c)], check=True)
    c.chmod(0o644)
    return {"C": str(c), "pub": str(pub)}


@pytest.mark.parametrize("program", ["python", "starter"])
def test_user_config_cant_weaken_system_policy(
    runtime_ready: UserRunner,
    signed: dict[str, str],
    user_signed: dict[str, str],
    workdir: Path,
    request: pytest.FixtureRequest,
    program: str,
) -> None:
    """With ``verify = required`` in the system file, nothing the user sets gets an image
    past it: not a missing or lenient $SIFPY_CONFIG, not the user's own keys; the user's
    file can still add a requirement. Through the starter too, which must leave such a
    start to Python."""
    site = f"verify = required\ntrusted key = {signed['pub']}\n"
    argv = ["/usr/bin/python3", "-m", "sifpy"]
    if program == "starter":
        argv = [request.getfixturevalue("starter")]
    lenient = workdir / "lenient.conf"
    lenient.write_text(f"verify = optional\ntrusted key = {user_signed['pub']}\n")
    strict = workdir / "strict.conf"
    strict.write_text("trusted fingerprint = 0123456789ABCDEF\n")
    for p in (lenient, strict):
        p.chmod(0o644)

    def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return with_system_conf(runtime_ready, site, [*argv, *args], env)

    r = run("exec", signed["A"], "cat", "/marker")
    assert (r.returncode, r.stdout) == (0, "A"), r.stderr
    for env in ({}, {"SIFPY_CONFIG": "/nonexistent"}, {"SIFPY_CONFIG": str(lenient)}):
        r = run("exec", signed["B"], "cat", "/marker", **env)
        assert (r.returncode, r.stdout) == (125, ""), (env, r.stderr)
        assert r.stderr.startswith("error: "), r.stderr
    r = run("exec", signed["B"], "true", SIFPY_CONFIG=str(lenient))
    assert "refusing to run" in r.stderr and "signature not found" in r.stderr, r.stderr
    # The user's own key, from the user's file or the command line, is not the site's.
    r = run("exec", user_signed["C"], "true", SIFPY_CONFIG=str(lenient))
    assert r.returncode == 125 and "refusing to run" in r.stderr, r.stderr
    r = run("exec", "--verify-key", user_signed["pub"], user_signed["C"], "true")
    assert r.returncode == 125 and "refusing to run" in r.stderr, r.stderr
    # Tightening works: the user's file asks for a signer the image doesn't have.
    r = run("exec", signed["A"], "true", SIFPY_CONFIG=str(strict))
    assert r.returncode == 125 and "not signed by a trusted fingerprint" in r.stderr, r.stderr
    assert r.stderr.count("error:") == 1 and "hint: $SIFPY_CONFIG lists" in r.stderr


# --- verified, then changed in place ----------------------------------------------------


@pytest.fixture()
def second_user(runtime_ready: UserRunner) -> tuple[int, int]:
    """Another account (uid, gid), the one that would overwrite the image: nobody."""
    import pwd

    require(None if os.getuid() == 0 else "changing an image's owner needs root")
    pw = pwd.getpwnam("nobody")
    return pw.pw_uid, pw.pw_gid


def test_image_others_can_write_is_refused_under_verification(
    runtime_ready: UserRunner, signed: dict[str, str], workdir: Path, second_user: tuple[int, int]
) -> None:
    """A good signature says nothing about the bytes squashfuse reads later if someone else
    can write them (``dd conv=notrunc`` after verification): such an image is refused under
    ``--verify`` and under a required policy, and still runs without verification."""
    base = workdir / "writers"
    base.mkdir()
    base.chmod(0o755)
    uid, gid = second_user

    def image(name: str, mode: int, owner: tuple[int, int] = (0, 0), parent: Path = base) -> str:
        path = parent / name
        shutil.copy(signed["A"], path)
        os.chown(path, *owner)
        path.chmod(mode)
        return str(path)

    open_dir = base / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    sticky = base / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    bad = {
        "writable by others": image("world.sif", 0o666),
        "writable by its group": image("group.sif", 0o664, (0, gid)),
        f"owned by uid {uid}": image("theirs.sif", 0o644, (uid, gid)),
        "its directory": image("renamable.sif", 0o644, parent=open_dir),
    }
    good = [image("root.sif", 0o644), image("in-sticky.sif", 0o444, parent=sticky)]
    good.append(image("mine.sif", 0o600, (runtime_ready.user.uid, runtime_ready.user.gid)))
    site = f"verify = required\ntrusted key = {signed['pub']}\n"
    py = ["/usr/bin/python3", "-m", "sifpy"]
    for why, path in bad.items():
        r = sifpy(runtime_ready, "exec", "--verify-key", signed["pub"], path, "cat", "/marker")
        assert (r.returncode, r.stdout) == (125, ""), (path, r.stderr)
        assert r.stderr.startswith(f"error: refusing to run {path}: {why}"), r.stderr
        assert r.stderr.count("\n") == 2 and "\nhint: " in r.stderr, r.stderr
        r = with_system_conf(runtime_ready, site, [*py, "exec", path, "cat", "/marker"])
        assert (r.returncode, r.stdout) == (125, ""), (path, r.stderr)
        assert why in r.stderr, r.stderr
        # Without verification nothing is promised, and the image runs as before.
        r = sifpy(runtime_ready, "exec", path, "cat", "/marker")
        assert (r.returncode, r.stdout) == (0, "A"), (path, r.stderr)
    for path in good:
        r = sifpy(runtime_ready, "exec", "--verify-key", signed["pub"], path, "cat", "/marker")
        assert (r.returncode, r.stdout) == (0, "A"), (path, r.stderr)
    # The attack itself: the second user really can rewrite the refused image in place.
    r = subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "dd", "if=/dev/zero",
         f"of={bad['writable by others']}", "bs=1", "count=1", "seek=4096", "conv=notrunc"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr

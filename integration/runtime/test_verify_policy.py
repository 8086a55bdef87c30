"""``exec --verify`` and the mandatory-verification policy, as the unprivileged test user."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from integration.conftest import UserRunner
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
    # A user's own key doesn't satisfy the site policy: only the configured keys count.
    conf.write_text("verify = required\n")
    r = sifpy(runtime_ready, "exec", "--verify-key", signed["pub"], signed["A"], "true", env=env)
    assert r.returncode == 125, r.stderr


def test_swapped_path_after_verify_runs_the_verified_file(
    runtime_ready: UserRunner, signed: dict[str, str], workdir: Path
) -> None:
    """Verify A, then replace the path with the unsigned B before mounting: A still runs."""
    victim = workdir / "swap.sif"
    shutil.copy(signed["A"], victim)
    other = workdir / "swap-other.sif"
    shutil.copy(signed["B"], other)
    for p in (victim, other):
        p.chmod(0o666)
    workdir.chmod(0o777)
    code = (
        "import os, sys\n"
        "from sifpy.cli.exec import open_image\n"
        "from sifpy.runtime import LaunchSpec, launch\n"
        "image, fd = open_image(sys.argv[1], verify=True, verify_keys=[sys.argv[3]])\n"
        "os.replace(sys.argv[2], sys.argv[1])  # the attacker's swap, after verification\n"
        "sys.exit(launch(LaunchSpec(image=image, argv=['cat', '/marker'],\n"
        "                           env={'PATH': '/bin'}, cwd='/')))\n"
    )
    r = runtime_ready.python(code, str(victim), str(other), signed["pub"])
    assert (r.returncode, r.stdout) == (0, "A"), r.stderr
    assert not other.exists()  # the swap really happened

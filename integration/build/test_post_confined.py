"""A build's ``%post`` does not reach the host, even as real root: what it is shown of the
host's /etc is a copy it can't write through, /sys (with its submounts) is read-only, and
it runs with Docker's default capability set (bounding set included), no CAP_SYS_ADMIN.

The root case runs sifpy in a private mount namespace (``unshare -m``) where a decoy file
is bound over /etc/hosts and /etc/resolv.conf: the %post's attack (remount read-write,
append) would land on the decoy, never on the host's real files, which are only read
(their digest before and after)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from integration.conftest import UserRunner, require
from integration.runtime.test_tty import blocked, compile_payload, run_in_pty

from .conftest import Builder, _builder

# Docker's default set (moby oci/caps/defaults.go) less NET_RAW, by name: the numbers come
# from linux/capability.h.
CAP_NUMBERS = {
    "CHOWN": 0,
    "DAC_OVERRIDE": 1,
    "FOWNER": 3,
    "FSETID": 4,
    "KILL": 5,
    "SETGID": 6,
    "SETUID": 7,
    "SETPCAP": 8,
    "NET_BIND_SERVICE": 10,
    "SYS_CHROOT": 18,
    "MKNOD": 27,
    "AUDIT_WRITE": 29,
    "SETFCAP": 31,
}
DOCKER_CAPS = sum(1 << n for n in CAP_NUMBERS.values())

DEF = """Bootstrap: busybox
MirrorURL: file:///bin/busybox

%post
    set +e
    for f in /etc/hosts /etc/resolv.conf; do
        mount -o remount,rw,bind "$f" && echo "REMOUNTED $f"
        echo "pwned by %post" >> "$f" && echo "WROTE $f"
    done
    mount -o remount,rw /sys && echo "REMOUNTED /sys"
    grep -E '^Cap(Eff|Prm|Bnd|Inh|Amb):' /proc/self/status | sed 's/^/STATUS /'
    awk '$5 == "/sys" || $5 ~ "^/sys/" { print "SYSMOUNT", $5, $6 }' /proc/self/mountinfo
    unshare -U true && echo "NEW USERNS"
    exit 0
"""


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _build(builder: Builder, workdir: Path, wrap: list[str]) -> str:
    deffile = workdir / f"confined-{builder.identity}.def"
    deffile.write_text(DEF)
    deffile.chmod(0o644)
    sif = builder.out / "confined.sif"
    argv = [*wrap, *builder.argv(["build", "--force", str(sif), str(deffile)])]
    if builder.identity == "user":
        r = builder.runner(argv, timeout=300, cwd=str(builder.out))
    else:
        env = builder.env()
        r = subprocess.run(
            argv, capture_output=True, text=True, timeout=300, cwd=str(builder.out), env=env
        )
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout + r.stderr


def _check_confined(out: str) -> None:
    assert "REMOUNTED" not in out and "WROTE" not in out and "NEW USERNS" not in out, out
    status = {
        ln.split()[1].rstrip(":"): int(ln.split()[2], 16)
        for ln in out.splitlines()
        if ln.startswith("STATUS ")
    }
    assert status["CapEff"] == DOCKER_CAPS, out
    assert status["CapPrm"] == DOCKER_CAPS, out
    assert status["CapBnd"] == DOCKER_CAPS, out
    assert status["CapInh"] == 0 and status["CapAmb"] == 0, out
    sys_mounts = [ln.split() for ln in out.splitlines() if ln.startswith("SYSMOUNT ")]
    assert sys_mounts and sys_mounts[0][1] == "/sys", out
    for _, where, options in sys_mounts:  # /sys and every submount (cgroups)
        assert options.split(",")[0] == "ro", f"{where} is {options}\n{out}"


@pytest.fixture()
def root_builder(build_ready: UserRunner, workdir: Path, recipes_copy: Path) -> Builder:
    require(None if os.getuid() == 0 else "not running as root")
    return _builder("root", build_ready, workdir, recipes_copy)


def test_root_post_cannot_write_host_files(root_builder: Builder, workdir: Path) -> None:
    builder = root_builder
    require(None if shutil.which("unshare") else "unshare (util-linux) is not installed")
    real = {p: _digest(p) for p in ("/etc/hosts", "/etc/resolv.conf") if os.path.isfile(p)}
    decoy = workdir / "decoy-hosts"
    decoy.write_text("127.0.0.1 decoy\n")
    # The binds exist only in the new mount namespace, which dies with the build.
    binds = " && ".join(f"mount --bind {decoy} {p}" for p in real)
    wrap = ["unshare", "-m", "--propagation", "private", "sh", "-c", f'{binds} && exec "$@"', "sh"]
    out = _build(builder, workdir, wrap)
    assert decoy.read_text() == "127.0.0.1 decoy\n", out
    assert {p: _digest(p) for p in real} == real
    _check_confined(out)


def test_user_post_is_confined_too(user_builder: Builder, workdir: Path) -> None:
    """The same limits in an unprivileged build (root in its user namespace)."""
    _check_confined(_build(user_builder, workdir, []))


def test_post_cannot_inject_into_the_terminal(builder: Builder, workdir: Path) -> None:
    """%post under a terminal (the builder's own, controlling): TIOCSTI and TIOCLINUX are
    refused, nothing is left in the terminal's input queue (integration/runtime/test_tty.py
    has the same check for exec, run, shell and test)."""
    payload = compile_payload(workdir / "inject-build")
    deffile = workdir / f"inject-{builder.identity}.def"
    deffile.write_text(
        f"Bootstrap: busybox\nMirrorURL: file:///bin/busybox\n\n"
        f"%files\n    {payload} /bin/inject\n\n%post\n    /bin/inject\n"
    )
    deffile.chmod(0o644)
    argv = builder.argv(["build", "--force", str(builder.out / "inject.sif"), str(deffile)])
    if builder.identity == "user":
        code, out, queued = run_in_pty(builder.runner, argv, cwd=str(builder.out))
    else:
        code, out, queued = run_in_pty(None, argv, env=builder.env(), cwd=str(builder.out))
    assert code == 0, out
    blocked(out)
    assert queued == 0, out

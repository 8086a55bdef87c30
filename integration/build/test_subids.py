"""A user with /etc/subuid and /etc/subgid ranges builds with real ids in ``%post``
(newuidmap/newgidmap), as Apptainer's --fakeroot; afterwards the rootfs is normalised so
that packing and clean-up work, and nothing owned by the range is left behind."""

from __future__ import annotations

import os
import pwd
import subprocess
from pathlib import Path

import pytest

from integration.conftest import User, UserRunner, require

SUBUSER = "sifpysub"
START, COUNT = 300000, 65536  # unless useradd already gave the user a range

DEF = """Bootstrap: busybox
MirrorURL: file:///bin/busybox

%post
    mkdir -p /owned && chown 4242:4343 /owned && chmod 0700 /owned
    echo secret > /owned/file && chown 4242:4343 /owned/file && chmod 0600 /owned/file
    stat -c '%u:%g' /owned > /ids-during-post
    cat /proc/self/uid_map | tr -s ' ' > /uid-map-during-post

%runscript
    cat /ids-during-post
"""


@pytest.fixture(scope="module")
def subuser(sifpy_copy: str) -> UserRunner:
    require(None if os.getuid() == 0 else "needs root to create a user with subordinate ids")
    require(None if os.access("/usr/bin/newuidmap", os.X_OK) else "newuidmap (uidmap) is missing")
    try:
        pw = pwd.getpwnam(SUBUSER)
    except KeyError:
        subprocess.run(["useradd", "-m", "-s", "/bin/sh", SUBUSER], check=True)
        pw = pwd.getpwnam(SUBUSER)
    for path in ("/etc/subuid", "/etc/subgid"):
        lines = Path(path).read_text().splitlines() if Path(path).exists() else []
        if not any(line.startswith(f"{SUBUSER}:") for line in lines):
            with open(path, "a") as f:
                f.write(f"{SUBUSER}:{START}:{COUNT}\n")
    os.chmod("/dev/fuse", 0o666)
    return UserRunner(User(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir), sifpy_copy)


def test_post_has_real_ids(subuser: UserRunner, workdir: Path) -> None:
    out = workdir / "subids"
    out.mkdir(exist_ok=True)
    os.chown(out, subuser.user.uid, subuser.user.gid)
    deffile = out / "s.def"
    deffile.write_text(DEF)
    sif = out / "s.sif"
    r = subuser(
        ["/usr/bin/python3", "-m", "sifpy", "-v", "build", str(sif), str(deffile)], cwd=str(out)
    )
    assert r.returncode == 0, r.stdout + r.stderr
    start, count = next(
        ln.split(":")[1:] for ln in Path("/etc/subuid").read_text().splitlines()
        if ln.startswith(f"{SUBUSER}:")
    )  # fmt: skip
    assert f"using subordinate ids {start}+{count}" in r.stderr
    run = subuser(["/usr/bin/python3", "-m", "sifpy", "run", str(sif)], cwd=str(out))
    assert run.stdout == "4242:4343\n", run.stderr  # chown was real during %post
    umap = subuser(
        ["/usr/bin/python3", "-m", "sifpy", "exec", str(sif), "cat", "/uid-map-during-post"]
    )
    assert umap.stdout.split() == ["0", str(subuser.user.uid), "1", "1", start, count]
    # The build left nothing behind (its workspace would hold range-owned files).
    assert sorted(p.name for p in out.iterdir()) == ["s.def", "s.sif"]

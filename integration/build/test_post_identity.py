"""``%post`` sees the image's own /etc/passwd (it may add users), and as real root the
image's other owners keep their ids."""

from __future__ import annotations

import os
from pathlib import Path

from .conftest import Builder

DEF = """Bootstrap: busybox
MirrorURL: file:///bin/busybox

%post
    # What useradd does (busybox-static has no adduser applet): /etc/passwd must be the
    # image's own, writable file.
    echo 'builduser:x:4242:4242::/home/builduser:/bin/sh' >> /etc/passwd
    grep -q '^builduser:x:4242:' /etc/passwd
    mkdir -p /owned && chown 4242:4242 /owned
    stat -c '%u' /owned > /owned-uid

%runscript
    cat /owned-uid
"""


def test_post_can_add_users(builder: Builder, workdir: Path) -> None:
    deffile = workdir / f"users-{builder.identity}.def"
    deffile.write_text(DEF)
    deffile.chmod(0o644)
    sif = builder.out / "users.sif"
    r = builder.run(["build", "--force", str(sif), str(deffile)])
    assert r.returncode == 0, r.stdout + r.stderr
    r = builder.run(["exec", str(sif), "grep", "^builduser:", "/etc/passwd"])
    # At run time /etc/passwd is generated from the image's, which now has the user.
    assert r.stdout.startswith("builduser:x:4242:"), r.stdout + r.stderr
    owner = builder.run(["run", str(sif)]).stdout.strip()
    if builder.identity == "root" and os.getuid() == 0:
        assert owner == "4242"  # identity map: chown really happened
    else:
        assert owner == "0"  # unprivileged: chown is emulated, files stay the builder's

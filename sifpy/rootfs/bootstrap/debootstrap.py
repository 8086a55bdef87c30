"""``Bootstrap: debootstrap``: a Debian root filesystem made by ``mmdebstrap``.

Apptainer runs ``debootstrap --variant=minbase --include=<Include> <OSVersion> <rootfs>
<MirrorURL>`` as root (conveyorPacker_debootstrap.go). sifpy uses ``mmdebstrap`` (faster,
and it can run without real root) the same way for root and ordinary users:

* in a new user namespace where the caller is root (``unshare --map-root-user``), with a
  mount and PID namespace so that every mount and process of the bootstrap dies with it;
* under :mod:`sifpy.runtime.seccomp`, so that dpkg's ``chown`` to system users and the
  ``setuid`` calls of maintainer scripts succeed (Charliecloud's root emulation) and
  ``APT::Sandbox::User "root"`` so that apt does not try to drop to ``_apt``;
* ``--mode=root``; ``/dev`` is not mounted by mmdebstrap (its devpts options name a uid
  that is not mapped) but the few device files a chroot needs are bound by a setup hook
  and removed again before mmdebstrap finishes.

No subuid range is needed; every file of the result is owned by the builder (root as
real root). ``MirrorURL:`` defaults to the Debian mirror the host's apt uses.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import signal

from sifpy.errors import BuildError, ToolError
from sifpy.rootfs.bootstrap import Context, Result
from sifpy.util import log
from sifpy.util.proc import run

_DEVICES = "null zero full random urandom tty"
_SETUP_HOOK = (
    'mkdir -p "$1/dev" && for f in ' + _DEVICES + '; do : > "$1/dev/$f" && '
    'mount --bind "/dev/$f" "$1/dev/$f"; done'
)
_CLEAN_HOOK = "for f in " + _DEVICES + '; do umount "$1/dev/$f"; rm -f "$1/dev/$f"; done'


def host_mirror(sources: list[str] | None = None) -> str | None:
    """The first Debian archive URI in the host's apt sources (deb822 or one-line)."""
    files = sources
    if files is None:
        files = ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*"))]
    for path in files:
        if not path.endswith((".list", ".sources")):
            continue
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:
            continue
        if path.endswith(".sources"):
            for para in re.split(r"\n\s*\n", text):
                fields = dict(
                    (k.strip().lower(), v.strip())
                    for k, _, v in (line.partition(":") for line in para.splitlines())
                    if not k.startswith("#") and v
                )
                suites = fields.get("suites", "")
                if "deb" in fields.get("types", "").split() and "security" not in suites:
                    uris = fields.get("uris", "").split()
                    if uris:
                        return str(uris[0])
        else:
            for line in text.splitlines():
                words = re.sub(r"\[[^]]*\]", "", line).split()
                if len(words) >= 3 and words[0] == "deb" and "security" not in words[2]:
                    return words[1]
    return None


def _preexec() -> None:
    from sifpy.runtime import ns, seccomp

    ns.set_parent_death_signal(signal.SIGKILL)
    seccomp.install()


def bootstrap(ctx: Context) -> Result:
    """Run mmdebstrap for ``OSVersion:`` into ``ctx.rootfs``."""
    suite = ctx.require("osversion")
    mirror = ctx.stage.get("mirrorurl") or host_mirror()
    if not mirror:
        raise BuildError(
            "can't bootstrap Debian: no MirrorURL and no Debian mirror in the host's apt sources",
            hint="add 'MirrorURL: http://<mirror>/debian'",
        )
    tools = {t: shutil.which(t) for t in ("mmdebstrap", "unshare")}
    missing = [t for t, p in tools.items() if p is None]
    if missing:
        raise ToolError(
            f"can't bootstrap Debian: {', '.join(missing)} not found",
            hint="install mmdebstrap and util-linux",
        )
    include = [p for p in re.split(r"[\s,]+", ctx.stage.get("include") or "") if p]
    argv = [
        str(tools["unshare"]),
        "--user",
        "--map-root-user",
        "--mount",
        "--pid",
        "--fork",
        "--kill-child",
        str(tools["mmdebstrap"]),
        "--mode=root",
        "--variant=minbase",
        '--aptopt=APT::Sandbox::User "root"',
        "--skip=chroot/mount/dev",
        "--skip=chroot/mount/sys",  # sysfs needs a network namespace; nothing needs it
        "--setup-hook",
        _SETUP_HOOK,
        "--customize-hook",
        _CLEAN_HOOK,
    ]
    if log.level < log.VERBOSE:
        argv.append("--quiet")
    if include:
        argv.append("--include=" + ",".join(include))
    argv += [suite, ctx.rootfs, mirror]
    from sifpy.util.progress import step

    env = {k: v for k, v in os.environ.items() if k in ("PATH", "http_proxy", "https_proxy")}
    env.setdefault("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    env["HOME"] = ctx.workdir
    env["TMPDIR"] = ctx.workdir
    # A session of its own: Ctrl-C on the terminal reaches sifpy only, which kills mmdebstrap
    # (util.proc.run kills its child on KeyboardInterrupt, as subprocess.run does;
    # --kill-child and the PID namespace take mmdebstrap's own children with it) instead of
    # mmdebstrap printing a page of errors about its interrupted children.
    # mmdebstrap --quiet shows nothing for 20-35 s: a spinner and the time on a terminal.
    with step(f"bootstrapping Debian {suite} from {mirror}"):
        proc = run(
            argv,
            "bootstrap Debian",
            env=env,
            stderr=None,
            preexec_fn=_preexec,
            start_new_session=True,
            ok=None,
        )
    if proc.returncode != 0:
        raise BuildError(f"can't bootstrap Debian {suite}: mmdebstrap failed ({proc.returncode})")
    return Result()

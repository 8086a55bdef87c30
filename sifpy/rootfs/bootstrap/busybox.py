"""``Bootstrap: busybox``: a static busybox and one symlink per applet in ``/bin``.

Apptainer downloads ``MirrorURL:`` and runs ``busybox --install <rootfs>/bin``
(conveyorPacker_busybox.go). sifpy takes ``MirrorURL:`` as an ``http(s)://`` or ``file://``
URL or a plain path, and without it the host's static busybox (Debian's
``busybox-static``), so that a busybox image builds offline. As in Apptainer, the binary
runs once on the host, with ``--list``, to learn its applets; the links are then made by
sifpy, relative (``bin/ls -> busybox``), so they never point at a host path.
"""

from __future__ import annotations

import os
import shutil
import urllib.parse
import urllib.request

from sifpy.errors import BuildError, SifpyError
from sifpy.rootfs.bootstrap import Context, Result
from sifpy.rootfs.bootstrap import files as F
from sifpy.util import log
from sifpy.util.proc import PIPE, TimeoutExpired, run

HOST_BUSYBOX = ("/bin/busybox", "/usr/bin/busybox")
_MAX = 64 << 20


def _fetch(url: str, dest: str) -> None:
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme in ("", "file"):
        path = urllib.parse.unquote(parsed.path if parsed.scheme else url)
        try:
            shutil.copyfile(path, dest)
        except OSError as exc:
            raise BuildError(f"can't read busybox: {path}: {exc.strerror}") from exc
        return
    if parsed.scheme not in ("http", "https"):
        raise BuildError(f"can't fetch busybox: unsupported URL {url}")
    log.info(f"downloading {url}")
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, open(dest, "wb") as out:
            total = 0
            while chunk := resp.read(1 << 20):
                total += len(chunk)
                if total > _MAX:
                    raise BuildError(f"can't fetch busybox: {url}: larger than {_MAX} bytes")
                out.write(chunk)
    except OSError as exc:
        raise BuildError(f"can't fetch busybox: {url}: {exc}") from exc


def applets(busybox: str) -> list[str]:
    """The applet names ``busybox --list`` prints (safe names only)."""
    try:
        proc = run(
            [busybox, "--list"],
            "list busybox applets",
            stdout=PIPE,
            env={"PATH": "/usr/bin:/bin"},
            timeout=30,
        )
    except (SifpyError, TimeoutExpired) as exc:
        raise BuildError(
            f"can't list busybox applets: {exc}", hint="is it a static busybox?"
        ) from exc
    names = proc.stdout.decode(errors="replace").split()
    return [n for n in names if n and "/" not in n and n not in (".", "..", "busybox")]


def bootstrap(ctx: Context) -> Result:
    """Install busybox from ``MirrorURL:`` (or the host's) into ``/bin``."""
    url = ctx.stage.get("mirrorurl")
    src = os.path.join(ctx.workdir, "busybox")
    if url:
        _fetch(url, src)
    else:
        host = next((p for p in HOST_BUSYBOX if os.path.isfile(p)), None)
        if host is None:
            raise BuildError(
                "can't bootstrap busybox: no MirrorURL and no busybox on the host",
                hint="add 'MirrorURL: <URL of a static busybox>', or install busybox-static",
            )
        log.verbose(f"using the host's {host}")
        shutil.copyfile(host, src)
    os.chmod(src, 0o755)
    names = applets(src)
    with F.opened_root(ctx.rootfs) as rfd:
        F.make_dirs(rfd, "/bin")
        with open(src, "rb") as f:
            F.write_file(rfd, "/bin/busybox", f.read(), 0o755)
        for name in names:
            F.symlink(rfd, f"/bin/{name}", "busybox")
    os.unlink(src)
    log.verbose(f"installed busybox with {len(names)} applets")
    return Result()

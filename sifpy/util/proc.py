"""The one way sifpy starts a program (Charliecloud's ``cmd_base``, pip's ``call_subprocess``).

Every helper program (mksquashfs, tar2sqfs, gpg, mmdebstrap, newuidmap, a compiler...) goes
through :func:`run` or :func:`popen`, so that each of them:

* takes an argv list, never a shell string;
* is logged shell-quoted at ``-v`` (``+ mksquashfs ...``), with secrets given in ``redact``
  replaced by ``***``;
* gets stdin closed unless the caller feeds it;
* keeps the tail of its stderr for the error, when the caller captures stderr;
* fails as a :class:`~sifpy.errors.ToolError` saying what sifpy could not do and why, with a
  hint naming the Debian package when the program is missing.

``sifpy exec`` does not import this module on its fast path (``subprocess`` alone costs
several milliseconds); payloads are exec'd by ``sifpy.runtime``, not started from here.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any

from sifpy.errors import SifpyError, ToolError
from sifpy.util import log

DEVNULL = subprocess.DEVNULL
PIPE = subprocess.PIPE
CompletedProcess = subprocess.CompletedProcess
Popen = subprocess.Popen
TimeoutExpired = subprocess.TimeoutExpired

# Which Debian package ships a helper, for the hint when it is missing.
PACKAGES = {
    "mksquashfs": "squashfs-tools",
    "unsquashfs": "squashfs-tools",
    "tar2sqfs": "squashfs-tools-ng",
    "sqfs2tar": "squashfs-tools-ng",
    "squashfuse_ll": "squashfuse",
    "squashfuse": "squashfuse",
    "fuse-overlayfs": "fuse-overlayfs",
    "fusermount3": "fuse3",
    "pkg-config": "pkg-config",
    "gpg": "gpg",
    "gpgv": "gpgv",
    "gpgconf": "gpgconf",
    "mmdebstrap": "mmdebstrap",
    "newuidmap": "uidmap",
    "newgidmap": "uidmap",
    "pigz": "pigz",
    "unpigz": "pigz",
    "zstd": "zstd",
    "busybox": "busybox-static",
    "cc": "gcc",
    "gcc": "gcc",
}

_TAIL = 1500  # characters of stderr an error keeps


def hint_for(program: str) -> str | None:
    """``install the Debian package X`` for a known helper, else None."""
    pkg = PACKAGES.get(os.path.basename(program))
    return f"install the Debian package {pkg}" if pkg else None


def quoted(argv: Sequence[str], redact: Sequence[str] = ()) -> str:
    """``argv`` as a shell would need it typed, with each secret in ``redact`` hidden."""
    text = shlex.join(argv)
    for secret in redact:
        if secret:
            text = text.replace(secret, "***")
    return text


def _how(returncode: int) -> str:
    return f"killed by signal {-returncode}" if returncode < 0 else f"exit status {returncode}"


def _tail(data: bytes | str | None) -> str:
    if not data:
        return ""
    text = data.decode(errors="replace") if isinstance(data, bytes) else data
    return text.strip()[-_TAIL:]


def failure(
    what: str,
    argv: Sequence[str],
    returncode: int,
    stderr: bytes | str | None = None,
    error: type[SifpyError] = ToolError,
    hint: str | None = None,
) -> SifpyError:
    """The error for a helper that failed: ``can't WHAT: PROG failed (HOW): STDERR TAIL``."""
    tail = _tail(stderr)
    msg = f"can't {what}: {os.path.basename(argv[0])} failed ({_how(returncode)})"
    return error(f"{msg}: {tail}" if tail else msg, hint)


def _not_found(what: str, argv: Sequence[str], exc: OSError) -> ToolError:
    name = os.path.basename(argv[0])
    reason = "not found" if isinstance(exc, FileNotFoundError) else exc.strerror or str(exc)
    return ToolError(f"can't {what}: {name}: {reason}", hint_for(name))


def run(
    argv: Sequence[str],
    what: str,
    *,
    input: bytes | str | None = None,
    stdin: int | IO[Any] | None = DEVNULL,
    stdout: int | IO[Any] | None = None,
    stderr: int | IO[Any] | None = PIPE,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    executable: str | None = None,
    pass_fds: Sequence[int] = (),
    preexec_fn: Callable[[], object] | None = None,
    start_new_session: bool = False,
    timeout: float | None = None,
    text: bool = False,
    ok: Sequence[int] | None = (0,),
    error: type[SifpyError] = ToolError,
    hint: str | None = None,
    redact: Sequence[str] = (),
) -> subprocess.CompletedProcess[Any]:
    """Run ``argv`` to completion (``executable``, when given, is the program and ``argv[0]``
    only its name). An exit status outside ``ok`` (None: any is fine) raises ``error`` with
    ``what`` and the stderr tail; a missing program raises ToolError."""
    argv = [os.fspath(a) for a in argv]
    log.verbose("+ " + quoted(argv, redact))
    try:
        proc = subprocess.run(
            argv,
            input=input,
            stdin=None if input is not None else stdin,
            stdout=stdout,
            stderr=stderr,
            env=env,
            cwd=cwd,
            executable=executable,
            pass_fds=tuple(pass_fds),
            preexec_fn=preexec_fn,
            start_new_session=start_new_session,
            timeout=timeout,
            text=text,
            check=False,
        )
    except OSError as exc:
        raise _not_found(what, argv, exc) from exc
    if ok is not None and proc.returncode not in ok:
        raise failure(what, argv, proc.returncode, proc.stderr, error, hint)
    return proc


def popen(
    argv: Sequence[str],
    what: str,
    *,
    stdin: int | IO[Any] | None = DEVNULL,
    stdout: int | IO[Any] | None = None,
    stderr: int | IO[Any] | None = None,
    env: Mapping[str, str] | None = None,
    executable: str | None = None,
    pass_fds: Sequence[int] = (),
    preexec_fn: Callable[[], object] | None = None,
    start_new_session: bool = False,
    bufsize: int = -1,
    text: bool = False,
    redact: Sequence[str] = (),
) -> subprocess.Popen[Any]:
    """Start ``argv`` and return it running (a pipeline stage); a missing program raises
    ToolError. The caller waits for it and reports its status with :func:`failure`."""
    argv = [os.fspath(a) for a in argv]
    log.verbose("+ " + quoted(argv, redact))
    try:
        return subprocess.Popen(
            argv,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            env=env,
            executable=executable,
            pass_fds=tuple(pass_fds),
            preexec_fn=preexec_fn,
            start_new_session=start_new_session,
            bufsize=bufsize,
            text=text,
        )
    except OSError as exc:
        raise _not_found(what, argv, exc) from exc

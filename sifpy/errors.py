"""The one exception tree of sifpy, and the exit statuses that go with it.

Library code raises these; only :mod:`sifpy.cli` catches them, prints ``error:`` and
``hint:`` lines to stderr and exits. Messages follow Charliecloud's grammar: lowercase,
``can't VERB: OBJECT: reason``. This module imports nothing (it is on the path of every
``sifpy exec``, so the exit statuses are plain int constants, not an ``enum``).
"""

from __future__ import annotations


class ExitStatus:
    """Exit statuses of sifpy itself (docker's convention for exec/run)."""

    OK = 0
    ERROR = 1
    USAGE = 2
    # `exec`/`run`: sifpy failed before the command started.
    LAUNCH_FAILED = 125
    NOT_EXECUTABLE = 126
    NOT_FOUND = 127
    INTERRUPTED = 130


class SifpyError(Exception):
    """Base of every error sifpy reports to a user.

    ``message`` says what went wrong, ``hint`` (optional) says what to try.
    """

    exit_status: int = ExitStatus.ERROR

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(SifpyError):
    """Bad command-line arguments."""

    exit_status = ExitStatus.USAGE


class ImageError(SifpyError):
    """An image (SIF file or sandbox) can't be read, written or is invalid."""


class SifFormatError(ImageError):
    """A SIF file breaks the format: bad magic, bounds, overlaps, duplicates."""

    def __init__(self, path: str, message: str, hint: str | None = None) -> None:
        super().__init__(f"invalid SIF: {path}: {message}", hint)
        self.path = path
        self.reason = message


class ObjectNotFoundError(ImageError):
    """A SIF data object asked for by id (or kind) is not in the image."""


class DefFileError(SifpyError):
    """A definition file is invalid; carries the file, line and column."""

    def __init__(
        self,
        message: str,
        path: str = "<string>",
        line: int | None = None,
        column: int | None = None,
        hint: str | None = None,
    ) -> None:
        where = path if line is None else f"{path}:{line}"
        if line is not None and column is not None:
            where += f":{column}"
        super().__init__(f"{where}: {message}", hint)
        self.path = path
        self.line = line
        self.column = column
        self.reason = message


class BuildError(SifpyError):
    """A build stage failed."""


class RootfsError(BuildError):
    """A layer or root filesystem can't be applied safely."""


class RegistryError(SifpyError):
    """A registry answered badly, or could not be reached."""


class CacheError(SifpyError):
    """The image cache can't be used safely (another user could change it) or written."""


class RuntimeSetupError(SifpyError):
    """The container could not be set up (namespaces, mounts, binds)."""

    exit_status = ExitStatus.LAUNCH_FAILED


class SignatureError(SifpyError):
    """Signing or verification failed."""


class ToolError(SifpyError):
    """An external tool (mksquashfs, squashfuse, ...) is missing or failed."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived: raised where Ctrl-C raises KeyboardInterrupt, and a
    subclass of it, so that the same clean-up runs and no ``except Exception`` (a retry, a
    fallback) swallows it. The CLI reports "interrupted" and exits 128 + ``signum``."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

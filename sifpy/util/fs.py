"""File-system helpers shared by the pipelines."""

from __future__ import annotations

import contextlib
import os
import shutil


def rmtree(path: str | os.PathLike[str]) -> None:
    """Remove a tree the builder owns, even with read-only directories inside."""

    def retry(func: object, p: str, exc: object) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(p), 0o700)
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, 0o700)
                shutil.rmtree(p, onerror=retry)
            else:
                os.unlink(p)

    if os.path.lexists(path):
        shutil.rmtree(path, onerror=retry)

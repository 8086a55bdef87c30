"""The one probe module of the test suites (``tests/`` and ``integration/``): a missing
capability skips a test locally and fails it in CI (``CI=true``), where everything the
tests need is installed by ``make test``."""

from __future__ import annotations

import os
import shutil

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(reason: str | None) -> None:
    """Skip (locally) or fail (in CI) when ``reason`` says a capability is missing; None:
    nothing is missing."""
    if not isinstance(reason, (str, type(None))):  # the old require(ok, reason) form
        raise TypeError(f"require() takes the reason a capability is missing, or None: {reason!r}")
    if not reason:
        return
    if IN_CI:
        pytest.fail(f"missing capability in CI: {reason}", pytrace=False)
    pytest.skip(reason)


def need_tool(name: str, package: str | None = None) -> str:
    """The path of the program ``name``, or :func:`require`'s skip/fail naming it (and the
    Debian package that has it)."""
    path = shutil.which(name)
    hint = f" (apt-get install {package})" if package else ""
    require(None if path else f"{name} is not installed{hint}")
    assert path is not None
    return path

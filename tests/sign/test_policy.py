"""The run policy's merge rule: the system file is the floor, the user's file only adds."""

from __future__ import annotations

from pathlib import Path

import pytest

from sifpy.errors import SifpyError
from sifpy.sign import policy


def conf(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_user_file_cant_lower_the_system_file(tmp_path: Path) -> None:
    system = conf(tmp_path, "sys", "verify = required\ntrusted key = /site.pem\n")
    user = conf(tmp_path, "user", "verify = optional\ntrusted key = /mine.pem\n")
    p = policy.load(system, user)
    assert p.verify_required and p.system.keys == ["/site.pem"] and p.user.keys == ["/mine.pem"]
    # The user's file still tightens a lenient system.
    p = policy.load(
        conf(tmp_path, "lenient", "verify = optional\n"),
        conf(tmp_path, "u2", "verify = required\n"),
    )
    assert p.verify_required and not p.system.verify_required


def test_user_file_named_but_missing_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIFPY_CONFIG", str(tmp_path / "nonexistent"))
    with pytest.raises(SifpyError, match=r"can't read config: .*nonexistent") as e:
        policy.load(conf(tmp_path, "sys", "verify = optional\n"))
    assert e.value.hint
    monkeypatch.delenv("SIFPY_CONFIG")
    assert not policy.load(str(tmp_path / "no-system-file")).verify_required

"""Image config to Apptainer metadata: escaping, runscript semantics, symlink safety."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from sifpy.rootfs.imageconfig import config_to_metadata, env_script, runscript

CONFIG = {
    "architecture": "amd64",
    "config": {
        "Env": ["PATH=/usr/bin:/bin", 'A=1 $HOME `x` "q" \\', "EMPTY", "1BAD=x", "B="],
        "Entrypoint": ["printf", "%s|"],
        "Cmd": ["c m d", "$HOME"],
        "Labels": {"k": "v", "n": 1},
    },
}


def sh(script: str, *args: str, **env: str) -> str:
    return subprocess.run(
        ["/bin/sh", "-c", script, "sh", *args],
        capture_output=True, text=True, check=True, env={"PATH": "/usr/bin:/bin", **env},
    ).stdout  # fmt: skip


def test_env_script() -> None:
    text = env_script(CONFIG["config"]["Env"])  # type: ignore[index]
    assert "1BAD" not in text
    out = sh(text + 'printf "%s\\n" "$PATH" "$A" "${EMPTY-unset}" "$B"', HOME="/h")
    assert out.splitlines() == ["/usr/bin:/bin", 'A=1 $HOME `x` "q" \\'.partition("=")[2], "", ""]
    # The host's value wins over the image's default (Apptainer semantics), PATH excepted.
    assert sh(text + 'printf "%s" "$A"', A="host") == "host"


def test_runscript_eval_and_no_eval(tmp_path: Path) -> None:
    script = tmp_path / "runscript"
    script.write_text(runscript(["printf", "%s|"], ["c m d", "$HOME"]))
    script.chmod(0o755)

    def run(*args: str, **env: str) -> str:
        return subprocess.run(
            [str(script), *args], capture_output=True, text=True, check=True,
            env={"PATH": "/usr/bin:/bin", "HOME": "/h", **env},
        ).stdout  # fmt: skip

    assert run() == "c m d|/h|"  # eval: $HOME in CMD is expanded, as in Apptainer
    assert run("x y", "z") == "x y|z|"
    assert run(APPTAINER_NO_EVAL="1") == "c m d|$HOME|"
    assert run("a", APPTAINER_NO_EVAL="1") == "a|"
    only_cmd = tmp_path / "cmd"
    only_cmd.write_text(runscript([], ["echo", "it's"]))
    only_cmd.chmod(0o755)
    assert subprocess.run([str(only_cmd)], capture_output=True, text=True).stdout == "it's\n"


def test_metadata_files(tmp_path: Path) -> None:
    config_to_metadata(tmp_path, CONFIG)
    meta = tmp_path / ".singularity.d"
    assert json.loads((meta / "labels.json").read_text()) == {"k": "v"}
    assert (meta / "labels.json").read_text().startswith("{\n\t")
    assert os.access(meta / "runscript", os.X_OK)
    for d in ("dev", "proc", "sys", "tmp", "home", "var/tmp", ".singularity.d/libs"):
        assert (tmp_path / d).is_dir()


def test_planted_symlinks_are_not_followed_out(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "runscript").write_text("victim")
    root = tmp_path / "root"
    root.mkdir()
    # /.singularity.d -> absolute path: resolved inside the rootfs, never on the host.
    (root / ".singularity.d").symlink_to(str(victim))
    (root / "tmp").symlink_to("../../../../../../victim")
    config_to_metadata(root, CONFIG)
    assert sorted(p.name for p in victim.iterdir()) == ["runscript"]
    assert (victim / "runscript").read_text() == "victim"
    assert [p for p in root.rglob("runscript") if p.is_file()]


def test_planted_file_symlink_is_replaced(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("victim")
    root = tmp_path / "root"
    (root / ".singularity.d").mkdir(parents=True)
    (root / ".singularity.d/runscript").symlink_to(str(victim))
    config_to_metadata(root, CONFIG)
    assert victim.read_text() == "victim"
    assert not (root / ".singularity.d/runscript").is_symlink()


@pytest.mark.parametrize("cfg", [{}, {"config": None}, {"config": {"Env": "x", "Cmd": 5}}])
def test_odd_configs(tmp_path: Path, cfg: dict[str, object]) -> None:
    config_to_metadata(tmp_path, cfg)
    assert (tmp_path / ".singularity.d/runscript").is_file()

"""The way back from in-image metadata to an OCI config: what imageconfig writes for an
image's ENV, ENTRYPOINT and CMD reads back as the same lists; shell code is left out."""

from __future__ import annotations

from pathlib import Path

import pytest

from sifpy.rootfs import ociconfig
from sifpy.rootfs.imageconfig import config_to_metadata, env_script, runscript
from sifpy.squashfs.read import DirectoryFiles

CASES = [
    (["/bin/echo"], []),
    ([], ["/bin/sh", "-c", "echo $HOME"]),
    (["/entry point", 'say "hi"', "back\\slash"], ["it's", "$x", "`cmd`", ""]),
]


@pytest.mark.parametrize(("entrypoint", "cmd"), CASES)
def test_runscript_lists_come_back(tmp_path: Path, entrypoint: list[str], cmd: list[str]) -> None:
    (tmp_path / ".singularity.d").mkdir()
    (tmp_path / ".singularity.d/runscript").write_text(runscript(entrypoint, cmd))
    assert ociconfig.entrypoint_cmd(DirectoryFiles(str(tmp_path))) == (entrypoint, cmd)


def test_other_runscript_is_the_entrypoint(tmp_path: Path) -> None:
    (tmp_path / ".singularity.d").mkdir()
    (tmp_path / ".singularity.d/runscript").write_text('#!/bin/sh\necho hello "$@"\n')
    got = ociconfig.entrypoint_cmd(DirectoryFiles(str(tmp_path)))
    assert got == (["/.singularity.d/runscript"], [])


def test_image_env_comes_back(tmp_path: Path) -> None:
    env = ["PATH=/opt/bin:/bin", 'Q=a "b" $c `d` \\e', "EMPTY=", "SPACE=x y"]
    config_to_metadata(tmp_path, {"config": {"Env": env, "Labels": {"k": "v"}}})
    files = DirectoryFiles(str(tmp_path))
    assert ociconfig.environment(files) == env
    assert ociconfig.labels(files) == {"k": "v"}
    assert env_script(env)  # the forward direction wrote it, not this test


def test_environment_section_static_lines_only(tmp_path: Path) -> None:
    envd = tmp_path / ".singularity.d/env"
    envd.mkdir(parents=True)
    (envd / "90-environment.sh").write_text(
        "#!/bin/sh\n"
        'export FOO="bar baz"\n'
        "export PATH=/opt/x:$PATH\n"
        "LIT='a $b'\n"
        "REF=${FOO}/sub\n"
        'if [ -n "$X" ]; then\n'
        "    INSIDE=1\n"
        "fi\n"
        "DATE=$(date)\n"
        "export FOO LIT\n"
    )
    got = ociconfig.environment(DirectoryFiles(str(tmp_path)))
    assert got == [
        "FOO=bar baz",
        f"PATH=/opt/x:{ociconfig.DEFAULT_PATH}",
        "LIT=a $b",
        "REF=bar baz/sub",
    ]

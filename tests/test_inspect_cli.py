"""``sifpy inspect`` answers as Apptainer 1.4's ``inspect`` does
(https://github.com/apptainer/apptainer/blob/main/cmd/internal/cli/inspect.go): from a
SIF's ``inspect-metadata.json`` object when it has one, else from the image's files; each
value without its trailing newlines, the sections in Apptainer's order without headers.
The end-to-end check against Apptainer's own output is
``integration/runtime/test_apptainer_built.py``."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from sifpy.cli import main
from sifpy.sif import ObjectInput, create
from sifpy.sif import format as SF
from tests.probe import need_tool


def sandbox(root: Path) -> Path:
    sd = root / ".singularity.d"
    (sd / "env").mkdir(parents=True)
    for name in ("01-base.sh", "90-environment.sh", "99-base.sh"):
        (sd / "env" / name).write_text(f"# {name}\n\n")
    (sd / "runscript").write_text("#!/bin/sh\necho files\n\n\n")
    (sd / "runscript.help").write_text("help from files\n")
    (sd / "labels.json").write_text('{"from": "files"}')
    app = root / "scif" / "apps" / "foo" / "scif"
    app.mkdir(parents=True)
    (app / "labels.json").write_text('{"app": "foo"}')
    return root


def inspect(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(["inspect", *args]) == 0
    return capsys.readouterr().out


def test_sandbox_text_as_apptainer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = str(sandbox(tmp_path / "s"))
    assert inspect(capsys, "--runscript", root) == "#!/bin/sh\necho files\n"
    # Only the files a build writes (10-docker*.sh, 9*-environment.sh), each followed by
    # an empty line.
    assert inspect(capsys, "--environment", root) == (
        "=== /.singularity.d/env/90-environment.sh ===\n# 90-environment.sh\n\n"
    )
    # Several sections: Apptainer's order (runscript, helpfile, labels), no headers.
    assert inspect(capsys, "--labels", "--helpfile", "--runscript", root) == (
        "#!/bin/sh\necho files\nhelp from files\nfrom: files\n"
    )


def test_app_json_is_under_apps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = str(sandbox(tmp_path / "s"))
    doc = json.loads(inspect(capsys, "--app", "foo", "--json", root))
    assert doc == {
        "data": {"attributes": {"apps": {"foo": {"labels": {"app": "foo"}}}}},
        "type": "container",
    }


def test_no_apps_lists_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = sandbox(tmp_path / "s")
    assert inspect(capsys, "--list-apps", str(root)) == "foo\n"
    subprocess.run(["rm", "-r", str(root / "scif")], check=True)
    assert inspect(capsys, "--list-apps", str(root)) == ""


def test_sif_metadata_object_answers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The stored metadata wins over the image's files (Apptainer's build stores it)."""
    root = sandbox(tmp_path / "s")
    sqfs, sif = tmp_path / "r.sqfs", tmp_path / "r.sif"
    subprocess.run([need_tool("mksquashfs"), str(root), str(sqfs), "-noappend", "-quiet",
                    "-all-root"], check=True)  # fmt: skip
    attrs = {
        "labels": {"from": "metadata"},
        "runscript": "#!/bin/sh\necho metadata",
        "deffile": "Bootstrap: scratch",
        "environment": {"/.singularity.d/env/90-environment.sh": "#!/bin/sh"},
        "apps": {"bar": {"labels": {"app": "bar"}}},
    }
    meta = json.dumps({"data": {"attributes": attrs}, "type": "container"}).encode()
    create(str(sif), [
        ObjectInput(SF.DataType.DEFFILE, b"Bootstrap: scratch\n\n"),
        ObjectInput(SF.DataType.GENERIC_JSON, meta, name="inspect-metadata.json"),
        ObjectInput.partition(str(sqfs), SF.FSType.SQUASH, SF.PartType.PRIMSYS, "amd64"),
    ])  # fmt: skip
    assert inspect(capsys, str(sif)) == "from: metadata\n"
    assert inspect(capsys, "--runscript", str(sif)) == "#!/bin/sh\necho metadata\n"
    assert inspect(capsys, "--deffile", str(sif)) == "Bootstrap: scratch\n"
    assert inspect(capsys, "--list-apps", str(sif)) == "bar\n"
    doc = json.loads(inspect(capsys, "--all", str(sif)))  # --all is JSON
    assert doc["data"]["attributes"] == attrs

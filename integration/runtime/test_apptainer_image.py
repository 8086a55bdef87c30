"""An image made without sifpy's builder, in Apptainer's layout, runs and inspects correctly.

The root file system and its ``/.singularity.d`` are written by hand here, packed with
``mksquashfs`` and wrapped with the reference ``siftool new``/``siftool add``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from integration.conftest import UserRunner
from integration.runtime.conftest import busybox_rootfs

DEFFILE = "Bootstrap: docker\nFrom: busybox\n\n%runscript\n    echo run\n"
LABELS = {"org.label-schema.schema-version": "1.0", "maintainer": "someone"}


def apptainer_layout(root: Path) -> None:
    sd = root / ".singularity.d"
    (sd / "env").mkdir(parents=True)
    (sd / "actions").mkdir()
    (sd / "libs").mkdir()
    (sd / "env" / "01-base.sh").write_text("#!/bin/sh\n")
    (sd / "env" / "10-docker2singularity.sh").write_text(
        '#!/bin/sh\nexport PATH="/opt/tool/bin:/usr/bin:/bin"\nexport DOCKERVAR="${DOCKERVAR:-"docker"}"\n'
    )
    (sd / "env" / "90-environment.sh").write_text(
        "#!/bin/sh\nexport GREETING=hello\nexport SHADOW=image\n"
    )
    (sd / "env" / "99-base.sh").write_text(
        '#!/bin/sh\nif [ -z "$LD_LIBRARY_PATH" ]; then LD_LIBRARY_PATH=/.singularity.d/libs; fi\n'
        'PS1="Apptainer> "\nexport LD_LIBRARY_PATH PS1\n'
    )
    (sd / "runscript").write_text('#!/bin/sh\necho "runscript: $GREETING $*"\n')
    (sd / "test").write_text("#!/bin/sh\necho testing\nexit 3\n")
    (sd / "runscript.help").write_text("This container says hello.\n")
    (sd / "labels.json").write_text(json.dumps(LABELS, indent="\t"))
    (sd / "Singularity").write_text(DEFFILE)
    (root / "opt" / "tool" / "bin").mkdir(parents=True)
    tool = root / "opt" / "tool" / "bin" / "tool"
    tool.write_text("#!/bin/sh\necho tool-ran\n")
    app = root / "scif" / "apps" / "foo" / "scif"
    (app / "env").mkdir(parents=True)
    (app / "runscript").write_text('#!/bin/sh\necho "app foo: $*"\n')
    (app / "labels.json").write_text('{"app": "foo"}')
    (root / "singularity").symlink_to(".singularity.d/runscript")
    (root / "environment").symlink_to(".singularity.d/env/90-environment.sh")


def _chmod_scripts(root: Path) -> None:
    for p in [*(root / ".singularity.d").glob("*"), *(root / ".singularity.d" / "env").glob("*"),
              root / "opt/tool/bin/tool", root / "scif/apps/foo/scif/runscript"]:  # fmt: skip
        if p.is_file():
            p.chmod(0o755)


@pytest.fixture(scope="module")
def image(workdir: Path) -> str:
    root = busybox_rootfs(workdir / "apptainer-rootfs", apptainer_layout)
    _chmod_scripts(root)
    sqfs, sif, deffile = workdir / "app.sqfs", workdir / "app.sif", workdir / "app.def"
    deffile.write_text(DEFFILE)
    run = lambda *a: subprocess.run(a, check=True, capture_output=True)  # noqa: E731
    run("mksquashfs", str(root), str(sqfs), "-comp", "zstd", "-noappend", "-quiet", "-all-root")
    run("siftool", "new", str(sif))
    run("siftool", "add", "--datatype", "1", "--groupid", "1", str(sif), str(deffile))
    run("siftool", "add", "--datatype", "4", "--partfs", "1", "--parttype", "2", "--partarch", "2",
        "--groupid", "1", str(sif), str(sqfs))  # fmt: skip
    sif.chmod(0o644)
    return str(sif)


def sifpy(runner: UserRunner, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return runner(["/usr/bin/python3", "-m", "sifpy", *args], **kw)


def test_run_uses_runscript_and_env(runtime_ready: UserRunner, image: str) -> None:
    r = sifpy(runtime_ready, "run", image, "a", "b c")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "runscript: hello a b c\n"


def test_exec_sees_image_env_in_order(runtime_ready: UserRunner, image: str) -> None:
    r = sifpy(runtime_ready, "exec", image, "sh", "-c", 'echo "$GREETING $DOCKERVAR $SHADOW"; tool; echo "$PATH"; echo "$LD_LIBRARY_PATH"',
              env={"SHADOW": "host", "DOCKERVAR": "host"})  # fmt: skip
    lines = r.stdout.splitlines()
    assert lines[0] == "hello docker image", r.stderr  # host values never beat the image's
    assert lines[1] == "tool-ran"
    assert lines[2].startswith("/opt/tool/bin:/usr/bin:/bin:")  # fixpath appended defaults
    assert lines[3] == "/.singularity.d/libs"


def test_test_action_returns_its_status(runtime_ready: UserRunner, image: str) -> None:
    r = sifpy(runtime_ready, "test", image)
    assert r.returncode == 3 and r.stdout == "testing\n"


def test_app(runtime_ready: UserRunner, image: str) -> None:
    r = sifpy(runtime_ready, "run", "--app", "foo", image, "x")
    assert r.stdout == "app foo: x\n", r.stderr
    r = sifpy(runtime_ready, "inspect", "--list-apps", image)
    assert r.stdout.split() == ["foo"]
    r = sifpy(runtime_ready, "inspect", "--app", "foo", "--json", image)
    # Apptainer puts one app's attributes under its name.
    assert json.loads(r.stdout)["data"]["attributes"]["apps"]["foo"]["labels"] == {"app": "foo"}


def test_inspect(runtime_ready: UserRunner, image: str) -> None:
    r = sifpy(runtime_ready, "inspect", image)
    assert r.stdout == "maintainer: someone\norg.label-schema.schema-version: 1.0\n", r.stderr
    assert sifpy(runtime_ready, "inspect", "--runscript", image).stdout.startswith(
        "#!/bin/sh\necho"
    )
    assert sifpy(runtime_ready, "inspect", "--deffile", image).stdout == DEFFILE
    assert (
        sifpy(runtime_ready, "inspect", "--helpfile", image).stdout
        == "This container says hello.\n"
    )
    doc = json.loads(sifpy(runtime_ready, "inspect", "--all", "--json", image).stdout)
    attrs = doc["data"]["attributes"]
    assert doc["type"] == "container"
    assert attrs["labels"] == LABELS
    assert attrs["test"].startswith("#!/bin/sh\necho testing")
    # Apptainer shows the environment files a build writes, not its own 01-base.sh and
    # 99-base.sh.
    assert set(attrs["environment"]) == {
        f"/.singularity.d/env/{n}" for n in ("10-docker2singularity.sh", "90-environment.sh")
    }


def test_inspect_needs_no_namespaces(image: str) -> None:
    """inspect reads the squashfs in Python: no FUSE, even with user namespaces refused."""
    code = (
        "import sys\n"
        "sys.modules['sifpy.runtime'] = None  # importing the runtime now fails\n"
        "from sifpy.cli import main; sys.exit(main(['inspect', '--runscript', sys.argv[1]]))"
    )
    r = subprocess.run([sys.executable, "-c", code, image], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("#!/bin/sh")

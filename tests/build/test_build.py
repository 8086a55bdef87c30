"""Build stages in order, with agents that need no namespace (scratch, busybox, oci)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from sifpy.build.options import BuildOptions
from sifpy.build.pipeline import build
from sifpy.build.workspace import WORK_PREFIX, Workspace, clean_stale
from sifpy.errors import BuildError, DefFileError, SifpyError, UsageError
from tests.conftest import need_tool

ORDER_DEF = """\
Bootstrap: scratch
Stage: first

%files
    {src} /from-host.txt

Bootstrap: scratch
Stage: second

%files from first
    /from-host.txt /copied.txt

%setup
    # %files from runs before %setup, host %files after it (Apptainer's internal/pkg/build/build.go).
    test -f "$APPTAINER_ROOTFS/copied.txt" && echo yes > "$SIFPY_ROOTFS/setup-saw-from"
    test -f "$APPTAINER_ROOTFS/later.txt" || echo no > "$SIFPY_ROOTFS/setup-saw-host"

%files
    {src} /later.txt

%runscript
    echo hi

%labels
    who second
"""


def _write(tmp_path: Path, text: str) -> Path:
    src = tmp_path / "src.txt"
    src.write_text("payload\n")
    d = tmp_path / "r.def"
    d.write_text(text.format(src=src))
    return d


def test_stage_order_and_final_stage_only(tmp_path: Path) -> None:
    deffile = _write(tmp_path, ORDER_DEF)
    out = tmp_path / "out"
    build(str(out), str(deffile), BuildOptions(sandbox=True))
    assert (out / "copied.txt").read_text() == "payload\n"
    assert (out / "later.txt").read_text() == "payload\n"
    assert (out / "setup-saw-from").read_text() == "yes\n"
    assert (out / "setup-saw-host").read_text() == "no\n"
    assert not (out / "from-host.txt").exists()  # stage one is not assembled
    labels = json.loads((out / ".singularity.d/labels.json").read_text())
    assert labels["who"] == "second"
    assert labels["org.label-schema.usage.singularity.deffile.stage"] == "second"
    stored = (out / ".singularity.d/Singularity").read_text()
    assert "Stage: first" in stored and "Stage: second" in stored
    assert not list(tmp_path.glob(WORK_PREFIX + "*"))


def test_existing_destination_needs_force(tmp_path: Path) -> None:
    deffile = _write(tmp_path, "Bootstrap: scratch\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("x")
    with pytest.raises(BuildError, match="already exists"):
        build(str(out), str(deffile), BuildOptions(sandbox=True))
    build(str(out), str(deffile), BuildOptions(sandbox=True, force=True))
    assert not (out / "old").exists() and (out / ".singularity.d").is_dir()


def test_failed_setup_leaves_nothing(tmp_path: Path) -> None:
    deffile = _write(tmp_path, "Bootstrap: scratch\n%setup\n    touch $SIFPY_ROOTFS/x\n    false\n")
    out = tmp_path / "out"
    with pytest.raises(BuildError, match="%setup failed"):
        build(str(out), str(deffile), BuildOptions(sandbox=True))
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.def", "src.txt"]


def test_update_keeps_sandbox(tmp_path: Path) -> None:
    first = _write(tmp_path, "Bootstrap: scratch\n%setup\n    echo 1 > $SIFPY_ROOTFS/one\n")
    out = tmp_path / "out"
    build(str(out), str(first), BuildOptions(sandbox=True))
    second = tmp_path / "two.def"
    second.write_text("Bootstrap: scratch\n%setup\n    echo 2 > $SIFPY_ROOTFS/two\n")
    build(str(out), str(second), BuildOptions(sandbox=True, update=True))
    assert (out / "one").exists() and (out / "two").exists()


def test_usage_errors(tmp_path: Path) -> None:
    deffile = _write(tmp_path, "Bootstrap: scratch\n")
    with pytest.raises(UsageError):
        build(str(tmp_path / "o"), str(deffile), BuildOptions(update=True))
    with pytest.raises(UsageError):
        build(str(tmp_path / "o"), str(deffile), BuildOptions(sections=frozenset({"bogus"})))
    with pytest.raises(UsageError):
        build(str(tmp_path / "o"), str(tmp_path / "missing.def"), BuildOptions())
    with pytest.raises(BuildError, match="unsupported agent"):
        bad = tmp_path / "bad.def"
        bad.write_text("Bootstrap: yum\nMirrorURL: x\n")
        build(str(tmp_path / "o"), str(bad), BuildOptions(sandbox=True))


def test_build_args_and_unused(tmp_path: Path) -> None:
    recipes = Path(__file__).parents[2] / "recipes"
    text = (recipes / "args.def").read_text().replace("Bootstrap: busybox", "Bootstrap: scratch")
    text = text.split("%post")[0] + "%labels\n    org.example.greeting {{ GREETING }}\n"
    deffile = tmp_path / "a.def"
    deffile.write_text(text)
    out = tmp_path / "out"
    build(str(out), str(deffile), BuildOptions(sandbox=True, build_args={"GREETING": "hey"}))
    labels = json.loads((out / ".singularity.d/labels.json").read_text())
    assert labels["org.example.greeting"] == "hey"
    with pytest.raises(DefFileError, match="unused build args"):
        build(str(tmp_path / "o2"), str(deffile), BuildOptions(sandbox=True, build_args={"X": "1"}))


def test_busybox_sif(tmp_path: Path) -> None:
    need_tool("mksquashfs")
    need_tool("unsquashfs")
    recipe = Path(__file__).parents[2] / "recipes/busybox-hello.def"
    out = tmp_path / "hello.sif"
    build(str(out), str(recipe), BuildOptions(compression="gzip"))
    from sifpy.sif import SifImage
    from sifpy.sif import format as SF

    with SifImage.open(out) as img:
        part = img.primary_partition()
        deffile = img.read(img.find(SF.DataType.DEFFILE)[0]).decode()
        meta = json.loads(img.read(img.find(SF.DataType.GENERIC_JSON)[0]))
        offset = part.offset
    assert "Bootstrap: busybox" in deffile
    assert meta["data"]["attributes"]["labels"]["org.example.demo"] == "hello"
    listing = subprocess.run(
        ["unsquashfs", "-s", "-o", str(offset), str(out)], capture_output=True, text=True
    ).stdout
    assert "gzip" in listing
    files = subprocess.run(
        ["unsquashfs", "-l", "-o", str(offset), str(out)], capture_output=True, text=True
    ).stdout
    for path in ("/bin/busybox", "/bin/sh", "/.singularity.d/runscript", "/singularity"):
        assert f"squashfs-root{path}\n" in files
    # SIF -> sandbox conversion (localimage), with the old deffile kept as history.
    sandbox = tmp_path / "sb"
    build(str(sandbox), str(out), BuildOptions(sandbox=True))
    assert (sandbox / "bin/busybox").is_file()
    history = (sandbox / ".singularity.d/bootstrap_history/Apptainer0").read_text()
    assert "Bootstrap: busybox" in history
    assert "localimage" in (sandbox / ".singularity.d/Singularity").read_text()
    # sandbox -> SIF
    again = tmp_path / "again.sif"
    build(str(again), str(sandbox), BuildOptions())
    assert again.stat().st_size > 4096


def test_stale_workspaces_are_cleaned(tmp_path: Path) -> None:
    ws = Workspace(str(tmp_path))
    live = Path(ws.path)
    dead = tmp_path / (WORK_PREFIX + "dead")
    (dead / "stage0/ro").mkdir(parents=True)
    (dead / ".lock").write_text("")
    os.chmod(dead / "stage0/ro", 0o500)
    clean_stale(str(tmp_path))
    assert live.exists() and not dead.exists()
    ws.close()
    assert not live.exists()


@pytest.mark.parametrize("how", ["signal", "status"])
def test_failed_mksquashfs_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """mksquashfs killed by a signal (or failing) half way through writing: the build
    fails with the reason, no SIF is at the destination, the work directory is gone."""
    real = need_tool("mksquashfs")
    fake = tmp_path / "bin"
    fake.mkdir()
    end = "kill -KILL $$" if how == "signal" else "exit 3"
    (fake / "mksquashfs").write_text(
        f'#!/bin/sh\n"{real}" "$@" >/dev/null 2>&1\nhead -c 100 /dev/zero > "$2"\n{end}\n'
    )
    (fake / "mksquashfs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "hello.sif"
    recipe = Path(__file__).parents[2] / "recipes/busybox-hello.def"
    with pytest.raises(SifpyError) as exc:
        build(str(out), str(recipe), BuildOptions(compression="gzip"))
    want = "killed by signal 9)" if how == "signal" else "exit status 3)"
    assert str(exc.value).startswith("can't create squashfs: mksquashfs failed (")
    assert str(exc.value).endswith(want), str(exc.value)
    assert os.listdir(out_dir) == []


def test_workspace_is_private_under_any_umask(tmp_path: Path) -> None:
    # CVE-2020-25039 class: the build's directories are 0700 whatever the umask says.
    old = os.umask(0)
    try:
        ws = Workspace(str(tmp_path))
    finally:
        os.umask(old)
    try:
        for path in (ws.path, ws.scratch):
            st = os.stat(path)
            assert (st.st_mode & 0o777, st.st_uid) == (0o700, os.getuid()), path
    finally:
        ws.close()


def test_a_deffile_without_bootstrap_says_so(tmp_path: Path) -> None:
    d = tmp_path / "x.def"
    d.write_text("%post\n    true\n")
    with pytest.raises(BuildError) as exc:
        build(str(tmp_path / "x.sif"), str(d), BuildOptions())
    assert exc.value.message == "can't build: the definition file has no 'Bootstrap:' header"
    assert not (tmp_path / "x.sif").exists()


def test_fix_perms_gives_the_owner_rwx(tmp_path: Path) -> None:
    base = tmp_path / "base"
    (base / "locked").mkdir(parents=True)
    (base / "locked" / "secret").write_text("x")
    (base / "tool").write_text("#!/bin/sh\n")
    os.chmod(base / "locked" / "secret", 0o000)
    os.chmod(base / "tool", 0o055)
    os.chmod(base / "locked", 0o500)
    d = tmp_path / "x.def"
    d.write_text(f"Bootstrap: localimage\nFrom: {base}\n")
    modes = {}
    for fix in (False, True):
        out = tmp_path / f"out-{fix}"
        build(str(out), str(d), BuildOptions(sandbox=True, fix_perms=fix))
        modes[fix] = [(out / p).stat().st_mode & 0o777 for p in ("locked", "locked/secret", "tool")]
        os.chmod(out / "locked", 0o700)  # so that pytest can remove it
    assert modes[False] == [0o500, 0o000, 0o055]
    assert modes[True] == [0o700, 0o600, 0o755]

"""Where a build works and what it leaves, as the unprivileged test user: the work
directory under --tmpdir / $SIFPY_TMPDIR / $APPTAINER_TMPDIR / $TMPDIR (not beside the
output), --no-cleanup, the log of a failed %post, --bind during the build."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from integration.build.conftest import Builder

SETUP_DEF = 'Bootstrap: busybox\n\n%setup\n    echo "ROOTFS=$SIFPY_ROOTFS"\n'
FAIL_DEF = """\
Bootstrap: busybox

%post
    echo to-stdout
    echo to-stderr >&2
    cat /mnt/data/f
    exit 3
"""


def _dirs(builder: Builder, name: str) -> tuple[Path, Path]:
    top = builder.out / name
    out, tmp = top / "out", top / "tmp"
    for d in (top, out, tmp):
        d.mkdir()
        os.chown(d, builder.runner.user.uid, builder.runner.user.gid)
    return out, tmp


@pytest.mark.parametrize("how", ["--tmpdir", "SIFPY_TMPDIR", "APPTAINER_TMPDIR", "TMPDIR"])
def test_work_directory_goes_to_the_tmpdir(user_builder: Builder, how: str) -> None:
    out, tmp = _dirs(user_builder, f"tmpdir-{how.strip('-')}")
    (out / "s.def").write_text(SETUP_DEF)
    argv = ["build", *(["--tmpdir", str(tmp)] if how == "--tmpdir" else [])]
    env = {} if how == "--tmpdir" else {how: str(tmp)}
    res = user_builder.runner(
        user_builder.argv([*argv, "s.sif", "s.def"]), env=env, cwd=str(out), timeout=300
    )
    assert res.returncode == 0, res.stderr
    rootfs = re.search(r"ROOTFS=(\S+)", res.stdout + res.stderr)
    assert rootfs and rootfs.group(1).startswith(f"{tmp}/.sifpy-build-"), res.stdout
    assert sorted(os.listdir(out)) == ["s.def", "s.sif"] and os.listdir(tmp) == []


def test_failed_post_keeps_a_log_and_no_cleanup_keeps_the_directory(
    user_builder: Builder,
) -> None:
    out, tmp = _dirs(user_builder, "failed-post")
    (out / "data").mkdir()
    (out / "data" / "f").write_text("from the host\n")
    (out / "f.def").write_text(FAIL_DEF)
    bind = f"{out / 'data'}:/mnt/data:ro"
    argv = ["build", "--no-cleanup", "--bind", bind, "f.sif", "f.def"]
    res = user_builder.runner(
        user_builder.argv(argv), env={"TMPDIR": str(tmp)}, cwd=str(out), timeout=300
    )
    assert res.returncode == 1
    assert "from the host" in res.stdout  # --bind reached %post
    hint = res.stderr.splitlines()[-1]
    m = re.fullmatch(r"hint: its output is in (\S+)", hint)
    assert m, res.stderr
    log = Path(m.group(1))
    assert log.parent == tmp
    text = log.read_text()
    for line in ("to-stdout", "to-stderr", "from the host"):
        assert line in text
    kept = [p for p in tmp.iterdir() if p.name.startswith("sifpy-kept-")]
    assert len(kept) == 1 and f"kept: {kept[0]}" in res.stderr
    assert (kept[0] / "stage0" / "bin" / "busybox").exists()
    assert not (out / "f.sif").exists()
    # The next build leaves a kept directory alone; without --no-cleanup, nothing stays.
    argv = ["build", "--bind", bind, "f.sif", "f.def"]
    res = user_builder.runner(
        user_builder.argv(argv), env={"TMPDIR": str(tmp)}, cwd=str(out), timeout=300
    )
    assert res.returncode == 1
    names = sorted(p.name for p in tmp.iterdir())
    assert len(names) == 3 and kept[0].name in names, names  # two logs and the kept one
    assert not any(n.startswith(".sifpy-build-") for n in names)

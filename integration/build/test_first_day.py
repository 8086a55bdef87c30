"""A new user's first commands, run as the unprivileged test user: the one-argument build,
``./app.sif``, and the installed program."""

from __future__ import annotations

import os
from pathlib import Path

from integration.build.conftest import Builder


def _user_dir(builder: Builder, name: str) -> Path:
    d = builder.out / name
    d.mkdir(exist_ok=True)
    if os.getuid() == 0:
        os.chown(d, builder.runner.user.uid, builder.runner.user.gid)
    return d


def test_build_with_one_argument_writes_name_sif_here(user_builder: Builder) -> None:
    cwd = _user_dir(user_builder, "one-arg")
    recipe = user_builder.recipes / "busybox-hello.def"
    argv = user_builder.argv(["build", str(recipe)])
    res = user_builder.runner(argv, cwd=str(cwd), timeout=300)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in cwd.iterdir()) == ["busybox-hello.sif"]
    run = user_builder.runner(user_builder.argv(["run", "busybox-hello.sif"]), cwd=str(cwd))
    assert run.returncode == 0, run.stderr
    assert run.stdout == "hello from sifpy\n"
    # The shell prompt names sifpy, as Apptainer's names Apptainer.
    ps1 = ["exec", "busybox-hello.sif", "sh", "-c", 'echo "$PS1"']
    prompt = user_builder.runner(user_builder.argv(ps1), cwd=str(cwd))
    assert prompt.stdout == "sifpy> \n", prompt.stderr
    # Run again: the output exists, so --force is needed, as with the two-argument form.
    again = user_builder.runner(argv, cwd=str(cwd), timeout=300)
    assert again.returncode != 0 and "already exists" in again.stderr


def test_bind_path_in_the_config_file(user_builder: Builder) -> None:
    cwd = _user_dir(user_builder, "bind-path")
    sif = user_builder.build("busybox-hello")
    (cwd / "site").mkdir()
    (cwd / "site" / "f").write_text("from the site\n")
    conf = cwd / "sifpy.conf"
    conf.write_text(f"bind path = {cwd / 'site'}:/mnt/site\nbind path = /nonexistent/skipped\n")
    env = {"SIFPY_CONFIG": str(conf)}
    cat = ["exec", str(sif), "cat", "/mnt/site/f"]
    res = user_builder.runner(user_builder.argv(cat), env=env, cwd=str(cwd))
    assert res.returncode == 0 and res.stdout == "from the site\n", res.stderr
    no = ["exec", "--no-mount", "bind-paths", str(sif), "cat", "/mnt/site/f"]
    res = user_builder.runner(user_builder.argv(no), env=env, cwd=str(cwd))
    assert res.returncode != 0 and res.stdout == ""


def test_overlay_create_writes_apptainers_layout(user_builder: Builder) -> None:
    import shutil
    import subprocess

    cwd = _user_dir(user_builder, "overlay")
    img = cwd / "ov.img"
    argv = ["overlay", "create", "--size", "16", "--create-dir", "/data", str(img)]
    res = user_builder.runner(user_builder.argv(argv), cwd=str(cwd))
    assert res.returncode == 0, res.stderr
    assert img.stat().st_size == 16 << 20 and img.stat().st_uid == user_builder.runner.user.uid
    debugfs = shutil.which("debugfs") or "/usr/sbin/debugfs"
    for path, want in (("/", {"upper", "work"}), ("/upper", {"data"})):
        out = subprocess.run([debugfs, "-R", f"ls -l {path}", str(img)],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
        rows = [ln.split() for ln in out.splitlines() if ln.strip()]
        names = {r[-1]: r for r in rows if r[-1] not in (".", "..", "lost+found")}
        assert set(names) == want, out
        for row in names.values():  # the user's own, as Apptainer's
            u = user_builder.runner.user
            assert row[3:5] == [str(u.uid), str(u.gid)], out
    again = user_builder.runner(user_builder.argv(argv), cwd=str(cwd))
    assert again.returncode != 0 and "File exists" in again.stderr
    # The image it wrote is an overlay as Apptainer's: written through, kept, read back :ro.
    sif = user_builder.build("busybox-hello")
    write = ["exec", "--overlay", str(img), str(sif), "sh", "-c", "echo kept > /data/f"]
    res = user_builder.runner(user_builder.argv(write), cwd=str(cwd))
    assert res.returncode == 0, res.stderr
    read = ["exec", "--overlay", f"{img}:ro", str(sif), "cat", "/data/f"]
    res = user_builder.runner(user_builder.argv(read), cwd=str(cwd))
    assert (res.returncode, res.stdout) == (0, "kept\n"), res.stderr

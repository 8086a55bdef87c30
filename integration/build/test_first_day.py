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

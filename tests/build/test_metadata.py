"""The /.singularity.d tree, labels and SCIF apps, as Apptainer lays them out."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from sifpy.deffile import parse
from sifpy.rootfs import metadata as M

DEF = """\
Bootstrap: scratch
Stage: one

%labels
    a.label from-recipe
    post.label from-recipe

%environment
    export FOO=bar

%runscript -x
    echo run

%startscript
#!/bin/bash
echo start

%test
    true

%help
    Helpful text.
"""


def test_base_environment_layout(tmp_path: Path) -> None:
    M.base_environment(tmp_path)
    sd = tmp_path / ".singularity.d"
    for d in ("libs", "actions", "env"):
        assert (sd / d).is_dir()
    for d in ("dev", "proc", "root", "var/tmp", "tmp", "etc", "sys", "home"):
        assert (tmp_path / d).is_dir()
    for a in ("exec", "run", "shell", "start", "test"):
        assert os.access(sd / "actions" / a, os.X_OK)
    env = sorted(p.name for p in (sd / "env").iterdir())
    assert env == [
        "01-base.sh",
        "90-environment.sh",
        "95-apps.sh",
        "99-base.sh",
        "99-runtimevars.sh",
    ]
    assert "There is no runscript defined" in (sd / "runscript").read_text()
    assert (sd / "startscript").read_text() == "#!/bin/sh\n"
    assert (tmp_path / "etc/hosts").read_text() == ""
    assert (tmp_path / "etc/resolv.conf").read_text() == ""
    assert os.readlink(tmp_path / "singularity") == ".singularity.d/runscript"
    assert os.readlink(tmp_path / "environment") == ".singularity.d/env/90-environment.sh"
    assert os.readlink(tmp_path / ".run") == ".singularity.d/actions/run"


def test_base_environment_keeps_existing_files(tmp_path: Path) -> None:
    (tmp_path / ".singularity.d").mkdir()
    (tmp_path / ".singularity.d/runscript").write_text("#!/bin/sh\necho mine\n")
    M.base_environment(tmp_path)
    assert "mine" in (tmp_path / ".singularity.d/runscript").read_text()


def test_base_environment_never_writes_through_planted_symlinks(tmp_path: Path) -> None:
    root, victim = tmp_path / "root", tmp_path / "victim"
    root.mkdir()
    victim.mkdir()
    (root / ".singularity.d").symlink_to(victim)  # absolute: resolved inside the root
    (root / "etc").mkdir()
    (root / "etc/hosts").symlink_to(victim / "hosts")
    M.base_environment(root)
    assert list(victim.iterdir()) == []
    assert (root / str(victim).lstrip("/") / "env/99-base.sh").is_file()


def test_script_file_shebang_rules() -> None:
    assert M.script_file("    echo hi\n") == "#!/bin/sh\n\n    echo hi\n"
    assert M.script_file("#!/bin/bash\necho hi\n") == "#!/bin/bash\n\necho hi\n"
    assert M.script_file("echo hi\n", "-x").startswith("#!/bin/sh -x\n")


def test_build_date_format() -> None:
    text = M.build_date(0)
    assert re.fullmatch(
        r"[A-Z][a-z]+day_\d{1,2}_[A-Z][a-z]+_\d{4}_\d{1,2}:\d{1,2}:\d{1,2}_\S+", text
    )


def test_label_merge_order_and_force() -> None:
    existing = {"a.label": "image", "b": "image"}
    build = {"org.label-schema.schema-version": "1.0", "b": "build"}
    post = "post.label from-post\n# comment\nc   spaced value\n"
    recipe = [("a.label", "recipe"), ("post.label", "recipe"), ("d", "recipe")]
    labels, skipped = M.merge_labels(existing, post, build, recipe, force=False)
    assert labels["a.label"] == "image"  # %labels does not overwrite without --force
    assert labels["post.label"] == "from-post"
    assert labels["b"] == "build"  # build labels always win over the image's
    assert labels["c"] == "spaced value"
    assert labels["d"] == "recipe"
    assert sorted(skipped) == ["a.label", "post.label"]
    forced, skipped = M.merge_labels(existing, post, build, recipe, force=True)
    assert forced["a.label"] == "recipe" and forced["post.label"] == "recipe" and not skipped


def test_insert_writes_sections(tmp_path: Path) -> None:
    stage = parse(DEF).final
    M.base_environment(tmp_path)
    (tmp_path / ".build.labels").write_text("post.label from-post\n")
    warnings = M.insert(tmp_path, stage, M.Insert("DEFTEXT"))
    sd = tmp_path / ".singularity.d"
    assert (sd / "Singularity").read_text() == "DEFTEXT"
    assert (sd / "runscript").read_text() == "#!/bin/sh -x\n\n    echo run\n"
    assert (sd / "startscript").read_text() == "#!/bin/bash\n\necho start\n"
    assert (sd / "test").read_text() == "#!/bin/sh\n\n    true\n"
    assert (sd / "runscript.help").read_text().strip() == "Helpful text."
    env90 = (sd / "env/90-environment.sh").read_text()
    assert env90.startswith("#!/bin/sh") and "export FOO=bar" in env90
    labels = json.loads((sd / "labels.json").read_text())
    assert labels["a.label"] == "from-recipe"
    assert labels["post.label"] == "from-post"
    assert labels["org.label-schema.usage.singularity.deffile.bootstrap"] == "scratch"
    assert labels["org.label-schema.usage.singularity.deffile.stage"] == "one"
    assert labels["org.label-schema.usage"] == "/.singularity.d/runscript.help"
    assert labels["org.label-schema.schema-version"] == "1.0"
    assert "org.label-schema.build-date" in labels and "org.label-schema.build-arch" in labels
    assert "\t" in (sd / "labels.json").read_text()  # Go's MarshalIndent with a tab
    assert not (tmp_path / ".build.labels").exists()
    assert any("post.label" in w for w in warnings)


def test_sections_filter(tmp_path: Path) -> None:
    stage = parse(DEF).final
    M.base_environment(tmp_path)
    M.insert(tmp_path, stage, M.Insert("X", sections=frozenset({"labels"})))
    sd = tmp_path / ".singularity.d"
    assert "There is no runscript" in (sd / "runscript").read_text()
    assert "FOO" not in (sd / "env/90-environment.sh").read_text()
    assert "a.label" in json.loads((sd / "labels.json").read_text())


def test_scif_apps_tree(tmp_path: Path) -> None:
    text = (Path(__file__).parents[2] / "recipes/scif-apps.def").read_text()
    stage = parse(text).final
    M.base_environment(tmp_path)
    post = M.install_apps(tmp_path, stage)
    a = tmp_path / "scif/apps/greet"
    for d in ("bin", "lib", "scif/env"):
        assert (a / d).is_dir()
    assert (tmp_path / "scif/data/greet/input").is_dir()
    assert (tmp_path / "scif/data/greet/output").is_dir()
    assert 'SCIF_APPROOT="/scif/apps/greet"' in (a / "scif/env/01-base.sh").read_text()
    assert "GREETING" in (a / "scif/env/90-environment.sh").read_text()
    assert (a / "scif/runscript").read_text().startswith("#!/bin/sh\n")
    assert json.loads((a / "scif/labels.json").read_text()) == {
        "SCIF_APP_NAME": "greet",
        "org.example.app": "greet",
    }
    assert (a / "scif/runscript.help").is_file()
    assert (tmp_path / "scif/apps/count/scif/test").is_file()
    assert "SCIF_APPROOT_count" in (tmp_path / ".singularity.d/env/94-appsbase.sh").read_text()
    # %appinstall bodies join %post in app order, each in its app root.
    assert post.index("cd /scif/apps/greet") < post.index("cd /scif/apps/count")
    assert ". /scif/apps/greet/scif/env/01-base.sh" in post


def test_oci_config_metadata(tmp_path: Path) -> None:
    M.base_environment(tmp_path)
    config = {
        "config": {
            "Env": ["PATH=/opt/bin:/usr/bin", "A=1 $x", "BAD-NAME=x", "EMPTY"],
            "Entrypoint": ["/bin/echo"],
            "Cmd": ["hello"],
            "Labels": {"maintainer": "me"},
        }
    }
    M.oci_config(tmp_path, config)
    env = (tmp_path / ".singularity.d/env/10-docker2singularity.sh").read_text()
    assert 'export PATH="/opt/bin:/usr/bin"' in env
    assert 'export A="${A:-"1 \\$x"}"' in env
    assert "BAD-NAME" not in env
    assert 'export EMPTY="${EMPTY:-}"' in env
    run = (tmp_path / ".singularity.d/runscript").read_text()
    assert "OCI_ENTRYPOINT=" in run and "/bin/echo" in run
    assert json.loads((tmp_path / ".singularity.d/labels.json").read_text()) == {"maintainer": "me"}


def test_inspect_json(tmp_path: Path) -> None:
    stage = parse(DEF).final
    M.base_environment(tmp_path)
    M.insert(tmp_path, stage, M.Insert("DEFTEXT"))
    doc = json.loads(M.inspect_json(tmp_path))
    assert doc["type"] == "container"
    attrs = doc["data"]["attributes"]
    assert attrs["deffile"] == "DEFTEXT"
    assert "echo run" in attrs["runscript"]
    assert attrs["labels"]["a.label"] == "from-recipe"
    assert "/.singularity.d/env/90-environment.sh" in attrs["environment"]
    assert attrs["apps"] == {}

"""``Bootstrap: oci-archive`` of an image made by independent tools (umoci + skopeo: several
layers, whiteouts, an opaque directory, hardlinks and symlinks) builds exactly the tree
``umoci unpack`` produces, plus only the metadata every build adds."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

from integration.build.conftest import Builder
from integration.test_unpack_umoci import describe, make_image, run
from tests.conftest import need_tool

# What every sifpy/Apptainer build adds to the image's own tree (base_environment.go).
BUILD_ADDS = {".singularity.d", "environment", "singularity", "dev", "proc", "sys", "tmp",
              "home", "root", "var", "etc", ".exec", ".run", ".shell", ".test"}  # fmt: skip


def test_oci_archive_builds_the_umoci_tree(tmp_path: Path) -> None:
    umoci, skopeo = need_tool("umoci"), need_tool("skopeo")
    image = make_image(tmp_path, umoci)
    reference = tmp_path / "reference"
    run(umoci, "unpack", "--rootless", "--image", f"{image}:t", str(reference))
    archive = tmp_path / "image.tar"
    run(skopeo, "copy", f"oci:{image}:t", f"oci-archive:{archive}:t")
    deffile = tmp_path / "app.def"
    deffile.write_text(f"Bootstrap: oci-archive\nFrom: {archive}\n")
    out = tmp_path / "sandbox"
    r = subprocess.run([sys.executable, "-m", "sifpy", "build", "--sandbox", str(out), str(deffile)],
                       capture_output=True, text=True, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr
    expected, got = describe(reference / "rootfs"), describe(out)
    for path, value in expected.items():
        assert got.get(path) == value, path
    extra = {p for p in got if p not in expected}
    assert all(p.split("/")[0] in BUILD_ADDS for p in extra), sorted(extra)
    # The cases the image exists for really are in it.
    assert "gone" not in got and "gonedir" not in got
    assert sorted(p for p in got if p.startswith("opq/")) == ["opq/after", "opq/before"]
    assert got["hl-lower"][3] == got["usr/bin/tool"][3] is not None
    assert got["hl-symlink"][0] == stat.S_IFLNK


def test_oci_archive_with_a_tag_as_the_user(tmp_path: Path, user_builder: Builder) -> None:
    """``From: image.tar:t`` names the archive image.tar and its tag t, as Apptainer's
    containers/image splits it (at the first colon); built by the unprivileged user."""
    umoci, skopeo = need_tool("umoci"), need_tool("skopeo")
    image = make_image(tmp_path, umoci)
    archive = user_builder.out / "tagged.tar"
    run(skopeo, "copy", f"oci:{image}:t", f"oci-archive:{archive}:t")
    archive.chmod(0o644)
    for tag, ok in (("t", True), ("other", False)):
        deffile = user_builder.out / f"tagged-{tag}.def"
        deffile.write_text(f"Bootstrap: oci-archive\nFrom: {archive}:{tag}\n")
        deffile.chmod(0o644)
        r = user_builder.run(["build", "--force", "--sandbox", f"tagged-{tag}", str(deffile)])
        assert (r.returncode == 0) == ok, r.stdout + r.stderr
        if not ok:
            assert f"can't find tag {tag}" in r.stderr
    assert (user_builder.out / "tagged-t" / "usr/bin/tool").exists()

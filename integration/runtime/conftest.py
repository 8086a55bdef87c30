"""Fixtures for the runtime tests: busybox images (SIF and sandbox) and a launcher driver."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from integration.conftest import REPO, UserRunner, require
from tests.probe import need_tool

# Runs as the test user: launch() one container from a JSON spec; exit with its status.
DRIVER = r"""
import json, os, sys
from sifpy.errors import SifpyError
from sifpy.runtime import LaunchOptions, LaunchSpec, Sandbox, SifPartition, launch
cfg = json.loads(sys.argv[1])
if "sandbox" in cfg:
    image = Sandbox(cfg["sandbox"])
else:
    image = SifPartition(cfg["sif"], cfg["offset"], cfg["size"])
env = {"PATH": "/bin", "HOME": os.environ["HOME"], **cfg.get("env", {})}
spec = LaunchSpec(image, cfg["argv"], env, cfg.get("cwd") or os.getcwd(),
                  [tuple(b) for b in cfg.get("binds", [])], LaunchOptions(**cfg.get("options", {})))
try:
    rc = launch(spec)
except SifpyError as exc:
    print(f"SETUP-ERROR: {exc.message}", file=sys.stderr)
    rc = exc.exit_status
sys.exit(rc)
"""


def busybox_rootfs(path: Path, extra: Callable[[Path], None] | None = None) -> Path:
    """A root file system with /bin/busybox and a symlink for each applet."""
    (path / "bin").mkdir(parents=True)
    shutil.copy2(shutil.which("busybox") or "/bin/busybox", path / "bin" / "busybox")
    applets = subprocess.run(
        [str(path / "bin" / "busybox"), "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    for name in applets:
        if name != "busybox":
            (path / "bin" / name).symlink_to("busybox")
    (path / "etc").mkdir()
    (path / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (path / "etc" / "group").write_text("root:x:0:\n")
    (path / "etc" / "image-marker").write_text("from the image\n")
    (path / "noexec").write_text("not executable\n")
    if extra:
        extra(path)
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                os.chmod(p, 0o755 if os.path.isdir(p) or name == "busybox" else 0o644)
    return path


def make_sif(rootfs: Path, sif: Path) -> dict[str, Any]:
    """Pack ``rootfs`` into a squashfs inside a new SIF; return the driver's image fields."""
    sqfs = sif.with_suffix(".sqfs")
    subprocess.run(
        ["mksquashfs", str(rootfs), str(sqfs), "-comp", "gzip", "-noappend", "-quiet"],
        check=True,
        capture_output=True,
    )
    subprocess.run(["siftool", "new", str(sif)], check=True, capture_output=True)
    subprocess.run(
        [
            *("siftool", "add", "--datatype", "4", "--partfs", "1", "--parttype", "2"),
            *("--partarch", "2", str(sif), str(sqfs)),
        ],
        check=True,
        capture_output=True,
    )
    info = subprocess.run(
        ["siftool", "info", "1", str(sif)], check=True, capture_output=True, text=True
    ).stdout
    offset = re.search(r"Offset:\s+(\d+)", info)
    size = re.search(r"Size:\s+(\d+)", info)
    assert offset and size, info
    sqfs.unlink()
    os.chmod(sif, 0o644)
    return {"sif": str(sif), "offset": int(offset[1]), "size": int(size[1])}


def build_images(workdir: Path) -> dict[str, dict[str, Any]]:
    """The ``images`` fixture's (integration/conftest.py) test images: ``plain`` (SIF), ``sandbox`` (directory), ``hostile`` (SIF whose
    /tmp points to /etc and whose /data is an absolute symlink to a host path)."""
    plain = busybox_rootfs(workdir / "rootfs")
    # Host directories the image's symlinks aim at: one the container does not see, one
    # under /tmp, which the container shares with the host.
    victim = workdir / "victim"
    victim.mkdir()
    hidden_path = f"/var/cache/sifpy-it-{os.getpid()}/victim"

    def hostile_links(root: Path) -> None:
        (root / "tmp").symlink_to("/etc")
        (root / "data").symlink_to(hidden_path + "/sub/dir")
        (root / "data2").symlink_to(str(victim / "sub" / "dir"))
        (root / "vt").symlink_to("/var/tmp/../../..")

    hostile = busybox_rootfs(workdir / "hostile-rootfs", hostile_links)
    return {
        "plain": make_sif(plain, workdir / "plain.sif"),
        "sandbox": {"sandbox": str(plain)},
        "hostile": {**make_sif(hostile, workdir / "hostile.sif"), "victim": str(victim)},
        "hidden": {"path": hidden_path},
    }


class Launcher:
    """Runs the driver as the test user."""

    def __init__(self, runner: UserRunner, driver: str, image: dict[str, Any]) -> None:
        self.runner = runner
        self.driver = driver
        self.image = image

    def cfg(self, argv: list[str], **kw: Any) -> str:
        """The driver's JSON argument."""
        return json.dumps({**self.image, "argv": argv, **kw})

    def __call__(self, argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the container; ``kw``: binds, options, env, cwd, run_kw."""
        run_kw = kw.pop("run_kw", {})
        return self.runner(["/usr/bin/python3", self.driver, self.cfg(argv, **kw)], **run_kw)

    def popen(self, argv: list[str], **kw: Any) -> Any:
        """Start the driver in the background (stdout piped)."""
        return self.runner.popen(
            ["/usr/bin/python3", self.driver, self.cfg(argv, **kw)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )


@pytest.fixture(scope="session")
def driver(workdir: Path) -> str:
    """The driver script, world-readable."""
    path = workdir / "driver.py"
    path.write_text(DRIVER)
    path.chmod(0o644)
    return str(path)


def user_processes(uid: int, name: str, live: bool = False) -> list[int]:
    """Pids of processes of ``uid`` whose command name is ``name`` (``live``: zombies not
    counted)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if fields.get("Name", "").strip() != name or fields["Uid"].split()[0] != str(uid):
            continue
        if not live or fields.get("State", "").split()[:1] != ["Z"]:
            out.append(int(entry))
    return out


def _tmp_of(uid: int) -> set[str]:
    """/tmp entries owned by ``uid`` (others' entries may vanish while this looks)."""
    out = set()
    for name in os.listdir("/tmp"):
        try:
            if os.stat(f"/tmp/{name}").st_uid == uid:
                out.add(name)
        except FileNotFoundError:
            pass
    return out


def _mounts() -> list[str]:
    return sorted(Path("/proc/self/mountinfo").read_text().splitlines())


@pytest.fixture()
def no_leftovers(runtime_ready: UserRunner) -> Iterator[None]:
    """After the test: no new host mount, no squashfuse of the test user, no new /tmp entry."""
    uid = runtime_ready.user.uid
    before_mounts = _mounts()
    before_tmp = _tmp_of(uid)
    yield
    assert _mounts() == before_mounts
    assert user_processes(uid, "squashfuse_ll") == []
    assert user_processes(uid, "sifpy-sqfs-serv") == []  # sifpy's own FUSE server
    after_tmp = _tmp_of(uid)
    assert after_tmp <= before_tmp


@pytest.fixture(scope="session")
def own_server(sifpy_copy: str) -> str:
    """sifpy's own FUSE server (sifpy/runtime/serve/sqfs_serve.c), built into the sifpy
    copy with the warnings as errors, where Python finds it; the starter links it in."""
    from sifpy.cli import launcher

    require(None if shutil.which("cc") else "no C compiler (cc) to build the FUSE server")
    flags = launcher.server_flags()
    require(None if flags else "no libsquashfuse-dev, libfuse3-dev or pkg-config")
    dest = Path(sifpy_copy) / "sifpy" / "runtime" / "serve" / "sifpy-sqfs-serve"
    old = list(launcher.CFLAGS)
    launcher.CFLAGS.append("-Werror")
    try:
        assert launcher.write_server(str(dest))
    finally:
        launcher.CFLAGS[:] = old
    return str(dest)


def build_starter(
    sifpy_copy: str,
    workdir: Path,
    name: str = "sifpy-starter",
    overrides: dict[str, str] | None = None,
) -> str:
    """The ``starter`` fixture's (integration/conftest.py) program: the starter (the compiled ``sifpy`` program, sifpy/cli/starter.c), built for Debian's
    python3 and the world-readable sifpy copy, with the warnings as errors and sifpy's FUSE
    server linked in, as `make venv` builds it."""
    from sifpy.cli import launcher

    require(None if shutil.which("cc") else "no C compiler (cc) to build the starter")
    # The starter's own starts serve with sifpy's server linked in (no squashfuse_ll exec).
    require(None if launcher.server_flags() else "libsquashfuse-dev or libfuse3-dev is missing")
    dest = workdir / name
    old = list(launcher.CFLAGS)
    launcher.CFLAGS.append("-Werror")
    try:
        paths = [sifpy_copy, *launcher.site_paths("/usr/bin/python3")]
        kind = launcher.write(str(dest), "/usr/bin/python3", paths=paths, overrides=overrides)
    finally:
        launcher.CFLAGS[:] = old
    assert kind == "starter"
    return str(dest)


@pytest.fixture()
def sif(
    runtime_ready: UserRunner, driver: str, images: dict[str, Any], no_leftovers: None
) -> Launcher:
    """Launch in the plain busybox SIF."""
    return Launcher(runtime_ready, driver, images["plain"])


@pytest.fixture()
def sandbox(
    runtime_ready: UserRunner, driver: str, images: dict[str, Any], no_leftovers: None
) -> Launcher:
    """Launch in the busybox sandbox directory."""
    return Launcher(runtime_ready, driver, images["sandbox"])


@pytest.fixture()
def root_victim(test_user: Any, images: dict[str, Any]) -> Iterator[Path]:
    """Create the host directory the hostile /data points to, writable by the test user."""
    path = Path(images["hidden"]["path"])
    path.mkdir(parents=True)
    os.chown(path, test_user.uid, test_user.gid)
    yield path
    shutil.rmtree(path.parent, ignore_errors=True)


@pytest.fixture()
def hostile(
    runtime_ready: UserRunner, driver: str, images: dict[str, Any], no_leftovers: None
) -> Launcher:
    """Launch in the hostile SIF."""
    image = {k: v for k, v in images["hostile"].items() if k != "victim"}
    return Launcher(runtime_ready, driver, image)


def ok(res: subprocess.CompletedProcess[str], code: int = 0) -> str:
    """Assert the exit status (showing the output if not) and return stdout."""
    assert res.returncode == code, f"rc={res.returncode}\n{res.stdout}\n{res.stderr}"
    return res.stdout


@pytest.fixture()
def user_dir(test_user: Any) -> Iterator[Path]:
    """A directory owned by the test user outside /tmp and $HOME (so the cwd bind shows)."""
    import tempfile

    base = "/srv" if os.path.isdir("/srv") else "/var/cache"
    path = Path(tempfile.mkdtemp(prefix="sifpy-it-", dir=base))
    os.chown(path, test_user.uid, test_user.gid)
    path.chmod(0o755)
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


APPTAINER_BUILT = Path(__file__).resolve().parent / "apptainer_built"
# What shapes a SIF sifpy builds and its metadata: a change rebuilds the cached results.
SIFPY_WRITERS = ("sifpy/build", "sifpy/deffile", "sifpy/rootfs", "sifpy/sif", "sifpy/squashfs")
TABLES = REPO / "tests" / "runtime" / "test_env_apptainer.py"


@dataclass(frozen=True)
class ApptainerBuilt:
    """The SIFs Apptainer built from ``apptainer_built/NAME.def`` and what Apptainer itself
    printed for each line of ``probes.txt`` on them."""

    images: dict[str, str]  # name: a world-readable copy of the SIF
    results: Path  # NAME.ID.out (stdout) and NAME.ID.rc (exit status); version
    probes: dict[str, str]  # ID: the arguments, shell words with $SIF for the image

    def expected(self, name: str, probe: str) -> tuple[int, str]:
        """Apptainer's exit status and stdout for ``probe`` on image ``name``."""
        rc = int((self.results / f"{name}.{probe}.rc").read_text())
        return rc, (self.results / f"{name}.{probe}.out").read_text()


def table_cases() -> list[tuple[str, str, str]]:
    """The ported environment tables (``tests/runtime/test_env_apptainer.py``) as
    ``(id, want, shell command)`` for Apptainer itself on the images it built, so that the
    expected values are checked against the real thing, not only against sifpy. The uid
    there is 0 (root of the build's user namespace). ``--no-env`` and ``APPTAINER_NOENV``
    are left out: Apptainer has them from 1.5 on, Debian's is 1.4."""
    import shlex

    import tests.runtime.test_env_apptainer as T

    def command(img: str, opts: list[str], environ: dict[str, str], var: str) -> str:
        env = " ".join(shlex.quote(f"{k}={v}") for k, v in environ.items())
        return (
            f"env -i PATH=/usr/bin:/bin HOME=/root {env} apptainer --quiet exec "
            f"{' '.join(shlex.quote(o) for o in opts)} /work/out/{img}.sif /bin/sh -c "
            + shlex.quote('echo "${' + var + '}"')
        )

    cases = []
    for name, img, environ, want in T.ENV_PATH:
        cases.append((f"env-{name}", want, command(img, [], environ, "PATH")))
    for name, img, opts, environ, var, want in T.ENV_OPTION:
        args = ["--env", ",".join(opts)] if opts else []
        cases.append((f"env-option-{name}", want, command(img, args, environ, var)))
    for name, opts, files, var, want in T.ENV_FILE:
        args, pre = ["--env", ",".join(opts)] if opts else [], ""
        for i, text in enumerate(files):
            path = f"/work/{name}.env{i}"
            pre += f"printf %s {shlex.quote(text)} > {path}; "
            args += ["--env-file", path]
        cases.append((f"env-file-{name}", want, pre + command("custom", args, {}, var)))
    for name, who, no_eval, want in T.ENV_EVAL:
        args = ["--no-eval"] if no_eval else []
        env = {"APPTAINERENV_WHO": who}
        cases.append(
            (f"env-eval-{name}", want.replace(T.UID, "0"), command("custom", args, env, "WHO"))
        )
    return [(c[0].replace(" ", "_").replace("/", "_"), c[1], c[2]) for c in cases]


def _build_with_sifpy(out: Path) -> list[Path]:
    """``apptainer_built/sifpy/NAME.def`` built by sifpy (as root) into
    ``out/sifpy-NAME.sif``, for Apptainer to run and inspect."""
    sifs = []
    for definition in sorted((APPTAINER_BUILT / "sifpy").glob("*.def")):
        sif = out / f"sifpy-{definition.stem}.sif"
        res = subprocess.run(
            [sys.executable, "-m", "sifpy", "build", "--notest", str(sif), str(definition)],
            capture_output=True, text=True, timeout=300, cwd=out,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
        )  # fmt: skip
        assert res.returncode == 0, f"sifpy build of {definition} failed:\n{res.stderr}"
        sifs.append(sif)
    # An OCI-SIF sifpy writes (as `pull --oci` does), for a siftool that knows the OCI data
    # types (sid's; Debian 12's 2.8 lists them as "Unknown") to list.
    from sifpy.export import write_ocisif

    oci = out / "sifpy-custom.ocisif"
    write_ocisif(sifs[0], oci)
    return [*sifs, oci]


def _build_with_apptainer(out: Path) -> None:
    """Build and probe ``apptainer_built/*.def`` with Apptainer into ``out``, and probe the
    SIFs sifpy builds from ``apptainer_built/sifpy/*.def``: mmdebstrap makes a Debian sid
    root with its ``apptainer`` package (Debian 12 has none) in a temporary directory,
    ``build.sh`` runs ``apptainer build`` and the probes in it, the results are copied out
    and the root is deleted (``--format=null``)."""
    from sifpy.rootfs.bootstrap.debootstrap import host_mirror

    mmdebstrap = need_tool("mmdebstrap")
    need_tool("unshare", "util-linux")
    require(None if os.geteuid() == 0 else "mmdebstrap's root mode needs root")
    mirror = host_mirror()
    require(None if mirror else "no Debian mirror in the host's apt sources")
    prebuilt = out / "sifpy-built"
    prebuilt.mkdir()
    sifpy_sifs = " ".join(str(p) for p in _build_with_sifpy(prebuilt))
    tables = out / "tables.sh"
    tables.write_text("".join(
        f"( {cmd} ) > table.{case}.out 2> table.{case}.err < /dev/null\n"
        for case, _, cmd in table_cases()
    ))  # fmt: skip
    argv = [
        mmdebstrap, "--quiet", "--mode=root", "--variant=minbase", "--format=null",
        "--include=apptainer,busybox-static,siftool",
        # A mirror frozen at a date has a sid Release whose Valid-Until has passed.
        '--aptopt=Acquire::Check-Valid-Until "false"',
        f"--customize-hook=copy-in {APPTAINER_BUILT} /",
        '--customize-hook=mv "$1/apptainer_built" "$1/work" && mkdir "$1/work/out"',
        f"--customize-hook=copy-in {sifpy_sifs} /work/out",
        f"--customize-hook=copy-in {tables} /work",
        f'--customize-hook={APPTAINER_BUILT / "build.sh"} "$1"',
        f"--customize-hook=copy-out /work/out {out}",
        "sid", "/dev/null", str(mirror),
    ]  # fmt: skip
    res = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    require(
        None if res.returncode == 0 else f"building with Apptainer failed: {res.stderr[-2000:]}"
    )


@pytest.fixture(scope="session")
def apptainer_built(workdir: Path, pytestconfig: pytest.Config) -> ApptainerBuilt:
    """The SIFs Apptainer itself builds from ``apptainer_built/NAME.def`` (``default``,
    ``custom``), the one sifpy builds from ``apptainer_built/sifpy/custom.def``
    (``sifpy-custom``), and Apptainer's own results of the probes on them. Built once and
    kept in pytest's cache dir, keyed by the files of ``apptainer_built/`` and sifpy's SIF
    writers (45-70 s here, mostly the download of Apptainer's packages); the SIFs are
    copied world-readable into the session's workdir."""
    key = hashlib.sha256()
    writers = [p for d in SIFPY_WRITERS for p in (REPO / d).rglob("*.py")]
    assert writers, SIFPY_WRITERS
    for p in sorted([*APPTAINER_BUILT.rglob("*"), *writers, TABLES]):
        if p.is_file():
            key.update(str(p.relative_to(REPO)).encode() + b"\0" + p.read_bytes())
    cache = getattr(pytestconfig, "cache", None)
    where = Path(cache.mkdir("sifpy-apptainer-built")) if cache is not None else workdir
    done = where / f"apptainer-built-{key.hexdigest()[:16]}"
    if not (done / "version").is_file():
        for old in where.glob("apptainer-built-*"):
            shutil.rmtree(old, ignore_errors=True)
        partial = where / "partial-apptainer-built"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        _build_with_apptainer(partial)
        (partial / "out").rename(done)
        shutil.rmtree(partial)
    images = {}
    for sif in sorted(done.glob("*.sif")):
        dest = workdir / f"apptainer-built-{sif.name}"
        shutil.copy(sif, dest)
        dest.chmod(0o644)
        images[sif.stem] = str(dest)
    probes = {}
    for line in (APPTAINER_BUILT / "probes.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            probe, _, args = line.partition(" ")
            probes[probe] = args
    return ApptainerBuilt(images, done, probes)

"""A real registry (Debian's ``docker-registry``) filled with images made by umoci and skopeo.

The session fixture ``registry`` builds OCI layouts with umoci from busybox-static files,
pushes them with ``skopeo copy`` to a plain-http registry on 127.0.0.1, and keeps the
layouts so tests can compare with ``umoci unpack --rootless``. Other registry processes
(basic auth, TLS, token auth) serve the same storage directory read-only.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from integration.conftest import UserRunner
from tests.conftest import need_tool

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(*argv: str | Path, cwd: Path | None = None) -> str:
    proc = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, stdin=subprocess.DEVNULL, cwd=cwd
    )
    if proc.returncode != 0:
        raise AssertionError(f"{argv[0]} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc.stdout


@dataclass
class Registry:
    """A running docker-registry process."""

    host: str
    proc: subprocess.Popen[bytes]
    workdir: Path
    storage: Path
    scheme: str = "http"
    layouts: dict[str, tuple[Path, str]] = field(default_factory=dict)  # name -> (layout, tag)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_registry(
    workdir: Path,
    storage: Path,
    *,
    auth: str = "",
    tls: tuple[Path, Path] | None = None,
) -> Registry:
    """Start ``docker-registry serve`` on a free port; ``auth`` is a YAML ``auth:`` block."""
    exe = need_tool("docker-registry")
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    tls_block = ""
    if tls is not None:
        tls_block = f"  tls:\n    certificate: {tls[0]}\n    key: {tls[1]}\n"
    config = workdir / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: error\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {storage}\n"
        "  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n  secret: sifpy-test-secret\n{tls_block}"
        f"{auth}"
    )
    log = open(workdir / "registry.log", "wb")
    proc = subprocess.Popen(
        [exe, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    )
    scheme = "https" if tls else "http"
    reg = Registry(f"127.0.0.1:{port}", proc, workdir, storage, scheme)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"registry exited: {(workdir / 'registry.log').read_text()}")
        with contextlib.suppress(requests.RequestException), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an unverified probe: is it listening yet?
            requests.get(f"{scheme}://{reg.host}/v2/", timeout=1, verify=False)
            return reg
        time.sleep(0.05)
    reg.stop()
    raise AssertionError("registry did not start")


# --- images -----------------------------------------------------------------------------

BUSYBOX_APPLETS = ("sh", "ls", "cat", "echo", "true")


def _busybox_rootfs(rootfs: Path, marker: str) -> None:
    busybox = Path(need_tool("busybox"))
    (rootfs / "bin").mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, rootfs / "bin/busybox")
    for applet in BUSYBOX_APPLETS:
        (rootfs / "bin" / applet).symlink_to("busybox")
    (rootfs / "etc").mkdir(exist_ok=True)
    (rootfs / "etc/marker").write_text(marker)
    (rootfs / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")


def make_busybox_layout(layout: Path, tag: str, marker: str, arch: str = "amd64") -> None:
    """A single-layer image with ENV, ENTRYPOINT, CMD and labels."""
    umoci = need_tool("umoci")
    if not (layout / "index.json").exists():
        run(umoci, "init", "--layout", layout)
    image = f"{layout}:{tag}"
    run(umoci, "new", "--image", image)
    bundle = layout.parent / f"bundle-{tag}"
    run(umoci, "unpack", "--rootless", "--image", image, bundle)
    _busybox_rootfs(bundle / "rootfs", marker)
    run(umoci, "repack", "--image", image, bundle)
    run(
        umoci, "config", "--image", image,
        "--config.env", "GREETING=hello \"world\" $HOME",
        "--config.env", "PATH=/bin:/usr/bin",
        "--config.entrypoint", "/bin/echo",
        "--config.cmd", "from-cmd",
        "--config.label", "org.example.test=yes",
        "--architecture", arch,
        "--os", "linux",
    )  # fmt: skip
    shutil.rmtree(bundle)


def add_platform_index(layout: Path, tags: dict[str, str], index_tag: str) -> str:
    """Hand-write an OCI index over the images ``tags`` (tag -> arch) and tag it."""
    index = json.loads((layout / "index.json").read_text())
    by_tag = {m["annotations"]["org.opencontainers.image.ref.name"]: m for m in index["manifests"]}
    entries = []
    for tag, arch in tags.items():
        m = dict(by_tag[tag])
        m.pop("annotations", None)
        m["platform"] = {"os": "linux", "architecture": arch}
        entries.append(m)
    doc = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": entries,
    }
    raw = json.dumps(doc).encode()
    import hashlib

    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    (layout / "blobs/sha256" / digest[7:]).write_bytes(raw)
    index["manifests"].append(
        {
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": digest,
            "size": len(raw),
            "annotations": {"org.opencontainers.image.ref.name": index_tag},
        }
    )
    (layout / "index.json").write_text(json.dumps(index))
    return digest


def skopeo_push(layout: Path, tag: str, dest: str, *extra: str) -> None:
    run(
        need_tool("skopeo"), "copy", "--quiet", "--dest-tls-verify=false", *extra,
        f"oci:{layout}:{tag}", f"docker://{dest}",
    )  # fmt: skip


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A plain-http registry holding: test/plain:1 (OCI, one layer), test/plain-v2s2:1
    (Docker schema 2), test/multi:1 (three layers with whiteouts), test/index:1 (an OCI
    index for amd64 and arm64)."""
    for tool in ("docker-registry", "umoci", "skopeo", "busybox", "mksquashfs", "unsquashfs"):
        need_tool(tool)
    base = tmp_path_factory.mktemp("registry")
    reg = start_registry(base / "plain", base / "storage")
    try:
        layouts = base / "layouts"
        layouts.mkdir()
        plain = layouts / "plain"
        make_busybox_layout(plain, "1", "plain image\n")
        skopeo_push(plain, "1", f"{reg.host}/test/plain:1")
        skopeo_push(plain, "1", f"{reg.host}/test/plain-v2s2:1", "--format", "v2s2")
        reg.layouts["test/plain:1"] = (plain, "1")
        reg.layouts["test/plain-v2s2:1"] = (plain, "1")

        from integration.test_unpack_umoci import make_image

        multi_tmp = layouts / "multi-work"
        multi_tmp.mkdir()
        multi = make_image(multi_tmp, need_tool("umoci"))
        skopeo_push(multi, "t", f"{reg.host}/test/multi:1")
        reg.layouts["test/multi:1"] = (multi, "t")

        idx = layouts / "index"
        make_busybox_layout(idx, "amd64", "I am amd64\n", "amd64")
        make_busybox_layout(idx, "arm64", "I am arm64\n", "arm64")
        add_platform_index(idx, {"amd64": "amd64", "arm64": "arm64"}, "multi")
        skopeo_push(idx, "multi", f"{reg.host}/test/index:1", "--all")
        reg.layouts["test/index:1@amd64"] = (idx, "amd64")
        reg.layouts["test/index:1@arm64"] = (idx, "arm64")
        yield reg
    finally:
        reg.stop()


# --- running sifpy ------------------------------------------------------------------------


@dataclass
class SifpyEnv:
    """A private HOME and cache for running the sifpy CLI as a subprocess."""

    home: Path
    cache: Path

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("SIFPY_", "APPTAINER_", "DOCKER_"))
        }
        env.update(HOME=str(self.home), SIFPY_CACHEDIR=str(self.cache), PYTHONPATH=str(ROOT))
        env.update(extra)
        return env

    def run(
        self, *args: str | Path, check: bool = True, **extra: str
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "sifpy", *map(str, args)],
            capture_output=True,
            text=True,
            env=self.env(**extra),
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"sifpy {args} failed ({proc.returncode}): {proc.stderr}")
        return proc


@pytest.fixture
def sifpy(tmp_path: Path) -> SifpyEnv:
    home = tmp_path / "home"
    home.mkdir()
    return SifpyEnv(home, tmp_path / "cache")


@pytest.fixture
def user_dir(run_as_user: UserRunner, workdir: Path, request: pytest.FixtureRequest) -> Path:
    """A directory of the test user's, one per test."""
    path = workdir / f"user-{request.node.name.translate({ord(c): '-' for c in '[]/'})}"
    path.mkdir()
    os.chown(path, run_as_user.user.uid, run_as_user.user.gid)
    return path

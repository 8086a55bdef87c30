"""bench/pull: ``sifpy pull`` against the classic pipeline and the streaming limit, in one run.

A Debian image is made locally: ``mmdebstrap --variant=minbase bookworm`` (it reads the
host's apt sources; ``--rootfs-tar`` reuses a tar, and without mmdebstrap a copy of parts
of this host's /usr is used), turned into a one-layer OCI image with umoci, and pushed
with skopeo to Debian's ``docker-registry`` on 127.0.0.1. Then, alternating, ``--repeat``
times each (best time counts):

* **sifpy**: ``sifpy -q pull --insecure out.sif docker://...`` with a fresh cache each run
  (download, merge, tar2sqfs, SIF), as a new process;
* **sifpy-unpack**: the same with ``SIFPY_PULL_STREAM=0`` (the rootfs fallback), for reference;
* **classic** (Sarus's pipeline, as Sarus runs it): ``skopeo copy docker://... oci:dir:tag``
  + ``umoci unpack --rootless`` + ``mksquashfs ROOTFS OUT`` with mksquashfs's own defaults
  (gzip): Sarus adds options only when a site sets ``mksquashfsOptions`` in sarus.json;
* **classic-zstd3**: the same pipeline with sifpy's compression (``-comp zstd
  -Xcompression-level 3``), for reference: what is left when both compress alike;
* **limit**: ``zcat layer | tar2sqfs`` over the layer blobs already on disk (same tar2sqfs
  options as sifpy, so the same compression), i.e. no download, no merge, no SIF.

Prints the ratios (targets: at most 0.2x the classic pipeline, at most 1.3x the limit) and
writes bench/results/pull.txt.

    .venv/bin/python bench/pull.py [--rootfs-tar FILE] [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import requests
from _report import report

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_TREES = ["/usr/bin", "/usr/lib/python3.11", "/usr/share/perl"]


def run(*argv: object, env: dict[str, str] | None = None, shell: bool = False) -> None:
    args: str | list[str] = str(argv[0]) if shell else [str(a) for a in argv]
    proc = subprocess.run(
        args, capture_output=True, text=True, stdin=subprocess.DEVNULL, env=env, shell=shell
    )
    if proc.returncode != 0:
        raise SystemExit(f"{argv[0]} failed ({proc.returncode}): {proc.stderr[-2000:]}")


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise SystemExit(f"bench/pull needs {name} (apt-get install it)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rootfs_tar(work: Path, given: str | None) -> tuple[Path, str]:
    """A tar of the image's root file system, and what it is."""
    if given:
        return Path(given), f"given tar {given}"
    out = work / "debian.tar"
    if shutil.which("mmdebstrap"):
        proc = subprocess.run(
            ["mmdebstrap", "--variant=minbase", "--quiet", "bookworm", str(out)],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
        )
        if proc.returncode == 0:
            return out, "mmdebstrap --variant=minbase bookworm"
        print(f"mmdebstrap failed, using /usr instead: {proc.stderr[-300:]}", file=sys.stderr)
    src = " ".join(t.lstrip("/") for t in DEFAULT_TREES)
    run(f"tar -C / -cf {out} {src}", shell=True)
    return out, "a tar of " + ", ".join(DEFAULT_TREES)


def make_image(work: Path, tar: Path) -> Path:
    umoci = tool("umoci")
    layout = work / "layout"
    run(umoci, "init", "--layout", layout)
    run(umoci, "new", "--image", f"{layout}:1")
    run(umoci, "raw", "add-layer", "--image", f"{layout}:1", tar)
    run(
        umoci, "config", "--image", f"{layout}:1", "--config.cmd", "/bin/bash",
        "--config.env", "PATH=/usr/local/bin:/usr/bin:/bin", "--architecture", "amd64",
    )  # fmt: skip
    return layout


def layer_blobs(layout: Path) -> list[Path]:
    index = json.loads((layout / "index.json").read_text())
    digest = index["manifests"][0]["digest"]
    manifest = json.loads((layout / "blobs/sha256" / digest[7:]).read_text())
    return [layout / "blobs/sha256" / d["digest"][7:] for d in manifest["layers"]]


def start_registry(work: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    config = work / "registry.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {work / 'storage'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n  secret: bench\n"
    )
    proc = subprocess.Popen(
        [tool("docker-registry"), "serve", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    host = f"127.0.0.1:{port}"
    for _ in range(300):
        try:
            requests.get(f"http://{host}/v2/", timeout=1)
            return proc, host
        except requests.RequestException:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("docker-registry did not start")


def timed(fn: Callable[[Path], None], work: Path) -> float:
    """The time of ``fn(run_dir)`` alone: the fresh directory is made before and removed
    after (deleting a case's output is no part of it)."""
    run_dir = Path(tempfile.mkdtemp(dir=work))
    try:
        t0 = time.perf_counter()
        fn(run_dir)
        return time.perf_counter() - t0
    finally:
        shutil.rmtree(run_dir)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rootfs-tar", help="a tar of the root file system to use as the image")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from sifpy.rootfs.stream import tar2sqfs_argv
    from sifpy.squashfs.pack import DEFAULT_COMPRESSION, compression_args

    os.environ.pop("SIFPY_COMPRESSION", None)  # every side uses sifpy's default

    for name in ("umoci", "skopeo", "docker-registry", "mksquashfs", "tar2sqfs", "zcat"):
        tool(name)
    tmp_root = os.environ.get("SIFPY_TMPDIR") or None
    with tempfile.TemporaryDirectory(prefix="bench-pull-", dir=tmp_root) as tmp:
        work = Path(tmp)
        tar, what = rootfs_tar(work, a.rootfs_tar)
        layout = make_image(work, tar)
        blobs = layer_blobs(layout)
        reg, host = start_registry(work)
        try:
            ref = f"{host}/bench/debian:1"
            run(
                tool("skopeo"), "copy", "--quiet", "--dest-tls-verify=false",
                f"oci:{layout}:1", f"docker://{ref}",
            )  # fmt: skip
            env = {k: v for k, v in os.environ.items() if not k.startswith("SIFPY_")}
            env["PYTHONPATH"] = str(REPO)
            env["HOME"] = str(work)

            def sifpy(stream: str) -> Callable[[Path], None]:
                def go(run_dir: Path) -> None:
                    e = dict(env, SIFPY_CACHEDIR=str(run_dir / "cache"), SIFPY_PULL_STREAM=stream)
                    run(
                        sys.executable, "-m", "sifpy", "-q", "pull", "--insecure",
                        run_dir / "out.sif", f"docker://{ref}", env=e,
                    )  # fmt: skip

                return go

            def classic(comp: list[str]) -> Callable[[Path], None]:
                return lambda run_dir: classic_run(comp, run_dir)

            def classic_run(comp: list[str], run_dir: Path) -> None:
                run(
                    tool("skopeo"), "copy", "--quiet", "--src-tls-verify=false",
                    f"docker://{ref}", f"oci:{run_dir / 'oci'}:1",
                )  # fmt: skip
                run(
                    tool("umoci"), "unpack", "--rootless", "--image", f"{run_dir / 'oci'}:1",
                    run_dir / "bundle",
                )  # fmt: skip
                run(
                    tool("mksquashfs"), run_dir / "bundle/rootfs", run_dir / "out.sqfs",
                    *comp, "-noappend", "-quiet", "-no-progress",
                )  # fmt: skip

            def limit(run_dir: Path) -> None:
                argv = tar2sqfs_argv(tool("tar2sqfs"), run_dir / "out.sqfs")
                for i, blob in enumerate(blobs):
                    argv[-1] = str(run_dir / f"out{i}.sqfs")
                    run(f"zcat {blob} | {' '.join(argv)}", shell=True)

            cases: dict[str, Callable[[Path], None]] = {
                "sifpy": sifpy("1"),
                "sifpy-unpack": sifpy("0"),
                "classic": classic([]),
                "classic-zstd3": classic(compression_args(DEFAULT_COMPRESSION)),
                "limit": limit,
            }
            best = {name: float("inf") for name in cases}
            for _ in range(a.repeat):
                for name, fn in cases.items():
                    best[name] = min(best[name], timed(fn, work))
        finally:
            reg.terminate()
            reg.wait()
        tar_mb = tar.stat().st_size / 1e6
        gz_mb = sum(b.stat().st_size for b in blobs) / 1e6
    vs_classic = best["sifpy"] / best["classic"]
    vs_classic3 = best["sifpy"] / best["classic-zstd3"]
    vs_limit = best["sifpy"] / best["limit"]
    lines = [
        "bench/pull: sifpy pull vs the classic pipeline and the streaming limit",
        f"image: {what}; one layer, {tar_mb:.0f} MB tar, {gz_mb:.0f} MB gzip; "
        f"local docker-registry; best of {a.repeat}; {os.cpu_count()} CPUs",
        f"  sifpy pull (stream, fresh cache)       {best['sifpy']:7.2f} s",
        f"  sifpy pull (SIFPY_PULL_STREAM=0)       {best['sifpy-unpack']:7.2f} s",
        f"  classic: skopeo + umoci + mksquashfs   {best['classic']:7.2f} s  (gzip, its default)",
        f"  classic, -comp zstd level 3            {best['classic-zstd3']:7.2f} s",
        f"  limit: zcat layer | tar2sqfs           {best['limit']:7.2f} s",
        f"(sifpy, limit and classic-zstd3 compress with {DEFAULT_COMPRESSION}, sifpy's default)",
        f"sifpy / classic = {vs_classic:.2f}x (target <= 0.2x): "
        + ("met" if vs_classic <= 0.2 else "NOT met"),
        f"sifpy / classic with zstd level 3 = {vs_classic3:.2f}x (for reference)",
        f"sifpy / limit   = {vs_limit:.2f}x (target <= 1.3x): "
        + ("met" if vs_limit <= 1.3 else "NOT met"),
    ]
    text = "\n".join(lines) + "\n"
    report("pull", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

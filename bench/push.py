"""Benchmark: ``sifpy push`` / ``sifpy pull`` of an ``oras://`` SIF against the ORAS
project's Python SDK (``oras`` on PyPI) used as its documentation shows, on the same file
and the same local ``docker-registry``.

Each case runs in its own process, the cases in turn; the table gives each one's best wall
time of ``--repeat`` runs and its peak resident memory (``ru_maxrss``), so that reading a
whole SIF into memory shows. Also the import time of each client (best of 5, a fresh
interpreter each). Writes ``bench/results/push.txt``.

    python bench/push.py [--size 200M] [--repeat 3] [--dir /tmp] [--compare main=PROGRAM]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._report import provenance, report
from bench.pull import start_registry
from bench.sign import make_payload, parse_size
from sifpy.sif import ObjectInput, create
from sifpy.sif import format as F

SIFPY = Path(sys.executable).parent / "sifpy"
LAYER = "application/vnd.sylabs.sif.layer.v1.sif"
CONFIG = "application/vnd.sylabs.sif.config.v1+json"

# The SDK as its README shows it: OrasClient.push/pull (push reads a blob whole unless
# do_chunked is given).
SDK_PUSH = f"""
import sys, oras.client
host, target, path, chunked = sys.argv[1:5]
c = oras.client.OrasClient(hostname=host, insecure=True)
c.push(target=target, files=[path + ":" + {LAYER!r}], disable_path_validation=True,
       manifest_config="/dev/null:" + {CONFIG!r}, do_chunked=chunked == "1",
       chunk_size=32 << 20, quiet=True)
"""
SDK_PULL = """
import sys, oras.client
host, target, outdir = sys.argv[1:4]
oras.client.OrasClient(hostname=host, insecure=True).pull(target=target, outdir=outdir)
"""


def measure(argv: list[str], env: dict[str, str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB) of one process, the RSS as GNU time reports it: the
    bench's own ``ru_maxrss`` of a child would include this process's memory, which a
    forked child keeps as its high-water mark across exec."""
    with tempfile.NamedTemporaryFile("r") as out:
        t0 = time.perf_counter()
        proc = subprocess.run(
            ["/usr/bin/time", "-f", "%M", "-o", out.name, *argv],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, check=False,
        )  # fmt: skip
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"failed: {' '.join(argv)}")
        return wall, int(out.read().split()[-1])


def import_ms(module: str) -> float:
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    runs = [
        float(
            subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, check=True
            ).stdout
        )
        for _ in range(5)
    ]
    return min(runs) * 1000


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="200M", help="SIF partition size (default 200M)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None)
    ap.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="NAME=PROGRAM",
        help="also time another sifpy build's push and pull (e.g. main=/path/to/sifpy)",
    )
    a = ap.parse_args(argv)
    size = parse_size(a.size)
    with tempfile.TemporaryDirectory(dir=a.dir, prefix="sifpy-bench-") as tmp:
        work = Path(tmp)
        payload, sif = work / "part.bin", work / "app.sif"
        make_payload(payload, size)
        create(sif, [ObjectInput.partition(payload, F.FSType.SQUASH, F.PartType.PRIMSYS, "amd64")])
        payload.unlink()
        reg, host = start_registry(work)
        env = {**os.environ, "SIFPY_CACHEDIR": str(work / "cache"), "HOME": str(work)}
        n = 0

        def repo() -> str:
            nonlocal n
            n += 1
            return f"{host}/bench/r{n}:1"

        def fresh_out() -> Path:
            out = work / "out"
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(work / "cache", ignore_errors=True)
            out.mkdir()
            return out

        py = sys.executable
        cases = {
            "sifpy push": lambda: [str(SIFPY), "-q", "push", "--insecure", str(sif),
                                   "oras://" + repo()],
            "oras-py push (default: whole blob)": lambda: [py, "-c", SDK_PUSH, host, repo(),
                                                           str(sif), "0"],
            "oras-py push (do_chunked, 32 MiB)": lambda: [py, "-c", SDK_PUSH, host, repo(),
                                                          str(sif), "1"],
            "sifpy pull": lambda: [str(SIFPY), "-q", "pull", "--insecure",
                                   str(fresh_out() / "app.sif"), f"oras://{host}/bench/r1:1"],
            "oras-py pull": lambda: [py, "-c", SDK_PULL, host, f"{host}/bench/r1:1",
                                     str(fresh_out())],
        }  # fmt: skip
        for spec in a.compare:
            label, _, prog = spec.partition("=")
            cases[f"sifpy push ({label})"] = lambda prog=prog: [
                prog,
                "-q",
                "push",
                "--insecure",
                str(sif),
                "oras://" + repo(),
            ]
            cases[f"sifpy pull ({label})"] = lambda prog=prog: [
                prog, "-q", "pull", "--insecure", str(fresh_out() / "app.sif"),
                f"oras://{host}/bench/r1:1",
            ]  # fmt: skip
        runs: dict[str, list[tuple[float, int]]] = {name: [] for name in cases}
        try:
            # Round-robin, so that a busy moment of the machine falls on every case alike.
            for _ in range(a.repeat):
                for name, make in cases.items():
                    runs[name].append(measure(make(), env))
            rows = [(n, min(r[0] for r in rs), max(r[1] for r in rs)) for n, rs in runs.items()]
        finally:
            reg.kill()
            reg.wait()
        imports = [(m, import_ms(m)) for m in ("requests", "sifpy.oci.oras", "oras.provider")]
    lines = [
        f"oras:// push and pull of a {size >> 20} MiB SIF, local docker-registry, "
        f"best of {a.repeat}",
        provenance(),
        "",
        f"{'case':40} {'wall s':>8} {'peak RSS MiB':>13}",
    ]
    lines += [f"{name:40} {t:8.2f} {rss / 1024:13.0f}" for name, t, rss in rows]
    lines += ["", "import time, best of 5 (fresh interpreter each):"]
    lines += [f"  import {m:24} {ms:6.0f} ms" for m, ms in imports]
    report("push", "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The whole-recipe half of bench/build: a Debian base plus ``apt-get install`` of one
package, built by sifpy and by Charliecloud from the same base in the same run.

The base is made here (``mmdebstrap --variant=minbase bookworm``, as bench/pull does),
turned into a one-layer OCI image with umoci and pushed with skopeo to Debian's
``docker-registry`` on 127.0.0.1, behind TLS with a CA made here (Charliecloud's
``ch-image`` speaks only https). Then, each with an empty cache and storage:

* **sifpy**: ``sifpy build --ca-cert CA out.sif recipe.def`` (``Bootstrap: docker``, then
  ``%post`` ``apt-get update && apt-get install -y --no-install-recommends PKG``): pull,
  ``%post`` in the container, squashfs, SIF;
* **charliecloud**: ``ch-image --no-cache --tls-no-verify build --force`` of the equivalent
  Dockerfile, then ``ch-convert -o squash`` (its mksquashfs defaults: gzip).

Both download the same packages from the host's Debian mirror, so the network is part of
both numbers. Run it as an ordinary user (Charliecloud's intended use; sifpy's too).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import requests

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PACKAGE = "hello"


def _tls(work: Path) -> tuple[Path, Path, Path]:
    """A CA, and a server certificate for 127.0.0.1 signed by it: (ca, cert, key) PEMs."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder().subject_name(name("bench CA")).issuer_name(name("bench CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder().subject_name(name("127.0.0.1")).issuer_name(ca.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    paths = (work / "ca.pem", work / "cert.pem", work / "key.pem")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


def start_tls_registry(work: Path, port: int) -> tuple[subprocess.Popen[bytes], Path]:
    from pull import tool

    ca, cert, key = _tls(work)
    config = work / "registry-tls.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {work / 'storage'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n  secret: bench\n"
        f"  tls:\n    certificate: {cert}\n    key: {key}\n"
    )
    proc = subprocess.Popen(
        [tool("docker-registry"), "serve", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    for _ in range(300):
        try:
            requests.get(f"https://127.0.0.1:{port}/v2/", timeout=1, verify=str(ca))
            return proc, ca
        except requests.RequestException:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("docker-registry (TLS) did not start")


def _timed(argvs: list[list[str]], env: dict[str, str], cwd: Path) -> float:
    t0 = time.perf_counter()
    for argv in argvs:
        proc = subprocess.run(
            argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, env=env, cwd=cwd
        )
        if proc.returncode != 0:
            raise SystemExit(f"{argv[0]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def whole(work: Path, rootfs_tar: str | None) -> str:
    """Run both sides once; return the report lines."""
    from pull import free_port, make_image, tool
    from pull import rootfs_tar as make_tar

    for name in ("ch-image", "ch-convert", "umoci", "skopeo", "docker-registry"):
        tool(name)
    tar, what = make_tar(work, rootfs_tar)
    layout = make_image(work, tar)
    port = free_port()
    reg, ca = start_tls_registry(work, port)
    try:
        base = f"127.0.0.1:{port}/bench/debian:1"
        subprocess.run(
            [tool("skopeo"), "copy", "--quiet", "--dest-cert-dir", str(work / "certs"),
             "--dest-tls-verify=false", f"oci:{layout}:1", f"docker://{base}"],
            check=True, capture_output=True, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        install = f"apt-get update && apt-get install -y --no-install-recommends {PACKAGE}"
        ctx = work / "ctx"
        ctx.mkdir()
        recipe = f"Bootstrap: docker\nFrom: {base}\n\n%post\n    {install}\n"
        (ctx / "recipe.def").write_text(recipe)
        (ctx / "Dockerfile").write_text(f"FROM {base}\nRUN {install}\n")
        # Clean environments: no caches or settings of the user's leak into either side.
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
            "HOME": str(work),
            "USER": os.environ.get("USER") or "bench",
            "LANG": "C.UTF-8",
            "PYTHONPATH": str(REPO),
            "SIFPY_CACHEDIR": str(work / "sifpy-cache"),
            "TMPDIR": str(work),
        }
        sifpy = [sys.executable, "-m", "sifpy", "-q", "build", "--ca-cert", str(ca),
                 str(work / "sifpy.sif"), "recipe.def"]  # fmt: skip
        ch = [
            ["ch-image", "--no-cache", "--tls-no-verify", "build", "--force",
             "-t", "bench", "-f", "Dockerfile", "."],
            ["ch-convert", "-i", "ch-image", "-o", "squash", "bench", str(work / "ch.sqfs")],
        ]  # fmt: skip
        # ch-convert finds ch-image's storage through the environment only.
        t_ch = _timed(ch, dict(env, CH_IMAGE_STORAGE=str(work / "ch-storage")), ctx)
        t_sifpy = _timed([sifpy], env, ctx)
    finally:
        reg.terminate()
        reg.wait()
    mib = 1 << 20
    s_sifpy = (work / "sifpy.sif").stat().st_size / mib
    s_ch = (work / "ch.sqfs").stat().st_size / mib
    return (
        f"bench/build, whole recipe: base {what} from a local TLS registry, then "
        f"apt-get install {PACKAGE} (one run each, empty caches, {os.cpu_count()} CPUs)\n"
        f"  charliecloud  ch-image build + ch-convert -o squash   {t_ch:6.1f} s   "
        f"{s_ch:.1f} MiB (gzip)\n"
        f"  sifpy         sifpy build                              {t_sifpy:6.1f} s   "
        f"{s_sifpy:.1f} MiB (zstd:3, SIF)\n"
        f"ratio sifpy / charliecloud, time: {t_sifpy / t_ch:.2f}x\n"
    )


def cleanup(work: Path) -> None:
    """Charliecloud's storage holds files its owner can't delete without chmod."""
    subprocess.run(["chmod", "-R", "u+rwX", str(work)], check=False, capture_output=True)
    shutil.rmtree(work, ignore_errors=True)

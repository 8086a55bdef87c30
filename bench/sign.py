"""Benchmark: ``sifpy sign`` + ``sifpy verify`` of a large image against ``sha256sum``.

Builds an image with one partition of ``--size`` bytes (default 1 GiB) of random data, then
times, in one run and on the same warm file: ``sha256sum`` of the image, signing (DSSE,
Ed25519: the crypto is negligible, the cost is hashing and the atomic rewrite) and verifying.
Prints the ratios and writes them to ``bench/results/sign.txt``. Issue 6 target: sign +
verify at most 1.3x of sha256sum per pass over the data.

    python bench/sign.py [--size 1G] [--dir /tmp] [--out bench/results/sign.txt]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519

from sifpy.sif import ObjectInput, SifImage, create
from sifpy.sif import format as F
from sifpy.sign.sign import DsseSigner, sign_image
from sifpy.sign.verify import TrustedKeys, verify_image

UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text and text[-1] in UNITS:
        return int(float(text[:-1]) * UNITS[text[-1]])
    return int(text)


def make_payload(path: Path, size: int) -> None:
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            left -= f.write(block[: min(left, len(block))])


def best_of(n: int, fn: object) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G", help="partition size (default 1G)")
    ap.add_argument("--dir", default=None, help="where to write the test image")
    ap.add_argument("--repeat", type=int, default=3, help="best of N runs (default 3)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "sign.txt"))
    a = ap.parse_args(argv)
    size = parse_size(a.size)
    key = ed25519.Ed25519PrivateKey.generate()
    keys = TrustedKeys(dsse=(key.public_key(),))
    with tempfile.TemporaryDirectory(dir=a.dir, prefix="sifpy-bench-") as tmp:
        payload, img = Path(tmp) / "part.bin", Path(tmp) / "img.sif"
        make_payload(payload, size)
        part = ObjectInput.partition(payload, F.FSType.SQUASH, F.PartType.PRIMSYS, "amd64")
        create(img, [part])
        payload.unlink()
        subprocess.run(["cat", str(img)], stdout=subprocess.DEVNULL, check=True)  # warm cache

        t_sum = best_of(a.repeat, lambda: subprocess.run(
            ["sha256sum", str(img)], stdout=subprocess.DEVNULL, check=True))  # fmt: skip

        work = Path(tmp) / "work.sif"

        def do_sign() -> None:
            # A fresh unsigned name each time; signing replaces it atomically, so img stays
            # unsigned for the next round.
            work.unlink(missing_ok=True)
            os.link(img, work)
            sign_image(work, DsseSigner([key]))

        t_sign = best_of(a.repeat, do_sign)

        def do_verify() -> None:
            with SifImage.open(work) as i:
                verify_image(i, keys).check()

        t_verify = best_of(a.repeat, do_verify)
    ratio_sign, ratio_verify = t_sign / t_sum, t_verify / t_sum
    ratio_both = (t_sign + t_verify) / t_sum
    report = (
        f"size: {size} bytes ({size / (1 << 30):.2f} GiB), best of {a.repeat}\n"
        f"sha256sum: {t_sum:.3f} s\n"
        f"sifpy sign: {t_sign:.3f} s ({ratio_sign:.2f}x sha256sum)\n"
        f"sifpy verify: {t_verify:.3f} s ({ratio_verify:.2f}x sha256sum)\n"
        f"sign + verify: {t_sign + t_verify:.3f} s ({ratio_both:.2f}x one sha256sum, "
        f"{ratio_both / 2:.2f}x per pass over the data)\n"
    )
    sys.stdout.write(report)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

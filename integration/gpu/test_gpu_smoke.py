"""On a machine with an NVIDIA GPU only (skipped unless /dev/nvidiactl exists): ``sifpy exec
--nv`` runs ``nvidia-smi -L`` and a program that calls the CUDA driver API through
``dlopen`` (cuInit, cuDeviceGetCount, cuDeviceGetName), in an image built by sifpy from a
local busybox root plus the host's libc (no network)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/nvidiactl"), reason="no NVIDIA GPU")

PROBE = r"""
#include <dlfcn.h>
#include <stdio.h>
int main(void) {
  void *h = dlopen("libcuda.so.1", RTLD_NOW);
  if (!h) { printf("dlopen: %s\n", dlerror()); return 2; }
  int (*init)(unsigned) = dlsym(h, "cuInit");
  int (*count)(int *) = dlsym(h, "cuDeviceGetCount");
  int (*get)(int *, int) = dlsym(h, "cuDeviceGet");
  int (*name)(char *, int, int) = dlsym(h, "cuDeviceGetName");
  int n = 0, dev = 0; char buf[256] = "";
  if (init(0) || count(&n) || n < 1 || get(&dev, 0) || name(buf, sizeof buf, dev)) {
    printf("CUDA driver API failed (devices: %d)\n", n); return 3; }
  printf("devices: %d\nname: %s\n", n, buf);
  return 0;
}
"""


def test_nv_smoke(tmp_path: Path) -> None:
    sifpy = [os.environ.get("SIFPY", shutil.which("sifpy") or "sifpy")]
    root = tmp_path / "root"
    subprocess.run(
        ["cc", "-O2", "-o", str(tmp_path / "cuprobe"), "-x", "c", "-", "-ldl"],
        input=PROBE,
        text=True,
        check=True,
    )
    # A sandbox root: busybox, the probe and the host's libc (the probe is dynamic).
    (root / "bin").mkdir(parents=True)
    shutil.copy2(shutil.which("busybox") or "/bin/busybox", root / "bin" / "busybox")
    for app in ("sh", "ls", "cat", "env"):
        (root / "bin" / app).symlink_to("busybox")
    shutil.copy2(tmp_path / "cuprobe", root / "bin" / "cuprobe")
    for lib in (
        "/lib64/ld-linux-x86-64.so.2",
        "/lib/x86_64-linux-gnu/libc.so.6",
        "/lib/x86_64-linux-gnu/libdl.so.2",
        "/lib/x86_64-linux-gnu/libm.so.6",
        "/lib/x86_64-linux-gnu/libpthread.so.0",
        "/lib/x86_64-linux-gnu/librt.so.1",
    ):
        if os.path.exists(lib):
            (root / lib.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(lib, root / lib.lstrip("/"))
    sif = tmp_path / "gpu.sif"
    subprocess.run([*sifpy, "build", str(sif), str(root)], check=True)
    smi = subprocess.run(
        [*sifpy, "exec", "--nv", str(sif), "nvidia-smi", "-L"], capture_output=True, text=True
    )
    print(smi.stdout, smi.stderr)
    assert smi.returncode == 0 and smi.stdout.startswith("GPU 0:")
    probe = subprocess.run(
        [*sifpy, "exec", "--nv", str(sif), "cuprobe"], capture_output=True, text=True
    )
    print(probe.stdout, probe.stderr)
    assert probe.returncode == 0, probe.stdout + probe.stderr
    assert "devices: " in probe.stdout and "name: " in probe.stdout
    # Without --nv the driver is not there.
    bare = subprocess.run([*sifpy, "exec", str(sif), "cuprobe"], capture_output=True, text=True)
    assert bare.returncode == 2

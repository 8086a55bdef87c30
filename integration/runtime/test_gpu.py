"""``--nv``, ``--nvccli`` and ``--rocm`` end to end with a fake driver, as the test user.

No GPU is needed: the test builds a fake NVIDIA driver (tiny shared libraries named and
sonamed like the real ones, built with ``cc``; a ``nvidia-smi`` script; a fake
``nvidia-container-cli`` that prints what the real one prints), an ld.so cache of its own
(``ldconfig -C``), and device nodes that are plain files. sifpy then runs in a private user
and mount namespace (``unshare --map-current-user --mount``) where ``/etc/ld.so.cache`` is
that cache and ``/dev`` a tmpfs holding the host's basic nodes and the fake ones: nothing
on the host changes. Each test checks the exact set of files, device nodes and variables
the container gets, against what the container gets without the option.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from integration.conftest import UserRunner, require
from sifpy.runtime import gpu

FAKE_LIB = r"""
#include <fcntl.h>
#include <unistd.h>
int cuInit(unsigned flags) { int fd = open("/dev/nvidiactl", O_RDWR); if (fd < 0) return 100;
  close(fd); return (int)flags; }
int cuDriverGetVersion(int *v) { *v = 99010; return 0; }
int cuDeviceGetCount(int *n) { *n = 1; return 0; }
"""
# (file name, soname): the driver's real names, plus one the lists don't name.
NVIDIA_LIBS = [
    ("libcuda.so.999.1", "libcuda.so.1"),
    ("libnvidia-ml.so.999.1", "libnvidia-ml.so.1"),
    ("libnvidia-ptxjitcompiler.so.999.1", "libnvidia-ptxjitcompiler.so.1"),
    ("libnvidia-notlisted.so.999.1", "libnvidia-notlisted.so.1"),
]
ROCM_LIBS = [("libamdhip64.so.999.1", "libamdhip64.so.6"), ("libhsakmt.so.999.1", "libhsakmt.so.1")]
NVIDIA_NODES = [
    "nvidia0",
    "nvidia1",
    "nvidiactl",
    "nvidia-uvm",
    "nvidia-uvm-tools",
    "nvidia-modeset",
    "nvidia-caps/nvidia-cap1",
    "nvidia-caps/nvidia-cap2",
]
ROCM_NODES = ["kfd", "dri/card0", "dri/renderD128"]
HOST_NODES = ["null", "zero", "full", "random", "urandom", "tty", "fuse"]
SMI = "#!/bin/sh\necho 'GPU 0: Fake GPU 999 (UUID: GPU-00000000-fake)'\n"
ROCM_SMI = "#!/bin/sh\necho 'fake rocm-smi'\n"

# Runs as the test user (python3 -c SETUP FAKE_DIR ARGV...): new user + mount namespaces
# (the same ids inside), where the fake driver replaces the system's ld.so cache and /dev;
# then ARGV runs. util-linux's mount(8) refuses a non-root caller even with the capability,
# hence the system calls.
SETUP = r"""
import os, sys
from sifpy.runtime import ns
top, argv = sys.argv[1], sys.argv[2:]
uid, gid = os.getuid(), os.getgid()
ns.unshare(ns.CLONE_NEWUSER | ns.CLONE_NEWNS)
ns.map_ids(uid, gid, uid, gid)
ns.mount(None, "/", None, ns.MS_REC | ns.MS_PRIVATE)
bind = lambda s, d: ns.mount(s, d, None, ns.MS_BIND | ns.MS_REC)
bind(f"{top}/ld.so.cache", "/etc/ld.so.cache")
bind("/dev", f"{top}/hostdev")
ns.mount("fakedev", "/dev", "tmpfs", 0, "mode=0755")
for n in HOST_NODES:
    open(f"/dev/{n}", "w").close()
    bind(f"{top}/hostdev/{n}", f"/dev/{n}")
for d in ("pts", "shm"):
    os.mkdir(f"/dev/{d}")
bind(f"{top}/hostdev/pts", "/dev/pts")
ns.mount("shm", "/dev/shm", "tmpfs", 0, "mode=1777")
os.symlink("/proc/self/fd", "/dev/fd")
for n in os.environ.get("FAKE_NODES", "").split():
    os.makedirs(os.path.dirname(f"/dev/{n}"), exist_ok=True)
    with open(f"/dev/{n}", "w") as f:
        f.write(f"fake {n}\n")
os.execvp(argv[0], argv)
""".replace("HOST_NODES", repr(HOST_NODES))


def _cc(src: Path, out: Path, soname: str) -> None:
    subprocess.run(
        ["cc", "-shared", "-fPIC", f"-Wl,-soname,{soname}", "-o", str(out), str(src)],
        check=True,
        capture_output=True,
    )


@pytest.fixture(scope="session")
def fake_driver(workdir: Path, runtime_ready: UserRunner) -> Path:
    """The fake driver's directory: lib/, bin/, ld.so.cache, hostdev/ (a mount point)."""
    for tool in ("cc", "ldconfig"):
        require(None if shutil.which(tool) else f"{tool} is not installed")
    top = workdir / "fake-gpu"
    lib, bin_ = top / "lib", top / "bin"
    lib.mkdir(parents=True)
    bin_.mkdir()
    (top / "hostdev").mkdir()
    src = top / "fake.c"
    src.write_text(FAKE_LIB)
    for fname, soname in NVIDIA_LIBS + ROCM_LIBS:
        _cc(src, lib / fname, soname)
        (lib / soname).symlink_to(fname)
        (lib / (soname.split(".so")[0] + ".so")).symlink_to(soname)  # the dev link
    for name, text in (("nvidia-smi", SMI), ("rocm-smi", ROCM_SMI)):
        (bin_ / name).write_text(text)
        (bin_ / name).chmod(0o755)
    # What the real tool prints (libnvidia-container's `list`): devices, binaries, the
    # libraries' real files, the persistenced socket; one absolute path a line.
    listing = [
        f"/dev/{n}"
        for n in (
            "nvidiactl",
            "nvidia-uvm",
            "nvidia-uvm-tools",
            "nvidia-modeset",
            "nvidia0",
            "nvidia1",
        )
    ]
    listing += [str(bin_ / "nvidia-smi")]
    listing += [str(lib / f) for f, _ in NVIDIA_LIBS[:3]]
    (bin_ / "nvidia-container-cli").write_text(
        "#!/bin/sh\n"
        f'echo "$@" > {top}/nvccli-args\n'
        f"cat <<'EOF'\n" + "\n".join(listing) + "\nEOF\n"
    )
    (bin_ / "nvidia-container-cli").chmod(0o755)
    (top / "ld.so.conf").write_text(f"{lib}\n")
    subprocess.run(
        ["ldconfig", "-X", "-C", str(top / "ld.so.cache"), "-f", str(top / "ld.so.conf")],
        check=True,
        capture_output=True,
    )
    for dirpath, dirnames, filenames in os.walk(top):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            if not os.path.islink(p):
                os.chmod(p, 0o755 if os.path.isdir(p) or "/bin/" in p else 0o644)
    os.chmod(top, 0o777)  # nvccli-args is written by the test user
    return top


class Gpu:
    """``sifpy exec [opts] IMAGE sh -c SCRIPT`` in the private namespaces."""

    def __init__(self, runner: UserRunner, image: str, top: Path) -> None:
        self.runner, self.image, self.top = runner, image, top

    def __call__(
        self, opts: list[str], script: str, nodes: list[str], env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return self.sifpy(["exec", *opts, self.image, "sh", "-c", script], nodes, env)

    def sifpy(
        self, args: list[str], nodes: list[str], env: dict[str, str] | None = None, cwd: str = "/"
    ) -> subprocess.CompletedProcess[str]:
        """``sifpy ARGS`` in the private namespaces with the fake driver."""
        return self.shell(["/usr/bin/python3", "-m", "sifpy", *args], nodes, env, cwd)

    def shell(
        self, cmd: list[str], nodes: list[str], env: dict[str, str] | None = None, cwd: str = "/"
    ) -> subprocess.CompletedProcess[str]:
        """``cmd`` in the private namespaces with the fake driver."""
        argv = ["/usr/bin/python3", "-c", SETUP, str(self.top), *cmd]
        full = {
            "FAKE_NODES": " ".join(nodes),
            "PATH": f"{self.top}/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
            **(env or {}),
        }
        return self.runner(argv, env=full, cwd=cwd)


@pytest.fixture()
def gpu_run(runtime_ready: UserRunner, images: dict[str, Any], fake_driver: Path) -> Gpu:
    return Gpu(runtime_ready, images["plain"]["sif"], fake_driver)


LISTING = (
    "ls -1 /.singularity.d/libs 2>/dev/null; echo ==; ls -1 /.singularity.d/bin 2>/dev/null;"
    " echo ==; cd /dev && find . ! -type d | sort; echo ==; env | sort"
)


def _sections(res: subprocess.CompletedProcess[str]) -> list[list[str]]:
    assert res.returncode == 0, res.stderr
    return [
        p.split("\n") if p.strip() else []
        for p in (s.strip("\n") for s in res.stdout.split("==\n"))
    ]


def _expected_libs(cache: Path, liblist: str) -> set[str]:
    """The names ``ldconfig -p`` prints for that cache that the list's prefixes match
    (64-bit entries only): an independent reading of the same cache."""
    _, prefixes, _ = gpu.read_list(liblist)
    out = subprocess.run(
        ["ldconfig", "-p", "-C", str(cache)], capture_output=True, text=True, check=True
    ).stdout
    names = set()
    for m in re.finditer(r"^\s*(\S+) \(([^)]*)\) =>", out, re.M):
        if "x86-64" in m.group(2) and any(m.group(1).startswith(p) for p in prefixes):
            names.add(m.group(1))
    return names


def _env_diff(base: list[str], new: list[str]) -> dict[str, tuple[str | None, str | None]]:
    a = dict(line.partition("=")[::2] for line in base)
    b = dict(line.partition("=")[::2] for line in new)
    return {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}


@pytest.mark.unpriv
@pytest.mark.parametrize("contain", [False, True])
def test_nv_binds_exactly_the_driver(gpu_run: Gpu, fake_driver: Path, contain: bool) -> None:
    opts = ["--contain"] if contain else []
    base = _sections(gpu_run(opts, LISTING, NVIDIA_NODES))
    res = gpu_run(["--nv", *opts], LISTING, NVIDIA_NODES)
    libs, bins, devs, env = _sections(res)
    expected = _expected_libs(fake_driver / "ld.so.cache", f"{gpu.ETC}/nvliblist.conf")
    assert {"libcuda.so.1", "libnvidia-ml.so.1", "libcuda.so"} <= expected
    assert "libnvidia-notlisted.so.1" not in expected
    assert set(libs) == expected
    assert bins == ["nvidia-smi"]
    # The image's /dev without --nv, plus the driver's nodes (with --contain, bound into
    # the minimal /dev; without, the host's /dev shows them anyway).
    assert set(devs) - set(base[2]) == ({f"./{n}" for n in NVIDIA_NODES} if contain else set())
    assert {f"./{n}" for n in NVIDIA_NODES} <= set(devs)
    assert _env_diff(base[3], env) == {
        "PATH": (
            base_path := dict(x.partition("=")[::2] for x in base[3])["PATH"],
            f"{gpu.BIN_DIR}:{base_path}",
        ),
    }
    # The files are the host's (the fake driver's), read-only.
    check = (
        "cat /dev/nvidia0; nvidia-smi -L; md5sum /.singularity.d/libs/libcuda.so.1 | cut -c1-32;"
        " : > /.singularity.d/libs/libcuda.so.1 && echo WROTE"
    )
    res = gpu_run(["--nv", *opts], check, NVIDIA_NODES)
    md5 = subprocess.run(
        ["md5sum", str(fake_driver / "lib" / "libcuda.so.999.1")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout[:32]
    assert res.stdout.split("\n")[:3] == ["fake nvidia0", SMI.split("'")[1], md5]
    assert "WROTE" not in res.stdout


@pytest.mark.unpriv
def test_nv_without_a_driver_warns_and_runs(gpu_run: Gpu, tmp_path: Path) -> None:
    res = gpu_run(
        ["--nv"],
        "ls /.singularity.d/libs 2>/dev/null | wc -l; echo ran",
        [],
        env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin"},
    )
    # The fake cache is still in place, so the libraries are found, but no device node.
    assert res.returncode == 0, res.stderr
    assert "ran" in res.stdout
    assert "warning: no NVIDIA device nodes on this host" in res.stderr


@pytest.mark.unpriv
def test_nvccli_binds_what_it_lists(gpu_run: Gpu, fake_driver: Path) -> None:
    base = _sections(gpu_run(["--contain"], LISTING, NVIDIA_NODES))
    res = gpu_run(
        ["--nvccli", "--contain"], LISTING, NVIDIA_NODES, env={"NVIDIA_VISIBLE_DEVICES": "1"}
    )
    libs, bins, devs, env = _sections(res)
    assert (fake_driver / "nvccli-args").read_text().split() == ["list", "--device=1"]
    # Each listed library under its own name and every cache name leading to it.
    assert set(libs) == {
        "libcuda.so.999.1",
        "libcuda.so.1",
        "libcuda.so",
        "libnvidia-ml.so.999.1",
        "libnvidia-ml.so.1",
        "libnvidia-ml.so",
        "libnvidia-ptxjitcompiler.so.999.1",
        "libnvidia-ptxjitcompiler.so.1",
        "libnvidia-ptxjitcompiler.so",
    }
    assert bins == ["nvidia-smi"]
    listed = {"nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset", "nvidia0", "nvidia1"}
    assert set(devs) - set(base[2]) == {f"./{n}" for n in listed}
    diff = _env_diff(base[3], env)
    assert diff.pop("NVIDIA_VISIBLE_DEVICES") == (None, "1")
    assert set(diff) == {"PATH"}
    # Not contained and not set: all GPUs, as Apptainer emulates the legacy binding.
    res = gpu_run(["--nvccli"], "echo $NVIDIA_VISIBLE_DEVICES", NVIDIA_NODES)
    assert res.stdout.strip() == "all"
    assert (fake_driver / "nvccli-args").read_text().split() == ["list", "--device=all"]


@pytest.mark.unpriv
def test_rocm_binds_exactly_the_driver(gpu_run: Gpu, fake_driver: Path) -> None:
    base = _sections(gpu_run(["--contain"], LISTING, ROCM_NODES))
    libs, bins, devs, env = _sections(gpu_run(["--rocm", "--contain"], LISTING, ROCM_NODES))
    expected = _expected_libs(fake_driver / "ld.so.cache", f"{gpu.ETC}/rocmliblist.conf")
    assert {"libamdhip64.so.6", "libhsakmt.so.1"} <= expected
    assert set(libs) == expected
    assert bins == ["rocm-smi"]
    assert set(devs) - set(base[2]) == {f"./{n}" for n in ROCM_NODES}
    assert set(_env_diff(base[3], env)) == {"PATH"}


BUILD_NV = """Bootstrap: busybox
MirrorURL: file:///bin/busybox

%post
    echo LIBS; ls -1 /.singularity.d/libs; echo SMI; nvidia-smi -L; echo DEV; cat /dev/nvidia0
    echo ENV; echo "$LD_LIBRARY_PATH"
"""


@pytest.mark.unpriv
def test_build_nv_binds_the_driver_for_post_only(
    gpu_run: Gpu, fake_driver: Path, user_dir: Path
) -> None:
    """Apptainer's ``build --nv``: %post sees the host's driver (libraries, programs, device
    nodes) as ``exec --nv`` does; none of it is copied into the image."""
    (user_dir / "nv.def").write_text(BUILD_NV)
    res = gpu_run.sifpy(["build", "--nv", "nv.sif", "nv.def"], NVIDIA_NODES, cwd=str(user_dir))
    assert res.returncode == 0, res.stderr
    out = res.stdout.split("\n")
    libs = out[out.index("LIBS") + 1 : out.index("SMI")]
    expected = _expected_libs(fake_driver / "ld.so.cache", f"{gpu.ETC}/nvliblist.conf")
    assert set(libs) == expected
    assert out[out.index("SMI") + 1] == SMI.split("'")[1]
    assert out[out.index("DEV") + 1] == "fake nvidia0"
    assert "/.singularity.d/libs" in out[out.index("ENV") + 1]
    # The image holds none of it: no driver library, no nvidia-smi, no device file.
    res = gpu_run.sifpy(
        ["exec", "--contain", str(user_dir / "nv.sif"), "sh", "-c",
         "ls -A /.singularity.d/libs; command -v nvidia-smi; ls /dev/nvidia0; true"],
        NVIDIA_NODES,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout == "", res.stdout
    # Without --nv, %post sees no driver.
    res = gpu_run.sifpy(["build", "plain.sif", "nv.def"], NVIDIA_NODES, cwd=str(user_dir))
    assert res.returncode != 0
    assert "nvidia-smi: not found" in res.stderr


@pytest.mark.unpriv
def test_instance_started_with_nv_has_the_driver(gpu_run: Gpu, fake_driver: Path) -> None:
    """``instance start --nv``: what is joined through instance:// has the driver's files."""
    sifpy = "/usr/bin/python3 -m sifpy"
    script = (
        f"{sifpy} instance start --nv {gpu_run.image} gpuinst || exit 9;"
        f" {sifpy} exec instance://gpuinst sh -c 'ls -1 /.singularity.d/libs; echo ==; nvidia-smi -L';"
        f" s=$?; {sifpy} instance stop gpuinst; exit $s"
    )
    res = gpu_run.shell(["/bin/sh", "-c", script], NVIDIA_NODES)
    assert res.returncode == 0, res.stderr
    libs, smi = res.stdout.split("==\n")
    expected = _expected_libs(fake_driver / "ld.so.cache", f"{gpu.ETC}/nvliblist.conf")
    assert set(libs.split()) == expected
    assert smi.strip() == SMI.split("'")[1]

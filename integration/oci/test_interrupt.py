"""Ctrl-C and SIGTERM during a pull, sent to the whole process group as a terminal or a
batch system does, as the unprivileged test user: "interrupted", 130/143, within seconds,
nothing at the destination, no process left, no partial file under a final cache name."""

from __future__ import annotations

import http.client
import http.server
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from integration.conftest import UserRunner
from integration.oci.conftest import Registry
from integration.oci.helpers import QuietHandler


class Stall:
    """A proxy in front of the real registry that sends half of every blob, then waits."""

    def __init__(self, upstream: str) -> None:
        self.release = threading.Event()
        self.stalled = threading.Event()
        up_host, up_port = upstream.rsplit(":", 1)
        stall = self

        class Handler(QuietHandler):
            def do_HEAD(self) -> None:
                self.do_GET()

            def do_GET(self) -> None:
                conn = http.client.HTTPConnection(up_host, int(up_port), timeout=20)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                conn.request(self.command, self.path, headers=headers)
                resp = conn.getresponse()
                body = resp.read()
                out = {
                    k: v
                    for k, v in resp.getheaders()
                    if k.lower() not in ("content-length", "transfer-encoding", "connection")
                }
                conn.close()
                if "/blobs/" not in self.path or self.command != "GET" or len(body) < 1000:
                    self.answer(resp.status, out, body)
                    return
                self.send_response(resp.status)
                for k, v in out.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                stall.stalled.set()
                stall.release.wait(120)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stall(registry: Registry) -> Iterator[Stall]:
    s = Stall(registry.host)
    yield s
    s.close()


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) of a live process, None once it is gone (or a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else (int(fields[1]), int(fields[19]))


def descendants(root: int) -> dict[int, int]:
    """pid -> start time of ``root`` and every process below it, now (other tests run as
    the same user meanwhile, so a user's process list says nothing)."""
    table = {int(p): _stat(int(p)) for p in os.listdir("/proc") if p.isdigit()}
    found: dict[int, int] = {}
    todo = [root]
    while todo:
        pid = todo.pop()
        st = table.get(pid)
        if st is not None:
            found[pid] = st[1]
        todo += [c for c, cst in table.items() if cst is not None and cst[0] == pid]
    return found


def interrupt(proc: subprocess.Popen[str], sig: int) -> tuple[int, str, float]:
    """Send ``sig`` to the process group; return (status, stderr, seconds to exit) once
    every process it had started is gone."""
    ours = descendants(proc.pid)
    assert len(ours) > 1, "nothing running below sifpy at the time of the signal"
    t0 = time.monotonic()
    os.killpg(proc.pid, sig)
    try:
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    took = time.monotonic() - t0

    def left() -> list[int]:
        return [p for p, start in ours.items() if (_stat(p) or (0, -1))[1] == start]

    deadline = time.monotonic() + 5
    while left() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left(), f"processes left: {left()}"
    return proc.returncode, err, took


def final_cache_names(cache: Path) -> list[str]:
    """Cache files under a final name (temporary files start with a dot)."""
    return sorted(
        str(p.relative_to(cache))
        for p in cache.rglob("*")
        if p.is_file() and not p.name.startswith(".") and p.suffix != ".json"
    )


@pytest.mark.parametrize("cmd", ["pull", "exec"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_pull(
    stall: Stall, run_as_user: UserRunner, user_dir: Path, sig: signal.Signals, cmd: str
) -> None:
    """``sifpy pull`` and ``sifpy exec docker://`` (which pulls into the cache first)."""
    cache = user_dir / "cache"
    out = user_dir / "out.sif"
    ref = f"docker://{stall.host}/test/plain:1"
    sifpy = ["/usr/bin/python3", "-m", "sifpy"]
    argv = [*sifpy, "pull", "--insecure", str(out), ref]
    if cmd == "exec":
        argv = [*sifpy, "exec", ref, "true"]
    proc = run_as_user.popen(
        argv,
        env={"SIFPY_CACHEDIR": str(cache), "SIFPY_NOHTTPS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        cwd=user_dir,
    )
    assert stall.stalled.wait(60), "the pull never reached a blob"
    time.sleep(0.5)
    status, err, took = interrupt(proc, sig)
    assert status == 128 + sig, err
    assert err.splitlines()[-1] == "error: interrupted", err
    assert "Traceback" not in err
    assert took < 5, f"took {took:.1f}s to stop"
    assert sorted(os.listdir(user_dir)) == (["cache"] if cache.exists() else [])
    if cache.exists():
        blobs = [p for p in final_cache_names(cache) if "blobs" in p]
        assert not any("sifs" in p for p in final_cache_names(cache))
        # Only the small manifest/config blobs are complete; the stalled layer is not there.
        for p in blobs:
            from sifpy.oci.cachedir import file_digest

            assert file_digest(cache / p).endswith(Path(p).name), p

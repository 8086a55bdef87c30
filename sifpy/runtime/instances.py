"""Instances (``sifpy instance start|list|stop``, ``exec instance://NAME``): named shared
containers (:mod:`sifpy.runtime.sharens`) whose holder stays until stopped, the start
script its first member."""

from __future__ import annotations

import os

from sifpy import TYPE_CHECKING
from sifpy.errors import ExitStatus, RuntimeSetupError, SifpyError
from sifpy.runtime.sharens import (
    connect_holder,
    enter_joined,
    join,
    running,
    runtime_dir,
    stop,
    take_lock,
)

if TYPE_CHECKING:
    from sifpy.runtime.spec import LaunchSpec
    from sifpy.runtime.start import Identity


def instances_dir() -> str:
    """Where the instances' sockets, locks, logs and descriptions are."""
    path = f"{runtime_dir()}/instances"
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    return path


def instance_base(name: str) -> str:
    """The base path of instance ``name`` (checked: a plain name)."""
    ok = name and name[0].isalnum() and all(c.isalnum() or c in "._-" for c in name)
    if not ok or len(name) > 64:
        raise RuntimeSetupError(
            f"can't use instance name: {name!r}: invalid",
            "use letters, digits, '.', '_' and '-' (64 at most), starting with a letter or digit",
        )
    return f"{instances_dir()}/{name}"


def start_instance(base: str, spec: LaunchSpec, ident: Identity, info: dict[str, object]) -> int:
    """Start instance ``base``: a holder that stays until stopped, and in it ``spec.argv``
    (the start script) as its first member, detached, its output in ``base.out`` and
    ``base.err``. ``info`` (with the holder's ``pid`` added) goes to ``base.json``. Returns
    the holder's pid."""
    import json

    from sifpy.runtime.sharens_holder import start_holder

    lock = take_lock(f"{base}.lock")
    try:
        sock = connect_holder(f"{base}.sock")
        if sock is not None:
            sock.close()
            name = os.path.basename(base)
            raise RuntimeSetupError(
                f"can't start instance: {name}: an instance of that name is running",
                f"stop it first (sifpy instance stop {name}) or choose another name",
            )
        holder_spec = spec.replace(options=spec.options.replace(prefetch=(), pass_fds=()))
        info = {**info, "logOutPath": f"{base}.out", "logErrPath": f"{base}.err"}
        pid = start_holder(base, holder_spec, ident, True)
        info["pid"] = pid
        tmp = f"{base}.json.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(info, f)
        os.replace(tmp, f"{base}.json")
    finally:
        os.close(lock)
    # The start script: a member like any rank, in a session of its own.
    err_r, err_w = os.pipe()
    child = os.fork()
    if child == 0:
        code = ExitStatus.LAUNCH_FAILED
        try:
            os.close(err_r)
            os.setsid()
            if os.fork() == 0:
                from sifpy.runtime import assemble, process

                flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW
                out = os.open(f"{base}.out", flags, 0o600)
                err = os.open(f"{base}.err", flags, 0o600)
                null = os.open(os.devnull, os.O_RDONLY)
                for src, dst in ((null, 0), (out, 1), (err, 2)):
                    os.dup2(src, dst)
                    os.close(src)
                enter_joined(join(base))
                assemble.enter_cwd(spec, ident)
                os.close(err_w)  # past this point, exec_joined reports on base.err
                process.exec_joined(spec.argv, spec.env)
            code = 0
        except SifpyError as exc:
            os.write(err_w, exc.message.encode(errors="replace")[:3000])
        except BaseException as exc:
            os.write(err_w, f"can't start the instance's script: {exc!r}".encode()[:3000])
        finally:
            os._exit(code)
    os.close(err_w)
    os.waitpid(child, 0)
    with os.fdopen(err_r, "rb") as f:
        why = f.read().decode(errors="replace")
    if why:
        stop(base)
        raise RuntimeSetupError(why)
    return pid


def list_instances() -> list[dict[str, object]]:
    """The running instances' descriptions (``base.json``), by name; the files of dead ones
    are removed."""
    import json

    out = []
    folder = instances_dir()
    for entry in sorted(os.listdir(folder)):
        if not entry.endswith(".json"):
            continue
        base = f"{folder}/{entry[:-5]}"
        try:
            with open(f"{base}.json", encoding="utf-8") as f:
                info = json.load(f)
        except (OSError, ValueError):
            continue
        if running(base):
            out.append(info)
        else:
            for ext in (".json", ".out", ".err"):
                try:
                    os.unlink(f"{base}{ext}")
                except OSError:
                    pass
    return out

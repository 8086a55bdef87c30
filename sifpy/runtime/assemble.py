"""The container's root, built by its first process inside the session: the image (or its
overlay) bound at the root, the plan's binds and generated files applied in order
(:mod:`.plan` decides them; each destination resolved inside the root without following
the image's symlinks out of it), home staged, then the working directory entered.
"""

from __future__ import annotations

import os
import stat

from sifpy import TYPE_CHECKING
from sifpy.errors import RuntimeSetupError
from sifpy.runtime import mount, ns, rootpath
from sifpy.runtime import plan as plan_
from sifpy.runtime.spec import FILES, IMAGE, OVERLAY, ROOT, overlay_layers
from sifpy.runtime.start import Identity
from sifpy.util import log

if TYPE_CHECKING:
    from sifpy.runtime.spec import LaunchOptions, LaunchSpec


def enter_cwd(spec: LaunchSpec, ident: Identity) -> str:
    """Change to the command's working directory inside the container, or to its fallback
    (home, then /); return it."""
    # Inside the new root every lookup is confined by the kernel; fall back like Apptainer
    # (cwd not shared with --contain): home, then /. A --pwd has no fallback.
    home = spec.options.home_dest or spec.options.home or ident.home
    pwd = spec.options.pwd
    for cand in (pwd,) if pwd else (spec.cwd, home, "/"):
        try:
            os.chdir(cand)
        except OSError as exc:
            if pwd:
                raise RuntimeSetupError(
                    f"can't chdir: {pwd}: {exc.strerror}",
                    "give --pwd a directory that exists in the container",
                ) from exc
            continue
        # runc verifyCwd (CVE-2024-21626): the cwd must be reachable from the new root. A
        # path through an open directory fd (--pwd /proc/self/fd/N) can chdir outside it;
        # glibc's getcwd then fails with ENOENT (the kernel says "(unreachable)").
        try:
            inside = os.getcwd().startswith("/")
        except OSError:
            inside = False
        if not inside:
            raise RuntimeSetupError(
                f"can't chdir: {cand}: outside the container",
                "give a working directory inside the container (--pwd)",
            )
        return cand
    raise RuntimeSetupError(f"can't chdir: {spec.cwd}: not reachable in the container")


def _under(path: str, dest: str) -> bool:
    p, d = [c for c in path.split("/") if c], [c for c in dest.split("/") if c]
    return p[: len(d)] == d


def assemble(spec: LaunchSpec, ident: Identity, plan: list[plan_.Mount], cwd_fd: int) -> str:
    """Build the container root under the session; return its path."""
    opts = spec.options
    image_fd = os.open(IMAGE, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    if opts.mpi is not None:  # the image's libraries decide where the host's go
        from sifpy.runtime import mpibind

        plan += mpibind.mounts(opts.mpi, image_fd)
    # The cwd is shared unless --contain, or it is already visible (under another mount),
    # or the image has it (image content wins: a host cwd of /usr must not cover /usr).
    shown = any(_under(spec.cwd, m.dest) for m in plan if m.kind in ("bind", "tmpfs"))
    # With --writable the cwd is not shared where the sandbox lacks it (Apptainer skips the
    # mount rather than leave a directory behind in the sandbox).
    share_cwd = not opts.contain and "cwd" not in opts.no_mount and not opts.writable
    if cwd_fd >= 0 and share_cwd and spec.cwd != "/" and not shown:
        res = rootpath.resolve(image_fd, spec.cwd, reserved_stop=True)
        res.close()
        if res.missing:
            plan.append(plan_.Mount(spec.cwd, "bind", cwd_fd))
    if opts.writable:
        _stage_home(image_fd, spec, ident, plan)
    overlay = opts.writable_tmpfs or bool(overlay_layers(opts))
    # Only read-only layers: the tmpfs upper takes the mount points, then the root is made
    # read-only like the underlay's (Apptainer's overlay without an upper layer).
    writable_root = opts.writable_tmpfs or any(w for _, w in overlay_layers(opts))
    if opts.writable:
        root = IMAGE
    elif overlay:
        root = OVERLAY
        _reserve_dirs(root)
    else:
        root = ROOT
        os.mkdir(root)
        ns.mount("tmpfs", root, "tmpfs", ns.MS_NOSUID | ns.MS_NODEV, "mode=0755", "root")
        nofollow = tuple(m.dest for m in plan if m.nofollow)
        expand = rootpath.expansions(image_fd, [m.dest for m in plan], nofollow)
        build_underlay(IMAGE, root, expand)
    _write_files(image_fd, ident, opts, plan)
    os.close(image_fd)
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    writable = {rootpath.mount_id(root_fd)}
    # Replacing an image's entry is for roots that vanish with the container (the tmpfs
    # underlay, --writable-tmpfs), not for the user's sandbox or --overlay directory.
    ephemeral = not opts.writable and not any(w for _, w in overlay_layers(opts))
    # A --writable sandbox is the user's: a missing destination of theirs is an error, one
    # of the runtime's optional files is skipped (Apptainer's mountGeneric: "destination
    # doesn't exist in container", "Skipping mount"), nothing is created in it for them.
    sandbox = next(iter(writable)) if opts.writable else None
    user = frozenset(d for _, d, _ in spec.binds)
    host_dirs: set[int] = set()
    for m in plan:
        _apply(root_fd, m, writable, ephemeral, host_dirs, sandbox, m.dest in user)
    os.close(root_fd)
    if not opts.writable and not writable_root:
        mount.remount(root, readonly=True, what="container root")
    return root


def _stage_home(image_fd: int, spec: LaunchSpec, ident: Identity, plan: list[plan_.Mount]) -> None:
    """The home of a ``--writable`` sandbox, as Apptainer mounts it without a layer (its
    addHomeNoLayer, https://github.com/apptainer/apptainer/blob/main/internal/pkg/runtime/
    engine/apptainer/container_linux.go): a staging directory replaces the home's top-level
    directory, which the sandbox must have ("destination ... doesn't exist in container");
    nothing is created in the sandbox. Only when the home itself is missing there: an
    existing one is bound directly, hiding nothing else under its top-level directory."""
    opts = spec.options
    if opts.no_home or "home" in opts.no_mount:
        return
    dest = opts.home_dest or opts.home or ident.home
    at = next((i for i, m in enumerate(plan) if m.dest == dest), -1)
    if at < 0 or dest == "/":
        return
    res = rootpath.resolve(image_fd, dest)
    res.close()
    if not res.missing:
        return
    top = "/" + dest.strip("/").split("/", 1)[0]
    res = rootpath.resolve(image_fd, top)
    res.close()
    if res.missing and not (opts.home or opts.home_dest):
        # The caller's own home where the sandbox has no /home at all (a minimal root):
        # left out, where Apptainer fails; a --home asked for is an error as there.
        log.verbose(f"note: no {top} in the --writable sandbox: the home is not mounted")
        del plan[at]
        return
    if res.missing:
        raise RuntimeSetupError(
            f"can't mount home: {dest}: destination {top} doesn't exist in the container",
            f"with --writable sifpy can't create it: create {top} in the sandbox, or run "
            "without --writable",
        )
    plan.insert(at, plan_.Mount(top, "tmpfs", data="mode=0755"))


def _reserve_dirs(root: str) -> None:
    """In a writable root (the overlay), make the names the runtime always provides real
    directories: an image's ``/proc -> /etc`` or ``/dev -> /host/path`` symlink is replaced
    in the upper layer, never followed (runc refuses such images; this root is writable)."""
    for name in sorted(rootpath.RESERVED):
        path = f"{root}/{name}"
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        if st is None or not stat.S_ISDIR(st.st_mode):
            try:
                if st is not None:
                    os.unlink(path)
                os.mkdir(path, 0o755)
            except OSError as exc:
                raise RuntimeSetupError(
                    f"can't create mount point: /{name} in the overlay: {exc.strerror}",
                    "the image's / is not writable by you: use --fakeroot, or install "
                    "fuse-overlayfs",
                ) from exc


# What Apptainer skips, rather than fail, when its destination is missing in a --writable
# sandbox (the system binds, the generated files, /tmp and /var/tmp).
_OPTIONAL_IN_SANDBOX = frozenset(
    {"/etc/hosts", "/etc/localtime", "/etc/resolv.conf", "/etc/passwd", "/etc/group"}
    | {"/tmp", "/var/tmp"}
)


def _host_dir_bind(m: plan_.Mount) -> bool:
    """A writable bind of a host directory other than the kernel's (/dev, /proc, /sys): a
    missing mount point under it is created there, on the host, as the user (Apptainer
    creates one in a nested bind, a custom --home, --workdir's /tmp and /var/tmp)."""
    if m.kind != "bind" or not m.is_dir or m.readonly or not m.harden:
        return False
    return not any(_under(m.dest, d) for d in ("/dev", "/proc", "/sys"))


def _apply(
    root_fd: int,
    m: plan_.Mount,
    writable: set[int],
    ephemeral: bool = True,
    host_dirs: set[int] | None = None,
    sandbox: int | None = None,
    user: bool = False,
) -> None:
    """Make one mount of the plan, its destination resolved inside the root.

    A ``nofollow`` destination that is a symlink in the image is replaced by an empty file
    (in a writable, ``ephemeral`` root) and the mount lands on that, never on the target.
    Missing mount points are created in the container's own mounts (``writable``) and in
    host directories bound writable (``host_dirs``, to which a bind of one is added); in the
    ``--writable`` sandbox (mount id ``sandbox``) only for the runtime's own mounts."""
    host_dirs = set() if host_dirs is None else host_dirs
    allowed = frozenset(writable)
    if sandbox is not None and (user or m.dest in _OPTIONAL_IN_SANDBOX):
        probe = rootpath.resolve(root_fd, m.dest, follow_last=not m.nofollow)
        try:
            in_sandbox = bool(probe.missing) and rootpath.mount_id(probe.parent_fd) == sandbox
        finally:
            probe.close()
        if in_sandbox and not user:
            return
        if in_sandbox:
            raise RuntimeSetupError(
                f"can't mount: {m.dest}: destination doesn't exist in the container",
                f"sifpy never creates mount points in a --writable sandbox: create {m.dest} "
                "in it first, or run without --writable",
            )
    if m.kind == "symlink":
        parent, name = m.dest.rsplit("/", 1)
        res = rootpath.resolve(root_fd, parent or "/", "dir", frozenset(writable))
        try:
            where = (
                res.parent_fd
                if not res.name
                else os.open(
                    res.name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=res.parent_fd
                )
            )
            os.symlink(m.data, name, dir_fd=where)
        finally:
            res.close()
        return
    kind = "dir" if m.is_dir else "file"
    res = rootpath.resolve(
        root_fd, m.dest, kind, allowed, follow_last=not m.nofollow, host_mounts=frozenset(host_dirs)
    )
    try:
        if not res.name:
            raise RuntimeSetupError(f"can't mount: {m.dest}: that is the container root")
        if m.nofollow:
            _replace_symlink(res, m.dest, writable, ephemeral)
        tfd = os.open(res.name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=res.parent_fd)
        try:
            if stat.S_ISDIR(os.fstat(tfd).st_mode) != m.is_dir:
                kind = "a directory" if m.is_dir else "a file"
                raise RuntimeSetupError(
                    f"can't mount: {m.dest}: the source is {kind} but the destination is not"
                )
            target = mount.fd_path(tfd)
            over = mount.fd_path(res.parent_fd, res.name)  # crosses into the new mount
            if m.kind == "bind":
                mount.bind(
                    mount.fd_path(m.fd), target, m.readonly, m.harden, m.dest, over, not m.devices
                )
                if m.readonly and m.recursive:
                    # Without mount_setattr (Linux < 5.12) only the top is read-only; a
                    # confined payload still can't remount (no CAP_SYS_ADMIN).
                    ns.set_readonly_recursive(over, m.dest)
            elif m.kind == "file":
                mount.bind(f"{FILES}/{m.data}", target, m.readonly, True, m.dest, over)
            elif m.kind == "tmpfs":
                ns.mount("tmpfs", target, "tmpfs", ns.MS_NOSUID | ns.MS_NODEV, m.data, m.dest)
            elif m.kind == "proc":
                flags = ns.MS_NOSUID | ns.MS_NODEV | ns.MS_NOEXEC
                ns.mount("proc", target, "proc", flags, what=m.dest)
            elif m.kind == "devpts":
                try:
                    flags = ns.MS_NOSUID | ns.MS_NOEXEC
                    ns.mount("devpts", target, "devpts", flags, "newinstance,ptmxmode=0666")
                except RuntimeSetupError:
                    mount.bind(mount.fd_path(m.fd), target, harden=False, what=m.dest)
            if m.kind in ("tmpfs", "devpts") or _host_dir_bind(m):
                new = os.open(res.name, os.O_PATH | os.O_NOFOLLOW, dir_fd=res.parent_fd)
                (writable if m.kind != "bind" else host_dirs).add(rootpath.mount_id(new))
                os.close(new)
        finally:
            os.close(tfd)
    finally:
        res.close()


def _replace_symlink(
    res: rootpath.Resolved, dest: str, writable: set[int], ephemeral: bool
) -> None:
    """If ``res`` names a symlink, replace it with an empty regular file."""
    st = os.stat(res.name, dir_fd=res.parent_fd, follow_symlinks=False)
    if not stat.S_ISLNK(st.st_mode):
        return
    if not ephemeral or rootpath.mount_id(res.parent_fd) not in writable:
        raise RuntimeSetupError(
            f"can't mount: {dest}: it is a symlink in the image",
            "make it a regular file in the image: sifpy never mounts over a symlink's target",
        )
    os.unlink(res.name, dir_fd=res.parent_fd)
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    os.close(os.open(res.name, flags, 0o644, dir_fd=res.parent_fd))


def _read_image_file(image_fd: int, path: str) -> str | None:
    fd = rootpath.open_in_root(image_fd, path)
    if fd is None:
        return None
    with os.fdopen(fd, "rb") as f:
        return f.read(1 << 20).decode(errors="replace")


def _write_files(
    image_fd: int, ident: Identity, opts: LaunchOptions, plan: list[plan_.Mount]
) -> None:
    """Generate /etc/passwd and /etc/group: the image's, plus the caller's entries; copy the
    host files the plan shows as copies (``file`` mounts with a pinned source)."""
    for m in plan:
        if m.kind == "file" and m.fd >= 0:
            with open(mount.fd_path(m.fd), "rb") as src, open(f"{FILES}/{m.data}", "wb") as f:
                f.write(src.read(1 << 20))
            os.chmod(f"{FILES}/{m.data}", 0o644)
    passwd = _read_image_file(image_fd, "/etc/passwd")
    group = _read_image_file(image_fd, "/etc/group")
    home = opts.home_dest or opts.home or ident.home
    pw_lines = (passwd or "").splitlines()
    gr_lines = (group or "").splitlines()
    if opts.fakeroot:
        uid, gid, entry = 0, 0, "root:x:0:0:root:/root:/bin/sh"
        gentry = "root:x:0:"
    else:
        uid, gid = ident.uid, ident.gid
        entry = f"{ident.name}:x:{uid}:{gid}:{ident.gecos}:{home}:{ident.shell}"
        gentry = f"{ident.group}:x:{gid}:{ident.name}"
    # Apptainer's rule: the caller's entry replaces a line with the same uid (uid 0 is kept).
    pw_lines = [ln for ln in pw_lines if _field(ln, 2) != str(uid) or uid == 0]
    if not any(_field(ln, 2) == str(uid) for ln in pw_lines):
        pw_lines.append(entry)
    if not any(_field(ln, 2) == str(gid) for ln in gr_lines):
        gr_lines.append(gentry)
    for name, lines in (("passwd", pw_lines), ("group", gr_lines)):
        with open(f"{FILES}/{name}", "w") as f:
            f.write("".join(f"{ln}\n" for ln in lines))
        os.chmod(f"{FILES}/{name}", 0o644)


def _field(line: str, i: int) -> str:
    parts = line.split(":")
    return parts[i] if len(parts) > i else ""


# The underlay costs one bind per entry of each directory it fills (60 us each: 1.2 s for
# 20,000 entries, on every start), and each counts against fs.mount-max (100,000 by default)
# in the namespace; a typical image has about 20 top-level entries. Above this, the start
# is refused with a hint rather than slowed down.
MAX_UNDERLAY_ENTRIES = 1000


def build_underlay(image: str, root: str, expand: set[tuple[str, ...]]) -> None:
    """Fill the (empty, writable) directory ``root`` with the entries of ``image``.

    Directories in ``expand`` become real directories here, filled recursively; other
    directories and files are bind-mounted (inheriting the image mount's read-only, nosuid,
    nodev), symlinks are copied as they are (they are only ever followed by the kernel after
    ``pivot_root``, or by :func:`resolve`, both inside the root). Only real directories are
    descended into, so plain string paths are safe here. A directory with more than
    :data:`MAX_UNDERLAY_ENTRIES` entries is refused before anything is bound.
    """

    def fill(rel: tuple[str, ...]) -> None:
        src_dir = os.path.join(image, *rel)
        names = os.listdir(src_dir)
        if len(names) > MAX_UNDERLAY_ENTRIES:
            where = "/" + "/".join(rel)
            raise RuntimeSetupError(
                f"can't assemble the container root: {where} of the image has {len(names)} "
                f"entries, more than the {MAX_UNDERLAY_ENTRIES} bound one by one",
                "run it with --writable-tmpfs (the image itself is then the root, under an "
                "overlay), or rebuild it with those entries in a subdirectory",
            )
        for name in sorted(names):
            if not rel and name in rootpath.RESERVED:
                continue
            src, dst = os.path.join(src_dir, name), os.path.join(root, *rel, name)
            st = os.lstat(src)
            if stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(src), dst)
            elif stat.S_ISDIR(st.st_mode):
                os.mkdir(dst)
                os.chmod(dst, stat.S_IMODE(st.st_mode))
                if (*rel, name) in expand:
                    fill((*rel, name))
                else:
                    ns.mount(src, dst, None, ns.MS_BIND | ns.MS_REC, what=f"/{'/'.join(rel)}")
            else:
                os.close(os.open(dst, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))
                ns.mount(src, dst, None, ns.MS_BIND, what=f"/{os.path.join(*rel, name)}")

    fill(())
    for name in sorted(rootpath.RESERVED):
        os.mkdir(os.path.join(root, name), 0o755)

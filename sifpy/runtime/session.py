"""The monitor's set-up of one container: enter the namespaces, mount the session tmpfs
over ``/tmp`` and the image under it (its FUSE servers, an overlay), pin every host path
first, then fork the container's first process (:mod:`.container`). Also what the monitor
does once the container ended: stop the servers, give a sandbox back to its owner.
"""

from __future__ import annotations

import os
import stat

from sifpy import TYPE_CHECKING
from sifpy.errors import RuntimeSetupError
from sifpy.runtime import drivers, mount, ns, seccomp
from sifpy.runtime import plan as plan_
from sifpy.runtime.container import first_process
from sifpy.runtime.prefetch import prefetch
from sifpy.runtime.spec import (
    BUNDLE,
    FILES,
    IMAGE,
    OVERLAY,
    ROOT,
    RW,
    SESSION,
    has_hooks,
    overlay_layers,
)
from sifpy.runtime.start import DEFAULT_PATH, SERVER, Identity, Sandbox, Served, SifPartition, enter

if TYPE_CHECKING:
    from sifpy.runtime import overlays
    from sifpy.runtime.spec import LaunchOptions, LaunchSpec


def set_up(
    spec: LaunchSpec,
    ident: Identity,
    driver: drivers.Driver,
    report: int,
    servers: list[int],
    sync: tuple[int, int, int, int] | None,
    served: Served | None = None,
    keeper: int = -1,
    started: list[int] | None = None,
) -> tuple[int, int]:
    """Enter the namespaces (unless ``served`` did), mount the image (its servers go to
    ``servers``) and fork the container; return its pid and, for ``own_root_after``, the
    sandbox's fd (else -1). ``keeper``: the container keeps its root instead of running
    ``spec.argv`` (see :func:`sifpy.runtime.container.first_process`)."""
    opts = spec.options
    image = spec.image
    # Namespaces besides user and mount, made with them (the container's own).
    flags = ns.CLONE_NEWIPC if opts.ipc_ns else 0
    flags |= (ns.CLONE_NEWUTS if opts.uts_ns else 0) | (ns.CLONE_NEWNET if opts.net_ns else 0)
    image_fd = kernel_fd = -1
    if served is not None:
        if flags:
            ns.unshare(flags)
    else:
        image_fd = _open_image(image) if isinstance(image, SifPartition) else -1
        # Real root: the kernel mounts the squashfs now, detached, in the initial user
        # namespace (no user namespace may mount a block device); attached below.
        if isinstance(image, SifPartition) and driver.name == "kernel":
            kernel_fd = drivers.kernel_squashfs(image_fd, image.offset, image.size)

        handshake = None if sync is None else lambda: _await_id_maps(sync)
        enter(opts.fakeroot, flags, handshake)
    # Pin every host path now: bind sources must be opened in *this* mount namespace
    # (the kernel refuses to bind from a mount of another one), and before /tmp is
    # covered by the session tmpfs. Likewise the Python FUSE server imports its modules.
    own_fd = -1
    if isinstance(image, Sandbox):
        image_fd = plan_.pin(image.path, "sandbox")
        if opts.own_root_after and opts.writable:
            own_fd = os.open(image.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    cwd_fd = plan_.pin(spec.cwd, "cwd") if os.path.isdir(spec.cwd) else -1
    plan = plan_.plan(spec, ident)
    seccomp.prepare_payload_filter(opts.confine)  # here, not in the forked container (~0.3 ms)
    if opts.rlimits:  # used by the container after pivot_root (ns.set_rlimit)
        import resource  # noqa: F401
    if opts.mpi is not None:  # its files, and the module itself (see hooks below)
        from sifpy.runtime import mpibind

        mpibind.pin(opts.mpi)
    hooked = has_hooks(opts)
    if hooked:
        # Imported now: the session tmpfs may cover the package's directory (under /tmp).
        from sifpy.runtime import hooks, posthooks  # noqa: F401

        if opts.pid_ns and posthooks.hooks_after(spec):
            from sifpy.runtime import outside
    if opts.masked_paths or opts.readonly_paths:  # used after pivot_root
        from sifpy.runtime import ocipaths  # noqa: F401
    # An OCI runtime's bundle under /tmp: shown again over the session (for its hooks).
    bundle_fd = plan_.pin(opts.oci_bundle, "bundle") if opts.oci_bundle else -1
    if bundle_fd >= 0:
        from sifpy.runtime import ocimount  # before the session covers the package
    layers: list[overlays.Layer] = []
    if overlay_layers(opts):
        # Imported here, before the session covers /tmp (sifpy may be installed there).
        from sifpy.runtime import overlays

        layers = overlays.open_layers(overlay_layers(opts), opts.fakeroot)
    if isinstance(image, SifPartition) and driver.name == "python":
        serve = drivers.python_server(image_fd, image.offset)
    ns.mount("tmpfs", SESSION, "tmpfs", ns.MS_NOSUID | ns.MS_NODEV, "mode=0700", "session")
    # Unbindable: a recursive bind of a host directory above it (host /tmp, or a user's
    # bind of /) prunes the session instead of copying it into the container.
    ns.mount(None, SESSION, None, ns.MS_UNBINDABLE, what="session (make unbindable)")
    os.mkdir(IMAGE)
    os.mkdir(FILES)
    # The generated files are bind sources, so they need a mount that is not unbindable.
    ns.mount("tmpfs", FILES, "tmpfs", ns.MS_NOSUID | ns.MS_NODEV, "mode=0755", "files")
    if bundle_fd >= 0:
        taken = {os.path.basename(p) for p in (BUNDLE, IMAGE, ROOT, FILES, RW, OVERLAY)}
        ocimount.show_bundle(bundle_fd, str(opts.oci_bundle), SESSION, taken)
        os.close(bundle_fd)
    if served is not None:
        servers.append(_attach_served(served))
    elif not isinstance(image, SifPartition):
        mount.bind(mount.fd_path(image_fd), IMAGE, readonly=not opts.writable, what="sandbox")
    elif driver.name == "kernel":
        ns.move_mount(kernel_fd, IMAGE)
        os.close(kernel_fd)
    elif driver.name == "python":
        servers.append(mount.fuse_mount(IMAGE, "sifpy-squashfs", [image_fd], serve, True))
    elif driver.name == "unsquash":
        drivers.extract(image_fd, image.offset, IMAGE, driver.program)
    else:
        servers.append(
            mount.mount_squashfs(
                image_fd,
                image.offset,
                IMAGE,
                driver.program,
                opts.fuse_single_thread and driver.program != SERVER,  # sifpy's own: threads
            )
        )
    if image_fd >= 0:
        os.close(image_fd)
    if opts.writable_tmpfs or layers:
        try:
            _mount_overlay(opts, layers, servers)
        finally:
            if layers:
                overlays.close(layers)  # a served image stays locked by its server
    # Before unshare(CLONE_NEWPID): after it, this process can't start threads.
    if opts.prefetch and driver.name in ("squashfuse", "python") and served is None:
        root_fd = os.open(IMAGE, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        prefetch(root_fd, opts.prefetch, spec.env.get("PATH", DEFAULT_PATH))
    if opts.pid_ns:
        # See runtime.outside: poststart/poststop hooks can't run in the new namespace.
        if hooked and posthooks.hooks_after(spec):
            from sifpy.runtime import outside

            outside.start(lambda stage, pid: posthooks.run_after(spec, stage, pid))
        ns.unshare(ns.CLONE_NEWPID)  # our next child is PID 1 of a new namespace
    me = os.getpid()
    # poststart hooks: a pipe whose write end the command's exec closes (started).
    poststart = hooked and started is not None and posthooks.stage_hooks(spec, "poststart")
    start_r, start_w = os.pipe() if poststart else (-1, -1)
    pid = os.fork()
    if pid == 0:
        if start_r >= 0:
            os.close(start_r)
        first_process(spec, ident, plan, cwd_fd, report, me, keeper, start_w)
    if opts.gate[0] >= 0:
        os.write(opts.gate[0], f"p{pid}\n".encode())
    if start_w >= 0:
        os.close(start_w)
        assert started is not None
        started.append(start_r)
    # Close what only the container needed; keep the report pipe until it is done.
    for fd in [m.fd for m in plan] + [cwd_fd]:
        if fd >= 0:
            os.close(fd)
    if opts.mpi is not None:
        mpibind.close(opts.mpi)
    for fd in opts.pass_fds:
        if fd > 2:
            os.close(fd)
    return pid, own_fd


def _await_id_maps(sync: tuple[int, int, int, int]) -> None:
    """The monitor's half of the handshake with the caller (:func:`sifpy.runtime.process.launch`
    writes the id maps), right after unshare."""
    unshared_r, unshared_w, mapped_r, mapped_w = sync
    os.close(unshared_r)
    os.close(mapped_w)
    os.write(unshared_w, b"u")
    answer = os.read(mapped_r, 1024)
    if answer != b"m" or os.getuid() != 0:
        why = answer[1:].decode(errors="replace") or "the caller did not map them"
        raise RuntimeSetupError(f"can't map user ids: {why}")
    os.close(unshared_w)
    os.close(mapped_r)


def _attach_served(served: Served) -> int:
    """Attach the image the starter mounted (detached) on IMAGE and
    wait until its server answers; return the server's pid."""
    mount_fd, pid = served.take()
    try:
        ns.move_mount(mount_fd, IMAGE)
    except BaseException:
        mount.stop_server(pid)
        raise
    finally:
        os.close(mount_fd)
    try:
        mount.wait_served(IMAGE, "squashfuse", pid)
    except RuntimeSetupError as exc:
        raise mount.squashfs_error(served.offset, exc) from exc
    return pid


def own_by_root(root_fd: int) -> None:
    """Chown every entry of the sandbox to container root and make it owner-accessible.

    After a build step with subordinate ids, files owned by other container ids belong to
    the user's subordinate range on the host, where the user can neither read them (to
    pack the squashfs) nor delete them. Inside the namespace, root may change that. Walks
    by descriptor, never follows symlinks, never leaves the sandbox's file system.
    """
    dev = os.fstat(root_fd).st_dev
    for _dirpath, dirnames, filenames, dirfd in os.fwalk(".", dir_fd=root_fd):
        st = os.fstat(dirfd)
        if st.st_uid != 0 or st.st_gid != 0:
            os.fchown(dirfd, 0, 0)
        os.fchmod(dirfd, stat.S_IMODE(st.st_mode) | 0o700)
        for name in list(dirnames) + filenames:
            try:
                est = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
                if est.st_dev != dev:
                    if name in dirnames:
                        dirnames.remove(name)
                    continue
                if est.st_uid != 0 or est.st_gid != 0:
                    os.chown(name, 0, 0, dir_fd=dirfd, follow_symlinks=False)
                if stat.S_ISREG(est.st_mode):
                    os.chmod(name, stat.S_IMODE(est.st_mode) | 0o600, dir_fd=dirfd)
            except OSError:
                pass
    os.close(root_fd)


def stop_servers(servers: list[int]) -> None:
    for pid in reversed(servers):  # the overlay's server first: it reads the image
        if pid in _FLUSHED:
            from sifpy.runtime import overlays  # imported already (set_up)

            overlays.stop([pid])
        else:
            mount.stop_server(pid)


def _open_image(image: SifPartition) -> int:
    try:
        image_fd = os.open(image.path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise RuntimeSetupError(f"can't open: {image.path}: {exc.strerror}") from exc
    if image.offset < 0 or image.offset + image.size > os.fstat(image_fd).st_size:
        raise RuntimeSetupError(
            f"can't mount: {image.path}: partition {image.offset}+{image.size} "
            "lies outside the file"
        )
    return image_fd


def _mount_overlay(opts: LaunchOptions, layers: list[overlays.Layer], servers: list[int]) -> None:
    """Mount the overlay on OVERLAY: lower = the read-only --overlay layers (top first)
    over the image; upper and work in the writable --overlay (a directory or an ext3
    image, runtime.overlays), else in a size-capped tmpfs (--writable-tmpfs, or read-only
    layers only: the root is made read-only once assembled). Each server is added to
    ``servers`` as soon as it runs, so that an error later still stops it."""
    lowers: list[str] = []
    base = None
    fuse_layers = False
    if layers:
        from sifpy.runtime import overlays

        first = len(servers)
        try:
            lowers, base = overlays.mount_layers(layers, SESSION, servers)
        finally:
            _FLUSHED.update(servers[first:])
        fuse_layers = len(servers) > first
    if base is None:
        base = RW
        os.mkdir(RW)
        data = f"mode=0755,size={opts.tmpfs_size_mb}m"
        ns.mount("tmpfs", RW, "tmpfs", ns.MS_NOSUID | ns.MS_NODEV, data, "--writable-tmpfs")
    for name, mode in (("upper", 0o755), ("work", 0o700)):
        # An ext3 image with a plain file system gets them, as in Apptainer.
        if not os.path.isdir(f"{base}/{name}"):
            try:
                os.mkdir(f"{base}/{name}", mode)
            except OSError as exc:
                raise RuntimeSetupError(f"can't create: overlay {name}/: {exc.strerror}") from exc
    os.mkdir(OVERLAY)
    owner = None if opts.fakeroot or os.getuid() == 0 else (os.getuid(), os.getgid())
    lower = ":".join([*lowers, IMAGE])
    # Layers served by fuse2fs: not under the kernel's overlayfs, which refuses or breaks on
    # FUSE layers (Apptainer skips it likewise when a writable overlay sits on FUSE).
    driver = "fuse" if fuse_layers and opts.overlay_driver == "auto" else opts.overlay_driver
    pid = drivers.mount_overlay(
        lower, f"{base}/upper", f"{base}/work", OVERLAY, driver, owner, noacl=fuse_layers
    )
    if pid:
        servers.append(pid)


# fuse2fs servers (runtime.overlays): stopped with SIGTERM, so that they write the image out.
_FLUSHED: set[int] = set()

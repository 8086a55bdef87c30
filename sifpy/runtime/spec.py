"""What to launch: the records a launch is described by (:class:`LaunchOptions`,
:class:`LaunchSpec`), and the layout of the monitor's session that both the monitor
(:mod:`.session`) and the container's first process (:mod:`.container`, :mod:`.assemble`)
use. Pure data: no system calls.
"""

from __future__ import annotations

from sifpy import TYPE_CHECKING
from sifpy.runtime.start import FUSE_SINGLE_THREAD, SQUASHFUSE, Identity, Sandbox, SifPartition
from sifpy.util.record import Record

if TYPE_CHECKING:
    from collections.abc import Sequence

    from sifpy.runtime.gpu import Injection
    from sifpy.runtime.mpibind import HostMpi


# Inside the monitor's mount namespace: a tmpfs over /tmp holds the image mount, the
# container root and generated files. /tmp always exists, and host /tmp is pinned first.
SESSION = "/tmp"


BUNDLE = f"{SESSION}/bundle"  # the OCI bundle CDI hooks are given (runtime.hooks)


IMAGE = f"{SESSION}/image"


ROOT = f"{SESSION}/root"


FILES = f"{SESSION}/files"


RW = f"{SESSION}/rw"  # --writable-tmpfs: a size-capped tmpfs; --overlay: DIR bound here


OVERLAY = f"{SESSION}/overlay"  # the overlay root: lower = IMAGE, upper = RW/upper


# What a confined payload (a build's %post) keeps: Docker's default capability set (moby
# oci/caps/defaults.go) less CAP_NET_RAW, as Podman leaves it out (raw sockets on the host
# network a build shares; ping uses ICMP sockets). Enough for dpkg and apt (chown, setuid to
# _apt, mknod of FIFOs...); none of CAP_SYS_ADMIN (mount, remount), CAP_NET_ADMIN,
# CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH. The bounding set is cut to it too (runc's rule).
DOCKER_CAPS = sum(
    1 << cap
    for cap in (
        0,  # CAP_CHOWN
        1,  # CAP_DAC_OVERRIDE
        3,  # CAP_FOWNER
        4,  # CAP_FSETID
        5,  # CAP_KILL
        6,  # CAP_SETGID
        7,  # CAP_SETUID
        8,  # CAP_SETPCAP
        10,  # CAP_NET_BIND_SERVICE
        18,  # CAP_SYS_CHROOT
        27,  # CAP_MKNOD
        29,  # CAP_AUDIT_WRITE
        31,  # CAP_SETFCAP
    )
)


class LaunchOptions(Record):
    """How much of the host the container sees, and as whom it runs."""

    __slots__ = (
        "fakeroot",
        "contain",
        "pid_ns",
        "no_init",
        "ipc_ns",
        "writable",
        "home",
        "home_dest",
        "no_home",
        "writable_tmpfs",
        "overlay",
        "overlays",
        "overlay_driver",
        "tmpfs_size_mb",
        "no_mount",
        "workdir",
        "mount_driver",
        "squashfuse",
        "fuse_single_thread",
        "identity",
        "passwd",
        "subid",
        "own_root_after",
        "prefetch",
        "confine",
        "inject",
        "hooks",
        "annotations",
        "mpi",
        "pass_fds",
        "pwd",
        "uts_ns",
        "net_ns",
        "hostname",
        "rlimits",
        "caps",
        "gate",
        "oci_id",
        "oci_bundle",
        "masked_paths",
        "readonly_paths",
        "start_timeout",
    )

    def __init__(
        self,
        fakeroot: bool = False,  # uid/gid 0 inside (mapped to the caller's)
        contain: bool = False,  # minimal /dev, private tmpfs /tmp, /var/tmp and $HOME
        pid_ns: bool = False,  # new PID namespace (fresh /proc) with an init as PID 1
        no_init: bool = False,  # with pid_ns: the command itself is PID 1 (no reaping init)
        ipc_ns: bool = False,  # new IPC namespace
        writable: bool = False,  # sandbox only: the root is the sandbox itself, read-write
        home: str | None = None,  # host home to bind (default: the caller's from passwd)
        home_dest: str | None = None,  # where it appears (default: same path)
        no_home: bool = False,
        writable_tmpfs: bool = False,  # overlay with a tmpfs upper layer (gone after the run)
        overlay: str | None = None,  # overlay with DIR/upper, DIR/work on the host (persistent)
        # Every --overlay in order (runtime.overlays): (a directory or an ext3 image, writable);
        # ``overlay`` above is one more writable directory, after these.
        overlays: tuple[tuple[str, bool], ...] = (),
        overlay_driver: str = "auto",  # auto | kernel | fuse (fuse-overlayfs)
        tmpfs_size_mb: int = 64,  # the --writable-tmpfs cap (Apptainer's sessiondir max size)
        no_mount: tuple[str, ...] = (),  # default mounts to skip: plan.NO_MOUNT names, system binds
        workdir: str
        | None = None,  # with contain: /tmp, /var/tmp, home from DIR/{tmp,var_tmp,home}
        mount_driver: str = "auto",  # auto | squashfuse | kernel | python | unsquash
        squashfuse: str = SQUASHFUSE,
        fuse_single_thread: bool = FUSE_SINGLE_THREAD,
        identity: Identity | None = None,  # default: looked up with host_identity()
        passwd: bool = True,  # bind generated /etc/passwd and /etc/group (builds: the image's own)
        subid: bool = False,  # with fakeroot: map ids 1..N to the user's /etc/subuid range if any
        own_root_after: bool = False,  # writable sandbox: afterwards, chown every file to root
        prefetch: tuple[str, ...] = (),  # programs to read ahead on a FUSE mount (runtime.prefetch)
        # A build's %post: Docker's default capabilities, no new user namespace, /sys read-only,
        # copies of the host's /etc files instead of binds (see DOCKER_CAPS, seccomp, plan).
        confine: bool = False,
        inject: Injection | None = None,  # GPU/CDI devices and driver files (runtime.gpu)
        # OCI hooks from hooks.d directories (runtime.hooksd.matching), run after the CDI ones,
        # and the annotations the hooks' state and bundle carry.
        hooks: tuple[dict[str, object], ...] = (),
        annotations: tuple[tuple[str, str], ...] = (),
        mpi: HostMpi | None = None,  # --mpi: the host's MPI to bind over the image's (mpibind)
        # fds above 2 the command inherits at the same numbers (subprocess's pass_fds): the
        # caller's, such as an MPI launcher's PMI socket. Every other fd is closed at exec, and
        # the monitor closes its copies once the container has them (a pipe's reader then sees
        # end-of-file when the command closes it).
        pass_fds: tuple[int, ...] = (),
        # --pwd/--cwd: the working directory inside the container; it must exist there (an
        # error, as Apptainer's "failed to set working directory", not a fallback to home).
        pwd: str | None = None,
        # What an OCI bundle's config.json may ask for (runtime.bundle): new UTS and network
        # namespaces, a hostname (needs the UTS one), resource limits as (RLIMIT_*, soft, hard).
        uts_ns: bool = False,
        net_ns: bool = False,
        hostname: str | None = None,
        rlimits: tuple[tuple[int, int, int], ...] = (),
        caps: int | None = None,  # a capability bounding set for the command (a mask)
        # An OCI runtime's create/start split (runtime.oci): (ready, gate) fds. The monitor
        # writes ``p<pid>\n`` (the container's pid) to ``ready``; the container, once its root
        # is entered and nothing but the exec is left, writes ``r\n`` and blocks reading ``gate``
        # until ``start`` writes to it (end of file instead: it was deleted, it exits).
        gate: tuple[int, int] = (-1, -1),
        # An OCI runtime's container: its id and bundle directory, which the hooks' state gives
        # instead of sifpy exec's (an id from the pid, a bundle the runtime writes).
        oci_id: str | None = None,
        oci_bundle: str | None = None,
        # config.json's linux.maskedPaths and linux.readonlyPaths (runtime.ocipaths).
        masked_paths: tuple[str, ...] = (),
        readonly_paths: tuple[str, ...] = (),
        # --runscript-timeout in seconds (Apptainer's default: 60): the action script
        # (``argv``) must have exec'd its command by then, else it is killed (_expire).
        start_timeout: float | None = None,
    ) -> None:
        self.fakeroot = fakeroot
        self.contain = contain
        self.pid_ns = pid_ns
        self.no_init = no_init
        self.ipc_ns = ipc_ns
        self.writable = writable
        self.home = home
        self.home_dest = home_dest
        self.no_home = no_home
        self.writable_tmpfs = writable_tmpfs
        self.overlay = overlay
        self.overlays = overlays
        self.overlay_driver = overlay_driver
        self.tmpfs_size_mb = tmpfs_size_mb
        self.no_mount = no_mount
        self.workdir = workdir
        self.mount_driver = mount_driver
        self.squashfuse = squashfuse
        self.fuse_single_thread = fuse_single_thread
        self.identity = identity
        self.passwd = passwd
        self.subid = subid
        self.own_root_after = own_root_after
        self.prefetch = prefetch
        self.confine = confine
        self.inject = inject
        self.hooks = hooks
        self.annotations = annotations
        self.mpi = mpi
        self.pass_fds = pass_fds
        self.pwd = pwd
        self.uts_ns = uts_ns
        self.net_ns = net_ns
        self.hostname = hostname
        self.rlimits = rlimits
        self.caps = caps
        self.gate = gate
        self.oci_id = oci_id
        self.oci_bundle = oci_bundle
        self.masked_paths = masked_paths
        self.readonly_paths = readonly_paths
        self.start_timeout = start_timeout


DEFAULT_OPTIONS = LaunchOptions()  # shared: records are never changed in place (replace)


class LaunchSpec(Record):
    """Everything :func:`sifpy.runtime.process.launch` needs; ``env`` is the command's final
    environment."""

    __slots__ = ("image", "argv", "env", "cwd", "binds", "options")

    def __init__(
        self,
        image: SifPartition | Sandbox,
        argv: list[str],
        env: dict[str, str],
        cwd: str,
        binds: Sequence[tuple[str, str, bool]] = (),
        options: LaunchOptions = DEFAULT_OPTIONS,
    ) -> None:
        self.image = image
        self.argv = argv
        self.env = env
        self.cwd = cwd
        self.binds = binds
        self.options = options


def overlay_layers(opts: LaunchOptions) -> tuple[tuple[str, bool], ...]:
    return (*opts.overlays, (opts.overlay, True)) if opts.overlay else opts.overlays


def has_hooks(opts: LaunchOptions) -> bool:
    """Whether this start runs OCI hooks at all (CDI's or hooks.d's): checked before
    importing the modules that run them."""
    return bool(opts.hooks or (opts.inject is not None and opts.inject.hooks))


def all_hooks(spec: LaunchSpec) -> list[dict[str, object]]:
    """Every OCI hook of this start: the CDI devices' first, then the hooks.d ones."""
    inj = spec.options.inject
    cdi = inj.hooks if inj is not None else []
    return [*cdi, *spec.options.hooks] if spec.options.hooks else cdi

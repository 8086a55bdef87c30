#!/bin/sh
# mmdebstrap's customize hook (run on the host, $1 the Debian sid root that has
# Apptainer): build every *.def under /work of the root into /work/NAME.sif with
# `apptainer build`.
#
# Apptainer refuses to run in a plain chroot ("Running inside a weak chrooted
# environment"), and as root it asks for the full capability set, which a container host
# may have cut from its bounding set. So the build runs as root of a user namespace of our
# own (every capability there, uid 0 mapped to uid 0) with its own mount and pid
# namespaces (proc can be mounted), and pivot_root's into the root, made a mount point.
set -eu
root=$1
[ -e "$root/etc/hosts" ] || echo '127.0.0.1 localhost' > "$root/etc/hosts"
[ -e "$root/etc/resolv.conf" ] || : > "$root/etc/resolv.conf"
exec unshare --user --map-root-user --mount --pid --fork sh -euc '
    root=$1
    mount --make-rprivate /
    mount --rbind "$root" "$root"
    mount -t proc proc "$root/proc"
    mount --rbind /dev "$root/dev"
    mount --rbind /sys "$root/sys"
    mount -t tmpfs tmpfs "$root/tmp"
    mkdir -p "$root/.oldroot"
    cd "$root"
    pivot_root . .oldroot
    exec /usr/sbin/chroot / /bin/sh -euc "
        umount -l /.oldroot
        rmdir /.oldroot
        cd /work
        apptainer --version
        for def in *.def; do
            apptainer --quiet build --notest \"\${def%.def}.sif\" \"\$def\" > /dev/null
        done
    "
' sh "$root"

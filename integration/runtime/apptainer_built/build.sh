#!/bin/sh
# mmdebstrap's customize hook, run on the host with $1 the Debian sid root that has
# Apptainer and this directory in its /work: runs inside.sh there.
#
# Apptainer refuses to run in a plain chroot ("Running inside a weak chrooted
# environment"), and as root it asks for the full capability set, which a container host
# may have cut from its bounding set. So inside.sh runs as root of a user namespace of our
# own (every capability there; uid 0 mapped to uid 0) with its own mount and pid
# namespaces (so proc can be mounted), after pivot_root into the root made a mount point.
# Apptainer wants an /etc/hosts and /etc/resolv.conf to bind, which minbase lacks.
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
    exec /usr/sbin/chroot / /bin/sh -eu /work/inside.sh
' sh "$root"

#!/bin/sh
# Run by build.sh in the sid root, as root of its user namespace: build every NAME.def
# of /work into /work/out/NAME.sif with `apptainer build`, then run each line of
# probes.txt with Apptainer on each of those and on each SIF sifpy built (sifpy-NAME.sif,
# put in /work/out before): its stdout into out/NAME.ID.out, its stderr into
# out/NAME.ID.err, its exit status into out/NAME.ID.rc (the values the tests expect of
# sifpy).
umount -l /.oldroot
rmdir /.oldroot
mkdir -p /work/out
cd /work/out
apptainer --version > version
for def in ../*.def; do
    SIF=$(basename "$def" .def).sif
    # %test exits 3 on purpose (the test action's status): not run at build time.
    apptainer --quiet build --notest "$SIF" "$def" > /dev/null
done
for SIF in *.sif; do
    name=${SIF%.sif}
    grep -v '^#' ../probes.txt | while read -r id args; do
        rc=0
        eval "apptainer --quiet $args" > "$name.$id.out" 2> "$name.$id.err" < /dev/null || rc=$?
        echo "$rc" > "$name.$id.rc"
    done
done
# The ported environment tables, run by Apptainer (tables.sh, written by the fixture).
sh ../tables.sh
# sid's siftool lists the OCI-SIF sifpy wrote (it knows OCI.RootIndex and OCI.Blob).
for f in *.ocisif; do
    siftool list "$f" > "$f.siftool-list"
done

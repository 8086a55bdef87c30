#!/bin/sh
# Run by build.sh in the sid root, as root of its user namespace: build every NAME.def
# of /work into /work/out/NAME.sif with `apptainer build`, then run each line of
# probes.txt on it with Apptainer: its stdout into out/NAME.ID.out, its exit status into
# out/NAME.ID.rc (the values the tests expect of sifpy).
umount -l /.oldroot
rmdir /.oldroot
mkdir /work/out
cd /work/out
apptainer --version > version
for def in ../*.def; do
    name=$(basename "$def" .def)
    SIF=$name.sif
    # %test exits 3 on purpose (the test action's status): not run at build time.
    apptainer --quiet build --notest "$SIF" "$def" > /dev/null
    grep -v '^#' ../probes.txt | while read -r id args; do
        rc=0
        eval "apptainer --quiet $args" > "$name.$id.out" 2> /dev/null < /dev/null || rc=$?
        echo "$rc" > "$name.$id.rc"
    done
done

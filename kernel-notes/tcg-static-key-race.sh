#!/bin/sh
# Reproduces the static-key race of multi-threaded TCG (README.md, "Static keys under
# multi-threaded TCG"): K cgroups with every controller are created, entered and removed while
# two loops keep both vCPUs in the kernel; each switches the page allocator's cpuset key on and
# off unless another cgroup keeps it on: KEEP=1 leaves the init's cora-vm-keys in place, KEEP=0
# removes it first.
#   cargo xtask vm -- env K=200 KEEP=0 sh kernel-notes/tcg-static-key-race.sh
# Prints "survived K"; a panic ends the VM first ("Oops: int3" in the console log).
cg=/sys/fs/cgroup
for c in $(cat $cg/cgroup.controllers); do echo "+$c" >$cg/cgroup.subtree_control; done
if [ "${KEEP:-0}" = 0 ]; then rmdir $cg/cora-vm-keys; else [ -d $cg/cora-vm-keys ]; fi || exit 1
for i in 1 2; do (while :; do /bin/true; done) & done
k=0
while [ "$k" -lt "${K:-200}" ]; do
    mkdir $cg/race$k
    echo $$ >$cg/race$k/cgroup.procs
    echo $$ >$cg/cgroup.procs
    rmdir $cg/race$k
    k=$((k + 1))
done
echo "survived $k"
kill $(jobs -p) 2>/dev/null
exit 0

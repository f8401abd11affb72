#!/bin/sh
# Proves the VM harness gives the guest what later tests rely on.
set -eu
fail() { echo "00-harness: $*" >&2; exit 1; }

# The kernel xtask was asked for (`--kernel`), with its modules where modprobe looks.
[ -n "${CORA_VM_KERNEL:-}" ] || fail "CORA_VM_KERNEL not set by xtask"
[ "$(uname -r)" = "$CORA_VM_KERNEL" ] || fail "kernel $(uname -r), want $CORA_VM_KERNEL"
[ -f "/lib/modules/$(uname -r)/modules.dep" ] || fail "no modules for $(uname -r)"
modprobe erofs && grep -q erofs /proc/filesystems || fail "modprobe erofs failed"
[ -c /dev/ublk-control ] || fail "/dev/ublk-control missing"
grep -q '^ublk_drv ' /proc/modules || fail "ublk_drv not loaded"
[ "$(cat /proc/sys/kernel/hostname)" = cora-vm ] || fail "hostname not set"
for m in /tmp /run /dev/shm; do
    [ "$(stat -f -c %T "$m")" = tmpfs ] || fail "$m is not tmpfs"
done
[ "$(stat -f -c %T /sys/fs/cgroup)" = cgroup2fs ] || fail "cgroup2 not at /sys/fs/cgroup"
# The cgroup that keeps the allocators' static keys on (see the init): no container's start
# or removal may patch kernel text under TCG.
for c in cpuset memory; do
    grep -qw "$c" /sys/fs/cgroup/cora-vm-keys/cgroup.controllers || fail "cora-vm-keys lacks $c"
done
[ "$(stat -f -c %T /dev/pts)" = devpts ] || fail "/dev/pts not devpts"
ip -o addr show lo | grep -q 'inet 127.0.0.1/' || fail "lo has no 127.0.0.1"
busybox ping -c1 -W2 127.0.0.1 >/dev/null 2>&1 || fail "ping 127.0.0.1 failed"
[ "$HOME" = /root ] || fail "HOME=$HOME"
# The root is the host's, read-only below a tmpfs overlay: writes succeed but stay in the guest.
[ "$(stat -f -c %T /)" = overlayfs ] || fail "/ is not overlayfs"
echo guest >/etc/cora-vm-overlay-check || fail "cannot write to the overlay root"
# rublk (target/tools/bin, on PATH) talks to the kernel: GET_FEATURES must answer.
command -v rublk >/dev/null || fail "rublk not on PATH ($PATH)"
# (rublk exits 0 even when the kernel does not answer, so check its output.)
features=$(rublk features) || fail "rublk features failed"
echo "$features"
echo "$features" | grep -q "UBLK FEATURES" || fail "no GET_FEATURES answer from ublk_drv"

#!/bin/busybox sh
# PID 1 inside the initramfs. Builds the guest root (read-only 9p view of the host root with a
# tmpfs overlay, rw 9p shares at their host paths), then execs chroot into it: the chroot'ed
# PID 1 sees the host's /sbin/modprobe, so module autoload and `modprobe ublk_drv` work.
export PATH=/bin  # busybox applet symlinks, made by xtask (faster than busybox --install)

fail() {
    echo "cora-vm init: $*" >&2
    # Without -no-reboot QEMU would loop; with it, the reboot ends QEMU and the host reports
    # that no exit status was written.
    echo b >/proc/sysrq-trigger 2>/dev/null || echo b >/newroot/proc/sysrq-trigger
    exit 1
}

# cora_* parameters from the kernel command line arrive here as environment variables.
stage() {
    [ -n "${cora_verbose:-}" ] &&
        echo "cora-vm: $1 at $(cut -d' ' -f1 /proc/uptime /newroot/proc/uptime 2>/dev/null) s" >&2
    return 0
}

mount -t proc proc /proc || fail "mount /proc"
stage "init started"
mount -t sysfs sysfs /sys || fail "mount /sys"
mount -t devtmpfs devtmpfs /dev || fail "mount /dev"

while read -r mod; do
    insmod "/lib/modules/$mod.ko" || fail "insmod $mod"
done </modules.order

stage "modules loaded"
# Kernel-global setup is done here with busybox applets: executing the host's ip/stty/modprobe
# over 9p costs seconds under TCG (each pulls in its shared libraries).
[ -c /dev/ublk-control ] || fail "/dev/ublk-control missing after loading ublk_drv"
# Nodes whose opening autoloads a module (udev would create them): /dev/loop-control etc.
while read -r path kind major minor; do
    case $path in */*) mkdir -p "/dev/${path%/*}" ;; esac
    [ -e "/dev/$path" ] || mknod -m 0600 "/dev/$path" "$kind" "$major" "$minor" || fail "mknod $path"
done </static-nodes
hostname cora-vm || fail "hostname"
ip link set lo up || fail "ip link set lo up"
# Raw consoles: no \n -> \r\n translation, no echo, so the command's bytes arrive unchanged.
# hvc resets termios on every first open, so fds 3 and 4 stay open (through the exec chroot,
# in PID 1) to keep these settings for the command's own opens.
exec 3>/dev/hvc0 4>/dev/hvc1
stty -F /dev/hvc0 raw -echo || fail "stty hvc0"
stty -F /dev/hvc1 raw -echo || fail "stty hvc1"

msize=262144
p9="trans=virtio,version=9p2000.L,msize=$msize"

# Lower layer: the host root, read-only. cache=loose is safe because nothing changes it
# during the run (writable host paths are separate rw shares mounted on top).
mount -t 9p -o "$p9,ro,cache=loose" root /lower || fail "mount 9p root"
mount -t tmpfs -o mode=0755 tmpfs /upper || fail "mount overlay tmpfs"
mkdir -p /upper/data /upper/work
mount -t overlay -o lowerdir=/lower,upperdir=/upper/data,workdir=/upper/work overlay /newroot \
    || fail "mount overlay root"

# Fresh /run and /tmp (the host's must not leak in) before the shares, so a share below
# them (`--share /tmp/x`) is mounted on top instead of being hidden.
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /newroot/run || fail "mount /run"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /newroot/tmp || fail "mount /tmp"

# Read-write shares, mounted at the same path as on the host. cache=mmap keeps host and
# guest coherent (no page cache for read/write) while still allowing shared writable mmap.
# share0 is the repository; the per-run directory (command, environment, share list, status
# file) lies inside it, so no extra device is needed (each virtio device costs boot time).
share() {
    mkdir -p "/newroot$2" || fail "mkdir $2"
    mount -t 9p -o "$p9,cache=mmap" "$1" "/newroot$2" || fail "mount share $2"
}
[ -n "${cora_repo:-}" ] && [ -n "${cora_run:-}" ] || fail "cora_repo/cora_run not on the kernel command line"
share share0 "$cora_repo"
run="/newroot$cora_run"
while read -r tag path; do
    [ "$tag" = share0 ] || share "$tag" "$path"
done <"$run/shares"

# A kernel extracted under the repository (cargo xtask vm --kernel latest): its modules take
# the place the host's modprobe looks in. /lib is a relative symlink on merged-/usr hosts,
# so the path resolves inside /newroot.
if [ -n "${cora_modules:-}" ]; then
    mkdir -p "/newroot/lib/modules/$cora_release" || fail "mkdir /lib/modules/$cora_release"
    mount --bind "/newroot$cora_modules" "/newroot/lib/modules/$cora_release" \
        || fail "bind $cora_modules"
fi

mount --move /proc /newroot/proc || fail "move /proc"
mount --move /sys /newroot/sys || fail "move /sys"
mount --move /dev /newroot/dev || fail "move /dev"
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620,gid=5 devpts /newroot/dev/pts \
    || fail "mount /dev/pts"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /newroot/dev/shm || fail "mount /dev/shm"
mount -t cgroup2 -o nsdelegate cgroup2 /newroot/sys/fs/cgroup || fail "mount cgroup2"
# The first cgroup with cpuset or memory turns static keys on in the page and slab allocators,
# and removing the last one turns them off again (each container, before this): kernel text patched through int3
# breakpoints, which multi-threaded TCG now and then lets another vCPU trap on after the patch
# ("Oops: int3", a panic; kernel-notes/README.md). Turn them on now, while nothing else runs
# and before the command starts (xtask boots again after a panic here), and keep them on with
# a cgroup that lives as long as the VM.
cg=/newroot/sys/fs/cgroup
for c in $(cat "$cg/cgroup.controllers"); do
    echo "+$c" >"$cg/cgroup.subtree_control" || fail "enable cgroup controller $c"
done
mkdir "$cg/cora-vm-keys" || fail "mkdir $cg/cora-vm-keys"

stage "root ready"
exec chroot /newroot /bin/sh "$cora_run/guest.sh" "$cora_run"

#!/bin/busybox sh
# PID 1 inside the initramfs. Builds the guest root (read-only 9p view of the host root with a
# tmpfs overlay, rw 9p shares at their host paths), then execs chroot into it: the chroot'ed
# PID 1 sees the host's /sbin/modprobe, so module autoload and `modprobe ublk_drv` work.
/bin/busybox --install -s /bin
export PATH=/bin

fail() {
    echo "cora-vm init: $*" >&2
    # Without -no-reboot QEMU would loop; with it, the reboot ends QEMU and the host reports
    # that no exit status was written.
    echo b >/proc/sysrq-trigger
    exit 1
}

mount -t proc proc /proc || fail "mount /proc"
mount -t sysfs sysfs /sys || fail "mount /sys"
mount -t devtmpfs devtmpfs /dev || fail "mount /dev"

while read -r mod; do
    insmod "/lib/modules/$mod.ko" || fail "insmod $mod"
done </modules.order

# The kernel cmdline carries only what the init cannot learn from the run directory.
msize=262144
p9="trans=virtio,version=9p2000.L,msize=$msize"

# Lower layer: the host root, read-only. cache=loose is safe because nothing changes it
# during the run (writable host paths are separate rw shares mounted on top).
mount -t 9p -o "$p9,ro,cache=loose" root /lower || fail "mount 9p root"
mount -t tmpfs -o mode=0755 tmpfs /upper || fail "mount overlay tmpfs"
mkdir -p /upper/data /upper/work
mount -t overlay -o lowerdir=/lower,upperdir=/upper/data,workdir=/upper/work overlay /newroot \
    || fail "mount overlay root"

# The per-run directory (command, environment, status file) lives on its own rw share.
mount -t 9p -o "$p9,cache=none" corarun /cora || fail "mount 9p run dir"

mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /newroot/run || fail "mount /run"
mkdir -p /newroot/run/cora
mount --move /cora /newroot/run/cora || fail "move run dir"

# Read-write shares, mounted at the same path as on the host. cache=mmap keeps host and
# guest coherent (no page cache for read/write) while still allowing shared writable mmap.
while read -r tag path; do
    mkdir -p "/newroot$path" || fail "mkdir $path"
    mount -t 9p -o "$p9,cache=mmap" "$tag" "/newroot$path" || fail "mount share $path"
done </newroot/run/cora/shares

mount --move /proc /newroot/proc || fail "move /proc"
mount --move /sys /newroot/sys || fail "move /sys"
mount --move /dev /newroot/dev || fail "move /dev"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /newroot/tmp || fail "mount /tmp"
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620,gid=5 devpts /newroot/dev/pts \
    || fail "mount /dev/pts"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /newroot/dev/shm || fail "mount /dev/shm"
mount -t cgroup2 -o nsdelegate cgroup2 /newroot/sys/fs/cgroup || fail "mount cgroup2"

exec chroot /newroot /bin/sh /run/cora/guest.sh

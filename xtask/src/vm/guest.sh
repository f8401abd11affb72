# Stage 2, PID 1 after `chroot` into the guest root, run by the host's /bin/sh. Finishes the
# setup that needs the host's userland, runs the command, records its exit status on the run
# share, then reboots (QEMU runs with -no-reboot, so that ends the VM).
R=/run/cora

fail() {
    echo "$*" >"$R/error"
    echo "cora-vm: $*" >&2
    finish
}

finish() {
    sync
    # busybox-static: the host's reboot is systemd's, which needs a running systemd.
    exec busybox reboot -f
}

export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
echo cora-vm >/proc/sys/kernel/hostname || fail "cannot set hostname"
ip link set lo up || fail "cannot bring up lo"
modprobe ublk_drv || fail "modprobe ublk_drv failed"
[ -c /dev/ublk-control ] || fail "/dev/ublk-control missing after modprobe ublk_drv"
# Raw consoles: no \n -> \r\n translation, no echo, so the command's bytes arrive unchanged.
stty -F /dev/hvc0 raw -echo || fail "stty hvc0"
stty -F /dev/hvc1 raw -echo || fail "stty hvc1"

# env: `export K='V'` lines written by xtask (PATH, HOME, CORA_*, RUST_*; cwd in CORA_VM_CWD).
. "$R/env" || fail "cannot read $R/env"
cd "$CORA_VM_CWD" || fail "cannot cd to $CORA_VM_CWD"
# The host reads this file's mtime to measure boot-to-command time.
: >"$R/started"
sh -c "$(cat "$R/cmd")" </dev/null >/dev/hvc0 2>/dev/hvc1
echo $? >"$R/status"
finish

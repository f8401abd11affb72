# Stage 2, PID 1 after `chroot` into the guest root, run by the host's /bin/sh: runs the
# command, records its exit status on the run share, then reboots (QEMU runs with
# -no-reboot, so that ends the VM). All other setup happened in the initramfs (init.sh).
R=$1
stage() {
    [ -n "${cora_verbose:-}" ] && echo "cora-vm: $1 at $(cut -d' ' -f1 /proc/uptime) s" >&2
    return 0
}
stage "chroot done"

fail() {
    echo "$*" >"$R/error"
    echo "cora-vm: $*" >&2
    finish
}

finish() {
    sync
    # The host's reboot is systemd's, which needs a running systemd; sysrq needs nothing.
    echo b >/proc/sysrq-trigger
}

export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# env: `export K='V'` lines written by xtask (PATH, HOME, CORA_*, RUST_*; cwd in CORA_VM_CWD).
(. "$R/env" && cd "$CORA_VM_CWD") || fail "cannot enter the working directory (see $R/env)"
stage "running command"
# env -i: the command must not inherit the init's environment (cora_* boot parameters, TERM).
# The host reads the mtime of "started" to measure boot-to-command time.
env -i /bin/sh -c '. "$1/env" && cd "$CORA_VM_CWD" && : >"$1/started" && exec sh -c "$(cat "$1/cmd")"' \
    guest "$R" </dev/null >/dev/hvc0 2>/dev/hvc1 3>&- 4>&-
echo $? >"$R/status"
finish

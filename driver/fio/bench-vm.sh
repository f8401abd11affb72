#!/bin/sh
# Benchmarks cora-driver against the kernel loop device (direct I/O), `rublk add loop` and
# `rublk add null`, in one boot, over one image in tmpfs; prints a table with ratios.
# Run in the VM:  cargo xtask vm -- driver/fio/bench-vm.sh
# Env: CORA_DRIVER (binary), FIO_SIZE (image size, default 512m), FIO_RUNTIME (s, default 10),
#      CORA_VARIANTS (lines NAME=ARGS of `cora-driver add` variants to run).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
D=${CORA_DRIVER:-$here/../../target/release/cora-driver}
export FIO_SIZE=${FIO_SIZE:-512m}
export FIO_RUNTIME=${FIO_RUNTIME:-10}
T=$(mktemp -d /tmp/bench.XXXXXX)
# The image lies on ext4 (the chunk cache's usual filesystem), itself on a tmpfs file: io_uring
# reads tmpfs files through worker threads (no non-blocking buffered reads there; measured on
# 7.3, 4k QD1: 748 us on tmpfs vs 427 us on ext4), which would misrepresent io_uring servers.
truncate -s 4G "$T/fs.img"
mkfs.ext4 -q "$T/fs.img" || fail "mkfs.ext4"
mkdir "$T/fs"
mount -o loop "$T/fs.img" "$T/fs" || fail "mounting the ext4 image"
IMG=$T/fs/img
fail() { echo "bench: $*" >&2; exit 1; }
[ -x "$D" ] || fail "$D missing: cargo build --release --bins"
command -v rublk >/dev/null || fail "rublk not on PATH (cargo xtask tools)"

fio --name=fill --filename="$IMG" --rw=write --bs=1m --size="$FIO_SIZE" --refill_buffers \
    >/dev/null || fail "creating the image"

new_ublk() { # run a command that creates a ublk device; print the new /dev/ublkbN
    before=$(ls /dev/ublkb* 2>/dev/null || true)
    "$@" >"$T/add.out" 2>&1 || { cat "$T/add.out" >&2; fail "$* failed"; }
    for _ in $(seq 100); do
        for d in /dev/ublkb*; do
            [ -b "$d" ] || continue
            echo "$before" | grep -qx "$d" || { echo "$d"; return; }
        done
        sleep 0.1
    done
    fail "no new device after $*"
}

run() { # run NAME DEV: three fio jobs; appends "NAME iops bw_MBps lat_avg_us lat_p99_us"
    name=$1 dev=$2
    DEV=$dev fio --readonly --output-format=json "$here/randread-4k-qd32.fio" >"$T/a.json"
    DEV=$dev fio --readonly --output-format=json "$here/randread-4k-psync-qd1.fio" >"$T/b.json"
    DEV=$dev fio --readonly --output-format=json "$here/seqread-1m-qd8.fio" >"$T/c.json"
    iops=$(jq '.jobs[0].read.iops | floor' "$T/a.json")
    lat=$(jq '.jobs[0].read.clat_ns.mean / 1000 | floor' "$T/b.json")
    p99=$(jq '.jobs[0].read.clat_ns.percentile["99.000000"] / 1000 | floor' "$T/b.json")
    bw=$(jq '.jobs[0].read.bw_bytes / 1000000 | floor' "$T/c.json")
    echo "$name $iops $bw $lat $p99" >>"$T/results"
    echo "bench: $name: 4k QD32 ${iops} IOPS, 1M QD8 ${bw} MB/s, 4k QD1 avg ${lat} us p99 ${p99} us" >&2
}

# kernel loop, direct I/O on
LOOP=$(losetup --direct-io=on --read-only -f --show "$IMG")
echo "bench: loop dio=$(cat /sys/block/${LOOP#/dev/}/loop/dio)" >&2
run loop "$LOOP"
losetup -d "$LOOP"

# The reference loop server uses zero copy where the kernel has auto buffer registration.
zc=
"$D" features | grep -q AUTO_BUF_REG && zc=-z
echo "bench: kernel $(uname -r), $("$D" features | tr '\n' ' ')" >&2
echo "bench: rublk loop ${zc:-without zero copy}" >&2
DEV=$(new_ublk rublk add loop -f "$IMG" --quiet $zc)
run rublk-loop "$DEV"
rublk del -n "${DEV#/dev/ublkb}"

DEV=$(new_ublk rublk add null --quiet)
run rublk-null "$DEV"
rublk del -n "${DEV#/dev/ublkb}"

# cora-driver variants: NAME=ARGS, one per line
# Default variants: the best data mode (1 and 2 queues), and user copy where that is not it.
variants="cora=
cora-q2=--queues 2"
[ -n "$zc" ] && variants="$variants
cora-usercopy=--data-mode user-copy"
printf '%s\n' "${CORA_VARIANTS:-$variants}" | while IFS= read -r v; do
    [ -n "$v" ] || continue
    # shellcheck disable=SC2086
    DEV=$("$D" add --file "$IMG" --daemon ${v#*=})
    run "${v%%=*}" "$DEV"
    "$D" del "${DEV#/dev/ublkb}"
done

echo
awk '
{ name[NR] = $1; iops[NR] = $2; bw[NR] = $3; lat[NR] = $4; p99[NR] = $5; row[$1] = NR }
END {
    printf "%-13s %9s %9s %10s %10s   %s\n", "device", "4k-IOPS", "1M-MB/s", "lat-avg-us", "lat-p99-us", "ratios"
    for (i = 1; i <= NR; i++) {
        printf "%-13s %9d %9d %10d %10d  ", name[i], iops[i], bw[i], lat[i], p99[i]
        n = split("loop rublk-loop rublk-null", refs, " ")
        for (j = 1; j <= n; j++) {
            r = row[refs[j]]
            if (r == i || r == "") continue
            printf " vs %s: %.2fx iops %.2fx MB/s %.2fx lat;", refs[j], iops[i] / iops[r], bw[i] / bw[r], lat[i] / lat[r]
        }
        printf "\n"
    }
    l = row["rublk-loop"]; z = row["rublk-null"]
    if (!l || !z) exit
    printf "\ntargets (same boot): IOPS >= 1.0x rublk-loop, latency <= 1.0x rublk-loop, MB/s >= 2x rublk-loop, IOPS >= 0.7x rublk-null\n"
    for (c = 1; c <= NR; c++) {
        if (name[c] !~ /^cora/) continue
        printf "%-13s IOPS %.2fx %s; lat %.2fx %s; MB/s %.2fx %s; IOPS vs null %.2fx %s\n", name[c], iops[c] / iops[l], (iops[c] >= iops[l] ? "ok" : "MISSED"), lat[c] / lat[l], (lat[c] <= lat[l] ? "ok" : "MISSED"), bw[c] / bw[l], (bw[c] >= 2 * bw[l] ? "ok" : "MISSED"), iops[c] / iops[z], (iops[c] >= 0.7 * iops[z] ? "ok" : "MISSED")
    }
}' "$T/results"
umount "$T/fs"
rm -rf "$T"

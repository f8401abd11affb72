#!/bin/sh
# fio on a CORA image device (cold and fully cached; ublk, and the same cache through FUSE)
# next to the kernel loop device (direct I/O), `rublk add loop -o` and `rublk add null`, all in one boot, plus a whole-tree read of the
# mounted filesystem cold vs warm. Run by `cargo xtask bench fio` (which converts the image on
# the host first); by hand, in the VM:
#   CORA_FIO_REGISTRY=target/bench/fio/registry cargo xtask vm --mem 6G -- driver/fio/bench-image-vm.sh
# Env: CORA_FIO_REGISTRY (docker-registry storage holding repository fio:cora, copied to tmpfs),
#      CORA_FIO_RESULTS (results file, default $CORA_FIO_REGISTRY/../results.txt),
#      FIO_RUNTIME (s, default 10), CORA_VARIANTS (lines NAME=ARGS of warm `cora-driver add`),
#      CORA_FIO_SKIP_COLD=1 (skip the cold tree reads and cold fio: slow under TCG),
#      CORA_FIO_SKIP_FUSE=1 (skip the FUSE transport's warm run),
#      CORA_FIO_PERF=DIR (where a warm ublk server's time goes in the 4 KiB QD32 and 1 MiB jobs:
#      its threads' CPU to DIR/NAME.JOB.threads, the guest's CPU split to DIR/NAME.JOB.cpu,
#      syscalls to DIR/NAME.JOB.syscalls).
# Results, one line each (whitespace-separated):
#   fio DEVICE STATE IOPS_4K MBPS_1M LAT_AVG_US LAT_P99_US BYTES_FETCHED
#   tree STATE SECONDS BYTES_FETCHED
#   info KEY VALUE
# BYTES_FETCHED: bytes sent over loopback (the registry's responses plus the requests), from
# /proc/net/dev.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
R=$(cd "$here/../.." && pwd)
D=${CORA_DRIVER:-$R/target/release/cora-driver}
REG_SRC=${CORA_FIO_REGISTRY:-$R/target/bench/fio/registry}
OUT=${CORA_FIO_RESULTS:-$REG_SRC/../results.txt}
export FIO_RUNTIME=${FIO_RUNTIME:-10}
fail() { echo "bench-fio: $*" >&2; exit 1; }
log() { echo "bench-fio: [$(cut -d" " -f1 /proc/uptime)] $*" >&2; }
[ -x "$D" ] || fail "$D missing: cargo build --release --bins"
[ -z "${CORA_FIO_PERF:-}" ] || { command -v perf >/dev/null && command -v strace >/dev/null; } \
    || fail "CORA_FIO_PERF needs perf and strace (apt-get install linux-perf strace)"
[ -d "$REG_SRC/docker" ] || fail "$REG_SRC has no registry data (cargo xtask bench fio makes it)"
command -v rublk >/dev/null || fail "rublk not on PATH (cargo xtask tools)"

# Everything on one tmpfs big enough for the registry, a full cache and the flat image; the
# caches and the flat image on ext4 inside it (their usual filesystem: io_uring reads tmpfs
# files through worker threads, see kernel-notes/ublk.md).
T=$(mktemp -d /tmp/bench-fio.XXXXXX)
mount -t tmpfs -o size=5g tmpfs "$T"
REG=
cleanup() {
    for c in /sys/class/ublk-char/ublkc*; do
        [ -e "$c" ] && { "$D" del "${c##*ublkc}" 2>/dev/null || rublk del -n "${c##*ublkc}" 2>/dev/null || true; }
    done
    [ -n "$REG" ] && kill "$REG" 2>/dev/null
    umount "$F" 2>/dev/null || true
    losetup -D 2>/dev/null || true
    umount "$T" 2>/dev/null || true
}
F=$T/fs
trap cleanup EXIT
truncate -s 4G "$T/fs.img"
mkfs.ext4 -q "$T/fs.img" || fail "mkfs.ext4"
mkdir -p "$F"
mount -o loop "$T/fs.img" "$F" || fail "mounting the ext4 image"
: >"$OUT"
result() { echo "$*" >>"$OUT"; echo "bench-fio: $*" >&2; }

wait_for() { # wait_for SECONDS CMD...
    end=$(($(date +%s) + $1)); shift
    until "$@"; do
        [ "$(date +%s)" -lt "$end" ] || return 1
        sleep 0.1
    done
}
lo_bytes() { awk '$1 == "lo:" { print $10 }' /proc/net/dev; }
now() { date +%s.%N; }

log "copying the registry into tmpfs"
cp -a "$REG_SRC" "$T/registry"
PORT=5124
H=127.0.0.1:$PORT
REF=$H/fio:cora
cat >"$T/reg.yml" <<YML
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $T/registry
http:
  addr: $H
YML
docker-registry serve "$T/reg.yml" >"$T/reg.log" 2>&1 &
REG=$!
wait_for 30 curl -sf "http://$H/v2/" >/dev/null || fail "registry did not start: $(cat "$T/reg.log")"

add_image() { # add_image CACHE ARGS...: attach the image; prints /dev/ublkbN
    cache=$1; shift
    "$D" add --image "$REF" --insecure "$H" --cache "$cache" --daemon --log "$T/srv.log" "$@" \
        || fail "cora-driver add: $(tail -5 "$T/srv.log")"
}
del() { "$D" del "${1#/dev/ublkb}" || fail "del $1"; }

# fio_job JOB DEV: runs one job file, prints its JSON path
fio_job() {
    DEV=$2 fio --readonly --output-format=json "$here/$1.fio" >"$T/$1.json" \
        || fail "fio $1 on $2: $(tail -5 "$T/$1.json")"
    echo "$T/$1.json"
}
# cpu_ticks: the guest's user, system, idle+iowait, softirq ticks (/proc/stat)
cpu_ticks() { awk '$1 == "cpu" { print $2 + $3, $4, $5 + $6, $8 }' /proc/stat; }
# profiled NAME JOB DEV: fio_job; with CORA_FIO_PERF and a ublk server process running, the job
# first runs twice more to see where the time goes: under `perf stat --per-thread` (with the
# guest's CPU split) and under `strace -c -f` (syscalls). Sampling (`perf record`) is no use
# here: under TCG its samples land in the idle task, and `-p` fails on the server ("cannot
# open maps"). The measured run comes last, unobserved.
profiled() {
    pids=$(pgrep -d, -x cora-driver || pgrep -d, -x rublk || true)
    if [ -n "${CORA_FIO_PERF:-}" ] && [ -n "$pids" ]; then
        P=$CORA_FIO_PERF/$1.$2
        mkdir -p "$CORA_FIO_PERF"
        perf stat --per-thread -e task-clock -o "$P.threads" -p "$pids" &
        st=$!
        c0=$(cpu_ticks)
        fio_job "$2" "$3" >/dev/null
        c1=$(cpu_ticks)
        kill -INT "$st" 2>/dev/null || true; wait "$st" || true
        echo "$c0 $c1" | awk '{ u = $5 - $1; s = $6 - $2; i = $7 - $3; q = $8 - $4; t = u + s + i + q
            printf "user %.0f%% system %.0f%% softirq %.0f%% idle %.0f%%\n", 100*u/t, 100*s/t, 100*q/t, 100*i/t }' \
            >"$P.cpu"
        strace -c -f -p "$pids" -o "$P.syscalls" &
        st=$!
        fio_job "$2" "$3" >/dev/null
        kill -INT "$st" 2>/dev/null || true; wait "$st" || true
    fi
    fio_job "$2" "$3"
}
# run NAME STATE DEV [FRESH]: the three jobs; FRESH (cold) is a command run before each job
# to start from an empty cache again, printing the device to use.
run() {
    name=$1 state=$2 dev=$3 fresh=${4:-}
    b0=$(lo_bytes)
    [ -z "$fresh" ] || dev=$($fresh)
    job=fio_job
    [ "$state" != warm ] || job="profiled $name"
    a=$($job randread-4k-qd32 "$dev")
    [ -z "$fresh" ] || dev=$($fresh)
    b=$(fio_job randread-4k-psync-qd1 "$dev")
    [ -z "$fresh" ] || dev=$($fresh)
    c=$($job seqread-1m-qd8 "$dev")
    iops=$(jq '.jobs[0].read.iops | floor' "$a")
    lat=$(jq '.jobs[0].read.clat_ns.mean / 1000 | floor' "$b")
    p99=$(jq '.jobs[0].read.clat_ns.percentile["99.000000"] / 1000 | floor' "$b")
    bw=$(jq '.jobs[0].read.bw_bytes / 1000000 | floor' "$c")
    result fio "$name" "$state" "$iops" "$bw" "$lat" "$p99" $(($(lo_bytes) - b0))
}

# --- the image, cold: whole-tree read of the mounted fs, then the same warm
mkdir -p "$T/mnt"
DEV=$(add_image "$F/cache-tree" --queues 2)
SIZE=$(blockdev --getsize64 "$DEV")
result info image_bytes "$SIZE"
result info kernel "$(uname -r)"
result info cpus "$(nproc)"
result info fio_runtime_s "$FIO_RUNTIME"
result info user_copy "$("$D" list | grep -q USER_COPY && echo yes || echo no)"
result info data_mode "$("$D" features | sed -n 's/^data mode: //p')"
# Zero copy for the reference loop server and a user-copy CORA row where the kernel has it.
zc=
"$D" features | grep -q AUTO_BUF_REG && zc=-z
result info rublk_loop_zero_copy "$([ -n "$zc" ] && echo yes || echo no)"
# The jobs read the whole device.
export FIO_SIZE=$((SIZE / 1048576 * 1048576))
tree_read() { # tree_read STATE
    sync; echo 3 >/proc/sys/vm/drop_caches
    b0=$(lo_bytes) t0=$(now)
    unshare -m sh -c "mount -t erofs -o ro '$DEV' '$T/mnt' && cd '$T/mnt' && tar cf /dev/zero ." \
        || fail "tree read ($1) failed"
    t1=$(now)
    result tree "$1" "$(awk "BEGIN { printf \"%.2f\", $t1 - $t0 }")" $(($(lo_bytes) - b0))
}
if [ -z "${CORA_FIO_SKIP_COLD:-}" ]; then
    tree_read cold
    tree_read warm
fi
result info tree_bytes "$(unshare -m sh -c "mount -t erofs -o ro '$DEV' '$T/mnt' && du -sb --apparent-size '$T/mnt' | cut -f1")"
del "$DEV"
rm -rf "$F/cache-tree"

# --- fio on the image, cold: each job starts from an empty cache and a new device
del_all() {
    for c in /sys/class/ublk-char/ublkc*; do
        [ -e "$c" ] && del "/dev/ublkb${c##*ublkc}"
    done
    return 0
}
fresh_cold() { # runs in a subshell ($(...)): keeps no state, deletes what the last one made
    del_all >&2
    rm -rf "$F/cache-cold"
    add_image "$F/cache-cold" --queues 2
}
[ -n "${CORA_FIO_SKIP_COLD:-}" ] || run cora cold "" fresh_cold
del_all
rm -rf "$F/cache-cold"

# --- fully cached: read the whole device once (fills the cache; also the flat raw image)
DEV=$(add_image "$F/cache" --queues 2)
b0=$(lo_bytes) t0=$(now)
dd if="$DEV" of="$F/raw.img" bs=1M iflag=direct status=none || fail "reading $DEV"
t1=$(now)
result tree fill "$(awk "BEGIN { printf \"%.2f\", $t1 - $t0 }")" $(($(lo_bytes) - b0))
del "$DEV"

variants="cora=--queues 2
cora-q1=--queues 1
cora-copy=--queues 2 --no-lend"
[ -n "$zc" ] && variants="$variants
cora-usercopy=--queues 2 --data-mode user-copy"
printf '%s\n' "${CORA_VARIANTS:-$variants}" | while IFS= read -r v; do
    [ -n "$v" ] || continue
    # shellcheck disable=SC2086
    DEV=$(add_image "$F/cache" ${v#*=})
    run "${v%%=*}" warm "$DEV"
    del "$DEV"
done

# --- the same cache through the FUSE transport: FUSE vs ublk in one boot (fio reads the image
# file on the FUSE mount with O_DIRECT, as it reads /dev/ublkbN)
if [ -z "${CORA_FIO_SKIP_FUSE:-}" ]; then
    IMG=$("$D" add --transport fuse --fuse-dir "$T/fuse" --image "$REF" --insecure "$H" \
        --cache "$F/cache" --daemon --log "$T/srv.log") || fail "FUSE add: $(tail -5 "$T/srv.log")"
    run cora-fuse warm "$IMG"
    for id in $("$D" list --json --fuse-dir "$T/fuse" | jq -r '.[].id'); do
        "$D" del "$id" --fuse-dir "$T/fuse" || fail "FUSE del $id"
    done
fi

# --- references over the same flat image
LOOP=$(losetup --direct-io=on --read-only -f --show "$F/raw.img")
result info loop_dio "$(cat "/sys/block/${LOOP#/dev/}/loop/dio")"
run loop warm "$LOOP"
losetup -d "$LOOP"

new_ublk() { # run a command that creates a ublk device; print the new /dev/ublkbN
    before=$(ls /dev/ublkb* 2>/dev/null || true)
    "$@" >"$T/add.out" 2>&1 || fail "$* failed: $(cat "$T/add.out")"
    for _ in $(seq 100); do
        for d in /dev/ublkb*; do
            [ -b "$d" ] || continue
            echo "$before" | grep -qx "$d" || { echo "$d"; return; }
        done
        sleep 0.1
    done
    fail "no new device after $*"
}
DEV=$(new_ublk rublk add loop -f "$F/raw.img" -o --quiet $zc)
run rublk-loop warm "$DEV"
rublk del -n "${DEV#/dev/ublkb}"
DEV=$(new_ublk rublk add null --quiet)
run rublk-null warm "$DEV"
rublk del -n "${DEV#/dev/ublkb}"
log "done: $OUT"

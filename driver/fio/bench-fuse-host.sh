#!/bin/sh
# The FUSE transport measured natively on the host (no VM), every figure against a reference
# measured in the same run. Run by `cargo xtask bench fuse` (which converts the image first,
# prepare-image.sh); by hand:
#   sh driver/fio/bench-fuse-host.sh   (after prepare-image.sh target/bench/fio 512)
# Steps, over one CORA image (real files, fio:cora) in a docker-registry on loopback:
#   1. cold: a new FUSE device with an empty cache, the erofs on its image file mounted, every
#      file read (`tar cf /dev/zero .`); then the same image as a plain file on this disk
#      (every byte of it made local by reading the FUSE file once);
#   2. the raw image file, fully cached: the fio jobs of this directory (direct I/O: no page
#      cache) on the FUSE file, on the plain file, and on a loop device over the plain file;
#   3. the mounted file system, fully cached, page cache dropped before each run: a whole-tree
#      read and 4 KiB random reads over its files (fio, psync, 4 jobs), erofs file-backed on
#      the FUSE file vs erofs file-backed on the plain file.
# Env: CORA_FIO_REGISTRY (docker-registry storage with fio:cora; default target/bench/fio/registry),
#      CORA_FUSE_RESULTS (results file; default target/bench/fuse/results.txt),
#      FIO_RUNTIME (s, default 10), CORA_FUSE_WORK (scratch dir: chunk cache, plain image file;
#      default a tmpfs mounted for the run, so that both sides read from memory and the figures
#      are the transports', not the disk's: O_DIRECT on a plain file on disk would measure the
#      disk, while the FUSE server reads its cache files through the page cache).
# Results, one line each, in the format of bench-image-vm.sh (parsed by xtask/src/fio_bench.rs):
# `fio NAME warm IOPS_4K_QD32 MBPS_1M LAT_AVG_US LAT_P99_US 0`, `tree NAME SECONDS BYTES_FETCHED`,
# `fsrand NAME IOPS`, `info KEY VALUE`.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
R=$(cd "$here/../.." && pwd)
D=${CORA_DRIVER:-$R/target/release/cora-driver}
REG_SRC=${CORA_FIO_REGISTRY:-$R/target/bench/fio/registry}
OUT=${CORA_FUSE_RESULTS:-$R/target/bench/fuse/results.txt}
export FIO_RUNTIME=${FIO_RUNTIME:-10}
fail() { echo "bench-fuse: $*" >&2; exit 1; }
log() { echo "bench-fuse: $*" >&2; }
[ "$(id -u)" = 0 ] || fail "run as root (FUSE and erofs mounts)"
[ -x "$D" ] || fail "$D missing: cargo build --release --bins"
[ -d "$REG_SRC/docker" ] || fail "$REG_SRC has no registry data (cargo xtask bench fuse makes it)"
[ -e /dev/fuse ] || fail "/dev/fuse missing"
mkdir -p "$(dirname "$OUT")" /var/tmp
TMPFS=
if [ -n "${CORA_FUSE_WORK:-}" ]; then
    T=$CORA_FUSE_WORK
    mkdir -p "$T"
else
    T=$(mktemp -d /var/tmp/bench-fuse.XXXXXX)
    mount -t tmpfs -o size=4g tmpfs "$T" || fail "mounting a tmpfs on $T"
    TMPFS=$T
fi
REG=
cleanup() {
    set +e
    for m in "$T/mnt-fuse" "$T/mnt-file"; do mountpoint -q "$m" && umount "$m"; done
    for id in $("$D" list --json --fuse-dir "$T/fuse" 2>/dev/null | jq -r '.[].id'); do
        "$D" del "$id" --fuse-dir "$T/fuse" >/dev/null 2>&1
    done
    [ -n "$REG" ] && kill "$REG" 2>/dev/null
    [ -n "${LOOP:-}" ] && losetup -d "$LOOP" 2>/dev/null
    if [ -n "$TMPFS" ]; then umount "$TMPFS" && rmdir "$TMPFS"; fi
    return 0
}
trap cleanup EXIT
: >"$OUT"
result() { echo "$*" >>"$OUT"; log "$*"; }
# Bytes the loopback interface carried (registry responses plus requests).
lo_bytes() { awk '$1 == "lo:" { print $10 }' /proc/net/dev; }
now() { date +%s.%N; }
secs() { awk "BEGIN { printf \"%.3f\", $2 - $1 }"; }
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }

# The registry serves the prepared storage as it is (it only reads it).
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
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
    rootdirectory: $REG_SRC
http:
  addr: $H
YML
docker-registry serve "$T/reg.yml" >"$T/reg.log" 2>&1 &
REG=$!
i=0
until curl -sf "http://$H/v2/" >/dev/null; do
    i=$((i + 1)); [ $i -lt 300 ] || fail "registry did not start: $(cat "$T/reg.log")"; sleep 0.1
done

add_fuse() { # add_fuse CACHE: a FUSE device of the image; prints its image file
    "$D" add --transport fuse --fuse-dir "$T/fuse" --image "$REF" --insecure "$H" \
        --cache "$1" --daemon --log "$T/srv.log" || fail "cora-driver add: $(tail -5 "$T/srv.log")"
}
mount_ro() { mkdir -p "$2" && mount -t erofs -o ro "$1" "$2" || fail "mount $1"; }

result info kernel "$(uname -r)"
result info cpu "$(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)"
result info cpus "$(nproc)"
result info fio_runtime_s "$FIO_RUNTIME"
result info fuse_over_io_uring "not used: requests go over read/writev on /dev/fuse"
result info work_fs "$(df -T "$T" | awk 'NR == 2 { print $2 }')"

# --- 1. cold tree read through FUSE; then the whole image made local (the plain file)
IMG=$(add_fuse "$T/cache")
result info image_bytes "$(stat -c %s "$IMG")"
drop_caches
b0=$(lo_bytes) t0=$(now)
mount_ro "$IMG" "$T/mnt-fuse"
(cd "$T/mnt-fuse" && tar cf /dev/zero .) || fail "cold tree read"
t1=$(now)
result tree fuse-cold "$(secs "$t0" "$t1")" $(($(lo_bytes) - b0))
result info tree_bytes "$(du -sb --apparent-size "$T/mnt-fuse" | cut -f1)"
umount "$T/mnt-fuse"
b0=$(lo_bytes) t0=$(now)
dd if="$IMG" of="$T/raw.img" bs=1M status=none || fail "reading $IMG"
t1=$(now)
result tree fuse-fill "$(secs "$t0" "$t1")" $(($(lo_bytes) - b0))
cmp "$IMG" "$T/raw.img" || fail "the FUSE file and its copy differ"

# --- 2. the raw image, fully cached, direct I/O
SIZE=$(stat -c %s "$T/raw.img")
export FIO_SIZE=$((SIZE / 1048576 * 1048576))
fio_job() { # fio_job JOB FILE: runs one job, prints its JSON path
    drop_caches
    DEV=$2 fio --readonly --output-format=json "$here/$1.fio" >"$T/$1.json" \
        || fail "fio $1 on $2: $(tail -5 "$T/$1.json")"
    echo "$T/$1.json"
}
raw() { # raw NAME FILE
    a=$(fio_job randread-4k-qd32 "$2")
    b=$(fio_job randread-4k-psync-qd1 "$2")
    c=$(fio_job seqread-1m-qd8 "$2")
    result fio "$1" warm "$(jq '.jobs[0].read.iops | floor' "$a")" \
        "$(jq '.jobs[0].read.bw_bytes / 1000000 | floor' "$c")" \
        "$(jq '.jobs[0].read.clat_ns.mean / 1000 | floor' "$b")" \
        "$(jq '.jobs[0].read.clat_ns.percentile["99.000000"] / 1000 | floor' "$b")" 0
}
raw cora-fuse "$IMG"
raw file "$T/raw.img"
LOOP=$(losetup --direct-io=on --read-only -f --show "$T/raw.img")
raw loop "$LOOP"
losetup -d "$LOOP"
LOOP=

# --- 3. the mounted file system, fully cached, buffered reads from a dropped page cache
mount_ro "$IMG" "$T/mnt-fuse"
mount_ro "$T/raw.img" "$T/mnt-file"
for m in fuse file; do
    drop_caches
    t0=$(now)
    (cd "$T/mnt-$m" && tar cf /dev/zero .) || fail "tree read on $m"
    t1=$(now)
    result tree "$m-warm" "$(secs "$t0" "$t1")" 0
done
for m in fuse file; do
    drop_caches
    fio --readonly --output-format=json --name=fsrand --opendir="$T/mnt-$m" --rw=randread \
        --bs=4k --ioengine=psync --numjobs=4 --group_reporting --time_based \
        --runtime="$FIO_RUNTIME" --file_service_type=random --output="$T/fsrand-$m.json" \
        >/dev/null || fail "fio over the files of $m: $(tail -5 "$T/fsrand-$m.json")"
    result fsrand "$m" "$(jq '.jobs[0].read.iops | floor' "$T/fsrand-$m.json")"
done
log "done: $OUT"

#!/bin/sh
# cora-driver on a real ublk kernel: an erofs image of a real tree served read-only, every file
# checked by sha256, fio verification, writes refused, EIO on a failing source, misses not
# blocking hits, kill -9 + recover while a mounted filesystem is being read, del cleans up;
# each data mode (buffered, user copy, auto buffer registration) up to the kernel's best.
# Mounts happen in their own mount namespace (unshare -m): never in the server's.
set -eu
fail() { echo "20-ublk: FAIL: $*" >&2; exit 1; }
log() { echo "20-ublk: [$(cut -d" " -f1 /proc/uptime)] $*"; }

D=${CORA_DRIVER:-${CORA_REPO:-$PWD}/target/release/cora-driver}
[ -x "$D" ] || fail "$D missing: run cargo build --release --bins first"
T=${CORA_VM_TEST_TMP:-$(mktemp -d /tmp/20-ublk.XXXXXX)}
now_ms() { echo $(($(date +%s%N) / 1000000)); }
# wait_for SECONDS CMD...: poll CMD until it succeeds or the deadline passes.
wait_for() {
    end=$(($(date +%s) + $1)); shift
    until "$@"; do
        [ "$(date +%s)" -lt "$end" ] || return 1
        sleep 0.1
    done
}
field() { # field ID COLUMN: a column of `cora-driver list` for device ID
    "$D" list | awk -v id="$1" -v c="$2" '$1 == id { print $c }'
}
dev_id() { echo "${1#/dev/ublkb}"; }
cleanup() {
    for c in /sys/class/ublk-char/ublkc*; do
        [ -e "$c" ] && "$D" del "${c##*ublkc}" 2>/dev/null || true
    done
}
trap cleanup EXIT

"$D" features | grep -q USER_RECOVERY || fail "kernel lacks USER_RECOVERY"
mode_of() { "$D" list --json | jq -r ".[] | select(.id == $1) | .data_mode"; }
BEST=$("$D" features | sed -n 's/^data mode: //p')
# What the driver must pick: the most direct mode the kernel has every flag of.
if "$D" features | grep -q AUTO_BUF_REG; then want=auto-buf-reg; else want=user-copy; fi
[ "$BEST" = "$want" ] || fail "features say data mode '$BEST', want $want: $("$D" features)"
log "kernel $(uname -r): data mode $BEST"

# --- a real tree, its manifest and an erofs image of it
# Read straight from the host's read-only root (no copy: 9p under TCG is slow).
SRC=${CORA_TEST_TREE:-/usr/include}
(cd "$SRC" && find . -type f -print0 | sort -z | xargs -0 sha256sum) >"$T/manifest"
nfiles=$(wc -l <"$T/manifest")
[ "$nfiles" -gt 1000 ] || fail "tree too small ($nfiles files)"
mkfs.erofs "$T/img.erofs" "$SRC" >"$T/mkfs.out" 2>&1 || fail "mkfs.erofs"
log "image $(stat -c %s "$T/img.erofs") bytes, $nfiles files"

# --- add: one line on stdout, the device exists, read-only, listed by us and by rublk
out=$("$D" add --file "$T/img.erofs" --queues 2 --depth 64 --daemon --log "$T/srv.log")
[ "$(echo "$out" | wc -l)" -eq 1 ] || fail "add printed more than one line: $out"
DEV=$out
ID=$(dev_id "$DEV")
[ -b "$DEV" ] || fail "$DEV is not a block device"
[ "$(blockdev --getro "$DEV")" = 1 ] || fail "$DEV is not read-only"
[ "$(blockdev --getsize64 "$DEV")" = "$(stat -c %s "$T/img.erofs")" ] || fail "size differs"
[ "$(field "$ID" 2)" = LIVE ] || fail "state is not LIVE: $("$D" list)"
"$D" list | grep -q "USER_COPY" || fail "USER_COPY not in use: $("$D" list)"
"$D" list --json | jq -e ".[] | select(.id == $ID) | .recipe.kind == \"file\"" \
    >/dev/null || fail "list --json lacks the recipe"
rublk list >"$T/rublk.out" 2>&1; cat "$T/rublk.out"
grep -q "dev id $ID: nr_hw_queues 2 queue_depth 64" "$T/rublk.out" \
    && grep -q '"name":"cora"' "$T/rublk.out" || fail "rublk list does not show device $ID"
PID=$(field "$ID" 3)
kill -0 "$PID" || fail "server pid $PID not alive"

# --- raw device equals the image, every file of the mounted filesystem matches the tree
[ "$(sha256sum <"$DEV")" = "$(sha256sum <"$T/img.erofs")" ] || fail "raw device differs from image"
mkdir -p "$T/mnt"
unshare -m sh -c "mount -t erofs -o ro '$DEV' '$T/mnt' && cd '$T/mnt' && sha256sum --quiet -c '$T/manifest'" \
    || fail "files on the mounted device differ from the tree"
log "all $nfiles files match"

log "checking writes"
# --- writes are refused, the server survives them
if dd if=/dev/zero of="$DEV" bs=4k count=1 oflag=direct 2>/dev/null; then fail "write succeeded"; fi
if blkdiscard "$DEV" 2>/dev/null; then fail "discard succeeded"; fi
kill -0 "$PID" || fail "server died after writes"
[ "$(sha256sum <"$DEV")" = "$(sha256sum <"$T/img.erofs")" ] || fail "device changed after writes"

log "kill -9 / recover"
# --- kill -9 the server while a mounted filesystem is read; recover; reads carry on
sync; echo 3 >/proc/sys/vm/drop_caches
unshare -m sh -c "mount -t erofs -o ro '$DEV' '$T/mnt' && cd '$T/mnt' && sha256sum -c '$T/manifest'" \
    >"$T/reader.out" 2>&1 &
READER=$!
wait_for 60 sh -c "[ \$(grep -c ': OK\$' '$T/reader.out') -ge 200 ]" || fail "reader made no progress"
kill -9 "$PID"
wait_for 20 sh -c "! kill -0 $PID 2>/dev/null" || fail "server survived kill -9"
kill -0 "$READER" 2>/dev/null || fail "reader finished before the kill: make the tree bigger"
wait_for 20 sh -c "[ \"\$('$D' list | awk '\$1 == $ID { print \$2 }')\" = QUIESCED ]" \
    || fail "device not QUIESCED after kill: $("$D" list)"
before=$(grep -c ': OK$' "$T/reader.out")
out=$("$D" recover "$ID" --daemon --log "$T/srv2.log") || fail "recover failed: $(cat "$T/srv2.log")"
[ "$out" = "$DEV" ] || fail "recover printed '$out', want $DEV"
PID2=$(field "$ID" 3)
[ "$PID2" != "$PID" ] && kill -0 "$PID2" || fail "no new server after recover"
[ "$(field "$ID" 2)" = LIVE ] || fail "not LIVE after recover"
wait "$READER" || fail "reader failed across the crash: $(grep -v ': OK$' "$T/reader.out" | head)"
[ "$(grep -c ': OK$' "$T/reader.out")" -eq "$nfiles" ] || fail "reader checked too few files"
log "kill -9 after $before files, recovered by pid $PID2, all $nfiles files read identically"

log "del"
# --- del: the device and its server are gone
"$D" del "$ID" || fail "del $ID"
wait_for 20 sh -c "! kill -0 $PID2 2>/dev/null" || fail "server $PID2 still running after del"
[ ! -e "$DEV" ] && [ ! -e "/dev/ublkc$ID" ] || fail "device nodes left after del"
"$D" list | awk 'NR > 1' | grep -q . && fail "devices left: $("$D" list)"

log "fio"
# --- fio read verification on the raw device (a file laid down by fio with crc32c headers)
fio --name=lay --filename="$T/fio.img" --rw=write --bs=4k --size=128m --verify=crc32c --verify_state_save=0 \
    --do_verify=0 >/dev/null || fail "fio layout"
DEV=$("$D" add --file "$T/fio.img" --daemon --log "$T/srv3.log")
ID=$(dev_id "$DEV")
fio --name=verify --filename="$DEV" --readonly --direct=1 --ioengine=io_uring --iodepth=32 \
    --rw=randread --bs=4k --size=128m --verify=crc32c --verify_fatal=1 >"$T/fio.out" 2>&1 \
    || fail "fio verify: $(tail -5 "$T/fio.out")"
fio --name=verify-big --filename="$DEV" --readonly --direct=1 --ioengine=io_uring --iodepth=8 \
    --rw=read --bs=1m --verify=crc32c --verify_interval=4k --size=128m --verify_fatal=1 \
    >"$T/fio2.out" 2>&1 || fail "fio verify 1m: $(tail -5 "$T/fio2.out")"
log "fio verified 128 MiB with 4k random and 1m sequential reads"
[ "$(mode_of "$ID")" = "$BEST" ] || fail "device runs in $(mode_of "$ID"), best is $BEST"
"$D" del "$ID"

# --- every data mode up to the kernel's best: same bytes; requests go the mode's way
rank() { case $1 in buffered) echo 0 ;; user-copy) echo 1 ;; auto-buf-reg) echo 2 ;; *) fail "mode $1" ;; esac; }
for mode in buffered user-copy auto-buf-reg; do
    want=$mode
    [ "$(rank "$mode")" -le "$(rank "$BEST")" ] || want=$BEST
    DEV=$("$D" add --file "$T/fio.img" --data-mode "$mode" --daemon --log "$T/srv-$mode.log" \
        --stats-file "$T/stats-$mode.json")
    ID=$(dev_id "$DEV")
    PID=$(field "$ID" 3)
    [ "$(mode_of "$ID")" = "$want" ] || fail "--data-mode $mode runs in $(mode_of "$ID"), want $want"
    fio --name=verify --filename="$DEV" --readonly --direct=1 --ioengine=io_uring --iodepth=32 \
        --rw=randread --bs=4k --size=32m --verify=crc32c --verify_fatal=1 >"$T/fio.out" 2>&1 \
        || fail "fio verify ($mode): $(tail -5 "$T/fio.out")"
    [ "$(sha256sum <"$DEV")" = "$(sha256sum <"$T/fio.img")" ] || fail "device differs from image ($mode)"
    "$D" del "$ID"
    # The server writes its stats once more as it exits.
    wait_for 20 sh -c "! kill -0 $PID 2>/dev/null" || fail "server $PID still running after del"
    reg=$(jq .ublk.registered "$T/stats-$mode.json") && served=$(jq '.ublk | .lent + .copied' "$T/stats-$mode.json") \
        || fail "no ublk counters in the stats: $(cat "$T/stats-$mode.json")"
    case $want in
    auto-buf-reg) [ "$reg" -gt 8000 ] || fail "auto-buf-reg served only $reg requests by io_uring into registered pages" ;;
    *) [ "$reg" -eq 0 ] && [ "$served" -gt 8000 ] || fail "$want: registered $reg, copied/lent $served" ;;
    esac
    log "data mode $want: verified; requests registered $reg, copied or lent $served"
done
DEV=$("$D" add --file "$T/fio.img" --daemon --log "$T/srv3b.log")
ID=$(dev_id "$DEV")

log "EIO"
# --- a failing source gives EIO promptly and the server keeps serving the rest
truncate -s 64m "$T/fio.img"
t0=$(now_ms)
if dd if="$DEV" of=/dev/null bs=4k skip=$((100 * 256)) count=1 iflag=direct 2>"$T/dd.err"; then
    fail "read past the truncated source succeeded"
fi
grep -q "Input/output error" "$T/dd.err" || fail "expected EIO, got: $(cat "$T/dd.err")"
[ $(($(now_ms) - t0)) -lt 5000 ] || fail "EIO took $(($(now_ms) - t0)) ms"
dd if="$DEV" of=/dev/null bs=4k count=16 iflag=direct 2>/dev/null || fail "reads after EIO fail"
"$D" del "$ID"

log "misses"
# --- misses run off the queue thread: a hot read completes while a slow miss is in flight
dd if=/dev/urandom of="$T/cold.img" bs=1M count=64 status=none
COLD_DEV=${CORA_REPO:-$PWD}/target/release/cora-cold-device
"$COLD_DEV" "$T/cold.img" 3000 1048576 >"$T/cold.dev" 2>"$T/srv4.log" &
COLD_SRV=$!
wait_for 30 sh -c "[ -s '$T/cold.dev' ]" || fail "cold device never ready: $(cat "$T/srv4.log")"
DEV=$(cat "$T/cold.dev")
ID=$(dev_id "$DEV")
dd if="$DEV" of=/dev/null bs=64k count=1 iflag=direct 2>/dev/null # warms chunk 0 (3 s)
dd if="$DEV" of="$T/cold.out" bs=64k count=1 skip=512 iflag=direct 2>/dev/null &
COLD=$!
# Wait until the cold read is in flight in the (single) queue, then time a hot read on it.
wait_for 10 sh -c "[ \$(awk '{ print \$1 }' /sys/block/ublkb$ID/inflight) -ge 1 ]" \
    || fail "cold read never in flight"
t0=$(now_ms)
dd if="$DEV" of="$T/hot.out" bs=64k count=1 skip=1 iflag=direct 2>/dev/null || fail "hot read"
hot=$(($(now_ms) - t0))
kill -0 "$COLD" 2>/dev/null || fail "the cold read finished before the hot one was timed"
[ "$hot" -lt 1500 ] || fail "hot read took $hot ms while a miss was in flight"
wait "$COLD" || fail "cold read failed"
dd if="$T/cold.img" of="$T/cold.ref" bs=64k count=1 skip=512 status=none
cmp "$T/cold.out" "$T/cold.ref" || fail "cold read returned wrong data"
log "hot read took $hot ms while a 3000 ms miss was in flight"
"$D" del "$ID"
wait "$COLD_SRV" || fail "cold device server exited with $?: $(cat "$T/srv4.log")"

log "foreground server, SIGTERM; del of a crashed device"
# Foreground: one line on stdout once ready, SIGTERM stops and deletes the device.
"$D" add --file "$T/cold.img" >"$T/fg.out" 2>"$T/fg.err" &
FG=$!
wait_for 30 sh -c "[ -s '$T/fg.out' ]" || fail "foreground add printed nothing: $(cat "$T/fg.err")"
DEV=$(cat "$T/fg.out")
[ -b "$DEV" ] || fail "foreground add printed '$DEV'"
cmp -n 4096 "$DEV" "$T/cold.img" || fail "foreground device data"
kill -TERM "$FG"
wait "$FG" || fail "foreground server exited with $?: $(cat "$T/fg.err")"
[ ! -e "$DEV" ] || fail "$DEV left after SIGTERM"
# A device whose server was killed (QUIESCED, recoverable) can still be deleted.
DEV=$("$D" add --file "$T/cold.img" --daemon --log "$T/srv5.log")
ID=$(dev_id "$DEV")
PID=$(field "$ID" 3)
kill -9 "$PID"
wait_for 20 sh -c "[ \"\$('$D' list | awk '\$1 == $ID { print \$2 }')\" = QUIESCED ]" \
    || fail "device not QUIESCED after kill: $("$D" list)"
"$D" del "$ID" || fail "del of a crashed device"
[ ! -e "$DEV" ] && [ ! -e "/dev/ublkc$ID" ] || fail "crashed device left after del"

[ -z "$(ls /dev/ublk[bc]* 2>/dev/null)" ] || fail "left behind: $(ls /dev/ublk[bc]*)"
log "ok"

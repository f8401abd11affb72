#!/bin/sh
# A CORA image served lazily: a real Debian tree converted with `cora convert`, pushed to a
# docker-registry on the guest's loopback, attached with `cora-driver add --image`, mounted
# read-only (own mount namespace), every file checked by sha256; then the registry is stopped
# mid-test: cached files keep reading, uncached ones fail with EIO within a bound; then, with the
# registry back, kill -9 of the server while the mounted fs is read in a loop, `recover`, and
# the reads carry on (same mount) with identical sha256 results; writes fail cleanly; del.
set -eu
fail() { echo "30-cora-image: FAIL: $*" >&2; exit 1; }
log() { echo "30-cora-image: [$(cut -d" " -f1 /proc/uptime)] $*"; }
# wait_for SECONDS CMD...: poll CMD until it succeeds or the deadline passes.
wait_for() {
    end=$(($(date +%s) + $1)); shift
    until "$@"; do
        [ "$(date +%s)" -lt "$end" ] || return 1
        sleep 0.1
    done
}
R=${CORA_REPO:-$PWD}
D=$R/target/release/cora-driver
C=$R/target/release/cora
[ -x "$D" ] && [ -x "$C" ] || fail "build first: cargo build --release --bins"
T=${CORA_VM_TEST_TMP:-$(mktemp -d /tmp/30-cora.XXXXXX)}
TREE=$R/target/cora-fixtures/trees/small
[ -d "$TREE" ] || fail "$TREE missing (made by the host tests: cargo test -p cora-tests)"
cleanup() {
    for c in /sys/class/ublk-char/ublkc*; do
        [ -e "$c" ] && "$D" del "${c##*ublkc}" 2>/dev/null || true
    done
    [ -n "${REG:-}" ] && kill "$REG" 2>/dev/null || true
}
trap cleanup EXIT

# --- a registry on loopback, data on the guest tmpfs
PORT=5123
cat >"$T/reg.yml" <<YML
version: 0.1
storage:
  filesystem:
    rootdirectory: $T/registry
http:
  addr: 127.0.0.1:$PORT
YML
start_registry() {
    docker-registry serve "$T/reg.yml" >>"$T/reg.log" 2>&1 &
    REG=$!
    wait_for 20 curl -sf "http://127.0.0.1:$PORT/v2/" >/dev/null \
        || fail "registry did not start: $(cat "$T/reg.log")"
}
start_registry
H=127.0.0.1:$PORT

# --- convert the tree (one layer) straight into the registry
"$C" convert --insecure "$H" "dir:$TREE" "$H/small:cora" >"$T/convert.out" 2>&1 \
    || fail "convert: $(cat "$T/convert.out")"
log "$(head -1 "$T/convert.out")"
(cd "$TREE" && find . -type f -print0 | sort -z | xargs -0 sha256sum) >"$T/manifest"
nfiles=$(wc -l <"$T/manifest")
[ "$nfiles" -gt 100 ] || fail "tree too small ($nfiles files)"

# --- attach lazily; no miss window, so that what the first half reads leaves the rest uncached
DEV=$("$D" add --image "$H/small:cora" --insecure "$H" --cache "$T/cache" --queues 2 --miss-window 0 \
    --daemon --log "$T/srv.log" --stats-file "$T/stats.json") \
    || fail "add: $(cat "$T/srv.log")"
ID=${DEV#/dev/ublkb}
[ -b "$DEV" ] || fail "$DEV is not a block device"
"$D" list --json | jq -e ".[] | select(.id == $ID) | .recipe.kind == \"image\"" >/dev/null \
    || fail "list --json lacks the image recipe"
rublk list 2>&1 | grep -q "$ID" || fail "rublk list does not show $ID"

# Half the files first (they end up cached), then the rest after the registry is gone.
head -n $((nfiles / 2)) "$T/manifest" >"$T/first"
# Five uncached files: each failing read costs the client's retry budget (5 attempts with
# 0.2 s doubling backoff against a refused port, about 3 s), and the kernel retries a failed
# readahead page by page.
tail -n +$((nfiles / 2 + 1)) "$T/manifest" | sort -k2 | tail -n 5 >"$T/rest"
mkdir -p "$T/mnt"
unshare -m sh -c "mount -t erofs -o ro '$DEV' '$T/mnt' && cd '$T/mnt' && sha256sum --quiet -c '$T/first'" \
    || fail "files on the lazily served device differ from the tree"
log "first half ($((nfiles / 2)) files) matches; cache: $("$C" cache --dir "$T/cache" stats | tr '\n' ' ')"
# With auto buffer registration, misses too are read from the cache's files into the request
# once fetched (the source stores a chunk before it wakes its readers): no user copy. The
# first half was read cold; the stats file is rewritten every second.
if [ "$("$D" list --json | jq -r ".[] | select(.id == $ID) | .data_mode")" = auto-buf-reg ]; then
    wait_for 10 sh -c "r=\$(jq .ublk.missed_registered '$T/stats.json') && m=\$(jq .ublk.missed '$T/stats.json') \
        && [ \"\$r\" -gt 0 ] && [ \$((r * 10)) -ge \$((m * 9)) ]" \
        || fail "misses not read into registered pages once fetched: $(cat "$T/stats.json")"
    log "cold misses read into registered pages: $(jq -c .ublk "$T/stats.json")"
fi

# --- the registry dies mid-test
kill "$REG"; wait "$REG" 2>/dev/null || true; REG=
sync; echo 3 >/proc/sys/vm/drop_caches
start=$(date +%s)
if unshare -m sh -c "mount -t erofs -o ro '$DEV' '$T/mnt' && cd '$T/mnt' && sha256sum --quiet -c '$T/rest'" \
    >"$T/rest.out" 2>&1; then
    fail "uncached files read with the registry down"
fi
took=$(($(date +%s) - start))
grep -qi "input/output error\|FAILED" "$T/rest.out" || fail "no I/O error reported: $(tail -3 "$T/rest.out")"
[ "$took" -lt 120 ] || fail "failing reads took ${took}s"
log "uncached reads failed after ${took}s (EIO)"
# Cached data keeps working.
sync; echo 3 >/proc/sys/vm/drop_caches
unshare -m sh -c "mount -t erofs -o ro '$DEV' '$T/mnt' && cd '$T/mnt' && sha256sum --quiet -c '$T/first'" \
    || fail "cached files stopped reading with the registry down"
PID=$("$D" list | awk -v id="$ID" '$1 == id { print $3 }')
kill -0 "$PID" || fail "server died"
# Cached reads take the data mode's way: with auto buffer registration, io_uring reads of the
# cache's chunk files into the request (the stats file is rewritten every second).
mode=$("$D" list --json | jq -r ".[] | select(.id == $ID) | .data_mode")
if [ "$mode" = auto-buf-reg ]; then
    wait_for 10 sh -c "[ \"\$(jq .ublk.registered '$T/stats.json')\" -gt 100 ]" \
        || fail "cached reads not served into registered pages: $(cat "$T/stats.json")"
else
    wait_for 10 sh -c "[ \"\$(jq '.ublk | .lent + .copied' '$T/stats.json')\" -gt 100 ]" \
        || fail "no cached reads counted: $(cat "$T/stats.json")"
    [ "$(jq '.ublk.registered + .ublk.missed_registered' "$T/stats.json")" = 0 ] \
        || fail "$mode device used registered pages"
fi
log "data mode $mode: requests $(jq -c .ublk "$T/stats.json")"

# --- registry back; kill -9 the server while the mounted fs is read in a loop; recover
start_registry
state() { "$D" list | awk -v id="$ID" '$1 == id { print $2 }'; }
sync; echo 3 >/proc/sys/vm/drop_caches
# Two passes over every file, page cache dropped between them so each pass reads the device;
# the first pass fetches the files not read yet (lazily, through the registry).
unshare -m sh -c "mount -t erofs -o ro '$DEV' '$T/mnt' && cd '$T/mnt' && for i in 1 2; do
    sha256sum -c '$T/manifest' || exit 1; echo 3 >/proc/sys/vm/drop_caches; done" >"$T/reader.out" 2>&1 &
READER=$!
wait_for 120 sh -c "[ \$(grep -c ': OK\$' '$T/reader.out') -ge $((nfiles / 4)) ]" \
    || fail "reader made no progress: $(grep -v ': OK$' "$T/reader.out" | head -3)"
kill -9 "$PID"
wait_for 20 sh -c "! kill -0 $PID 2>/dev/null" || fail "server survived kill -9"
kill -0 "$READER" 2>/dev/null || fail "reader finished before the kill"
wait_for 20 sh -c "[ \"\$('$D' list | awk '\$1 == $ID { print \$2 }')\" = QUIESCED ]" \
    || fail "device not QUIESCED after kill: $("$D" list)"
before=$(grep -c ': OK$' "$T/reader.out")
out=$("$D" recover "$ID" --daemon --log "$T/srv2.log") || fail "recover: $(cat "$T/srv2.log")"
[ "$out" = "$DEV" ] || fail "recover printed '$out', want $DEV"
PID=$("$D" list | awk -v id="$ID" '$1 == id { print $3 }')
[ "$(state)" = LIVE ] || fail "not LIVE after recover: $("$D" list)"
"$D" list --json | jq -e ".[] | select(.id == $ID) | .recipe.kind == \"image\"" \
    >/dev/null || fail "recovered device lost its image recipe"
wait "$READER" || fail "reads failed across the crash: $(grep -v ': OK$' "$T/reader.out" | head -5)"
[ "$(grep -c ': OK$' "$T/reader.out")" -eq $((2 * nfiles)) ] || fail "reader checked too few files"
log "kill -9 after $before of $((2 * nfiles)) file reads; recovered by pid $PID; all read identically"

# --- writes to the read-only device fail promptly, the server survives them
if timeout 30 dd if=/dev/zero of="$DEV" bs=4k count=1 oflag=direct 2>"$T/dd.err"; then
    fail "write to $DEV succeeded"
fi
grep -qi "read-only\|not permitted\|input/output\|permission denied" "$T/dd.err" \
    || fail "write failed oddly: $(cat "$T/dd.err")"
if timeout 30 blkdiscard "$DEV" 2>/dev/null; then fail "discard succeeded"; fi
kill -0 "$PID" || fail "server died after writes"
log "writes refused: $(head -1 "$T/dd.err")"

# --- del leaves nothing behind
"$D" del "$ID"
[ ! -e "$DEV" ] || fail "$DEV still exists after del"
log "PASS"

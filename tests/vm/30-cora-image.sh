#!/bin/sh
# A CORA image served lazily: a real Debian tree converted with `cora convert`, pushed to a
# docker-registry on the guest's loopback, attached with `cora-driver add --image`, mounted
# read-only (own mount namespace), every file checked by sha256; then the registry is stopped
# mid-test: cached files keep reading, uncached ones fail with EIO within a bound; del cleans up.
set -eu
fail() { echo "30-cora-image: FAIL: $*" >&2; exit 1; }
log() { echo "30-cora-image: [$(cut -d" " -f1 /proc/uptime)] $*"; }
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
docker-registry serve "$T/reg.yml" >"$T/reg.log" 2>&1 &
REG=$!
i=0; until curl -sf "http://127.0.0.1:$PORT/v2/" >/dev/null; do
    i=$((i + 1)); [ $i -lt 200 ] || fail "registry did not start: $(cat "$T/reg.log")"; sleep 0.1
done
H=127.0.0.1:$PORT

# --- convert the tree (one layer) straight into the registry
"$C" convert --insecure "$H" "dir:$TREE" "$H/small:cora" >"$T/convert.out" 2>&1 \
    || fail "convert: $(cat "$T/convert.out")"
log "$(head -1 "$T/convert.out")"
(cd "$TREE" && find . -type f -print0 | sort -z | xargs -0 sha256sum) >"$T/manifest"
nfiles=$(wc -l <"$T/manifest")
[ "$nfiles" -gt 100 ] || fail "tree too small ($nfiles files)"

# --- attach lazily
DEV=$("$D" add --image "$H/small:cora" --insecure "$H" --cache "$T/cache" --queues 2 --daemon --log "$T/srv.log") \
    || fail "add: $(cat "$T/srv.log")"
ID=${DEV#/dev/ublkb}
[ -b "$DEV" ] || fail "$DEV is not a block device"
"$D" list --json | jq -e ".[] | select(.id == $ID) | .target_data.cora.recipe.kind == \"image\"" >/dev/null \
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

# --- del leaves nothing behind
"$D" del "$ID"
[ ! -e "$DEV" ] || fail "$DEV still exists after del"
log "PASS"

#!/bin/sh
# Host side of `cargo xtask bench fio`: a tree of real files (the first MB megabytes of
# /usr/lib/x86_64-linux-gnu, /usr/share and /usr/bin in name order) converted with `cora convert`
# into a docker-registry storage directory OUT/registry (repository fio:cora), which the VM
# copies into its tmpfs and serves. Skipped when OUT/registry is already there for the same MB.
# usage: prepare-image.sh OUT MB
set -eu
OUT=$1
MB=$2
here=$(cd "$(dirname "$0")" && pwd)
C=${CORA:-$here/../../target/release/cora}
fail() { echo "prepare-image: $*" >&2; exit 1; }
[ -x "$C" ] || fail "$C missing: cargo build --release --bins"
stamp="$OUT/registry/.cora-fio-$MB"
if [ -e "$stamp" ]; then
    echo "prepare-image: reusing $OUT/registry ($MB MB tree)" >&2
    exit 0
fi
rm -rf "$OUT/tree" "$OUT/registry" "$OUT/list"
mkdir -p "$OUT/tree"
# Regular, readable, non-empty files, in a stable order, while they fit in MB megabytes.
find /usr/lib/x86_64-linux-gnu /usr/share /usr/bin -xdev -type f -size +0 -readable -printf '%s %p\n' \
    | sort -k2 | awk -v max=$((MB * 1048576)) '{ if (sum + $1 > max) next; sum += $1; print $2 }' >"$OUT/list"
[ -s "$OUT/list" ] || fail "no files found"
tar -cf - -P -T "$OUT/list" | tar -xf - -C "$OUT/tree"
echo "prepare-image: tree of $(wc -l <"$OUT/list") files, $(du -sm --apparent-size "$OUT/tree" | cut -f1) MB" >&2

# A throwaway registry on a free port, storage in OUT/registry.
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat >"$OUT/reg.yml" <<YML
version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: $OUT/registry
http:
  addr: 127.0.0.1:$PORT
YML
docker-registry serve "$OUT/reg.yml" >"$OUT/reg.log" 2>&1 &
REG=$!
trap 'kill $REG 2>/dev/null || true' EXIT
i=0
until curl -sf "http://127.0.0.1:$PORT/v2/" >/dev/null; do
    i=$((i + 1)); [ $i -lt 300 ] || fail "registry did not start: $(cat "$OUT/reg.log")"; sleep 0.1
done
H=127.0.0.1:$PORT
"$C" convert --insecure "$H" "dir:$OUT/tree" "$H/fio:cora" >&2 || fail "cora convert failed"
kill $REG; wait $REG 2>/dev/null || true
rm -rf "$OUT/tree"
touch "$stamp"
echo "prepare-image: registry data in $OUT/registry ($(du -sm "$OUT/registry" | cut -f1) MB)" >&2

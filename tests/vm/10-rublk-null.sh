#!/bin/sh
# A real ublk device end to end: rublk's null target with user copy (the mode CORA uses).
set -eu
fail() { echo "10-rublk-null: $*" >&2; rublk del -a >/dev/null 2>&1 || true; exit 1; }

rublk add null -n 0 --user-copy --quiet || fail "rublk add null failed"
# rublk returns once the device is started; the node is created by devtmpfs.
[ -b /dev/ublkb0 ] || fail "/dev/ublkb0 missing after rublk add"
rublk list >"$CORA_VM_TEST_TMP/list"
cat "$CORA_VM_TEST_TMP/list"
grep -q "dev id 0" "$CORA_VM_TEST_TMP/list" || fail "rublk list does not show device 0"
flags=$(sed -n 's/.* flags \(0x[0-9a-f]*\) .*/\1/p' "$CORA_VM_TEST_TMP/list" | head -n1)
[ -n "$flags" ] || fail "no flags in rublk list output"
[ $((flags & 0x80)) -ne 0 ] || fail "device 0 was not granted UBLK_F_USER_COPY (flags $flags)"
# O_DIRECT reads go through the ublk server (null target: zeros).
dd if=/dev/ublkb0 of="$CORA_VM_TEST_TMP/data" bs=64k count=16 iflag=direct status=none \
    || fail "read from /dev/ublkb0 failed"
[ "$(stat -c %s "$CORA_VM_TEST_TMP/data")" -eq 1048576 ] || fail "short read"
cmp -s -n 1048576 "$CORA_VM_TEST_TMP/data" /dev/zero || fail "null target returned non-zero data"
rublk del -n 0 || fail "rublk del failed"
[ ! -e /dev/ublkb0 ] || fail "/dev/ublkb0 still present after rublk del"

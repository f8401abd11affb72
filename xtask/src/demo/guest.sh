#!/bin/sh
# Guest side of `cargo xtask demo`, on a ublk kernel: cold-start the demo images lazily with
# cora-driver and fully (skopeo pull + umoci unpack), and report time to first output and
# bytes read from the registry (summed from its access log).
set -eu
R=$1
W=$R/target/demo
D=$R/target/release/cora-driver
T=$(mktemp -d /tmp/demo.XXXXXX)
H=127.0.0.1:5111
sed "s#rootdirectory: .*#rootdirectory: $W/registry/data#" "$W/reg.yml" >"$T/reg.yml"
docker-registry serve "$T/reg.yml" >"$T/reg.log" 2>&1 &
REG=$!
cleanup() {
    for c in /sys/class/ublk-char/ublkc*; do [ -e "$c" ] && "$D" del "${c##*ublkc}" >/dev/null 2>&1 || true; done
    kill $REG 2>/dev/null || true
}
trap cleanup EXIT
i=0; until curl -sf "http://$H/v2/" >/dev/null; do i=$((i + 1)); [ $i -lt 300 ] || exit 1; sleep 0.1; done
served() { # bytes the registry has written in responses so far
    grep -o 'http.response.written=[0-9]*' "$T/reg.log" | cut -d= -f2 | awk '{s+=$1} END {print s+0}'
}
ms() { echo $(($(date +%s%N) / 1000000)); }
CMD='/usr/bin/python3.11 -c "import sys; print(\"hello from python\", sys.version.split()[0])"'
CMD1='/bin/busybox echo hello from v1'

lazy() { # lazy TAG CMD: attach, mount, run; prints ms and bytes
    b0=$(served); t0=$(ms)
    dev=$("$D" add --image "$H/app:$1" --insecure "$H" --cache "$T/cache" --daemon --log "$T/drv-$1.log")
    out=$(unshare -m sh -c "mkdir -p $T/m-$1 && mount -t erofs -o ro $dev $T/m-$1 && chroot $T/m-$1 sh -c '$2'")
    t1=$(ms)
    echo "$1 lazy: $out" >&2
    echo "$((t1 - t0)) $(($(served) - b0))"
}
full() { # full TAG CMD: pull everything, unpack, run
    b0=$(served); t0=$(ms)
    skopeo copy -q --src-tls-verify=false "docker://$H/app:$1" "oci:$T/full:$1"
    umoci unpack --image "$T/full:$1" "$T/b-$1" >/dev/null
    out=$(chroot "$T/b-$1/rootfs" sh -c "$2")
    t1=$(ms)
    echo "$1 full: $out" >&2
    echo "$((t1 - t0)) $(($(served) - b0))"
}
size() { # compressed size of an image's layers
    curl -sf -H 'Accept: application/vnd.oci.image.manifest.v1+json' "http://$H/v2/app/manifests/$1" |
        jq '[.layers[].size] | add'
}
set -- $(full v1 "$CMD1"); f1_ms=$1; f1_b=$2
set -- $(lazy v1-cora "$CMD1"); l1_ms=$1; l1_b=$2
set -- $(lazy v2-cora "$CMD"); l2_ms=$1; l2_b=$2
rm -rf "$T/full" "$T/b-v1"
set -- $(full v2 "$CMD"); f2_ms=$1; f2_b=$2
echo
echo "CORA demo (ublk in an emulated VM: compare ratios, not absolute times)"
printf '%-34s %12s %14s %14s\n' "cold start" "first output" "bytes fetched" "image size"
printf '%-34s %10s ms %14s %14s\n' "v1 OCI: pull + unpack + run" "$f1_ms" "$f1_b" "$(size v1)"
printf '%-34s %10s ms %14s %14s\n' "v1 CORA: lazy attach + run" "$l1_ms" "$l1_b" "$(size v1-cora)"
printf '%-34s %10s ms %14s %14s\n' "v2 OCI: pull + unpack + run" "$f2_ms" "$f2_b" "$(size v2)"
printf '%-34s %10s ms %14s %14s\n' "v2 CORA, v1 cached: lazy + run" "$l2_ms" "$l2_b" "$(size v2-cora)"
echo "speedup v1: $(awk "BEGIN {printf \"%.1fx\", $f1_ms / $l1_ms}")  bytes v1: $(awk "BEGIN {printf \"%.1f%%\", 100 * $l1_b / $f1_b}") of a full pull"
echo "speedup v2: $(awk "BEGIN {printf \"%.1fx\", $f2_ms / $l2_ms}")  bytes v2 after v1: $(awk "BEGIN {printf \"%.1f%%\", 100 * $l2_b / $f2_b}") of a full pull"

#!/bin/sh
# Guest side of `cargo xtask demo`, on a ublk kernel: containerd (Debian's 1.6 + runc) with
# cora-snapshotter as a proxy plugin. Each demo image is cold-started twice: lazily (`cora
# rpull` + `ctr run --snapshotter cora`) and fully (`ctr image pull` + `ctr run` on containerd's
# own overlayfs snapshotter). Reports time to first output and bytes the registry sent
# (loopback traffic: every registry byte crosses it once).
set -eu
R=$1
W=$R/target/demo
D=$R/target/release/cora-driver
C=$R/target/release/cora
S=$R/target/release/cora-snapshotter
T=$(mktemp -d /tmp/demo.XXXXXX)
H=127.0.0.1:5111
CMD1='/bin/busybox echo hello from v1'
# Word-split on purpose (no quoting inside): python imports platform, re, subprocess… lazily.
CMD2='/usr/bin/python3.11 -m platform'

now() { cut -d" " -f1 /proc/uptime; }
lo_bytes() { awk -F'[: ]+' '$2 == "lo" { print $3 }' /proc/net/dev; }
die() {
    echo "demo: $*" >&2
    for f in "$T/snap.log" "$T/containerd.log"; do [ -f "$f" ] && tail -n 20 "$f" >&2; done
    exit 1
}
wait_until() { # SECS WHAT CMD...
    secs=$1 what=$2; shift 2
    end=$(awk "BEGIN { print $(now) + $secs }")
    until "$@" >/dev/null 2>&1; do
        awk "BEGIN { exit !($(now) > $end) }" && die "timed out waiting for $what"
        sleep 0.05
    done
}
REG= SNAP= CTRD=
cleanup() {
    set +e
    if [ -n "$CTRD" ]; then
        for t in $(ctr task ls -q 2>/dev/null); do ctr task kill -s KILL "$t" 2>/dev/null; done
        kill "$CTRD" 2>/dev/null; wait "$CTRD" 2>/dev/null
    fi
    [ -n "$SNAP" ] && { kill "$SNAP" 2>/dev/null; wait "$SNAP" 2>/dev/null; }
    for p in $(pgrep -f "containerd-shim.*$T" 2>/dev/null); do kill -9 "$p" 2>/dev/null; done
    grep -o " $T[^ ]*" /proc/self/mountinfo | sort -r | while read -r m; do umount -l "$m"; done
    for c in /sys/class/ublk-char/ublkc*; do [ -e "$c" ] && "$D" del "${c##*ublkc}" 2>/dev/null; done
    [ -n "$REG" ] && kill "$REG" 2>/dev/null
    return 0
}
trap cleanup EXIT

# The registry serves the storage the host filled (prepare.sh).
sed "s#rootdirectory: .*#rootdirectory: $W/registry/data#" "$W/reg.yml" >"$T/reg.yml"
docker-registry serve "$T/reg.yml" >"$T/reg.log" 2>&1 &
REG=$!
wait_until 30 "the registry" curl -sf "http://$H/v2/"

mkdir -p "$T/snap"
cat >"$T/snap/config.json" <<JSON
{
  "root": "$T/snap/root",
  "address": "$T/snap/cora.sock",
  "autoRemoveDev": true,
  "insecureRegistries": ["$H"],
  "cacheDir": "$T/cache",
  "driverPath": "$D"
}
JSON
"$S" --config "$T/snap/config.json" >"$T/snap.log" 2>&1 &
SNAP=$!
wait_until 30 "cora-snapshotter" test -S "$T/snap/cora.sock"
mkdir -p "$T/containerd"
cat >"$T/containerd/config.toml" <<TOML
version = 2
root = "$T/containerd/root"
state = "$T/containerd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$T/containerd/containerd.sock"
[ttrpc]
  address = "$T/containerd/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$T/containerd/opt"
[proxy_plugins.cora]
  type = "snapshot"
  address = "$T/snap/cora.sock"
TOML
containerd --config "$T/containerd/config.toml" >"$T/containerd.log" 2>&1 &
CTRD=$!
export CONTAINERD_ADDRESS=$T/containerd/containerd.sock CONTAINERD_NAMESPACE=demo
wait_until 60 "containerd" ctr version

# first_output NAME REF SNAPSHOTTER CMD...: runs the container; prints seconds from START to
# its first line of output.
first_output() {
    name=$1 ref=$2 snap=$3; shift 3
    out=$T/out-$name
    : >"$out"
    ctr run --rm --snapshotter "$snap" "$ref" "demo-$name" "$@" >"$out" 2>"$out.err" &
    pid=$!
    until [ -s "$out" ]; do
        if ! kill -0 "$pid" 2>/dev/null; then
            [ -s "$out" ] && break
            die "$name: the container exited without output: $(cat "$out.err")"
        fi
        sleep 0.02
    done
    first=$(now)
    wait "$pid" || die "$name: ctr run failed: $(cat "$out.err")"
    echo "  $name: $(head -n1 "$out")" >&2
    awk "BEGIN { printf \"%.2f\", $first - $START }"
}
lazy() { # TAG CMD -> "seconds bytes"
    b0=$(lo_bytes); START=$(now)
    "$C" rpull --address "$CONTAINERD_ADDRESS" --namespace demo --insecure "$H" "$H/app:$1-cora" \
        >"$T/rpull-$1.out" 2>&1 || die "cora rpull $1: $(tail -3 "$T/rpull-$1.out")"
    # shellcheck disable=SC2086
    secs=$(first_output "$1-cora" "$H/app:$1-cora" cora $2)
    echo "$secs $(($(lo_bytes) - b0))"
}
full() { # TAG CMD -> "seconds bytes"
    b0=$(lo_bytes); START=$(now)
    ctr image pull --plain-http "$H/app:$1" >"$T/pull-$1.out" 2>&1 \
        || die "ctr image pull $1: $(tail -3 "$T/pull-$1.out")"
    # shellcheck disable=SC2086
    secs=$(first_output "$1-oci" "$H/app:$1" overlayfs $2)
    echo "$secs $(($(lo_bytes) - b0))"
}
size() { # compressed size of an image's layers
    curl -sf -H 'Accept: application/vnd.oci.image.manifest.v1+json' "http://$H/v2/app/manifests/$1" |
        jq '[.layers[].size] | add'
}

echo "cold starts:" >&2
set -- $(full v1 "$CMD1"); f1_s=$1 f1_b=$2
set -- $(lazy v1 "$CMD1"); l1_s=$1 l1_b=$2
set -- $(lazy v2 "$CMD2"); l2_s=$1 l2_b=$2
set -- $(full v2 "$CMD2"); f2_s=$1 f2_b=$2
v1=$(size v1) v1c=$(size v1-cora) v2=$(size v2) v2c=$(size v2-cora)
mb() { awk "BEGIN { printf \"%.1f MB\", $1 / 1e6 }"; }

echo
echo "CORA demo: containerd $(containerd --version | awk '{ print $3 }'), kernel $(uname -r), ublk under QEMU TCG"
echo "(everything is emulated: compare the ratios, not the absolute times)"
printf '%-44s %9s %14s %12s\n' "cold start" "1st output" "bytes fetched" "image size"
printf '%-44s %8ss %14s %12s\n' "v1 OCI: ctr pull + run (overlayfs)" "$f1_s" "$(mb "$f1_b")" "$(mb "$v1")"
printf '%-44s %8ss %14s %12s\n' "v1 CORA: cora rpull + run (lazy)" "$l1_s" "$(mb "$l1_b")" "$(mb "$v1c")"
printf '%-44s %8ss %14s %12s\n' "v2 OCI, v1 pulled: ctr pull + run" "$f2_s" "$(mb "$f2_b")" "$(mb "$v2")"
printf '%-44s %8ss %14s %12s\n' "v2 CORA, v1 cached: cora rpull + run" "$l2_s" "$(mb "$l2_b")" "$(mb "$v2c")"
# "N.Nx faster" or "N.Nx slower": OCI time over CORA time, said the way it reads.
speed() { awk "BEGIN { r = $1 / $2; if (r >= 1) printf \"%.1fx faster\", r; else printf \"%.1fx slower\", 1 / r }"; }
echo "v1: CORA starts $(speed "$f1_s" "$l1_s"), fetching $(awk "BEGIN { printf \"%.1f%%\", 100 * $l1_b / $v1c }") of the image"
echo "v2 after v1: CORA starts $(speed "$f2_s" "$l2_s"), fetching $(awk "BEGIN { printf \"%.1f%%\", 100 * $l2_b / $v2c }") of the image (OCI fetched $(awk "BEGIN { printf \"%.1f%%\", 100 * $f2_b / $v2 }"))"

#!/bin/sh
# Host side of `cargo xtask demo`: two versions of an application image built from Debian
# packages (v1 = a Debian base, v2 = v1 + Python), pushed as plain OCI images to a local
# docker-registry, and converted to CORA. Trees and images are cached in target/demo.
set -eu
R=$1
W=$R/target/demo
C=$R/target/release/cora
mkdir -p "$W/debs"
BASE="libc6 libgcc-s1 libstdc++6 coreutils bash dash busybox-static grep sed tar gzip findutils
 zlib1g libzstd1 liblzma5 libbz2-1.0 libacl1 libattr1 libselinux1 libpcre2-8-0 libtinfo6
 libcrypt1 perl-base libssl3 libsqlite3-0 libexpat1 libffi8 libuuid1 libreadline8 readline-common
 libncursesw6 ncurses-base libdb5.3 libgdbm6 media-types"
APP="python3.11-minimal libpython3.11-minimal libpython3.11-stdlib python3.11"
tree() { # tree NAME PKGS...: extract packages into $W/NAME once
    name=$1; shift
    [ -f "$W/$name.done" ] && return 0
    rm -rf "${W:?}/$name"; mkdir -p "$W/$name"
    (cd "$W/debs" && apt-get download "$@" >/dev/null 2>&1) || { echo "apt-get download failed" >&2; exit 1; }
    for p in "$@"; do dpkg-deb -x "$(ls "$W"/debs/"${p}"_*.deb | tail -1)" "$W/$name"; done
    mkdir -p "$W/$name/proc" "$W/$name/sys" "$W/$name/dev" "$W/$name/tmp" "$W/$name/etc"
    touch "$W/$name.done"
}
tree base $BASE
tree app $APP
if [ ! -f "$W/images.done" ]; then
    rm -rf "$W/oci"
    "$C" pack "oci:$W/oci:v1" "$W/base"
    "$C" pack "oci:$W/oci:v2" "$W/base" "$W/app"
    touch "$W/images.done"
fi
# A registry whose storage the guest serves again from the same directory.
rm -rf "$W/registry"; mkdir -p "$W/registry"
PORT=5111
cat >"$W/reg.yml" <<YML
version: 0.1
log:
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: $W/registry/data
http:
  addr: 127.0.0.1:$PORT
YML
docker-registry serve "$W/reg.yml" >"$W/registry/host.log" 2>&1 &
REG=$!
trap 'kill $REG 2>/dev/null || true' EXIT
i=0; until curl -sf "http://127.0.0.1:$PORT/v2/" >/dev/null; do
    i=$((i + 1)); [ $i -lt 200 ] || { echo "registry did not start" >&2; exit 1; }; sleep 0.1
done
H=127.0.0.1:$PORT
for v in v1 v2; do
    skopeo copy -q --dest-tls-verify=false "oci:$W/oci:$v" "docker://$H/app:$v"
    "$C" convert --insecure "$H" "$H/app:$v" "$H/app:$v-cora" >"$W/convert-$v.out" 2>"$W/convert-$v.err" \
        || { cat "$W/convert-$v.err" >&2; exit 1; }
    head -1 "$W/convert-$v.out"
done

#!/bin/sh
# 40-containerd's whole suite (lazy CORA starts, plain OCI, the overlayfs snapshotter, four at
# once, restarts, kill -9 of device servers and of the snapshotter, fallback) against Debian
# sid's containerd 2.1, which `cargo xtask test` extracts into target/tools/containerd2 (never
# installed: the guest, like the host, keeps bookworm's 1.6 for 40-containerd).
set -eu
R=${CORA_REPO:-$PWD}
CORA_CONTAINERD_BIN=$R/target/tools/containerd2/usr/bin CORA_VM_TEST_NAME=41-containerd2 \
    exec sh "$R/tests/vm/40-containerd.sh"

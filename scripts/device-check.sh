#!/usr/bin/env bash
# The GPU check, prepared on a build machine and run on a machine with a GPU (CUDA driver,
# no Rust toolchain, no network). Two steps:
#
#   on the build machine:   ./scripts/device-check.sh build
#       builds kvtier with `--features cuda` (x86-64, release, debug info stripped) into
#       target/device/kvtier — small enough to send along with the checkout;
#   on the GPU machine:     ./scripts/device-check.sh run
#       runs `kvtier bench gpu --require-device`: cudaMemcpy baselines (pageable, pinned,
#       device-to-device) and the GPU tier's store/retrieve, every byte verified, ratios
#       against the goal of 90 %. Exits non-zero when a byte differs or no device is usable.
#
# P/D buffers in device memory (`pd_buffer_device: cuda`) are refused at start-up by this
# version of kvtier; the check reports that instead of measuring it.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
build)
    cargo build --release -p kvtier-cli --features cuda --bin kvtier
    mkdir -p target/device
    cp target/release/kvtier target/device/kvtier
    strip --strip-debug target/device/kvtier
    ls -la target/device/kvtier
    ;;
run)
    bin=${KVTIER_DEVICE_BIN:-target/device/kvtier}
    [ -x "$bin" ] || { echo "no $bin: run '$0 build' on the build machine first" >&2; exit 2; }
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    "$bin" bench gpu --require-device --size-mib "${SIZE_MIB:-1024}" --iterations "${ITERATIONS:-5}"
    ;;
*)
    echo "usage: $0 build | run" >&2
    exit 2
    ;;
esac

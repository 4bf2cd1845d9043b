"""The kvtier Python package against its Rust engine: keys, store/retrieve on caller
memory, paged blocks, the lookup channel, errors. Synthetic KV (random tensors) stands in
for a model here; test_vllm.py runs a real one."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest
import torch

import kvtier

ROOT = Path(__file__).resolve().parents[2]
LLAMA = "meta-llama/Llama-3.1-8B-Instruct"


def golden_cases():
    """(name, header fields, [(start, end, key)]) from tests/golden/keys.txt."""
    cases, current = [], None
    for line in (ROOT / "tests/golden/keys.txt").read_text().splitlines():
        if line.startswith("case "):
            name, *fields = line[5:].split()
            current = (name, dict(f.split("=", 1) for f in fields), [])
            cases.append(current)
        elif line.strip() and not line.startswith("#"):
            _, start, end, key = line.split()
            current[2].append((int(start), int(end), key))
    return cases


def engine(tmp_path=None, **overrides):
    settings = {"chunk_size": 256, "max_local_cpu_size": 0.25}
    settings.update(overrides)
    return kvtier.Engine("test-model", layers=2, kv_heads=2, head_dim=64, dtype="float32", overrides=settings)


def test_chunk_keys_match_the_golden_vectors():
    checked = 0
    for name, f, expected in golden_cases():
        if not name.startswith("llama-600") and name != "llama-seed-42":
            continue
        tp_rank, tp_size = (int(x) for x in f["tp"].split("/"))
        e = kvtier.Engine(
            f["model"], layers=int(f["layers"]), kv_heads=1, head_dim=int(f["hidden"]),
            dtype=f["dtype"], layout=f["layout"],
            tp_size=tp_size, tp_rank=tp_rank,
            overrides={"chunk_size": int(f["chunk"]), "hash_seed": int(f["seed"]),
                       "save_unfull_chunk": f["partial"] == "true", "max_local_cpu_size": 0.01},
        )
        assert e.chunk_keys(list(range(int(f["tokens"])))) == [k for _, _, k in expected], name
        checked += 1
    assert checked == 3


def test_store_and_retrieve_a_tensor_in_place():
    e = engine()
    tokens = list(range(600))
    kv = torch.randn(2, 2, 600, 128)
    report = e.store(tokens, kv)
    assert (report.stored_tokens, report.cached_tokens, report.bytes) == (600, 0, kv.numel() * 4)
    assert e.lookup(tokens + [7] * 300) == 512  # the partial chunk's key differs
    out = torch.zeros_like(kv)
    assert e.retrieve(tokens, out) == 600
    assert torch.equal(out, kv)
    again = e.store(tokens, kv)
    assert (again.stored_tokens, again.cached_tokens) == (0, 600)


def test_buffers_are_borrowed_not_copied():
    e = engine()
    tokens = list(range(300))
    data = bytearray(torch.randn(2, 2, 300, 128).numpy().tobytes())
    e.store(tokens, memoryview(data))
    out = bytearray(len(data))
    assert e.retrieve(tokens, out) == 300
    assert out == data


def test_bad_inputs_raise_with_the_reason():
    e = engine()
    with pytest.raises(kvtier.KvtierError, match=r"100 bytes for 300 tokens"):
        e.store(list(range(300)), bytearray(100))
    with pytest.raises(ValueError, match="read-only"):
        e.retrieve(list(range(300)), bytes(e.bytes_per_token * 300))
    with pytest.raises(ValueError, match="not contiguous"):
        e.store(list(range(300)), torch.randn(2, 2, 128, 300).transpose(2, 3))
    with pytest.raises(kvtier.KvtierError, match="chunk_size"):
        kvtier.Engine("m", layers=1, kv_heads=1, head_dim=64, overrides={"chunk_size": 0})
    with pytest.raises(kvtier.KvtierError, match="dtype"):
        kvtier.Engine("m", layers=1, kv_heads=1, head_dim=64, dtype="int7")


def paged(e, blocks=16, block_size=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    layers = [torch.randn(blocks, 2, block_size, 128, generator=g) for _ in range(2)]
    return layers, e.paged_cache(layers, block_size)


def paged_engine(**overrides):
    settings = {"chunk_size": 256, "max_local_cpu_size": 0.25}
    settings.update(overrides)
    return kvtier.Engine("test-model#paged", layers=2, kv_heads=2, head_dim=64, dtype="float32",
                         layout="PAGED", overrides=settings)


def test_paged_blocks_round_trip_between_block_tables():
    e = paged_engine()
    src_layers, src = paged(e, seed=1)
    tokens = list(range(700))  # 5 whole blocks of 128; the last 60 tokens are not stored
    src_ids = [3, 9, 1, 4, 12, 7]
    report = e.store_blocks(src, tokens, src_ids)
    assert report.stored_tokens == 640
    dst_layers, dst = paged(e, seed=2)
    before = [t.clone() for t in dst_layers]
    dst_ids = [0, 2, 5, 6, 8, 10]
    assert e.load_blocks(dst, tokens, dst_ids) == 640
    for s, d, b in zip(src_layers, dst_layers, before):
        for i in range(5):
            assert torch.equal(d[dst_ids[i]], s[src_ids[i]])
        assert torch.equal(d[dst_ids[5]], b[dst_ids[5]])  # beyond the loaded prefix
        untouched = [i for i in range(16) if i not in dst_ids[:5]]
        assert torch.equal(d[untouched], b[untouched])
    # Blocks of vLLM's own prefix hits are left alone.
    again_layers, again = paged(e, seed=3)
    keep = [t.clone() for t in again_layers]
    assert e.load_blocks(again, tokens, dst_ids, skip_tokens=256) == 640
    for k, a, s in zip(keep, again_layers, src_layers):
        assert torch.equal(a[dst_ids[0]], k[dst_ids[0]]) and torch.equal(a[dst_ids[1]], k[dst_ids[1]])
        assert torch.equal(a[dst_ids[2]], s[src_ids[2]])


def test_paged_cache_checks_its_shape_and_block_table():
    e = paged_engine()
    with pytest.raises(ValueError, match="not a whole number of vLLM blocks"):
        e.paged_cache([torch.zeros(4, 2, 96, 128)] * 2, 96)
    with pytest.raises(ValueError, match="bytes per block"):
        e.paged_cache([torch.zeros(4, 2, 128, 64)] * 2, 128)
    with pytest.raises(ValueError, match="layout=\"PAGED\""):
        engine().paged_cache([torch.zeros(4, 2, 128, 128)] * 2, 128)
    _, cache = paged(e, blocks=4)
    with pytest.raises(kvtier.KvtierError, match="block id 4 is outside"):
        e.store_blocks(cache, list(range(256)), [0, 4])
    with pytest.raises(kvtier.KvtierError, match="appears twice"):
        e.load_blocks(cache, list(range(256)), [1, 1])


def test_a_corrupt_chunk_on_disk_ends_the_loaded_prefix(tmp_path):
    disk = tmp_path / "disk"
    e = paged_engine(local_cpu=False, local_disk=str(disk), max_local_disk_size=0.1)
    layers, cache = paged(e, seed=4)
    tokens = list(range(1024))
    e.store_blocks(cache, tokens, list(range(8)))
    e.flush()
    files = sorted(p for p in disk.rglob("*") if p.is_file())
    assert len(files) == 4
    # Find the third chunk's file by its key and flip one payload byte.
    third = e.chunk_keys(tokens)[2]
    victim = next(p for p in files if third in p.name)
    raw = bytearray(victim.read_bytes())
    raw[-1] ^= 0x40
    victim.write_bytes(raw)
    reopened = paged_engine(local_cpu=False, local_disk=str(disk), max_local_disk_size=0.1)
    _, dst = paged(reopened, seed=5)
    assert reopened.load_blocks(dst, tokens, list(range(8, 16))) == 512
    assert re.search(r'kvtier_corrupt_chunks_total\{tier="disk"\} 1', reopened.metrics_text())


def test_lookup_channel_answers_across_clients(tmp_path):
    e = engine()
    tokens = list(range(600))
    e.store(tokens, torch.randn(2, 2, 600, 128))
    path = str(tmp_path / "lookup.sock")
    e.serve_lookups(path)
    client = kvtier.LookupClient(path, timeout=2.0)
    assert client.lookup(tokens) == 600
    assert client.lookup(list(range(1, 600))) == 0
    results = []
    threads = [threading.Thread(target=lambda: results.append(kvtier.LookupClient(path).lookup(tokens[:512]))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [512] * 4
    with pytest.raises(kvtier.KvtierError, match="lookup channel"):
        kvtier.LookupClient(str(tmp_path / "nobody.sock"), timeout=0.5).lookup(tokens)


def test_metrics_and_config_resolution(tmp_path, monkeypatch):
    config = tmp_path / "kv.yaml"
    config.write_text("chunk_size: 512\nlocal_cpu: true\nmax_local_cpu_size: 0.1\n")
    monkeypatch.setenv("LMCACHE_CONFIG_FILE", str(config))
    assert kvtier.configured_chunk_size() == 512
    monkeypatch.setenv("LMCACHE_CHUNK_SIZE", "128")
    assert kvtier.configured_chunk_size() == 128
    assert kvtier.configured_chunk_size(overrides={"chunk_size": 64}) == 64
    e = kvtier.Engine("m", layers=1, kv_heads=1, head_dim=64)
    assert e.chunk_size == 128
    e.store(list(range(128)), bytearray(e.bytes_per_token * 128))
    assert "kvtier_store_tokens_total 128" in e.metrics_text()


def test_paged_blocks_move_between_engines_over_pd():
    """A P/D sender and receiver (TCP on 127.0.0.1) in one process: blocks sent from one
    block table arrive byte for byte in another, once; other KV never loads."""
    from kvtier.harness import free_port

    init_port, alloc_port = free_port(), free_port()
    common = {"chunk_size": 256, "enable_pd": True, "transfer_channel": "tcp",
              "pd_buffer_size": 16 << 20, "pd_buffer_device": "cpu", "local_cpu": False}
    receiver = paged_engine(**common, pd_role="receiver", pd_peer_host="127.0.0.1",
                            pd_peer_init_port=init_port, pd_peer_alloc_port=alloc_port)
    # Nobody listens for the transfer-done notification: the sender logs that and goes on.
    sender = paged_engine(**common, pd_role="sender", pd_proxy_host="127.0.0.1", pd_proxy_port=free_port())
    assert (sender.pd_role, receiver.pd_role, receiver.tiers) == ("sender", "receiver", [])
    src_layers, src = paged(sender, seed=6)
    dst_layers, dst = paged(receiver, seed=7)
    tokens = list(range(1000))
    src_ids, dst_ids = [5, 2, 9, 0, 11, 3, 7, 14], [1, 4, 6, 8, 10, 12, 13, 15]
    pending = sender.start_send_blocks(src, "req-1", tokens, src_ids, "127.0.0.1", init_port, alloc_port)
    assert pending.req_id == "req-1"
    report = pending.result(timeout=60)
    assert pending.done() and "done" in repr(pending)
    assert (report.tokens, report.skipped_tokens, report.bytes) == (896, 0, 896 * sender.bytes_per_token)
    assert receiver.lookup(tokens[:896]) == 896
    assert receiver.lookup(list(range(1, 1000))) == 0
    assert receiver.load_blocks(dst, tokens[:896], dst_ids) == 896
    for s, d in zip(src_layers, dst_layers):
        for i in range(7):
            assert torch.equal(d[dst_ids[i]], s[src_ids[i]])
    # The pages were freed by the load: a second load finds nothing.
    assert receiver.load_blocks(dst, tokens[:896], dst_ids) == 0
    with pytest.raises(kvtier.KvtierError, match="pd_role: sender"):
        receiver.start_send_blocks(dst, "req-2", tokens, dst_ids, "127.0.0.1", init_port, alloc_port)


def test_a_send_runs_in_the_background_until_its_receiver_times_out():
    """A send to a "receiver" that accepts connections and never answers: the call
    returns at once, the send stays running past a short wait, and it ends as a failure
    naming the request once the transport timeout passes."""
    import socket

    from kvtier.harness import free_port

    mute = socket.socket()
    mute.bind(("127.0.0.1", 0))
    mute.listen()
    port = mute.getsockname()[1]
    try:
        sender = paged_engine(chunk_size=256, enable_pd=True, transfer_channel="tcp", pd_role="sender",
                              pd_buffer_size=16 << 20, pd_buffer_device="cpu", local_cpu=False,
                              pd_proxy_host="127.0.0.1", pd_proxy_port=free_port(),
                              transport_timeout_sec=2)
        _, src = paged(sender, seed=8)
        pending = sender.start_send_blocks(src, "stuck-1", list(range(512)), [0, 1, 2, 3],
                                           "127.0.0.1", port, port)
        assert not pending.done() and "running" in repr(pending)
        with pytest.raises(TimeoutError, match="stuck-1 still running"):
            pending.result(timeout=0.2)
        assert not pending.done()
        with pytest.raises(kvtier.KvtierError, match="stuck-1: no kvtier answer from 127.0.0.1:[0-9]+ within 2s"):
            pending.result(timeout=60)
        assert pending.done() and "failed" in repr(pending)
        with pytest.raises(ValueError, match="NaN"):
            pending.result(timeout=float("nan"))
    finally:
        mute.close()

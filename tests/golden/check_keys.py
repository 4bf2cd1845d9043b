#!/usr/bin/env python3
"""Recomputes tests/golden/keys.txt with Python's `xxhash`, independently of the Rust code,
from the key definition alone (DESIGN §2, src/keys.rs):

    h_-1 = xxh3_128(seed, b"kvtier-ns-v2\\0" + u32le(len(model)) + model + u8(dtype)
                          + u8(layout) + u32le(layers, hidden, tp_size, tp_rank, chunk_size))
    h_i  = xxh3_128(seed, u128le(h_{i-1}) + u32le(tokens of chunk i)...)

Exits non-zero on any difference. Needs `pip install xxhash`.
"""
import re
import struct
import sys
from pathlib import Path

import xxhash

DTYPES = {"bfloat16": 1, "float16": 2, "float32": 3, "fp8_e4m3": 4, "fp8_e5m2": 5, "uint8": 6}
LAYOUTS = {"KV_2LTD": 1, "MLA_1LTD": 2, "PAGED": 3}
M64 = (1 << 64) - 1


def lcg(seed, n):
    out, s = [], seed
    for _ in range(n):
        s = (s * 6364136223846793005 + 1442695040888963407) & M64
        out.append((s >> 33) % 128256)
    return out


TOKENS = {
    "llama-600-ascending": list(range(600)),
    "llama-600-ascending-drop-partial": list(range(600)),
    "llama-seed-42": list(range(600)),
    "llama-tp2-rank1-random-7500": lcg(7, 7500),
    "deepseek-mla-fp8-chunk64": lcg(11, 200),
    "empty": [],
}


def keys(model, dtype, layout, layers, hidden, tp_rank, tp_size, chunk, seed, partial, tokens):
    m = model.encode()
    ns = b"kvtier-ns-v2\0" + struct.pack("<I", len(m)) + m
    ns += bytes([DTYPES[dtype], LAYOUTS[layout]])
    ns += struct.pack("<IIIII", layers, hidden, tp_size, tp_rank, chunk)
    h = xxhash.xxh3_128_intdigest(ns, seed=seed)
    for start in range(0, len(tokens), chunk):
        part = tokens[start:start + chunk]
        if len(part) < chunk and not partial:
            break
        data = h.to_bytes(16, "little") + struct.pack(f"<{len(part)}I", *part)
        h = xxhash.xxh3_128_intdigest(data, seed=seed)
        yield start, start + len(part), f"{h:032x}"


def main():
    golden = Path(__file__).with_name("keys.txt").read_text().splitlines()
    header = re.compile(
        r"case (\S+) model=(\S+) dtype=(\S+) layout=(\S+) layers=(\d+) hidden=(\d+) "
        r"tp=(\d+)/(\d+) chunk=(\d+) "
        r"seed=(\d+) partial=(true|false) tokens=(\d+)"
    )
    expected, cases = [], 0
    for line in golden:
        m = header.fullmatch(line)
        if not m:
            continue
        cases += 1
        name, model, dtype, layout, layers, hidden, rank, size, chunk, seed, partial, n = m.groups()
        tokens = TOKENS[name]
        assert len(tokens) == int(n), f"{name}: token count"
        expected.append(line)
        for i, (s, e, k) in enumerate(
            keys(model, dtype, layout, int(layers), int(hidden), int(rank), int(size), int(chunk),
                 int(seed), partial == "true", tokens)
        ):
            expected.append(f"  {i} {s} {e} {k}")
    actual = [l for l in golden if not l.startswith("#")]
    if actual != expected:
        for a, b in zip(actual, expected):
            if a != b:
                print(f"golden: {a}\npython: {b}", file=sys.stderr)
                break
        sys.exit(f"FAIL: tests/golden/keys.txt disagrees with the Python reference")
    print(f"golden chunk keys: {cases} cases, {len(actual) - cases} keys match the Python reference")


if __name__ == "__main__":
    main()

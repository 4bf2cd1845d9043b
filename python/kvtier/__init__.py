"""kvtier: an embedded KV-cache storage engine for LLM inference.

The engine itself is Rust (``kvtier._kvtier``); this package re-exports it and holds the
vLLM KV connector (``kvtier.vllm.KvtierConnector``).

>>> import kvtier
>>> engine = kvtier.Engine("my-model", layers=2, kv_heads=8, head_dim=128,
...                        overrides={"chunk_size": 256, "max_local_cpu_size": 1})
>>> tokens = list(range(300))
>>> kv = bytearray(engine.bytes_per_token * len(tokens))
>>> engine.store(tokens, kv).stored_tokens
256
>>> engine.lookup(tokens)
256
"""

from kvtier._kvtier import (
    Engine,
    KvtierError,
    LookupClient,
    PagedCache,
    PendingSend,
    SendReport,
    StoreReport,
    __version__,
    configured_chunk_size,
)

__all__ = [
    "Engine",
    "KvtierError",
    "LookupClient",
    "PagedCache",
    "PendingSend",
    "SendReport",
    "StoreReport",
    "__version__",
    "configured_chunk_size",
]

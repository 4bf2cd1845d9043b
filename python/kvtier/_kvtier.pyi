"""Type stubs of kvtier's native module."""

from typing import Any, Mapping, Optional, Sequence

__version__: str

class KvtierError(Exception):
    """An error reported by kvtier; the message names the bad key, field or peer."""

class StoreReport:
    """What a store did."""

    stored_tokens: int
    cached_tokens: int
    bytes: int
    seconds: float

class SendReport:
    """What a P/D send did."""

    tokens: int
    skipped_tokens: int
    bytes: int
    seconds: float

class PendingSend:
    """A P/D send running on kvtier's runtime (made by ``Engine.start_send_blocks``)."""

    req_id: str
    def done(self) -> bool:
        """Whether the send has ended (done or failed): its blocks are no longer read."""
    def result(self, timeout: Optional[float] = None) -> SendReport:
        """Waits for the send (at most ``timeout`` seconds) and returns its report; raises
        KvtierError if it failed, TimeoutError if it is still running after ``timeout``."""

class PagedCache:
    """vLLM's paged KV cache seen as whole blocks (made by ``Engine.paged_cache``)."""

    num_blocks: int
    block_size: int
    block_bytes: int

class LookupClient:
    """The scheduler's end of the lookup channel to a worker's engine."""

    def __init__(self, path: str, timeout: float = 5.0) -> None: ...
    def lookup(self, tokens: Sequence[int]) -> int:
        """Leading tokens of ``tokens`` held by the worker; raises KvtierError on timeout."""

class Engine:
    """A kvtier engine: chunk keys, tiers, lookup, store and retrieve.

    Configured like the CLI: ``config_file``, else ``KVTIER_CONFIG_FILE`` /
    ``LMCACHE_CONFIG_FILE``, else defaults; then ``KVTIER_<KEY>`` / ``LMCACHE_<KEY>``
    environment overrides; then ``overrides``. Every call that copies or waits releases
    the GIL.
    """

    def __init__(
        self,
        model: str,
        layers: int,
        kv_heads: int,
        head_dim: int,
        dtype: str = "bfloat16",
        layout: str = "KV_2LTD",
        tp_size: int = 1,
        tp_rank: int = 0,
        config_file: Optional[str] = None,
        overrides: Optional[Mapping[str, Any]] = None,
    ) -> None: ...
    @property
    def chunk_size(self) -> int: ...
    @property
    def bytes_per_token(self) -> int: ...
    @property
    def pd_role(self) -> Optional[str]: ...
    @property
    def tiers(self) -> list[str]: ...
    def chunk_keys(self, tokens: Sequence[int]) -> list[str]: ...
    def lookup(self, tokens: Sequence[int]) -> int: ...
    def store(self, tokens: Sequence[int], kv: Any) -> StoreReport:
        """Stores ``[kv_factor, layers, tokens, hidden]`` KV from a CPU tensor or byte buffer."""
    def retrieve(self, tokens: Sequence[int], out: Any) -> int:
        """Loads the cached prefix into ``out``; returns the tokens loaded."""
    def remove(self, tokens: Sequence[int]) -> int: ...
    def clear(self) -> None: ...
    def flush(self) -> None: ...
    def metrics_text(self) -> str: ...
    def prefault(self, bytes: int) -> None:
        """Faults in up to ``bytes`` of chunk buffers in the background."""
    def paged_cache(self, layers: Sequence[Any], block_size: int) -> PagedCache: ...
    def store_blocks(
        self, cache: PagedCache, tokens: Sequence[int], block_ids: Sequence[int]
    ) -> StoreReport: ...
    def load_blocks(
        self,
        cache: PagedCache,
        tokens: Sequence[int],
        block_ids: Sequence[int],
        skip_tokens: int = 0,
    ) -> int: ...
    def start_send_blocks(
        self,
        cache: PagedCache,
        req_id: str,
        tokens: Sequence[int],
        block_ids: Sequence[int],
        receiver_host: str,
        receiver_init_port: int,
        receiver_alloc_port: int,
    ) -> PendingSend:
        """Starts pushing whole blocks to a P/D receiver (pd_role: sender) and returns at
        once; the proxy is notified when the send ends. The blocks must stay as they are
        until ``PendingSend.done()``."""
    def serve_lookups(self, path: str) -> None: ...

def configured_chunk_size(
    config_file: Optional[str] = None, overrides: Optional[Mapping[str, Any]] = None
) -> int:
    """The ``chunk_size`` the configuration resolves to, without opening an engine."""

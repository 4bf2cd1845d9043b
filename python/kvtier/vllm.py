"""kvtier as a vLLM KV connector (KV connector V1 API, vLLM >= 0.32).

Load it with::

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "KvtierConnector",
        "kv_connector_module_path": "kvtier.vllm", "kv_role": "kv_both"}'

and configure it with the same YAML as every kvtier process (``KVTIER_CONFIG_FILE``, or
LMCache's ``LMCACHE_CONFIG_FILE``; ``KVTIER_<KEY>`` / ``LMCACHE_<KEY>`` overrides).

How it works:

- vLLM runs the scheduler (engine core) and the workers as separate objects, often in
  separate processes. The worker side owns the kvtier engine and vLLM's paged KV cache; it
  serves lookups on a Unix socket. The scheduler side asks that socket how many prompt
  tokens kvtier holds (bounded by a timeout; no answer is a miss) and tells the workers,
  through the step's connector metadata, which blocks to load and which to save.
- KV moves as whole vLLM blocks of opaque bytes (layout ``PAGED``): the attention
  backend's block layout and the block shape are part of the key namespace, so caches of
  different layouts never share keys. ``chunk_size`` must be a whole number of blocks.
- Loads are synchronous: ``start_load_kv`` fills the request's blocks before the forward
  pass. A chunk that cannot be loaded (missing, corrupt, wrong shape) is reported through
  ``get_block_ids_with_load_errors`` so vLLM recomputes those blocks
  (``kv_load_failure_policy: recompute``) or fails the request (vLLM's default ``fail``);
  never wrong KV.
- Saves happen after each forward pass (``wait_for_save``): every whole chunk of prompt
  KV computed so far; the prompt's last, partial run of whole blocks once the prompt is
  done (unless ``discard_partial_chunks``). A P/D request's save in the step its send
  starts waits for the send to end (the transfer the decoder waits for goes first).
- P/D (``enable_pd``): on a prefiller (``pd_role: sender``), a request whose
  ``kv_transfer_params`` name a receiver (as ``kvtier proxy`` sends them) has its prompt's
  whole blocks pushed into that decoder's P/D buffer, and the proxy is notified (done or
  failed). The send starts in the step its prefill ends and runs beside the steps that
  follow, so a slow or stuck decoder does not stall the prefiller: vLLM keeps the request's
  blocks until the send has ended (``request_finished`` returns True; the worker reports
  the request through ``get_finished``). Two cases still wait in the step: a request
  preempted while its send runs (the step waits for the send before vLLM gives its blocks
  away; a P/D prefill with ``max_tokens: 1`` finishes in the step its send starts, so this
  is rare), and a step with no work while a send runs (it waits up to 20 ms for the send
  instead of spinning). On a decoder (``pd_role: receiver``) lookups see
  the committed chunks in the P/D buffer, and loads take them from there (freeing the
  pages).

``kv_connector_extra_config`` keys with their LMCache meaning: ``discard_partial_chunks``
(do not save the prompt's last partial chunk), ``lmcache_rpc_port`` (names the
scheduler-worker lookup channel), ``skip_last_n_tokens`` (neither look up nor save the
prompt's last N tokens). kvtier's own: ``kvtier_lookup_timeout`` (seconds, default 5),
``kvtier_metrics_port`` (the worker of TP rank 0 serves the engine's Prometheus metrics at
``http://127.0.0.1:PORT/metrics``; vLLM's own ``/metrics`` lives in another process).
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

import kvtier

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

# A child of vLLM's logger: our lines carry its format and level.
logger = logging.getLogger("vllm.kvtier")

# How long a step without work waits for a running P/D send to end before it returns.
_IDLE_WAIT_SEC = 0.02

_EXTRA_KEYS = {
    "discard_partial_chunks",
    "lmcache_rpc_port",
    "skip_last_n_tokens",
    "kvtier_lookup_timeout",
    "kvtier_metrics_port",
}


@dataclass
class LoadSpec:
    """Load ``tokens``' cached KV into ``block_ids``, leaving the first ``skip_tokens``
    (vLLM's own prefix-cache hits) alone."""

    req_id: str
    tokens: list[int]
    block_ids: list[int]
    skip_tokens: int


@dataclass
class SaveSpec:
    """Save the KV of ``tokens`` from ``block_ids``."""

    req_id: str
    tokens: list[int]
    block_ids: list[int]


@dataclass
class SendSpec:
    """Push the KV of ``tokens`` from ``block_ids`` to a P/D receiver (the decoder that
    ``kvtier proxy`` named in the request's ``kv_transfer_params``), as request
    ``transfer_id``."""

    req_id: str
    transfer_id: str
    tokens: list[int]
    block_ids: list[int]
    host: str
    init_ports: list[int]
    alloc_ports: list[int]


@dataclass
class KvtierConnectorMetadata(KVConnectorMetadata):
    """What the workers do in one step."""

    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
    sends: list[SendSpec] = field(default_factory=list)
    # Requests preempted this step: their blocks are given away, so their sends must end.
    preempted: list[str] = field(default_factory=list)
    # A step without tokens to compute (vLLM steps so while it holds blocks for a send).
    idle: bool = False


@dataclass
class _Tracked:
    """Scheduler-side state of a running request."""

    prompt: list[int]
    block_ids: list[int]
    saved: bool = False
    # P/D: where the prompt's KV goes once computed (from `kv_transfer_params`).
    send_to: Optional[dict[str, Any]] = None


def _lookup_socket(vllm_config: "VllmConfig", extra: dict[str, Any]) -> str:
    port = extra.get("lmcache_rpc_port")
    name = f"rpc{port}" if port is not None else vllm_config.kv_transfer_config.engine_id
    return os.path.join(tempfile.gettempdir(), f"kvtier-lookup-{name}.sock")


def _ports(value: Any) -> list[int]:
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


def _pd_destination(params: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The receiver a prefill request's ``kv_transfer_params`` name (as ``kvtier proxy``
    sends them: ``req_id``, ``receiver_host``, ``receiver_init_port``,
    ``receiver_alloc_port``), or None."""
    if not params or "receiver_host" not in params:
        return None
    try:
        return {
            "transfer_id": str(params["req_id"]),
            "host": str(params["receiver_host"]),
            "init_ports": _ports(params["receiver_init_port"]),
            "alloc_ports": _ports(params["receiver_alloc_port"]),
        }
    except (KeyError, TypeError, ValueError) as e:
        raise kvtier.KvtierError(f"kv_transfer_params {params!r} do not name a P/D receiver: {e}") from e


def _serve_metrics(engine: "kvtier.Engine", port: int) -> None:
    """Serves `engine`'s Prometheus text at http://127.0.0.1:PORT/metrics (a daemon thread)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            if self.path != "/metrics":
                self.send_error(404)
                return
            body = engine.metrics_text().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            return

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, name="kvtier-metrics", daemon=True).start()
    logger.info("kvtier: engine metrics at http://127.0.0.1:%d/metrics", port)


def _layer_index(name: str) -> int:
    found = re.findall(r"\d+", name)
    if not found:
        raise kvtier.KvtierError(f"cannot order KV cache layer {name!r}: no layer number")
    return int(found[-1])


class KvtierConnector(KVConnectorBase_V1):
    """vLLM KV connector backed by kvtier (see the module documentation)."""

    def __init__(
        self,
        vllm_config: "VllmConfig",
        role: KVConnectorRole,
        kv_cache_config: "Optional[KVCacheConfig]" = None,
    ):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        transfer = vllm_config.kv_transfer_config
        self._extra: dict[str, Any] = dict(transfer.kv_connector_extra_config or {})
        unknown = sorted(set(self._extra) - _EXTRA_KEYS)
        if unknown:
            logger.warning(
                "kvtier: kv_connector_extra_config keys %s are not used by kvtier", unknown
            )
        self._block_size = vllm_config.cache_config.block_size
        self._loads_kv = transfer.kv_role in ("kv_consumer", "kv_both")
        self._saves_kv = transfer.kv_role in ("kv_producer", "kv_both")
        self._skip_last = int(self._extra.get("skip_last_n_tokens", 0) or 0)
        self._socket = _lookup_socket(vllm_config, self._extra)
        self._vllm_config = vllm_config

        # Scheduler side.
        self._client: Optional[kvtier.LookupClient] = None
        self._tracked: dict[str, _Tracked] = {}
        self._pending_loads: dict[str, int] = {}
        self._send_to: dict[str, dict[str, Any]] = {}
        # Requests whose send was planned: vLLM keeps their blocks until the worker reports
        # the send ended.
        self._sending: set[str] = set()
        # Worker side.
        self._engine: Optional[kvtier.Engine] = None
        self._cache: Optional[kvtier.PagedCache] = None
        self._load_errors: set[int] = set()
        # P/D sends running, those ended but not yet reported to vLLM, and requests vLLM
        # said are finished whose send is running or ended (reported once both hold).
        self._sends: dict[str, tuple[SendSpec, kvtier.PendingSend]] = {}
        self._sends_ended: set[str] = set()
        self._finished_sending: set[str] = set()
        # Saves of requests whose send runs, done when it ends (the latest covers the rest).
        self._deferred_saves: dict[str, SaveSpec] = {}
        self._tp_rank = 0
        self._has_tiers = False

        if role == KVConnectorRole.SCHEDULER:
            timeout = float(self._extra.get("kvtier_lookup_timeout", 5.0))
            self._client = kvtier.LookupClient(self._socket, timeout=timeout)
            # Checks the configuration at start-up, before any request.
            self._chunk_size = kvtier.configured_chunk_size()
            if self._chunk_size % self._block_size:
                raise kvtier.KvtierError(
                    f"chunk_size {self._chunk_size} is not a whole number of vLLM blocks of "
                    f"{self._block_size} tokens: set chunk_size to a multiple of the block size"
                )

    # ------------------------------------------------------------------ scheduler side

    def _considered(self, prompt: list[int]) -> list[int]:
        if self._skip_last:
            return prompt[: max(0, len(prompt) - self._skip_last)]
        return prompt

    def get_num_new_matched_tokens(
        self, request: "Request", num_computed_tokens: int
    ) -> tuple[Optional[int], bool]:
        destination = _pd_destination(getattr(request, "kv_transfer_params", None))
        # One send per request: a preempted request asked again keeps the one it has.
        if destination is not None and request.request_id not in self._sending:
            self._send_to[request.request_id] = destination
        if not self._loads_kv or self._client is None:
            return 0, False
        prompt = self._considered(list(request.prompt_token_ids or []))
        # vLLM must compute at least the prompt's last token; only whole blocks load.
        limit = (min(len(prompt), len(request.prompt_token_ids or []) - 1) // self._block_size) * self._block_size
        if limit <= num_computed_tokens:
            return 0, False
        try:
            hit = self._client.lookup(prompt[:limit])
        except kvtier.KvtierError as e:
            logger.warning("kvtier: lookup for request %s failed (%s); computing it", request.request_id, e)
            return 0, False
        hit = min(hit, limit) // self._block_size * self._block_size
        loading = max(0, hit - num_computed_tokens)
        logger.info(
            "kvtier: request %s: %d prompt tokens, %d hit in kvtier, loading %d",
            request.request_id,
            len(request.prompt_token_ids or []),
            hit,
            loading,
        )
        return loading, False

    def update_state_after_alloc(
        self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int
    ):
        if num_external_tokens > 0:
            self._pending_loads[request.request_id] = num_external_tokens

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        meta = KvtierConnectorMetadata(
            preempted=sorted(scheduler_output.preempted_req_ids or ()),
            idle=scheduler_output.total_num_scheduled_tokens == 0,
        )
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            prompt = list(new.prompt_token_ids or [])
            block_ids = list(new.block_ids[0])
            tracked = _Tracked(prompt=prompt, block_ids=block_ids, send_to=self._send_to.pop(new.req_id, None))
            self._tracked[new.req_id] = tracked
            external = self._pending_loads.pop(new.req_id, 0)
            if external:
                # `num_computed_tokens` counts vLLM's own hits and ours.
                local = new.num_computed_tokens - external
                meta.loads.append(
                    LoadSpec(new.req_id, prompt[: new.num_computed_tokens], block_ids, local)
                )
            self._plan_save(meta, new.req_id, tracked, new.num_computed_tokens + scheduled.get(new.req_id, 0))
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            tracked = self._tracked.get(req_id)
            if tracked is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                tracked.block_ids = list(new_ids[0]) if new_ids is not None else []
                tracked.saved = False
            elif new_ids is not None:
                tracked.block_ids.extend(new_ids[0])
            computed = cached.num_computed_tokens[i]
            external = self._pending_loads.pop(req_id, 0)
            if external:
                meta.loads.append(
                    LoadSpec(req_id, tracked.prompt[:computed], list(tracked.block_ids), computed - external)
                )
            self._plan_save(meta, req_id, tracked, computed + scheduled.get(req_id, 0))
        return meta

    def _plan_save(self, meta: KvtierConnectorMetadata, req_id: str, tracked: _Tracked, computed_after: int):
        """Saves what this step leaves computed: whole chunks while the prompt is still
        being prefilled, everything (whole blocks) once it is done; and, for a P/D prefill,
        pushes the prompt's KV to the decoder once it is done."""
        if tracked.send_to is not None and computed_after >= len(tracked.prompt):
            to = tracked.send_to
            tracked.send_to = None
            self._sending.add(req_id)
            meta.sends.append(
                SendSpec(req_id, to["transfer_id"], self._considered(tracked.prompt),
                         list(tracked.block_ids), to["host"], to["init_ports"], to["alloc_ports"])
            )
        if not self._saves_kv or tracked.saved:
            return
        prompt = self._considered(tracked.prompt)
        if computed_after >= len(tracked.prompt):
            tokens = prompt
            tracked.saved = True
        else:
            chunk = self._chunk_size
            tokens = prompt[: computed_after // chunk * chunk]
        if len(tokens) >= self._block_size:
            meta.saves.append(SaveSpec(req_id, tokens, list(tracked.block_ids)))

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, Optional[dict[str, Any]]]:
        self._tracked.pop(request.request_id, None)
        self._pending_loads.pop(request.request_id, None)
        self._send_to.pop(request.request_id, None)
        # A planned send reads the blocks until the worker reports it ended.
        sending = request.request_id in self._sending
        self._sending.discard(request.request_id)
        return sending, None

    # ------------------------------------------------------------------ worker side

    def register_kv_caches(self, kv_caches: dict[str, "torch.Tensor"]):
        names = sorted(kv_caches, key=_layer_index)
        tensors = [kv_caches[n] for n in names]
        first = tensors[0]
        model_config = self._vllm_config.model_config
        parallel = self._vllm_config.parallel_config
        kv_heads = model_config.get_num_kv_heads(parallel)
        head_dim = model_config.get_head_size()
        if first.shape[0] < 1 or first[0].numel() != 2 * kv_heads * head_dim * self._block_size:
            raise kvtier.KvtierError(
                f"kvtier moves whole blocks of KV caches laid out [num_blocks, ...] (vLLM's CPU "
                f"backend); layer {names[0]} is shaped {tuple(first.shape)}"
            )
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank
        from vllm.platforms import current_platform

        tp_size = parallel.tensor_parallel_size
        tp_rank = get_tensor_model_parallel_rank() if tp_size > 1 else 0
        block_shape = "x".join(str(d) for d in first.shape[1:])
        namespace = f"{model_config.model}#vllm-paged:{current_platform.device_type}:{block_shape}"
        overrides: dict[str, Any] = {}
        if "discard_partial_chunks" in self._extra:
            overrides["save_unfull_chunk"] = not bool(self._extra["discard_partial_chunks"])
        self._engine = kvtier.Engine(
            namespace,
            layers=len(tensors),
            kv_heads=kv_heads,
            head_dim=head_dim,
            dtype=str(first.dtype),
            layout="PAGED",
            tp_size=tp_size,
            tp_rank=tp_rank,
            overrides=overrides,
        )
        self._tp_rank = tp_rank
        # A P/D endpoint without tiers (the reference decoder: `local_cpu: False`) only
        # moves KV; saving would fail every step.
        self._has_tiers = bool(self._engine.tiers)
        if "cpu" in self._engine.tiers:
            # First-touch page faults would otherwise slow the first saves ~3x, on the
            # request's path (saves run in the step). Bounded by the CPU tier's budget.
            self._engine.prefault(2 << 30)
        self._cache = self._engine.paged_cache(tensors, self._block_size)
        if tp_rank == 0:
            self._engine.serve_lookups(self._socket)
            port = self._extra.get("kvtier_metrics_port")
            if port is not None:
                _serve_metrics(self._engine, int(port))
        logger.info(
            "kvtier: %d layers, %d blocks of %d tokens (%d bytes per layer-block), chunk_size %d",
            len(tensors),
            self._cache.num_blocks,
            self._block_size,
            self._cache.block_bytes,
            self._engine.chunk_size,
        )

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KvtierConnectorMetadata)
        if self._engine is None or self._cache is None:
            return
        bs = self._block_size
        for load in meta.loads:
            start = time.perf_counter()
            try:
                loaded = self._engine.load_blocks(self._cache, load.tokens, load.block_ids, load.skip_tokens)
            except kvtier.KvtierError as e:
                logger.error("kvtier: request %s: load failed: %s", load.req_id, e)
                loaded = 0
            wanted = len(load.tokens)
            if loaded < wanted:
                first_bad = max(loaded, load.skip_tokens) // bs
                self._load_errors.update(load.block_ids[first_bad : (wanted + bs - 1) // bs])
                logger.warning(
                    "kvtier: request %s: loaded %d of %d tokens; %d blocks reported for recomputation",
                    load.req_id,
                    loaded,
                    wanted,
                    (wanted + bs - 1) // bs - first_bad,
                )
            else:
                logger.info(
                    "kvtier: request %s: loaded %d tokens in %.2f ms",
                    load.req_id,
                    loaded - load.skip_tokens,
                    (time.perf_counter() - start) * 1e3,
                )

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer: "torch.Tensor", attn_metadata: Any, **kwargs: Any) -> None:
        return

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        # vLLM hands a preempted request's blocks to others once this step's forward runs.
        for req_id in getattr(kv_connector_metadata, "preempted", ()):
            if req_id in self._sends:
                logger.info("kvtier: request %s preempted; waiting for its P/D send to end", req_id)
                self._send_ended(req_id)

    def wait_for_save(self):
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, KvtierConnectorMetadata)
        for send in meta.sends:
            self._send(send)
        if self._engine is None or self._cache is None or not self._has_tiers:
            return
        for save in meta.saves:
            if save.req_id in self._sends:
                # Saved once the send ends (vLLM holds the blocks until then): the transfer
                # the decoder waits for goes first instead of sharing the CPU with the copy.
                self._deferred_saves[save.req_id] = save
            else:
                self._save(save)

    def _save(self, save: SaveSpec) -> None:
        assert self._engine is not None and self._cache is not None
        try:
            self._engine.store_blocks(self._cache, save.tokens, save.block_ids)
        except kvtier.KvtierError as e:
            # A failed save is a future miss, never an error for the request.
            logger.warning("kvtier: request %s: save failed: %s", save.req_id, e)

    def _send(self, send: SendSpec) -> None:
        """Starts `send` (it runs beside the steps that follow), or marks it ended if it
        cannot start: vLLM must get the request's blocks back either way."""
        pending = None
        rank = self._tp_rank
        if send.req_id in self._sends or send.req_id in self._sends_ended:
            logger.error("kvtier: request %s: a P/D send was already started; not sending again", send.req_id)
            return
        if self._engine is None or self._cache is None:
            logger.error("kvtier: request %s: no KV cache registered to send from", send.req_id)
        elif self._engine.pd_role != "sender":
            logger.error(
                "kvtier: request %s names a P/D receiver, but this instance's kvtier config "
                "is not a P/D sender (enable_pd: true, pd_role: sender)", send.req_id
            )
        elif rank >= len(send.init_ports) or rank >= len(send.alloc_ports):
            logger.error("kvtier: request %s: no receiver port for TP rank %d in %s", send.req_id, rank, send)
        else:
            try:
                pending = self._engine.start_send_blocks(
                    self._cache, send.transfer_id, send.tokens, send.block_ids, send.host,
                    send.init_ports[rank], send.alloc_ports[rank],
                )
            except Exception as e:  # noqa: BLE001 (bad parameters too: never break the step)
                logger.error("kvtier: request %s: P/D send failed: %s", send.req_id, e)
        if pending is None:
            self._sends_ended.add(send.req_id)
            return
        self._sends[send.req_id] = (send, pending)
        logger.info(
            "kvtier: request %s: sending the KV of %d prompt tokens to %s:%d",
            send.req_id, len(send.tokens), send.host, send.init_ports[rank],
        )

    def _send_ended(self, req_id: str, timeout: Optional[float] = None) -> None:
        """Waits for the send of `req_id` to end (at most `timeout` seconds), logs how it
        went and marks it ended."""
        send, pending = self._sends[req_id]
        try:
            r = pending.result(timeout)
        except TimeoutError:
            logger.warning("kvtier: request %s: P/D send still running after %.0f s", req_id, timeout)
            return
        except kvtier.KvtierError as e:
            # The sender told the proxy; the decoder will not find this KV and computes it.
            logger.error("kvtier: request %s: P/D send failed: %s", req_id, e)
        else:
            logger.info(
                "kvtier: request %s: stored %d tokens in %.2f ms (%.2f GB/s) at %s:%d (%d already there)",
                req_id, r.tokens, r.seconds * 1e3, r.bytes / max(r.seconds, 1e-9) / 1e9,
                send.host, send.init_ports[self._tp_rank], r.skipped_tokens,
            )
        del self._sends[req_id]
        self._sends_ended.add(req_id)
        deferred = self._deferred_saves.pop(req_id, None)
        if deferred is not None:
            self._save(deferred)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[Optional[set[str]], Optional[set[str]]]:
        if self._sends and self.has_connector_metadata() and getattr(self._get_connector_metadata(), "idle", False):
            # vLLM steps without work while it holds a send's blocks: give the send a moment
            # to end instead of spinning a core beside it (a new request waits at most that).
            oldest = next(iter(self._sends.values()))[1]
            try:
                oldest.result(timeout=_IDLE_WAIT_SEC)
            except (TimeoutError, kvtier.KvtierError):
                pass
        for req_id, (_, pending) in list(self._sends.items()):
            if pending.done():
                self._send_ended(req_id)
        # Only ids vLLM has passed here may be reported, each once, when its send ended.
        self._finished_sending |= {r for r in finished_req_ids if r in self._sends or r in self._sends_ended}
        done = self._finished_sending & self._sends_ended
        self._finished_sending -= done
        self._sends_ended -= done
        return (done or None), None

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def shutdown(self):
        if self._sends:
            logger.info("kvtier: waiting up to 30 s for %d P/D sends to end", len(self._sends))
            deadline = time.monotonic() + 30.0
            for req_id in list(self._sends):
                self._send_ended(req_id, timeout=max(0.0, deadline - time.monotonic()))
        if self._engine is not None:
            try:
                self._engine.flush()
            except kvtier.KvtierError as e:
                logger.warning("kvtier: flush at shutdown failed: %s", e)
            if self._tp_rank == 0:
                # The lookup socket's file outlives the listener otherwise.
                try:
                    os.unlink(self._socket)
                except OSError:
                    pass

    def metrics_text(self) -> str:
        """The worker engine's Prometheus metrics (empty on the scheduler side)."""
        return self._engine.metrics_text() if self._engine is not None else ""

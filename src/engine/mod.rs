//! The engine: what an inference server embeds.
//!
//! An [`Engine`] turns token sequences into chunk keys, stores the KV of those chunks in
//! its tiers, and answers "how much of this prompt is cached?" and "load it".
//!
//! KV is passed as host memory in the model's layout for the whole token sequence:
//! `[kv_factor, layers, tokens, hidden]` elements of `dtype` (LMCache's `KV_2LTD`), i.e.
//! [`ModelSpec::bytes_per_token`] × `tokens.len()` bytes. Store cuts it into chunks
//! (copying on all cores into pooled, pre-faulted buffers); [`Engine::store_chunks`] takes
//! chunk buffers the caller filled and stores them without a copy.

use std::sync::Arc;
use std::time::{Duration, Instant};

mod builder;
pub use builder::EngineBuilder;

use rayon::prelude::*;

use crate::config::{Config, EngineSettings, PdSettings, TierSettings};
use crate::error::{Error, Result};
use crate::keys::{ChunkHasher, ChunkKey, ChunkSpan};
use crate::memory::{copy_bulk, BufferPool, KvBuffer};
use crate::metrics::{gb_per_s, Metrics};
use crate::model::ModelSpec;
use crate::pd::{PdReceiver, PdSender};
use crate::remote::offload::RemoteLink;
use crate::remote::RemoteTier;
use crate::storage::StorageManager;
use crate::tier::cpu::CpuTier;
use crate::tier::disk::{DiskTier, RecoveryReport};
use crate::tier::{Chunk, ChunkRef, TierKind, TierUsage};

/// What a store did.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StoreReport {
    /// Tokens whose chunks were stored now.
    pub stored_tokens: usize,
    /// Tokens whose chunks were already cached (skipped).
    pub cached_tokens: usize,
    /// KV bytes stored now.
    pub bytes: u64,
    /// Wall time.
    pub elapsed: Duration,
}

/// What a retrieve did.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RetrieveReport {
    /// Leading tokens whose KV was loaded.
    pub tokens: usize,
    /// KV bytes loaded.
    pub bytes: u64,
    /// Wall time.
    pub elapsed: Duration,
}

/// Idle buffers the pool keeps for reuse: a few requests' worth, within the CPU budget.
fn idle_budget(tiers: &TierSettings, chunk_bytes: usize) -> usize {
    let cpu = tiers.cpu_bytes.unwrap_or(u64::MAX);
    usize::try_from(cpu)
        .unwrap_or(usize::MAX)
        .clamp(chunk_bytes * 4, 2 << 30)
}

struct Inner {
    settings: EngineSettings,
    model: ModelSpec,
    hasher: ChunkHasher,
    storage: StorageManager,
    pool: BufferPool,
    metrics: Metrics,
    recovered: Option<RecoveryReport>,
    pd: Option<PdEndpoint>,
}

/// The P/D role an engine plays (`enable_pd`, `pd_role`).
enum PdEndpoint {
    Sender(Box<PdSender>),
    Receiver(Box<PdReceiver>),
}

/// The KV-cache engine. Cheap to clone (shared); every method takes `&self`.
///
/// ```
/// # tokio_test_block_on(async {
/// use kvtier::{Config, Engine, ModelSpec};
///
/// let config = Config { max_local_cpu_size: 256 << 20, ..Config::default() };
/// let mut model = ModelSpec::llama_3_1_8b();
/// model.layers = 2; // small, for the example
/// let engine = Engine::from_config(config, model.clone()).await?;
///
/// let tokens: Vec<u32> = (0..600).collect();
/// let kv: Vec<u8> = (0..model.bytes_per_token() * tokens.len()).map(|i| i as u8).collect();
/// engine.store(&tokens, &kv).await?;
///
/// // A longer prompt that shares the first 600 tokens hits on the full chunks.
/// let mut prompt = tokens.clone();
/// prompt.extend(1000..1100);
/// assert_eq!(engine.lookup(&prompt).await?, 512);
///
/// let mut out = vec![0u8; kv.len()];
/// let loaded = engine.retrieve(&tokens, &mut out).await?;
/// assert_eq!(loaded.tokens, 600);
/// assert_eq!(out, kv);
/// # Ok::<(), kvtier::Error>(())
/// # }).unwrap();
/// # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
/// #     tokio::runtime::Runtime::new().unwrap().block_on(f)
/// # }
/// ```
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("model", &self.inner.model.name)
            .field("tiers", &self.usage())
            .finish()
    }
}

impl Engine {
    /// An engine for `model` with the tiers `config` asks for: checks `config`, logs its
    /// warnings, and builds the engine from its [`EngineSettings`] (see
    /// [`Engine::builder`] to start from settings instead of YAML).
    pub async fn from_config(config: Config, model: ModelSpec) -> Result<Engine> {
        config.validate()?;
        for warning in config.warnings() {
            tracing::warn!("{warning}");
        }
        EngineBuilder::from_settings(model, config.engine_settings())
            .build()
            .await
    }

    /// A builder of an engine for `model`, with every setting at its default (those of an
    /// empty configuration file, documented on each setter).
    pub fn builder(model: ModelSpec) -> EngineBuilder {
        EngineBuilder::new(model)
    }

    /// Opens an engine from checked settings (see [`EngineBuilder::build`]).
    async fn open(model: ModelSpec, settings: EngineSettings) -> Result<Engine> {
        if model.layers == 0 || model.hidden() == 0 {
            return Err(Error::Shape(format!(
                "model {} has no KV: {model:?}",
                model.name
            )));
        }
        let keys = &settings.keys;
        let tiers = &settings.tiers;
        let hasher = ChunkHasher::new(
            &model.namespace(keys.chunk_size),
            keys.hash_seed,
            keys.save_unfull_chunk,
        );
        let metrics = Metrics::new();
        let chunk_bytes = model.bytes_per_token() * keys.chunk_size;
        let pool = BufferPool::new(idle_budget(tiers, chunk_bytes));
        let cpu = tiers.cpu_bytes.map(CpuTier::new);
        let (disk, recovered) = match &tiers.disk {
            Some(d) => {
                let (dir, cap, depth, pool) =
                    (d.dir.clone(), d.capacity_bytes, d.write_queue, pool.clone());
                let (tier, report) =
                    tokio::task::spawn_blocking(move || DiskTier::open(dir, cap, depth, pool))
                        .await
                        .map_err(|source| Error::Task {
                            what: "opening the disk tier",
                            source,
                        })??;
                tracing::info!(
                    dir = %tier.dir().display(),
                    "disk tier: {} chunks ({:.2} GB) recovered, {} discarded, {} evicted",
                    report.chunks,
                    report.bytes as f64 / 1e9,
                    report.discarded,
                    report.evicted
                );
                (Some(tier), Some(report))
            }
            None => (None, None),
        };
        let mut storage = StorageManager::new(cpu, disk, metrics.clone());
        if tiers.gpu_bytes > 0 {
            #[cfg(feature = "cuda")]
            {
                let gpu =
                    crate::tier::gpu::GpuTier::new(0, tiers.gpu_bytes, chunk_bytes, pool.clone())?;
                storage = storage.with_gpu(gpu);
            }
            #[cfg(not(feature = "cuda"))]
            return Err(Error::Unsupported(
                "`max_local_gpu_size` > 0 needs kvtier built with `--features cuda`".into(),
            ));
        }
        let pd = match &settings.pd {
            None => None,
            Some(PdSettings::Sender(s)) => Some(PdEndpoint::Sender(Box::new(
                PdSender::new(s, model.clone(), metrics.clone()).await?,
            ))),
            Some(PdSettings::Receiver(r)) => Some(PdEndpoint::Receiver(Box::new(
                PdReceiver::start(r, model.clone(), metrics.clone()).await?,
            ))),
        };
        if let Some(r) = &settings.remote {
            let link = RemoteLink::open(RemoteTier::open(r).await?, metrics.clone());
            storage = storage.with_remote(link);
        }
        Ok(Engine {
            inner: Arc::new(Inner {
                settings,
                model,
                hasher,
                storage,
                pool,
                metrics,
                recovered,
                pd,
            }),
        })
    }

    /// The settings the engine runs with.
    pub fn settings(&self) -> &EngineSettings {
        &self.inner.settings
    }

    /// The model.
    pub fn model(&self) -> &ModelSpec {
        &self.inner.model
    }

    /// The engine's metrics (serve [`Metrics::encode_text`] at `/metrics`).
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// The P/D sender, when `pd_role: sender`. Its [`PdSender::send`] pushes a request's
    /// KV to the decoder named in the request (LMCache's `kv_transfer_params`).
    pub fn pd_sender(&self) -> Option<&PdSender> {
        match &self.inner.pd {
            Some(PdEndpoint::Sender(s)) => Some(s),
            _ => None,
        }
    }

    /// The P/D receiver, when `pd_role: receiver`. [`Engine::lookup`] and
    /// [`Engine::retrieve`] consult its buffer first.
    pub fn pd_receiver(&self) -> Option<&PdReceiver> {
        match &self.inner.pd {
            Some(PdEndpoint::Receiver(r)) => Some(r),
            _ => None,
        }
    }

    /// The kvtier store behind the remote tier, when `remote_url` names one (placement,
    /// stats and direct object access).
    pub fn remote_store(&self) -> Option<&crate::remote::client::StoreClient> {
        self.inner.storage.remote_store()
    }

    /// What the disk tier found when the engine opened it.
    pub fn recovered(&self) -> Option<RecoveryReport> {
        self.inner.recovered
    }

    /// Occupancy of every tier, top to bottom.
    pub fn usage(&self) -> Vec<(TierKind, TierUsage)> {
        self.inner.storage.usage()
    }

    /// Chunk keys of `tokens`.
    pub fn chunk_keys(&self, tokens: &[u32]) -> Vec<ChunkKey> {
        self.inner.hasher.keys(tokens)
    }

    /// Chunk keys of `tokens` with the token range each covers.
    pub fn chunk_spans(&self, tokens: &[u32]) -> Vec<ChunkSpan> {
        self.inner.hasher.spans(tokens)
    }

    /// Faults in up to `bytes` of chunk buffers for the pool (bounded by the pool's idle
    /// budget), on a background thread: stores that follow copy into touched memory
    /// instead of paying first-touch page faults (about 3× a copy), as an engine that
    /// allocates its whole CPU cache up front would. Returns at once.
    pub fn prefault(&self, bytes: usize) {
        let settings = &self.inner.settings;
        let chunk_bytes = self.inner.model.bytes_per_token() * settings.keys.chunk_size;
        let count = bytes.min(idle_budget(&settings.tiers, chunk_bytes)) / chunk_bytes.max(1);
        if count == 0 {
            return;
        }
        let pool = self.inner.pool.clone();
        let spawned = std::thread::Builder::new()
            .name("kvtier-prefault".into())
            .spawn(move || pool.prefault(chunk_bytes, count));
        if let Err(e) = spawned {
            tracing::warn!("prefault skipped: cannot start a thread: {e}");
        }
    }

    /// A pooled buffer of `len` bytes, for filling and handing to [`Engine::store_chunks`].
    pub fn alloc(&self, len: usize) -> KvBuffer {
        self.inner.pool.alloc(len)
    }

    fn check_kv_len(&self, tokens: usize, len: usize, what: &str) -> Result<()> {
        let expected = tokens * self.inner.model.bytes_per_token();
        if len != expected {
            return Err(Error::Shape(format!(
                "{what}: {len} bytes for {tokens} tokens; model {} needs {expected} ({} per token)",
                self.inner.model.name,
                self.inner.model.bytes_per_token()
            )));
        }
        Ok(())
    }

    /// Stores the KV of `tokens` (`kv`: `[kv_factor, layers, tokens, hidden]`, see the
    /// module docs). Chunks already cached are skipped; a trailing partial chunk is stored
    /// only with `save_unfull_chunk`.
    pub async fn store(&self, tokens: &[u32], kv: &[u8]) -> Result<StoreReport> {
        self.check_kv_len(tokens.len(), kv.len(), "store")?;
        let model = &self.inner.model;
        let row = model.chunk_shape(1).row_bytes();
        let planes = model.layout.kv_factor() * model.layers as usize;
        let total = tokens.len();
        self.store_with(tokens, |span, data| {
            let seg = span.tokens() * row;
            for (plane, dst) in data.chunks_exact_mut(seg).take(planes).enumerate() {
                let src = (plane * total + span.start) * row;
                copy_bulk(dst, &kv[src..src + seg]);
            }
        })
        .await
    }

    /// Stores the chunks of `tokens` that no tier holds yet, each filled by `fill` (called
    /// in parallel, once per new chunk, with the chunk's span and its zeroed-or-reused
    /// payload buffer of [`ChunkShape::payload_len`] bytes, which `fill` must overwrite
    /// whole). The way to store KV that lives in the caller's own layout (e.g. the blocks
    /// of a paged cache) with one copy.
    pub async fn store_with<F>(&self, tokens: &[u32], fill: F) -> Result<StoreReport>
    where
        F: Fn(&ChunkSpan, &mut [u8]) + Sync,
    {
        let start = Instant::now();
        let spans = self.inner.hasher.spans(tokens);
        let new = self.uncached(&spans);
        let model = &self.inner.model;
        let chunks: Vec<ChunkRef> = new
            .par_iter()
            .map(|span| {
                let shape = model.chunk_shape(span.tokens());
                let mut data = self.inner.pool.alloc(shape.payload_len());
                fill(span, &mut data);
                Arc::new(Chunk {
                    key: span.key,
                    shape,
                    data,
                })
            })
            .collect();
        self.finish_store(&spans, chunks, start).await
    }

    /// Stores chunk buffers the caller filled (one per chunk of `tokens`, each in the
    /// chunk's `[kv_factor, layers, chunk_tokens, hidden]` layout), without copying.
    pub async fn store_chunks(
        &self,
        tokens: &[u32],
        buffers: Vec<KvBuffer>,
    ) -> Result<StoreReport> {
        let start = Instant::now();
        let spans = self.inner.hasher.spans(tokens);
        if buffers.len() != spans.len() {
            return Err(Error::Shape(format!(
                "store_chunks: {} buffers for {} chunks of {} tokens",
                buffers.len(),
                spans.len(),
                tokens.len()
            )));
        }
        let present = self
            .inner
            .storage
            .mark_present(&spans.iter().map(|s| s.key).collect::<Vec<_>>());
        let mut chunks = Vec::new();
        for ((span, data), cached) in spans.iter().zip(buffers).zip(present) {
            let chunk = Chunk::new(span.key, self.inner.model.chunk_shape(span.tokens()), data)?;
            if !cached {
                chunks.push(chunk);
            }
        }
        self.finish_store(&spans, chunks, start).await
    }

    fn uncached(&self, spans: &[ChunkSpan]) -> Vec<ChunkSpan> {
        let keys: Vec<ChunkKey> = spans.iter().map(|s| s.key).collect();
        let present = self.inner.storage.mark_present(&keys);
        spans
            .iter()
            .zip(present)
            .filter(|(_, p)| !p)
            .map(|(s, _)| *s)
            .collect()
    }

    async fn finish_store(
        &self,
        spans: &[ChunkSpan],
        chunks: Vec<ChunkRef>,
        start: Instant,
    ) -> Result<StoreReport> {
        let storage = &self.inner.storage;
        storage.put_remote(&chunks).await?;
        if storage.is_empty() && !storage.has_remote() {
            let hint = if self.pd_sender().is_some() {
                "; a P/D sender pushes KV with `engine.pd_sender().send(...)`"
            } else {
                ""
            };
            return Err(Error::Unsupported(format!(
                "store: no storage tier is configured (`local_cpu` is false and `local_disk` unset){hint}"
            )));
        }
        if !self.inner.storage.is_empty() {
            self.inner.storage.put_batch(&chunks)?;
        }
        let stored_tokens: usize = chunks.iter().map(|c| c.shape.tokens as usize).sum();
        let all_tokens: usize = spans.iter().map(|s| s.tokens()).sum();
        let bytes: u64 = chunks.iter().map(|c| c.payload().len() as u64).sum();
        let elapsed = start.elapsed();
        let m = &self.inner.metrics;
        m.store_tokens.inc_by(stored_tokens as u64);
        m.store_bytes.inc_by(bytes);
        m.op_seconds
            .with_label_values(&["store"])
            .observe(elapsed.as_secs_f64());
        if stored_tokens > 0 {
            tracing::info!(
                "stored {stored_tokens} tokens ({} already cached) in {:.2} ms ({:.1} GB/s)",
                all_tokens - stored_tokens,
                elapsed.as_secs_f64() * 1e3,
                gb_per_s(bytes, elapsed)
            );
        } else {
            tracing::debug!("store: all {all_tokens} tokens already cached");
        }
        Ok(StoreReport {
            stored_tokens,
            cached_tokens: all_tokens - stored_tokens,
            bytes,
            elapsed,
        })
    }

    /// Length in tokens of the longest cached prefix of `tokens`.
    pub async fn lookup(&self, tokens: &[u32]) -> Result<usize> {
        let start = Instant::now();
        let spans = self.inner.hasher.spans(tokens);
        let keys: Vec<ChunkKey> = spans.iter().map(|s| s.key).collect();
        let mut hit = self.inner.storage.contains_prefix(&keys);
        if hit < keys.len() {
            hit += self.inner.storage.remote_prefix(&keys[hit..]).await;
        }
        let tiers_hit = if hit == 0 { 0 } else { spans[hit - 1].end };
        let pd_hit = self.pd_receiver().map_or(0, |r| r.lookup(tokens));
        let hit_tokens = tiers_hit.max(pd_hit);
        let m = &self.inner.metrics;
        m.lookup_tokens.inc_by(tokens.len() as u64);
        m.lookup_hit_tokens.inc_by(hit_tokens as u64);
        m.op_seconds
            .with_label_values(&["lookup"])
            .observe(start.elapsed().as_secs_f64());
        tracing::debug!("lookup: {} tokens, {hit_tokens} hit", tokens.len());
        Ok(hit_tokens)
    }

    /// The cached chunks of the longest cached prefix of `tokens`, without copying. Every
    /// chunk, from whichever tier, has been checked against its key and the model's shape
    /// (see [`Engine::retrieve_prefix`]).
    pub async fn retrieve_chunks(&self, tokens: &[u32]) -> Result<Vec<ChunkRef>> {
        let spans = self.inner.hasher.spans(tokens);
        let keys: Vec<ChunkKey> = spans.iter().map(|s| s.key).collect();
        let plan = self.inner.storage.plan_prefix(&keys);
        let local = if plan.reads() == 0 {
            // Everything is in memory: no I/O, no need to leave this task.
            self.inner.storage.fetch(plan)
        } else {
            let engine = self.clone();
            tokio::task::spawn_blocking(move || engine.inner.storage.fetch(plan))
                .await
                .map_err(|source| Error::Task {
                    what: "retrieve",
                    source,
                })?
        };
        let found = local.len();
        let mut chunks = self.model_prefix(&spans, local);
        if chunks.len() == found && found < keys.len() && self.inner.storage.has_remote() {
            let storage = &self.inner.storage;
            let fetched = storage.read_remote(&keys[found..], &self.inner.pool).await;
            // Checked before promotion: a chunk of another shape never enters the local
            // tiers (where lookups would count it as a hit).
            let fetched = self.model_prefix(&spans[found..], fetched);
            storage.promote(&fetched);
            chunks.extend(fetched);
        }
        Ok(chunks)
    }

    /// The leading `chunks` whose key and shape are what `spans` and the model call for.
    /// A chunk of another shape (a file or store object written for another model, or one
    /// whose header was damaged consistently with its checksum) ends the prefix like a
    /// miss and is counted in `kvtier_corrupt_chunks_total{tier="shape"}`: nobody slices a
    /// payload by a shape that is not the model's.
    fn model_prefix(&self, spans: &[ChunkSpan], mut chunks: Vec<ChunkRef>) -> Vec<ChunkRef> {
        let model = &self.inner.model;
        let good = spans
            .iter()
            .zip(&chunks)
            .take_while(|(span, chunk)| {
                let expected = model.chunk_shape(span.tokens());
                let ok = chunk.key == span.key
                    && chunk.shape == expected
                    && chunk.payload().len() == expected.payload_len();
                if !ok {
                    self.inner
                        .metrics
                        .corrupt_chunks
                        .with_label_values(&["shape"])
                        .inc();
                    tracing::error!(
                        "chunk {} ({} bytes): shape {:?} does not match the model's {expected:?}; \
                         treated as a miss",
                        span.key,
                        chunk.payload().len(),
                        chunk.shape
                    );
                }
                ok
            })
            .count();
        chunks.truncate(good);
        chunks
    }

    /// The chunks of the longest cached prefix of `tokens` whose shape is this engine's
    /// model (a chunk of another shape ends the prefix like a miss and is counted in
    /// `kvtier_corrupt_chunks_total{tier="shape"}`), with the spans they cover. Counted in
    /// the retrieve metrics; the caller copies the payloads where it needs them.
    pub async fn retrieve_prefix(&self, tokens: &[u32]) -> Result<Vec<(ChunkSpan, ChunkRef)>> {
        let start = Instant::now();
        let spans = self.inner.hasher.spans(tokens);
        let chunks = self.retrieve_chunks(tokens).await?;
        let model = &self.inner.model;
        let out: Vec<(ChunkSpan, ChunkRef)> = spans.into_iter().zip(chunks).collect();
        let loaded = out.last().map_or(0, |(span, _)| span.end);
        let bytes = (loaded * model.bytes_per_token()) as u64;
        let elapsed = start.elapsed();
        let m = &self.inner.metrics;
        m.retrieve_tokens.inc_by(tokens.len() as u64);
        m.retrieve_hit_tokens.inc_by(loaded as u64);
        m.retrieve_bytes.inc_by(bytes);
        m.op_seconds
            .with_label_values(&["retrieve"])
            .observe(elapsed.as_secs_f64());
        Ok(out)
    }

    /// Loads the KV of the longest cached prefix of `tokens` into `out` (laid out as for
    /// [`Engine::store`] for all of `tokens`); bytes past the loaded prefix are untouched.
    pub async fn retrieve(&self, tokens: &[u32], out: &mut [u8]) -> Result<RetrieveReport> {
        let start = Instant::now();
        self.check_kv_len(tokens.len(), out.len(), "retrieve")?;
        if let Some(receiver) = self.pd_receiver() {
            let loaded = receiver.retrieve("engine", tokens, out).await?;
            if loaded > 0 {
                let bytes = (loaded * self.inner.model.bytes_per_token()) as u64;
                let m = &self.inner.metrics;
                m.retrieve_tokens.inc_by(tokens.len() as u64);
                m.retrieve_hit_tokens.inc_by(loaded as u64);
                m.retrieve_bytes.inc_by(bytes);
                return Ok(RetrieveReport {
                    tokens: loaded,
                    bytes,
                    elapsed: start.elapsed(),
                });
            }
        }
        let chunks = self.retrieve_chunks(tokens).await?;
        let model = &self.inner.model;
        let row = model.chunk_shape(1).row_bytes();
        let total = tokens.len();
        let plane_bytes = total * row;
        out.par_chunks_mut(plane_bytes.max(1))
            .enumerate()
            .for_each(|(plane, dst)| {
                let mut at = 0;
                for chunk in &chunks {
                    let seg = chunk.shape.tokens as usize * row;
                    let src = &chunk.payload()[plane * seg..(plane + 1) * seg];
                    copy_bulk(&mut dst[at..at + seg], src);
                    at += seg;
                }
            });
        let loaded: usize = chunks.iter().map(|c| c.shape.tokens as usize).sum();
        let bytes = (loaded * model.bytes_per_token()) as u64;
        let elapsed = start.elapsed();
        let m = &self.inner.metrics;
        m.retrieve_tokens.inc_by(total as u64);
        m.retrieve_hit_tokens.inc_by(loaded as u64);
        m.retrieve_bytes.inc_by(bytes);
        m.op_seconds
            .with_label_values(&["retrieve"])
            .observe(elapsed.as_secs_f64());
        tracing::info!(
            "retrieved {loaded} of {total} tokens in {:.2} ms ({:.1} GB/s)",
            elapsed.as_secs_f64() * 1e3,
            gb_per_s(bytes, elapsed)
        );
        Ok(RetrieveReport {
            tokens: loaded,
            bytes,
            elapsed,
        })
    }

    /// Removes the chunks of `tokens` from every tier; returns how many were held.
    pub async fn remove(&self, tokens: &[u32]) -> Result<usize> {
        let keys = self.inner.hasher.keys(tokens);
        let local = self.inner.storage.remove(&keys);
        Ok(local.max(self.inner.storage.remove_remote(&keys).await))
    }

    /// Empties every local tier (the remote tier is shared with other engines: use
    /// [`Engine::remove`] for what should leave it).
    pub async fn clear(&self) -> Result<()> {
        self.inner.storage.clear();
        Ok(())
    }

    /// Waits until every chunk stored so far has reached the disk tier and has been
    /// written to (or given up on by) the remote tier.
    pub async fn flush(&self) -> Result<()> {
        self.inner.storage.flush_remote().await;
        let engine = self.clone();
        tokio::task::spawn_blocking(move || engine.inner.storage.flush())
            .await
            .map_err(|source| Error::Task {
                what: "flush",
                source,
            })
    }
}

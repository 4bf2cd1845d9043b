//! `kvtier._kvtier`: the Python face of the kvtier engine.
//!
//! Python holds only control flow: every call that copies KV, hashes, touches a tier or
//! waits on the network runs in Rust with the GIL released, on one process-wide tokio
//! runtime. KV memory is the caller's (torch CPU tensors or any C-contiguous
//! buffer-protocol object): kvtier reads and writes it in place, never through Python
//! `bytes`.
//!
//! Modules: [`memory`] (borrowing caller memory), [`paged`] (vLLM's paged KV cache as
//! whole blocks), [`lookup`] (the scheduler↔worker lookup channel).

mod lookup;
mod memory;
mod paged;

use std::sync::OnceLock;
use std::time::Duration;

use pyo3::exceptions::{PyException, PyTimeoutError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use kvtier::{Config, DType, KvLayout, ModelSpec};

pyo3::create_exception!(
    _kvtier,
    KvtierError,
    PyException,
    "An error reported by kvtier; the message names the bad key, field or peer."
);

/// Converts a kvtier error into [`KvtierError`] with kvtier's message.
pub(crate) fn py_err(e: impl std::fmt::Display) -> PyErr {
    KvtierError::new_err(e.to_string())
}

/// The process-wide runtime every engine call runs on.
pub(crate) fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("kvtier")
            .build()
            .expect("the kvtier runtime starts")
    })
}

fn init_logging() {
    static INIT: OnceLock<()> = OnceLock::new();
    INIT.get_or_init(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_env("KVTIER_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        // Another subscriber (an embedding Rust program) wins; that is fine.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_target(false)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init();
    });
}

/// The configuration as the CLI reads it, then `overrides` (`{key: value}`) on top.
fn resolve_config(
    config_file: Option<String>,
    overrides: Option<&Bound<'_, PyDict>>,
) -> PyResult<Config> {
    let mut vars: Vec<(String, String)> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect();
    if let Some(file) = config_file {
        vars.retain(|(k, _)| k != "KVTIER_CONFIG_FILE" && k != "LMCACHE_CONFIG_FILE");
        vars.push(("KVTIER_CONFIG_FILE".into(), file));
    }
    if let Some(overrides) = overrides {
        for (k, v) in overrides.iter() {
            let key: String = k.extract()?;
            let value = if v.is_instance_of::<pyo3::types::PyBool>() {
                v.extract::<bool>()?.to_string()
            } else {
                v.str()?.to_string()
            };
            // Applied last: replaces the same key from the environment.
            let name = format!("KVTIER_{}", key.to_ascii_uppercase());
            vars.retain(|(k, _)| *k != name);
            vars.push((name, value));
        }
    }
    Config::from_env_vars(vars).map_err(py_err)
}

/// What a store did.
#[pyclass(module = "kvtier._kvtier", frozen, get_all, skip_from_py_object)]
#[derive(Clone)]
pub struct StoreReport {
    /// Tokens whose chunks were stored now.
    stored_tokens: usize,
    /// Tokens whose chunks were already cached (skipped).
    cached_tokens: usize,
    /// KV bytes stored now.
    bytes: u64,
    /// Wall time in seconds.
    seconds: f64,
}

#[pymethods]
impl StoreReport {
    fn __repr__(&self) -> String {
        format!(
            "StoreReport(stored_tokens={}, cached_tokens={}, bytes={}, seconds={:.6})",
            self.stored_tokens, self.cached_tokens, self.bytes, self.seconds
        )
    }
}

impl From<kvtier::StoreReport> for StoreReport {
    fn from(r: kvtier::StoreReport) -> Self {
        StoreReport {
            stored_tokens: r.stored_tokens,
            cached_tokens: r.cached_tokens,
            bytes: r.bytes,
            seconds: r.elapsed.as_secs_f64(),
        }
    }
}

/// What a P/D send did.
#[pyclass(module = "kvtier._kvtier", frozen, get_all, skip_from_py_object)]
#[derive(Clone)]
pub struct SendReport {
    /// Tokens whose chunks were written to the receiver.
    tokens: usize,
    /// Tokens whose chunks the receiver already held.
    skipped_tokens: usize,
    /// Bytes written.
    bytes: u64,
    /// Transfer time in seconds (allocation, staging, writes, commit).
    seconds: f64,
}

#[pymethods]
impl SendReport {
    fn __repr__(&self) -> String {
        format!(
            "SendReport(tokens={}, skipped_tokens={}, bytes={}, seconds={:.6})",
            self.tokens, self.skipped_tokens, self.bytes, self.seconds
        )
    }
}

impl From<kvtier::pd::SendReport> for SendReport {
    fn from(r: kvtier::pd::SendReport) -> Self {
        SendReport {
            tokens: r.tokens,
            skipped_tokens: r.skipped_tokens,
            bytes: r.bytes,
            seconds: r.elapsed.as_secs_f64(),
        }
    }
}

/// A P/D send running on kvtier's runtime (made by `Engine.start_send_blocks`).
#[pyclass(module = "kvtier._kvtier", frozen)]
pub struct PendingSend {
    /// The request the send is for.
    #[pyo3(get)]
    req_id: String,
    /// `None` until the send ends; then its report, or why it failed.
    outcome: tokio::sync::watch::Receiver<Option<Result<SendReport, String>>>,
}

#[pymethods]
impl PendingSend {
    /// Whether the send has ended (done or failed): its blocks are no longer read.
    fn done(&self) -> bool {
        // A task that ended without an outcome (it panicked) dropped its end of the channel.
        self.outcome.borrow().is_some() || self.outcome.has_changed().is_err()
    }

    /// Waits for the send to end (at most `timeout` seconds; `None`: as long as it takes)
    /// and returns its report; raises `KvtierError` with the reason if it failed, and
    /// `TimeoutError` if it is still running after `timeout`.
    #[pyo3(signature = (timeout=None))]
    fn result(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<SendReport> {
        let limit = match timeout {
            Some(s) if s.is_nan() => return Err(PyValueError::new_err("timeout is NaN")),
            // Too long to represent (or infinite): no limit.
            Some(s) => Duration::try_from_secs_f64(s.max(0.0)).ok(),
            None => None,
        };
        let mut outcome = self.outcome.clone();
        let waited = py.detach(|| {
            runtime().block_on(async {
                let ended = outcome.wait_for(Option::is_some);
                match limit {
                    Some(limit) => tokio::time::timeout(limit, ended)
                        .await
                        .map(|r| r.map(|o| o.clone())),
                    None => Ok(ended.await.map(|o| o.clone())),
                }
            })
        });
        match waited {
            Ok(Ok(Some(Ok(report)))) => Ok(report),
            Ok(Ok(Some(Err(reason)))) => {
                Err(py_err(format!("P/D send of {}: {reason}", self.req_id)))
            }
            Ok(Ok(None) | Err(_)) => Err(py_err(format!(
                "P/D send of {} ended without an outcome (its task panicked, or kvtier's \
                 runtime stopped)",
                self.req_id
            ))),
            Err(_) => Err(PyTimeoutError::new_err(format!(
                "P/D send of {} still running after {:.3} s",
                self.req_id,
                timeout.unwrap_or_default()
            ))),
        }
    }

    fn __repr__(&self) -> String {
        let state = match &*self.outcome.borrow() {
            None => "running",
            Some(Ok(_)) => "done",
            Some(Err(_)) => "failed",
        };
        format!("PendingSend(req_id={:?}, {state})", self.req_id)
    }
}

/// A kvtier engine: chunk keys, tiers, lookup, store and retrieve.
#[pyclass(module = "kvtier._kvtier", frozen)]
pub struct Engine {
    pub(crate) inner: kvtier::Engine,
}

#[pymethods]
impl Engine {
    /// Opens an engine for a model's KV.
    ///
    /// The configuration is read as the `kvtier` CLI reads it: `config_file`, else the file
    /// named by `KVTIER_CONFIG_FILE` / `LMCACHE_CONFIG_FILE`, else the defaults; then the
    /// `KVTIER_<KEY>` / `LMCACHE_<KEY>` environment overrides; then `overrides`
    /// (`{key: value}`, values as in the YAML, applied last).
    #[new]
    #[pyo3(signature = (model, layers, kv_heads, head_dim, dtype="bfloat16", layout="KV_2LTD", tp_size=1, tp_rank=0, config_file=None, overrides=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        model: String,
        layers: u32,
        kv_heads: u32,
        head_dim: u32,
        dtype: &str,
        layout: &str,
        tp_size: u32,
        tp_rank: u32,
        config_file: Option<String>,
        overrides: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Self> {
        init_logging();
        let dtype: DType = dtype.parse().map_err(py_err)?;
        let layout: KvLayout = layout.parse().map_err(py_err)?;
        let config = resolve_config(config_file, overrides)?;
        let spec = ModelSpec {
            name: model,
            layers,
            kv_heads,
            head_dim,
            dtype,
            layout,
            tp_size,
            tp_rank,
        };
        let inner = py
            .detach(|| runtime().block_on(kvtier::Engine::from_config(config, spec)))
            .map_err(py_err)?;
        Ok(Engine { inner })
    }

    /// Tokens per chunk (`chunk_size`).
    #[getter]
    fn chunk_size(&self) -> usize {
        self.inner.settings().keys.chunk_size
    }

    /// KV bytes per token.
    #[getter]
    fn bytes_per_token(&self) -> usize {
        self.inner.model().bytes_per_token()
    }

    /// Whether this engine is a P/D receiver (decoder) or sender (prefiller), or `None`.
    #[getter]
    fn pd_role(&self) -> Option<&'static str> {
        if self.inner.pd_receiver().is_some() {
            Some("receiver")
        } else if self.inner.pd_sender().is_some() {
            Some("sender")
        } else {
            None
        }
    }

    /// The storage tiers this engine stores into, top to bottom (`gpu`, `cpu`, `disk`,
    /// `remote`); empty for a pure P/D endpoint.
    #[getter]
    fn tiers(&self) -> Vec<String> {
        let mut tiers: Vec<String> = self
            .inner
            .usage()
            .into_iter()
            .map(|(kind, _)| kind.name().to_string())
            .collect();
        if self.inner.settings().remote.is_some() {
            tiers.push("remote".into());
        }
        tiers
    }

    /// The chunk keys of `tokens`, as 32-digit hex strings (the same in every process and
    /// language for the same model namespace and `hash_seed`).
    fn chunk_keys(&self, py: Python<'_>, tokens: Vec<u32>) -> Vec<String> {
        py.detach(|| {
            self.inner
                .chunk_keys(&tokens)
                .iter()
                .map(|k| k.to_string())
                .collect()
        })
    }

    /// Length in tokens of the longest prefix of `tokens` held by some tier.
    fn lookup(&self, py: Python<'_>, tokens: Vec<u32>) -> PyResult<usize> {
        py.detach(|| runtime().block_on(self.inner.lookup(&tokens)))
            .map_err(py_err)
    }

    /// Stores the KV of `tokens` from `kv` (`[kv_factor, layers, tokens, hidden]` elements
    /// of the model's dtype: a torch CPU tensor or a buffer-protocol object).
    fn store(
        &self,
        py: Python<'_>,
        tokens: Vec<u32>,
        kv: &Bound<'_, PyAny>,
    ) -> PyResult<StoreReport> {
        let kv = memory::HostMemory::borrow(kv, false)?;
        let region = kv.region();
        py.detach(|| {
            // SAFETY: `kv` borrows the caller's object for this call and stays alive across
            // it; the region is its whole, contiguous memory.
            let bytes = unsafe { region.as_slice() };
            runtime().block_on(self.inner.store(&tokens, bytes))
        })
        .map(StoreReport::from)
        .map_err(py_err)
    }

    /// Loads the KV of the longest cached prefix of `tokens` into `out` (laid out as for
    /// `store`, writable); returns the number of tokens loaded.
    fn retrieve(
        &self,
        py: Python<'_>,
        tokens: Vec<u32>,
        out: &Bound<'_, PyAny>,
    ) -> PyResult<usize> {
        let out = memory::HostMemory::borrow(out, true)?;
        let region = out.region();
        py.detach(|| {
            // SAFETY: as in `store`; the object was checked writable, and no Python code runs
            // while the GIL is released here, so nothing else of ours touches it.
            let bytes = unsafe { region.as_mut_slice() };
            runtime().block_on(self.inner.retrieve(&tokens, bytes))
        })
        .map(|r| r.tokens)
        .map_err(py_err)
    }

    /// Removes the chunks of `tokens` from every tier; returns how many were held.
    fn remove(&self, py: Python<'_>, tokens: Vec<u32>) -> PyResult<usize> {
        py.detach(|| runtime().block_on(self.inner.remove(&tokens)))
            .map_err(py_err)
    }

    /// Empties every local tier.
    fn clear(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| runtime().block_on(self.inner.clear()))
            .map_err(py_err)
    }

    /// Waits until everything stored so far reached the disk and remote tiers.
    fn flush(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| runtime().block_on(self.inner.flush()))
            .map_err(py_err)
    }

    /// Faults in up to `bytes` of chunk buffers on a background thread (bounded by the
    /// CPU tier's budget), so the first stores copy into touched memory. Returns at once.
    fn prefault(&self, bytes: usize) {
        self.inner.prefault(bytes);
    }

    /// The engine's metrics in Prometheus text format.
    fn metrics_text(&self) -> String {
        self.inner.metrics().encode_text()
    }

    /// A view of vLLM's paged KV cache (one tensor per attention layer, each
    /// `[num_blocks, ...]`, contiguous, on the CPU) holding `block_size` tokens per block.
    /// Checks the block bytes against this engine's model and that `chunk_size` is a whole
    /// number of blocks.
    fn paged_cache(
        &self,
        layers: Vec<Bound<'_, PyAny>>,
        block_size: usize,
    ) -> PyResult<paged::PagedCache> {
        paged::PagedCache::new(&self.inner, layers, block_size)
    }

    /// Stores the whole chunks (and, with `save_unfull_chunk`, the last partial run of
    /// whole blocks) of `tokens` from `cache`'s blocks `block_ids` (the request's block
    /// table: block `i` holds tokens `i*block_size ..`). Tokens past the last whole block
    /// are not stored. Chunks already cached are skipped.
    fn store_blocks(
        &self,
        py: Python<'_>,
        cache: &paged::PagedCache,
        tokens: Vec<u32>,
        block_ids: Vec<u32>,
    ) -> PyResult<StoreReport> {
        cache.check_engine(&self.inner)?;
        py.detach(|| runtime().block_on(cache.store(&self.inner, &tokens, &block_ids)))
            .map(StoreReport::from)
            .map_err(py_err)
    }

    /// Loads the longest cached prefix of `tokens` (at most `len(block_ids)` blocks, whole
    /// blocks only) into `cache`'s blocks `block_ids`, leaving the blocks of the first
    /// `skip_tokens` tokens untouched (they hold vLLM's own prefix-cache hits, possibly
    /// shared with other requests); returns the leading tokens whose KV is now in place.
    #[pyo3(signature = (cache, tokens, block_ids, skip_tokens=0))]
    fn load_blocks(
        &self,
        py: Python<'_>,
        cache: &paged::PagedCache,
        tokens: Vec<u32>,
        block_ids: Vec<u32>,
        skip_tokens: usize,
    ) -> PyResult<usize> {
        cache.check_engine(&self.inner)?;
        py.detach(|| runtime().block_on(cache.load(&self.inner, &tokens, &block_ids, skip_tokens)))
            .map_err(py_err)
    }

    /// Starts pushing the whole blocks of `tokens` (from `cache`'s blocks `block_ids`) into
    /// the P/D receiver at `receiver_host` (its handshake and allocation ports), skipping
    /// chunks it holds; the proxy (`pd_proxy_host:pd_proxy_port`) is notified that
    /// `req_id` is done or failed when the send ends. Returns at once: the send runs on
    /// kvtier's runtime, reading the blocks until [`PendingSend`] says it is done, so the
    /// caller must not reuse them before. Only for an engine with `pd_role: sender`.
    #[allow(clippy::too_many_arguments)]
    fn start_send_blocks(
        &self,
        cache: Py<paged::PagedCache>,
        req_id: String,
        tokens: Vec<u32>,
        block_ids: Vec<u32>,
        receiver_host: String,
        receiver_init_port: u16,
        receiver_alloc_port: u16,
    ) -> PyResult<PendingSend> {
        cache.get().check_engine(&self.inner)?;
        if self.inner.pd_sender().is_none() {
            return Err(py_err(
                "start_send_blocks needs an engine with `enable_pd: true` and `pd_role: sender`",
            ));
        }
        let to = kvtier::pd::ReceiverSpec {
            host: receiver_host,
            init_port: receiver_init_port,
            alloc_port: receiver_alloc_port,
        };
        let engine = self.inner.clone();
        let (ended, outcome) = tokio::sync::watch::channel(None);
        let id = req_id.clone();
        runtime().spawn(async move {
            let sent = match engine.pd_sender() {
                Some(sender) => cache
                    .get()
                    .send(sender, &id, &tokens, &block_ids, &to)
                    .await
                    .map(SendReport::from)
                    .map_err(|e| e.to_string()),
                None => Err("the engine stopped being a P/D sender".into()),
            };
            ended.send_replace(Some(sent));
        });
        Ok(PendingSend { req_id, outcome })
    }

    /// Serves `lookup` to other processes on the Unix socket `path` (vLLM's scheduler asks
    /// its workers through it). Runs until the engine's process exits.
    fn serve_lookups(&self, py: Python<'_>, path: String) -> PyResult<()> {
        py.detach(|| lookup::serve(self.inner.clone(), &path))
            .map_err(py_err)
    }

    fn __repr__(&self) -> String {
        format!("{:?}", self.inner)
    }
}

/// The `chunk_size` the configuration resolves to (file, environment, `overrides`; as
/// `Engine` reads it), for processes that need it without opening an engine.
#[pyfunction]
#[pyo3(signature = (config_file=None, overrides=None))]
fn configured_chunk_size(
    config_file: Option<String>,
    overrides: Option<&Bound<'_, PyDict>>,
) -> PyResult<usize> {
    Ok(resolve_config(config_file, overrides)?.chunk_size)
}

/// The Python module.
#[pymodule]
fn _kvtier(m: &Bound<'_, PyModule>) -> PyResult<()> {
    kvtier::transport::prepare_process();
    m.add("KvtierError", m.py().get_type::<KvtierError>())?;
    m.add_class::<Engine>()?;
    m.add_class::<StoreReport>()?;
    m.add_class::<SendReport>()?;
    m.add_class::<PendingSend>()?;
    m.add_class::<paged::PagedCache>()?;
    m.add_class::<lookup::LookupClient>()?;
    m.add_function(wrap_pyfunction!(configured_chunk_size, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}

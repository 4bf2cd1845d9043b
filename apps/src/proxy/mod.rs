//! The P/D proxy (`kvtier proxy`): an OpenAI-compatible front end that splits each request
//! into a prefill on a prefiller and a decode on a decoder, like LMCache's
//! `disagg_proxy_server.py`, whose flags it accepts.
//!
//! This module owns the HTTP front end (`/v1/completions`, `/v1/chat/completions`,
//! `/metrics`, `/health`), the routing (round-robin over prefillers and decoders), the
//! per-request flow and its time bounds, and the TTFT statistics. The notification
//! listener it waits on is [`kvtier::pd::ProxyListener`].
//!
//! Per request:
//! 1. assign a request id;
//! 2. POST the request to a prefiller with `max_tokens: 1`, `stream: false` and
//!    `kv_transfer_params: {req_id, receiver_host, receiver_init_port, receiver_alloc_port}`
//!    naming the decoder chosen for it;
//! 3. wait for both the prefiller's HTTP answer and the prefiller's transfer-done
//!    notification, at most [`ProxyConfig::timeout`] (HTTP 504 when that runs out, 502
//!    when the prefiller or the transfer fails; the JSON error names the request id and
//!    the stage);
//! 4. POST the original request plus `kv_transfer_params: {req_id}` to the decoder and
//!    stream its answer back (SSE passes through as it arrives).
//!
//! Prefill TTFT (arrival → KV transferred) and end-to-end TTFT (arrival → first byte from
//! the decoder) are kept per request; every [`ProxyConfig::stats_interval`] the reference
//! statistics block is printed to stdout when new requests arrived, and `/metrics` exports
//! them with request and error counters.

mod flow;
mod settings;
mod sse;
mod stats;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::HeaderValue;
use axum::routing::{get, post};
use axum::Router;
use kvtier::pd::ProxyListener;
use parking_lot::Mutex;
use prometheus::IntGauge;
use tokio::net::TcpListener;

use crate::error::{Error, Result};
use crate::http::{serve_with_grace, MAX_BODY_BYTES};
use flow::{chat_completions, completions, detokenize, health, metrics, models, tokenize};
pub use settings::{DecoderTarget, ProxyConfig, DEFAULT_MAX_IN_FLIGHT};
pub use stats::STATS_WINDOW;
use stats::{ProxyMetrics, TtftStats};

/// A bound proxy, ready to [`run`](Proxy::run).
pub struct Proxy {
    listener: TcpListener,
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("addr", &self.addr)
            .field("prefillers", &self.shared.prefillers)
            .field("decoders", &self.shared.decoders)
            .finish()
    }
}

impl Proxy {
    /// Checks `config`, binds the HTTP front end and (unless `wait_for_kv` is off) the
    /// notification listener.
    pub async fn bind(config: ProxyConfig) -> Result<Proxy> {
        let max_in_flight = config.max_in_flight.max(1);
        config.validate()?;
        let prefillers = config.prefiller_urls()?;
        let decoders = config.decoders()?;
        let notify = if config.wait_for_kv {
            Some(
                ProxyListener::bind(
                    &config.notify_host,
                    config.notify_port,
                    config.notify_auth_token.clone(),
                )
                .await?,
            )
        } else {
            None
        };
        let listener = TcpListener::bind((config.host.as_str(), config.port))
            .await
            .map_err(|e| Error::Listen {
                op: "bind proxy HTTP port",
                addr: format!("{}:{}", config.host, config.port),
                source: e,
            })?;
        let addr = listener.local_addr().map_err(|e| Error::Listen {
            op: "query proxy HTTP port",
            addr: format!("{}:{}", config.host, config.port),
            source: e,
        })?;
        let client = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(config.timeout)
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(90))
            .build()
            .map_err(Error::HttpClient)?;
        let default_auth = std::env::var("OPENAI_API_KEY")
            .ok()
            .filter(|k| !k.is_empty())
            .and_then(|k| HeaderValue::from_str(&format!("Bearer {k}")).ok());
        let shared = Arc::new(Shared {
            config,
            prefillers,
            decoders,
            client,
            notify,
            default_auth,
            counter: AtomicU64::new(0),
            admission: Arc::new(tokio::sync::Semaphore::new(max_in_flight)),
            stats: Mutex::new(TtftStats::default()),
            metrics: ProxyMetrics::new(),
        });
        Ok(Proxy {
            listener,
            addr,
            shared,
        })
    }

    /// The HTTP front end's address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The notification listener's address (`None` when not waiting for KV).
    pub fn notify_addr(&self) -> Option<SocketAddr> {
        self.shared.notify.as_ref().map(ProxyListener::local_addr)
    }

    /// Serves until `shutdown` completes, then stops accepting connections and lets
    /// in-flight responses finish for at most [`ProxyConfig::shutdown_grace`]. Prints the
    /// TTFT block every [`ProxyConfig::stats_interval`] when new requests arrived, and
    /// once more at the end.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<()> {
        let shared = self.shared.clone();
        let s = &shared.config;
        tracing::info!(
            "kvtier proxy on http://{}: prefillers {:?}, decoders {:?}, notifications {}",
            self.addr,
            shared.prefillers,
            shared
                .decoders
                .iter()
                .map(|d| d.url.as_str())
                .collect::<Vec<_>>(),
            match &shared.notify {
                Some(n) => n.local_addr().to_string(),
                None => "not awaited (--no-kv-wait)".into(),
            }
        );
        let reporter = tokio::spawn(report_loop(shared.clone(), s.stats_interval));
        let app = Router::new()
            .route("/v1/completions", post(completions))
            .route("/v1/chat/completions", post(chat_completions))
            .route("/v1/models", get(models))
            .route("/tokenize", post(tokenize))
            .route("/detokenize", post(detokenize))
            .route("/metrics", get(metrics))
            .route("/health", get(health))
            .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
            .with_state(shared.clone());
        let result = serve_with_grace(
            self.listener,
            app,
            shutdown,
            s.shutdown_grace,
            "proxy HTTP",
            self.addr,
        )
        .await;
        reporter.abort();
        shared.print_report_if_new();
        result
    }
}

struct Shared {
    config: ProxyConfig,
    prefillers: Vec<String>,
    decoders: Vec<DecoderTarget>,
    client: reqwest::Client,
    notify: Option<ProxyListener>,
    default_auth: Option<HeaderValue>,
    counter: AtomicU64,
    stats: Mutex<TtftStats>,
    metrics: ProxyMetrics,
    /// One permit per request in flight (`max_in_flight`).
    admission: Arc<tokio::sync::Semaphore>,
}

impl Shared {
    fn print_report_if_new(&self) {
        let block = {
            let mut stats = self.stats.lock();
            // New samples of either kind: end-to-end TTFTs land after their prefill.
            let now = (stats.count, stats.e2e_count);
            if now == stats.reported {
                return;
            }
            stats.reported = now;
            stats.report()
        };
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(block.as_bytes());
        let _ = out.flush();
    }
}

async fn report_loop(shared: Arc<Shared>, every: Duration) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        shared.print_report_if_new();
    }
}

/// A request in flight: holds its admission permit and decrements the in-flight gauge when
/// the request (or its streamed body) ends.
struct InFlight {
    gauge: IntGauge,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl InFlight {
    fn new(gauge: &IntGauge, permit: tokio::sync::OwnedSemaphorePermit) -> Self {
        gauge.inc();
        InFlight {
            gauge: gauge.clone(),
            _permit: permit,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

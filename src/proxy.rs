//! The P/D proxy (`kvtier proxy`): an OpenAI-compatible front end that splits each request
//! into a prefill on a prefiller and a decode on a decoder, like LMCache's
//! `disagg_proxy_server.py`, whose flags it accepts.
//!
//! This module owns the HTTP front end (`/v1/completions`, `/v1/chat/completions`,
//! `/metrics`, `/health`), the routing (round-robin over prefillers and decoders), the
//! per-request flow and its time bounds, and the TTFT statistics. The notification
//! listener it waits on is [`crate::pd::ProxyListener`].
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

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use parking_lot::Mutex;
use prometheus::{
    exponential_buckets, Encoder, Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;

use crate::error::{Error, Result};
use crate::pd::{PdError, ProxyListener};

/// Default of [`ProxyConfig::max_in_flight`].
pub const DEFAULT_MAX_IN_FLIGHT: usize = 1024;

/// Largest request body the proxy accepts (long prompts as token-id arrays are large).
pub const MAX_BODY_BYTES: usize = 64 << 20;

/// TTFT samples kept for the average, median and 99th percentile (the most recent ones);
/// the request count is kept for all requests.
pub const STATS_WINDOW: usize = 100_000;

/// Where and how the proxy runs. [`ProxyConfig::new`] gives the reference script's
/// defaults; [`ProxyConfig::prefiller_urls`] and [`ProxyConfig::decoders`] expand the
/// instance lists the way the reference does (instance `k` listens on base port + `k`).
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// Address the HTTP front end listens on (`--host`).
    pub host: String,
    /// Port of the HTTP front end (`--port`; 0 = ephemeral).
    pub port: u16,
    /// Host of the prefillers (`--prefiller-host`).
    pub prefiller_host: String,
    /// HTTP port(s) of the prefillers (`--prefiller-port`): one base port (prefiller `k`
    /// on base + `k`), or one port per prefiller.
    pub prefiller_ports: Vec<u16>,
    /// Number of prefillers (`--num-prefillers`).
    pub num_prefillers: usize,
    /// Host of the decoders, HTTP and P/D (`--decoder-host`).
    pub decoder_host: String,
    /// HTTP base port of the decoders (`--decoder-port`): decoder `k` on base + `k`.
    pub decoder_port: u16,
    /// P/D handshake ports of decoder 0, one per TP rank (`--decoder-init-port`); decoder
    /// `k` uses each + `k`.
    pub decoder_init_ports: Vec<u16>,
    /// P/D allocation ports of decoder 0, one per TP rank (`--decoder-alloc-port`);
    /// decoder `k` uses each + `k`.
    pub decoder_alloc_ports: Vec<u16>,
    /// Number of decoders (`--num-decoders`).
    pub num_decoders: usize,
    /// Address of the transfer-done notification listener (`--proxy-host`).
    pub notify_host: String,
    /// Port of the transfer-done notification listener (`--proxy-port`; 0 = ephemeral).
    pub notify_port: u16,
    /// Secret senders must present to the notification listener (`transport_auth_token`).
    pub notify_auth_token: Option<String>,
    /// Wait for the transfer-done notification (false only for P/D-free smoke tests).
    pub wait_for_kv: bool,
    /// Bound on prefill + KV transfer per request (`--timeout-sec`).
    pub timeout: Duration,
    /// Bound on the wait for the decoder's response headers and on any silence between
    /// chunks of its body (`--decode-timeout-sec`).
    pub decode_timeout: Duration,
    /// Period of the TTFT report on stdout.
    pub stats_interval: Duration,
    /// After a shutdown signal, how long in-flight responses may take to finish.
    pub shutdown_grace: Duration,
    /// Most requests in flight at once (`--max-in-flight`); past it the proxy answers 503
    /// with `Retry-After` instead of queueing without bound.
    pub max_in_flight: usize,
}

impl ProxyConfig {
    /// The reference script's defaults: front end on localhost:8000, prefiller on 8100,
    /// decoder on 8200 with P/D ports 8300/8400, notifications on 8500, one of each;
    /// prefill bound 30 s, decode bound 600 s, report every 5 s, 30 s shutdown grace.
    pub fn new() -> Self {
        ProxyConfig {
            host: "localhost".into(),
            port: 8000,
            prefiller_host: "localhost".into(),
            prefiller_ports: vec![8100],
            num_prefillers: 1,
            decoder_host: "localhost".into(),
            decoder_port: 8200,
            decoder_init_ports: vec![8300],
            decoder_alloc_ports: vec![8400],
            num_decoders: 1,
            notify_host: "localhost".into(),
            notify_port: 8500,
            notify_auth_token: None,
            wait_for_kv: true,
            timeout: Duration::from_secs(30),
            decode_timeout: Duration::from_secs(600),
            stats_interval: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(30),
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
        }
    }

    /// Base URLs of the prefillers, in round-robin order.
    pub fn prefiller_urls(&self) -> Result<Vec<String>> {
        let ports = match self.prefiller_ports.as_slice() {
            [] => return Err(invalid("--prefiller-port: no port given")),
            [base] => {
                if self.num_prefillers == 0 {
                    return Err(invalid("--num-prefillers must be at least 1"));
                }
                offset_ports(*base, self.num_prefillers, "--prefiller-port")?
            }
            list => {
                if self.num_prefillers != 1 && self.num_prefillers != list.len() {
                    return Err(invalid(format!(
                        "--prefiller-port lists {} ports but --num-prefillers is {}",
                        list.len(),
                        self.num_prefillers
                    )));
                }
                list.to_vec()
            }
        };
        Ok(ports
            .into_iter()
            .map(|p| http_url(&self.prefiller_host, p))
            .collect())
    }

    /// The decoders, in round-robin order: decoder `k` serves HTTP on
    /// `decoder_port + k` and P/D on each of `decoder_init_ports` / `decoder_alloc_ports`
    /// + `k`.
    pub fn decoders(&self) -> Result<Vec<DecoderTarget>> {
        if self.num_decoders == 0 {
            return Err(invalid("--num-decoders must be at least 1"));
        }
        if self.decoder_init_ports.is_empty() || self.decoder_alloc_ports.is_empty() {
            return Err(invalid(
                "--decoder-init-port and --decoder-alloc-port need at least one port each",
            ));
        }
        if self.decoder_init_ports.len() != self.decoder_alloc_ports.len() {
            return Err(invalid(format!(
                "--decoder-init-port lists {} ports and --decoder-alloc-port {}: give one \
                 of each per TP rank",
                self.decoder_init_ports.len(),
                self.decoder_alloc_ports.len()
            )));
        }
        let http = offset_ports(self.decoder_port, self.num_decoders, "--decoder-port")?;
        let mut out = Vec::with_capacity(self.num_decoders);
        for (k, port) in http.into_iter().enumerate() {
            let shift = |ports: &[u16], flag: &str| -> Result<Vec<u16>> {
                ports
                    .iter()
                    .map(|&p| {
                        offset_ports(p, k + 1, flag).map(|v| v[k]) // p + k, checked
                    })
                    .collect()
            };
            out.push(DecoderTarget {
                url: http_url(&self.decoder_host, port),
                kv_host: self.decoder_host.clone(),
                init_ports: shift(&self.decoder_init_ports, "--decoder-init-port")?,
                alloc_ports: shift(&self.decoder_alloc_ports, "--decoder-alloc-port")?,
            });
        }
        Ok(out)
    }

    fn validate(&self) -> Result<()> {
        for (name, d) in [
            ("--timeout-sec", self.timeout),
            ("--decode-timeout-sec", self.decode_timeout),
            ("stats interval", self.stats_interval),
        ] {
            if d.is_zero() {
                return Err(invalid(format!("{name} must be > 0")));
            }
        }
        Ok(())
    }
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self::new()
    }
}

/// One decoder as the proxy routes to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecoderTarget {
    /// Base URL of its OpenAI server.
    pub url: String,
    /// Host its P/D receiver listens on (`receiver_host`).
    pub kv_host: String,
    /// Its P/D handshake ports, one per TP rank (`receiver_init_port`).
    pub init_ports: Vec<u16>,
    /// Its P/D allocation ports, one per TP rank (`receiver_alloc_port`).
    pub alloc_ports: Vec<u16>,
}

fn invalid(message: impl Into<String>) -> Error {
    Error::InvalidArgument(message.into())
}

/// `base`, `base + 1`, ..., `base + n - 1`, or an error when that passes port 65535.
fn offset_ports(base: u16, n: usize, flag: &str) -> Result<Vec<u16>> {
    (0..n)
        .map(|k| {
            u16::try_from(base as usize + k).map_err(|_| {
                invalid(format!(
                    "{flag} {base} + instance {k} is past the last port (65535)"
                ))
            })
        })
        .collect()
}

fn http_url(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("http://[{host}]:{port}")
    } else {
        format!("http://{host}:{port}")
    }
}

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
            .map_err(|e| Error::Io {
                op: "bind proxy HTTP port",
                path: format!("{}:{}", config.host, config.port).into(),
                source: e,
            })?;
        let addr = listener.local_addr().map_err(|e| Error::Io {
            op: "query proxy HTTP port",
            path: format!("{}:{}", config.host, config.port).into(),
            source: e,
        })?;
        let client = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(config.timeout)
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(90))
            .build()
            .map_err(|e| Error::Http(format!("building the HTTP client: {e}")))?;
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

/// Serves `app` on `listener` until `shutdown` completes, then stops accepting and gives
/// in-flight requests (streamed bodies included) at most `grace` to finish.
pub(crate) async fn serve_with_grace(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
    what: &'static str,
    addr: SocketAddr,
) -> Result<()> {
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    tokio::select! {
        r = server => r.map_err(|e| Error::Io {
            op: "serve HTTP on",
            path: addr.to_string().into(),
            source: e,
        }),
        _ = async {
            let _ = stop_rx.wait_for(|stop| *stop).await;
            tracing::info!("{what}: shutting down, waiting up to {grace:?} for in-flight responses");
            tokio::time::sleep(grace).await;
        } => {
            tracing::warn!("{what}: responses still open after {grace:?}; closing them");
            Ok(())
        }
    }
}

/// Waits for Ctrl+C (SIGINT) or, on Unix, SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
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

/// The proxy's Prometheus metrics.
struct ProxyMetrics {
    registry: Registry,
    requests: IntCounterVec,
    errors: IntCounterVec,
    in_flight: IntGauge,
    prefill_seconds: Histogram,
    ttft_seconds: Histogram,
    kv_tokens: prometheus::IntCounter,
    kv_bytes: prometheus::IntCounter,
}

impl ProxyMetrics {
    fn new() -> Self {
        let registry = Registry::new();
        // Names and label sets are constants: construction cannot fail.
        let requests = IntCounterVec::new(
            Opts::new(
                "kvtier_proxy_requests_total",
                "Requests received, by endpoint",
            ),
            &["endpoint"],
        )
        .expect("valid metric");
        let errors = IntCounterVec::new(
            Opts::new(
                "kvtier_proxy_errors_total",
                "Requests that failed, by stage (request, prefill, kv_transfer, decode, decode_stream)",
            ),
            &["stage"],
        )
        .expect("valid metric");
        let in_flight =
            IntGauge::new("kvtier_proxy_in_flight", "Requests being served").expect("valid metric");
        let buckets = exponential_buckets(0.000_5, 2.0, 18).expect("valid buckets");
        let prefill_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "kvtier_proxy_prefill_ttft_seconds",
                "Prefill TTFT: request arrival to KV transferred to the decoder",
            )
            .buckets(buckets.clone()),
        )
        .expect("valid metric");
        let ttft_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "kvtier_proxy_ttft_seconds",
                "End-to-end TTFT: request arrival to the decoder's first byte",
            )
            .buckets(buckets),
        )
        .expect("valid metric");
        let kv_tokens = prometheus::IntCounter::new(
            "kvtier_proxy_kv_tokens_total",
            "Tokens of KV the prefillers reported transferred",
        )
        .expect("valid metric");
        let kv_bytes = prometheus::IntCounter::new(
            "kvtier_proxy_kv_bytes_total",
            "Bytes of KV the prefillers reported transferred",
        )
        .expect("valid metric");
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(errors.clone()),
            Box::new(in_flight.clone()),
            Box::new(prefill_seconds.clone()),
            Box::new(ttft_seconds.clone()),
            Box::new(kv_tokens.clone()),
            Box::new(kv_bytes.clone()),
        ] {
            registry.register(c).expect("unique metric");
        }
        ProxyMetrics {
            registry,
            requests,
            errors,
            in_flight,
            prefill_seconds,
            ttft_seconds,
            kv_tokens,
            kv_bytes,
        }
    }
}

/// TTFT samples in milliseconds.
#[derive(Default)]
struct TtftStats {
    /// Requests whose prefill finished (all time).
    count: u64,
    /// End-to-end TTFT samples taken (all time).
    e2e_count: u64,
    /// `(count, e2e_count)` at the last printed report.
    reported: (u64, u64),
    prefill: Window,
    e2e: Window,
}

#[derive(Default)]
struct Window(VecDeque<f64>);

impl Window {
    fn push(&mut self, ms: f64) {
        if self.0.len() == STATS_WINDOW {
            self.0.pop_front();
        }
        self.0.push_back(ms);
    }

    /// (average, median, 99th percentile), numpy's linear interpolation.
    fn summary(&self) -> Option<(f64, f64, f64)> {
        if self.0.is_empty() {
            return None;
        }
        let mut v: Vec<f64> = self.0.iter().copied().collect();
        v.sort_by(f64::total_cmp);
        let avg = v.iter().sum::<f64>() / v.len() as f64;
        Some((avg, percentile(&v, 50.0), percentile(&v, 99.0)))
    }
}

/// The `p`-th percentile of sorted `v` with linear interpolation (numpy's default).
fn percentile(v: &[f64], p: f64) -> f64 {
    let rank = p / 100.0 * (v.len() - 1) as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    v[lo] + (v[hi] - v[lo]) * (rank - lo as f64)
}

/// A float as Python prints it (`45.0`, `45.2`).
fn py_float(x: f64) -> String {
    if x.is_finite() && x.fract() == 0.0 && x.abs() < 1e16 {
        format!("{x:.1}")
    } else {
        format!("{x}")
    }
}

impl TtftStats {
    /// The reference block, plus the same lines for end-to-end TTFT.
    fn report(&self) -> String {
        let mut s = String::from("===============================\n");
        s += &format!("Num requests: {}\n", self.count);
        for (title, w) in [
            ("Prefill node TTFT stats:", &self.prefill),
            ("End-to-end TTFT stats:", &self.e2e),
        ] {
            if let Some((avg, median, p99)) = w.summary() {
                s += &format!(
                    "{title}\n - Average (ms): {}\n - Median (ms): {}\n - 99th Percentile (ms): {}\n",
                    py_float(avg),
                    py_float(median),
                    py_float(p99)
                );
            }
        }
        s += "===============================\n";
        s
    }
}

#[derive(Clone, Copy)]
enum Endpoint {
    Completions,
    Chat,
}

impl Endpoint {
    fn path(self) -> &'static str {
        match self {
            Endpoint::Completions => "/v1/completions",
            Endpoint::Chat => "/v1/chat/completions",
        }
    }
}

async fn completions(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle(shared, Endpoint::Completions, headers, body).await
}

async fn chat_completions(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle(shared, Endpoint::Chat, headers, body).await
}

async fn health(State(shared): State<Arc<Shared>>) -> Response {
    Json(json!({
        "status": "ok",
        "prefillers": shared.prefillers,
        "decoders": shared.decoders.iter().map(|d| &d.url).collect::<Vec<_>>(),
    }))
    .into_response()
}

/// `GET /v1/models`, answered by a decoder (every backend serves the same model).
async fn models(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    forward(
        &shared,
        reqwest::Method::GET,
        "/v1/models",
        &headers,
        Bytes::new(),
    )
    .await
}

/// `POST /tokenize`, answered by a decoder (benchmark clients align prompts with it).
async fn tokenize(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    forward(&shared, reqwest::Method::POST, "/tokenize", &headers, body).await
}

/// `POST /detokenize`, answered by a decoder.
async fn detokenize(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    forward(
        &shared,
        reqwest::Method::POST,
        "/detokenize",
        &headers,
        body,
    )
    .await
}

/// Passes a request that involves no KV to the first decoder and relays its status,
/// content type and body, bounded by `--timeout-sec`.
async fn forward(
    shared: &Shared,
    method: reqwest::Method,
    path: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Response {
    let Some(decoder) = shared.decoders.first() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "no decoder configured").into_response();
    };
    let url = format!("{}{path}", decoder.url);
    let mut rb = shared.client.request(method, &url).body(body);
    if let Some(v) = headers.get(header::CONTENT_TYPE) {
        rb = rb.header(header::CONTENT_TYPE, v.clone());
    }
    if let Some(a) = headers
        .get(header::AUTHORIZATION)
        .cloned()
        .or_else(|| shared.default_auth.clone())
    {
        rb = rb.header(header::AUTHORIZATION, a);
    }
    let timeout = shared.config.timeout;
    let failure = |status: StatusCode, message: String| {
        (
            status,
            Json(json!({ "error": { "message": message, "type": "proxy_error" } })),
        )
            .into_response()
    };
    let answer = tokio::time::timeout(timeout, async {
        let resp = rb.send().await?;
        let status = resp.status();
        let content_type = resp.headers().get(header::CONTENT_TYPE).cloned();
        let bytes = resp.bytes().await?;
        Ok::<_, reqwest::Error>((status, content_type, bytes))
    })
    .await;
    match answer {
        Ok(Ok((status, content_type, bytes))) => {
            let mut out = Response::new(Body::from(bytes));
            *out.status_mut() =
                StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            if let Some(ct) = content_type {
                out.headers_mut().insert(header::CONTENT_TYPE, ct);
            }
            out
        }
        Ok(Err(e)) => failure(
            StatusCode::BAD_GATEWAY,
            format!("decoder {url} unreachable: {}", error_chain(&e)),
        ),
        Err(_) => failure(
            StatusCode::GATEWAY_TIMEOUT,
            format!("decoder {url} did not answer within {timeout:?} (--timeout-sec)"),
        ),
    }
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    let mut out = Vec::new();
    // Text encoding of a gathered registry cannot fail.
    let _ = TextEncoder::new().encode(&shared.metrics.registry.gather(), &mut out);
    let mut text = String::from_utf8_lossy(&out).into_owned();
    let stats = shared.stats.lock();
    for (name, help, w) in [
        (
            "kvtier_proxy_prefill_ttft_ms",
            "Prefill TTFT in ms over the recent requests",
            &stats.prefill,
        ),
        (
            "kvtier_proxy_ttft_ms",
            "End-to-end TTFT in ms over the recent requests",
            &stats.e2e,
        ),
    ] {
        text += &format!("# HELP {name} {help}\n# TYPE {name} gauge\n");
        let (avg, median, p99) = w.summary().unwrap_or((f64::NAN, f64::NAN, f64::NAN));
        for (stat, v) in [("average", avg), ("median", median), ("p99", p99)] {
            text += &format!("{name}{{stat=\"{stat}\"}} {v}\n");
        }
    }
    text += &format!(
        "# HELP kvtier_proxy_ttft_requests Requests counted in the TTFT report\n\
         # TYPE kvtier_proxy_ttft_requests gauge\nkvtier_proxy_ttft_requests {}\n",
        stats.count
    );
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        text,
    )
        .into_response()
}

/// A failed request: the HTTP status, the stage that failed and why.
struct Failure {
    status: StatusCode,
    stage: &'static str,
    message: String,
}

impl Failure {
    fn new(status: StatusCode, stage: &'static str, message: impl Into<String>) -> Self {
        Failure {
            status,
            stage,
            message: message.into(),
        }
    }

    fn response(self, req_id: &str) -> Response {
        let body = json!({
            "error": {
                "message": format!("request {req_id}: {} stage: {}", self.stage, self.message),
                "type": "kvtier_proxy_error",
                "stage": self.stage,
                "req_id": req_id,
                "code": self.status.as_u16(),
            }
        });
        let mut resp = (self.status, Json(body)).into_response();
        if let Ok(v) = HeaderValue::from_str(req_id) {
            resp.headers_mut().insert("x-request-id", v);
        }
        resp
    }
}

/// A request id: 128 bits from the clock, the process and a counter, uuid-formatted.
fn new_request_id(n: u64) -> String {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let mut seed = [0u8; 28];
    seed[..16].copy_from_slice(&nanos.to_le_bytes());
    seed[16..20].copy_from_slice(&std::process::id().to_le_bytes());
    seed[20..].copy_from_slice(&n.to_le_bytes());
    let h = xxhash_rust::xxh3::xxh3_128(&seed);
    let x = format!("{h:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &x[..8],
        &x[8..12],
        &x[12..16],
        &x[16..20],
        &x[20..]
    )
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

async fn handle(
    shared: Arc<Shared>,
    endpoint: Endpoint,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let arrival = Instant::now();
    let n = shared.counter.fetch_add(1, Ordering::Relaxed);
    let req_id = new_request_id(n);
    let label = match endpoint {
        Endpoint::Completions => "completions",
        Endpoint::Chat => "chat_completions",
    };
    shared.metrics.requests.with_label_values(&[label]).inc();
    let Ok(permit) = shared.admission.clone().try_acquire_owned() else {
        let limit = shared.config.max_in_flight;
        shared
            .metrics
            .errors
            .with_label_values(&["admission"])
            .inc();
        tracing::warn!("request {req_id}: refused, {limit} requests in flight (--max-in-flight)");
        let mut resp = Failure::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "admission",
            format!("the proxy has {limit} requests in flight (--max-in-flight); retry later"),
        )
        .response(&req_id);
        resp.headers_mut()
            .insert("retry-after", HeaderValue::from_static("1"));
        return resp;
    };
    let guard = InFlight::new(&shared.metrics.in_flight, permit);
    match serve(
        &shared, endpoint, &headers, body, &req_id, arrival, n, guard,
    )
    .await
    {
        Ok(resp) => resp,
        Err(f) => {
            shared.metrics.errors.with_label_values(&[f.stage]).inc();
            tracing::warn!(
                "request {req_id}: {} stage failed ({}): {}",
                f.stage,
                f.status,
                f.message
            );
            f.response(&req_id)
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn serve(
    shared: &Arc<Shared>,
    endpoint: Endpoint,
    headers: &HeaderMap,
    body: Bytes,
    req_id: &str,
    arrival: Instant,
    n: u64,
    guard: InFlight,
) -> Result<Response, Failure> {
    let request: Map<String, Value> = match serde_json::from_slice(&body) {
        Ok(Value::Object(m)) => m,
        Ok(_) => {
            return Err(Failure::new(
                StatusCode::BAD_REQUEST,
                "request",
                "the body must be a JSON object",
            ))
        }
        Err(e) => {
            return Err(Failure::new(
                StatusCode::BAD_REQUEST,
                "request",
                format!("the body is not valid JSON: {e}"),
            ))
        }
    };
    let auth = headers
        .get(header::AUTHORIZATION)
        .cloned()
        .or_else(|| shared.default_auth.clone());
    let prefiller = &shared.prefillers[(n % shared.prefillers.len() as u64) as usize];
    let decoder = &shared.decoders[(n % shared.decoders.len() as u64) as usize];

    // 1. Prefill, and the transfer-done notification, within `timeout`.
    let mut pre = request.clone();
    pre.insert("max_tokens".into(), json!(1));
    if pre.contains_key("max_completion_tokens") {
        pre.insert("max_completion_tokens".into(), json!(1));
    }
    pre.insert("stream".into(), json!(false));
    pre.remove("stream_options");
    pre.insert(
        "kv_transfer_params".into(),
        json!({
            "req_id": req_id,
            "receiver_host": decoder.kv_host,
            "receiver_init_port": decoder.init_ports,
            "receiver_alloc_port": decoder.alloc_ports,
        }),
    );
    let timeout = shared.config.timeout;
    let deadline = tokio::time::Instant::now() + timeout;
    let url = format!("{prefiller}{}", endpoint.path());
    let prefill = async {
        let mut rb = shared.client.post(&url).json(&pre);
        if let Some(a) = &auth {
            rb = rb.header(header::AUTHORIZATION, a.clone());
        }
        let io = async {
            let resp = rb.send().await.map_err(|e| {
                Failure::new(
                    StatusCode::BAD_GATEWAY,
                    "prefill",
                    format!("prefiller {url} unreachable: {}", error_chain(&e)),
                )
            })?;
            let status = resp.status();
            let body = resp.bytes().await.map_err(|e| {
                Failure::new(
                    StatusCode::BAD_GATEWAY,
                    "prefill",
                    format!("reading the answer of prefiller {url}: {}", error_chain(&e)),
                )
            })?;
            if !status.is_success() {
                return Err(Failure::new(
                    StatusCode::BAD_GATEWAY,
                    "prefill",
                    format!("prefiller {url} answered {status}: {}", excerpt(&body)),
                ));
            }
            Ok(Instant::now())
        };
        match tokio::time::timeout_at(deadline, io).await {
            Ok(r) => r,
            Err(_) => Err(Failure::new(
                StatusCode::GATEWAY_TIMEOUT,
                "prefill",
                format!("prefiller {url} did not answer within {timeout:?} (--timeout-sec)"),
            )),
        }
    };
    let transfer = async {
        let Some(listener) = &shared.notify else {
            return Ok(None);
        };
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match listener.wait(req_id, left).await {
            Ok(done) if done.ok => {
                shared.metrics.kv_tokens.inc_by(done.tokens);
                shared.metrics.kv_bytes.inc_by(done.bytes);
                Ok(Some((Instant::now(), done)))
            }
            Ok(done) => Err(Failure::new(
                StatusCode::BAD_GATEWAY,
                "kv_transfer",
                format!(
                    "the prefiller reported the KV transfer to {} failed: {}",
                    decoder.kv_host,
                    done.error.as_deref().unwrap_or("no reason given")
                ),
            )),
            Err(Error::Pd(PdError::Timeout { .. })) => Err(Failure::new(
                StatusCode::GATEWAY_TIMEOUT,
                "kv_transfer",
                format!(
                    "no transfer-done notification within {timeout:?} (--timeout-sec); \
                     is the prefiller's pd_proxy_host/pd_proxy_port this proxy's \
                     --proxy-host/--proxy-port?"
                ),
            )),
            Err(e) => Err(Failure::new(
                StatusCode::BAD_GATEWAY,
                "kv_transfer",
                format!("waiting for the transfer-done notification: {e}"),
            )),
        }
    };
    // A prefill failure ends the request at once. A transfer failure waits for the prefill
    // (bounded by the same deadline): when both fail — a prefiller that never answers also
    // never notifies — the prefill's failure is the one to report.
    tokio::pin!(prefill, transfer);
    let (answered_at, transferred) = tokio::select! {
        biased;
        prefilled = &mut prefill => {
            let at = prefilled?;
            (at, (&mut transfer).await?)
        }
        transferred = &mut transfer => match transferred {
            Ok(t) => ((&mut prefill).await?, t),
            Err(f) => {
                (&mut prefill).await?;
                return Err(f);
            }
        },
    };
    // Arrival to transfer-done (to the prefiller's answer when not waiting for KV).
    let prefill_time = transferred.as_ref().map_or(answered_at, |(at, _)| *at) - arrival;
    shared
        .metrics
        .prefill_seconds
        .observe(prefill_time.as_secs_f64());
    {
        let mut stats = shared.stats.lock();
        stats.count += 1;
        stats.prefill.push(prefill_time.as_secs_f64() * 1e3);
    }

    // 2. Decode, streamed back.
    let mut dec = request;
    dec.insert("kv_transfer_params".into(), json!({ "req_id": req_id }));
    let url = format!("{}{}", decoder.url, endpoint.path());
    let mut rb = shared.client.post(&url).json(&dec);
    if let Some(a) = &auth {
        rb = rb.header(header::AUTHORIZATION, a.clone());
    }
    let decode_timeout = shared.config.decode_timeout;
    let resp = match tokio::time::timeout(decode_timeout, rb.send()).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            return Err(Failure::new(
                StatusCode::BAD_GATEWAY,
                "decode",
                format!("decoder {url} unreachable: {}", error_chain(&e)),
            ))
        }
        Err(_) => {
            return Err(Failure::new(
                StatusCode::GATEWAY_TIMEOUT,
                "decode",
                format!(
                    "decoder {url} did not answer within {decode_timeout:?} (--decode-timeout-sec)"
                ),
            ))
        }
    };
    let status = resp.status();
    if !status.is_success() {
        let body = tokio::time::timeout(decode_timeout, resp.bytes())
            .await
            .ok()
            .and_then(|r| r.ok())
            .unwrap_or_default();
        let code = if status.is_client_error() {
            status
        } else {
            StatusCode::BAD_GATEWAY
        };
        return Err(Failure::new(
            code,
            "decode",
            format!("decoder {url} answered {status}: {}", excerpt(&body)),
        ));
    }
    let content_type = resp.headers().get(header::CONTENT_TYPE).cloned();
    let sse = content_type
        .as_ref()
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let relay = Relay {
        upstream: Box::pin(resp.bytes_stream()),
        shared: shared.clone(),
        req_id: req_id.to_string(),
        url,
        arrival,
        first: true,
        sse,
        idle: decode_timeout,
        done: false,
        _guard: guard,
    };
    let stream = futures_util::stream::unfold(relay, |mut r| async move {
        r.next_chunk().await.map(|item| (item, r))
    });
    let mut out = Response::new(Body::from_stream(stream));
    *out.status_mut() = status;
    if let Some(ct) = content_type {
        out.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    out.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(req_id) {
        out.headers_mut().insert("x-request-id", v);
    }
    // What the KV transfer took, as the prefiller reported it, and the prefill time.
    let h = out.headers_mut();
    h.insert(
        "x-kvtier-prefill-ms",
        HeaderValue::from(prefill_time.as_millis() as u64),
    );
    if let Some((_, done)) = &transferred {
        h.insert("x-kvtier-kv-tokens", HeaderValue::from(done.tokens));
        h.insert("x-kvtier-kv-bytes", HeaderValue::from(done.bytes));
        h.insert(
            "x-kvtier-kv-transfer-us",
            HeaderValue::from(done.elapsed_us),
        );
    }
    Ok(out)
}

type Upstream = std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// Relays the decoder's body, recording the end-to-end TTFT at its first byte and
/// bounding silences.
struct Relay {
    upstream: Upstream,
    shared: Arc<Shared>,
    req_id: String,
    url: String,
    arrival: Instant,
    first: bool,
    sse: bool,
    idle: Duration,
    done: bool,
    _guard: InFlight,
}

impl Relay {
    async fn next_chunk(&mut self) -> Option<std::io::Result<Bytes>> {
        if self.done {
            return None;
        }
        let failure = match tokio::time::timeout(self.idle, self.upstream.next()).await {
            Ok(Some(Ok(bytes))) => {
                if self.first && !bytes.is_empty() {
                    self.first = false;
                    let ttft = self.arrival.elapsed();
                    self.shared.metrics.ttft_seconds.observe(ttft.as_secs_f64());
                    let mut stats = self.shared.stats.lock();
                    stats.e2e.push(ttft.as_secs_f64() * 1e3);
                    stats.e2e_count += 1;
                }
                return Some(Ok(bytes));
            }
            Ok(None) => {
                self.done = true;
                return None;
            }
            Ok(Some(Err(e))) => format!("decoder {} broke off: {}", self.url, error_chain(&e)),
            Err(_) => format!(
                "decoder {} was silent for {:?} (--decode-timeout-sec)",
                self.url, self.idle
            ),
        };
        self.done = true;
        self.shared
            .metrics
            .errors
            .with_label_values(&["decode_stream"])
            .inc();
        tracing::warn!("request {}: {failure}", self.req_id);
        if self.sse {
            // Tell an SSE client in-band, then end the stream.
            let event = json!({
                "error": {
                    "message": format!("request {}: decode stage: {failure}", self.req_id),
                    "type": "kvtier_proxy_error",
                    "stage": "decode",
                    "req_id": self.req_id,
                }
            });
            Some(Ok(Bytes::from(format!("data: {event}\n\n"))))
        } else {
            Some(Err(std::io::Error::other(failure)))
        }
    }
}

/// An error and its sources, `: `-joined (reqwest's own message omits the cause).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let msg = inner.to_string();
        if !s.contains(&msg) {
            s += ": ";
            s += &msg;
        }
        src = inner.source();
    }
    s
}

/// The start of a body, for error messages.
fn excerpt(body: &[u8]) -> String {
    const MAX: usize = 500;
    let text = String::from_utf8_lossy(&body[..body.len().min(MAX)]);
    let mut s = text.trim().to_string();
    if body.len() > MAX {
        s += " ...";
    }
    if s.is_empty() {
        s = "(empty body)".into();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_match_numpy() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&v, 50.0), 2.5);
        assert!((percentile(&v, 99.0) - 3.97).abs() < 1e-12);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
    }

    #[test]
    fn report_has_the_reference_lines() {
        let mut s = TtftStats::default();
        for ms in [40.0, 45.0, 50.0] {
            s.count += 1;
            s.prefill.push(ms);
            s.e2e.push(ms + 10.0);
        }
        let r = s.report();
        assert_eq!(
            r,
            "===============================\nNum requests: 3\nPrefill node TTFT stats:\n \
             - Average (ms): 45.0\n - Median (ms): 45.0\n - 99th Percentile (ms): 49.9\n\
             End-to-end TTFT stats:\n - Average (ms): 55.0\n - Median (ms): 55.0\n \
             - 99th Percentile (ms): 59.9\n===============================\n"
        );
    }

    #[test]
    fn instances_follow_the_reference_port_scheme() {
        let mut c = ProxyConfig::new();
        c.num_prefillers = 2;
        c.num_decoders = 2;
        c.decoder_init_ports = vec![7300, 7301];
        c.decoder_alloc_ports = vec![7400, 7401];
        assert_eq!(
            c.prefiller_urls().unwrap(),
            ["http://localhost:8100", "http://localhost:8101"]
        );
        let d = c.decoders().unwrap();
        assert_eq!(d[1].url, "http://localhost:8201");
        assert_eq!(d[1].init_ports, [7301, 7302]);
        assert_eq!(d[1].alloc_ports, [7401, 7402]);
        c.prefiller_ports = vec![9001, 9005];
        c.num_prefillers = 1;
        assert_eq!(
            c.prefiller_urls().unwrap(),
            ["http://localhost:9001", "http://localhost:9005"]
        );
        c.decoder_port = 65535;
        assert!(c.decoders().is_err());
        c.decoder_port = 8200;
        c.decoder_alloc_ports = vec![7400];
        assert!(c.decoders().is_err());
    }

    #[test]
    fn request_ids_are_unique() {
        let a = new_request_id(1);
        let b = new_request_id(2);
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
    }
}

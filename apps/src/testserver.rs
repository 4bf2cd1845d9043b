//! The stand-in inference engine (`kvtier test-server`): a synthetic inference engine for
//! tests and demos that derives KV from token ids. No model runs.
//!
//! It speaks enough of the OpenAI API (`/v1/completions`, `/v1/chat/completions`, SSE
//! streaming, `/v1/models`, `/tokenize`, `/health`, `/metrics`) to stand where vLLM stands
//! in the LMCache P/D examples, and exercises kvtier's P/D path the way a real engine would:
//!
//! * tokens come from the synthetic whitespace tokenizer ([`crate::synthetic::tokenize`];
//!   chat messages are `role content` pairs joined in order);
//! * a **prefiller** (`pd_role: sender`) answering a request that carries
//!   `kv_transfer_params` computes the prompt's synthetic KV and pushes it with
//!   [`PdSender::send`] to the receiver the parameters name (which notifies the proxy);
//! * a **decoder** (`pd_role: receiver`) answering a request whose `kv_transfer_params`
//!   has a `req_id` loads the prompt's KV with [`PdReceiver::retrieve`] and checks it byte
//!   for byte against its own synthetic KV of the same tokens;
//! * both answer `max_tokens` deterministic words ([`crate::synthetic::generated_word`]),
//!   as JSON or as SSE chunks ending in `data: [DONE]`, with
//!   `"kvtier": {"prompt_tokens", "kv_tokens", "kv_verified", ...}` in the final JSON
//!   object or the last SSE chunk, so tests can check what moved.
//!
//! Without P/D in its configuration the server ignores `kv_transfer_params` and just
//! answers (`kv_tokens: 0`).

use kvtier::memory::BufferPool;
use kvtier::metrics::Metrics;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use prometheus::{Encoder, IntCounter, IntCounterVec, Opts, Registry, TextEncoder};
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;

use crate::error::{Error, Result};
use crate::http::{serve_with_grace, MAX_BODY_BYTES};
use crate::synthetic::{self, VOCAB_SIZE};
use kvtier::config::{Config, PdRole};
use kvtier::model::ModelSpec;
use kvtier::pd::{PdReceiver, PdSender, ReceiverSpec};

/// The most tokens one request may ask to generate.
pub const MAX_GENERATED_TOKENS: u64 = 1 << 20;

/// `max_tokens` when a request gives none (OpenAI's default for completions).
pub const DEFAULT_MAX_TOKENS: u64 = 16;

/// The part a test server plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Computes KV and sends it (`pd_role: sender`).
    Prefiller,
    /// Receives KV and generates (`pd_role: receiver`).
    Decoder,
}

impl Role {
    /// `prefiller` or `decoder`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Prefiller => "prefiller",
            Role::Decoder => "decoder",
        }
    }

    fn pd_role(self) -> PdRole {
        match self {
            Role::Prefiller => PdRole::Sender,
            Role::Decoder => PdRole::Receiver,
        }
    }
}

/// How a test server runs.
#[derive(Clone, Debug)]
pub struct TestServerOptions {
    /// Address to listen on.
    pub host: String,
    /// HTTP port (0 = ephemeral).
    pub port: u16,
    /// The role asked for; with a P/D configuration it must agree with `pd_role` (and is
    /// taken from it when `None`).
    pub role: Option<Role>,
    /// kvtier configuration; P/D is on when it has `enable_pd`.
    pub config: Option<Config>,
    /// Shape of the synthetic KV (and the key namespace).
    pub model: ModelSpec,
    /// Pause before each generated token (to make streams observable in tests).
    pub token_delay: Duration,
    /// After a shutdown signal, how long in-flight responses may take to finish.
    pub shutdown_grace: Duration,
}

impl TestServerOptions {
    /// Plain mode on 127.0.0.1:`port` with the Llama-3.1-8B shape, no token delay.
    pub fn new(port: u16) -> Self {
        TestServerOptions {
            host: "127.0.0.1".into(),
            port,
            role: None,
            config: None,
            model: ModelSpec::llama_3_1_8b(),
            token_delay: Duration::ZERO,
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// The P/D side of a server.
enum Pd {
    Off,
    Sender(Box<PdSender>),
    Receiver(PdReceiver),
}

struct Shared {
    role: Option<Role>,
    model: ModelSpec,
    pd: Pd,
    token_delay: Duration,
    counter: AtomicU64,
    metrics: ServerMetrics,
    /// KV buffers (generated, retrieved): recycled, pre-faulted huge pages.
    pool: BufferPool,
    /// Requests generating or checking KV at once (a GPU prefills a batch at a time):
    /// the rest wait here, holding no KV memory.
    kv_slots: tokio::sync::Semaphore,
}

struct ServerMetrics {
    registry: Registry,
    requests: IntCounterVec,
    kv_checks: IntCounterVec,
    kv_sent_tokens: IntCounter,
}

impl ServerMetrics {
    fn new() -> Self {
        let registry = Registry::new();
        // Names and label sets are constants: construction cannot fail.
        let requests = IntCounterVec::new(
            Opts::new(
                "kvtier_testserver_requests_total",
                "Requests served, by endpoint",
            ),
            &["endpoint"],
        )
        .expect("valid metric");
        let kv_checks = IntCounterVec::new(
            Opts::new(
                "kvtier_testserver_kv_checks_total",
                "Decoder KV checks, by result (verified, mismatch, missing, error)",
            ),
            &["result"],
        )
        .expect("valid metric");
        let kv_sent_tokens = IntCounter::new(
            "kvtier_testserver_kv_sent_tokens_total",
            "Tokens of KV the prefiller pushed to decoders",
        )
        .expect("valid metric");
        registry
            .register(Box::new(requests.clone()))
            .expect("unique metric");
        registry
            .register(Box::new(kv_checks.clone()))
            .expect("unique metric");
        registry
            .register(Box::new(kv_sent_tokens.clone()))
            .expect("unique metric");
        ServerMetrics {
            registry,
            requests,
            kv_checks,
            kv_sent_tokens,
        }
    }
}

/// A bound test server, ready to [`run`](TestServer::run).
pub struct TestServer {
    listener: TcpListener,
    addr: SocketAddr,
    grace: Duration,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for TestServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestServer")
            .field("addr", &self.addr)
            .field("role", &self.shared.role)
            .finish()
    }
}

impl TestServer {
    /// Binds the HTTP port and, with a P/D configuration, opens the P/D sender (prefiller)
    /// or starts the P/D receiver (decoder).
    pub async fn bind(options: TestServerOptions) -> Result<TestServer> {
        let mut role = options.role;
        let pd = match &options.config {
            Some(config) if config.enable_pd => {
                config.validate()?;
                let pd_role = config.pd_role.ok_or_else(|| {
                    Error::InvalidArgument("`enable_pd` without `pd_role`".into())
                })?;
                if let Some(r) = role {
                    if r.pd_role() != pd_role {
                        return Err(Error::InvalidArgument(format!(
                            "--role {} contradicts `pd_role: {pd_role}` in the configuration",
                            r.as_str()
                        )));
                    }
                }
                match pd_role {
                    PdRole::Sender => {
                        role = Some(Role::Prefiller);
                        Pd::Sender(Box::new(
                            PdSender::new(
                                &config.pd_sender_settings(),
                                options.model.clone(),
                                Metrics::new(),
                            )
                            .await?,
                        ))
                    }
                    PdRole::Receiver => {
                        role = Some(Role::Decoder);
                        Pd::Receiver(
                            PdReceiver::start(
                                &config.pd_receiver_settings(),
                                options.model.clone(),
                                Metrics::new(),
                            )
                            .await?,
                        )
                    }
                }
            }
            _ => Pd::Off,
        };
        let listener = TcpListener::bind((options.host.as_str(), options.port))
            .await
            .map_err(|e| Error::Listen {
                op: "bind test server HTTP port",
                addr: format!("{}:{}", options.host, options.port),
                source: e,
            })?;
        let addr = listener.local_addr().map_err(|e| Error::Listen {
            op: "query test server HTTP port",
            addr: format!("{}:{}", options.host, options.port),
            source: e,
        })?;
        Ok(TestServer {
            listener,
            addr,
            grace: options.shutdown_grace,
            shared: Arc::new(Shared {
                role,
                model: options.model,
                pd,
                token_delay: options.token_delay,
                counter: AtomicU64::new(0),
                metrics: ServerMetrics::new(),
                pool: BufferPool::new(4 << 30),
                kv_slots: tokio::sync::Semaphore::new(2),
            }),
        })
    }

    /// The HTTP address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The role (from the options or the configuration's `pd_role`).
    pub fn role(&self) -> Option<Role> {
        self.shared.role
    }

    /// The P/D receiver's bound (init, alloc) ports, for a decoder.
    pub fn pd_ports(&self) -> Option<(u16, u16)> {
        match &self.shared.pd {
            Pd::Receiver(r) => Some(r.ports()),
            _ => None,
        }
    }

    /// Serves until `shutdown` completes; in-flight responses then get the grace period.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<()> {
        let pd = match &self.shared.pd {
            Pd::Off => "off".to_string(),
            Pd::Sender(_) => "sender".to_string(),
            Pd::Receiver(r) => {
                let (i, a) = r.ports();
                format!("receiver on init port {i}, alloc port {a}")
            }
        };
        tracing::info!(
            "kvtier test-server (synthetic inference engine, no model) on http://{}: role {}, P/D {pd}",
            self.addr,
            self.shared.role.map_or("plain", Role::as_str)
        );
        let app = Router::new()
            .route("/v1/completions", post(completions))
            .route("/v1/chat/completions", post(chat_completions))
            .route("/tokenize", post(tokenize))
            .route("/v1/models", get(models))
            .route("/health", get(health))
            .route("/metrics", get(metrics))
            .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
            .with_state(self.shared);
        serve_with_grace(
            self.listener,
            app,
            shutdown,
            self.grace,
            "test server HTTP",
            self.addr,
        )
        .await
    }
}

/// A request the server cannot serve: status and message.
#[derive(Debug)]
struct Reject(StatusCode, String);

impl Reject {
    fn bad(message: impl Into<String>) -> Self {
        Reject(StatusCode::BAD_REQUEST, message.into())
    }
}

impl IntoResponse for Reject {
    fn into_response(self) -> Response {
        let body = json!({
            "error": {
                "message": self.1,
                "type": if self.0.is_client_error() { "invalid_request_error" } else { "server_error" },
                "code": self.0.as_u16(),
            }
        });
        (self.0, Json(body)).into_response()
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Completion,
    Chat,
}

/// What `kv_transfer_params` asks for.
enum KvParams {
    None,
    /// Prefiller: push to this receiver.
    Send {
        req_id: String,
        to: ReceiverSpec,
    },
    /// Decoder: load the KV of `req_id`.
    Load {
        req_id: String,
    },
}

struct Parsed {
    tokens: Vec<u32>,
    max_tokens: u64,
    stream: bool,
    include_usage: bool,
    model: String,
    kv: KvParams,
}

fn parse_body(body: &[u8]) -> Result<Map<String, Value>, Reject> {
    match serde_json::from_slice(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(Reject::bad("the body must be a JSON object")),
        Err(e) => Err(Reject::bad(format!("the body is not valid JSON: {e}"))),
    }
}

fn prompt_tokens(prompt: &Value) -> Result<Vec<u32>, Reject> {
    let ids = |items: &[Value]| -> Result<Vec<u32>, Reject> {
        items
            .iter()
            .map(|v| {
                v.as_u64()
                    .filter(|&t| t < VOCAB_SIZE as u64)
                    .map(|t| t as u32)
                    .ok_or_else(|| {
                        Reject::bad(format!(
                            "prompt token {v} is not a token id below {VOCAB_SIZE}"
                        ))
                    })
            })
            .collect()
    };
    match prompt {
        Value::String(s) => Ok(synthetic::tokenize(s)),
        Value::Array(items) => match items.as_slice() {
            [Value::String(s)] => Ok(synthetic::tokenize(s)),
            [Value::Array(inner)] => ids(inner),
            list if list.iter().all(Value::is_number) => ids(list),
            _ => Err(Reject::bad(
                "batched prompts are not supported: send one prompt per request",
            )),
        },
        _ => Err(Reject::bad(
            "`prompt` must be a string, a list of token ids, or a one-element list of either",
        )),
    }
}

fn chat_tokens(messages: &Value) -> Result<Vec<u32>, Reject> {
    let Some(list) = messages.as_array() else {
        return Err(Reject::bad("`messages` must be a list"));
    };
    let mut text = String::new();
    for m in list {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("user");
        text.push_str(role);
        text.push(' ');
        match m.get("content") {
            Some(Value::String(s)) => text.push_str(s),
            Some(Value::Array(parts)) => {
                for p in parts {
                    if let Some(t) = p.get("text").and_then(Value::as_str) {
                        text.push_str(t);
                        text.push(' ');
                    }
                }
            }
            _ => {}
        }
        text.push(' ');
    }
    Ok(synthetic::tokenize(&text))
}

fn port_of(v: Option<&Value>, rank: usize, name: &str) -> Result<u16, Reject> {
    let pick = match v {
        Some(Value::Array(list)) => list.get(rank).or(list.first()),
        other => other,
    };
    pick.and_then(Value::as_u64)
        .and_then(|p| u16::try_from(p).ok())
        .filter(|&p| p != 0)
        .ok_or_else(|| {
            Reject::bad(format!(
                "kv_transfer_params.{name}: expected a port or a list of ports"
            ))
        })
}

fn kv_params(v: Option<&Value>, rank: usize) -> Result<KvParams, Reject> {
    let Some(Value::Object(outer)) = v else {
        return Ok(KvParams::None);
    };
    // The flat form, or LMCache's newer `{"disagg_spec": {...}}`.
    let p = match outer.get("disagg_spec") {
        Some(Value::Object(inner)) => inner,
        _ => outer,
    };
    let req_id = match p.get("req_id") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        None => return Ok(KvParams::None),
        Some(_) => return Err(Reject::bad("kv_transfer_params.req_id must be a string")),
    };
    match p.get("receiver_host") {
        Some(Value::String(host)) => Ok(KvParams::Send {
            to: ReceiverSpec {
                host: host.clone(),
                init_port: port_of(p.get("receiver_init_port"), rank, "receiver_init_port")?,
                alloc_port: port_of(p.get("receiver_alloc_port"), rank, "receiver_alloc_port")?,
            },
            req_id,
        }),
        Some(_) => Err(Reject::bad(
            "kv_transfer_params.receiver_host must be a string",
        )),
        None => Ok(KvParams::Load { req_id }),
    }
}

fn parse(kind: Kind, body: &Map<String, Value>, shared: &Shared) -> Result<Parsed, Reject> {
    let tokens = match kind {
        Kind::Completion => prompt_tokens(
            body.get("prompt")
                .ok_or_else(|| Reject::bad("`prompt` is missing"))?,
        )?,
        Kind::Chat => chat_tokens(
            body.get("messages")
                .ok_or_else(|| Reject::bad("`messages` is missing"))?,
        )?,
    };
    if tokens.is_empty() {
        return Err(Reject::bad("the prompt is empty"));
    }
    let max_tokens = match body
        .get("max_completion_tokens")
        .filter(|v| kind == Kind::Chat && !v.is_null())
        .or_else(|| body.get("max_tokens").filter(|v| !v.is_null()))
    {
        None => DEFAULT_MAX_TOKENS,
        Some(v) => v
            .as_u64()
            .filter(|&n| (1..=MAX_GENERATED_TOKENS).contains(&n))
            .ok_or_else(|| {
                Reject::bad(format!(
                    "`max_tokens` must be an integer from 1 to {MAX_GENERATED_TOKENS}"
                ))
            })?,
    };
    let stream = match body.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(Reject::bad("`stream` must be a boolean")),
    };
    let include_usage = body
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or(&shared.model.name)
        .to_string();
    let kv = kv_params(
        body.get("kv_transfer_params"),
        shared.model.tp_rank as usize,
    )?;
    Ok(Parsed {
        tokens,
        max_tokens,
        stream,
        include_usage,
        model,
        kv,
    })
}

async fn completions(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    answer(shared, Kind::Completion, body).await
}

async fn chat_completions(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    answer(shared, Kind::Chat, body).await
}

async fn tokenize(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    shared
        .metrics
        .requests
        .with_label_values(&["tokenize"])
        .inc();
    let result = parse_body(&body).and_then(|b| match (b.get("prompt"), b.get("messages")) {
        (Some(p), _) => prompt_tokens(p),
        (None, Some(m)) => chat_tokens(m),
        (None, None) => Err(Reject::bad("`prompt` or `messages` is missing")),
    });
    match result {
        Ok(tokens) => Json(json!({
            "count": tokens.len(),
            "max_model_len": 131_072,
            "tokens": tokens,
        }))
        .into_response(),
        Err(r) => r.into_response(),
    }
}

async fn models(State(shared): State<Arc<Shared>>) -> Response {
    Json(json!({
        "object": "list",
        "data": [{
            "id": shared.model.name,
            "object": "model",
            "created": unix_now(),
            "owned_by": "kvtier-test-server",
        }],
    }))
    .into_response()
}

async fn health(State(shared): State<Arc<Shared>>) -> Response {
    Json(json!({
        "status": "ok",
        "role": shared.role.map_or("plain", Role::as_str),
        "engine": "kvtier test-server: synthetic inference engine, no model",
    }))
    .into_response()
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    let mut out = Vec::new();
    // Text encoding of a gathered registry cannot fail.
    let _ = TextEncoder::new().encode(&shared.metrics.registry.gather(), &mut out);
    let mut text = String::from_utf8_lossy(&out).into_owned();
    match &shared.pd {
        Pd::Off => {}
        Pd::Sender(s) => text += &s.metrics().encode_text(),
        Pd::Receiver(r) => text += &r.metrics().encode_text(),
    }
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        text,
    )
        .into_response()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

async fn answer(shared: Arc<Shared>, kind: Kind, body: Bytes) -> Response {
    let label = match kind {
        Kind::Completion => "completions",
        Kind::Chat => "chat_completions",
    };
    shared.metrics.requests.with_label_values(&[label]).inc();
    match answer_inner(&shared, kind, &body).await {
        Ok(r) => r,
        Err(reject) => {
            tracing::warn!("{label}: {} {}", reject.0, reject.1);
            reject.into_response()
        }
    }
}

async fn answer_inner(shared: &Arc<Shared>, kind: Kind, body: &[u8]) -> Result<Response, Reject> {
    let body = parse_body(body)?;
    let p = parse(kind, &body, shared)?;
    let n = shared.counter.fetch_add(1, Ordering::Relaxed);
    let mut info = Map::new();
    info.insert("prompt_tokens".into(), json!(p.tokens.len()));
    info.insert("kv_tokens".into(), json!(0));
    // Echoed as the answer's id and `kv_transfer_params`, with or without P/D.
    let kv_req_id = match &p.kv {
        KvParams::Send { req_id, .. } | KvParams::Load { req_id } => Some(req_id.clone()),
        KvParams::None => None,
    };
    match (&p.kv, &shared.pd) {
        (KvParams::Send { req_id, to }, Pd::Sender(sender)) => {
            let report = send_kv(shared, sender, req_id, &p.tokens, to).await?;
            info.insert(
                "kv_tokens".into(),
                json!(report.tokens + report.skipped_tokens),
            );
            info.insert("kv_sent_tokens".into(), json!(report.tokens));
            info.insert("kv_skipped_tokens".into(), json!(report.skipped_tokens));
            info.insert("kv_bytes".into(), json!(report.bytes));
            info.insert(
                "kv_send_ms".into(),
                json!(report.elapsed.as_secs_f64() * 1e3),
            );
        }
        (KvParams::Load { req_id }, Pd::Receiver(receiver)) => {
            let (loaded, verified, error) = load_kv(shared, receiver, req_id, &p.tokens).await;
            info.insert("kv_tokens".into(), json!(loaded));
            info.insert("kv_verified".into(), json!(verified));
            if let Some(e) = error {
                info.insert("kv_error".into(), json!(e));
            }
        }
        _ => {}
    }
    if !info.contains_key("kv_verified") {
        info.insert("kv_verified".into(), json!(false));
    }
    let id = match (&kv_req_id, kind) {
        (Some(r), Kind::Completion) => format!("cmpl-{r}"),
        (Some(r), Kind::Chat) => format!("chatcmpl-{r}"),
        (None, Kind::Completion) => format!("cmpl-{:x}-{n}", std::process::id()),
        (None, Kind::Chat) => format!("chatcmpl-{:x}-{n}", std::process::id()),
    };
    let gen = Generation {
        id,
        kind,
        created: unix_now(),
        model: p.model,
        prompt: p.tokens,
        max_tokens: p.max_tokens,
        include_usage: p.include_usage,
        info: Value::Object(info),
        kv_req_id,
        delay: shared.token_delay,
    };
    if p.stream {
        Ok(gen.stream())
    } else {
        if !gen.delay.is_zero() {
            tokio::time::sleep(
                gen.delay
                    .saturating_mul(gen.max_tokens.min(u32::MAX as u64) as u32),
            )
            .await;
        }
        Ok(Json(gen.whole()).into_response())
    }
}

async fn send_kv(
    shared: &Shared,
    sender: &PdSender,
    req_id: &str,
    tokens: &[u32],
    to: &ReceiverSpec,
) -> Result<kvtier::pd::SendReport, Reject> {
    let model = shared.model.clone();
    let owned = tokens.to_vec();
    let _slot = shared.kv_slots.acquire().await.map_err(|e| {
        Reject(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("shutting down: {e}"),
        )
    })?;
    let mut kv = shared.pool.alloc(model.bytes_per_token() * tokens.len());
    let kv = tokio::task::spawn_blocking(move || {
        synthetic::fill_kv(&model, &owned, &mut kv);
        kv
    })
    .await
    .map_err(|e| {
        Reject(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("KV generation failed: {e}"),
        )
    })?;
    match sender.send(req_id, tokens, &kv, to).await {
        Ok(report) => {
            shared.metrics.kv_sent_tokens.inc_by(report.tokens as u64);
            tracing::info!(
                "request {req_id}: sent KV of {} tokens ({} already there, {} bytes) to {}:{} in {:.1} ms",
                report.tokens,
                report.skipped_tokens,
                report.bytes,
                to.host,
                to.init_port,
                report.elapsed.as_secs_f64() * 1e3
            );
            Ok(report)
        }
        Err(e) => Err(Reject(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!(
                "request {req_id}: sending KV to {}:{} (alloc {}) failed: {e}",
                to.host, to.init_port, to.alloc_port
            ),
        )),
    }
}

/// Loads and verifies the KV of `tokens`: (tokens loaded, verified, error).
async fn load_kv(
    shared: &Shared,
    receiver: &PdReceiver,
    req_id: &str,
    tokens: &[u32],
) -> (usize, bool, Option<String>) {
    let bpt = shared.model.bytes_per_token();
    let Ok(_slot) = shared.kv_slots.acquire().await else {
        return (0, false, Some("shutting down".into()));
    };
    // Pooled, pre-faulted memory: the stand-in engine should not spend its time faulting.
    let mut out = shared.pool.alloc(bpt * tokens.len());
    let started = Instant::now();
    let loaded = match receiver.retrieve(req_id, tokens, &mut out).await {
        Ok(n) => n,
        Err(e) => {
            shared.metrics.kv_checks.with_label_values(&["error"]).inc();
            tracing::warn!("request {req_id}: retrieve failed: {e}");
            return (0, false, Some(e.to_string()));
        }
    };
    let retrieve_time = started.elapsed();
    if loaded == 0 {
        shared
            .metrics
            .kv_checks
            .with_label_values(&["missing"])
            .inc();
        tracing::warn!(
            "request {req_id}: no KV received for its {} prompt tokens",
            tokens.len()
        );
        return (0, false, None);
    }
    let model = shared.model.clone();
    let owned = tokens.to_vec();
    let verified = tokio::task::spawn_blocking(move || {
        synthetic::matches_kv_prefix(&model, &owned, &out, loaded)
    })
    .await
    .unwrap_or(false);
    let result = if verified { "verified" } else { "mismatch" };
    shared.metrics.kv_checks.with_label_values(&[result]).inc();
    tracing::info!(
        "request {req_id}: {} prompt tokens, {loaded} loaded from P/D in {:.1} ms, {}",
        tokens.len(),
        retrieve_time.as_secs_f64() * 1e3,
        if verified {
            "verified byte for byte"
        } else {
            "KV MISMATCH"
        }
    );
    (loaded, verified, None)
}

/// One answer being generated.
struct Generation {
    id: String,
    kind: Kind,
    created: u64,
    model: String,
    prompt: Vec<u32>,
    max_tokens: u64,
    include_usage: bool,
    info: Value,
    kv_req_id: Option<String>,
    delay: Duration,
}

impl Generation {
    fn usage(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt.len(),
            "completion_tokens": self.max_tokens,
            "total_tokens": self.prompt.len() as u64 + self.max_tokens,
        })
    }

    fn text(&self) -> String {
        (0..self.max_tokens as usize)
            .map(|i| synthetic::generated_word(&self.prompt, i))
            .collect()
    }

    /// The non-streaming answer.
    fn whole(&self) -> Value {
        let text = self.text();
        let mut v = match self.kind {
            Kind::Completion => json!({
                "id": self.id,
                "object": "text_completion",
                "created": self.created,
                "model": self.model,
                "choices": [{
                    "index": 0,
                    "text": text,
                    "logprobs": null,
                    "finish_reason": "length",
                    "stop_reason": null,
                }],
                "usage": self.usage(),
            }),
            Kind::Chat => json!({
                "id": self.id,
                "object": "chat.completion",
                "created": self.created,
                "model": self.model,
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": null,
                    "finish_reason": "length",
                }],
                "usage": self.usage(),
            }),
        };
        if let Value::Object(m) = &mut v {
            m.insert("kvtier".into(), self.info.clone());
            if let Some(r) = &self.kv_req_id {
                m.insert("kv_transfer_params".into(), json!({ "req_id": r }));
            }
        }
        v
    }

    /// SSE chunk `i` (the last one carries `finish_reason`, `kvtier` and, when asked,
    /// `usage`).
    fn chunk(&self, i: u64) -> Value {
        let word = synthetic::generated_word(&self.prompt, i as usize);
        let last = i + 1 == self.max_tokens;
        let finish = if last { json!("length") } else { Value::Null };
        let mut v = match self.kind {
            Kind::Completion => json!({
                "id": self.id,
                "object": "text_completion",
                "created": self.created,
                "model": self.model,
                "choices": [{
                    "index": 0,
                    "text": word,
                    "logprobs": null,
                    "finish_reason": finish,
                    "stop_reason": null,
                }],
            }),
            Kind::Chat => {
                let delta = if i == 0 {
                    json!({"role": "assistant", "content": word})
                } else {
                    json!({"content": word})
                };
                json!({
                    "id": self.id,
                    "object": "chat.completion.chunk",
                    "created": self.created,
                    "model": self.model,
                    "choices": [{
                        "index": 0,
                        "delta": delta,
                        "logprobs": null,
                        "finish_reason": finish,
                    }],
                })
            }
        };
        if let (true, Value::Object(m)) = (last, &mut v) {
            m.insert("kvtier".into(), self.info.clone());
            if self.include_usage {
                m.insert("usage".into(), self.usage());
            }
        }
        v
    }

    fn stream(self) -> Response {
        let stream = futures_util::stream::unfold((self, 0u64), |(g, i)| async move {
            if i > g.max_tokens {
                return None;
            }
            if i == g.max_tokens {
                let done = Bytes::from_static(b"data: [DONE]\n\n");
                return Some((Ok::<_, std::convert::Infallible>(done), (g, i + 1)));
            }
            if !g.delay.is_zero() {
                tokio::time::sleep(g.delay).await;
            }
            let data = Bytes::from(format!("data: {}\n\n", g.chunk(i)));
            Some((Ok(data), (g, i + 1)))
        });
        let mut resp = Response::new(Body::from_stream(stream));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        resp.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_of_every_shape() {
        assert_eq!(
            prompt_tokens(&json!("a b c")).unwrap(),
            synthetic::tokenize("a b c")
        );
        assert_eq!(prompt_tokens(&json!([1, 2, 3])).unwrap(), [1, 2, 3]);
        assert_eq!(prompt_tokens(&json!([[4, 5]])).unwrap(), [4, 5]);
        assert_eq!(
            prompt_tokens(&json!(["x y"])).unwrap(),
            synthetic::tokenize("x y")
        );
        assert!(prompt_tokens(&json!(["x", "y"])).is_err());
        assert!(prompt_tokens(&json!([-1])).is_err());
        assert!(prompt_tokens(&json!([VOCAB_SIZE])).is_err());
        assert!(prompt_tokens(&json!({"a": 1})).is_err());
    }

    #[test]
    fn chat_is_role_and_content() {
        let t = chat_tokens(&json!([
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi there"}]},
        ]))
        .unwrap();
        assert_eq!(t, synthetic::tokenize("system be brief user hi there"));
    }

    #[test]
    fn kv_params_flat_and_nested() {
        let flat = json!({"req_id": "r1", "receiver_host": "h", "receiver_init_port": [7300],
                          "receiver_alloc_port": [7400]});
        match kv_params(Some(&flat), 0).unwrap() {
            KvParams::Send { req_id, to } => {
                assert_eq!(req_id, "r1");
                assert_eq!(
                    (to.host.as_str(), to.init_port, to.alloc_port),
                    ("h", 7300, 7400)
                );
            }
            _ => panic!("expected send"),
        }
        let nested = json!({"disagg_spec": {"req_id": "r2", "receiver_host": "h",
                            "receiver_init_port": 1, "receiver_alloc_port": 2}});
        assert!(matches!(
            kv_params(Some(&nested), 0).unwrap(),
            KvParams::Send { .. }
        ));
        let load = json!({"req_id": "r3"});
        assert!(matches!(
            kv_params(Some(&load), 0).unwrap(),
            KvParams::Load { .. }
        ));
        assert!(matches!(kv_params(None, 0).unwrap(), KvParams::None));
        let bad = json!({"req_id": "r", "receiver_host": "h", "receiver_init_port": "x",
                         "receiver_alloc_port": 2});
        assert!(kv_params(Some(&bad), 0).is_err());
    }
}

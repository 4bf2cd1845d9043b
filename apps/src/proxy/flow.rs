//! One request's way through the proxy: admission, the prefill with `max_tokens: 1`, the
//! wait for the transfer-done notice, the decode, and the pass-through endpoints. Each
//! failure names its stage and request id.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use kvtier::pd::PdError;
use prometheus::{Encoder, TextEncoder};
use serde_json::{json, Map, Value};

use super::sse::Relay;
use super::{InFlight, Shared};
use crate::error::Result;
use kvtier::error::error_chain;

#[derive(Clone, Copy)]
pub(super) enum Endpoint {
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

pub(super) async fn completions(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle(shared, Endpoint::Completions, headers, body).await
}

pub(super) async fn chat_completions(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle(shared, Endpoint::Chat, headers, body).await
}

pub(super) async fn health(State(shared): State<Arc<Shared>>) -> Response {
    Json(json!({
        "status": "ok",
        "prefillers": shared.prefillers,
        "decoders": shared.decoders.iter().map(|d| &d.url).collect::<Vec<_>>(),
    }))
    .into_response()
}

/// `GET /v1/models`, answered by a decoder (every backend serves the same model).
pub(super) async fn models(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
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
pub(super) async fn tokenize(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    forward(&shared, reqwest::Method::POST, "/tokenize", &headers, body).await
}

/// `POST /detokenize`, answered by a decoder.
pub(super) async fn detokenize(
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
pub(super) async fn forward(
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

pub(super) async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
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
pub(super) struct Failure {
    pub(super) status: StatusCode,
    pub(super) stage: &'static str,
    pub(super) message: String,
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
pub(super) fn new_request_id(n: u64) -> String {
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

pub(super) async fn handle(
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
pub(super) async fn serve(
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
            Err(PdError::Timeout { .. }) => Err(Failure::new(
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

/// The start of a body, for error messages.
pub(super) fn excerpt(body: &[u8]) -> String {
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
    fn request_ids_are_unique() {
        let a = new_request_id(1);
        let b = new_request_id(2);
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
    }
}

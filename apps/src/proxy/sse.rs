//! Relaying the decoder's streamed answer (SSE passes through as it arrives): the
//! end-to-end TTFT is taken at the first byte, and a silence longer than the timeout ends
//! the stream.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use futures_util::StreamExt;
use serde_json::json;

use super::{InFlight, Shared};
use kvtier::error::error_chain;

pub(super) type Upstream =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// Relays the decoder's body, recording the end-to-end TTFT at its first byte and
/// bounding silences.
pub(super) struct Relay {
    pub(super) upstream: Upstream,
    pub(super) shared: Arc<Shared>,
    pub(super) req_id: String,
    pub(super) url: String,
    pub(super) arrival: Instant,
    pub(super) first: bool,
    pub(super) sse: bool,
    pub(super) idle: Duration,
    pub(super) done: bool,
    pub(super) _guard: InFlight,
}

impl Relay {
    pub(super) async fn next_chunk(&mut self) -> Option<std::io::Result<Bytes>> {
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

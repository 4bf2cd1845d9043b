//! The engine's link to its remote tier: a bounded background writer for chunks the engine
//! stored, and a breaker that skips the tier for a moment after it failed, so an outage of
//! the store or etcd costs the engine one timeout, not one per request.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::{mpsc, Notify};

use super::{RemoteError, RemoteTier};
use crate::chunk::{ChunkHeader, HEADER_LEN};
use crate::metrics::Metrics;
use crate::tier::ChunkRef;

/// Chunks queued for the remote tier at most (their memory is shared with the local
/// tiers; the bound keeps a slow remote from pinning it).
const QUEUE: usize = 64;
/// Chunks per remote put.
const BATCH: usize = 16;
/// After a failure, calls skip the tier for this long (then one call probes it again).
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Whether the tier answers, and when to try again if not.
struct Health {
    url: String,
    down: AtomicBool,
    retry_at: Mutex<Option<Instant>>,
}

impl Health {
    fn usable(&self) -> bool {
        self.retry_at.lock().is_none_or(|t| Instant::now() >= t)
    }

    /// Logs the first failure of an outage and the recovery after it.
    fn record<T>(&self, what: &str, result: Result<T, RemoteError>) -> Option<T> {
        match result {
            Ok(v) => {
                *self.retry_at.lock() = None;
                if self.down.swap(false, Ordering::AcqRel) {
                    tracing::info!("remote tier {} reachable again", self.url);
                }
                Some(v)
            }
            Err(e) => {
                *self.retry_at.lock() = Some(Instant::now() + RETRY_AFTER);
                if !self.down.swap(true, Ordering::AcqRel) {
                    tracing::warn!(
                        "remote tier {} unavailable ({what}: {e}); serving from local tiers",
                        self.url
                    );
                } else {
                    tracing::debug!("remote tier {}: {what}: {e}", self.url);
                }
                None
            }
        }
    }
}

/// The remote tier as the engine uses it.
pub(crate) struct RemoteLink {
    tier: Arc<RemoteTier>,
    queue: mpsc::Sender<ChunkRef>,
    /// Chunks queued and not yet written (or given up on), for [`RemoteLink::flush`].
    pending: Arc<(AtomicUsize, Notify)>,
    health: Arc<Health>,
    metrics: Metrics,
}

impl RemoteLink {
    /// Starts the background writer. Must be called within a tokio runtime.
    pub fn open(tier: RemoteTier, metrics: Metrics) -> RemoteLink {
        let tier = Arc::new(tier);
        let health = Arc::new(Health {
            // For logs: never with a password.
            url: crate::config::redact_passwords(tier.url()),
            down: AtomicBool::new(false),
            retry_at: Mutex::new(None),
        });
        let (queue, mut rx) = mpsc::channel::<ChunkRef>(QUEUE);
        let pending = Arc::new((AtomicUsize::new(0), Notify::new()));
        let (t, p, h, m) = (
            tier.clone(),
            pending.clone(),
            health.clone(),
            metrics.clone(),
        );
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                while batch.len() < BATCH {
                    match rx.try_recv() {
                        Ok(c) => batch.push(c),
                        Err(_) => break,
                    }
                }
                let written = if h.usable() {
                    h.record("store", write(&t, &batch).await).is_some()
                } else {
                    false
                };
                if !written {
                    m.offload_skipped
                        .with_label_values(&["remote"])
                        .inc_by(batch.len() as u64);
                }
                if p.0.fetch_sub(batch.len(), Ordering::AcqRel) == batch.len() {
                    p.1.notify_waiters();
                }
            }
        });
        RemoteLink {
            tier,
            queue,
            pending,
            health,
            metrics,
        }
    }

    /// The tier.
    pub fn tier(&self) -> &RemoteTier {
        &self.tier
    }

    /// Queues chunks for the background writer; a full queue skips them (counted in
    /// `kvtier_offload_skipped_total{tier="remote"}`), never blocks.
    pub fn offload(&self, chunks: &[ChunkRef]) {
        for chunk in chunks {
            self.pending.0.fetch_add(1, Ordering::AcqRel);
            if self.queue.try_send(chunk.clone()).is_err() {
                self.pending.0.fetch_sub(1, Ordering::AcqRel);
                self.metrics
                    .offload_skipped
                    .with_label_values(&["remote"])
                    .inc();
            }
        }
    }

    /// Writes chunks now (when the remote tier is the engine's only tier).
    pub async fn write_through(&self, chunks: &[ChunkRef]) -> Result<usize, RemoteError> {
        write(&self.tier, chunks).await
    }

    /// Waits until every queued chunk is written or given up on.
    pub async fn flush(&self) {
        loop {
            let notified = self.pending.1.notified();
            if self.pending.0.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Runs `call` unless the tier failed a moment ago; `None` if skipped or failed.
    pub async fn call<T>(
        &self,
        what: &str,
        call: impl Future<Output = Result<T, RemoteError>>,
    ) -> Option<T> {
        if !self.health.usable() {
            return None;
        }
        self.health.record(what, call.await)
    }
}

/// Writes chunks as self-describing objects (header + payload).
async fn write(tier: &RemoteTier, chunks: &[ChunkRef]) -> Result<usize, RemoteError> {
    let headers: Vec<[u8; HEADER_LEN]> = chunks
        .iter()
        .map(|c| ChunkHeader::for_payload(c.key, c.shape, c.payload()).encode())
        .collect();
    let objects: Vec<(u128, Vec<&[u8]>)> = chunks
        .iter()
        .zip(&headers)
        .map(|(c, h)| (c.key.0, vec![&h[..], c.payload()]))
        .collect();
    tier.put(&objects).await
}

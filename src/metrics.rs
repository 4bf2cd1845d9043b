//! Prometheus metrics an embedding server can expose.
//!
//! Each [`crate::Engine`] owns a [`Metrics`] with its own registry (no global state, so
//! two engines in one process do not collide); serve [`Metrics::encode_text`] at
//! `/metrics`, or register the collectors into the server's own registry through
//! [`Metrics::registry`].

use prometheus::{
    exponential_buckets, Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::tier::{TierKind, TierUsage};

/// The engine's metrics.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Tokens asked about by lookups.
    pub lookup_tokens: IntCounter,
    /// Tokens lookups found cached (longest prefix).
    pub lookup_hit_tokens: IntCounter,
    /// Tokens stored (new chunks only).
    pub store_tokens: IntCounter,
    /// Bytes of KV stored (new chunks only).
    pub store_bytes: IntCounter,
    /// Tokens asked for by retrieves.
    pub retrieve_tokens: IntCounter,
    /// Tokens retrieves loaded.
    pub retrieve_hit_tokens: IntCounter,
    /// Bytes of KV retrieves loaded.
    pub retrieve_bytes: IntCounter,
    /// Operation latency in seconds, by `op` (store, retrieve, lookup, pd_send).
    pub op_seconds: HistogramVec,
    /// Chunks served, by the `tier` that held them.
    pub tier_hits: IntCounterVec,
    /// Chunks that failed validation when read, by `tier`.
    pub corrupt_chunks: IntCounterVec,
    /// Chunks not offloaded to a lower tier because its queue was full or it had no room, by `tier`.
    pub offload_skipped: IntCounterVec,
    /// Bytes held, by `tier`.
    pub tier_used_bytes: IntGaugeVec,
    /// Capacity in bytes, by `tier`.
    pub tier_capacity_bytes: IntGaugeVec,
    /// Chunks held, by `tier`.
    pub tier_objects: IntGaugeVec,
    /// Evictions since start, by `tier`.
    pub tier_evictions: IntGaugeVec,
    /// Bytes of the P/D buffer allocated or holding chunks (receiver).
    pub pd_buffer_used_bytes: IntGauge,
    /// Bytes of the P/D buffer (receiver).
    pub pd_buffer_capacity_bytes: IntGauge,
    /// Bytes of P/D pages freed while writes may still land, not yet reusable (receiver).
    pub pd_buffer_quarantined_bytes: IntGauge,
    /// Chunks sent (sender) or received and committed (receiver) over P/D.
    pub pd_chunks: IntCounter,
    /// P/D pages reclaimed from senders that vanished or requests never retrieved.
    pub pd_reclaimed_pages: IntCounter,
    /// P/D sends started and not yet ended (sender).
    pub pd_sends_in_flight: IntGauge,
    /// P/D sends ended, by `outcome` (`ok` or `failed`; sender).
    pub pd_sends: IntCounterVec,
}

impl Metrics {
    /// Metrics registered in a new registry.
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let counter_vec = |name: &str, help: &str, label: &str| {
            let c = IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gauge_vec = |name: &str, help: &str| {
            let g = IntGaugeVec::new(Opts::new(name, help), &["tier"]).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let op_seconds = HistogramVec::new(
            HistogramOpts::new("kvtier_op_seconds", "Engine operation latency")
                .buckets(exponential_buckets(1e-6, 4.0, 13).expect("valid buckets")),
            &["op"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(op_seconds.clone()))
            .expect("unique metric");
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        Metrics {
            pd_buffer_used_bytes: gauge("kvtier_pd_buffer_used_bytes", "P/D buffer bytes in use"),
            pd_buffer_capacity_bytes: gauge("kvtier_pd_buffer_capacity_bytes", "P/D buffer bytes"),
            pd_buffer_quarantined_bytes: gauge(
                "kvtier_pd_buffer_quarantined_bytes",
                "P/D buffer bytes freed while writes may still land, not yet reusable",
            ),
            pd_chunks: counter("kvtier_pd_chunks_total", "Chunks moved over P/D"),
            pd_reclaimed_pages: counter(
                "kvtier_pd_reclaimed_pages_total",
                "P/D pages reclaimed from vanished senders or unretrieved requests",
            ),
            pd_sends_in_flight: gauge(
                "kvtier_pd_sends_in_flight",
                "P/D sends started and not yet ended",
            ),
            pd_sends: counter_vec(
                "kvtier_pd_sends_total",
                "P/D sends ended, by outcome (ok, failed)",
                "outcome",
            ),
            lookup_tokens: counter(
                "kvtier_lookup_tokens_total",
                "Tokens asked about by lookups",
            ),
            lookup_hit_tokens: counter(
                "kvtier_lookup_hit_tokens_total",
                "Tokens lookups found cached",
            ),
            store_tokens: counter("kvtier_store_tokens_total", "Tokens stored (new chunks)"),
            store_bytes: counter("kvtier_store_bytes_total", "KV bytes stored (new chunks)"),
            retrieve_tokens: counter(
                "kvtier_retrieve_tokens_total",
                "Tokens asked for by retrieves",
            ),
            retrieve_hit_tokens: counter(
                "kvtier_retrieve_hit_tokens_total",
                "Tokens retrieves loaded",
            ),
            retrieve_bytes: counter("kvtier_retrieve_bytes_total", "KV bytes retrieves loaded"),
            op_seconds,
            tier_hits: counter_vec("kvtier_tier_hits_total", "Chunks served per tier", "tier"),
            corrupt_chunks: counter_vec(
                "kvtier_corrupt_chunks_total",
                "Chunks that failed validation when read",
                "tier",
            ),
            offload_skipped: counter_vec(
                "kvtier_offload_skipped_total",
                "Chunks not offloaded to a lower tier (queue full or no room)",
                "tier",
            ),
            tier_used_bytes: gauge_vec("kvtier_tier_used_bytes", "Bytes held per tier"),
            tier_capacity_bytes: gauge_vec("kvtier_tier_capacity_bytes", "Capacity per tier"),
            tier_objects: gauge_vec("kvtier_tier_objects", "Chunks held per tier"),
            tier_evictions: gauge_vec("kvtier_tier_evictions", "Evictions since start per tier"),
            registry,
        }
    }

    /// The registry holding every collector.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// All metrics in the Prometheus text exposition format.
    pub fn encode_text(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        String::from_utf8(out).expect("text encoding is UTF-8")
    }

    /// Publishes a tier's occupancy.
    pub fn record_usage(&self, tier: TierKind, usage: TierUsage) {
        let t = [tier.name()];
        self.tier_used_bytes
            .with_label_values(&t)
            .set(usage.used_bytes as i64);
        self.tier_capacity_bytes
            .with_label_values(&t)
            .set(usage.capacity_bytes as i64);
        self.tier_objects
            .with_label_values(&t)
            .set(usage.objects as i64);
        self.tier_evictions
            .with_label_values(&t)
            .set(usage.evictions as i64);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics { .. }")
    }
}

/// Bytes per second in GB/s (10^9), for logs and reports.
pub fn gb_per_s(bytes: u64, elapsed: std::time::Duration) -> f64 {
    bytes as f64 / elapsed.as_secs_f64().max(1e-9) / 1e9
}

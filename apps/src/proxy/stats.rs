//! TTFT statistics: the windows of prefill and end-to-end TTFT samples, the reference
//! statistics block printed to stdout, and the proxy's Prometheus metrics.

use std::collections::VecDeque;

use prometheus::{
    exponential_buckets, Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry,
};

/// TTFT samples kept for the average, median and 99th percentile (the most recent ones);
/// the request count is kept for all requests.
pub const STATS_WINDOW: usize = 100_000;

/// The proxy's Prometheus metrics.
pub(super) struct ProxyMetrics {
    pub(super) registry: Registry,
    pub(super) requests: IntCounterVec,
    pub(super) errors: IntCounterVec,
    pub(super) in_flight: IntGauge,
    pub(super) prefill_seconds: Histogram,
    pub(super) ttft_seconds: Histogram,
    pub(super) kv_tokens: prometheus::IntCounter,
    pub(super) kv_bytes: prometheus::IntCounter,
}

impl ProxyMetrics {
    pub(super) fn new() -> Self {
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
pub(super) struct TtftStats {
    /// Requests whose prefill finished (all time).
    pub(super) count: u64,
    /// End-to-end TTFT samples taken (all time).
    pub(super) e2e_count: u64,
    /// `(count, e2e_count)` at the last printed report.
    pub(super) reported: (u64, u64),
    pub(super) prefill: Window,
    pub(super) e2e: Window,
}

#[derive(Default)]
pub(super) struct Window(VecDeque<f64>);

impl Window {
    pub(super) fn push(&mut self, ms: f64) {
        if self.0.len() == STATS_WINDOW {
            self.0.pop_front();
        }
        self.0.push_back(ms);
    }

    /// (average, median, 99th percentile), numpy's linear interpolation.
    pub(super) fn summary(&self) -> Option<(f64, f64, f64)> {
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
pub(super) fn percentile(v: &[f64], p: f64) -> f64 {
    let rank = p / 100.0 * (v.len() - 1) as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    v[lo] + (v[hi] - v[lo]) * (rank - lo as f64)
}

/// A float as Python prints it (`45.0`, `45.2`).
pub(super) fn py_float(x: f64) -> String {
    if x.is_finite() && x.fract() == 0.0 && x.abs() < 1e16 {
        format!("{x:.1}")
    } else {
        format!("{x}")
    }
}

impl TtftStats {
    /// The reference block, plus the same lines for end-to-end TTFT.
    pub(super) fn report(&self) -> String {
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
}

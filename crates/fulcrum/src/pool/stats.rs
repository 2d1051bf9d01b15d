//! Live per-server counters, updated with relaxed atomics on the request path and read by the admin
//! API and the Prometheus collector at scrape time (so a request pays a handful of atomic adds, no
//! locks and no label lookups).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the request duration histogram buckets.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Smoothing factor of the latency EWMA (weight of the newest sample).
const EWMA_ALPHA: f64 = 0.1;

/// Counters of one server.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Requests in flight (from the pick until the response body is fully sent).
    pub active: AtomicI64,
    /// Responses by status class: index 0 = 1xx … 4 = 5xx.
    pub responses: [AtomicU64; 5],
    /// Requests that failed at the server: connect errors, resets, timeouts.
    pub failures: AtomicU64,
    /// Histogram of response times (to the response head), cumulative counts per [`LATENCY_BUCKETS`] bound
    /// are computed at scrape time from these per-bucket counts; the last slot is +Inf.
    pub latency_buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    /// Sum of observed response times in microseconds.
    pub latency_sum_us: AtomicU64,
    /// Exponentially weighted moving average of response time, in nanoseconds.
    pub latency_ewma_ns: AtomicU64,
}

impl ServerStats {
    /// Requests answered so far (every status class).
    pub fn requests_total(&self) -> u64 {
        self.responses
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    /// Failed requests so far.
    pub fn failures_total(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> i64 {
        self.active.load(Ordering::Relaxed).max(0)
    }

    /// The latency EWMA in milliseconds.
    pub fn latency_ewma_ms(&self) -> f64 {
        self.latency_ewma_ns.load(Ordering::Relaxed) as f64 / 1e6
    }

    /// Records a response with `status` whose head arrived `elapsed` after the request was sent.
    #[inline]
    pub fn record_response(&self, status: u16, elapsed: Duration) {
        let class = usize::from((status / 100).clamp(1, 5)) - 1;
        self.responses[class].fetch_add(1, Ordering::Relaxed);
        self.record_latency(elapsed);
    }

    /// Records a failure (no usable response from the server).
    #[inline]
    pub fn record_failure(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
    }

    #[inline]
    fn record_latency(&self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        let bucket = LATENCY_BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.latency_buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
        // A lost update between two racing requests only delays the average by one sample.
        let sample = elapsed.as_nanos() as f64;
        let old = self.latency_ewma_ns.load(Ordering::Relaxed) as f64;
        let new = if old == 0.0 {
            sample
        } else {
            old + EWMA_ALPHA * (sample - old)
        };
        self.latency_ewma_ns.store(new as u64, Ordering::Relaxed);
    }

    /// Cumulative histogram buckets `(upper bound, count)` and the total count, for Prometheus.
    pub fn latency_histogram(&self) -> (Vec<(f64, u64)>, u64, f64) {
        let mut acc = 0;
        let mut buckets = Vec::with_capacity(LATENCY_BUCKETS.len() + 1);
        for (i, bound) in LATENCY_BUCKETS
            .iter()
            .chain(std::iter::once(&f64::INFINITY))
            .enumerate()
        {
            acc += self.latency_buckets[i].load(Ordering::Relaxed);
            buckets.push((*bound, acc));
        }
        let sum = self.latency_sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        (buckets, acc, sum)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_are_counted_by_class_and_latency_by_bucket() {
        let s = ServerStats::default();
        s.record_response(200, Duration::from_micros(300));
        s.record_response(503, Duration::from_millis(30));
        s.record_response(101, Duration::from_secs(20));
        assert_eq!(s.requests_total(), 3);
        assert_eq!(s.responses[4].load(Ordering::Relaxed), 1);
        let (buckets, count, sum) = s.latency_histogram();
        assert_eq!(count, 3);
        assert_eq!(buckets[0], (0.0005, 1));
        assert_eq!(buckets[6], (0.05, 2));
        assert_eq!(buckets.last().unwrap().1, 3);
        assert!((sum - 20.0303).abs() < 1e-6);
        assert!(s.latency_ewma_ms() > 0.0);
    }
}

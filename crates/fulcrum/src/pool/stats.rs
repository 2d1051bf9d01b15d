//! Live per-server counters, updated with relaxed atomics on the request path and read by the admin
//! API and the Prometheus collector at scrape time (so a request pays a handful of atomic adds, no
//! locks and no label lookups).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the request duration histogram buckets.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Decay time constant τ of the peak latency EWMA, in nanoseconds (Finagle's and linkerd's 10 s): a
/// sample `Δt` after the previous one weighs `1 − e^(−Δt/τ)`, so the average moves at the same speed in
/// real time whatever the request rate.
const EWMA_DECAY_NS: f64 = 10e9;

/// Below this age a latency estimate is read as stored (its decay would be under 1 %).
const READ_DECAY_AFTER_NS: u64 = 100_000_000;

/// The latest time (ns since the clock's origin, to within a millisecond) at which any server recorded a
/// response: a coarse clock that lets the selector decay latency estimates on read without a clock
/// call per server. It advances as long as any server answers, which is when decay matters: a server
/// that gets no traffic while others do is the one whose stale estimate must fade.
static RECENT_NS: AtomicU64 = AtomicU64::new(0);

/// Now, in ns since the clock's origin, plus one (so 0 can mean "never").
fn clock_ns() -> u64 {
    crate::clock::now_ns()
}

/// [`ServerStats::record_l4`]: bytes sent to the server.
pub const TO_SERVER: usize = 0;
/// [`ServerStats::record_l4`]: bytes received from the server.
pub const FROM_SERVER: usize = 1;

/// Counters of one server.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Requests in flight (from the pick until the response body is fully sent).
    pub active: AtomicI64,
    /// Responses by status class: index 0 = 1xx … 4 = 5xx.
    pub responses: [AtomicU64; 5],
    /// Requests that failed at the server: connect errors, resets, timeouts.
    pub failures: AtomicU64,
    /// L4 sessions (TCP connections, UDP flows) sent to the server.
    pub sessions: AtomicU64,
    /// L4 payload bytes: index 0 = sent to the server, 1 = received from it (TCP and UDP).
    pub l4_bytes: [AtomicU64; 2],
    /// UDP datagrams: index 0 = sent to the server, 1 = received from it.
    pub datagrams: [AtomicU64; 2],
    /// Histogram of response times (to the response head), cumulative counts per [`LATENCY_BUCKETS`] bound
    /// are computed at scrape time from these per-bucket counts; the last slot is +Inf.
    pub latency_buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    /// Sum of observed response times in microseconds.
    pub latency_sum_us: AtomicU64,
    /// Peak exponentially weighted moving average of response time, in nanoseconds (0: no sample yet).
    /// A sample above the average replaces it; one below is blended in by the time since the previous
    /// sample (decay time constant 10 s). Read with [`ServerStats::latency_estimate_ns`] for balancing.
    pub latency_ewma_ns: AtomicU64,
    /// When `latency_ewma_ns` was last updated (ns since the process's clock origin).
    latency_stamp_ns: AtomicU64,
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

    /// The latency EWMA as the balancer sees it now: decayed towards 0 for the time since the last sample
    /// when that is over 100 ms (Finagle's decay on read), so a server that gets no traffic is probed
    /// again instead of being judged forever by its last slow answer. 0 when there is no estimate.
    #[inline]
    pub fn latency_estimate_ns(&self) -> u64 {
        self.latency_estimate_at(RECENT_NS.load(Ordering::Relaxed))
    }

    /// [`ServerStats::latency_estimate_ns`] as read at `now_ns` (ns on the clock of
    /// [`ServerStats::observe_latency`]'s stamps) rather than at the coarse shared clock: what the
    /// simulator (`crate::simulate`) reads in virtual time.
    #[inline]
    pub(crate) fn latency_estimate_at(&self, now_ns: u64) -> u64 {
        let ewma = self.latency_ewma_ns.load(Ordering::Relaxed);
        let age = now_ns.saturating_sub(self.latency_stamp_ns.load(Ordering::Relaxed));
        if ewma == 0 || age < READ_DECAY_AFTER_NS {
            return ewma;
        }
        (ewma as f64 * decay(age)) as u64
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

    /// Records an L4 session whose connection took `connect` to establish (the latency least response
    /// time reads, for TCP).
    #[inline]
    pub fn record_session(&self, connect: Duration) {
        self.sessions.fetch_add(1, Ordering::Relaxed);
        self.record_latency(connect);
    }

    /// Records an L4 transfer to (`TO_SERVER`) or from (`FROM_SERVER`) the server: `bytes` of payload,
    /// in one datagram when `datagram`.
    #[inline]
    pub fn record_l4(&self, direction: usize, bytes: usize, datagram: bool) {
        self.l4_bytes[direction].fetch_add(bytes as u64, Ordering::Relaxed);
        if datagram {
            self.datagrams[direction].fetch_add(1, Ordering::Relaxed);
        }
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
        let now = clock_ns();
        // Advance the coarse clock at most once a millisecond, so responses on every core do not all
        // write the same cache line.
        if now > RECENT_NS.load(Ordering::Relaxed) + 1_000_000 {
            RECENT_NS.fetch_max(now, Ordering::Relaxed);
        }
        self.observe_latency(elapsed.as_nanos() as u64, now);
    }

    /// Peak EWMA update (Finagle `PeakEwma`): a slower sample is taken at once, a faster one is blended in
    /// with weight `1 − e^(−Δt/τ)`. A lost update between two racing requests only delays the average by
    /// one sample.
    ///
    /// `now_ns` is the time of the sample (ns since the clock's origin, plus one, as
    /// [`crate::clock::now_ns`]); the request path passes the real clock, the simulator
    /// (`crate::simulate`) its virtual time.
    #[inline]
    pub(crate) fn observe_latency(&self, sample_ns: u64, now_ns: u64) {
        let sample = sample_ns.max(1); // 0 means "no estimate"
        let old = self.latency_ewma_ns.load(Ordering::Relaxed);
        let then = self.latency_stamp_ns.load(Ordering::Relaxed);
        let new = if old == 0 || sample >= old {
            sample
        } else {
            let w = decay(now_ns.saturating_sub(then));
            ((old as f64) * w + (sample as f64) * (1.0 - w)).max(1.0) as u64
        };
        self.latency_ewma_ns.store(new, Ordering::Relaxed);
        self.latency_stamp_ns.store(now_ns, Ordering::Relaxed);
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

/// The weight kept by an average `age_ns` old: `e^(−age/τ)`.
#[inline]
fn decay(age_ns: u64) -> f64 {
    (-(age_ns as f64) / EWMA_DECAY_NS).exp()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn latency_is_a_peak_ewma_that_jumps_up_and_decays_in_real_time() {
        let s = ServerStats::default();
        let mut now = 1;
        // Fast samples every 10 ms settle at 10 ms.
        for _ in 0..100 {
            now += 10 * MS;
            s.observe_latency(10 * MS, now);
        }
        assert_eq!(s.latency_ewma_ns.load(Ordering::Relaxed), 10 * MS);
        // One slow answer is taken at once: no averaging on the way up.
        now += 10 * MS;
        s.observe_latency(1_000 * MS, now);
        assert_eq!(s.latency_ewma_ns.load(Ordering::Relaxed), 1_000 * MS);
        // Back to 10 ms: after 1 s of samples the estimate has lost about 10 % of the gap (e^-0.1) ...
        for _ in 0..100 {
            now += 10 * MS;
            s.observe_latency(10 * MS, now);
        }
        let after_1s = s.latency_ewma_ns.load(Ordering::Relaxed) as f64;
        let want = 10.0 * MS as f64 + 990.0 * MS as f64 * (-0.1f64).exp();
        assert!((after_1s / want - 1.0).abs() < 0.01, "{after_1s} vs {want}");
        // ... and the same whatever the request rate: 10 samples 100 ms apart decay alike.
        let t = ServerStats::default();
        t.observe_latency(1_000 * MS, 1);
        for i in 1..=10 {
            t.observe_latency(10 * MS, 1 + i * 100 * MS);
        }
        let sparse = t.latency_ewma_ns.load(Ordering::Relaxed) as f64;
        assert!((sparse / want - 1.0).abs() < 0.01, "{sparse} vs {want}");
    }

    #[test]
    fn an_idle_estimate_decays_on_read() {
        let s = ServerStats::default();
        assert_eq!(
            s.latency_estimate_at(1_000 * MS),
            0,
            "no sample, no estimate"
        );
        s.observe_latency(500 * MS, 1);
        assert_eq!(
            s.latency_estimate_at(50 * MS),
            500 * MS,
            "fresh: read as stored"
        );
        let later = s.latency_estimate_at(1 + 10_000 * MS) as f64;
        assert!((later / (500.0 * MS as f64 * (-1f64).exp()) - 1.0).abs() < 1e-6);
        assert_eq!(
            s.latency_ewma_ns.load(Ordering::Relaxed),
            500 * MS,
            "reads do not write"
        );
    }

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

//! Least response time: the peak-EWMA cost of Finagle's `PeakEwma` balancer, also used by linkerd and
//! tower (`tower::load::PeakEwma`).
//!
//! A server's cost is `latency · (in_flight + 1) / weight`, where `latency` is a *peak* exponentially
//! weighted moving average of its response times, kept by the pool (`pool::ServerStats`), not here: the
//! selector only reads it through [`Loads::latency_ns`]. The cheapest available server wins; ties are
//! broken as in least connections (at random, in proportion to weight).
//!
//! **Large pools** are handled as in least connections (`least_conn.rs`): up to
//! [`SCAN_MAX`](super::least_conn::SCAN_MAX) (64) servers every server is compared, above that the
//! cheapest of a random sample of [`SAMPLE`](super::least_conn::SAMPLE) (8) distinct available servers
//! wins — the power of d choices, O(d) instead of O(n). Unlike p2c's two, eight candidates nearly always
//! include fast servers, so a slow server still gets next to nothing; a new server is probed when it is
//! drawn, so it gets its first requests a little later than with a full scan.
//!
//! **How a slow server loses its traffic.** Three mechanisms, from fastest to slowest:
//!
//! 1. *In flight.* A server that starts answering slowly keeps its requests longer, so its `in_flight`
//!    grows at once and multiplies its cost — before any slow response has even been measured.
//! 2. *Peak.* The first slow response replaces the average outright (a sample above the average is taken
//!    as is, not blended in), so from that response on the server's cost is multiplied by
//!    `slow / normal`. A server whose responses go from 10 ms to 1 s is therefore avoided within one
//!    slow response time — well under a second for anything that still answers within a second.
//! 3. *Decay.* Faster samples pull the average back down with weight `1 − e^(−Δt/τ)`, τ = 10 s, Δt the
//!    time since the previous sample: about 10 % per second of real time whatever the request rate, so
//!    a recovered server wins its traffic back over tens of seconds, and one bad sample is forgiven.
//!    A server that gets no traffic at all decays on read (towards 0, as in Finagle), so it is probed
//!    again rather than starved forever.
//!
//! A server with no sample yet (latency 0) costs 0 when idle and is maximally expensive while it has a
//! request in flight (Finagle's "penalty"): a new server is probed one request at a time until its first
//! response gives it a real estimate, instead of taking every request until then.

use super::least_conn::least;
use super::rng::Rng;
use super::{Candidates, Loads};

/// Peak-EWMA least response time.
#[derive(Debug)]
pub struct LeastResponseTime {
    weights: Box<[u32]>,
    rng: Rng,
}

impl LeastResponseTime {
    /// Least response time over servers with these weights (index = server); `seed` drives tie-breaks.
    pub fn new(weights: &[u32], seed: u64) -> Self {
        LeastResponseTime {
            weights: weights.iter().map(|&w| w.max(1)).collect(),
            rng: Rng::new(seed),
        }
    }

    /// The available server with the lowest `latency · (in_flight + 1) / weight` (of the whole pool up to
    /// 64 servers, of a random sample of 8 above), then the others in index order.
    #[inline]
    pub fn pick<L: Loads + ?Sized>(&self, loads: &L) -> Candidates {
        let first = least(&self.weights, loads, &self.rng, |i| {
            cost(loads.latency_ns(i), loads.in_flight(i))
        });
        Candidates::starting_at(first, self.weights.len())
    }
}

/// `latency · (in_flight + 1)`, exact in `u128`; a server without a sample costs 0 idle, the maximum busy.
#[inline]
fn cost(latency_ns: u64, in_flight: u64) -> u128 {
    match (latency_ns, in_flight) {
        (0, 0) => 0,
        (0, _) => u128::MAX,
        // At most (2^64 − 1) · 2^64 < 2^128: no overflow.
        (l, f) => u128::from(l) * (u128::from(f) + 1),
    }
}

#[cfg(test)]
mod tests {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;

    use super::super::testing::FixedLoads;
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn cheapest_cost_wins_and_in_flight_counts() {
        let s = LeastResponseTime::new(&[1, 1, 1], 0);
        let mut loads = FixedLoads::latency(&[10 * MS, 20 * MS, 1000 * MS]);
        assert_eq!(s.pick(&loads).next(), Some(0));
        // 10 ms × 3 = 30 > 20 ms × 1: the slower but idle server wins.
        loads.in_flight = vec![2, 0, 0];
        assert_eq!(s.pick(&loads).next(), Some(1));
        // Weight divides the cost: 20 ms × 1 / 4 beats 10 ms × 1.
        let s = LeastResponseTime::new(&[1, 4, 1], 0);
        loads.in_flight = vec![0, 0, 0];
        assert_eq!(s.pick(&loads).next(), Some(1));
    }

    #[test]
    fn a_new_server_is_probed_one_request_at_a_time() {
        let s = LeastResponseTime::new(&[1, 1], 0);
        let mut loads = FixedLoads::latency(&[5 * MS, 0]);
        assert_eq!(
            s.pick(&loads).next(),
            Some(1),
            "idle and unmeasured: probe it"
        );
        loads.in_flight = vec![50, 1];
        assert_eq!(s.pick(&loads).next(), Some(0), "its probe is still out");
    }

    /// An event simulation: a request arrives every 0.1 ms, each takes its server's latency; two servers
    /// answer in 10 ms and one in 100 ms, and their latency estimates already know it.
    #[test]
    fn a_slow_server_gets_almost_no_traffic_under_load() {
        let latency = [10 * MS, 10 * MS, 100 * MS];
        let s = LeastResponseTime::new(&[1, 1, 1], 9);
        let mut loads = FixedLoads::latency(&latency);
        let mut done = BinaryHeap::new();
        let mut picks = [0u32; 3];
        for n in 0..20_000u64 {
            let now = n * MS / 10;
            while let Some(&Reverse((t, i))) = done.peek() {
                if t > now {
                    break;
                }
                done.pop();
                loads.in_flight[i] -= 1;
            }
            let i = s.pick(&loads).next().unwrap();
            picks[i] += 1;
            loads.in_flight[i] += 1;
            done.push(Reverse((now + latency[i], i)));
        }
        let slow_share = f64::from(picks[2]) / 20_000.0;
        // Equal costs need 10 × (in flight + 1) on the fast servers = 100 × (in flight + 1) on the slow
        // one; by Little's law that leaves the slow server about 0.4 % of the traffic (round robin: 33 %).
        assert!(slow_share < 0.02, "{picks:?}");
        assert!(picks[0].abs_diff(picks[1]) < 1_000, "{picks:?}");
    }

    /// The same simulation over 100 servers (sampled picks): ten answer in 100 ms, ninety in 10 ms, and
    /// requests arrive every 10 µs, about eleven in flight per fast server.
    #[test]
    fn slow_servers_of_a_large_pool_get_almost_no_traffic() {
        let latency: Vec<u64> = (0..100)
            .map(|i| if i % 10 == 3 { 100 * MS } else { 10 * MS })
            .collect();
        let s = LeastResponseTime::new(&[1; 100], 10);
        let mut loads = FixedLoads::latency(&latency);
        let mut done = BinaryHeap::new();
        let mut slow = 0u32;
        for n in 0..40_000u64 {
            let now = n * MS / 100;
            while let Some(&Reverse((t, i))) = done.peek() {
                if t > now {
                    break;
                }
                done.pop();
                loads.in_flight[i] -= 1;
            }
            let i = s.pick(&loads).next().unwrap();
            if latency[i] > 10 * MS {
                slow += 1;
            }
            loads.in_flight[i] += 1;
            done.push(Reverse((now + latency[i], i)));
        }
        // Round robin would give them 10 %; the slow servers hold about one request each.
        let slow_share = f64::from(slow) / 40_000.0;
        assert!(slow_share < 0.01, "{slow_share}");
        let busiest = loads.in_flight.iter().max().unwrap();
        assert!(*busiest <= 16, "{:?}", loads.in_flight);
    }

    #[test]
    fn cost_never_overflows() {
        assert_eq!(cost(u64::MAX, u64::MAX), u128::from(u64::MAX) << 64);
        assert_eq!(cost(0, 0), 0);
        assert_eq!(cost(0, 3), u128::MAX);
    }
}

//! A ketama consistent-hash ring with virtual nodes and optional bounded loads: `consistent_hash`.
//!
//! Karger et al., "Consistent hashing and random trees", STOC 1997; the ketama layout of libketama (160
//! points per server). Each server owns `160 × weight` points (weights first divided by their greatest
//! common divisor; at most [`MAX_POINTS`] in all, scaled down proportionally beyond that, at least one
//! each). Point `j` of a server is `xxh3(name ‖ 0xff ‖ j as u32 LE, RING_SEED)` — its identity, never its
//! position in the list. A key (passed through `mix64`) belongs to the first point at or after it,
//! wrapping: a binary search, O(log points). Removing a server moves only the keys of its points, each
//! to the next point's server.
//!
//! An unavailable server is stepped over: the walk continues to the next point whose server is
//! available, so a down server's keys spread over the others and the rest stay put.
//!
//! **Bounded loads** (Mirrokni, Thorup & Zadimoghaddam, "Consistent Hashing with Bounded Loads", SODA
//! 2018; HAProxy's `hash-balance-factor`): with a factor `f` (a percentage, at least 100), a server may
//! hold at most `⌈(total in flight + 1) × f/100 × weight / total weight⌉` requests (total over available
//! servers, the +1 being this request) and always at least one; the walk goes on to the next server
//! under its bound. The keys of a hot server overflow to its ring successors instead of overloading it,
//! at the cost of some stickiness. Knowing the total needs one pass over the servers, so a bounded pick
//! is O(n) (a pool-wide in-flight counter would make it O(log n) again).
//!
//! Walks stop after [`MAX_WALK`] points; if none qualified by then (a pool almost entirely down, or
//! loads changing under the walk) the first available server seen, else the key's own server, is the
//! choice and the fallbacks in index order do the rest.

use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::hash::{mix64, RING_SEED};
use super::weighted::gcd;
use super::Loads;

/// Points per unit of (reduced) weight, as in libketama.
pub const POINTS_PER_WEIGHT: u64 = 160;
/// The most points a ring holds (12 bytes each): 16 points per server still at 65 536 servers.
pub const MAX_POINTS: u64 = 1 << 20;
/// The most points a pick walks past the key's own.
pub const MAX_WALK: usize = 1024;

/// A consistent-hash ring.
#[derive(Debug)]
pub struct Ring {
    /// Point hashes, ascending.
    points: Box<[u64]>,
    /// The server of each point.
    owners: Box<[u32]>,
    /// Server weights (for the load bound).
    weights: Box<[u32]>,
    /// `hash_balance_factor`, when bounded.
    factor: Option<u32>,
}

impl Ring {
    /// A ring over servers with these names and weights (0 counts as 1); `hash_balance_factor` bounds
    /// loads (values below 100 count as 100, `None` or `Some(0)` means unbounded).
    pub fn new(ids: &[&str], weights: &[u32], hash_balance_factor: Option<u32>) -> Self {
        debug_assert_eq!(ids.len(), weights.len());
        let weights: Box<[u32]> = weights.iter().map(|&w| w.max(1)).collect();
        let counts = point_counts(&weights);
        let mut pairs: Vec<(u64, u32)> = Vec::with_capacity(counts.iter().sum::<u64>() as usize);
        let mut buf = Vec::new();
        for (i, (id, &count)) in ids.iter().zip(&counts).enumerate() {
            for j in 0..count as u32 {
                buf.clear();
                buf.extend_from_slice(id.as_bytes());
                buf.push(0xff); // never in UTF-8: "a" + point 1 cannot equal some other name's point
                buf.extend_from_slice(&j.to_le_bytes());
                pairs.push((xxh3_64_with_seed(&buf, RING_SEED), i as u32));
            }
        }
        // Equal hashes (one in 2^64) are ordered by name, so the ring never depends on list order.
        pairs.sort_unstable_by(|a, b| {
            a.0.cmp(&b.0)
                .then_with(|| ids[a.1 as usize].cmp(ids[b.1 as usize]))
        });
        Ring {
            points: pairs.iter().map(|p| p.0).collect(),
            owners: pairs.iter().map(|p| p.1).collect(),
            weights,
            factor: hash_balance_factor.filter(|&f| f > 0).map(|f| f.max(100)),
        }
    }

    /// The number of points on the ring.
    pub fn points(&self) -> usize {
        self.points.len()
    }

    /// The server for `key`: the owner of the first point at or after it whose server is available (and
    /// under its load bound, when bounded). Not for an empty ring.
    #[inline]
    pub(super) fn pick_key<L: Loads + ?Sized>(&self, key: u64, loads: &L) -> usize {
        let len = self.points.len();
        let k = mix64(key);
        let start = self.points.partition_point(|&p| p < k);
        let start = if start == len { 0 } else { start };
        let home = self.owners[start] as usize;
        match self.factor {
            None if loads.available(home) => home,
            None => self.walk(start, loads, |_| true),
            Some(factor) => {
                let (total_in_flight, total_weight) = totals(&self.weights, loads);
                // in_flight < ⌈(T+1)·f/100·w/W⌉  ⇔  in_flight · 100 · W < (T+1) · f · w  (for integers).
                let budget = (u128::from(total_in_flight) + 1) * u128::from(factor);
                let under = |s: usize| {
                    let f = u128::from(loads.in_flight(s));
                    let w = u128::from(self.weights[s]);
                    f == 0 || f * 100 * u128::from(total_weight) < budget * w
                };
                self.walk(start, loads, under)
            }
        }
    }

    /// The first available server from point `start` on that is `under` its bound, within [`MAX_WALK`]
    /// points; else the first available one seen; else the owner of `start`.
    #[inline]
    fn walk<L: Loads + ?Sized>(
        &self,
        start: usize,
        loads: &L,
        under: impl Fn(usize) -> bool,
    ) -> usize {
        let len = self.points.len();
        let mut prev = usize::MAX;
        let mut fallback = None;
        for step in 0..len.min(MAX_WALK + 1) {
            let mut at = start + step;
            if at >= len {
                at -= len;
            }
            let s = self.owners[at] as usize;
            // Consecutive points of one server are common with few servers: judge each run once.
            if s != prev && loads.available(s) {
                if under(s) {
                    return s;
                }
                fallback.get_or_insert(s);
            }
            prev = s;
        }
        fallback.unwrap_or(self.owners[start] as usize)
    }
}

/// Total in flight and total weight of the available servers.
#[inline]
fn totals<L: Loads + ?Sized>(weights: &[u32], loads: &L) -> (u64, u64) {
    let mut in_flight = 0u64;
    let mut weight = 0u64;
    for (i, &w) in weights.iter().enumerate() {
        if loads.available(i) {
            in_flight = in_flight.saturating_add(loads.in_flight(i));
            weight += u64::from(w);
        }
    }
    (in_flight, weight.max(1))
}

/// Points per server: 160 × weight / gcd, scaled down to fit [`MAX_POINTS`], at least 1.
fn point_counts(weights: &[u32]) -> Vec<u64> {
    let g = weights.iter().map(|&w| u64::from(w)).fold(0, gcd).max(1);
    let counts: Vec<u64> = weights
        .iter()
        .map(|&w| POINTS_PER_WEIGHT * (u64::from(w) / g))
        .collect();
    let total: u64 = counts.iter().sum();
    if total <= MAX_POINTS {
        return counts;
    }
    counts
        .iter()
        .map(|&c| (u128::from(c) * u128::from(MAX_POINTS) / u128::from(total)).max(1) as u64)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::testing::FixedLoads;
    use super::*;

    fn ring(n: usize, factor: Option<u32>) -> Ring {
        let names: Vec<String> = (0..n).map(|i| format!("app-{i}")).collect();
        let ids: Vec<&str> = names.iter().map(String::as_str).collect();
        Ring::new(&ids, &vec![1; n], factor)
    }

    #[test]
    fn points_follow_weights_and_are_capped() {
        assert_eq!(point_counts(&[1, 2, 3]), vec![160, 320, 480]);
        assert_eq!(point_counts(&[100, 200]), vec![160, 320]);
        let big = point_counts(&[1_000_000, 1, 999_999]);
        assert!(
            big.iter().sum::<u64>() <= MAX_POINTS && big[1] == 1,
            "{big:?}"
        );
        assert_eq!(ring(3, None).points(), 480);
    }

    #[test]
    fn the_order_of_servers_does_not_matter() {
        let a = Ring::new(&["x", "y", "z"], &[1, 2, 3], None);
        let b = Ring::new(&["z", "x", "y"], &[3, 1, 2], None);
        let loads = FixedLoads::idle(3);
        let map = [1usize, 2, 0]; // a's index → b's index
        for k in 0..2_000 {
            assert_eq!(map[a.pick_key(k, &loads)], b.pick_key(k, &loads));
        }
    }

    #[test]
    fn an_unavailable_server_only_gives_away_its_own_keys() {
        let r = ring(4, None);
        let mut loads = FixedLoads::idle(4);
        let before: Vec<usize> = (0..5_000).map(|k| r.pick_key(k, &loads)).collect();
        loads.available[2] = false;
        for (k, &b) in before.iter().enumerate() {
            let now = r.pick_key(k as u64, &loads);
            assert!(now == b || b == 2, "key {k}: {b} → {now}");
            assert_ne!(now, 2);
        }
        loads.available = vec![false; 4];
        let _ = r.pick_key(1, &loads); // walks at most MAX_WALK points, returns the home server
    }

    #[test]
    fn bounded_loads_send_keys_past_a_server_at_its_bound() {
        let r = ring(3, Some(125));
        let key = 12_345;
        let home = r.pick_key(key, &FixedLoads::idle(3));
        // Home holds 10 of 12 in flight: the bound is ⌈13 × 1.25 / 3⌉ = 6, so the key moves on.
        let mut f = vec![1u64; 3];
        f[home] = 10;
        let loads = FixedLoads::in_flight(&f);
        let moved = r.pick_key(key, &loads);
        assert_ne!(moved, home);
        // Under the bound it stays home: 2 of 4 in flight, bound ⌈5 × 1.25 / 3⌉ = 3.
        f[home] = 2;
        assert_eq!(r.pick_key(key, &FixedLoads::in_flight(&f)), home);
        // An idle server is always eligible, whatever the others do.
        assert_eq!(r.pick_key(key, &FixedLoads::in_flight(&[0, 0, 0])), home);
    }

    #[test]
    fn bounded_loads_keep_every_server_within_the_factor() {
        // Closed loop: 300 requests in flight, all with keys that would pile onto a handful of points.
        let r = ring(5, Some(150));
        let mut loads = FixedLoads::in_flight(&[0; 5]);
        for k in 0..300u64 {
            let s = r.pick_key(k % 3, &loads);
            loads.in_flight[s] += 1;
        }
        let max = *loads.in_flight.iter().max().unwrap();
        // ⌈300 × 1.5 / 5⌉ = 90.
        assert!(max <= 90, "{:?}", loads.in_flight);
    }
}

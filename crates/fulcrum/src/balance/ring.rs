//! A ketama consistent-hash ring with virtual nodes and optional bounded loads: `consistent_hash`, and
//! `ip_hash` for pools of more than 64 servers.
//!
//! Karger et al., "Consistent hashing and random trees", STOC 1997; the ketama layout of libketama (160
//! points per server). Each server owns `160 × weight` points (weights first divided by their greatest
//! common divisor; at most [`MAX_POINTS`] in all, scaled down proportionally beyond that, at least one
//! each). Point `j` of a server is `xxh3(name ‖ 0xff ‖ j as u32 LE, RING_SEED)` — its identity, never its
//! position in the list. A key (passed through `mix64`) belongs to the first point at or after it,
//! wrapping. Removing a server moves only the keys of its points, each to the next point's server.
//!
//! **Lookup.** A binary search over a million points (8 MiB at 10 000 servers) is about twenty
//! dependent loads, most of them cache misses: 0.35–0.6 µs. So the ring also keeps a bucket index on the
//! top bits of the hashes: `index[b]` is the first point whose hash starts with `b`, with about four
//! points per bucket (`index` holds one `u32` per four points). A lookup reads its bucket's two bounds,
//! then searches the few points between them: O(1) expected, three or four cache lines, and exactly the
//! point the full binary search finds (`index_finds_the_same_point_as_a_binary_search`).
//!
//! An unavailable server is stepped over: the walk continues to the next point whose server is
//! available, so a down server's keys spread over the others and the rest stay put.
//!
//! **Bounded loads** (Mirrokni, Thorup & Zadimoghaddam, "Consistent Hashing with Bounded Loads", SODA
//! 2018; HAProxy's `hash-balance-factor`): with a factor `f` (a percentage, at least 100), a server may
//! hold at most `⌈(T + 1) × f/100 × weight / W⌉` requests and always at least one, where `T` is the
//! pool's total in flight ([`Loads::total_in_flight`], the +1 being this request) and `W` the total
//! weight of the available servers; the walk goes on to the next server under its bound. The keys of a
//! hot server overflow to its ring successors instead of overloading it, at the cost of some
//! stickiness. As in HAProxy (`served` over `tot_used`), `T` counts every server's requests, including
//! those a draining server is finishing, and `W` only the servers that take new ones.
//!
//! Neither total is summed per pick. `T` is the pool's counter (one atomic that the pool's `InFlight`
//! guard maintains). `W` is exact for pools of at most [`EXACT_WEIGHT_MAX`] servers (one pass over
//! their availability); for larger pools each bounded pick checks the availability of the next
//! [`WEIGHT_CHUNK`] servers in turn and every full pass over the pool publishes its sum, so `W` is an
//! estimate at most one pass (`n / 16` bounded picks) old. A bounded pick is thus the lookup, O(1)
//! bookkeeping and a short walk: the walk ends at the first server under its bound, which by the
//! bound's definition is most of them (at most `100/f` of the weight can be at its bound).
//!
//! Walks stop after [`MAX_WALK`] points; if none qualified by then (a pool almost entirely down, or
//! loads changing under the walk) the first available server seen, else the key's own server, is the
//! choice and the fallbacks in index order do the rest.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

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
/// Bounded loads: pools of at most this many servers sum the available weight on every pick.
pub const EXACT_WEIGHT_MAX: usize = 64;
/// Bounded loads in larger pools: how many servers' availability each pick adds to the running sum.
pub const WEIGHT_CHUNK: usize = 16;
/// log2 of the average number of points per bucket of the lookup index.
const POINTS_PER_BUCKET_LOG2: u32 = 2;

/// A consistent-hash ring.
#[derive(Debug)]
pub struct Ring {
    /// Point hashes, ascending.
    points: Box<[u64]>,
    /// The server of each point.
    owners: Box<[u32]>,
    /// `index[b]`: the first point whose hash, shifted right by `shift`, is at least `b`; one entry per
    /// bucket plus a last one, the number of points.
    index: Box<[u32]>,
    /// 64 minus the number of bits that select a bucket.
    shift: u32,
    /// Server weights (for the load bound).
    weights: Box<[u32]>,
    /// `hash_balance_factor`, when bounded.
    factor: Option<u32>,
    /// The running estimate of the available weight, for bounded pools of more than
    /// [`EXACT_WEIGHT_MAX`] servers.
    available: AvailableWeight,
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
        let points: Box<[u64]> = pairs.iter().map(|p| p.0).collect();
        let (index, shift) = bucket_index(&points);
        let total_weight = weights.iter().map(|&w| u64::from(w)).sum();
        Ring {
            owners: pairs.iter().map(|p| p.1).collect(),
            points,
            index,
            shift,
            weights,
            factor: hash_balance_factor.filter(|&f| f > 0).map(|f| f.max(100)),
            available: AvailableWeight::new(total_weight),
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
        let start = self.first_point(mix64(key));
        let home = self.owners[start] as usize;
        match self.factor {
            None if loads.available(home) => home,
            None => self.walk(start, loads, |_| true),
            Some(factor) => {
                let total_in_flight = loads.total_in_flight();
                let total_weight = self.available_weight(loads);
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

    /// The first point at or after hash `k`, wrapping: the bucket of `k`'s top bits bounds a short binary
    /// search. Not for an empty ring.
    #[inline]
    fn first_point(&self, k: u64) -> usize {
        let bucket = k.checked_shr(self.shift).unwrap_or(0) as usize;
        let (lo, hi) = (self.index[bucket] as usize, self.index[bucket + 1] as usize);
        let at = lo + self.points[lo..hi].partition_point(|&p| p < k);
        if at == self.points.len() {
            0
        } else {
            at
        }
    }

    /// The total weight of the available servers, at least 1: exact for small pools, else the running
    /// estimate, advanced by this pick.
    #[inline]
    fn available_weight<L: Loads + ?Sized>(&self, loads: &L) -> u64 {
        if self.weights.len() <= EXACT_WEIGHT_MAX {
            let mut weight = 0u64;
            for (i, &w) in self.weights.iter().enumerate() {
                if loads.available(i) {
                    weight += u64::from(w);
                }
            }
            return weight.max(1);
        }
        self.available.advance(&self.weights, loads)
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

/// The bucket index of sorted `points`, and the shift that takes a hash to its bucket: about
/// 2^[`POINTS_PER_BUCKET_LOG2`] points per bucket.
fn bucket_index(points: &[u64]) -> (Box<[u32]>, u32) {
    let log2 = usize::BITS - 1 - points.len().max(1).leading_zeros();
    let bits = log2.saturating_sub(POINTS_PER_BUCKET_LOG2);
    let shift = 64 - bits;
    let mut index = Vec::with_capacity((1 << bits) + 1);
    let mut at = 0;
    for bucket in 0..1u64 << bits {
        // The first hash of the bucket; with a single bucket (`bits` = 0) that is 0.
        let first = bucket.checked_shl(shift).unwrap_or(0);
        while at < points.len() && points[at] < first {
            at += 1;
        }
        index.push(at as u32);
    }
    index.push(points.len() as u32);
    (index.into_boxed_slice(), shift)
}

/// A running sum of the weight of the available servers, for bounded loads in large pools: each call
/// checks the next [`WEIGHT_CHUNK`] servers (a shared cursor goes round the pool), and the call that
/// completes a pass publishes that pass's sum. Concurrent calls may hand a chunk to the next pass, an
/// error of a chunk or two; the estimate is kept between 1 and the total weight.
#[derive(Debug)]
struct AvailableWeight {
    /// Servers checked so far, all passes together.
    cursor: AtomicUsize,
    /// The available weight seen so far in the current pass.
    partial: AtomicU64,
    /// The sum of the last complete pass; the total weight until the first pass completes.
    last: AtomicU64,
    /// The weight of every server.
    total: u64,
}

impl AvailableWeight {
    fn new(total: u64) -> Self {
        AvailableWeight {
            cursor: AtomicUsize::new(0),
            partial: AtomicU64::new(0),
            last: AtomicU64::new(total),
            total,
        }
    }

    /// Checks the next chunk of servers and returns the estimate (`weights.len() > WEIGHT_CHUNK`).
    #[inline]
    fn advance<L: Loads + ?Sized>(&self, weights: &[u32], loads: &L) -> u64 {
        let n = weights.len();
        debug_assert!(n > WEIGHT_CHUNK);
        let sum = |from: usize, to: usize| -> u64 {
            (from..to)
                .filter(|&i| loads.available(i))
                .map(|i| u64::from(weights[i]))
                .sum()
        };
        // Relaxed throughout: these are statistics, they order no other memory.
        let start = self.cursor.fetch_add(WEIGHT_CHUNK, Ordering::Relaxed) % n;
        let end = start + WEIGHT_CHUNK;
        if end < n {
            self.partial.fetch_add(sum(start, end), Ordering::Relaxed);
        } else {
            // This chunk completes a pass and starts the next one.
            let pass = self.partial.swap(sum(0, end - n), Ordering::Relaxed) + sum(start, n);
            self.last.store(pass, Ordering::Relaxed);
        }
        self.last
            .load(Ordering::Relaxed)
            .clamp(1, self.total.max(1))
    }
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

    #[test]
    fn index_finds_the_same_point_as_a_binary_search() {
        assert_eq!(bucket_index(&[]), (vec![0, 0].into_boxed_slice(), 64));
        for n in [1, 3, 40, 700] {
            let r = ring(n, None);
            let len = r.points.len();
            let near_points = r
                .points
                .iter()
                .flat_map(|&p| [p.wrapping_sub(1), p, p.wrapping_add(1)]);
            let keys = (0..20_000u64)
                .map(mix64)
                .chain([0, 1, u64::MAX])
                .chain(near_points);
            for k in keys {
                let want = r.points.partition_point(|&p| p < k);
                let want = if want == len { 0 } else { want };
                assert_eq!(r.first_point(k), want, "n = {n}, key {k:#x}");
            }
            // About four points per bucket.
            assert!(
                r.index.len() - 1 <= len.max(4) / 2,
                "{} buckets",
                r.index.len()
            );
        }
    }

    #[test]
    fn a_large_bounded_pool_tracks_the_available_weight() {
        let n = 200;
        let r = ring(n, Some(125));
        let mut loads = FixedLoads::idle(n);
        for (i, a) in loads.available.iter_mut().enumerate() {
            *a = i % 2 == 0;
        }
        // Until a first pass completes the estimate is every server's weight; one pass is 200 / 16
        // bounded picks.
        assert_eq!(r.available_weight(&loads), 200);
        for k in 0..13 {
            r.pick_key(k, &loads);
        }
        assert_eq!(r.available_weight(&loads), 100);
        // Closed loop: 1 000 requests on keys that pile onto three points. Every available server stays
        // within ⌈1 000 × 1.25 / 100⌉ = 13, and the unavailable ones get nothing.
        for k in 0..1_000u64 {
            let s = r.pick_key(k % 3, &loads);
            loads.in_flight[s] += 1;
        }
        let max = *loads.in_flight.iter().max().unwrap();
        assert!(max <= 13, "{:?}", loads.in_flight);
        assert!(loads.in_flight.iter().skip(1).step_by(2).all(|&f| f == 0));
        // Back up: within two passes (one may have been half done) the estimate has followed.
        loads.available = vec![true; n];
        for k in 0..26 {
            r.pick_key(k, &loads);
        }
        assert_eq!(r.available_weight(&loads), 200);
    }
}

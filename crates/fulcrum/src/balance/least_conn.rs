//! Least connections, weighted: the available server with the fewest requests in flight per unit of
//! weight (nginx `least_conn`, HAProxy `leastconn`).
//!
//! Loads are compared as fractions without floats: `a` is less loaded than `b` when
//! `in_flight(a) · weight(b) < in_flight(b) · weight(a)`.
//!
//! **Ties** are the common case — every idle server has 0 in flight — so how they are broken decides
//! the spread at low load. Starting the scan at a rotating offset and keeping the first minimum is biased:
//! a tied server that follows a run of busier servers wins for every offset inside that run. Instead a
//! second pass over the tied servers picks one at random in proportion to its weight (nginx breaks ties
//! with weighted round robin for the same reason), so an idle pool still honours weights. The second pass
//! only runs when there is more than one tied server.
//!
//! **Exact up to [`SCAN_MAX`] servers, sampled above.** A pool of at most [`SCAN_MAX`] (64) servers is
//! scanned in full: the pick is the exact minimum, O(n), about 0.1–0.3 µs at 64 servers. A larger pool
//! compares [`SAMPLE`] (8) distinct available servers drawn at random instead: the "power of d choices"
//! (Mitzenmacher, "The Power of Two Choices in Randomized Load Balancing", IEEE TPDS 2001; Azar, Broder,
//! Karlin & Upfal, "Balanced allocations", STOC 1994), whose maximum load exceeds the average by only
//! `ln ln n / ln d` + O(1) at any load (Berenbrink, Czumaj, Steger & Vöcking, STOC 2000), where one
//! random choice leaves a gap that grows with the load: the balancing behaviour of the full scan, for
//! O(d) work (about 0.1 µs at any size). The sample is drawn stratified, one server
//! from each of [`SAMPLE`] equal slices of the index range after a random rotation — so the candidates
//! are distinct by construction and every server is equally likely to be one (as in Vöcking's
//! "How asymmetry helps load balancing", J. ACM 2003, which partitions the servers the same way). The
//! comparison is the same as the scan's (load per unit of weight, ties at random in proportion to
//! weight); only the candidates differ: the winner is the least loaded of its sample, not of the pool.
//! An idle pool still favours heavier servers, though slightly less than in proportion (a heavy server
//! shares its sample with others: with weights 1–4 it gets about 3.4 times a weight-1 server's share
//! instead of 4); under load the weighted comparison brings in-flight counts to follow weights. A slice
//! whose drawn server is unavailable is drawn again (up to [`DRAWS_PER_SLICE`] draws in all); only when no
//! available server at all was drawn (nearly every server down) does the pick fall back to the full scan.
//!
//! All randomness comes from one draw of the selector's SplitMix64 generator (one relaxed atomic), which
//! seeds a private sequence for the rest of the pick. See `docs/balancing.md` for the measurements.

use std::cmp::Ordering;

use super::rng::Rng;
use super::{Candidates, Loads};

/// Weighted least connections.
#[derive(Debug)]
pub struct LeastConnections {
    weights: Box<[u32]>,
    rng: Rng,
}

impl LeastConnections {
    /// Least connections over servers with these weights (index = server); `seed` drives tie-breaks.
    pub fn new(weights: &[u32], seed: u64) -> Self {
        LeastConnections {
            weights: weights.iter().map(|&w| w.max(1)).collect(),
            rng: Rng::new(seed),
        }
    }

    /// The least loaded available server relative to its weight (of the whole pool up to [`SCAN_MAX`]
    /// servers, of a random sample of [`SAMPLE`] above), then the others in index order.
    #[inline]
    pub fn pick<L: Loads + ?Sized>(&self, loads: &L) -> Candidates {
        let first = least(&self.weights, loads, &self.rng, |i| {
            u128::from(loads.in_flight(i))
        });
        Candidates::starting_at(first, self.weights.len())
    }
}

/// Pools of at most this many servers are scanned in full; larger ones are sampled.
pub const SCAN_MAX: usize = 64;
/// How many servers a sampled pick compares: the `d` of "power of d choices".
pub const SAMPLE: usize = 8;
/// How many times a slice of a sampled pick is drawn before it is left out (its draws all unavailable).
pub const DRAWS_PER_SLICE: usize = 4;

/// The available server with the lowest `cost(i) / weights[i]`; tied servers are chosen at random in
/// proportion to their weight. Exact for pools up to [`SCAN_MAX`] servers, among a random sample of
/// [`SAMPLE`] servers above. With no server available, 0 (the caller's fallback order then finds none).
#[inline]
pub(super) fn least<L, F>(weights: &[u32], loads: &L, rng: &Rng, cost: F) -> usize
where
    L: Loads + ?Sized,
    F: Fn(usize) -> u128,
{
    if weights.len() <= SCAN_MAX {
        scan(weights, loads, rng, cost)
    } else {
        sample(weights, loads, rng, cost)
    }
}

/// How `cost_a / weight_a` compares with `cost_b / weight_b`, by cross-multiplication in `u128`; a
/// product that saturates (only with absurd loads) compares equal, which only turns a comparison into a
/// tie.
#[inline]
fn compare(cost_a: u128, weight_a: u32, cost_b: u128, weight_b: u32) -> Ordering {
    cost_a
        .saturating_mul(u128::from(weight_b))
        .cmp(&cost_b.saturating_mul(u128::from(weight_a)))
}

/// [`least`] over every server: O(n).
#[inline]
fn scan<L, F>(weights: &[u32], loads: &L, rng: &Rng, cost: F) -> usize
where
    L: Loads + ?Sized,
    F: Fn(usize) -> u128,
{
    let mut best = usize::MAX;
    let mut best_cost = 0u128;
    let mut best_w = 1u128;
    let mut tied = 0u32;
    let mut tied_weight = 0u64;
    for (i, &w) in weights.iter().enumerate() {
        if !loads.available(i) {
            continue;
        }
        let c = cost(i);
        let w128 = u128::from(w);
        if best != usize::MAX {
            let (mine, theirs) = (c.saturating_mul(best_w), best_cost.saturating_mul(w128));
            if mine > theirs {
                continue;
            }
            if mine == theirs {
                tied += 1;
                tied_weight += u64::from(w);
                continue;
            }
        }
        (best, best_cost, best_w, tied, tied_weight) = (i, c, w128, 1, u64::from(w));
    }
    if best == usize::MAX {
        return 0;
    }
    if tied == 1 {
        return best;
    }
    // The loads may have moved since the first pass; if the drawn server is no longer tied, the first
    // minimum found is as good an answer.
    let mut ticket = rng.below(tied_weight);
    for (i, &w) in weights.iter().enumerate().skip(best) {
        if !loads.available(i) {
            continue;
        }
        let (mine, theirs) = (
            cost(i).saturating_mul(best_w),
            best_cost.saturating_mul(u128::from(w)),
        );
        if mine == theirs {
            if ticket < u64::from(w) {
                return i;
            }
            ticket -= u64::from(w);
        }
    }
    best
}

/// [`least`] over [`SAMPLE`] distinct available servers drawn at random: one from each of [`SAMPLE`]
/// equal slices of the index range, rotated by a random offset (so every server is equally likely to be
/// drawn). O([`SAMPLE`]); the full [`scan`] only when no available server was drawn.
#[inline]
fn sample<L, F>(weights: &[u32], loads: &L, rng: &Rng, cost: F) -> usize
where
    L: Loads + ?Sized,
    F: Fn(usize) -> u128,
{
    let n = weights.len();
    debug_assert!(n >= SAMPLE);
    let mut random = rng.stream();
    let rotation = random.below(n as u64) as usize;
    let mut picked = [0usize; SAMPLE];
    let mut costs = [0u128; SAMPLE];
    let mut count = 0;
    let mut lo = 0;
    for slice in 1..=SAMPLE {
        let hi = slice * n / SAMPLE;
        for _ in 0..DRAWS_PER_SLICE {
            let mut i = rotation + lo + random.below((hi - lo) as u64) as usize;
            if i >= n {
                i -= n;
            }
            if loads.available(i) {
                (picked[count], costs[count]) = (i, cost(i));
                count += 1;
                break;
            }
        }
        lo = hi;
    }
    if count == 0 {
        return scan(weights, loads, rng, cost);
    }
    let weight = |s: usize| weights[picked[s]];
    let mut best = 0;
    let mut tied = 1u32;
    let mut tied_weight = u64::from(weight(0));
    for s in 1..count {
        match compare(costs[s], weight(s), costs[best], weight(best)) {
            Ordering::Greater => {}
            Ordering::Equal => {
                tied += 1;
                tied_weight += u64::from(weight(s));
            }
            Ordering::Less => (best, tied, tied_weight) = (s, 1, u64::from(weight(s))),
        }
    }
    if tied > 1 {
        let mut ticket = random.below(tied_weight);
        for s in best..count {
            if compare(costs[s], weight(s), costs[best], weight(best)) == Ordering::Equal {
                if ticket < u64::from(weight(s)) {
                    return picked[s];
                }
                ticket -= u64::from(weight(s));
            }
        }
    }
    picked[best]
}

#[cfg(test)]
mod tests {
    use super::super::testing::FixedLoads;
    use super::*;

    fn first(s: &LeastConnections, loads: &FixedLoads) -> usize {
        s.pick(loads).next().unwrap()
    }

    #[test]
    fn picks_the_least_loaded_relative_to_weight() {
        let s = LeastConnections::new(&[1, 1, 1], 0);
        assert_eq!(first(&s, &FixedLoads::in_flight(&[5, 2, 9])), 1);
        // Weight 4 with 7 in flight (1.75 per unit) beats weight 1 with 2 in flight.
        let s = LeastConnections::new(&[1, 4, 1], 0);
        assert_eq!(first(&s, &FixedLoads::in_flight(&[2, 7, 3])), 1);
        // ... but not weight 4 with 9 (2.25 per unit).
        assert_eq!(first(&s, &FixedLoads::in_flight(&[2, 9, 3])), 0);
    }

    #[test]
    fn skips_unavailable_servers() {
        let s = LeastConnections::new(&[1, 1, 1], 0);
        let mut loads = FixedLoads::in_flight(&[0, 5, 9]);
        loads.available[0] = false;
        assert_eq!(first(&s, &loads), 1);
        loads.available = vec![false; 3];
        assert_eq!(s.pick(&loads).len(), 3, "still every server as a fallback");
    }

    #[test]
    fn ties_rotate_over_every_tied_server_in_proportion_to_weight() {
        // Servers 0 and 3 tie at zero; 1 and 2 are busy. A rotating scan offset would give 0 three picks
        // out of four; the weighted draw gives 3 its weight's share.
        let s = LeastConnections::new(&[1, 1, 1, 3], 42);
        let loads = FixedLoads::in_flight(&[0, 4, 4, 0]);
        let mut counts = [0u32; 4];
        for _ in 0..40_000 {
            counts[first(&s, &loads)] += 1;
        }
        assert_eq!((counts[1], counts[2]), (0, 0));
        let share3 = f64::from(counts[3]) / 40_000.0;
        assert!((share3 - 0.75).abs() < 0.01, "{counts:?}");
    }

    #[test]
    fn closed_loop_in_flight_follows_weights() {
        // Each pick adds one in flight; with weights 1:2:3 the least-loaded rule keeps in-flight counts at
        // exactly 1:2:3 whenever the total is a multiple of 6.
        let s = LeastConnections::new(&[1, 2, 3], 3);
        let mut loads = FixedLoads::in_flight(&[0, 0, 0]);
        for _ in 0..600 {
            let i = first(&s, &loads);
            loads.in_flight[i] += 1;
        }
        assert_eq!(loads.in_flight, vec![100, 200, 300]);
    }

    fn per_unit_of_weight(loads: &FixedLoads, weights: &[u32]) -> (f64, f64) {
        let per = loads
            .in_flight
            .iter()
            .zip(weights)
            .map(|(&f, &w)| f as f64 / f64::from(w));
        per.fold((f64::MAX, 0.0), |(lo, hi), x| (lo.min(x), hi.max(x)))
    }

    #[test]
    fn a_large_pool_is_sampled_and_stays_balanced() {
        // Closed loop over 1 000 servers of weights 1–4 (total 2 500): 25 000 picks, each adding one in
        // flight, average 10 per unit of weight. With one random choice the busiest server would hold
        // about twice the average; the least loaded of 8 stays within a few requests of it.
        let weights: Vec<u32> = (0..1_000).map(|i| 1 + (i % 4) as u32).collect();
        let s = LeastConnections::new(&weights, 5);
        let mut loads = FixedLoads::in_flight(&[0; 1_000]);
        for _ in 0..25_000 {
            let i = first(&s, &loads);
            loads.in_flight[i] += 1;
        }
        let (lo, hi) = per_unit_of_weight(&loads, &weights);
        assert!(lo >= 8.0 && hi <= 12.0, "{lo} – {hi} per unit of weight");
    }

    #[test]
    fn an_idle_large_pool_still_favours_heavier_servers() {
        // Weights 1 and 4 alternate: in proportion, the weight-4 servers would get 80 %. Sampled, a heavy
        // server shares its sample with others, so a little less; every server gets picked.
        let weights: Vec<u32> = (0..200).map(|i| if i % 2 == 0 { 1 } else { 4 }).collect();
        let s = LeastConnections::new(&weights, 7);
        let loads = FixedLoads::idle(200);
        let mut counts = [0u32; 200];
        for _ in 0..100_000 {
            counts[first(&s, &loads)] += 1;
        }
        let heavy: u32 = counts.iter().skip(1).step_by(2).sum();
        let share = f64::from(heavy) / 100_000.0;
        assert!((0.74..0.81).contains(&share), "{share}");
        assert!(counts.iter().all(|&c| c > 0), "{counts:?}");
    }

    #[test]
    fn a_sampled_pick_skips_unavailable_servers_and_finds_the_last_one_up() {
        let s = LeastConnections::new(&[1; 500], 6);
        let mut loads = FixedLoads::idle(500);
        for (i, a) in loads.available.iter_mut().enumerate() {
            *a = i % 3 == 0;
        }
        assert!((0..2_000).all(|_| loads.available[first(&s, &loads)]));
        // One server up: the sample's draws almost never find it, the fallback scan does.
        loads.available = vec![false; 500];
        loads.available[123] = true;
        assert!((0..200).all(|_| first(&s, &loads) == 123));
        loads.available[123] = false;
        assert_eq!(
            s.pick(&loads).len(),
            500,
            "still every server as a fallback"
        );
    }

    #[test]
    fn the_sample_is_spread_over_every_server() {
        // Each server alone is less loaded than the rest in turn: the sample must be able to find it.
        let n = 100;
        let s = LeastConnections::new(&vec![1; n], 8);
        let mut wins = vec![0u32; n];
        for quiet in 0..n {
            let mut f = vec![5u64; n];
            f[quiet] = 0;
            let loads = FixedLoads::in_flight(&f);
            for _ in 0..200 {
                if first(&s, &loads) == quiet {
                    wins[quiet] += 1;
                }
            }
        }
        // Drawn in about 8 % of picks (8 of 100): 16 of 200 on average, never none.
        assert!(wins.iter().all(|&w| (3..40).contains(&w)), "{wins:?}");
    }
}

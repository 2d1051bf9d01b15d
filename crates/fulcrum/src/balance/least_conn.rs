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
//! A pick reads every server's load once (twice when tied): O(n). See `docs/balancing.md` for what that
//! costs at 10 000 servers and the sampling alternative (`p2c`).

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

    /// The least loaded available server relative to its weight, then the others in index order.
    #[inline]
    pub fn pick<L: Loads + ?Sized>(&self, loads: &L) -> Candidates {
        let first = least(&self.weights, loads, &self.rng, |i| {
            u128::from(loads.in_flight(i))
        });
        Candidates::starting_at(first, self.weights.len())
    }
}

/// The available server with the lowest `cost(i) / weights[i]`; tied servers are chosen at random in
/// proportion to their weight. With no server available, 0 (the caller's fallback order then finds none).
///
/// Costs are compared by cross-multiplication in `u128`; a product that saturates (only with absurd
/// loads) compares equal, which only turns a comparison into a tie.
#[inline]
pub(super) fn least<L, F>(weights: &[u32], loads: &L, rng: &Rng, cost: F) -> usize
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
}

//! Smooth weighted round robin, as nginx does it (`ngx_http_upstream_get_peer`).
//!
//! At every step each server's current weight grows by its weight, the server with the highest current
//! weight is chosen and its current weight drops by the total. Over one cycle of `sum(weights)` picks
//! each server is chosen exactly `weight` times, and the choices are interleaved rather than bursty
//! (weights 5:1:1 give `a a b a c a a`, not `a a a a a b c`).
//!
//! nginx runs that step under a lock on every request. Here the whole cycle is computed once when the
//! selector is built, so a pick is one atomic increment and an index into the precomputed sequence.
//! Weights are first divided by their greatest common divisor; if the cycle would still exceed
//! [`MAX_CYCLE`] entries, weights are scaled down proportionally (every server keeps at least 1).

use std::sync::atomic::{AtomicUsize, Ordering};

use super::{Candidates, Loads};

/// How many turns a pick may pass over servers that refuse the request before it gives up and
/// returns the turn's server (whose neighbours the caller then tries in index order).
const MAX_PASSED_TURNS: usize = 64;

/// The longest precomputed cycle, in picks (4 bytes each).
pub const MAX_CYCLE: u64 = 1 << 16;

/// Smooth weighted round robin with a precomputed cycle.
#[derive(Debug)]
pub struct SmoothWeighted {
    len: usize,
    cycle: Box<[u32]>,
    next: AtomicUsize,
}

impl SmoothWeighted {
    /// Builds the cycle for servers with these weights (a weight of 0 is treated as 1).
    pub fn new(weights: &[u32]) -> Self {
        let weights = reduce(weights);
        if weights.iter().all(|&w| w == 1) {
            // Equal weights: the cycle is every server in order, no need for the O(n²) construction.
            return SmoothWeighted {
                len: weights.len(),
                cycle: (0..weights.len() as u32).collect(),
                next: AtomicUsize::new(0),
            };
        }
        let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
        let mut current = vec![0i64; weights.len()];
        let mut cycle = Vec::with_capacity(total as usize);
        for _ in 0..total {
            let mut best = 0;
            for (i, &w) in weights.iter().enumerate() {
                current[i] += i64::from(w);
                if current[i] > current[best] {
                    best = i;
                }
            }
            current[best] -= total as i64;
            cycle.push(best as u32);
        }
        SmoothWeighted {
            len: weights.len(),
            cycle: cycle.into_boxed_slice(),
            next: AtomicUsize::new(0),
        }
    }

    /// The next server of the cycle that [`Loads::admits`] the request, then the others in index
    /// order. A turn of a server that refuses passes to the next turn of the cycle, so the servers that
    /// take requests keep their weighted shares (up to [`MAX_PASSED_TURNS`] turns per pick).
    #[inline]
    pub fn pick<L: Loads + ?Sized>(&self, loads: &L) -> Candidates {
        if self.cycle.is_empty() {
            return Candidates::starting_at(0, 0);
        }
        let mut first = 0;
        for _ in 0..self.cycle.len().min(MAX_PASSED_TURNS) {
            let n = self.next.fetch_add(1, Ordering::Relaxed);
            first = self.cycle[n % self.cycle.len()] as usize;
            if loads.admits(first) {
                return Candidates::starting_at(first, self.len).admitted();
            }
        }
        Candidates::starting_at(first, self.len)
    }

    /// The number of picks after which the sequence repeats.
    pub fn cycle_len(&self) -> usize {
        self.cycle.len()
    }
}

/// Greatest common divisor (0 with anything gives the other).
pub(super) fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Weights divided by their GCD, then scaled so that their sum fits in [`MAX_CYCLE`].
fn reduce(weights: &[u32]) -> Vec<u32> {
    let weights: Vec<u64> = weights.iter().map(|&w| u64::from(w.max(1))).collect();
    let g = weights.iter().copied().fold(0, gcd).max(1);
    let mut reduced: Vec<u64> = weights.iter().map(|w| w / g).collect();
    let total: u64 = reduced.iter().sum();
    if total > MAX_CYCLE {
        let budget = MAX_CYCLE.saturating_sub(reduced.len() as u64).max(1);
        reduced = reduced
            .iter()
            .map(|&w| (w * budget / total).max(1))
            .collect();
    }
    reduced.into_iter().map(|w| w as u32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::testing::FixedLoads;

    fn firsts(s: &SmoothWeighted, n: usize) -> Vec<usize> {
        let loads = FixedLoads::idle(s.len);
        (0..n).map(|_| s.pick(&loads).next().unwrap()).collect()
    }

    #[test]
    fn a_down_servers_turns_keep_the_others_weighted_shares() {
        let s = SmoothWeighted::new(&[1, 2, 3]);
        let mut loads = FixedLoads::idle(3);
        loads.available[0] = false;
        let mut counts = [0; 3];
        for _ in 0..500 {
            counts[s.pick(&loads).next().unwrap()] += 1;
        }
        assert_eq!(counts, [0, 200, 300]);
    }

    #[test]
    fn weights_one_two_three_over_sixty_picks_give_exactly_ten_twenty_thirty() {
        let s = SmoothWeighted::new(&[1, 2, 3]);
        let picks = firsts(&s, 60);
        let count = |i| picks.iter().filter(|&&p| p == i).count();
        assert_eq!((count(0), count(1), count(2)), (10, 20, 30));
    }

    #[test]
    fn picks_are_interleaved_not_bursty() {
        // nginx's documented example: weights 5, 1, 1 give a a b a c a a.
        let s = SmoothWeighted::new(&[5, 1, 1]);
        assert_eq!(firsts(&s, 7), vec![0, 0, 1, 0, 2, 0, 0]);
        // With 1:2:3 no server is chosen more than twice in a row.
        let s = SmoothWeighted::new(&[1, 2, 3]);
        let picks = firsts(&s, 60);
        assert!(
            picks.windows(3).all(|w| !(w[0] == w[1] && w[1] == w[2])),
            "{picks:?}"
        );
    }

    #[test]
    fn common_divisor_is_removed_and_huge_weights_are_bounded() {
        assert_eq!(SmoothWeighted::new(&[100, 200, 300]).cycle_len(), 6);
        let big = SmoothWeighted::new(&[1_000_000, 1_000_000, 1, 500_000]);
        assert!(big.cycle_len() as u64 <= MAX_CYCLE);
        let picks = firsts(&big, big.cycle_len());
        assert!(picks.contains(&2), "a tiny weight still gets picked");
        let a = picks.iter().filter(|&&p| p == 0).count() as f64;
        let d = picks.iter().filter(|&&p| p == 3).count() as f64;
        assert!((a / d - 2.0).abs() < 0.01, "ratio kept: {a} / {d}");
    }

    #[test]
    fn equal_weights_behave_as_round_robin() {
        let s = SmoothWeighted::new(&[4, 4, 4]);
        assert_eq!(firsts(&s, 6), vec![0, 1, 2, 0, 1, 2]);
    }
}

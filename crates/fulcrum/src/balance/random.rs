//! Random, weighted: each pick draws a server with probability `weight / total weight`.
//!
//! Weights are pre-summed when the selector is built; a draw is one step of the shared SplitMix64
//! generator ([`super::rng`]) and a binary search of the running totals (O(log n); a plain multiply
//! when all weights are equal). A drawn server that is unavailable is redrawn a few times, so a server
//! that is down does not push its share onto its index-order neighbour.

use super::rng::{scale, Rng};
use super::{Candidates, Loads};

/// How many draws a pick makes before settling for an unavailable server (whose fallbacks follow).
pub(super) const DRAWS: usize = 4;

/// Weighted random.
#[derive(Debug)]
pub struct WeightedRandom {
    /// `cumulative[i]` = sum of the weights of servers `0..=i`.
    cumulative: Box<[u64]>,
    /// All weights are equal: draw by a multiply instead of a search.
    uniform: bool,
    rng: Rng,
}

impl WeightedRandom {
    /// Weighted random over servers with these weights (0 counts as 1); `seed` fixes the sequence.
    pub fn new(weights: &[u32], seed: u64) -> Self {
        let cumulative = weights
            .iter()
            .scan(0u64, |sum, &w| {
                *sum += u64::from(w.max(1));
                Some(*sum)
            })
            .collect();
        WeightedRandom {
            cumulative,
            uniform: weights.windows(2).all(|w| w[0].max(1) == w[1].max(1)),
            rng: Rng::new(seed),
        }
    }

    /// The number of servers.
    pub fn len(&self) -> usize {
        self.cumulative.len()
    }

    /// True for an empty pool.
    pub fn is_empty(&self) -> bool {
        self.cumulative.is_empty()
    }

    /// One weighted draw, available or not. The pool must not be empty.
    #[inline]
    pub(super) fn draw(&self) -> usize {
        let r = self.rng.next_u64();
        if self.uniform {
            return scale(r, self.cumulative.len() as u64) as usize;
        }
        let total = self.cumulative[self.cumulative.len() - 1];
        let ticket = scale(r, total);
        self.cumulative.partition_point(|&c| c <= ticket)
    }

    /// Up to [`DRAWS`] draws, the first available server drawn; else the last draw. Not for an empty pool.
    #[inline]
    pub(super) fn draw_available<L: Loads + ?Sized>(&self, loads: &L) -> (usize, bool) {
        let mut i = 0;
        for _ in 0..DRAWS {
            i = self.draw();
            if loads.available(i) {
                return (i, true);
            }
        }
        (i, false)
    }

    /// A weighted random available server, then the others in index order.
    #[inline]
    pub fn pick<L: Loads + ?Sized>(&self, loads: &L) -> Candidates {
        if self.cumulative.is_empty() {
            return Candidates::starting_at(0, 0);
        }
        let (first, _) = self.draw_available(loads);
        Candidates::starting_at(first, self.cumulative.len())
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::FixedLoads;
    use super::*;

    fn shares(s: &WeightedRandom, loads: &FixedLoads, picks: u32) -> Vec<f64> {
        let mut counts = vec![0u32; s.len()];
        for _ in 0..picks {
            let first_available = s.pick(loads).find(|&i| loads.available[i]).unwrap();
            counts[first_available] += 1;
        }
        counts
            .iter()
            .map(|&c| f64::from(c) / f64::from(picks))
            .collect()
    }

    #[test]
    fn weights_are_honoured_within_one_percent() {
        let s = WeightedRandom::new(&[1, 2, 3, 4], 11);
        let got = shares(&s, &FixedLoads::idle(4), 100_000);
        for (i, share) in got.iter().enumerate() {
            let want = (i + 1) as f64 / 10.0;
            assert!((share - want).abs() < 0.01, "{got:?}");
        }
        let s = WeightedRandom::new(&[5, 5, 5], 12);
        let got = shares(&s, &FixedLoads::idle(3), 90_000);
        assert!(got.iter().all(|s| (s - 1.0 / 3.0).abs() < 0.01), "{got:?}");
    }

    #[test]
    fn same_seed_same_picks() {
        let a = WeightedRandom::new(&[1, 2, 3], 5);
        let b = WeightedRandom::new(&[1, 2, 3], 5);
        let loads = FixedLoads::idle(3);
        let pa: Vec<_> = (0..50).map(|_| a.pick(&loads).next()).collect();
        let pb: Vec<_> = (0..50).map(|_| b.pick(&loads).next()).collect();
        assert_eq!(pa, pb);
    }

    #[test]
    fn a_down_server_share_is_spread_not_shifted_to_its_neighbour() {
        let s = WeightedRandom::new(&[1, 1, 1, 1], 13);
        let mut loads = FixedLoads::idle(4);
        loads.available[1] = false;
        let got = shares(&s, &loads, 90_000);
        assert_eq!(got[1], 0.0, "{got:?}");
        // Without redraws server 2 would get half the traffic.
        assert!((got[2] - 1.0 / 3.0).abs() < 0.02, "{got:?}");
    }
}

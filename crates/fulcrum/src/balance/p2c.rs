//! Power of two choices (Mitzenmacher, "The Power of Two Choices in Randomized Load Balancing", IEEE
//! TPDS 2001; tower's `balance::p2c`): draw two servers at random, send the request to the less loaded.
//!
//! Load is in-flight requests per unit of weight, compared by cross-multiplication. Both servers are drawn
//! in proportion to weight (so an idle pool still honours weights), distinct when possible, and available.
//! Two samples instead of a scan make a pick O(1) (O(log n) for the weighted draw) at any pool size, and
//! the maximum load falls from `log n / log log n` (one random choice) to `log log n` (two); unlike a full
//! least-connections scan, concurrent balancers reading the same stale counts do not all herd onto the
//! same "least loaded" server.

use super::random::{WeightedRandom, DRAWS};
use super::{Candidates, Loads};

/// Power of two choices on weighted in-flight load.
#[derive(Debug)]
pub struct P2c {
    random: WeightedRandom,
    weights: Box<[u32]>,
}

impl P2c {
    /// P2C over servers with these weights (0 counts as 1); `seed` fixes the random sequence.
    pub fn new(weights: &[u32], seed: u64) -> Self {
        P2c {
            random: WeightedRandom::new(weights, seed),
            weights: weights.iter().map(|&w| w.max(1)).collect(),
        }
    }

    /// The less loaded of two random available servers, then the others in index order.
    #[inline]
    pub fn pick<L: Loads + ?Sized>(&self, loads: &L) -> Candidates {
        let n = self.weights.len();
        if n <= 1 {
            return Candidates::starting_at(0, n);
        }
        let (a, found) = self.random.draw_available(loads);
        if !found {
            return Candidates::starting_at(a, n);
        }
        let mut first = a;
        for _ in 0..DRAWS {
            let b = self.random.draw();
            if b != a && loads.available(b) {
                let wa = u128::from(self.weights[a]);
                let wb = u128::from(self.weights[b]);
                let (la, lb) = (
                    u128::from(loads.in_flight(a)),
                    u128::from(loads.in_flight(b)),
                );
                if lb * wa < la * wb {
                    first = b;
                }
                break;
            }
        }
        Candidates::starting_at(first, n)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::FixedLoads;
    use super::*;

    #[test]
    fn weights_are_honoured_when_idle() {
        let s = P2c::new(&[1, 3], 21);
        let loads = FixedLoads::idle(2);
        let picks = 100_000;
        let ones = (0..picks)
            .filter(|_| s.pick(&loads).next() == Some(1))
            .count();
        let share = ones as f64 / f64::from(picks);
        assert!((share - 0.75).abs() < 0.01, "{share}");
    }

    #[test]
    fn avoids_a_loaded_server() {
        let s = P2c::new(&[1, 1, 1, 1], 22);
        let loads = FixedLoads::in_flight(&[0, 0, 100, 0]);
        let picks = 100_000;
        let loaded = (0..picks)
            .filter(|_| s.pick(&loads).next() == Some(2))
            .count();
        // Only when the first draw and all four redraws for a distinct second server land on it:
        // (1/4)^5 ≈ 0.1 % (one random choice: 25 %).
        assert!(loaded < picks / 300, "{loaded}");
    }

    #[test]
    fn closed_loop_load_follows_weights() {
        let s = P2c::new(&[1, 2, 1], 23);
        let mut loads = FixedLoads::in_flight(&[0, 0, 0]);
        for _ in 0..4_000 {
            let i = s.pick(&loads).next().unwrap();
            loads.in_flight[i] += 1;
        }
        let f = &loads.in_flight;
        assert!(
            f[1].abs_diff(2 * f[0]) < 40 && f[0].abs_diff(f[2]) < 20,
            "{f:?}"
        );
    }

    #[test]
    fn skips_unavailable_servers() {
        let s = P2c::new(&[1, 1, 1], 24);
        let mut loads = FixedLoads::in_flight(&[0, 0, 0]);
        loads.available[0] = false;
        loads.available[1] = false;
        // The first available candidate: after four unlucky draws the pick settles for a down server and
        // its fallbacks follow.
        assert!((0..1_000).all(|_| s.pick(&loads).find(|&i| loads.available[i]) == Some(2)));
    }
}

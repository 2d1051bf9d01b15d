//! A deterministic, lock-free random generator for `random`, `p2c` and tie-breaks.
//!
//! SplitMix64 (Steele, Lea & Flood, OOPSLA 2014) over one shared `AtomicU64`: every draw advances the
//! state by the golden-ratio increment with one relaxed `fetch_add` and returns the mixed state. Concurrent
//! draws get distinct states, so threads never repeat each other's numbers, and a given seed gives a given
//! sequence (tests are deterministic). No `thread_rng`, no `RandomState`, no lock. A pick that needs
//! several numbers takes one draw and runs a private SplitMix64 [`Stream`] from it.

use std::sync::atomic::{AtomicU64, Ordering};

use super::hash::mix64;

/// The SplitMix64 increment: 2^64 / φ, odd.
const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// A shared SplitMix64 generator.
#[derive(Debug)]
pub(super) struct Rng {
    state: AtomicU64,
}

impl Rng {
    /// A generator whose sequence is fixed by `seed`.
    pub(super) fn new(seed: u64) -> Self {
        Rng {
            state: AtomicU64::new(seed),
        }
    }

    /// The next 64 random bits.
    #[inline]
    pub(super) fn next_u64(&self) -> u64 {
        // Relaxed: the state only has to change, it orders no other memory.
        let s = self.state.fetch_add(GAMMA, Ordering::Relaxed);
        mix64(s.wrapping_add(GAMMA))
    }

    /// A uniform value in `0..bound` (`bound > 0`), by Lemire's multiply-shift (bias below 2^-32 for the
    /// bounds used here).
    #[inline]
    pub(super) fn below(&self, bound: u64) -> u64 {
        scale(self.next_u64(), bound)
    }

    /// A private SplitMix64 sequence started from one draw of this generator: for a pick that needs
    /// several random numbers (a sampled least-loaded pick), at the cost of a single shared atomic.
    #[inline]
    pub(super) fn stream(&self) -> Stream {
        Stream {
            state: self.next_u64(),
        }
    }
}

/// A SplitMix64 sequence owned by one pick (see [`Rng::stream`]): no atomics.
#[derive(Debug)]
pub(super) struct Stream {
    state: u64,
}

impl Stream {
    /// The next 64 random bits.
    #[inline]
    pub(super) fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GAMMA);
        mix64(self.state)
    }

    /// A uniform value in `0..bound` (`bound > 0`), as [`Rng::below`].
    #[inline]
    pub(super) fn below(&mut self, bound: u64) -> u64 {
        scale(self.next_u64(), bound)
    }
}

/// Maps 64 random bits onto `0..bound`.
#[inline]
pub(super) fn scale(r: u64, bound: u64) -> u64 {
    ((u128::from(r) * u128::from(bound)) >> 64) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_sequence_and_the_first_value_is_splitmix64() {
        let (a, b) = (Rng::new(7), Rng::new(7));
        let xs: Vec<u64> = (0..5).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..5).map(|_| b.next_u64()).collect();
        assert_eq!(xs, ys);
        // SplitMix64 seeded with 0 starts 0xe220a8397b1dcdaf (the reference implementation's output).
        assert_eq!(Rng::new(0).next_u64(), 0xe220_a839_7b1d_cdaf);
    }

    #[test]
    fn below_stays_in_range_and_spreads() {
        let r = Rng::new(1);
        let mut counts = [0u32; 10];
        for _ in 0..100_000 {
            counts[r.below(10) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (9_000..11_000).contains(&c)),
            "{counts:?}"
        );
    }
}

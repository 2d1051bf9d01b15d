//! Server selection: the pure heart of balancing.
//!
//! A [`Selector`] is built once per pool snapshot (off the request path) from the servers' weights and
//! answers [`Selector::pick`] with [`Candidates`]: the first choice followed by every other server in a
//! fixed fallback order, so that retries and failover need no second call. A pick is synchronous,
//! lock-free and allocation-free; the only shared mutable state is one atomic counter. This module knows
//! nothing of sockets, HTTP or tokio, so it is tested with plain unit tests.

mod round_robin;
mod weighted;

pub use round_robin::RoundRobin;
pub use weighted::SmoothWeighted;

use crate::config::Algorithm;

/// The algorithm of one pool, built from its servers' weights.
#[derive(Debug)]
pub enum Selector {
    /// Every server in turn, ignoring weights.
    RoundRobin(RoundRobin),
    /// Smooth weighted round robin (nginx): shares follow weights, interleaved.
    Weighted(SmoothWeighted),
}

impl Selector {
    /// Builds the selector for `algorithm` over servers with these weights (index = server position).
    ///
    /// # Panics
    /// If `algorithm` has no selector yet; configuration validation rejects those before this is called.
    pub fn new(algorithm: Algorithm, weights: &[u32]) -> Self {
        match algorithm {
            Algorithm::RoundRobin => Selector::RoundRobin(RoundRobin::new(weights.len())),
            Algorithm::WeightedRoundRobin => Selector::Weighted(SmoothWeighted::new(weights)),
            other => unreachable!(
                "algorithm {} is rejected by config validation",
                other.as_str()
            ),
        }
    }

    /// Picks a server: the first candidate is the choice, the rest are fallbacks in order.
    #[inline]
    pub fn pick(&self) -> Candidates {
        match self {
            Selector::RoundRobin(s) => s.pick(),
            Selector::Weighted(s) => s.pick(),
        }
    }
}

/// Server indices in the order they should be tried: the pick first, then each other server once.
///
/// An iterator over a range, so it never allocates. The caller skips servers that are not available
/// (down, draining) and stops after its retry budget.
#[derive(Debug, Clone)]
pub struct Candidates {
    first: usize,
    len: usize,
    next: usize,
}

impl Candidates {
    /// Candidates starting at `first` among `len` servers, continuing in index order and wrapping.
    #[inline]
    pub fn starting_at(first: usize, len: usize) -> Self {
        debug_assert!(len == 0 || first < len);
        Candidates {
            first,
            len,
            next: 0,
        }
    }
}

impl Iterator for Candidates {
    type Item = usize;

    #[inline]
    fn next(&mut self) -> Option<usize> {
        if self.next >= self.len {
            return None;
        }
        let mut i = self.first + self.next;
        if i >= self.len {
            i -= self.len;
        }
        self.next += 1;
        Some(i)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.len - self.next;
        (n, Some(n))
    }
}

impl ExactSizeIterator for Candidates {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_cover_every_server_once_starting_at_the_pick() {
        let c: Vec<_> = Candidates::starting_at(2, 4).collect();
        assert_eq!(c, vec![2, 3, 0, 1]);
        assert_eq!(Candidates::starting_at(0, 0).count(), 0);
    }
}

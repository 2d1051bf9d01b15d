//! Round robin: each server in turn, one atomic increment per pick.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::Candidates;

/// Plain round robin over `len` servers.
#[derive(Debug)]
pub struct RoundRobin {
    len: usize,
    next: AtomicUsize,
}

impl RoundRobin {
    /// A round robin over `len` servers, starting with the first.
    pub fn new(len: usize) -> Self {
        RoundRobin {
            len,
            next: AtomicUsize::new(0),
        }
    }

    /// The next server in turn, then the others in order.
    #[inline]
    pub fn pick(&self) -> Candidates {
        if self.len == 0 {
            return Candidates::starting_at(0, 0);
        }
        // Relaxed is enough: the counter only spreads picks, it orders no other memory.
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        Candidates::starting_at(n % self.len, self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_server_in_turn() {
        let rr = RoundRobin::new(3);
        let firsts: Vec<_> = (0..7).map(|_| rr.pick().next().unwrap()).collect();
        assert_eq!(firsts, vec![0, 1, 2, 0, 1, 2, 0]);
    }

    #[test]
    fn empty_pool_has_no_candidate() {
        assert_eq!(RoundRobin::new(0).pick().next(), None);
    }
}

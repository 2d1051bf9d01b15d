//! Round robin: each server in turn, one atomic increment per pick.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::{Candidates, Loads};

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

    /// The next server in turn that [`Loads::admits`] the request, then the others in order. A turn
    /// that falls on a server which does not take the request passes to the next turn, so the others
    /// share its traffic evenly; after a full round of refusals the turn's server is returned anyway
    /// and the caller finds none available.
    #[inline]
    pub fn pick<L: Loads + ?Sized>(&self, loads: &L) -> Candidates {
        if self.len == 0 {
            return Candidates::starting_at(0, 0);
        }
        let mut first = 0;
        for _ in 0..self.len {
            // Relaxed is enough: the counter only spreads picks, it orders no other memory.
            first = self.next.fetch_add(1, Ordering::Relaxed) % self.len;
            if loads.admits(first) {
                return Candidates::starting_at(first, self.len).admitted();
            }
        }
        Candidates::starting_at(first, self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::balance::testing::FixedLoads;

    #[test]
    fn every_server_in_turn() {
        let rr = RoundRobin::new(3);
        let loads = FixedLoads::idle(3);
        let firsts: Vec<_> = (0..7).map(|_| rr.pick(&loads).next().unwrap()).collect();
        assert_eq!(firsts, vec![0, 1, 2, 0, 1, 2, 0]);
    }

    #[test]
    fn a_down_servers_turns_are_shared_evenly() {
        let rr = RoundRobin::new(3);
        let mut loads = FixedLoads::idle(3);
        loads.available[1] = false;
        let mut counts = [0; 3];
        for _ in 0..3000 {
            counts[rr.pick(&loads).next().unwrap()] += 1;
        }
        assert_eq!(counts, [1500, 0, 1500]);
    }

    #[test]
    fn empty_pool_has_no_candidate() {
        assert_eq!(RoundRobin::new(0).pick(&FixedLoads::idle(0)).next(), None);
    }
}

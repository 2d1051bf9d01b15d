//! Rendezvous (highest random weight) hashing, weighted: the algorithm behind `ip_hash`.
//!
//! Thaler & Ravishankar, "Using name-based mappings to increase hit rates", IEEE/ACM ToN 1998; weighted
//! form by Schindelhauer & Schomaker ("Weighted distributed hash tables", SPAA 2005). Every server `s`
//! scores a key `k` with an independent pseudo-random `u = unit(mix64(k ⊕ h(s)))` in (0, 1), where
//! `h(s)` is xxh3 of the server's name with a fixed seed; the key goes to the highest score
//! `−weight / ln(u)` (the smallest exponential variate `−ln(u) / weight`), which is server `s` with
//! probability exactly `weight(s) / total weight`. Among servers of equal weight the highest `u` wins,
//! so only one logarithm per distinct weight is taken.
//!
//! A server's score does not depend on the other servers, so when a server leaves (removed, or skipped
//! because it is unavailable) **only its own keys move**, each to its second-highest score, spread evenly
//! over the rest; when it comes back, exactly those keys return. No table to rebuild, nothing that
//! depends on list order.
//!
//! The price is O(n) per pick (one multiply-xorshift per server, one logarithm per distinct weight): one
//! or two nanoseconds per server, cheap for the tens of servers `ip_hash` pools have, but 14 µs at
//! 10 000. So `ip_hash` uses rendezvous for pools of at most [`RENDEZVOUS_MAX`] (64) servers, and for
//! larger ones the consistent-hash ring of `ring.rs` (unbounded): an O(1) lookup with its bucket index,
//! and the same guarantee that a leaving server — removed, or stepped over while unavailable — gives
//! away only its own keys (each to the next point's server, spread over the others by its 160 points
//! per unit of weight); its shares follow weights to within a few per cent instead of exactly. A pool
//! that crosses the threshold (64 servers ↔ 65) changes method and remaps most keys, once.

use super::hash::{id_hash, mix64, unit_open, RENDEZVOUS_SEED};
use super::Loads;

/// `ip_hash` uses rendezvous hashing for pools of at most this many servers, the ring above.
pub const RENDEZVOUS_MAX: usize = 64;

/// Weighted rendezvous hashing over server identities.
#[derive(Debug)]
pub struct Rendezvous {
    /// Server indices, grouped by weight (index order within a group).
    order: Box<[u32]>,
    /// xxh3 of each server's name with [`RENDEZVOUS_SEED`], in `order`'s order.
    ids: Box<[u64]>,
    /// Per weight group: where it ends in `order`, and `1 / weight`.
    groups: Box<[(usize, f64)]>,
}

impl Rendezvous {
    /// Rendezvous hashing over servers with these names and weights (0 counts as 1).
    pub fn new(ids: &[&str], weights: &[u32]) -> Self {
        debug_assert_eq!(ids.len(), weights.len());
        let mut order: Vec<u32> = (0..ids.len() as u32).collect();
        order.sort_by_key(|&i| weights[i as usize].max(1));
        let weight = |at: usize| weights[order[at] as usize].max(1);
        let mut groups: Vec<(usize, f64)> = Vec::new();
        for at in 0..order.len() {
            if at + 1 == order.len() || weight(at + 1) != weight(at) {
                groups.push((at + 1, 1.0 / f64::from(weight(at))));
            }
        }
        Rendezvous {
            ids: order
                .iter()
                .map(|&i| id_hash(ids[i as usize], RENDEZVOUS_SEED))
                .collect(),
            order: order.into_boxed_slice(),
            groups: groups.into_boxed_slice(),
        }
    }

    /// The available server with the highest score for `key`; with none available, 0.
    ///
    /// Within a group of equal weight the highest score is the highest hash, so only the best of each
    /// group needs a logarithm: one multiply-xorshift per server plus one `ln` per distinct weight.
    #[inline]
    pub(super) fn pick_key<L: Loads + ?Sized>(&self, key: u64, loads: &L) -> usize {
        let mut best = 0;
        let mut best_score = f64::NEG_INFINITY;
        let mut start = 0;
        for &(end, inv_w) in self.groups.iter() {
            let mut group_best: Option<(u64, usize)> = None;
            for (&id, &i) in self.ids[start..end].iter().zip(&self.order[start..end]) {
                let h = mix64(key ^ id);
                if group_best.is_none_or(|(b, _)| h > b) && loads.available(i as usize) {
                    group_best = Some((h, i as usize));
                }
            }
            start = end;
            if let Some((h, i)) = group_best {
                // ln(u) < 0: the highest ln(u) / weight is the smallest exponential variate.
                let score = if self.groups.len() == 1 {
                    0.0
                } else {
                    unit_open(h).ln() * inv_w
                };
                if score > best_score {
                    (best, best_score) = (i, score);
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::FixedLoads;
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{i}:80")).collect()
    }

    #[test]
    fn only_the_keys_of_an_unavailable_server_move_and_they_come_back() {
        let names = names(5);
        let ids: Vec<&str> = names.iter().map(String::as_str).collect();
        let r = Rendezvous::new(&ids, &[1; 5]);
        let mut loads = FixedLoads::idle(5);
        let before: Vec<usize> = (0..5_000).map(|k| r.pick_key(k, &loads)).collect();
        loads.available[3] = false;
        let during: Vec<usize> = (0..5_000).map(|k| r.pick_key(k, &loads)).collect();
        for (b, d) in before.iter().zip(&during) {
            assert!(b == d || *b == 3, "a key of server {b} moved to {d}");
            assert_ne!(*d, 3);
        }
        loads.available[3] = true;
        let after: Vec<usize> = (0..5_000).map(|k| r.pick_key(k, &loads)).collect();
        assert_eq!(before, after);
    }

    #[test]
    fn weights_are_honoured() {
        let names = names(3);
        let ids: Vec<&str> = names.iter().map(String::as_str).collect();
        let r = Rendezvous::new(&ids, &[1, 2, 5]);
        let loads = FixedLoads::idle(3);
        let mut counts = [0u32; 3];
        for k in 0..80_000 {
            counts[r.pick_key(k, &loads)] += 1;
        }
        for (c, w) in counts.iter().zip([1.0, 2.0, 5.0]) {
            assert!(
                (f64::from(*c) / 80_000.0 - w / 8.0).abs() < 0.01,
                "{counts:?}"
            );
        }
    }
}

//! Maglev hashing: `maglev`.
//!
//! Eisenbud et al., "Maglev: A Fast and Reliable Software Network Load Balancer", NSDI 2016, §3.4. A
//! lookup table of prime size `M` (default [`DEFAULT_TABLE_SIZE`] = 65 537) is filled once, when the
//! selector is built: each server walks its own permutation of the slots — `offset + j · skip (mod M)`,
//! with `offset = xxh3(name, MAGLEV_OFFSET_SEED) mod M` and `skip = xxh3(name, MAGLEV_SKIP_SEED) mod
//! (M − 1) + 1` — taking turns to claim its next free slot until the table is full. A pick is
//! `table[mix64(key) mod M]`: O(1), one cache line.
//!
//! Every server gets `M / n` slots ± 1, so the spread is even (unlike a ring, whose shares vary by a few
//! percent), and removing a server moves its keys plus a small fraction of others (the paper's
//! "minimal disruption" is approximate; `props.rs` measures it). `M` should be well above `100 · n` for
//! the shares to stay within 1 %: the default suits pools up to a few hundred servers; it is rounded up
//! to a prime, and to at least `n`.
//!
//! **Weights.** In each round a server of weight `w` claims `w / w_max` slots on average (it accumulates
//! `w` credits per round and claims one slot per `w_max` credits): the paper's "weight `w` fills `w`
//! turns per round", scaled so that the heaviest server takes one turn per round and huge weights
//! (up to 1 000 000) cannot let one server fill the table before the others' first turn.
//!
//! **Order.** Servers take their turns in the order of their names, not of the list, so the table is a
//! function of the set of (name, weight) alone: every instance builds the same table.
//!
//! **Unavailable servers.** The table is not rebuilt when a server goes down. A key whose slot holds an
//! unavailable server is rehashed (`mix64(key + i · φ)`, up to [`MAX_PROBES`] times) to another slot, so
//! the keys of a down server spread over the others in proportion to their slots and every other key
//! stays put.

use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::hash::{mix64, MAGLEV_OFFSET_SEED, MAGLEV_SKIP_SEED};
use super::Loads;

/// The paper's small table size: the smallest prime above 2^16.
pub const DEFAULT_TABLE_SIZE: usize = 65_537;
/// How many other slots a key tries when its own server is unavailable.
pub const MAX_PROBES: u64 = 8;

const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// A Maglev lookup table.
#[derive(Debug)]
pub struct Maglev {
    table: Box<[u32]>,
}

impl Maglev {
    /// Fills the table for servers with these names and weights (0 counts as 1). `table_size` is rounded
    /// up to a prime no smaller than the number of servers.
    pub fn new(ids: &[&str], weights: &[u32], table_size: usize) -> Self {
        debug_assert_eq!(ids.len(), weights.len());
        let n = ids.len();
        if n == 0 {
            return Maglev {
                table: Box::default(),
            };
        }
        let m = next_prime(table_size.max(n).max(2)) as u64;
        let weights: Vec<u64> = weights.iter().map(|&w| u64::from(w.max(1))).collect();
        let w_max = weights.iter().copied().max().unwrap_or(1);
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| ids[a].cmp(ids[b]));
        let offset: Vec<u64> = ids
            .iter()
            .map(|id| xxh3_64_with_seed(id.as_bytes(), MAGLEV_OFFSET_SEED) % m)
            .collect();
        let skip: Vec<u64> = ids
            .iter()
            .map(|id| xxh3_64_with_seed(id.as_bytes(), MAGLEV_SKIP_SEED) % (m - 1) + 1)
            .collect();
        let mut next = vec![0u64; n];
        let mut credit = vec![0u64; n];
        let mut table = vec![u32::MAX; m as usize];
        let mut filled = 0u64;
        // Each round the heaviest server claims a slot, so this ends within m rounds.
        'fill: loop {
            for &i in &order {
                credit[i] += weights[i];
                while credit[i] >= w_max {
                    credit[i] -= w_max;
                    // Walk i's permutation to its next free slot; one exists while the table is not full.
                    let slot = loop {
                        let c = (offset[i] + next[i] % m * skip[i]) % m;
                        next[i] += 1;
                        if table[c as usize] == u32::MAX {
                            break c as usize;
                        }
                    };
                    table[slot] = i as u32;
                    filled += 1;
                    if filled == m {
                        break 'fill;
                    }
                }
            }
        }
        Maglev {
            table: table.into_boxed_slice(),
        }
    }

    /// The table size `M`.
    pub fn table_size(&self) -> usize {
        self.table.len()
    }

    /// The slots each server holds (for tests and the admin view).
    pub fn slots(&self, n: usize) -> Vec<usize> {
        let mut counts = vec![0; n];
        for &s in self.table.iter() {
            counts[s as usize] += 1;
        }
        counts
    }

    /// The server of `key`'s slot, rehashed past unavailable servers. Not for an empty table.
    #[inline]
    pub(super) fn pick_key<L: Loads + ?Sized>(&self, key: u64, loads: &L) -> usize {
        let m = self.table.len() as u64;
        let home = self.table[(mix64(key) % m) as usize] as usize;
        if loads.available(home) {
            return home;
        }
        for probe in 1..=MAX_PROBES {
            let s = self.table[(mix64(key.wrapping_add(probe.wrapping_mul(GOLDEN))) % m) as usize];
            if loads.available(s as usize) {
                return s as usize;
            }
        }
        home
    }
}

/// The smallest prime `≥ n` (`n ≥ 2`), by trial division: table sizes are small and this runs once.
fn next_prime(n: usize) -> usize {
    let is_prime = |p: usize| {
        p >= 2
            && (2..)
                .take_while(|d| d * d <= p)
                .all(|d| p.rem_euclid(d) != 0)
    };
    (n..)
        .find(|&p| is_prime(p))
        .expect("a prime exists above any n")
}

#[cfg(test)]
mod tests {
    use super::super::testing::FixedLoads;
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.1.0.{i}:8080")).collect()
    }

    fn maglev(names: &[String], weights: &[u32], m: usize) -> Maglev {
        let ids: Vec<&str> = names.iter().map(String::as_str).collect();
        Maglev::new(&ids, weights, m)
    }

    #[test]
    fn table_size_is_prime_and_at_least_n() {
        assert_eq!(next_prime(65_537), 65_537);
        assert_eq!(next_prime(65_538), 65_539);
        assert_eq!(next_prime(2), 2);
        assert_eq!(maglev(&names(3), &[1; 3], 100).table_size(), 101);
        assert_eq!(maglev(&names(20), &[1; 20], 5).table_size(), 23);
    }

    #[test]
    fn equal_weights_get_equal_slots_within_one() {
        let t = maglev(&names(7), &[1; 7], DEFAULT_TABLE_SIZE);
        let slots = t.slots(7);
        let (min, max) = (slots.iter().min().unwrap(), slots.iter().max().unwrap());
        assert!(max - min <= 1, "{slots:?}");
        assert_eq!(slots.iter().sum::<usize>(), DEFAULT_TABLE_SIZE);
    }

    #[test]
    fn weights_are_honoured_including_huge_ones() {
        let t = maglev(&names(3), &[1, 2, 5], DEFAULT_TABLE_SIZE);
        let slots = t.slots(3);
        for (s, w) in slots.iter().zip([1.0, 2.0, 5.0]) {
            let share = *s as f64 / DEFAULT_TABLE_SIZE as f64;
            assert!((share - w / 8.0).abs() < 0.001, "{slots:?}");
        }
        let t = maglev(&names(3), &[1_000_000, 1_000, 1_000_000], 10_007);
        let slots = t.slots(3);
        // 1 000 / 2 001 000 of 10 007 slots: 5.
        assert!((4..=6).contains(&slots[1]), "{slots:?}");
    }

    #[test]
    fn the_order_of_servers_does_not_matter() {
        let n = names(4);
        let a = maglev(&n, &[1, 2, 3, 4], 1_009);
        let rev: Vec<String> = n.iter().rev().cloned().collect();
        let b = maglev(&rev, &[4, 3, 2, 1], 1_009);
        let loads = FixedLoads::idle(4);
        for k in 0..2_000 {
            assert_eq!(a.pick_key(k, &loads), 3 - b.pick_key(k, &loads));
        }
    }

    #[test]
    fn keys_of_an_unavailable_server_are_rehashed_and_the_rest_stay() {
        let t = maglev(&names(5), &[1; 5], DEFAULT_TABLE_SIZE);
        let mut loads = FixedLoads::idle(5);
        let before: Vec<usize> = (0..10_000).map(|k| t.pick_key(k, &loads)).collect();
        loads.available[1] = false;
        let mut got = [0u32; 5];
        for (k, &b) in before.iter().enumerate() {
            let now = t.pick_key(k as u64, &loads);
            assert!(now == b || b == 1, "key {k}: {b} → {now}");
            got[now] += 1;
        }
        assert_eq!(got[1], 0);
        // Server 1's fifth spread evenly: each of the four others ends near a quarter.
        assert!(
            got.iter()
                .enumerate()
                .all(|(i, &c)| i == 1 || c.abs_diff(2_500) < 150),
            "{got:?}"
        );
    }
}

//! Server selection: the pure heart of balancing.
//!
//! A [`Selector`] is built once per pool snapshot (off the request path) from the servers' identities
//! and weights ([`ServerSpec`]) and answers [`Selector::pick`] with [`Candidates`]: the first choice
//! followed by every other server in index order, so that retries and failover need no second call.
//! This module knows nothing of sockets, HTTP or tokio, so it is tested with plain unit tests.
//!
//! | algorithm | file | pick cost | source |
//! |---|---|---|---|
//! | `round_robin` | `round_robin.rs` | O(1) | — |
//! | `weighted_round_robin` | `weighted.rs` | O(1), precomputed cycle | nginx smooth WRR |
//! | `least_connections` | `least_conn.rs` | O(n) scan ≤ 64 servers, O(d) sample above | nginx `least_conn`, HAProxy `leastconn`; Mitzenmacher d choices |
//! | `least_response_time` | `ewma.rs` | O(n) scan ≤ 64 servers, O(d) sample above | Finagle / linkerd / tower peak EWMA |
//! | `ip_hash` | `rendezvous.rs` ≤ 64 servers, `ring.rs` above | O(n) ≤ 64, O(1) expected above | Thaler & Ravishankar HRW, weighted; ketama |
//! | `consistent_hash` | `ring.rs` | O(1) expected (bucket index), bounded: + a short walk | Karger et al. ketama; Mirrokni et al., HAProxy |
//! | `maglev` | `maglev.rs` | O(1) | Eisenbud et al., NSDI 2016 |
//! | `random` | `random.rs` | O(log n) | — |
//! | `p2c` | `p2c.rs` | O(log n) | Mitzenmacher 2001, tower `p2c` |
//!
//! **Live load** reaches the selector only through the [`Loads`] trait, which the pool implements over
//! its servers' counters: the metric (in flight, peak-EWMA latency, availability) is kept apart from the
//! algorithm, as in tower's `Load`. Load-aware algorithms choose among available servers only.
//!
//! **Large pools.** No pick reads every server of a large pool: `least_connections` and
//! `least_response_time` compare a random sample of 8 servers above 64 (the power of d choices),
//! `ip_hash` uses the consistent-hash ring above 64 servers, and the bounded ring reads the pool's total
//! in flight from one counter ([`Loads::total_in_flight`]). Every pick stays well under a microsecond
//! at 10 000 servers (`docs/balancing.md`).
//!
//! **Keys.** The hash algorithms (`ip_hash`, `consistent_hash`, `maglev`) take a `u64` key, which the
//! caller computes with [`hash_key`] from the source address, URI, header or cookie. Every hash is fixed
//! and specified (xxh3 with constant seeds, SplitMix64) and depends on server *names*, never on list
//! position or process randomness, so every fulcrum instance and every restart sends a key to the same
//! server. When a request has no key (`None`: the header or cookie is absent), a hash algorithm falls back
//! to smooth weighted round robin over the same servers.
//!
//! **Randomness** (`random`, `p2c`, tie-breaks) comes from a SplitMix64 sequence over one atomic counter,
//! seeded by [`SelectorOptions::seed`]: lock-free and deterministic under test.
//!
//! **No allocation, no lock.** Selectors hold only boxed slices built by [`Selector::new`]; a pick reads
//! them, the [`Loads`], and at most a few relaxed atomics, and returns [`Candidates`], an iterator
//! over a range. No `Vec`, `Box` or `String` is created on the pick path (`tests/pick_alloc.rs` counts
//! allocations during picks of every algorithm and finds none).

mod ewma;
mod hash;
mod least_conn;
mod maglev;
mod p2c;
#[cfg(test)]
mod props;
mod random;
mod rendezvous;
mod ring;
mod rng;
mod round_robin;
#[cfg(test)]
mod testing;
mod weighted;

pub use ewma::LeastResponseTime;
pub use hash::{address_key, hash_key, KEY_SEED};
pub use least_conn::{LeastConnections, SAMPLE, SCAN_MAX};
pub use maglev::{Maglev, DEFAULT_TABLE_SIZE};
pub use p2c::P2c;
pub use random::WeightedRandom;
pub use rendezvous::{Rendezvous, RENDEZVOUS_MAX};
pub use ring::Ring;
pub use round_robin::RoundRobin;
pub use weighted::SmoothWeighted;

use crate::config::Algorithm;

/// What the selector needs to know about live load, implemented by the pool over its servers.
///
/// Indices are server positions, `0..len()`. `len()` must equal the number of servers the selector was
/// built with; on a mismatch the selector ignores the loads (every server counts as available and idle)
/// rather than index out of range.
pub trait Loads {
    /// The number of servers.
    fn len(&self) -> usize;

    /// True when there is no server.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Requests in flight on server `i` now.
    fn in_flight(&self, i: usize) -> u64;

    /// Server `i`'s peak-EWMA response time in nanoseconds; 0 when it has no sample yet.
    fn latency_ns(&self, i: usize) -> u64;

    /// Whether server `i` may take a new request (up, not draining or in maintenance).
    fn available(&self, i: usize) -> bool;

    /// Whether server `i` takes this request: available, and drawn when it is in slow start. Round
    /// robin asks it of the server whose turn it is and gives a refused turn to the next turn, so that
    /// the servers that do take requests share them evenly (not the refused server's index neighbour).
    /// Called at most once per server and pick.
    fn admits(&self, i: usize) -> bool {
        self.available(i)
    }

    /// Requests in flight on the whole pool: every server's, available or not (a draining server's
    /// requests still count, as in HAProxy's `served`). Read by the bounded ring once per pick. The
    /// default sums [`Loads::in_flight`], O(n); the pool answers from one pool-wide counter.
    fn total_in_flight(&self) -> u64 {
        (0..self.len()).fold(0u64, |total, i| total.saturating_add(self.in_flight(i)))
    }
}

/// Loads for when the caller's do not match the selector: every server available and idle.
struct Unknown(usize);

impl Loads for Unknown {
    fn len(&self) -> usize {
        self.0
    }

    fn in_flight(&self, _: usize) -> u64 {
        0
    }

    fn latency_ns(&self, _: usize) -> u64 {
        0
    }

    fn available(&self, _: usize) -> bool {
        true
    }

    fn total_in_flight(&self) -> u64 {
        0
    }
}

/// One server as the selector sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerSpec<'a> {
    /// The server's identity, unique in its pool (its configured name): what hash algorithms hash, so
    /// that a key's server does not depend on the order of the list.
    pub id: &'a str,
    /// Relative share of traffic (0 counts as 1).
    pub weight: u32,
}

/// Tunables of a selector, fixed when it is built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelectorOptions {
    /// Seed of the random sequence of `random`, `p2c` and tie-breaks.
    pub seed: u64,
    /// Size of the Maglev lookup table, rounded up to a prime and to at least the number of servers.
    pub maglev_table_size: usize,
    /// `consistent_hash` with bounded loads (HAProxy's `hash-balance-factor`): a server may hold at most
    /// this percentage of the average load per unit of weight (values below 100 count as 100). `None`:
    /// unbounded.
    pub hash_balance_factor: Option<u32>,
}

/// The default seed: the golden ratio's 64 fractional bits.
pub const DEFAULT_SEED: u64 = 0x9e37_79b9_7f4a_7c15;

impl Default for SelectorOptions {
    fn default() -> Self {
        SelectorOptions {
            seed: DEFAULT_SEED,
            maglev_table_size: DEFAULT_TABLE_SIZE,
            hash_balance_factor: None,
        }
    }
}

/// The algorithm of one pool, built from its servers' identities and weights.
#[derive(Debug)]
pub struct Selector {
    algorithm: Algorithm,
    len: usize,
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    RoundRobin(RoundRobin),
    Weighted(SmoothWeighted),
    LeastConnections(LeastConnections),
    LeastResponseTime(LeastResponseTime),
    Random(WeightedRandom),
    P2c(P2c),
    /// A hash algorithm, and what picks for requests without a key.
    Hashed {
        hash: Hashed,
        no_key: SmoothWeighted,
    },
}

#[derive(Debug)]
enum Hashed {
    Rendezvous(Rendezvous),
    Ring(Ring),
    Maglev(Maglev),
}

impl Selector {
    /// Builds the selector for `algorithm` over `servers` (index = server position). Building may take
    /// milliseconds for large pools (the ring of `consistent_hash`, and of `ip_hash` above
    /// [`RENDEZVOUS_MAX`] servers, hashes up to 2^20 points; Maglev fills its table): do it off the
    /// request path.
    pub fn new(algorithm: Algorithm, servers: &[ServerSpec<'_>], opts: &SelectorOptions) -> Self {
        let weights: Vec<u32> = servers.iter().map(|s| s.weight).collect();
        let ids: Vec<&str> = servers.iter().map(|s| s.id).collect();
        let hashed = |hash| Kind::Hashed {
            hash,
            no_key: SmoothWeighted::new(&weights),
        };
        let kind = match algorithm {
            Algorithm::RoundRobin => Kind::RoundRobin(RoundRobin::new(servers.len())),
            Algorithm::WeightedRoundRobin => Kind::Weighted(SmoothWeighted::new(&weights)),
            Algorithm::LeastConnections => {
                Kind::LeastConnections(LeastConnections::new(&weights, opts.seed))
            }
            Algorithm::LeastResponseTime => {
                Kind::LeastResponseTime(LeastResponseTime::new(&weights, opts.seed))
            }
            // Rendezvous is exact but O(n): beyond RENDEZVOUS_MAX servers, the ring, which also moves
            // only a leaving server's keys, in O(1).
            Algorithm::IpHash if servers.len() <= RENDEZVOUS_MAX => {
                hashed(Hashed::Rendezvous(Rendezvous::new(&ids, &weights)))
            }
            Algorithm::IpHash => hashed(Hashed::Ring(Ring::new(&ids, &weights, None))),
            Algorithm::ConsistentHash => hashed(Hashed::Ring(Ring::new(
                &ids,
                &weights,
                opts.hash_balance_factor,
            ))),
            Algorithm::Maglev => hashed(Hashed::Maglev(Maglev::new(
                &ids,
                &weights,
                opts.maglev_table_size,
            ))),
            Algorithm::Random => Kind::Random(WeightedRandom::new(&weights, opts.seed)),
            Algorithm::P2c => Kind::P2c(P2c::new(&weights, opts.seed)),
        };
        Selector {
            algorithm,
            len: servers.len(),
            kind,
        }
    }

    /// The algorithm this selector runs.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The number of servers.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for an empty pool.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Picks a server: the first candidate is the choice, the rest are fallbacks in index order.
    ///
    /// `key` is the request's hash key ([`hash_key`]) for the hash algorithms (ignored by the others;
    /// `None` makes a hash algorithm fall back to weighted round robin). `loads` is read by the
    /// load-aware and hash algorithms; round robin and weighted round robin ignore it. Never allocates,
    /// never blocks, never panics (see [`Loads`] for a length mismatch).
    #[inline]
    pub fn pick<L: Loads + ?Sized>(&self, key: Option<u64>, loads: &L) -> Candidates {
        if loads.len() != self.len {
            return self.pick_with(key, &Unknown(self.len));
        }
        self.pick_with(key, loads)
    }

    #[inline]
    fn pick_with<L: Loads + ?Sized>(&self, key: Option<u64>, loads: &L) -> Candidates {
        match &self.kind {
            Kind::RoundRobin(s) => s.pick(loads),
            Kind::Weighted(s) => s.pick(loads),
            Kind::LeastConnections(s) => s.pick(loads),
            Kind::LeastResponseTime(s) => s.pick(loads),
            Kind::Random(s) => s.pick(loads),
            Kind::P2c(s) => s.pick(loads),
            Kind::Hashed { hash, no_key } => match key {
                None => no_key.pick(loads),
                Some(_) if self.len == 0 => Candidates::starting_at(0, 0),
                Some(key) => {
                    let first = match hash {
                        Hashed::Rendezvous(h) => h.pick_key(key, loads),
                        Hashed::Ring(h) => h.pick_key(key, loads),
                        Hashed::Maglev(h) => h.pick_key(key, loads),
                    };
                    Candidates::starting_at(first, self.len)
                }
            },
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
    admitted: bool,
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
            admitted: false,
        }
    }

    /// The same candidates, whose first one [`Loads::admits`] already accepted.
    #[inline]
    pub fn admitted(mut self) -> Self {
        self.admitted = true;
        self
    }

    /// The first candidate, when the selector already asked [`Loads::admits`] of it and it accepted.
    #[inline]
    pub fn first_admitted(&self) -> Option<usize> {
        (self.admitted && self.len > 0).then_some(self.first)
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

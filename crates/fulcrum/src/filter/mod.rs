//! Traffic filtering: the pure logic that decides whether a client or a request may pass.
//!
//! Four independent pieces, each built from plain Rust values (the config layer validates and
//! converts), each cheap enough to run on every connection or request:
//!
//! | piece | question | where it runs | cost |
//! | --- | --- | --- | --- |
//! | [`cidr::AccessList`] | is this address allowed? (allow/deny CIDR lists) | accept, route | one binary search, no lock, no allocation |
//! | [`ban::BanTable`] | is this client banned? (automatic bans on request or error rate, manual bans) | accept; `record` after each response | one atomic load when nothing is banned; else one shard lock |
//! | [`rate::RateLimiter`] | may this key send one more request now? (token bucket, GCRA) | request | one shard lock, one hash lookup, no allocation |
//! | [`rules::DenyRules`] | does this request match an attack pattern? | request | one regex-set pass per target; allocates only to percent-decode |
//!
//! The order a caller should use — cheapest and most final first, as HAProxy's `tcp-request
//! connection` rules do before any HTTP parsing: access list and ban at accept time, then per
//! request the deny rules and the rate limit, then `BanTable::record` once the status is known.
//!
//! ## Clients and IPv6
//! A client is identified by its [`ClientKey`]: the IPv4 address, or the /64 prefix of an IPv6
//! address. A single IPv6 host usually owns a whole /64 (SLAAC, privacy addresses), so keying by
//! /128 would let one machine rotate through 2⁶⁴ identities and escape every limit and ban.
//! IPv4-mapped IPv6 addresses (`::ffff:192.0.2.1`, as a dual-stack socket reports IPv4 peers) are
//! treated as the IPv4 address everywhere in this module.
//!
//! ## Memory
//! Everything that grows with the number of clients (rate buckets, ban counters, bans) has a hard
//! cap fixed at construction and a `sweep()` the owner calls periodically (once a second is
//! plenty) to drop stale entries and give memory back. No check ever scans a table.
//!
//! ## Time
//! All time is read from [`crate::clock`] (tokio's clock), so tests pause and advance it.

pub mod ban;
pub mod cidr;
pub mod rate;
pub mod rules;

pub use ban::{BanEntry, BanPolicy, BanReason, BanTable};
pub use cidr::{AccessList, CidrSet};
pub use rate::{Key, RateLimiter};
pub use rules::{DenyRules, Pattern, RuleSpec, Target};

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Mutex, MutexGuard, PoisonError};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// Why a filter could not be built from the values given. Every variant names the offending input.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FilterError {
    /// An entry of a CIDR list is not an address or a network.
    #[error("CIDR entry {index} ({entry:?}): {reason}")]
    Cidr {
        /// Position in the list given, from 0.
        index: usize,
        /// The entry as given.
        entry: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A rate-limit quota that cannot be enforced (zero rate, zero period, zero burst).
    #[error("rate limit: {0}")]
    Rate(String),
    /// A ban policy that cannot be enforced.
    #[error("ban policy: {0}")]
    Ban(String),
    /// A deny rule whose pattern or name is invalid.
    #[error("deny rule {index} ({name:?}): {reason}")]
    Rule {
        /// Position in the list given, from 0.
        index: usize,
        /// The rule's name.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A preset name that does not exist.
    #[error("unknown deny-rule preset {name:?} (known: {known})")]
    UnknownPreset {
        /// The name asked for.
        name: String,
        /// The known names, comma-separated.
        known: String,
    },
}

/// The identity of a client for rate limits and bans: an IPv4 address, or an IPv6 /64 prefix.
///
/// Built with [`ClientKey::of`], which also folds IPv4-mapped IPv6 addresses into IPv4.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ClientKey {
    /// An IPv4 address, as its 32 bits.
    V4(u32),
    /// The upper 64 bits of an IPv6 address.
    V6(u64),
}

impl ClientKey {
    /// The key of a client address. No allocation.
    #[inline]
    pub fn of(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(v4) => ClientKey::V4(u32::from(v4)),
            IpAddr::V6(v6) => ClientKey::V6((u128::from(v6) >> 64) as u64),
        }
    }

    /// The network this key stands for: `a.b.c.d/32` or `x:x:x:x::/64`.
    pub fn net(self) -> IpNet {
        match self {
            ClientKey::V4(bits) => IpNet::V4(
                Ipv4Net::new(Ipv4Addr::from(bits), 32).expect("32 is a valid IPv4 prefix length"),
            ),
            ClientKey::V6(prefix) => IpNet::V6(
                Ipv6Net::new(Ipv6Addr::from(u128::from(prefix) << 64), 64)
                    .expect("64 is a valid IPv6 prefix length"),
            ),
        }
    }

    /// A well-mixed 64-bit value for picking a shard (not for the maps themselves, which use
    /// std's randomly keyed SipHash so that chosen keys cannot degrade them).
    #[inline]
    fn spread(self) -> u64 {
        let raw = match self {
            ClientKey::V4(bits) => u64::from(bits),
            ClientKey::V6(prefix) => prefix ^ 0x9e37_79b9_7f4a_7c15,
        };
        mix64(raw)
    }
}

/// Number of shards of every per-client table: enough that two cores never queue on one lock,
/// few enough that a shard's share of the cap stays meaningful.
pub(crate) const SHARDS: usize = 16;

/// The shard of a mixed hash.
#[inline]
pub(crate) fn shard_of(spread: u64) -> usize {
    (spread >> 60) as usize & (SHARDS - 1)
}

/// The per-shard share of a table-wide cap (at least 1).
pub(crate) fn per_shard(cap: usize) -> usize {
    cap.div_ceil(SHARDS).max(1)
}

/// SplitMix64's finaliser: spreads every input bit over the whole word.
#[inline]
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Locks a mutex, ignoring poisoning: every table here stays consistent between statements, so
/// a panic elsewhere while it was held leaves nothing half-written.
#[inline]
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_clients_are_keyed_by_their_slash_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff:ffff:ffff:ffff".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(ClientKey::of(a), ClientKey::of(b));
        assert_ne!(ClientKey::of(a), ClientKey::of(c));
        assert_eq!(ClientKey::of(a).net().to_string(), "2001:db8:1:2::/64");
    }

    #[test]
    fn ipv4_mapped_addresses_are_ipv4_clients() {
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        let plain: IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!(ClientKey::of(mapped), ClientKey::of(plain));
        assert_eq!(ClientKey::of(plain).net().to_string(), "192.0.2.7/32");
        assert_ne!(
            ClientKey::of("192.0.2.8".parse().unwrap()),
            ClientKey::of(plain)
        );
    }

    #[test]
    fn filters_can_be_shared_between_threads() {
        fn shared<T: Send + Sync + 'static>() {}
        shared::<cidr::AccessList>();
        shared::<ban::BanTable>();
        shared::<rate::RateLimiter>();
        shared::<Box<dyn rate::Limiter>>();
        shared::<rules::DenyRules>();
    }

    #[test]
    fn shards_are_all_reachable() {
        let mut seen = [false; SHARDS];
        for i in 0..1000u32 {
            seen[shard_of(ClientKey::V4(i).spread())] = true;
        }
        assert!(seen.iter().all(|s| *s));
    }
}

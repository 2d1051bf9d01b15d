//! Rate limiting: a token bucket per key, computed as GCRA.
//!
//! ## Algorithm
//! The Generic Cell Rate Algorithm (ATM Forum TM 4.0; the form `governor` and Redis' `redis-cell`
//! use) is a token bucket stored as one number per key, its *theoretical arrival time* (TAT): the
//! instant at which the bucket would be full again. With emission interval `T = per / rate` and
//! tolerance `τ = T × burst`, a request at `now` is allowed when `max(TAT, now) + T ≤ now + τ`,
//! and then `TAT ← max(TAT, now) + T`; otherwise the client may retry after
//! `max(TAT, now) + T − (now + τ)`. So a fresh key may send `burst` requests at once, then one
//! every `T`.
//!
//! A key whose TAT is in the past has a full bucket, exactly as if it had never been seen. That
//! makes forgetting it lossless: [`RateLimiter::sweep`] drops every such entry, and an entry lives
//! at most `burst × per / rate` after the key's last request.
//!
//! ## Why not `governor`
//! `governor` implements the same arithmetic, but a hard cap on keys needs a custom
//! `KeyedStateStore` and the pausable clock a custom `Clock` + `Reference`, which leaves only the
//! three lines of GCRA to reuse. Owning them keeps the state one `u64` under a shard lock, the
//! clock [`crate::clock`], and the arithmetic in one place for a shared (Redis) implementation of
//! [`Limiter`] to mirror.
//!
//! ## Keys and memory
//! A [`Key`] is a client ([`ClientKey`]: IPv4 address or IPv6 /64) or a string (header, cookie or
//! path value) hashed with xxh3 and a fixed seed, so every instance derives the same key. The table
//! holds at most `max_keys` keys (default [`DEFAULT_MAX_KEYS`], spread over 16 shards). When a
//! key's shard is full, the key is checked against **one shared overflow bucket** with the same
//! quota: a flood of distinct keys cannot grow memory, cannot evict (and so refill) the buckets of
//! clients being limited, and altogether gets one client's rate. Legitimate new clients share that
//! bucket too until room is made, which is the safe failure: degrade, never fail open. Room is made
//! by [`RateLimiter::sweep`] (the owner should call it about once a second) and, so that a missing
//! sweep cannot wedge a shard, by a sweep of the full shard itself at most once a second.
//!
//! ## Cost
//! A check locks one of 16 shards, does one SipHash lookup of a 16-byte key and a few integer
//! operations; it allocates only when a new key makes its shard's map grow.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::{lock, mix64, per_shard, shard_of, ClientKey, FilterError, SHARDS};
use crate::clock;

/// Default hard cap on the number of keys a [`RateLimiter`] tracks.
pub const DEFAULT_MAX_KEYS: usize = 100_000;

/// Bytes of a string key that are hashed; the rest is ignored (two values longer than this that
/// share their first `MAX_KEY_BYTES` bytes share a bucket). Bounds the cost of a hostile value.
pub const MAX_KEY_BYTES: usize = 1024;

/// Seed of the string-key hash: fixed, so that every instance maps a value to the same key.
const KEY_SEED: u64 = 0x6675_6c63_7275_6d31; // "fulcrum1"

/// A full shard sweeps itself at most this often (when the owner's sweep is late or missing).
const SELF_SWEEP_EVERY_NS: u64 = 1_000_000_000;

/// What a rate limit counts requests by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Key {
    /// A client address (IPv4, or IPv6 by /64).
    Client(ClientKey),
    /// A string value (header, cookie, path), by its 64-bit xxh3.
    Hash(u64),
}

impl Key {
    /// A stable text form of the key, for a shared store (the same on every instance).
    pub fn redis_name(&self) -> String {
        match self {
            Key::Client(crate::filter::ClientKey::V4(a)) => format!("4:{a:08x}"),
            Key::Client(crate::filter::ClientKey::V6(p)) => format!("6:{p:016x}"),
            Key::Hash(h) => format!("h:{h:016x}"),
        }
    }

    /// The key of a client address: IPv4 as is, IPv6 by its /64, IPv4-mapped IPv6 as IPv4.
    #[inline]
    pub fn ip(ip: IpAddr) -> Self {
        Key::Client(ClientKey::of(ip))
    }

    /// The key of a string value (at most its first [`MAX_KEY_BYTES`] bytes count).
    #[inline]
    pub fn text(value: &str) -> Self {
        Self::bytes(value.as_bytes())
    }

    /// The key of a byte value, such as a raw header value (at most its first [`MAX_KEY_BYTES`]
    /// bytes count).
    #[inline]
    pub fn bytes(value: &[u8]) -> Self {
        let value = &value[..value.len().min(MAX_KEY_BYTES)];
        Key::Hash(xxh3_64_with_seed(value, KEY_SEED))
    }

    #[inline]
    fn spread(self) -> u64 {
        match self {
            Key::Client(c) => c.spread(),
            Key::Hash(h) => mix64(h),
        }
    }
}

/// A rate limit decision maker. [`RateLimiter`] is the in-process implementation; a fleet-wide
/// one (through the `[store]`) plugs in here.
///
/// `check` is synchronous because it runs on every request: a shared implementation is expected
/// to decide from local state and reconcile with the store in the background, not to wait for a
/// round trip.
pub trait Limiter: Send + Sync {
    /// Counts one request for `key`: `Ok(())` if it is within the limit, otherwise
    /// `Err(retry_after)`, how long until a request from that key would be allowed (for a `429`'s
    /// `Retry-After`, see [`retry_after_secs`]).
    fn check(&self, key: &Key) -> Result<(), Duration>;
}

/// A `Retry-After` value in whole seconds: rounded up, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

/// GCRA parameters, in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Quota {
    /// `T`: time for one token to come back.
    interval_ns: u64,
    /// `τ = T × burst`: how far ahead of now the TAT may run.
    tolerance_ns: u64,
}

impl Quota {
    fn new(rate: u32, per: Duration, burst: u32) -> Result<Self, FilterError> {
        if rate == 0 {
            return Err(FilterError::Rate("rate must be at least 1".into()));
        }
        if per.is_zero() {
            return Err(FilterError::Rate("period must be longer than 0".into()));
        }
        if burst == 0 {
            return Err(FilterError::Rate("burst must be at least 1".into()));
        }
        let per_ns = u64::try_from(per.as_nanos()).unwrap_or(u64::MAX);
        let interval_ns = (per_ns / u64::from(rate)).max(1);
        Ok(Quota {
            interval_ns,
            tolerance_ns: interval_ns.saturating_mul(u64::from(burst)),
        })
    }

    /// One request at `now` against a bucket whose TAT is `tat`: the new TAT, or the wait.
    #[inline]
    fn admit(self, tat: u64, now: u64) -> Result<u64, u64> {
        let next = tat.max(now).saturating_add(self.interval_ns);
        let limit = now.saturating_add(self.tolerance_ns);
        if next <= limit {
            Ok(next)
        } else {
            Err(next - limit)
        }
    }
}

struct Shard {
    /// Key → TAT (nanoseconds on [`clock::now_ns`]'s scale).
    tats: HashMap<Key, u64>,
    /// When this shard last dropped its refilled entries.
    swept_ns: u64,
}

impl Shard {
    /// Drops the entries whose bucket is full again; gives memory back when mostly empty.
    fn sweep(&mut self, now: u64) -> usize {
        let before = self.tats.len();
        self.tats.retain(|_, tat| *tat > now);
        let len = self.tats.len();
        if self.tats.capacity() > 64 && len * 4 < self.tats.capacity() {
            self.tats.shrink_to(len * 2);
        }
        self.swept_ns = now;
        before - len
    }
}

/// A token bucket per key, with a hard cap on keys. See the module doc.
pub struct RateLimiter {
    quota: Quota,
    shards: Box<[Mutex<Shard>]>,
    max_per_shard: usize,
    /// TAT of the bucket shared by the keys that found their shard full.
    overflow: AtomicU64,
    /// Checks answered by the overflow bucket.
    overflowed: AtomicU64,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("interval_ns", &self.quota.interval_ns)
            .field("tolerance_ns", &self.quota.tolerance_ns)
            .field("max_keys", &(self.max_per_shard * SHARDS))
            .finish_non_exhaustive()
    }
}

impl RateLimiter {
    /// `rate` requests per `per` for each key, with bursts of up to `burst` requests, tracking at
    /// most [`DEFAULT_MAX_KEYS`] keys. Errors if any of the three is zero.
    ///
    /// `rate = 10, per = 1 s, burst = 20`: a new key may send 20 requests at once, then 10 a
    /// second; an idle key earns one request back every 100 ms up to 20.
    pub fn new(rate: u32, per: Duration, burst: u32) -> Result<Self, FilterError> {
        let quota = Quota::new(rate, per, burst)?;
        Ok(RateLimiter {
            quota,
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        tats: HashMap::new(),
                        swept_ns: 0,
                    })
                })
                .collect(),
            max_per_shard: per_shard(DEFAULT_MAX_KEYS),
            overflow: AtomicU64::new(0),
            overflowed: AtomicU64::new(0),
        })
    }

    /// The same limiter with a different cap on tracked keys (rounded up to a multiple of 16: the
    /// cap is split evenly between the shards).
    pub fn with_max_keys(mut self, max_keys: usize) -> Self {
        self.max_per_shard = per_shard(max_keys);
        self
    }

    /// The hard cap on tracked keys.
    pub fn max_keys(&self) -> usize {
        self.max_per_shard * SHARDS
    }

    /// Counts one request for `key`; see [`Limiter::check`].
    #[inline]
    pub fn check(&self, key: &Key) -> Result<(), Duration> {
        let now = clock::now_ns();
        let mut shard = lock(&self.shards[shard_of(key.spread())]);
        if let Some(tat) = shard.tats.get_mut(key) {
            return match self.quota.admit(*tat, now) {
                Ok(next) => {
                    *tat = next;
                    Ok(())
                }
                Err(wait) => Err(Duration::from_nanos(wait)),
            };
        }
        if shard.tats.len() >= self.max_per_shard
            && now.saturating_sub(shard.swept_ns) >= SELF_SWEEP_EVERY_NS
        {
            shard.sweep(now);
        }
        if shard.tats.len() < self.max_per_shard {
            // A fresh key has a full bucket (burst ≥ 1), so this never refuses.
            let next = self.quota.admit(now, now).map_err(Duration::from_nanos)?;
            shard.tats.insert(*key, next);
            return Ok(());
        }
        drop(shard);
        self.overflowed.fetch_add(1, Ordering::Relaxed);
        self.check_overflow(now)
    }

    fn check_overflow(&self, now: u64) -> Result<(), Duration> {
        let mut tat = self.overflow.load(Ordering::Relaxed);
        loop {
            let next = self.quota.admit(tat, now).map_err(Duration::from_nanos)?;
            match self.overflow.compare_exchange_weak(
                tat,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(current) => tat = current,
            }
        }
    }

    /// Forgets every key whose bucket is full again (lossless, see the module doc) and gives
    /// memory back. Returns how many keys were dropped. Call it about once a second.
    pub fn sweep(&self) -> usize {
        let now = clock::now_ns();
        self.shards.iter().map(|s| lock(s).sweep(now)).sum()
    }

    /// Keys tracked now (each one counts against [`RateLimiter::max_keys`]).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).tats.len()).sum()
    }

    /// Whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many checks found their shard full and used the shared overflow bucket (a metric: a
    /// growing value means the cap is too low or a flood of distinct keys is under way).
    pub fn overflowed(&self) -> u64 {
        self.overflowed.load(Ordering::Relaxed)
    }
}

impl Limiter for RateLimiter {
    #[inline]
    fn check(&self, key: &Key) -> Result<(), Duration> {
        RateLimiter::check(self, key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::advance;

    fn ip(s: &str) -> Key {
        Key::ip(s.parse().unwrap())
    }

    #[test]
    fn zero_rate_period_or_burst_is_refused() {
        let s = Duration::from_secs(1);
        assert!(matches!(
            RateLimiter::new(0, s, 1),
            Err(FilterError::Rate(m)) if m.contains("rate")
        ));
        assert!(RateLimiter::new(1, Duration::ZERO, 1).is_err());
        assert!(matches!(
            RateLimiter::new(1, s, 0),
            Err(FilterError::Rate(m)) if m.contains("burst")
        ));
        assert!(RateLimiter::new(u32::MAX, Duration::from_nanos(1), u32::MAX).is_ok());
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1000)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_passes_then_the_rate_holds() {
        // 10 per second, bursts of 3: T = 100 ms.
        let rl = RateLimiter::new(10, Duration::from_secs(1), 3).unwrap();
        let k = ip("192.0.2.1");
        for _ in 0..3 {
            assert_eq!(rl.check(&k), Ok(()));
        }
        assert_eq!(rl.check(&k), Err(Duration::from_millis(100)));

        advance(Duration::from_millis(40)).await;
        assert_eq!(rl.check(&k), Err(Duration::from_millis(60)));

        advance(Duration::from_millis(60)).await;
        assert_eq!(rl.check(&k), Ok(()));
        assert_eq!(rl.check(&k), Err(Duration::from_millis(100)));

        // A full refill gives the whole burst back, no more.
        advance(Duration::from_secs(60)).await;
        for _ in 0..3 {
            assert_eq!(rl.check(&k), Ok(()));
        }
        assert!(rl.check(&k).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn refused_requests_do_not_consume_tokens() {
        let rl = RateLimiter::new(1, Duration::from_secs(1), 1).unwrap();
        let k = Key::text("api-key-1");
        assert!(rl.check(&k).is_ok());
        for _ in 0..100 {
            assert!(rl.check(&k).is_err());
        }
        advance(Duration::from_secs(1)).await;
        assert!(rl.check(&k).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_rate_over_a_minute() {
        let rl = RateLimiter::new(2, Duration::from_secs(60), 1).unwrap();
        let k = ip("192.0.2.1");
        assert!(rl.check(&k).is_ok());
        assert_eq!(rl.check(&k), Err(Duration::from_secs(30)));
        advance(Duration::from_secs(30)).await;
        assert!(rl.check(&k).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn keys_have_their_own_buckets() {
        let rl = RateLimiter::new(1, Duration::from_secs(1), 1).unwrap();
        assert!(rl.check(&ip("192.0.2.1")).is_ok());
        assert!(rl.check(&ip("192.0.2.1")).is_err());
        assert!(rl.check(&ip("192.0.2.2")).is_ok());
        assert!(rl.check(&Key::text("a")).is_ok());
        assert!(rl.check(&Key::text("a")).is_err());
        assert!(rl.check(&Key::text("b")).is_ok());
        assert_eq!(rl.len(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn ipv6_clients_share_a_bucket_per_slash_64() {
        let rl = RateLimiter::new(1, Duration::from_secs(1), 2).unwrap();
        assert!(rl.check(&ip("2001:db8:0:1::1")).is_ok());
        assert!(rl.check(&ip("2001:db8:0:1:dead:beef:0:2")).is_ok());
        assert!(rl.check(&ip("2001:db8:0:1:ffff::3")).is_err());
        assert!(rl.check(&ip("2001:db8:0:2::1")).is_ok());
        // IPv4-mapped IPv6 is the IPv4 client.
        assert!(rl.check(&ip("198.51.100.9")).is_ok());
        assert!(rl.check(&ip("::ffff:198.51.100.9")).is_ok());
        assert!(rl.check(&ip("198.51.100.9")).is_err());
    }

    #[test]
    fn string_keys_hash_a_bounded_prefix() {
        assert_eq!(Key::text("abc"), Key::bytes(b"abc"));
        assert_ne!(Key::text("abc"), Key::text("abd"));
        let mut a = "x".repeat(MAX_KEY_BYTES);
        let mut b = a.clone();
        a.push('1');
        b.push('2');
        assert_eq!(Key::text(&a), Key::text(&b));
        // Fixed seed: the same on every instance and run.
        assert_eq!(
            Key::text("abc"),
            Key::Hash(xxh3_64_with_seed(b"abc", KEY_SEED))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_table_sends_new_keys_to_one_shared_bucket() {
        // 16 keys at most (one per shard); each key and the overflow get 1/s, burst 2.
        let rl = RateLimiter::new(1, Duration::from_secs(1), 2)
            .unwrap()
            .with_max_keys(16);
        assert_eq!(rl.max_keys(), 16);
        let mut admitted = 0;
        for i in 0..10_000u32 {
            if rl.check(&Key::ip(IpAddr::from(i.to_be_bytes()))).is_ok() {
                admitted += 1;
            }
        }
        assert!(rl.len() <= 16, "{} keys tracked", rl.len());
        // At most 16 tracked keys × burst 2 (one request each here) + the overflow's burst of 2.
        assert!(admitted <= 16 + 2, "{admitted} admitted");
        assert!(rl.overflowed() >= 10_000 - 16);

        // A tracked key keeps its own bucket, unaffected by the flood.
        let tracked = (0..10_000u32)
            .map(|i| Key::ip(IpAddr::from(i.to_be_bytes())))
            .find(|k| lock(&rl.shards[shard_of(k.spread())]).tats.contains_key(k))
            .unwrap();
        assert!(rl.check(&tracked).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn sweep_forgets_only_refilled_buckets() {
        let rl = RateLimiter::new(10, Duration::from_secs(1), 5).unwrap();
        for i in 0..100u32 {
            assert!(rl.check(&Key::Hash(u64::from(i))).is_ok());
        }
        let busy = Key::text("busy");
        for _ in 0..5 {
            assert!(rl.check(&busy).is_ok());
        }
        assert_eq!(rl.len(), 101);
        // One request costs 100 ms of refill: after 100 ms the 100 light keys are full again,
        // the busy one (500 ms deep) is not.
        advance(Duration::from_millis(100)).await;
        assert_eq!(rl.sweep(), 100);
        assert_eq!(rl.len(), 1);
        assert!(rl.check(&busy).is_ok());
        assert!(rl.check(&busy).is_err(), "the busy key kept its state");
        advance(Duration::from_secs(1)).await;
        assert_eq!(rl.sweep(), 1);
        assert!(rl.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_shard_sweeps_itself_when_the_owner_does_not() {
        let rl = RateLimiter::new(1, Duration::from_secs(1), 1)
            .unwrap()
            .with_max_keys(16);
        for i in 0..1000u64 {
            let _ = rl.check(&Key::Hash(i));
        }
        assert_eq!(rl.len(), 16);
        advance(Duration::from_secs(2)).await;
        // Every tracked bucket has refilled; a new key finds its shard reclaimable.
        let before = rl.overflowed();
        assert!(rl.check(&Key::text("newcomer")).is_ok());
        assert_eq!(rl.overflowed(), before, "served by its own bucket");
    }

    #[tokio::test(start_paused = true)]
    async fn the_overflow_bucket_refills_too() {
        let rl = RateLimiter::new(1, Duration::from_secs(1), 1)
            .unwrap()
            .with_max_keys(1);
        // Fill every shard with one key whose bucket stays drained, without touching the overflow.
        for i in 0..10_000u64 {
            let k = Key::Hash(i);
            if lock(&rl.shards[shard_of(k.spread())]).tats.is_empty() {
                assert!(rl.check(&k).is_ok());
            }
        }
        assert_eq!((rl.len(), rl.overflowed()), (16, 0));
        let k = Key::text("late");
        assert!(rl.check(&k).is_ok());
        assert_eq!(rl.overflowed(), 1);
        assert_eq!(rl.check(&k), Err(Duration::from_secs(1)));
        advance(Duration::from_millis(500)).await;
        assert_eq!(rl.check(&k), Err(Duration::from_millis(500)));
        advance(Duration::from_millis(500)).await;
        // The overflow bucket has refilled (and the full shards may have swept themselves).
        assert!(rl.check(&k).is_ok());
    }

    #[test]
    fn the_trait_is_object_safe() {
        let rl: Box<dyn Limiter> =
            Box::new(RateLimiter::new(1, Duration::from_secs(1), 1).unwrap());
        assert!(rl.check(&Key::text("x")).is_ok());
    }
}

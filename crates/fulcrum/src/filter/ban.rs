//! Temporary bans of abusive clients, automatic and manual.
//!
//! Modelled on HAProxy's stick-table tracking (`http_req_rate(10s)`, `http_err_rate(10s)` and a
//! `gpc`-style ban flag with its own expiry): for each client ([`ClientKey`]: IPv4 address or IPv6
//! /64) the table counts requests and errors over a sliding window; a client whose count exceeds
//! `max_requests` or `max_errors` is banned for `ban_for`. The owner answers a banned client's
//! connections and requests without forwarding them. Manual bans (the admin API) use
//! [`BanTable::ban`], [`BanTable::unban`] and [`BanTable::list`].
//!
//! ## Sliding window
//! A sliding-window counter (the approximation Cloudflare described for its rate limiting in
//! 2017): time is cut into windows of `window`, aligned for everyone; a client's rate is its count
//! in the current window plus its count in the previous one weighted by how much of the previous
//! window still lies within the last `window`. Two integers per counter instead of a timestamp per
//! request. For evenly spread traffic the estimate is at most one request above the true count
//! (so set thresholds with a margin); for bursty traffic it is off by part of the previous
//! window's count, either way. A client is banned when its estimate *exceeds* the threshold.
//!
//! ## Memory and eviction
//! Each of the 16 shards keeps the counts of the current window and of the previous one in two
//! maps. When a shard first sees a new window the maps rotate (previous ← current, current ←
//! empty, keeping its allocation), so stale counters disappear in O(1) amortised, without a scan
//! and without a timer: this is the lazy expiry. A window's map holds at most
//! `max_tracked / 16` clients; clients beyond that are not counted until the next window (counted
//! in [`BanStats::untracked`]) — a flood of distinct addresses cannot grow memory, and cannot push
//! out the counters of clients already tracked.
//!
//! Bans live in their own map per shard, at most `max_bans / 16` automatic ones. Expired bans are
//! removed when looked at, by [`BanTable::sweep`], and when a full shard needs room — a full shard
//! remembers its earliest expiry and does not rescan before then, so a table full of live bans
//! costs nothing more per record. An automatic ban that finds no room is dropped (counted in
//! [`BanStats::bans_dropped`]), but the client's counts are kept, so [`BanTable::record`] reports
//! it again on each request while it stays over the threshold and the owner can refuse those
//! requests. Manual bans are always stored.
//!
//! ## Which statuses are errors
//! A [`StatusSet`], by default the 4xx class: scanners and brute-forcers produce 404s, 401s and
//! 403s. Counting 5xx is possible but dangerous: a failing server would get every client banned.
//! Whether the balancer's own refusals (429 from the rate limit, 403 from a deny rule) are recorded
//! is the owner's choice: recording them escalates repeat offenders to a ban.
//!
//! ## Cost
//! [`BanTable::is_banned`] is one relaxed atomic load while no ban exists, otherwise one shard lock
//! and one lookup. [`BanTable::record`] is one shard lock and at most two lookups; it allocates only
//! when a map grows.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use serde::Serialize;

use super::{lock, per_shard, shard_of, ClientKey, FilterError, SHARDS};
use crate::clock;

/// A set of HTTP status codes (100–599).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusSet {
    bits: [u64; 10],
}

impl StatusSet {
    /// No status.
    pub const fn empty() -> Self {
        StatusSet { bits: [0; 10] }
    }

    /// 400–499, the default error class.
    pub fn client_errors() -> Self {
        Self::empty().with_range(400..=499)
    }

    /// 500–599.
    pub fn server_errors() -> Self {
        Self::empty().with_range(500..=599)
    }

    /// The union of these inclusive ranges (`404..=404` for one code). Each must lie within
    /// 100–599.
    pub fn from_ranges(
        ranges: impl IntoIterator<Item = RangeInclusive<u16>>,
    ) -> Result<Self, FilterError> {
        let mut set = Self::empty();
        for r in ranges {
            if r.start() > r.end() || *r.start() < 100 || *r.end() > 599 {
                return Err(FilterError::Ban(format!(
                    "status range {}-{} is not within 100-599",
                    r.start(),
                    r.end()
                )));
            }
            set = set.with_range(r);
        }
        Ok(set)
    }

    /// This set plus the codes of `range` (codes outside 100–599 are ignored).
    pub fn with_range(mut self, range: RangeInclusive<u16>) -> Self {
        for code in range {
            if (100..=599).contains(&code) {
                self.bits[usize::from(code / 64)] |= 1 << (code % 64);
            }
        }
        self
    }

    /// This set without `code` (`client_errors().without(429)`).
    pub fn without(mut self, code: u16) -> Self {
        if code < 640 {
            self.bits[usize::from(code / 64)] &= !(1 << (code % 64));
        }
        self
    }

    /// Whether `status` is in the set.
    #[inline]
    pub fn contains(&self, status: u16) -> bool {
        status < 640 && self.bits[usize::from(status / 64)] & (1 << (status % 64)) != 0
    }
}

impl Default for StatusSet {
    fn default() -> Self {
        Self::client_errors()
    }
}

/// When clients are banned automatically. Plain values; [`BanTable::new`] checks them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BanPolicy {
    /// The sliding window the counts are taken over.
    pub window: Duration,
    /// Ban a client that sends more than this many requests per `window` (`None`: no such ban).
    pub max_requests: Option<u32>,
    /// Ban a client that receives more than this many error statuses per `window` (`None`: no such
    /// ban).
    pub max_errors: Option<u32>,
    /// The statuses that count as errors.
    pub errors: StatusSet,
    /// How long an automatic ban lasts.
    pub ban_for: Duration,
    /// Hard cap on clients counted per window.
    pub max_tracked: usize,
    /// Hard cap on automatic bans held at once.
    pub max_bans: usize,
}

impl Default for BanPolicy {
    /// 10 s window, no thresholds (only manual bans), 4xx as errors, 10 min bans, 100k clients
    /// and 100k bans at most.
    fn default() -> Self {
        BanPolicy {
            window: Duration::from_secs(10),
            max_requests: None,
            max_errors: None,
            errors: StatusSet::client_errors(),
            ban_for: Duration::from_secs(600),
            max_tracked: 100_000,
            max_bans: 100_000,
        }
    }
}

/// Why a client is banned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "note", rename_all = "snake_case")]
pub enum BanReason {
    /// More than `max_requests` requests in the window.
    RequestRate,
    /// More than `max_errors` error statuses in the window.
    ErrorRate,
    /// Banned by an operator, with a note.
    Manual(String),
}

impl std::fmt::Display for BanReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BanReason::RequestRate => f.write_str("request rate"),
            BanReason::ErrorRate => f.write_str("error rate"),
            BanReason::Manual(note) if note.is_empty() => f.write_str("manual"),
            BanReason::Manual(note) => write!(f, "manual: {note}"),
        }
    }
}

/// One ban, as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BanEntry {
    /// The banned client: `a.b.c.d/32` or an IPv6 `/64`.
    pub net: IpNet,
    /// Milliseconds until the ban ends.
    pub remaining_ms: u64,
    /// When the ban ends, in milliseconds since the Unix epoch (wall clock, for display).
    pub until_unix_ms: u64,
    /// Why.
    pub reason: BanReason,
}

/// Counters of a [`BanTable`], for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct BanStats {
    /// Counter entries held (current and previous windows).
    pub tracked: usize,
    /// Bans held (some may have expired and not been removed yet).
    pub banned: usize,
    /// Records not counted because their shard's window map was full.
    pub untracked: u64,
    /// Times a client was found over a threshold (whether its ban was stored or dropped).
    pub bans_issued: u64,
    /// Automatic bans not stored because the ban map was full.
    pub bans_dropped: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    requests: u32,
    errors: u32,
}

#[derive(Debug)]
struct Ban {
    until_ns: u64,
    reason: BanReason,
}

#[derive(Default)]
struct Shard {
    /// Index of the window `cur` counts.
    window: u64,
    cur: HashMap<ClientKey, Counts>,
    prev: HashMap<ClientKey, Counts>,
    bans: HashMap<ClientKey, Ban>,
    /// No ban of this shard expires before this instant: a full shard need not rescan until then.
    no_expiry_before_ns: u64,
}

impl Shard {
    /// Moves the counters forward to window `w` (lazy expiry).
    fn rotate(&mut self, w: u64) {
        if w == self.window {
            return;
        }
        if w == self.window + 1 {
            std::mem::swap(&mut self.cur, &mut self.prev);
            self.cur.clear();
        } else if w > self.window {
            self.cur.clear();
            self.prev.clear();
        } else {
            return; // the clock never goes back; ignore rather than lose counts
        }
        self.window = w;
    }

    /// Removes expired bans; returns how many.
    fn expire(&mut self, now: u64) -> usize {
        let before = self.bans.len();
        let mut earliest = u64::MAX;
        self.bans.retain(|_, b| {
            let keep = b.until_ns > now;
            if keep {
                earliest = earliest.min(b.until_ns);
            }
            keep
        });
        self.no_expiry_before_ns = earliest;
        before - self.bans.len()
    }
}

/// Gives memory back when a map is mostly empty.
fn shrink<K: std::hash::Hash + Eq, V>(map: &mut HashMap<K, V>) {
    if map.capacity() > 64 && map.len() * 4 < map.capacity() {
        map.shrink_to(map.len() * 2);
    }
}

/// Per-client request and error counters with automatic bans. See the module doc.
pub struct BanTable {
    window_ns: u64,
    max_requests: Option<u32>,
    max_errors: Option<u32>,
    errors: StatusSet,
    ban_for_ns: u64,
    tracked_per_shard: usize,
    bans_per_shard: usize,
    shards: Box<[Mutex<Shard>]>,
    /// Bans held, expired or not: 0 lets `is_banned` skip the lock.
    banned: AtomicUsize,
    untracked: AtomicU64,
    bans_issued: AtomicU64,
    bans_dropped: AtomicU64,
}

impl std::fmt::Debug for BanTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BanTable")
            .field("window_ns", &self.window_ns)
            .field("max_requests", &self.max_requests)
            .field("max_errors", &self.max_errors)
            .field("ban_for_ns", &self.ban_for_ns)
            .finish_non_exhaustive()
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl BanTable {
    /// A table enforcing `policy`. Errors if the window or the ban duration is zero, a threshold
    /// is 0, or a cap is 0.
    pub fn new(policy: BanPolicy) -> Result<Self, FilterError> {
        if policy.window.is_zero() {
            return Err(FilterError::Ban("window must be longer than 0".into()));
        }
        if policy.ban_for.is_zero() {
            return Err(FilterError::Ban(
                "ban duration must be longer than 0".into(),
            ));
        }
        if policy.max_requests == Some(0) || policy.max_errors == Some(0) {
            return Err(FilterError::Ban("thresholds must be at least 1".into()));
        }
        if policy.max_tracked == 0 || policy.max_bans == 0 {
            return Err(FilterError::Ban("table sizes must be at least 1".into()));
        }
        Ok(BanTable {
            window_ns: nanos(policy.window),
            max_requests: policy.max_requests,
            max_errors: policy.max_errors,
            errors: policy.errors,
            ban_for_ns: nanos(policy.ban_for),
            tracked_per_shard: per_shard(policy.max_tracked),
            bans_per_shard: per_shard(policy.max_bans),
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            banned: AtomicUsize::new(0),
            untracked: AtomicU64::new(0),
            bans_issued: AtomicU64::new(0),
            bans_dropped: AtomicU64::new(0),
        })
    }

    fn shard(&self, key: ClientKey) -> &Mutex<Shard> {
        &self.shards[shard_of(key.spread())]
    }

    /// Counts one answered request of `ip` with `status`. Returns the reason when this request
    /// takes the client over a threshold, and the client is now banned (or would be, had the ban
    /// map room: then every further request over the threshold is reported too; see the module doc).
    /// Returns `None` for a client already banned: its requests should not have been forwarded.
    pub fn record(&self, ip: IpAddr, status: u16) -> Option<BanReason> {
        if self.max_requests.is_none() && self.max_errors.is_none() {
            return None;
        }
        let key = ClientKey::of(ip);
        let now = clock::now_ns();
        let (w, into_window) = (now / self.window_ns, now % self.window_ns);
        let mut guard = lock(self.shard(key));
        let shard = &mut *guard;
        shard.rotate(w);
        if let Some(ban) = shard.bans.get(&key) {
            if ban.until_ns > now {
                return None;
            }
            shard.bans.remove(&key);
            self.banned.fetch_sub(1, Ordering::Relaxed);
        }

        let full = shard.cur.len() >= self.tracked_per_shard;
        let cur = match shard.cur.entry(key) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(_) if full => {
                self.untracked.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            Entry::Vacant(e) => e.insert(Counts::default()),
        };
        cur.requests = cur.requests.saturating_add(1);
        if self.errors.contains(status) {
            cur.errors = cur.errors.saturating_add(1);
        }
        let cur = *cur;
        let prev = shard.prev.get(&key).copied().unwrap_or_default();

        // cur + prev × (share of the previous window still inside the last `window`) > max,
        // scaled by `window_ns` to stay in integers.
        let prev_weight = u128::from(self.window_ns - into_window);
        let over = |c: u32, p: u32, max: Option<u32>| {
            max.is_some_and(|max| {
                u128::from(c) * u128::from(self.window_ns) + u128::from(p) * prev_weight
                    > u128::from(max) * u128::from(self.window_ns)
            })
        };
        let reason = if over(cur.errors, prev.errors, self.max_errors) {
            BanReason::ErrorRate
        } else if over(cur.requests, prev.requests, self.max_requests) {
            BanReason::RequestRate
        } else {
            return None;
        };
        self.bans_issued.fetch_add(1, Ordering::Relaxed);
        if shard.bans.len() >= self.bans_per_shard && now >= shard.no_expiry_before_ns {
            let expired = shard.expire(now);
            self.banned.fetch_sub(expired, Ordering::Relaxed);
        }
        if shard.bans.len() >= self.bans_per_shard {
            // No room: keep the counts, so that every further request over the threshold is
            // reported (and can be refused) until one fits.
            self.bans_dropped.fetch_add(1, Ordering::Relaxed);
        } else {
            // The ban starts the client afresh: it must not be banned again the moment it ends.
            shard.cur.remove(&key);
            shard.prev.remove(&key);
            let until_ns = now.saturating_add(self.ban_for_ns);
            self.insert_ban(shard, key, until_ns, reason.clone());
        }
        Some(reason)
    }

    fn insert_ban(&self, shard: &mut Shard, key: ClientKey, until_ns: u64, reason: BanReason) {
        shard.no_expiry_before_ns = shard.no_expiry_before_ns.min(until_ns);
        if shard.bans.insert(key, Ban { until_ns, reason }).is_none() {
            self.banned.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// How long `ip`'s client stays banned, or `None` if it is not banned.
    #[inline]
    pub fn is_banned(&self, ip: IpAddr) -> Option<Duration> {
        if self.banned.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let key = ClientKey::of(ip);
        let now = clock::now_ns();
        let mut shard = lock(self.shard(key));
        let until_ns = shard.bans.get(&key)?.until_ns;
        if until_ns > now {
            return Some(Duration::from_nanos(until_ns - now));
        }
        shard.bans.remove(&key);
        self.banned.fetch_sub(1, Ordering::Relaxed);
        None
    }

    /// Bans `ip`'s client (its /64 for IPv6) for `duration`, replacing any ban it had, whatever
    /// the cap. For the admin API; use [`BanReason::Manual`] for an operator's ban.
    pub fn ban(&self, ip: IpAddr, duration: Duration, reason: BanReason) {
        let key = ClientKey::of(ip);
        let until_ns = clock::now_ns().saturating_add(nanos(duration));
        let mut shard = lock(self.shard(key));
        self.insert_ban(&mut shard, key, until_ns, reason);
    }

    /// Lifts the ban of `ip`'s client and forgets its counts. Returns whether a ban in force was
    /// lifted.
    pub fn unban(&self, ip: IpAddr) -> bool {
        let key = ClientKey::of(ip);
        let now = clock::now_ns();
        let mut shard = lock(self.shard(key));
        shard.cur.remove(&key);
        shard.prev.remove(&key);
        match shard.bans.remove(&key) {
            Some(ban) => {
                self.banned.fetch_sub(1, Ordering::Relaxed);
                ban.until_ns > now
            }
            None => false,
        }
    }

    /// The bans in force, sorted by network.
    pub fn list(&self) -> Vec<BanEntry> {
        let now = clock::now_ns();
        let wall_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut out: Vec<BanEntry> = self
            .shards
            .iter()
            .flat_map(|s| {
                lock(s)
                    .bans
                    .iter()
                    .filter(|(_, b)| b.until_ns > now)
                    .map(|(key, b)| {
                        let remaining_ms = (b.until_ns - now).div_ceil(1_000_000);
                        BanEntry {
                            net: key.net(),
                            remaining_ms,
                            until_unix_ms: wall_ms.saturating_add(remaining_ms),
                            reason: b.reason.clone(),
                        }
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        out.sort_by_key(|e| e.net);
        out
    }

    /// Removes expired bans, moves every shard's counters to the current window and gives memory
    /// back. Returns how many bans expired. Call it about once a second.
    pub fn sweep(&self) -> usize {
        let now = clock::now_ns();
        let w = now / self.window_ns;
        let mut expired = 0;
        for s in self.shards.iter() {
            let mut shard = lock(s);
            shard.rotate(w);
            let n = shard.expire(now);
            expired += n;
            self.banned.fetch_sub(n, Ordering::Relaxed);
            shrink(&mut shard.cur);
            shrink(&mut shard.prev);
            shrink(&mut shard.bans);
        }
        expired
    }

    /// Counters for metrics.
    pub fn stats(&self) -> BanStats {
        let tracked = self
            .shards
            .iter()
            .map(|s| {
                let s = lock(s);
                s.cur.len() + s.prev.len()
            })
            .sum();
        BanStats {
            tracked,
            banned: self.banned.load(Ordering::Relaxed),
            untracked: self.untracked.load(Ordering::Relaxed),
            bans_issued: self.bans_issued.load(Ordering::Relaxed),
            bans_dropped: self.bans_dropped.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::advance;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn policy(max_requests: Option<u32>, max_errors: Option<u32>) -> BanPolicy {
        BanPolicy {
            window: Duration::from_secs(10),
            max_requests,
            max_errors,
            ban_for: Duration::from_secs(60),
            ..BanPolicy::default()
        }
    }

    /// Advances the paused clock to the start of the next window, so tests know where in the
    /// window they are.
    async fn align(window: Duration) {
        let w = nanos(window);
        let now = clock::now_ns();
        advance(Duration::from_nanos(w - now % w)).await;
    }

    #[test]
    fn status_sets() {
        let s = StatusSet::client_errors();
        assert!(s.contains(400) && s.contains(404) && s.contains(499));
        assert!(!s.contains(399) && !s.contains(500) && !s.contains(200) && !s.contains(0));
        assert!(!s.contains(u16::MAX));
        assert!(!s.without(429).contains(429));
        assert!(StatusSet::server_errors().contains(503));
        let s = StatusSet::from_ranges([404..=404, 500..=599]).unwrap();
        assert!(s.contains(404) && s.contains(502) && !s.contains(403));
        assert!(StatusSet::from_ranges([600..=700]).is_err());
        #[allow(clippy::reversed_empty_ranges)]
        let reversed = StatusSet::from_ranges([500..=400]);
        assert!(reversed.is_err());
        assert_eq!(StatusSet::default(), StatusSet::client_errors());
    }

    #[test]
    fn policies_that_cannot_work_are_refused() {
        for bad in [
            BanPolicy {
                window: Duration::ZERO,
                ..BanPolicy::default()
            },
            BanPolicy {
                ban_for: Duration::ZERO,
                ..BanPolicy::default()
            },
            policy(Some(0), None),
            policy(None, Some(0)),
            BanPolicy {
                max_tracked: 0,
                ..BanPolicy::default()
            },
        ] {
            assert!(matches!(BanTable::new(bad), Err(FilterError::Ban(_))));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_over_the_request_rate_is_banned_until_the_ban_ends() {
        let t = BanTable::new(policy(Some(5), None)).unwrap();
        align(Duration::from_secs(10)).await;
        let c = ip("192.0.2.1");
        for _ in 0..5 {
            assert_eq!(t.record(c, 200), None);
        }
        assert_eq!(t.is_banned(c), None);
        assert_eq!(t.record(c, 200), Some(BanReason::RequestRate));
        assert_eq!(t.is_banned(c), Some(Duration::from_secs(60)));
        assert_eq!(t.record(c, 200), None, "already banned");
        assert_eq!(t.is_banned(ip("192.0.2.2")), None, "others unaffected");

        advance(Duration::from_secs(59)).await;
        assert_eq!(t.is_banned(c), Some(Duration::from_secs(1)));
        advance(Duration::from_secs(1)).await;
        assert_eq!(t.is_banned(c), None);
        assert_eq!(t.stats().banned, 0, "expired on look-up");
        // Counts were reset by the ban: a fresh start.
        assert_eq!(t.record(c, 200), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_scanner_producing_404s_is_banned_for_errors() {
        let t = BanTable::new(policy(Some(1000), Some(3))).unwrap();
        align(Duration::from_secs(10)).await;
        let scanner = ip("203.0.113.9");
        let user = ip("198.51.100.1");
        for _ in 0..50 {
            assert_eq!(t.record(user, 200), None);
        }
        assert_eq!(t.record(user, 500), None, "5xx are not client errors");
        for _ in 0..3 {
            assert_eq!(t.record(scanner, 404), None);
        }
        assert_eq!(
            t.record(scanner, 200),
            None,
            "successes do not count as errors"
        );
        assert_eq!(t.record(scanner, 404), Some(BanReason::ErrorRate));
        assert!(t.is_banned(scanner).is_some());
        assert!(t.is_banned(user).is_none());
        advance(Duration::from_secs(60)).await;
        assert!(t.is_banned(scanner).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn the_previous_window_counts_by_its_overlap() {
        let t = BanTable::new(policy(Some(10), None)).unwrap();
        align(Duration::from_secs(10)).await;
        let c = ip("192.0.2.1");
        for _ in 0..10 {
            assert_eq!(t.record(c, 200), None);
        }
        // Halfway into the next window, the 10 earlier requests weigh 5.
        advance(Duration::from_secs(15)).await;
        for _ in 0..5 {
            assert_eq!(t.record(c, 200), None);
        }
        assert_eq!(t.record(c, 200), Some(BanReason::RequestRate));

        // Two windows later nothing is left of the earlier counts.
        let d = ip("192.0.2.2");
        for _ in 0..10 {
            assert_eq!(t.record(d, 200), None);
        }
        advance(Duration::from_secs(20)).await;
        for _ in 0..10 {
            assert_eq!(t.record(d, 200), None);
        }
        assert_eq!(t.record(d, 200), Some(BanReason::RequestRate));
    }

    #[tokio::test(start_paused = true)]
    async fn a_steady_client_under_the_limit_is_never_banned() {
        // 10 requests per 10 s window against a limit of 11: the estimate may run one over the
        // true count (see the module doc), never more.
        let t = BanTable::new(policy(Some(11), None)).unwrap();
        let c = ip("192.0.2.1");
        for _ in 0..1000 {
            assert_eq!(t.record(c, 200), None);
            advance(Duration::from_secs(1)).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_ipv6_client_is_counted_and_banned_by_its_slash_64() {
        let t = BanTable::new(policy(Some(3), None)).unwrap();
        align(Duration::from_secs(10)).await;
        for a in ["2001:db8:1:2::1", "2001:db8:1:2::2", "2001:db8:1:2:ffff::3"] {
            assert_eq!(t.record(ip(a), 200), None);
        }
        assert_eq!(
            t.record(ip("2001:db8:1:2:1234::9"), 200),
            Some(BanReason::RequestRate)
        );
        assert!(t.is_banned(ip("2001:db8:1:2:abcd::1")).is_some());
        assert!(t.is_banned(ip("2001:db8:1:3::1")).is_none());
        assert_eq!(t.list()[0].net.to_string(), "2001:db8:1:2::/64");
    }

    #[tokio::test(start_paused = true)]
    async fn manual_bans_list_and_unban() {
        let t = BanTable::new(BanPolicy::default()).unwrap();
        assert!(t.list().is_empty());
        t.ban(
            ip("192.0.2.9"),
            Duration::from_secs(30),
            BanReason::Manual("ticket 42".into()),
        );
        t.ban(
            ip("::ffff:192.0.2.1"),
            Duration::from_secs(10),
            BanReason::ErrorRate,
        );
        assert_eq!(t.is_banned(ip("192.0.2.1")), Some(Duration::from_secs(10)));
        let list = t.list();
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].net.to_string(), "192.0.2.1/32");
        assert_eq!(list[0].remaining_ms, 10_000);
        assert_eq!(list[1].reason, BanReason::Manual("ticket 42".into()));
        assert!(list[1].until_unix_ms > 1_600_000_000_000);

        // No thresholds: recording never bans.
        for _ in 0..1000 {
            assert_eq!(t.record(ip("198.51.100.1"), 404), None);
        }
        assert_eq!(t.stats().tracked, 0);

        advance(Duration::from_secs(10)).await;
        assert_eq!(t.list().len(), 1, "expired bans are not listed");
        assert!(t.unban(ip("192.0.2.9")));
        assert!(!t.unban(ip("192.0.2.9")));
        assert!(t.is_banned(ip("192.0.2.9")).is_none());
        assert_eq!(t.sweep(), 1, "the expired one");
        assert_eq!(t.stats().banned, 0);

        // A new ban replaces the old one.
        t.ban(
            ip("192.0.2.7"),
            Duration::from_secs(100),
            BanReason::Manual(String::new()),
        );
        t.ban(
            ip("192.0.2.7"),
            Duration::from_secs(5),
            BanReason::Manual(String::new()),
        );
        assert_eq!(t.is_banned(ip("192.0.2.7")), Some(Duration::from_secs(5)));
        assert_eq!(t.stats().banned, 1);
    }

    #[test]
    fn ban_entries_serialise_for_the_admin_api() {
        let e = BanEntry {
            net: "2001:db8::/64".parse().unwrap(),
            remaining_ms: 5,
            until_unix_ms: 7,
            reason: BanReason::Manual("abuse".into()),
        };
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"net":"2001:db8::/64","remaining_ms":5,"until_unix_ms":7,"reason":{"kind":"manual","note":"abuse"}}"#
        );
        assert_eq!(
            serde_json::to_string(&BanReason::ErrorRate).unwrap(),
            r#"{"kind":"error_rate"}"#
        );
        assert_eq!(BanReason::RequestRate.to_string(), "request rate");
        assert_eq!(BanReason::Manual("x".into()).to_string(), "manual: x");
    }

    #[tokio::test(start_paused = true)]
    async fn tracking_is_bounded_and_tracked_clients_keep_their_counts() {
        let t = BanTable::new(BanPolicy {
            max_tracked: 16,
            ..policy(Some(3), None)
        })
        .unwrap();
        align(Duration::from_secs(10)).await;
        for i in 0..10_000u32 {
            t.record(IpAddr::from(i.to_be_bytes()), 200);
        }
        let stats = t.stats();
        assert!(stats.tracked <= 16, "{stats:?}");
        assert!(stats.untracked >= 10_000 - 16, "{stats:?}");
        // Clients already tracked are still counted and banned despite the flood.
        let tracked = (0..10_000u32)
            .map(|i| IpAddr::from(i.to_be_bytes()))
            .find(|a| {
                let k = ClientKey::of(*a);
                lock(t.shard(k)).cur.contains_key(&k)
            })
            .unwrap();
        t.record(tracked, 200);
        t.record(tracked, 200);
        assert_eq!(t.record(tracked, 200), Some(BanReason::RequestRate));

        // Two windows later, the maps have rotated out; a sweep gives the memory back.
        advance(Duration::from_secs(20)).await;
        t.sweep();
        assert_eq!(t.stats().tracked, 0);
        assert!(t.record(ip("192.0.2.1"), 200).is_none());
        assert_eq!(t.stats().tracked, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn automatic_bans_are_bounded_and_room_comes_back_as_they_expire() {
        let t = BanTable::new(BanPolicy {
            max_bans: 16,
            ..policy(Some(1), None)
        })
        .unwrap();
        let mut reported = 0;
        let mut unstored = None;
        for i in 0..1000u32 {
            let a = IpAddr::from(i.to_be_bytes());
            t.record(a, 200);
            if t.record(a, 200).is_some() {
                reported += 1;
            }
            if t.is_banned(a).is_none() {
                unstored = Some(a);
            }
        }
        assert_eq!(reported, 1000, "every offender is reported, stored or not");
        let stats = t.stats();
        assert!(stats.banned <= 16, "{stats:?}");
        assert_eq!(stats.bans_issued, 1000);
        assert_eq!(stats.bans_dropped as usize, 1000 - stats.banned);
        // An offender whose ban found no room stays over the threshold: each request is reported.
        let a = unstored.unwrap();
        assert_eq!(t.record(a, 200), Some(BanReason::RequestRate));
        assert_eq!(t.record(a, 200), Some(BanReason::RequestRate));

        // Manual bans are not capped.
        for i in 0..100u32 {
            t.ban(
                IpAddr::from((0x0a00_0000 + i).to_be_bytes()),
                Duration::from_secs(1),
                BanReason::Manual(String::new()),
            );
        }
        assert!(t.stats().banned >= 100);

        // Once the bans expire, a full shard makes room for new ones without a sweep.
        advance(Duration::from_secs(61)).await;
        let late = ip("198.51.100.200");
        t.record(late, 200);
        assert_eq!(t.record(late, 200), Some(BanReason::RequestRate));
        assert!(t.is_banned(late).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn sweep_clears_expired_bans_so_checks_skip_the_lock_again() {
        let t = BanTable::new(policy(Some(1), None)).unwrap();
        t.ban(
            ip("192.0.2.1"),
            Duration::from_secs(1),
            BanReason::RequestRate,
        );
        t.ban(
            ip("2001:db8::1"),
            Duration::from_secs(2),
            BanReason::ErrorRate,
        );
        assert_eq!(t.stats().banned, 2);
        advance(Duration::from_secs(1)).await;
        assert_eq!(t.sweep(), 1);
        assert_eq!(t.stats().banned, 1);
        advance(Duration::from_secs(1)).await;
        assert_eq!(t.sweep(), 1);
        assert_eq!(t.banned.load(Ordering::Relaxed), 0);
        assert_eq!(t.is_banned(ip("192.0.2.1")), None);
    }
}

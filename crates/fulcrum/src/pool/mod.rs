//! Pools and their servers: identity, administrative and health state, live counters, and the
//! immutable snapshot that requests pick from.
//!
//! A [`Pool`] publishes a [`PoolSnapshot`] through `ArcSwap`: the request path loads it without a lock,
//! picks with its [`Selector`], and updates only atomics on the chosen [`Server`]. Changes (a server
//! added, removed, reweighted) build a new snapshot off the request path and swap it in.

mod stats;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

pub use stats::{ServerStats, LATENCY_BUCKETS};

use crate::balance::{Candidates, Loads, Selector, SelectorOptions, ServerSpec};
use crate::config::{Algorithm, HashKey, PassiveConfig, PoolConfig, ServerConfig};
use crate::health::{self, Health};
use crate::http::upstream::IdleConns;

/// Whether a server takes traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ServerState {
    /// Takes new and existing traffic.
    Up = 0,
    /// Failed its health checks: takes no traffic.
    Down = 1,
    /// Finishes what it has, takes no new clients.
    Draining = 2,
    /// Taken out by an operator: takes no traffic.
    Maint = 3,
}

impl ServerState {
    /// The name used by the admin API and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ServerState::Up => "up",
            ServerState::Down => "down",
            ServerState::Draining => "draining",
            ServerState::Maint => "maint",
        }
    }

    /// Every state, in the order of its discriminant.
    pub const ALL: [ServerState; 4] = [
        ServerState::Up,
        ServerState::Down,
        ServerState::Draining,
        ServerState::Maint,
    ];

    fn from_u8(v: u8) -> Self {
        Self::ALL
            .get(usize::from(v))
            .copied()
            .unwrap_or(ServerState::Down)
    }
}

/// One server of a pool.
#[derive(Debug)]
pub struct Server {
    /// Unique within its pool; defaults to the address.
    pub name: String,
    /// Where requests are sent.
    pub address: SocketAddr,
    /// Relative share of traffic for weighted algorithms.
    pub weight: u32,
    state: AtomicU8,
    /// Live counters (requests, failures, latency, in-flight).
    pub stats: ServerStats,
    /// Requests in flight on the whole pool: one counter shared by every server of a pool (made by
    /// [`Pool::new`]), kept next to `stats.active` by the `InFlight` guard, so that the bounded ring reads
    /// the pool's total in O(1) ([`Loads::total_in_flight`]).
    pub pool_active: Arc<AtomicI64>,
    /// Idle keep-alive connections to this server, owned by the HTTP layer (one set per worker thread).
    pub(crate) idle: IdleConns,
    /// Active and passive health, slow start.
    pub health: Health,
}

impl AsRef<Health> for Server {
    fn as_ref(&self) -> &Health {
        &self.health
    }
}

impl Server {
    /// A server in administrative state `up` with zeroed counters; `healthy` is its health before any
    /// check has run.
    pub fn new(cfg: &ServerConfig, workers: usize, healthy: bool) -> Self {
        Server {
            name: cfg.name.clone(),
            address: cfg.address,
            weight: cfg.weight,
            state: AtomicU8::new(ServerState::Up as u8),
            stats: ServerStats::default(),
            pool_active: Arc::default(),
            idle: IdleConns::new(workers),
            health: Health::new(healthy),
        }
    }

    /// The state shown to operators: the administrative state (`draining`, `maint`) if set, else `down`
    /// while health checks or passive detection hold the server out, else `up`.
    pub fn effective_state(&self) -> ServerState {
        match self.state() {
            ServerState::Up if !self.health.is_healthy() => ServerState::Down,
            other => other,
        }
    }

    /// Makes the server count its requests in `pool_active`, the counter shared by its pool (a server
    /// made with [`Server::new`] alone counts in a counter of its own).
    pub fn in_pool(mut self, pool_active: Arc<AtomicI64>) -> Self {
        self.pool_active = pool_active;
        self
    }

    /// The server's administrative state.
    #[inline]
    pub fn state(&self) -> ServerState {
        ServerState::from_u8(self.state.load(Ordering::Relaxed))
    }

    /// Sets the server's state.
    pub fn set_state(&self, state: ServerState) {
        self.state.store(state as u8, Ordering::Relaxed);
    }

    /// True when the server may take a new request: administratively up and healthy.
    #[inline]
    pub fn is_available(&self) -> bool {
        self.state() == ServerState::Up && self.health.is_healthy()
    }
}

/// Per-pool settings that the request path reads.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// How many more servers a failed connection attempt may try.
    pub retries: u32,
    /// Limit on establishing a connection to a server.
    pub connect_timeout: Duration,
    /// Limit on a server answering with its response head.
    pub response_timeout: Duration,
    /// What the hash algorithms hash, when the pool uses one.
    pub hash_key: Option<HashKey>,
    /// Passive health checking, when configured.
    pub passive: Option<PassiveConfig>,
    /// Ramp-up time of a server that comes (back) up.
    pub slow_start: Option<Duration>,
}

/// What a request picks from: the servers and the algorithm built over them, immutable once published.
#[derive(Debug)]
pub struct PoolSnapshot {
    /// The servers, in configuration order.
    pub servers: Vec<Arc<Server>>,
    /// The algorithm, built over `servers`.
    pub selector: Selector,
    /// For a hash algorithm: the `hash_fallback` algorithm for requests without a key (absent when that
    /// is weighted round robin, which the hash selectors do by themselves).
    pub fallback: Option<Selector>,
    /// Retry and timeout settings.
    pub settings: PoolSettings,
}

impl PoolSnapshot {
    /// Candidates in the order to try them; unavailable servers are skipped by [`PoolSnapshot::next_available`].
    /// `key` is the request's hash key (`balance::hash_key`), for the hash algorithms.
    #[inline]
    pub fn pick(&self, key: Option<u64>) -> Candidates {
        match (key, &self.fallback) {
            (None, Some(fallback)) => fallback.pick(None, self),
            _ => self.selector.pick(key, self),
        }
    }

    /// The next candidate that may take a request, if any.
    ///
    /// With `slow_start`, a server still ramping up is taken with a probability equal to its share of
    /// the ramp so far, so its traffic grows linearly whatever the algorithm; when every remaining
    /// candidate is ramping and none is drawn, the first of them is taken rather than none.
    #[inline]
    pub fn next_available(&self, candidates: &mut Candidates) -> Option<&Arc<Server>> {
        let mut ramping = None;
        for i in candidates.by_ref() {
            let server = &self.servers[i];
            if !server.is_available() {
                continue;
            }
            if let Some(window) = self.settings.slow_start {
                let share = server.health.slow_start_factor(window);
                if share < 1.0 && !chance(share) {
                    ramping.get_or_insert(server);
                    continue;
                }
            }
            return Some(server);
        }
        ramping
    }

    /// Reports the outcome of an exchange with `server` to passive health checking, if configured.
    #[inline]
    pub fn observe(&self, server: &Server, ok: bool) {
        if let Some(passive) = &self.settings.passive {
            health::observe(
                &server.health,
                ok,
                passive,
                &server.name,
                self.servers.iter().map(|s| &s.health),
            );
        }
    }
}

/// True with probability `p`, from a per-thread xorshift generator (slow-start draws need no more).
fn chance(p: f64) -> bool {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = const { Cell::new(0x2545_f491_4f6c_dd1d) };
    }
    let x = STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        x
    });
    ((x >> 11) as f64 / (1u64 << 53) as f64) < p
}

/// The selector reads live load straight from the servers' counters.
impl Loads for PoolSnapshot {
    #[inline]
    fn len(&self) -> usize {
        self.servers.len()
    }

    #[inline]
    fn in_flight(&self, i: usize) -> u64 {
        self.servers[i].stats.in_flight() as u64
    }

    #[inline]
    fn latency_ns(&self, i: usize) -> u64 {
        self.servers[i].stats.latency_estimate_ns()
    }

    #[inline]
    fn available(&self, i: usize) -> bool {
        self.servers[i].is_available()
    }

    #[inline]
    fn total_in_flight(&self) -> u64 {
        // Every server of a snapshot shares its pool's counter.
        self.servers
            .first()
            .map_or(0, |s| s.pool_active.load(Ordering::Relaxed).max(0) as u64)
    }
}

/// A named group of servers behind one algorithm.
#[derive(Debug)]
pub struct Pool {
    /// The pool's name from the configuration.
    pub name: String,
    /// The algorithm's name.
    pub algorithm: Algorithm,
    /// The algorithm for requests without a hash key (hash algorithms only).
    pub hash_fallback: Algorithm,
    options: SelectorOptions,
    snapshot: ArcSwap<PoolSnapshot>,
}

impl Pool {
    /// Builds a pool and its first snapshot from configuration.
    pub fn new(cfg: &PoolConfig, workers: usize) -> Self {
        let healthy = cfg.health_check.as_ref().is_none_or(|h| h.initial_up);
        let pool_active = Arc::new(AtomicI64::new(0));
        let servers: Vec<Arc<Server>> = cfg
            .servers
            .iter()
            .map(|s| Arc::new(Server::new(s, workers, healthy).in_pool(pool_active.clone())))
            .collect();
        let settings = PoolSettings {
            retries: cfg.retries,
            connect_timeout: cfg.connect_timeout,
            response_timeout: cfg.response_timeout,
            hash_key: cfg.hash_key.clone(),
            passive: cfg.passive.clone(),
            slow_start: cfg.slow_start,
        };
        let options = SelectorOptions {
            hash_balance_factor: cfg.hash_balance_factor,
            ..SelectorOptions::default()
        };
        let snapshot = Self::build(
            cfg.algorithm,
            cfg.hash_fallback,
            &options,
            servers,
            settings,
        );
        Pool {
            name: cfg.name.clone(),
            algorithm: cfg.algorithm,
            hash_fallback: cfg.hash_fallback,
            options,
            snapshot: ArcSwap::from_pointee(snapshot),
        }
    }

    /// Builds a snapshot: the selector (and fallback) over `servers`. Off the request path.
    fn build(
        algorithm: Algorithm,
        hash_fallback: Algorithm,
        options: &SelectorOptions,
        servers: Vec<Arc<Server>>,
        settings: PoolSettings,
    ) -> PoolSnapshot {
        let specs: Vec<ServerSpec<'_>> = servers
            .iter()
            .map(|s| ServerSpec {
                id: &s.name,
                weight: s.weight,
            })
            .collect();
        let selector = Selector::new(algorithm, &specs, options);
        // The hash selectors fall back to smooth weighted round robin by themselves.
        let fallback = (algorithm.uses_hash_key()
            && hash_fallback != Algorithm::WeightedRoundRobin)
            .then(|| Selector::new(hash_fallback, &specs, options));
        PoolSnapshot {
            selector,
            fallback,
            servers,
            settings,
        }
    }

    /// The selector options every snapshot of this pool is built with.
    pub fn selector_options(&self) -> &SelectorOptions {
        &self.options
    }

    /// The current snapshot; cheap, lock-free, and valid for as long as it is held.
    #[inline]
    pub fn snapshot(&self) -> arc_swap::Guard<Arc<PoolSnapshot>> {
        self.snapshot.load()
    }

    /// The current snapshot as an owned `Arc` (for long-lived holders such as the admin API).
    pub fn snapshot_full(&self) -> Arc<PoolSnapshot> {
        self.snapshot.load_full()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(weights: &[u32]) -> Pool {
        let text = format!(
            "[[listeners]]\nname=\"l\"\nbind=\"127.0.0.1:1\"\nprotocol=\"http\"\npool=\"p\"\n\
             [[pools]]\nname=\"p\"\nalgorithm=\"weighted_round_robin\"\nservers=[{}]\n",
            weights
                .iter()
                .enumerate()
                .map(|(i, w)| format!("{{address=\"127.0.0.1:{}\", weight={w}}}", 9000 + i))
                .collect::<Vec<_>>()
                .join(",")
        );
        let cfg = crate::config::parse(&text, "test.toml").expect("valid config");
        Pool::new(&cfg.pools[0], 1)
    }

    #[test]
    fn unavailable_servers_are_skipped_in_candidate_order() {
        let p = pool(&[1, 1, 1]);
        let snap = p.snapshot();
        snap.servers[0].set_state(ServerState::Down);
        snap.servers[1].set_state(ServerState::Draining);
        let mut c = Candidates::starting_at(0, 3);
        assert_eq!(snap.next_available(&mut c).unwrap().address.port(), 9002);
        assert!(snap.next_available(&mut c).is_none());
    }

    #[test]
    fn requests_in_flight_are_counted_per_server_and_per_pool() {
        let p = pool(&[1, 1, 1]);
        let snap = p.snapshot();
        let a = crate::http::body::InFlight::start(snap.servers[0].clone());
        let b = crate::http::body::InFlight::start(snap.servers[2].clone());
        let c = crate::http::body::InFlight::start(snap.servers[2].clone());
        assert_eq!(snap.in_flight(2), 2);
        assert_eq!(snap.total_in_flight(), 3);
        drop((a, b));
        assert_eq!(snap.total_in_flight(), 1);
        drop(c);
        assert_eq!(snap.total_in_flight(), 0);
    }

    #[test]
    fn state_round_trips() {
        let p = pool(&[1]);
        let s = &p.snapshot().servers[0];
        for st in ServerState::ALL {
            s.set_state(st);
            assert_eq!(s.state(), st);
        }
    }
}

//! Pools and their servers: identity, administrative and health state, live counters, and the
//! immutable snapshot that requests pick from.
//!
//! A [`Pool`] publishes a [`PoolSnapshot`] through `ArcSwap`: the request path loads it without a lock,
//! picks with its [`Selector`], and updates only atomics on the chosen [`Server`]. The pool owns its
//! membership: changes (a server added, removed, reweighted, a reload, a DNS answer) build a new
//! snapshot off the request path and swap it in; servers that did not change keep their identity
//! (health, counters, latency estimate, idle connections, stick-table entries, which name them).

mod stats;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

pub use stats::{ServerStats, FROM_SERVER, LATENCY_BUCKETS, TO_SERVER};

use crate::balance::{Candidates, Loads, Selector, SelectorOptions, ServerSpec};
use crate::config::{Algorithm, HashKey, PassiveConfig, PoolConfig, ServerConfig};
use crate::health::{self, Health};

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

/// Where a server came from: the configuration file, the admin API, or DNS discovery. A reload
/// makes the file authoritative for the servers it names and leaves the others alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `pools.servers` in the configuration file.
    Config,
    /// `POST /api/v1/pools/{pool}/servers`.
    Api,
    /// A DNS answer for this target (a server's host name or the pool's `dns_srv`).
    Dns(String),
}

impl Source {
    /// The name shown by the admin API.
    pub fn as_str(&self) -> &'static str {
        match self {
            Source::Config => "config",
            Source::Api => "api",
            Source::Dns(_) => "dns",
        }
    }
}

/// Unique identities of servers over the process's life (a removed server's id is never reused).
static NEXT_SERVER_ID: AtomicU64 = AtomicU64::new(1);

/// One server of a pool.
///
/// A server keeps its identity — counters, health, latency estimate, idle connections — for as long
/// as it stays in its pool with the same name and address: changes to other servers, to its weight, or
/// a reload that keeps it, never replace it.
#[derive(Debug)]
pub struct Server {
    /// Unique over the process's life.
    pub id: u64,
    /// Unique within its pool; defaults to the address.
    pub name: String,
    /// Where requests are sent.
    pub address: SocketAddr,
    weight: AtomicU32,
    /// Where the server came from.
    pub source: Source,
    state: AtomicU8,
    /// Being removed: draining until its requests finish or the deregistration delay passes.
    removing: AtomicBool,
    /// Live counters (requests, failures, latency, in-flight).
    pub stats: ServerStats,
    /// Requests in flight on the whole pool: one counter shared by every server of a pool (made by
    /// [`Pool::new`]), kept next to `stats.active` by the `InFlight` guard, so that the bounded ring reads
    /// the pool's total in O(1) ([`Loads::total_in_flight`]).
    pub pool_active: Arc<AtomicI64>,
    /// The pool's queue of requests waiting for a server under `max_connections_per_server`.
    pub queue: Arc<Queue>,
    /// Left its pool: its health checks stopped, protocol layers drop what they keep for it.
    retired: AtomicBool,
    /// Active and passive health, slow start.
    pub health: Health,
    /// Stops this server's active health checks (cancelled when it leaves its pool).
    checks: Mutex<Option<CancellationToken>>,
}

impl AsRef<Health> for Server {
    fn as_ref(&self) -> &Health {
        &self.health
    }
}

impl Server {
    /// A server in administrative state `up` with zeroed counters; `healthy` is its health before any
    /// check has run.
    pub fn new(cfg: &ServerConfig, healthy: bool) -> Self {
        Server {
            id: NEXT_SERVER_ID.fetch_add(1, Ordering::Relaxed),
            name: cfg.name.clone(),
            address: cfg.address,
            weight: AtomicU32::new(cfg.weight),
            source: Source::Config,
            state: AtomicU8::new(ServerState::Up as u8),
            removing: AtomicBool::new(false),
            stats: ServerStats::default(),
            pool_active: Arc::default(),
            queue: Arc::default(),
            retired: AtomicBool::new(false),
            health: Health::new(healthy),
            checks: Mutex::new(None),
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
    pub fn in_pool(mut self, pool_active: Arc<AtomicI64>, queue: Arc<Queue>) -> Self {
        self.pool_active = pool_active;
        self.queue = queue;
        self
    }

    /// The server's relative share of traffic for weighted algorithms.
    #[inline]
    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
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

    /// True while the server drains before its removal.
    pub fn is_removing(&self) -> bool {
        self.removing.load(Ordering::Relaxed)
    }

    /// True when the server may take a new request: administratively up and healthy.
    #[inline]
    pub fn is_available(&self) -> bool {
        self.state() == ServerState::Up && self.health.is_healthy()
    }

    /// Installs the token that stops this server's health checks, stopping the previous ones.
    pub fn set_checks(&self, token: Option<CancellationToken>) {
        let old = std::mem::replace(
            &mut *self.checks.lock().unwrap_or_else(|e| e.into_inner()),
            token,
        );
        if let Some(old) = old {
            old.cancel();
        }
    }

    /// True once the server has left its pool.
    #[inline]
    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Relaxed)
    }

    /// Stops what runs on behalf of the server once it has left its pool (its health checks) and
    /// marks it retired, so that protocol layers drop what they keep for it (HTTP's idle connections).
    fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
        self.set_checks(None);
        crate::http::upstream::forget(self.id);
        crate::http::client::forget(self.id);
    }
}

/// Keeps a request (or a tunnel, or a session) counted on its server and in its pool's total until it
/// is done: what least connections, bounded loads, saturation and drains read.
#[derive(Debug)]
pub struct InFlight {
    server: Arc<Server>,
}

impl InFlight {
    /// Counts one more request in flight on `server`.
    #[inline]
    pub fn start(server: Arc<Server>) -> Self {
        server.stats.active.fetch_add(1, Ordering::Relaxed);
        server.pool_active.fetch_add(1, Ordering::Relaxed);
        InFlight { server }
    }

    /// The server this request went to.
    pub fn server(&self) -> &Arc<Server> {
        &self.server
    }
}

impl Drop for InFlight {
    #[inline]
    fn drop(&mut self) {
        self.server.stats.active.fetch_sub(1, Ordering::Relaxed);
        self.server.pool_active.fetch_sub(1, Ordering::Relaxed);
        self.server.queue.release();
    }
}

/// Requests waiting for a server of a pool whose servers are all at `max_connections_per_server`
/// (HAProxy's queue): a request that finishes wakes one waiter.
#[derive(Debug, Default)]
pub struct Queue {
    waiting: std::sync::atomic::AtomicUsize,
    freed: tokio::sync::Notify,
    /// Requests that waited and got a server.
    pub served: AtomicU64,
    /// Requests refused: the queue was full, or they waited `queue_timeout` in vain.
    pub refused: AtomicU64,
}

impl Queue {
    /// Requests waiting now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    #[inline]
    fn release(&self) {
        if self.waiting.load(Ordering::Relaxed) > 0 {
            self.freed.notify_one();
        }
    }

    /// Joins the queue unless `max` requests wait already; the guard leaves it when dropped.
    pub fn join(&self, max: usize) -> Option<QueuePlace<'_>> {
        let mut n = self.waiting.load(Ordering::Relaxed);
        loop {
            if n >= max {
                return None;
            }
            match self
                .waiting
                .compare_exchange_weak(n, n + 1, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Some(QueuePlace(self)),
                Err(now) => n = now,
            }
        }
    }
}

/// A place in a pool's [`Queue`].
#[derive(Debug)]
pub struct QueuePlace<'a>(&'a Queue);

impl QueuePlace<'_> {
    /// A future that completes when a request finishes; enable it before checking for a free server
    /// so that a slot freed in between is not missed.
    pub fn freed(&self) -> tokio::sync::futures::Notified<'_> {
        self.0.freed.notified()
    }
}

impl Drop for QueuePlace<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
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
    /// Requests in flight per server, when limited.
    pub max_in_flight: Option<u32>,
    /// Requests that may wait for a server.
    pub max_queue: usize,
    /// How long a request may wait for a server.
    pub queue_timeout: Duration,
    /// TLS and/or HTTP/2 to the servers; `None`: plain HTTP/1.1 (fulcrum's own client).
    pub transport: Option<Arc<crate::http::client::Transport>>,
}

impl PoolSettings {
    fn of(cfg: &PoolConfig) -> Self {
        PoolSettings {
            retries: cfg.retries,
            connect_timeout: cfg.connect_timeout,
            response_timeout: cfg.response_timeout,
            hash_key: cfg.hash_key.clone(),
            passive: cfg.passive.clone(),
            slow_start: cfg.slow_start,
            max_in_flight: cfg.max_connections_per_server,
            max_queue: cfg.max_queue,
            queue_timeout: cfg.queue_timeout,
            transport: crate::http::client::Transport::of(cfg),
        }
    }
}

/// What a request picks from: the servers and the algorithm built over them, immutable once published.
#[derive(Debug)]
pub struct PoolSnapshot {
    /// The servers, in configuration order (then the ones added at run time, in order of arrival).
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
        self.pick_with(key, self)
    }

    /// [`PoolSnapshot::pick`] reading the load from `loads` instead of the servers' counters as they are
    /// now: the simulator (`crate::simulate`) passes the same counters with latency read in virtual time.
    #[inline]
    pub fn pick_with<L: Loads + ?Sized>(&self, key: Option<u64>, loads: &L) -> Candidates {
        match (key, &self.fallback) {
            (None, Some(fallback)) => fallback.pick(None, loads),
            _ => self.selector.pick(key, loads),
        }
    }

    /// The algorithm of this snapshot.
    pub fn algorithm(&self) -> Algorithm {
        self.selector.algorithm()
    }

    /// The server called `name`, with its index.
    pub fn find(&self, name: &str) -> Option<(usize, &Arc<Server>)> {
        self.servers
            .iter()
            .enumerate()
            .find(|(_, s)| s.name == name)
    }

    /// The next candidate that may take a request, if any.
    ///
    /// With `slow_start`, a server still ramping up is taken with a probability equal to its share of
    /// the ramp so far, so its traffic grows linearly whatever the algorithm; when every remaining
    /// candidate is ramping and none is drawn, the first of them is taken rather than none. A first
    /// candidate the selector already admitted (round robin's turns skip servers that may not take the
    /// request, so that their share is spread evenly instead of falling to an index neighbour) is not
    /// drawn again.
    #[inline]
    pub fn next_available(&self, candidates: &mut Candidates) -> Option<&Arc<Server>> {
        let mut ramping = None;
        let admitted = candidates.first_admitted();
        for i in candidates.by_ref() {
            let server = &self.servers[i];
            if !server.is_available() || self.at_limit(server) {
                continue;
            }
            if let (Some(window), false) = (self.settings.slow_start, admitted == Some(i)) {
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

    /// [`PoolSnapshot::next_available`] for a new sticky client under a load bound of `bound_pct`
    /// hundredths of the mean: a candidate whose requests in flight, this one included, would pass
    /// `ceil(bound × (all in flight + 1) / available servers)` is passed over (bounded-load placement);
    /// when every candidate is over, the least loaded of them is taken rather than none.
    pub fn next_available_bounded(
        &self,
        candidates: &mut Candidates,
        bound_pct: u32,
    ) -> Option<&Arc<Server>> {
        let (total, count) = self
            .servers
            .iter()
            .filter(|s| s.is_available())
            .fold((0u64, 0u64), |(t, n), s| {
                (t + s.stats.in_flight() as u64, n + 1)
            });
        if count == 0 {
            return self.next_available(candidates);
        }
        let cap = ((total + 1) * u64::from(bound_pct)).div_ceil(100 * count);
        let mut least: Option<&Arc<Server>> = None;
        while let Some(server) = self.next_available(candidates) {
            let load = server.stats.in_flight() as u64;
            if load < cap {
                return Some(server);
            }
            if least.is_none_or(|l| (l.stats.in_flight() as u64) > load) {
                least = Some(server);
            }
        }
        least
    }

    /// True when `server` has `max_connections_per_server` requests in flight.
    #[inline]
    pub fn at_limit(&self, server: &Server) -> bool {
        self.settings
            .max_in_flight
            .is_some_and(|max| server.stats.in_flight() >= i64::from(max))
    }

    /// True when some server may take requests but every such server is at its limit: a request
    /// should wait in the queue rather than get 503.
    pub fn saturated(&self) -> bool {
        self.settings.max_in_flight.is_some()
            && self.servers.iter().any(|s| s.is_available())
            && self
                .servers
                .iter()
                .filter(|s| s.is_available())
                .all(|s| self.at_limit(s))
    }

    /// The pool's queue.
    pub fn queue(&self) -> Option<&Arc<Queue>> {
        self.servers.first().map(|s| &s.queue)
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

    /// Requests in flight per available server against `target`: 1.0 means the pool runs at its
    /// target, above it needs more servers (for an autoscaler). Infinite when no server is available
    /// and requests are in flight, 0 when idle.
    pub fn saturation(&self, target: u32) -> f64 {
        let available = self.servers.iter().filter(|s| s.is_available()).count();
        let in_flight: i64 = self.servers.iter().map(|s| s.stats.in_flight()).sum();
        if in_flight == 0 {
            0.0
        } else if available == 0 {
            f64::INFINITY
        } else {
            in_flight as f64 / (available as f64 * f64::from(target.max(1)))
        }
    }
}

/// True with probability `p`, from a per-thread xorshift generator (slow-start draws need no more).
pub(crate) fn chance(p: f64) -> bool {
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
    fn admits(&self, i: usize) -> bool {
        let server = &self.servers[i];
        if !server.is_available() {
            return false;
        }
        match self.settings.slow_start {
            Some(window) => {
                let share = server.health.slow_start_factor(window);
                share >= 1.0 || chance(share)
            }
            None => true,
        }
    }

    #[inline]
    fn total_in_flight(&self) -> u64 {
        // Every server of a snapshot shares its pool's counter.
        self.servers
            .first()
            .map_or(0, |s| s.pool_active.load(Ordering::Relaxed).max(0) as u64)
    }
}

/// Why a membership change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MembershipError {
    /// No server of that name in the pool.
    #[error("pool `{pool}` has no server `{name}`")]
    UnknownServer { pool: String, name: String },
    /// A server of that name is already in the pool.
    #[error("pool `{pool}` already has a server named `{name}`")]
    DuplicateName { pool: String, name: String },
    /// A server with that address is already in the pool.
    #[error("pool `{pool}` already has a server at {address} (`{name}`)")]
    DuplicateAddress {
        pool: String,
        address: SocketAddr,
        name: String,
    },
}

/// What a change did to a pool's membership: the servers that joined and those that left (whose
/// health checks the caller starts and stops).
#[derive(Debug, Default)]
pub struct Applied {
    /// Servers that joined the pool.
    pub added: Vec<Arc<Server>>,
    /// Servers that left the pool.
    pub removed: Vec<Arc<Server>>,
}

/// A named group of servers behind one algorithm.
///
/// The pool owns its membership: every change (a server added, removed, reweighted; a reload; a DNS
/// answer) goes through a method here, which builds the next snapshot off the request path and swaps it
/// in, keeping the identity of every server that did not change. Changes are serialized by a mutex that
/// the request path never takes.
#[derive(Debug)]
pub struct Pool {
    /// The pool's name from the configuration.
    pub name: String,
    pool_active: Arc<AtomicI64>,
    queue: Arc<Queue>,
    snapshot: ArcSwap<PoolSnapshot>,
    /// The pool's configuration as last loaded (its `servers` as the file lists them).
    config: Mutex<PoolConfig>,
}

impl Pool {
    /// Builds a pool and its first snapshot from configuration.
    pub fn new(cfg: &PoolConfig) -> Self {
        let healthy = cfg.health_check.as_ref().is_none_or(|h| h.initial_up);
        let pool_active = Arc::new(AtomicI64::new(0));
        let queue = Arc::new(Queue::default());
        let servers: Vec<Arc<Server>> = cfg
            .servers
            .iter()
            .map(|s| Arc::new(Server::new(s, healthy).in_pool(pool_active.clone(), queue.clone())))
            .collect();
        let snapshot = build(cfg, servers);
        Pool {
            name: cfg.name.clone(),
            pool_active,
            queue,
            snapshot: ArcSwap::from_pointee(snapshot),
            config: Mutex::new(cfg.clone()),
        }
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

    /// The pool's configuration as last loaded.
    pub fn config(&self) -> PoolConfig {
        self.lock().clone()
    }

    fn lock(&self) -> MutexGuard<'_, PoolConfig> {
        self.config.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The server called `name`, if it is in the pool.
    pub fn server(&self, name: &str) -> Option<Arc<Server>> {
        self.snapshot().find(name).map(|(_, s)| s.clone())
    }

    fn unknown(&self, name: &str) -> MembershipError {
        MembershipError::UnknownServer {
            pool: self.name.clone(),
            name: name.to_owned(),
        }
    }

    /// A new server of this pool, in slow start when the pool has it.
    fn make_server(&self, cfg: &PoolConfig, s: &ServerConfig, source: Source) -> Arc<Server> {
        let healthy = cfg.health_check.as_ref().is_none_or(|h| h.initial_up);
        let mut server =
            Server::new(s, healthy).in_pool(self.pool_active.clone(), self.queue.clone());
        server.source = source;
        if cfg.slow_start.is_some() {
            server.health.start_ramp();
        }
        Arc::new(server)
    }

    fn publish(&self, cfg: &PoolConfig, servers: Vec<Arc<Server>>) {
        self.snapshot.store(Arc::new(build(cfg, servers)));
    }

    /// Adds a server (from the admin API or discovery). Refused when its name or address is taken.
    pub fn add(&self, s: &ServerConfig, source: Source) -> Result<Arc<Server>, MembershipError> {
        let cfg = self.lock();
        let current = self.snapshot_full();
        if let Some(taken) = current
            .servers
            .iter()
            .find(|x| x.name == s.name || x.address == s.address)
        {
            return Err(if taken.name == s.name {
                MembershipError::DuplicateName {
                    pool: self.name.clone(),
                    name: s.name.clone(),
                }
            } else {
                MembershipError::DuplicateAddress {
                    pool: self.name.clone(),
                    address: s.address,
                    name: taken.name.clone(),
                }
            });
        }
        let server = self.make_server(&cfg, s, source);
        let mut servers = current.servers.clone();
        servers.push(server.clone());
        self.publish(&cfg, servers);
        Ok(server)
    }

    /// Takes a server out of the pool now: new requests no longer see it; requests in flight on it
    /// finish, since they hold it.
    pub fn remove(&self, name: &str) -> Result<Arc<Server>, MembershipError> {
        let cfg = self.lock();
        let current = self.snapshot_full();
        let (i, server) = current.find(name).ok_or_else(|| self.unknown(name))?;
        let server = server.clone();
        let mut servers = current.servers.clone();
        servers.remove(i);
        self.publish(&cfg, servers);
        server.retire();
        Ok(server)
    }

    /// Marks a server for removal: it drains (no new clients, sticky ones stay) until the caller
    /// removes it. Returns the server.
    pub fn begin_removal(&self, name: &str) -> Result<Arc<Server>, MembershipError> {
        let server = self.server(name).ok_or_else(|| self.unknown(name))?;
        server.removing.store(true, Ordering::Relaxed);
        server.set_state(ServerState::Draining);
        Ok(server)
    }

    /// Cancels a pending removal (the server stays; its state is the caller's to set).
    pub fn cancel_removal(&self, name: &str) {
        if let Some(s) = self.server(name) {
            s.removing.store(false, Ordering::Relaxed);
        }
    }

    /// Changes a server's weight; the algorithm is rebuilt over the new weights.
    pub fn set_weight(&self, name: &str, weight: u32) -> Result<Arc<Server>, MembershipError> {
        let cfg = self.lock();
        let current = self.snapshot_full();
        let (_, server) = current.find(name).ok_or_else(|| self.unknown(name))?;
        server.weight.store(weight.max(1), Ordering::Relaxed);
        self.publish(&cfg, current.servers.clone());
        Ok(server.clone())
    }

    /// Applies a new configuration of the pool (a reload): its settings and algorithm, and the servers
    /// the file lists. A listed server that is already in the pool with the same name and address keeps
    /// its identity (and its administrative state; its weight becomes the file's); the others join, in
    /// slow start. Servers that came from the file and are no longer listed leave; servers added through
    /// the API stay unless the file now names them; servers found by DNS stay while their DNS name is
    /// still in the file.
    pub fn reconfigure(&self, new: &PoolConfig) -> Applied {
        let mut cfg = self.lock();
        let current = self.snapshot_full();
        let mut applied = Applied::default();
        let mut servers = Vec::with_capacity(new.servers.len());
        for s in &new.servers {
            match current
                .servers
                .iter()
                .find(|x| x.name == s.name && x.address == s.address)
            {
                Some(kept) => {
                    kept.weight.store(s.weight, Ordering::Relaxed);
                    servers.push(kept.clone());
                }
                None => {
                    let server = self.make_server(new, s, Source::Config);
                    applied.added.push(server.clone());
                    servers.push(server);
                }
            }
        }
        for old in current.servers.iter() {
            let kept = servers.iter().any(|s| Arc::ptr_eq(s, old));
            let renamed = new
                .servers
                .iter()
                .any(|s| s.name == old.name || s.address == old.address);
            if kept {
                continue;
            }
            // A DNS server whose target left the file goes with it.
            let orphan = match &old.source {
                Source::Dns(target) => {
                    !new.dns_servers.iter().any(|d| &d.name == target)
                        && new.dns_srv.as_ref() != Some(target)
                }
                _ => false,
            };
            if old.source == Source::Config || renamed || orphan {
                applied.removed.push(old.clone());
            } else {
                servers.push(old.clone());
            }
        }
        *cfg = new.clone();
        self.publish(&cfg, servers);
        for s in &applied.removed {
            s.retire();
        }
        applied
    }

    /// Replaces the servers that DNS target `source` produced by `found` (a new DNS answer): servers
    /// still answered keep their identity, new ones join in slow start, the others leave.
    pub fn replace_discovered(&self, source: &str, found: &[ServerConfig]) -> Applied {
        let cfg = self.lock();
        let current = self.snapshot_full();
        let tag = Source::Dns(source.to_owned());
        let mut applied = Applied::default();
        let mut reweighted = false;
        let mut servers: Vec<Arc<Server>> = Vec::with_capacity(current.servers.len());
        for old in current.servers.iter() {
            let still = found
                .iter()
                .find(|s| s.name == old.name && s.address == old.address);
            match (old.source == tag, still) {
                (false, _) => servers.push(old.clone()),
                (true, Some(s)) => {
                    reweighted |= old.weight.swap(s.weight, Ordering::Relaxed) != s.weight;
                    servers.push(old.clone());
                }
                (true, None) => applied.removed.push(old.clone()),
            }
        }
        for s in found {
            let taken = servers
                .iter()
                .any(|x| x.name == s.name || x.address == s.address);
            if !taken {
                let server = self.make_server(&cfg, s, tag.clone());
                applied.added.push(server.clone());
                servers.push(server);
            }
        }
        if applied.added.is_empty() && applied.removed.is_empty() && !reweighted {
            return applied;
        }
        self.publish(&cfg, servers);
        for s in &applied.removed {
            s.retire();
        }
        applied
    }

    /// Stops everything that runs for the pool's servers (the pool itself is going away).
    pub fn retire(&self) {
        for s in self.snapshot().servers.iter() {
            s.retire();
        }
    }
}

/// Builds a snapshot: the selector (and fallback) over `servers`. Off the request path.
fn build(cfg: &PoolConfig, servers: Vec<Arc<Server>>) -> PoolSnapshot {
    let options = SelectorOptions {
        hash_balance_factor: cfg.hash_balance_factor,
        // Each pool draws its own random sequence (random, p2c, tie-breaks).
        seed: crate::balance::hash_key(format!("fulcrum-pool/{}", cfg.name).as_bytes()),
        ..SelectorOptions::default()
    };
    let specs: Vec<ServerSpec<'_>> = servers
        .iter()
        .map(|s| ServerSpec {
            id: &s.name,
            weight: s.weight(),
        })
        .collect();
    let selector = Selector::new(cfg.algorithm, &specs, &options);
    // The hash selectors fall back to smooth weighted round robin by themselves.
    let fallback = (cfg.algorithm.uses_hash_key()
        && cfg.hash_fallback != Algorithm::WeightedRoundRobin)
        .then(|| Selector::new(cfg.hash_fallback, &specs, &options));
    PoolSnapshot {
        selector,
        fallback,
        servers,
        settings: PoolSettings::of(cfg),
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
        Pool::new(&cfg.pools[0])
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
        let a = InFlight::start(snap.servers[0].clone());
        let b = InFlight::start(snap.servers[2].clone());
        let c = InFlight::start(snap.servers[2].clone());
        assert_eq!(snap.in_flight(2), 2);
        assert_eq!(snap.total_in_flight(), 3);
        drop((a, b));
        assert_eq!(snap.total_in_flight(), 1);
        drop(c);
        assert_eq!(snap.total_in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn servers_added_at_run_time_ramp_up_and_keep_the_others_identity() {
        let text = "[[listeners]]\nname=\"l\"\nbind=\"127.0.0.1:1\"\nprotocol=\"http\"\npool=\"p\"\n\
                    [[pools]]\nname=\"p\"\nslow_start=\"10s\"\nservers=[{address=\"127.0.0.1:9000\"}]\n";
        let cfg = crate::config::parse(text, "test.toml").expect("valid config");
        let p = Pool::new(&cfg.pools[0]);
        let first = p.snapshot().servers[0].clone();
        let added = p
            .add(
                &ServerConfig {
                    name: "new".into(),
                    address: "127.0.0.1:9001".parse().unwrap(),
                    weight: 1,
                },
                Source::Api,
            )
            .unwrap();
        let window = Duration::from_secs(10);
        assert_eq!(first.health.slow_start_factor(window), 1.0);
        assert_eq!(
            added.health.slow_start_factor(window),
            0.01,
            "a new server starts with a trickle"
        );
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(added.health.slow_start_factor(window), 0.5);
        assert!(
            Arc::ptr_eq(&first, &p.snapshot().servers[0]),
            "the first server kept its identity"
        );
        assert_eq!(p.snapshot().servers.len(), 2);
        // Duplicates are refused; removal retires.
        let dup = p.add(
            &ServerConfig {
                name: "other".into(),
                address: "127.0.0.1:9001".parse().unwrap(),
                weight: 1,
            },
            Source::Api,
        );
        assert!(
            matches!(dup, Err(MembershipError::DuplicateAddress { .. })),
            "{dup:?}"
        );
        let removed = p.remove("new").unwrap();
        assert!(removed.is_retired() && p.server("new").is_none());
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

//! Session clustering: every instance keeps every session in memory and
//! replicates each write to its peers over HTTP.
//!
//! # How it works
//!
//! - **Versions.** Each write (login, update, logout) is stamped with a hybrid
//!   logical clock: wall-clock milliseconds, a counter for writes within the
//!   same millisecond (or while the wall clock lags a version already seen),
//!   and the writer's node id. Versions are totally ordered, so every instance
//!   keeps the same winner for concurrent writes: the last writer wins
//!   (Kulkarni et al., "Logical Physical Clocks", OPODIS 2014).
//! - **Deletes** leave a tombstone for [`TOMBSTONE_TTL`], so a late copy of an
//!   older write cannot bring a logged-out session back.
//! - **Push.** Every write is queued for each peer (at most [`QUEUE_CAPACITY`]
//!   writes; when full the oldest is dropped, counted, and the peer later gets
//!   a full resync instead, as a newly added peer does). One task per peer sends batches with
//!   `POST /_cluster/replicate` and an empty batch each
//!   [`HEARTBEAT_INTERVAL`] when idle, which tells whether the peer is up.
//! - **Pull on miss.** A read of a session this instance does not know asks
//!   every peer that is not known to be down (`GET /_cluster/session/{id}`),
//!   waiting at most [`PULL_TIMEOUT`] in all, and keeps the newest answer. It
//!   covers a read that arrives before the write's push.
//! - **Join.** A starting instance asks its peers, one after the other, for a
//!   snapshot (`GET /_cluster/snapshot`) and takes the first, so it answers
//!   from memory at once. The snapshot also lists the peer's peers. And an
//!   instance that adds a peer (a new one, or one just listed in the file or
//!   the pool) first sends it everything it holds, then its new writes: a
//!   write made anywhere before the newcomer was known still reaches it.
//! - **Membership.** Peers come from `--peers`, a file re-read every
//!   `--peers-refresh`, and fulcrum's admin API (a pool's servers), all read
//!   again at every refresh. With `--peers` alone, an instance that hears
//!   from an unknown one (it sends its address in [`ADDR_HEADER`]) adds it as
//!   a *learned* peer, dropped after [`LEARNED_PEER_TIMEOUT`] unreachable; a
//!   file or a pool is taken as the whole membership. An address that turns
//!   out to be this instance (same node id) is skipped.
//!
//! The costs: each instance holds every session (memory grows with
//! instances × sessions), each write is sent once per peer, and a read on
//! another instance sees a write only after the push, or after a pull.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt::{self, Write as _};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{FuturesUnordered, StreamExt as _};
use http::header::{AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest as _, Sha256};
use tokio::sync::Notify;
use tokio::task::AbortHandle;

/// How often the peers file and the admin API are read by default.
pub const DEFAULT_PEERS_REFRESH: Duration = Duration::from_secs(2);

/// Writes queued for one peer before the oldest are dropped.
pub const QUEUE_CAPACITY: usize = 10_000;

/// How long a deleted session's tombstone is kept.
pub const TOMBSTONE_TTL: Duration = Duration::from_secs(5 * 60);

/// Longest a read waits, in all, for its peers' answers on a local miss.
pub const PULL_TIMEOUT: Duration = Duration::from_millis(300);

/// An idle peer gets an empty batch this often.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);

/// A learned peer unreachable this long is forgotten.
pub const LEARNED_PEER_TIMEOUT: Duration = Duration::from_secs(60);

/// Request header with the sender's node id (answers carry the answerer's).
pub const NODE_HEADER: &str = "x-fulcrum-cluster-node";

/// Request header with the address the sender is reached at.
pub const ADDR_HEADER: &str = "x-fulcrum-cluster-addr";

/// Writes per `POST /_cluster/replicate`.
const BATCH_MAX: usize = 500;
/// About the most bytes of writes per `POST /_cluster/replicate`.
const BATCH_BYTES: usize = 1 << 20;
/// Largest `POST /_cluster/replicate` body accepted: a batch holds at least
/// one write, and a user name comes from a login body (at most 2 MiB).
const REPLICATE_LIMIT: usize = 16 << 20;
/// Longest wait for one push, a pool listing or a session lookup's connection.
const PUSH_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait for a whole snapshot.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(10);
/// First and last pause between failed pushes to a peer.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);
/// Largest answer read from a peer or the admin API.
const MAX_ANSWER_BYTES: usize = 256 << 20;
/// Upper bounds of the replication lag histogram, in seconds.
const LAG_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// How an instance finds its peers and authenticates to them
/// (`--sessions cluster`).
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// Peers given directly, as `host:port`.
    pub peers: Vec<String>,
    /// A file listing peers (`host:port`, one per line or comma separated,
    /// `#` comments), re-read every [`ClusterConfig::refresh`].
    pub peers_file: Option<PathBuf>,
    /// A fulcrum admin API pool URL (`http://ADMIN/api/v1/pools/NAME`) whose
    /// servers are the peers, re-read every [`ClusterConfig::refresh`].
    pub peers_from: Option<String>,
    /// How often the peers file and the admin API are read.
    pub refresh: Duration,
    /// When set, `/_cluster/*` requests must carry `Authorization: Bearer
    /// SECRET`, and this instance sends it to its peers.
    pub secret: Option<String>,
    /// The `host:port` peers reach this instance at; defaults to the listening
    /// address unless that is a wildcard (`0.0.0.0`, `[::]`).
    pub advertise: Option<String>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            peers: Vec::new(),
            peers_file: None,
            peers_from: None,
            refresh: DEFAULT_PEERS_REFRESH,
            secret: None,
            advertise: None,
        }
    }
}

impl fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("peers", &self.peers)
            .field("peers_file", &self.peers_file)
            .field("peers_from", &self.peers_from)
            .field("refresh", &self.refresh)
            .field("secret", &self.secret.as_ref().map(|_| "***"))
            .field("advertise", &self.advertise)
            .finish()
    }
}

impl ClusterConfig {
    /// Checks what can be checked before starting: the `--peers-from` URL
    /// scheme, a non-zero refresh, a non-empty secret.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(url) = &self.peers_from {
            if !url.starts_with("http://") {
                return Err(format!(
                    "invalid --peers-from {url:?}: expected http://ADMIN/api/v1/pools/NAME"
                ));
            }
        }
        if self.refresh.is_zero() {
            return Err("--peers-refresh must be more than 0".to_owned());
        }
        if self.secret.as_deref() == Some("") {
            return Err("the cluster secret is empty".to_owned());
        }
        Ok(())
    }
}

/// `host:port` entries of a peers file or `--peers` value: split on commas and
/// whitespace, `#` starts a comment.
pub fn parse_peer_list(text: &str) -> Vec<String> {
    text.lines()
        .map(|line| line.split('#').next().unwrap_or(""))
        .flat_map(|line| line.split([',', ' ', '\t']))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(normalize_addr)
        .collect()
}

/// One spelling per address: a socket address is written as Rust prints it.
fn normalize_addr(addr: &str) -> String {
    let addr = addr
        .trim()
        .trim_start_matches("http://")
        .trim_end_matches('/');
    addr.parse::<SocketAddr>()
        .map_or_else(|_| addr.to_owned(), |a| a.to_string())
}

/// A write's version: hybrid logical clock milliseconds, counter, node id.
/// Compared in that order, so any two writes have a winner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
struct Version(u64, u32, u64);

/// The hybrid logical clock: never behind the wall clock nor any version seen.
#[derive(Debug, Default)]
struct Hlc {
    ms: u64,
    counter: u32,
}

impl Hlc {
    fn tick(&mut self, now_ms: u64, node: u64) -> Version {
        if now_ms > self.ms {
            self.ms = now_ms;
            self.counter = 0;
        } else {
            self.counter += 1;
        }
        Version(self.ms, self.counter, node)
    }

    fn observe(&mut self, v: Version) {
        if (v.0, v.1) > (self.ms, self.counter) {
            self.ms = v.0;
            self.counter = v.1;
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One replicated write; `user: None` is a delete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct WriteRecord {
    id: String,
    user: Option<String>,
    v: Version,
}

/// The body of `POST /_cluster/replicate`.
#[derive(Serialize, Deserialize)]
struct Replicate {
    writes: Vec<WriteRecord>,
    /// A full resync or snapshot: old writes, not counted in the lag.
    #[serde(default)]
    resync: bool,
}

/// The answer of `GET /_cluster/snapshot`.
#[derive(Serialize, Deserialize)]
struct Snapshot {
    node: String,
    peers: Vec<String>,
    writes: Vec<WriteRecord>,
}

#[derive(Debug)]
struct Entry {
    user: Option<String>,
    version: Version,
}

/// The sessions (and tombstones) this instance holds.
#[derive(Debug, Default)]
struct Data {
    entries: HashMap<String, Entry>,
    live: usize,
    /// Live session ids in the order they appeared, for eviction; may hold
    /// ids deleted since.
    order: VecDeque<String>,
    /// Tombstones in the order they were written, with when they expire.
    tombstones: VecDeque<(String, Instant, Version)>,
}

impl Data {
    /// Applies `w` if it is newer than what is held; tells whether it was.
    fn apply(&mut self, w: &WriteRecord, capacity: usize) -> bool {
        let was_live = match self.entries.get(&w.id) {
            Some(e) if e.version >= w.v => return false,
            Some(e) => e.user.is_some(),
            None => false,
        };
        self.entries.insert(
            w.id.clone(),
            Entry {
                user: w.user.clone(),
                version: w.v,
            },
        );
        let now = Instant::now();
        match (&w.user, was_live) {
            (Some(_), false) => {
                self.live += 1;
                self.order.push_back(w.id.clone());
            }
            (Some(_), true) => {}
            (None, was_live) => {
                if was_live {
                    self.live -= 1;
                }
                self.tombstones
                    .push_back((w.id.clone(), now + TOMBSTONE_TTL, w.v));
            }
        }
        self.purge(now, capacity);
        true
    }

    /// Drops expired (or too many) tombstones and evicts the oldest sessions
    /// beyond `capacity`. Eviction is local: peers keep their copies.
    fn purge(&mut self, now: Instant, capacity: usize) {
        while let Some((_, expires, _)) = self.tombstones.front() {
            if *expires > now && self.tombstones.len() <= capacity {
                break;
            }
            let (id, _, v) = self.tombstones.pop_front().expect("front exists");
            if self
                .entries
                .get(&id)
                .is_some_and(|e| e.user.is_none() && e.version == v)
            {
                self.entries.remove(&id);
            }
        }
        while self.live > capacity {
            let Some(id) = self.order.pop_front() else {
                break;
            };
            if self.entries.get(&id).is_some_and(|e| e.user.is_some()) {
                self.entries.remove(&id);
                self.live -= 1;
            }
        }
        if self.order.len() > 2 * capacity.max(self.live) {
            let entries = &self.entries;
            self.order
                .retain(|id| entries.get(id).is_some_and(|e| e.user.is_some()));
        }
    }

    fn records(&self) -> Vec<WriteRecord> {
        self.entries
            .iter()
            .map(|(id, e)| WriteRecord {
                id: id.clone(),
                user: e.user.clone(),
                v: e.version,
            })
            .collect()
    }
}

/// What this instance knows of a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PeerStatus {
    /// Not contacted yet.
    Unknown,
    Up,
    Down,
    /// The address is this instance's own.
    Itself,
}

impl PeerStatus {
    fn as_str(self) -> &'static str {
        match self {
            PeerStatus::Unknown => "unknown",
            PeerStatus::Up => "up",
            PeerStatus::Down => "down",
            PeerStatus::Itself => "self",
        }
    }
}

#[derive(Debug)]
struct Peer {
    addr: String,
    notify: Notify,
    state: Mutex<PeerState>,
    task: Mutex<Option<AbortHandle>>,
}

#[derive(Debug)]
struct PeerState {
    queue: VecDeque<WriteRecord>,
    status: PeerStatus,
    /// Listed by `--peers`, the peers file or the admin API (else learned).
    configured: bool,
    node: Option<u64>,
    dropped: u64,
    /// Writes were dropped: send everything instead of the queue.
    resync: bool,
    removed: bool,
    last_error: Option<String>,
    down_since: Option<Instant>,
    messages_sent: u64,
    bytes_sent: u64,
}

impl Peer {
    fn lock(&self) -> MutexGuard<'_, PeerState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn status(&self) -> PeerStatus {
        self.lock().status
    }

    fn enqueue(&self, w: &WriteRecord, metrics: &Metrics) {
        let mut st = self.lock();
        if st.removed || st.status == PeerStatus::Itself {
            return;
        }
        if st.resync {
            // Everything goes in the resync anyway.
        } else {
            if st.queue.len() >= QUEUE_CAPACITY {
                st.queue.pop_front();
                st.dropped += 1;
                st.resync = true;
                metrics.queue_dropped.fetch_add(1, Ordering::Relaxed);
            }
            st.queue.push_back(w.clone());
        }
        drop(st);
        self.notify.notify_one();
    }

    fn mark_up(&self, node: Option<u64>) {
        let mut st = self.lock();
        if st.status != PeerStatus::Up {
            tracing::info!(peer = %self.addr, "cluster peer up");
        }
        st.status = PeerStatus::Up;
        st.node = node.or(st.node);
        st.down_since = None;
        st.last_error = None;
    }

    fn mark_down(&self, err: &str) {
        let mut st = self.lock();
        if st.status != PeerStatus::Down {
            tracing::warn!(peer = %self.addr, "cluster peer unreachable: {err}");
            st.down_since = Some(Instant::now());
        }
        st.status = PeerStatus::Down;
        st.last_error = Some(err.to_owned());
    }

    fn mark_itself(&self) {
        let mut st = self.lock();
        st.status = PeerStatus::Itself;
        st.queue.clear();
        st.resync = false;
    }

    fn stop(&self) {
        self.lock().removed = true;
        if let Some(task) = self
            .task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            task.abort();
        }
    }
}

/// Counters behind `GET /metrics`.
#[derive(Debug, Default)]
struct Metrics {
    local_writes: AtomicU64,
    messages_sent: AtomicU64,
    bytes_sent: AtomicU64,
    writes_sent: AtomicU64,
    send_failures: AtomicU64,
    bytes_received: AtomicU64,
    writes_applied: AtomicU64,
    writes_stale: AtomicU64,
    queue_dropped: AtomicU64,
    pull_hits: AtomicU64,
    pull_misses: AtomicU64,
    snapshots_served: AtomicU64,
    lag_buckets: [AtomicU64; LAG_BUCKETS.len()],
    lag_count: AtomicU64,
    lag_sum_ms: AtomicU64,
    lag_last_ms: AtomicU64,
    lag_max_ms: AtomicU64,
}

impl Metrics {
    fn observe_lag(&self, ms: u64) {
        let secs = ms as f64 / 1000.0;
        for (bucket, le) in self.lag_buckets.iter().zip(LAG_BUCKETS) {
            if secs <= le {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.lag_count.fetch_add(1, Ordering::Relaxed);
        self.lag_sum_ms.fetch_add(ms, Ordering::Relaxed);
        self.lag_last_ms.store(ms, Ordering::Relaxed);
        self.lag_max_ms.fetch_max(ms, Ordering::Relaxed);
    }
}

/// One instance of the cluster: its sessions, its peers and its tasks.
pub(crate) struct ClusterNode {
    id: u64,
    cfg: ClusterConfig,
    advertise: Option<String>,
    secret_digest: Option<[u8; 32]>,
    bearer: Option<HeaderValue>,
    capacity: usize,
    clock: Mutex<Hlc>,
    data: Mutex<Data>,
    peers: Mutex<HashMap<String, Arc<Peer>>>,
    client: Client<HttpConnector, Body>,
    metrics: Metrics,
    joined_from: Mutex<Option<String>>,
    membership: Mutex<Option<AbortHandle>>,
}

impl fmt::Debug for ClusterNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterNode")
            .field("id", &format_args!("{:016x}", self.id))
            .field("advertise", &self.advertise)
            .finish_non_exhaustive()
    }
}

impl Drop for ClusterNode {
    fn drop(&mut self) {
        if let Some(task) = self
            .membership
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            task.abort();
        }
        for peer in self
            .peers
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
        {
            peer.stop();
        }
    }
}

impl ClusterNode {
    /// A node holding at most `capacity` live sessions; `local` is the
    /// listening address, advertised to peers unless `cfg.advertise` is set.
    /// Its tasks start with [`ClusterNode::start`].
    pub(crate) fn new(cfg: ClusterConfig, local: Option<SocketAddr>, capacity: usize) -> Self {
        let advertise = cfg.advertise.as_deref().map(normalize_addr).or_else(|| {
            local
                .filter(|a| !a.ip().is_unspecified())
                .map(|a| a.to_string())
        });
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(PUSH_TIMEOUT));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        let bearer = cfg
            .secret
            .as_ref()
            .and_then(|s| HeaderValue::from_str(&format!("Bearer {s}")).ok())
            .map(|mut v| {
                v.set_sensitive(true);
                v
            });
        Self {
            id: rand::random::<u64>(),
            secret_digest: cfg.secret.as_ref().map(|s| Sha256::digest(s).into()),
            bearer,
            advertise,
            cfg,
            capacity: capacity.max(1),
            clock: Mutex::default(),
            data: Mutex::default(),
            peers: Mutex::default(),
            client,
            metrics: Metrics::default(),
            joined_from: Mutex::new(None),
            membership: Mutex::new(None),
        }
    }

    /// Starts reading the membership, joining (snapshot) and pushing. Needs a
    /// tokio runtime; without one the node only answers locally.
    pub(crate) fn start(self: &Arc<Self>) {
        if tokio::runtime::Handle::try_current().is_err() {
            tracing::error!("session clustering needs a tokio runtime: replication is off");
            return;
        }
        let task = tokio::spawn(membership_loop(Arc::downgrade(self)));
        *self
            .membership
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(task.abort_handle());
    }

    fn node_id(&self) -> String {
        format!("{:016x}", self.id)
    }

    fn data(&self) -> MutexGuard<'_, Data> {
        self.data.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn peers(&self) -> MutexGuard<'_, HashMap<String, Arc<Peer>>> {
        self.peers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn peer_list(&self) -> Vec<Arc<Peer>> {
        let mut list: Vec<_> = self.peers().values().cloned().collect();
        list.sort_by(|a, b| a.addr.cmp(&b.addr));
        list
    }

    /// Live sessions held.
    pub(crate) fn len(&self) -> usize {
        self.data().live
    }

    /// Applies a write received from a peer (or pulled); advances the clock.
    fn apply_remote(&self, w: &WriteRecord) -> bool {
        self.clock
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .observe(w.v);
        let applied = self.data().apply(w, self.capacity);
        if applied {
            self.metrics.writes_applied.fetch_add(1, Ordering::Relaxed);
        } else {
            self.metrics.writes_stale.fetch_add(1, Ordering::Relaxed);
        }
        applied
    }

    /// A local write: versioned, applied, queued for every peer.
    pub(crate) fn write(&self, id: &str, user: Option<String>) {
        let v = self
            .clock
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .tick(now_ms(), self.id);
        let w = WriteRecord {
            id: id.to_owned(),
            user,
            v,
        };
        self.data().apply(&w, self.capacity);
        self.metrics.local_writes.fetch_add(1, Ordering::Relaxed);
        for peer in self.peer_list() {
            peer.enqueue(&w, &self.metrics);
        }
    }

    /// The user of session `id`: held here, or else pulled from the peers.
    pub(crate) async fn get(&self, id: &str) -> Option<String> {
        let held = self.data().entries.get(id).map(|e| e.user.clone());
        if let Some(user) = held {
            return user;
        }
        let pulled = self.pull(id).await;
        match pulled {
            Some(w) => {
                self.apply_remote(&w);
                if w.user.is_some() {
                    self.metrics.pull_hits.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.metrics.pull_misses.fetch_add(1, Ordering::Relaxed);
                }
                w.user
            }
            None => {
                self.metrics.pull_misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Asks every peer not known to be down for session `id`, for at most
    /// [`PULL_TIMEOUT`] in all; the newest answer wins.
    async fn pull(&self, id: &str) -> Option<WriteRecord> {
        let peers: Vec<_> = self
            .peer_list()
            .into_iter()
            .filter(|p| matches!(p.status(), PeerStatus::Unknown | PeerStatus::Up))
            .collect();
        if peers.is_empty() {
            return None;
        }
        let mut pending: FuturesUnordered<_> = peers
            .iter()
            .map(|peer| self.fetch_session(peer, id))
            .collect();
        let mut deadline = pin!(tokio::time::sleep(PULL_TIMEOUT));
        let mut best: Option<WriteRecord> = None;
        loop {
            tokio::select! {
                () = &mut deadline => break,
                next = pending.next() => match next {
                    None => break,
                    Some(Some(w)) if w.id == id => {
                        if best.as_ref().is_none_or(|b| w.v > b.v) {
                            best = Some(w);
                        }
                    }
                    Some(_) => {}
                },
            }
        }
        best
    }

    async fn fetch_session(&self, peer: &Peer, id: &str) -> Option<WriteRecord> {
        let (status, _, body) = self
            .call(
                Method::GET,
                &peer.addr,
                &format!("/_cluster/session/{id}"),
                None,
            )
            .await
            .ok()?;
        if status != StatusCode::OK {
            return None;
        }
        serde_json::from_slice(&body).ok()
    }

    /// One HTTP exchange with a peer: the answer's status, node id and body.
    async fn call(
        &self,
        method: Method,
        addr: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Option<u64>, Bytes), String> {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("http://{addr}{path}"))
            .header(NODE_HEADER, self.node_id());
        if let Some(addr) = &self.advertise {
            request = request.header(ADDR_HEADER, addr);
        }
        if let Some(bearer) = &self.bearer {
            request = request.header(AUTHORIZATION, bearer.clone());
        }
        let body = match body {
            Some(bytes) => {
                request = request.header(CONTENT_TYPE, "application/json");
                Body::from(bytes)
            }
            None => Body::empty(),
        };
        let request = request.body(body).map_err(|e| e.to_string())?;
        let timeout = if path == "/_cluster/snapshot" {
            SNAPSHOT_TIMEOUT
        } else {
            PUSH_TIMEOUT
        };
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| format!("{e:?}"))?;
            let status = response.status();
            let node = response
                .headers()
                .get(NODE_HEADER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| u64::from_str_radix(v, 16).ok());
            let body = axum::body::to_bytes(Body::new(response.into_body()), MAX_ANSWER_BYTES)
                .await
                .map_err(|e| e.to_string())?;
            Ok((status, node, body))
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
    }

    /// Pushes `writes` to `peer`.
    async fn send(
        &self,
        peer: &Peer,
        writes: Vec<WriteRecord>,
        resync: bool,
    ) -> Result<(), String> {
        let count = writes.len() as u64;
        let body = serde_json::to_vec(&Replicate { writes, resync }).map_err(|e| e.to_string())?;
        let len = body.len() as u64;
        let result = self
            .call(Method::POST, &peer.addr, "/_cluster/replicate", Some(body))
            .await;
        let (status, node, answer) = match result {
            Ok(answer) => answer,
            Err(err) => {
                self.metrics.send_failures.fetch_add(1, Ordering::Relaxed);
                return Err(err);
            }
        };
        self.metrics.messages_sent.fetch_add(1, Ordering::Relaxed);
        self.metrics.bytes_sent.fetch_add(len, Ordering::Relaxed);
        {
            let mut st = peer.lock();
            st.messages_sent += 1;
            st.bytes_sent += len;
        }
        if node == Some(self.id) {
            tracing::debug!(peer = %peer.addr, "cluster peer is this instance: skipped");
            peer.mark_itself();
            return Ok(());
        }
        if !status.is_success() {
            self.metrics.send_failures.fetch_add(1, Ordering::Relaxed);
            return Err(format!(
                "HTTP {status}: {}",
                String::from_utf8_lossy(&answer).trim()
            ));
        }
        self.metrics.writes_sent.fetch_add(count, Ordering::Relaxed);
        peer.mark_up(node);
        Ok(())
    }

    /// Sends `records` (everything held when the resync started) to `peer`,
    /// in batches.
    async fn resync(&self, peer: &Peer, records: Vec<WriteRecord>) -> Result<(), String> {
        tracing::debug!(peer = %peer.addr, records = records.len(), "resyncing cluster peer");
        // An empty resync still makes one exchange: the peer's first contact.
        let mut rest: &[WriteRecord] = &records;
        loop {
            let (batch, tail) = rest.split_at(batch_len(rest.iter()));
            self.send(peer, batch.to_vec(), true).await?;
            rest = tail;
            if rest.is_empty() {
                return Ok(());
            }
        }
    }

    /// Adds `addr` as a peer unless it is this instance or already known.
    fn add_peer(self: &Arc<Self>, addr: &str, configured: bool, node: Option<u64>) {
        let addr = normalize_addr(addr);
        if addr.is_empty() || Some(&addr) == self.advertise.as_ref() || node == Some(self.id) {
            return;
        }
        let mut peers = self.peers();
        if let Some(peer) = peers.get(&addr) {
            if configured {
                peer.lock().configured = true;
            }
            return;
        }
        if node.is_some() && peers.values().any(|p| p.lock().node == node) {
            return;
        }
        let peer = Arc::new(Peer {
            addr: addr.clone(),
            notify: Notify::new(),
            state: Mutex::new(PeerState {
                queue: VecDeque::new(),
                status: PeerStatus::Unknown,
                configured,
                node,
                dropped: 0,
                // A new peer first gets everything held here: what it missed
                // before this instance knew of it.
                resync: true,
                removed: false,
                last_error: None,
                down_since: None,
                messages_sent: 0,
                bytes_sent: 0,
            }),
            task: Mutex::new(None),
        });
        let task = tokio::spawn(push_loop(Arc::downgrade(self), Arc::clone(&peer)));
        *peer.task.lock().unwrap_or_else(PoisonError::into_inner) = Some(task.abort_handle());
        tracing::info!(
            peer = %addr,
            source = if configured { "configured" } else { "learned" },
            "cluster peer added"
        );
        peers.insert(addr, peer);
    }

    /// Makes the configured peers exactly `desired` (learned peers stay
    /// until unreachable for [`LEARNED_PEER_TIMEOUT`]).
    fn reconcile(self: &Arc<Self>, desired: &HashSet<String>) {
        for addr in desired {
            self.add_peer(addr, true, None);
        }
        let now = Instant::now();
        let mut peers = self.peers();
        peers.retain(|addr, peer| {
            let st = peer.lock();
            let keep = if desired.contains(addr) {
                true
            } else if st.configured {
                false
            } else {
                st.down_since
                    .is_none_or(|since| now.duration_since(since) < LEARNED_PEER_TIMEOUT)
            };
            drop(st);
            if !keep {
                tracing::info!(peer = %addr, "cluster peer removed");
                peer.stop();
            }
            keep
        });
    }

    /// Learns the sender of a request as a peer, from its headers, unless a
    /// peers file or the admin API says who the peers are.
    fn learn(self: &Arc<Self>, headers: &HeaderMap) {
        if !self.learns() {
            return;
        }
        let node = headers
            .get(NODE_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| u64::from_str_radix(v, 16).ok());
        if node == Some(self.id) {
            return;
        }
        if let Some(addr) = headers.get(ADDR_HEADER).and_then(|v| v.to_str().ok()) {
            self.add_peer(addr, false, node);
        }
    }

    /// Whether peers are learned from contact: only when they are given by
    /// `--peers` alone, since a file or a pool is the whole truth.
    fn learns(&self) -> bool {
        self.cfg.peers_file.is_none() && self.cfg.peers_from.is_none()
    }

    /// Takes `peer`'s snapshot; tells whether it got one.
    async fn snapshot_from(self: &Arc<Self>, peer: &Peer) -> bool {
        let answer = self
            .call(Method::GET, &peer.addr, "/_cluster/snapshot", None)
            .await;
        let snapshot = match answer {
            Ok((_, Some(node), _)) if node == self.id => {
                peer.mark_itself();
                return false;
            }
            Ok((StatusCode::OK, _, body)) => match serde_json::from_slice::<Snapshot>(&body) {
                Ok(snapshot) => snapshot,
                Err(err) => {
                    tracing::warn!(peer = %peer.addr, "bad cluster snapshot: {err}");
                    return false;
                }
            },
            Ok((status, _, _)) => {
                tracing::warn!(peer = %peer.addr, "cluster snapshot refused: HTTP {status}");
                return false;
            }
            Err(err) => {
                tracing::debug!(peer = %peer.addr, "no cluster snapshot: {err}");
                return false;
            }
        };
        for w in &snapshot.writes {
            self.apply_remote(w);
        }
        if self.learns() {
            for addr in &snapshot.peers {
                self.add_peer(addr, false, None);
            }
        }
        tracing::info!(
            peer = %peer.addr,
            sessions = self.len(),
            "joined the cluster with a snapshot"
        );
        true
    }

    /// The servers' addresses of a fulcrum admin API pool.
    async fn fetch_pool(&self, url: &str) -> Result<Vec<String>, String> {
        #[derive(Deserialize)]
        struct Pool {
            servers: Vec<Server>,
        }
        #[derive(Deserialize)]
        struct Server {
            address: String,
        }
        let request = Request::get(url)
            .body(Body::empty())
            .map_err(|e| e.to_string())?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| format!("{e:?}"))?;
            let status = response.status();
            let body = axum::body::to_bytes(Body::new(response.into_body()), MAX_ANSWER_BYTES)
                .await
                .map_err(|e| e.to_string())?;
            if status != StatusCode::OK {
                return Err(format!("HTTP {status}"));
            }
            let pool: Pool = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
            Ok(pool
                .servers
                .into_iter()
                .map(|s| normalize_addr(&s.address))
                .collect())
        };
        tokio::time::timeout(PUSH_TIMEOUT, exchange)
            .await
            .unwrap_or_else(|_| Err("no answer".to_owned()))
    }

    /// Checks the bearer token of a `/_cluster/*` request, if a secret is set:
    /// the answer to give instead when it is missing (401) or wrong (403).
    fn denied(&self, headers: &HeaderMap) -> Option<Response> {
        let Some(expected) = &self.secret_digest else {
            return None;
        };
        let given = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let Some(given) = given else {
            let mut response = self.reply(
                StatusCode::UNAUTHORIZED,
                json!({"error": "this endpoint needs `Authorization: Bearer <cluster secret>`"}),
            );
            response.headers_mut().insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"fulcrum-app cluster\""),
            );
            return Some(response);
        };
        let digest: [u8; 32] = Sha256::digest(given.trim()).into();
        // Compares digests without an early exit.
        let diff = digest
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        (diff != 0).then(|| {
            self.reply(
                StatusCode::FORBIDDEN,
                json!({"error": "wrong cluster secret"}),
            )
        })
    }

    /// A JSON answer carrying this node's id.
    fn reply(&self, status: StatusCode, body: serde_json::Value) -> Response {
        let mut response = (status, Json(body)).into_response();
        if let Ok(id) = HeaderValue::from_str(&self.node_id()) {
            response.headers_mut().insert(NODE_HEADER, id);
        }
        response
    }

    fn status_json(&self) -> serde_json::Value {
        let (sessions, tombstones) = {
            let data = self.data();
            (data.live, data.entries.len() - data.live)
        };
        let peers: Vec<_> = self
            .peer_list()
            .iter()
            .map(|p| {
                let st = p.lock();
                json!({
                    "address": p.addr,
                    "state": st.status.as_str(),
                    "source": if st.configured { "configured" } else { "learned" },
                    "node": st.node.map(|n| format!("{n:016x}")),
                    "queue": st.queue.len(),
                    "dropped": st.dropped,
                    "resync_pending": st.resync,
                    "messages_sent": st.messages_sent,
                    "bytes_sent": st.bytes_sent,
                    "last_error": st.last_error,
                })
            })
            .collect();
        let m = &self.metrics;
        json!({
            "node": self.node_id(),
            "address": self.advertise,
            "sessions": sessions,
            "tombstones": tombstones,
            "joined_from": self.joined_from.lock().unwrap_or_else(PoisonError::into_inner).clone(),
            "peers": peers,
            "replication_lag_ms": {
                "last": m.lag_last_ms.load(Ordering::Relaxed),
                "max": m.lag_max_ms.load(Ordering::Relaxed),
                "count": m.lag_count.load(Ordering::Relaxed),
            },
        })
    }

    /// Appends the cluster's metrics in the Prometheus text format.
    pub(crate) fn write_metrics(&self, out: &mut String) {
        let m = &self.metrics;
        let (tombstones, live) = {
            let data = self.data();
            (data.entries.len() - data.live, data.live)
        };
        let peers = self.peer_list();
        let count = |s: PeerStatus| peers.iter().filter(|p| p.status() == s).count();
        let queued: usize = peers.iter().map(|p| p.lock().queue.len()).sum();
        gauge(
            out,
            "fulcrum_app_sessions_held",
            "Sessions this instance holds.",
            live as u64,
        );
        gauge(
            out,
            "fulcrum_app_cluster_tombstones_held",
            "Deleted sessions remembered (tombstones).",
            tombstones as u64,
        );
        let _ = writeln!(out, "# HELP fulcrum_app_cluster_peers Peers by state.");
        let _ = writeln!(out, "# TYPE fulcrum_app_cluster_peers gauge");
        for state in [PeerStatus::Up, PeerStatus::Down, PeerStatus::Unknown] {
            let _ = writeln!(
                out,
                "fulcrum_app_cluster_peers{{state=\"{}\"}} {}",
                state.as_str(),
                count(state)
            );
        }
        gauge(
            out,
            "fulcrum_app_cluster_peers_up",
            "Peers that answered the last push.",
            count(PeerStatus::Up) as u64,
        );
        gauge(
            out,
            "fulcrum_app_cluster_queue_depth",
            "Writes waiting to be pushed, all peers together.",
            queued as u64,
        );
        let counters: [(&str, &str, &AtomicU64); 12] = [
            (
                "fulcrum_app_cluster_local_writes_total",
                "Session writes (login, update, logout) made here.",
                &m.local_writes,
            ),
            (
                "fulcrum_app_cluster_messages_sent_total",
                "Replication messages (batches, heartbeats) sent to peers.",
                &m.messages_sent,
            ),
            (
                "fulcrum_app_cluster_bytes_sent_total",
                "Bytes of replication messages sent to peers.",
                &m.bytes_sent,
            ),
            (
                "fulcrum_app_cluster_writes_sent_total",
                "Writes delivered to peers (one per write and peer).",
                &m.writes_sent,
            ),
            (
                "fulcrum_app_cluster_send_failures_total",
                "Replication messages that failed.",
                &m.send_failures,
            ),
            (
                "fulcrum_app_cluster_bytes_received_total",
                "Bytes of replication messages received.",
                &m.bytes_received,
            ),
            (
                "fulcrum_app_cluster_writes_applied_total",
                "Writes from peers applied here.",
                &m.writes_applied,
            ),
            (
                "fulcrum_app_cluster_writes_stale_total",
                "Writes from peers ignored: an equal or newer version was held.",
                &m.writes_stale,
            ),
            (
                "fulcrum_app_cluster_queue_dropped_total",
                "Writes dropped from full peer queues (the peer is resynced).",
                &m.queue_dropped,
            ),
            (
                "fulcrum_app_cluster_pull_hits_total",
                "Local misses answered by a peer.",
                &m.pull_hits,
            ),
            (
                "fulcrum_app_cluster_pull_misses_total",
                "Local misses no peer could answer.",
                &m.pull_misses,
            ),
            (
                "fulcrum_app_cluster_snapshots_served_total",
                "Snapshots given to joining instances.",
                &m.snapshots_served,
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            let _ = writeln!(out, "{name} {}", value.load(Ordering::Relaxed));
        }
        let name = "fulcrum_app_cluster_replication_lag_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} From a write on a peer to its arrival here (wall clocks)."
        );
        let _ = writeln!(out, "# TYPE {name} histogram");
        for (bucket, le) in m.lag_buckets.iter().zip(LAG_BUCKETS) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{le}\"}} {}",
                bucket.load(Ordering::Relaxed)
            );
        }
        let total = m.lag_count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {total}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            m.lag_sum_ms.load(Ordering::Relaxed) as f64 / 1000.0
        );
        let _ = writeln!(out, "{name}_count {total}");
        gauge_f(
            out,
            "fulcrum_app_cluster_replication_lag_max_seconds",
            "Largest replication lag seen.",
            m.lag_max_ms.load(Ordering::Relaxed) as f64 / 1000.0,
        );
    }
}

fn gauge(out: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
    );
}

fn gauge_f(out: &mut String, name: &str, help: &str, value: f64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
    );
}

/// Joins the cluster: a snapshot from the first peer that gives one.
async fn join(node: Weak<ClusterNode>) {
    let Some(node) = node.upgrade() else {
        return;
    };
    for peer in node.peer_list() {
        if node.snapshot_from(&peer).await {
            *node
                .joined_from
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(peer.addr.clone());
            return;
        }
    }
}

/// How many of `writes` go in the next batch: at most [`BATCH_MAX`], and
/// about [`BATCH_BYTES`] (at least one write).
fn batch_len<'a>(writes: impl Iterator<Item = &'a WriteRecord>) -> usize {
    let mut bytes = 0;
    let mut n = 0;
    for w in writes.take(BATCH_MAX) {
        bytes += w.id.len() + w.user.as_ref().map_or(0, String::len) + 64;
        if n > 0 && bytes > BATCH_BYTES {
            break;
        }
        n += 1;
    }
    n
}

/// Reads the peers file and the admin API every refresh, reconciles, and
/// starts joining the cluster after the first reading.
async fn membership_loop(node: Weak<ClusterNode>) {
    let mut from_file: Vec<String> = Vec::new();
    let mut from_admin: Vec<String> = Vec::new();
    let (mut file_failing, mut admin_failing) = (false, false);
    let mut joined = false;
    loop {
        let Some(node) = node.upgrade() else {
            return;
        };
        if let Some(path) = &node.cfg.peers_file {
            match tokio::fs::read_to_string(path).await {
                Ok(text) => {
                    from_file = parse_peer_list(&text);
                    file_failing = false;
                }
                Err(err) if !file_failing => {
                    file_failing = true;
                    tracing::warn!("cannot read the peers file {}: {err}", path.display());
                }
                Err(_) => {}
            }
        }
        if let Some(url) = &node.cfg.peers_from {
            match node.fetch_pool(url).await {
                Ok(list) => {
                    from_admin = list;
                    admin_failing = false;
                }
                Err(err) if !admin_failing => {
                    admin_failing = true;
                    tracing::warn!("cannot read the peers from {url}: {err}");
                }
                Err(_) => {}
            }
        }
        let desired: HashSet<String> = node
            .cfg
            .peers
            .iter()
            .map(|p| normalize_addr(p))
            .chain(from_file.iter().cloned())
            .chain(from_admin.iter().cloned())
            .collect();
        node.reconcile(&desired);
        if !joined {
            joined = true;
            tokio::spawn(join(Arc::downgrade(&node)));
        }
        let refresh = node.cfg.refresh;
        drop(node);
        tokio::time::sleep(refresh).await;
    }
}

/// Sends `peer` its queued writes in batches, a heartbeat when idle, or a
/// full resync after drops; retries with backoff while it is unreachable.
async fn push_loop(node: Weak<ClusterNode>, peer: Arc<Peer>) {
    let mut backoff = RETRY_MIN;
    let mut heartbeat_due = true;
    loop {
        let Some(strong) = node.upgrade() else {
            return;
        };
        // Taken under the peer's lock: a write either is in the resync's
        // records or is queued after it.
        let (mut batch, resync) = {
            let mut st = peer.lock();
            if st.removed || st.status == PeerStatus::Itself {
                return;
            }
            if st.resync {
                st.resync = false;
                st.queue.clear();
                (strong.data().records(), true)
            } else {
                let n = batch_len(st.queue.iter());
                (st.queue.drain(..n).collect::<Vec<_>>(), false)
            }
        };
        if batch.is_empty() && !resync && !heartbeat_due {
            drop(strong);
            let idle = tokio::time::timeout(HEARTBEAT_INTERVAL, peer.notify.notified()).await;
            heartbeat_due = idle.is_err();
            continue;
        }
        let result = if resync {
            strong.resync(&peer, std::mem::take(&mut batch)).await
        } else {
            strong.send(&peer, batch.clone(), false).await
        };
        drop(strong);
        match result {
            Ok(()) => {
                backoff = RETRY_MIN;
                heartbeat_due = false;
            }
            Err(err) => {
                {
                    let mut st = peer.lock();
                    if resync {
                        st.resync = true;
                    } else {
                        for w in batch.into_iter().rev() {
                            st.queue.push_front(w);
                        }
                    }
                    while st.queue.len() > QUEUE_CAPACITY {
                        st.queue.pop_front();
                        st.dropped += 1;
                        st.resync = true;
                    }
                }
                peer.mark_down(&err);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RETRY_MAX);
            }
        }
    }
}

/// The `/_cluster/*` endpoints.
pub(crate) fn router(node: Arc<ClusterNode>) -> Router {
    Router::new()
        .route("/_cluster/replicate", post(replicate))
        .route("/_cluster/session/{id}", get(session))
        .route("/_cluster/snapshot", get(snapshot))
        .route("/_cluster/status", get(status))
        .layer(DefaultBodyLimit::max(REPLICATE_LIMIT))
        .with_state(node)
}

type Node = State<Arc<ClusterNode>>;

/// `POST /_cluster/replicate`: applies a peer's writes.
async fn replicate(State(node): Node, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(denied) = node.denied(&headers) {
        return denied;
    }
    node.learn(&headers);
    let message: Replicate = match serde_json::from_slice(&body) {
        Ok(message) => message,
        Err(err) => {
            return node.reply(
                StatusCode::BAD_REQUEST,
                json!({"error": format!("expected {{\"writes\": [...]}}: {err}")}),
            )
        }
    };
    node.metrics
        .bytes_received
        .fetch_add(body.len() as u64, Ordering::Relaxed);
    let now = now_ms();
    let mut applied = 0;
    for w in &message.writes {
        if node.apply_remote(w) {
            applied += 1;
            if !message.resync {
                node.metrics.observe_lag(now.saturating_sub(w.v.0));
            }
        }
    }
    node.reply(StatusCode::OK, json!({"applied": applied}))
}

/// `GET /_cluster/session/{id}`: the newest write held for that session.
async fn session(State(node): Node, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if let Some(denied) = node.denied(&headers) {
        return denied;
    }
    let held = node.data().entries.get(&id).map(|e| WriteRecord {
        id: id.clone(),
        user: e.user.clone(),
        v: e.version,
    });
    match held {
        Some(w) => node.reply(StatusCode::OK, serde_json::to_value(w).unwrap_or_default()),
        None => node.reply(StatusCode::NOT_FOUND, json!({"error": "unknown session"})),
    }
}

/// `GET /_cluster/snapshot`: every session and tombstone, and the peers.
async fn snapshot(State(node): Node, headers: HeaderMap) -> Response {
    if let Some(denied) = node.denied(&headers) {
        return denied;
    }
    node.learn(&headers);
    node.metrics
        .snapshots_served
        .fetch_add(1, Ordering::Relaxed);
    let peers = node
        .peer_list()
        .iter()
        .filter(|p| p.status() != PeerStatus::Itself)
        .map(|p| p.addr.clone())
        .chain(node.advertise.clone())
        .collect();
    let writes = node.data().records();
    let snapshot = Snapshot {
        node: node.node_id(),
        peers,
        writes,
    };
    node.reply(
        StatusCode::OK,
        serde_json::to_value(snapshot).unwrap_or_default(),
    )
}

/// `GET /_cluster/status`: this node, its peers and their queues.
async fn status(State(node): Node, headers: HeaderMap) -> Response {
    if let Some(denied) = node.denied(&headers) {
        return denied;
    }
    node.reply(StatusCode::OK, node.status_json())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(id: &str, user: Option<&str>, v: Version) -> WriteRecord {
        WriteRecord {
            id: id.to_owned(),
            user: user.map(str::to_owned),
            v,
        }
    }

    #[test]
    fn clock_never_goes_back() {
        let mut clock = Hlc::default();
        let a = clock.tick(1000, 1);
        let b = clock.tick(1000, 1);
        let c = clock.tick(999, 1);
        assert!(a < b && b < c);
        clock.observe(Version(5000, 7, 2));
        let d = clock.tick(1001, 1);
        assert_eq!(d, Version(5000, 8, 1));
        assert!(d > Version(5000, 7, 2));
    }

    #[test]
    fn last_writer_wins_in_any_order() {
        let writes = [
            w("s", Some("ann"), Version(10, 0, 1)),
            w("s", Some("bob"), Version(10, 0, 2)),
            w("s", None, Version(11, 0, 1)),
            w("s", Some("cid"), Version(9, 5, 3)),
        ];
        for order in [[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1]] {
            let mut data = Data::default();
            for i in order {
                data.apply(&writes[i], 100);
            }
            let e = data.entries.get("s").unwrap();
            assert_eq!(e.user, None, "{order:?}");
            assert_eq!(e.version, Version(11, 0, 1));
            assert_eq!(data.live, 0);
        }
    }

    #[test]
    fn counts_live_sessions_and_evicts_the_oldest() {
        let mut data = Data::default();
        data.apply(&w("a", Some("x"), Version(1, 0, 1)), 2);
        data.apply(&w("b", Some("x"), Version(2, 0, 1)), 2);
        data.apply(&w("b", Some("y"), Version(3, 0, 1)), 2);
        assert_eq!(data.live, 2);
        data.apply(&w("c", Some("x"), Version(4, 0, 1)), 2);
        assert_eq!(data.live, 2);
        assert!(!data.entries.contains_key("a"));
        data.apply(&w("b", None, Version(5, 0, 1)), 2);
        assert_eq!(data.live, 1);
        assert!(data.entries.contains_key("b"), "tombstone kept");
        // Tombstones are bounded too.
        for i in 0..10 {
            data.apply(&w(&format!("t{i}"), None, Version(6 + i, 0, 1)), 2);
        }
        assert!(data.tombstones.len() <= 2);
        assert_eq!(data.entries.len(), data.live + data.tombstones.len());
    }

    #[test]
    fn batches_are_bounded_in_count_and_bytes() {
        let small: Vec<_> = (0..1200)
            .map(|i| w(&format!("{i:032}"), Some("martin"), Version(i, 0, 1)))
            .collect();
        assert_eq!(batch_len(small.iter()), BATCH_MAX);
        assert_eq!(batch_len(small[..3].iter()), 3);
        assert_eq!(batch_len([].iter()), 0);
        let big = "x".repeat(BATCH_BYTES / 3);
        let large: Vec<_> = (0..10)
            .map(|i| w(&format!("{i:032}"), Some(&big), Version(i, 0, 1)))
            .collect();
        assert_eq!(batch_len(large.iter()), 2);
        let huge = w("h", Some(&"x".repeat(2 * BATCH_BYTES)), Version(1, 0, 1));
        assert_eq!(batch_len(std::iter::once(&huge)), 1, "at least one");
    }

    #[test]
    fn a_full_queue_drops_the_oldest_and_owes_a_resync() {
        let peer = Peer {
            addr: "127.0.0.1:1".into(),
            notify: Notify::new(),
            state: Mutex::new(PeerState {
                queue: VecDeque::new(),
                status: PeerStatus::Down,
                configured: true,
                node: None,
                dropped: 0,
                resync: false,
                removed: false,
                last_error: None,
                down_since: None,
                messages_sent: 0,
                bytes_sent: 0,
            }),
            task: Mutex::new(None),
        };
        let metrics = Metrics::default();
        for i in 0..=QUEUE_CAPACITY as u64 {
            peer.enqueue(&w(&format!("{i}"), Some("u"), Version(i, 0, 1)), &metrics);
        }
        let st = peer.lock();
        assert_eq!(st.queue.len(), QUEUE_CAPACITY);
        assert_eq!(st.queue.front().unwrap().id, "1", "the oldest went");
        assert_eq!((st.dropped, st.resync), (1, true));
        assert_eq!(metrics.queue_dropped.load(Ordering::Relaxed), 1);
        drop(st);
        // While a resync is owed, writes are not queued: the resync carries them.
        peer.enqueue(&w("late", Some("u"), Version(1 << 40, 0, 1)), &metrics);
        assert_eq!(peer.lock().queue.len(), QUEUE_CAPACITY);
    }

    #[test]
    fn parses_peer_lists() {
        assert_eq!(
            parse_peer_list(
                "# peers\n127.0.0.1:1, 127.0.0.1:2\n\nhost:3 # c\nhttp://10.0.0.1:4/\n"
            ),
            vec!["127.0.0.1:1", "127.0.0.1:2", "host:3", "10.0.0.1:4"]
        );
    }

    #[test]
    fn config_debug_hides_the_secret() {
        let cfg = ClusterConfig {
            secret: Some("hunter2".into()),
            ..ClusterConfig::default()
        };
        assert!(!format!("{cfg:?}").contains("hunter2"));
        assert!(cfg.validate().is_ok());
        let bad = ClusterConfig {
            peers_from: Some("https://x/api/v1/pools/p".into()),
            ..ClusterConfig::default()
        };
        assert!(bad.validate().is_err());
    }
}

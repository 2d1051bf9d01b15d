//! Builds the running system from a [`Config`] and runs it: worker threads that serve the listeners,
//! a control thread (admin API, health checks, discovery, and the one task that changes the running
//! configuration), and a graceful stop.
//!
//! Threads: one worker per available core, each a single-threaded tokio runtime with its own
//! `SO_REUSEPORT` socket per listener, so the kernel spreads connections and a request never crosses
//! threads (no work-stealing, no cross-core wakeups). Pools, servers and counters are shared and only
//! touched with atomics. Workers get their listening sockets as commands, so a reload can add a
//! listener to running workers. The control thread runs apart so that it answers even when the workers
//! are saturated.
//!
//! What the admin side reads is one [`State`] published through `ArcSwap`: the configuration, the pools
//! (with their stickiness) and the listeners. Only the control task ([`crate::control`]) publishes a
//! new one.
//!
//! Stopping: [`Running::shutdown`] marks the system draining (`/readyz` answers 503), closes the
//! listening sockets, asks every open connection to close after its current request, and waits for
//! them up to `shutdown_timeout`; what is still open then is cut.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::control::{self, Command, Controller};
use crate::http::proxy::HttpListener;
use crate::http::upstream;
use crate::listener::{ListenerStats, Slots};
use crate::pool::Pool;
use crate::sticky::Sticky;

/// The name under which the admin API's listening socket is handed to a successor.
pub const ADMIN_SOCKET: &str = "@admin";

/// A listener as the admin side sees it.
#[derive(Debug, Clone)]
pub struct ListenerInfo {
    /// Its name from the configuration.
    pub name: String,
    /// The address actually bound (differs from the configuration when it asked for port 0).
    pub bound: SocketAddr,
    /// `http`, `tcp`, …
    pub protocol: &'static str,
    /// The name of the pool that gets the traffic no route matches.
    pub pool: String,
    /// What serves its traffic.
    pub handler: Handler,
    /// The connection slots (`max_connections`).
    pub slots: Arc<Slots>,
    /// Stops this listener's accept loops (at shutdown, or when a reload removes it).
    pub(crate) stop: CancellationToken,
    /// Cuts this listener's remaining connections.
    pub(crate) deadline: CancellationToken,
}

/// The protocol side of a listener.
#[derive(Debug, Clone)]
pub enum Handler {
    /// `http` and `https`.
    Http(Arc<HttpListener>),
    /// `tcp`.
    Tcp(Arc<crate::l4::tcp::TcpProxy>),
    /// `udp`, with the connection counters it keeps for the admin side (flows as connections).
    Udp(Arc<crate::l4::udp::UdpProxy>, Arc<ListenerStats>),
}

impl ListenerInfo {
    /// The listener's counters.
    pub fn stats(&self) -> &ListenerStats {
        match &self.handler {
            Handler::Http(h) => &h.stats,
            Handler::Tcp(t) => &t.stats,
            Handler::Udp(_, s) => s,
        }
    }

    /// The HTTP side, for `http` and `https` listeners.
    pub fn http(&self) -> Option<&Arc<HttpListener>> {
        match &self.handler {
            Handler::Http(h) => Some(h),
            _ => None,
        }
    }

    /// The access lists and bans checked at accept (`http`, `https` and `tcp` listeners).
    pub fn filter(&self) -> Option<&arc_swap::ArcSwap<crate::http::filter::ListenerFilter>> {
        match &self.handler {
            Handler::Http(h) => Some(&h.filter),
            Handler::Tcp(t) => Some(&t.filter),
            Handler::Udp(..) => None,
        }
    }

    /// True when both describe the same running listener.
    pub fn same(&self, other: &ListenerInfo) -> bool {
        match (&self.handler, &other.handler) {
            (Handler::Http(a), Handler::Http(b)) => Arc::ptr_eq(a, b),
            (Handler::Tcp(a), Handler::Tcp(b)) => Arc::ptr_eq(a, b),
            (Handler::Udp(a, _), Handler::Udp(b, _)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

/// A pool and its stickiness (one stick table per pool, shared by every route to it).
#[derive(Debug, Clone)]
pub struct PoolEntry {
    /// The pool.
    pub pool: Arc<Pool>,
    /// Its session persistence, if configured.
    pub sticky: Option<Arc<Sticky>>,
    /// The HTTP caches in front of it: its own `[pools.cache]` first, then the routes' own.
    pub caches: Vec<Arc<crate::cache::Cache>>,
}

impl PoolEntry {
    /// The pool's own cache (`[pools.cache]`).
    pub fn cache(&self) -> Option<&Arc<crate::cache::Cache>> {
        self.caches.iter().find(|c| c.scope == self.pool.name)
    }
}

/// What runs now: published whole by the control task, read by the admin side.
#[derive(Debug)]
pub struct State {
    /// The configuration the system runs (as last loaded; runtime changes through the API are in the
    /// pools, not here).
    pub config: Config,
    /// Every pool, in configuration order.
    pub pools: Vec<PoolEntry>,
    /// Every listener, in configuration order.
    pub listeners: Vec<ListenerInfo>,
}

impl State {
    /// The pool called `name`.
    pub fn pool(&self, name: &str) -> Option<&PoolEntry> {
        self.pools.iter().find(|p| p.pool.name == name)
    }
}

/// Counters of configuration reloads.
#[derive(Debug, Default)]
pub struct ReloadStats {
    /// Reloads applied.
    pub ok: AtomicU64,
    /// Reloads refused (invalid file, unbindable port); the running configuration stayed.
    pub failed: AtomicU64,
}

/// State shared by the workers, the control task and the admin side.
#[derive(Debug)]
pub struct Shared {
    state: ArcSwap<State>,
    /// When the system started.
    pub started: Instant,
    draining: AtomicBool,
    shutdown: CancellationToken,
    control: UnboundedSender<Command>,
    /// Configuration reloads so far.
    pub reloads: ReloadStats,
    /// The admin API's bearer token, when configured (changes at reload).
    pub(crate) admin_token: ArcSwap<Option<String>>,
    /// The access log (`[access_log]`), shared by every listener; swapped when a reload changes it.
    pub access_log: crate::access_log::Slot,
    /// The VRRP group (`[ha]`), when configured at start.
    pub ha: Option<Arc<crate::ha::Status>>,
}

impl Shared {
    /// True once a graceful stop has begun.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Begins a graceful stop: no new connections, open ones finish their current request.
    pub fn request_shutdown(&self) {
        if !self.draining.swap(true, Ordering::Relaxed) {
            tracing::info!(timeout = ?self.state().config.shutdown_timeout, "draining");
        }
        self.shutdown.cancel();
    }

    /// Fires when a graceful stop begins (a signal, or a successor took over).
    pub fn stopping(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// What runs now.
    pub fn state(&self) -> Arc<State> {
        self.state.load_full()
    }

    /// Every pool now, in configuration order.
    pub fn pools(&self) -> Vec<Arc<Pool>> {
        self.state
            .load()
            .pools
            .iter()
            .map(|p| p.pool.clone())
            .collect()
    }

    /// The pool called `name`, now.
    pub fn pool(&self, name: &str) -> Option<Arc<Pool>> {
        self.state.load().pool(name).map(|p| p.pool.clone())
    }

    /// Publishes a new state (the control task only).
    pub(crate) fn publish(&self, state: State) {
        if let Some(admin) = &state.config.admin {
            self.admin_token.store(Arc::new(admin.token.clone()));
        }
        self.state.store(Arc::new(state));
    }

    /// Sends a command to the control task and waits for its answer.
    pub async fn control<T>(
        &self,
        make: impl FnOnce(control::Reply<T>) -> Command,
    ) -> Result<T, control::ControlError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.control
            .send(make(tx))
            .map_err(|_| control::ControlError::unavailable())?;
        rx.await.map_err(|_| control::ControlError::unavailable())?
    }

    /// Sends a command to the control task without waiting.
    pub(crate) fn notify(&self, command: Command) {
        let _ = self.control.send(command);
    }
}

/// Why the system could not start (or a reload was refused).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listening socket could not be bound.
    #[error("listener `{name}`: cannot bind {addr}: {source}")]
    Bind {
        name: String,
        /// Its index in the configuration's `listeners`.
        index: usize,
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// The admin socket could not be bound.
    #[error("admin: cannot bind {addr}: {source}")]
    AdminBind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// The stick table's store could not be set up (a malformed Redis address).
    #[error("pool `{pool}`: stick table: {message}")]
    Store { pool: String, message: String },
    /// The access log's file could not be opened.
    #[error("access_log.path: cannot open {path}: {source}")]
    AccessLog {
        path: String,
        source: std::io::Error,
    },
    /// ICMP health checks are configured but this process may not send ICMP.
    #[error("pool `{pool}`: {message}")]
    Icmp { pool: String, message: String },
    /// `[ha]` cannot run here (no such interface, a missing capability).
    #[error("{0}")]
    Ha(String),
    /// A thread or runtime could not be created.
    #[error("cannot start: {0}")]
    Io(#[from] std::io::Error),
}

impl StartError {
    /// The configuration key at fault, for the admin API's error answers.
    pub fn field(&self) -> Option<String> {
        match self {
            StartError::Bind { index, .. } => Some(format!("listeners[{index}].bind")),
            StartError::AdminBind { .. } => Some("admin.bind".into()),
            StartError::Store { pool, .. } => Some(format!("pools.{pool}.sticky")),
            StartError::Icmp { pool, .. } => Some(format!("pools.{pool}.health_check.kind")),
            StartError::AccessLog { .. } => Some("access_log.path".into()),
            StartError::Ha(_) => Some("ha".into()),
            StartError::Io(_) => None,
        }
    }
}

/// What each worker thread runs at its heartbeat (every 500 ms), set once by the binary.
static WORKER_HOUSEKEEPING: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// Sets what each worker thread runs at its heartbeat (the `fulcrum` binary hands the memory its
/// allocator holds freed back to the system there). Only the first call counts.
pub fn set_worker_housekeeping(f: fn()) {
    let _ = WORKER_HOUSEKEEPING.set(f);
}

/// Runs the worker housekeeping, if any was set.
pub(crate) fn worker_housekeeping() {
    if let Some(f) = WORKER_HOUSEKEEPING.get() {
        f();
    }
}

/// How to start, beyond the configuration.
#[derive(Debug, Default)]
pub struct StartOptions {
    /// Worker threads (default: [`default_workers`]).
    pub workers: Option<usize>,
    /// The configuration file, re-read by SIGHUP and `POST /api/v1/reload` (none: reloads are refused).
    pub config_path: Option<PathBuf>,
    /// Listening sockets taken over from a previous fulcrum process ([`crate::takeover`]).
    pub inherited: Option<crate::takeover::Inherited>,
    /// Where to offer this process's listening sockets to a successor (`fulcrum run --handoff PATH`).
    pub handoff: Option<PathBuf>,
}

/// The running system.
#[derive(Debug)]
pub struct Running {
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    drain_deadline: CancellationToken,
    admin_stop: CancellationToken,
    admin_addr: Option<SocketAddr>,
    done: mpsc::Receiver<()>,
    threads: Vec<JoinHandle<()>>,
    workers: usize,
}

/// How many worker threads to run: the cores this process may use (its CPU affinity included).
pub fn default_workers() -> usize {
    std::env::var("FULCRUM_WORKERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n: &usize| n > 0)
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
}

/// Raises the open-files soft limit to the hard limit: every proxied connection needs two descriptors.
fn raise_fd_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!(limit = n, "open files limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open files limit"),
    }
}

/// Checks what the configuration needs from the host beyond sockets (ICMP for `kind = "icmp"`).
pub fn check_capabilities(config: &Config) -> Result<(), StartError> {
    for pool in &config.pools {
        let icmp = pool
            .health_check
            .as_ref()
            .is_some_and(|h| h.kind == crate::config::HealthCheckKind::Icmp);
        if icmp {
            crate::health::icmp::available().map_err(|message| StartError::Icmp {
                pool: pool.name.clone(),
                message,
            })?;
        }
    }
    Ok(())
}

/// Starts the system described by `config` with the default number of workers.
pub fn start(config: Config) -> Result<Running, StartError> {
    start_with(config, StartOptions::default())
}

/// Starts the system described by `config` with `workers` worker threads.
pub fn start_with_workers(config: Config, workers: usize) -> Result<Running, StartError> {
    start_with(
        config,
        StartOptions {
            workers: Some(workers),
            ..StartOptions::default()
        },
    )
}

/// Starts the system described by `config`.
pub fn start_with(config: Config, opts: StartOptions) -> Result<Running, StartError> {
    raise_fd_limit();
    check_capabilities(&config)?;
    let workers = opts.workers.unwrap_or_else(default_workers).max(1);
    let ha = config
        .ha
        .as_ref()
        .map(crate::ha::Prepared::new)
        .transpose()
        .map_err(|e| StartError::Ha(e.0))?;
    let took_over = opts.inherited.is_some();

    let mut inherited = opts.inherited;
    let admin_socket = match &config.admin {
        Some(a) => {
            let taken = inherited
                .as_mut()
                .and_then(|i| i.take_tcp(ADMIN_SOCKET, a.bind))
                .and_then(|mut v| v.pop());
            let socket = match taken {
                Some(s) => Ok(s),
                None => std::net::TcpListener::bind(a.bind),
            };
            Some(
                socket
                    .and_then(|s| s.set_nonblocking(true).map(|_| s))
                    .map_err(|source| StartError::AdminBind {
                        addr: a.bind,
                        source,
                    })?,
            )
        }
        None => None,
    };
    let admin_addr = admin_socket.as_ref().and_then(|s| s.local_addr().ok());

    let (control_tx, control_rx) = tokio::sync::mpsc::unbounded_channel();
    let shutdown = CancellationToken::new();
    let shared = Arc::new(Shared {
        state: ArcSwap::from_pointee(State {
            config: config.clone(),
            pools: Vec::new(),
            listeners: Vec::new(),
        }),
        started: Instant::now(),
        draining: AtomicBool::new(false),
        shutdown: shutdown.clone(),
        control: control_tx,
        reloads: ReloadStats::default(),
        admin_token: ArcSwap::from_pointee(config.admin.as_ref().and_then(|a| a.token.clone())),
        access_log: Default::default(),
        ha: ha.as_ref().map(|h| h.status()),
    });
    let drain_deadline = CancellationToken::new();
    let admin_stop = CancellationToken::new();

    let mut worker_txs = Vec::with_capacity(workers);
    let mut worker_rxs = Vec::with_capacity(workers);
    for _ in 0..workers {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        worker_txs.push(tx);
        worker_rxs.push(rx);
    }

    let control_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut controller = Controller::new(
        shared.clone(),
        worker_txs,
        shutdown.clone(),
        drain_deadline.clone(),
        admin_stop.clone(),
        opts.config_path,
        opts.handoff.is_some(),
    );
    // Bind and build everything before any thread runs, so that a bad start fails here.
    let prepared = controller.prepare(config, inherited.as_mut())?;
    {
        // Health checks and discovery spawned by the commit belong to the control runtime (entered,
        // not blocked on: the caller may itself be async).
        let _in_control = control_rt.enter();
        controller.commit(prepared);
    }
    if let Some(left) = inherited.filter(|i| !i.is_empty()) {
        tracing::warn!(
            sockets = left.len(),
            "inherited sockets that no listener uses are closed"
        );
    }

    let (done_tx, done) = mpsc::channel();
    let mut threads = Vec::new();
    for (id, rx) in worker_rxs.into_iter().enumerate() {
        let shutdown = shutdown.clone();
        let done_tx = done_tx.clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        threads.push(
            std::thread::Builder::new()
                .name(format!("fulcrum-worker-{id}"))
                .spawn(move || {
                    upstream::set_worker_id(id);
                    rt.block_on(control::run_worker(rx, shutdown));
                    let _ = done_tx.send(());
                })?,
        );
    }

    // The control thread: the control task, the admin API (if configured), health checks and DNS
    // discovery, apart from the workers so that all keep their pace when the workers are saturated.
    {
        let shared = shared.clone();
        let stop = admin_stop.clone();
        let handoff = opts.handoff;
        threads.push(
            std::thread::Builder::new()
                .name("fulcrum-control".into())
                .spawn(move || {
                    control_rt.block_on(async move {
                        if let Some(path) = handoff {
                            let admin = admin_socket.as_ref().and_then(|s| s.try_clone().ok());
                            controller.offer_handoff(path, admin);
                        }
                        let control = tokio::spawn(controller.run(control_rx));
                        let ha =
                            ha.map(|h| tokio::spawn(crate::ha::run(shared.clone(), h, took_over)));
                        match admin_socket.map(tokio::net::TcpListener::from_std) {
                            Some(Ok(listener)) => {
                                crate::admin::serve(listener, shared, stop.clone()).await
                            }
                            Some(Err(e)) => {
                                tracing::error!(error = %e, "cannot register admin listener")
                            }
                            None => {}
                        }
                        stop.cancelled().await;
                        control.abort();
                        if let Some(ha) = ha {
                            // Hand the address over (a priority 0 advert) before the runtime goes.
                            let _ = tokio::time::timeout(Duration::from_secs(2), ha).await;
                        }
                    });
                })?,
        );
    }

    for l in &shared.state().listeners {
        tracing::info!(listener = %l.name, bind = %l.bound, protocol = l.protocol, workers, "listening");
    }
    if let Some(addr) = admin_addr {
        tracing::info!(bind = %addr, "admin API and dashboard");
    }
    Ok(Running {
        shared,
        shutdown,
        drain_deadline,
        admin_stop,
        admin_addr,
        done,
        threads,
        workers,
    })
}

impl Running {
    /// The shared state (pools, listeners, counters).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The address a listener is bound to, by name.
    pub fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        self.shared
            .state()
            .listeners
            .iter()
            .find(|l| l.name == name)
            .map(|l| l.bound)
    }

    /// The admin API's address, when configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Reloads the configuration file (as SIGHUP does) and waits for the outcome.
    pub fn reload(&self) -> Result<control::ReloadReport, control::ControlError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.shared.notify(Command::Reload { reply: tx });
        rx.blocking_recv()
            .map_err(|_| control::ControlError::unavailable())?
    }

    /// Begins a graceful stop: no new connections, open ones finish their current request.
    pub fn shutdown(&self) {
        self.shared.request_shutdown();
    }

    /// Cuts every open connection now (a second signal).
    pub fn abort(&self) {
        self.shutdown.cancel();
        self.drain_deadline.cancel();
    }

    /// After [`Running::shutdown`]: waits until every worker is done or `shutdown_timeout` has passed
    /// (then cuts what is left), stops the admin API, and joins the threads. Returns true when the
    /// drain completed in time.
    pub fn wait(self) -> bool {
        let timeout = self.shared.state().config.shutdown_timeout;
        let deadline = Instant::now() + timeout;
        let mut finished = 0;
        while finished < self.workers {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.done.recv_timeout(left) {
                Ok(()) => finished += 1,
                Err(_) => break,
            }
        }
        let clean = finished == self.workers;
        if !clean {
            tracing::warn!("shutdown_timeout reached: closing the connections still open");
            self.drain_deadline.cancel();
            // The workers drop their connections as soon as they see the deadline.
            for _ in finished..self.workers {
                if self.done.recv_timeout(Duration::from_secs(2)).is_err() {
                    break;
                }
            }
        }
        self.admin_stop.cancel();
        for t in self.threads {
            let _ = t.join();
        }
        clean
    }

    /// Graceful stop and wait, for tests and embedders.
    pub fn stop(self) -> bool {
        self.shutdown();
        self.wait()
    }
}

//! The one owner of changes to the running system.
//!
//! The admin API, SIGHUP and `POST /api/v1/reload`, DNS discovery and the end of a server's drain all
//! send [`Command`]s to one control task, which applies them one at a time: add, remove, drain or
//! reweight a server, reload the configuration file. Nothing else changes pools or listeners, so two
//! changes never race.
//!
//! A reload happens in two steps. [`Controller::prepare`] validates the new file and binds every new
//! listener (a bad file or an unbindable port refuses the reload and the running configuration stays
//! untouched); [`Controller::commit`] then applies the difference: pools keep the servers that did not
//! change (their health, counters, connections and stick-table entries), new listeners start accepting
//! on every worker, removed listeners stop accepting and drain, and changed routes swap atomically.
//! Requests and WebSocket tunnels in flight finish where they began, since they hold what they use.
//! Starting up is a reload from nothing.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, PoolConfig, Protocol, RouteCache, ServerConfig};
use crate::discovery::{DnsTarget, Resolver};
use crate::http::filter::{Filter, ListenerFilter};
use crate::http::proxy::{HttpListener, HttpRouter, Target};
use crate::http::server::{Builders, ConnSettings, TlsListener};
use crate::l4::tcp::{TcpProxy, TcpRouter, TcpSettings, TcpTarget};
use crate::l4::udp::{UdpProxy, UdpSettings};
use crate::listener::{self, PerIp, Slots};
use crate::pool::{MembershipError, Pool, Server, ServerState, Source};
use crate::runtime::{Handler, ListenerInfo, PoolEntry, Shared, StartError, State};
use crate::sticky::Sticky;
use crate::takeover::{self, Inherited};

/// Where the answer to a command goes.
pub type Reply<T> = oneshot::Sender<Result<T, ControlError>>;

/// What an operator state change asks for (`PUT …/servers/{name}/state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminState {
    /// Take traffic again (cancels a drain or a pending removal).
    Ready,
    /// Finish what it has, take no new clients (sticky clients stay).
    Drain,
    /// Take no traffic at all.
    Maint,
}

/// A change to the running system, with where to answer.
#[derive(Debug)]
pub enum Command {
    /// Add a server to a pool.
    AddServer {
        pool: String,
        server: ServerConfig,
        reply: Reply<Arc<Server>>,
    },
    /// Drain a server, then remove it (answers at once with the deregistration delay).
    RemoveServer {
        pool: String,
        name: String,
        reply: Reply<Duration>,
    },
    /// Set a server's administrative state.
    SetState {
        pool: String,
        name: String,
        state: AdminState,
        reply: Reply<Arc<Server>>,
    },
    /// Change a server's weight.
    SetWeight {
        pool: String,
        name: String,
        weight: u32,
        reply: Reply<Arc<Server>>,
    },
    /// Reload the configuration file.
    Reload { reply: Reply<ReloadReport> },
    /// Replace a listener's access lists (until the next reload).
    SetAccess {
        listener: String,
        access: crate::filter::AccessList,
        reply: Reply<crate::filter::AccessList>,
    },
    /// A DNS answer for one of a pool's targets.
    Discovered {
        pool: String,
        source: String,
        servers: Vec<ServerConfig>,
    },
    /// A removed server's drain is over: take it out of its pool.
    Drained { pool: String, server: Arc<Server> },
}

/// Why a command was refused: an HTTP status for the admin API, a message, and the field at fault.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ControlError {
    /// 400, 404, 409, 503.
    #[serde(skip)]
    pub status: u16,
    /// What is wrong.
    pub error: String,
    /// The request field (or configuration key) at fault.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl ControlError {
    fn new(status: u16, error: impl Into<String>, field: Option<&str>) -> Self {
        ControlError {
            status,
            error: error.into(),
            field: field.map(str::to_owned),
        }
    }

    /// The control task is gone (the process is stopping).
    pub fn unavailable() -> Self {
        Self::new(503, "fulcrum is shutting down", None)
    }

    fn unknown_pool(pool: &str) -> Self {
        Self::new(404, format!("no pool named `{pool}`"), Some("pool"))
    }
}

impl std::fmt::Display for ControlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.field {
            Some(field) => write!(f, "{field}: {}", self.error),
            None => f.write_str(&self.error),
        }
    }
}

impl From<MembershipError> for ControlError {
    fn from(e: MembershipError) -> Self {
        match &e {
            MembershipError::UnknownServer { .. } => Self::new(404, e.to_string(), Some("name")),
            MembershipError::DuplicateName { .. } => Self::new(409, e.to_string(), Some("name")),
            MembershipError::DuplicateAddress { .. } => {
                Self::new(409, e.to_string(), Some("address"))
            }
        }
    }
}

/// What a reload changed.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct ReloadReport {
    /// Listeners that started.
    pub listeners_added: Vec<String>,
    /// Listeners that stopped accepting (their connections drain).
    pub listeners_removed: Vec<String>,
    /// Pools created.
    pub pools_added: Vec<String>,
    /// Pools removed.
    pub pools_removed: Vec<String>,
    /// Servers that joined, as `pool/server`.
    pub servers_added: Vec<String>,
    /// Servers that left, as `pool/server`.
    pub servers_removed: Vec<String>,
}

/// What a worker thread is asked to do.
#[derive(Debug)]
pub(crate) enum WorkerCommand {
    /// Accept on this socket for this listener.
    Listen {
        socket: std::net::TcpListener,
        handler: Handler,
        slots: Arc<Slots>,
        stop: CancellationToken,
        deadline: CancellationToken,
    },
    /// Serve datagrams on this socket for this UDP listener.
    Udp {
        socket: std::net::UdpSocket,
        proxy: Arc<UdpProxy>,
        stop: CancellationToken,
    },
}

/// The loop of a worker thread: serves the listeners it is given until `shutdown`, then waits for
/// their connections to drain.
pub(crate) async fn run_worker(
    mut commands: UnboundedReceiver<WorkerCommand>,
    shutdown: CancellationToken,
) {
    let mut tasks = tokio::task::JoinSet::new();
    // A heartbeat keeps the timer wheel's next wake-up within half a second. Without one, each
    // connect or response timeout a connection registers is earlier than every other timer (the idle
    // ones are long), and tokio then wakes the driver through its eventfd (a `write(2)` and an extra
    // `epoll_wait` return per connection, measured with strace), needless on this one-thread runtime.
    let mut heartbeat = tokio::time::interval(std::time::Duration::from_millis(500));
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = heartbeat.tick() => crate::runtime::worker_housekeeping(),
            command = commands.recv() => match command {
                Some(WorkerCommand::Listen { socket, handler, slots, stop, deadline }) => {
                    match (tokio::net::TcpListener::from_std(socket), handler) {
                        (Ok(l), Handler::Http(http)) => {
                            tasks.spawn(listener::serve(l, http, slots, stop, deadline));
                        }
                        (Ok(l), Handler::Tcp(tcp)) => {
                            tasks.spawn(listener::serve(l, tcp, slots, stop, deadline));
                        }
                        (Ok(_), Handler::Udp(..)) => {}
                        (Err(e), _) => {
                            tracing::error!(error = %e, "cannot register listener");
                        }
                    }
                }
                Some(WorkerCommand::Udp { socket, proxy, stop }) => {
                    match tokio::net::UdpSocket::from_std(socket) {
                        Ok(s) => {
                            tasks.spawn(crate::l4::udp::serve(s, proxy, stop));
                        }
                        Err(e) => {
                            tracing::error!(listener = %proxy.name, error = %e, "cannot register listener");
                        }
                    }
                }
                None => break,
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    while tasks.join_next().await.is_some() {}
}

/// A validated configuration with its new listening sockets bound and its stick tables built: all that
/// can fail is done, what is left cannot.
#[derive(Debug)]
pub struct Prepared {
    config: Config,
    sticky: Vec<Option<Arc<Sticky>>>,
    /// Sockets of the listeners that start, by index in `config.listeners`.
    sockets: HashMap<usize, (SocketAddr, Bound)>,
    /// The access log to switch to (`Some(None)`: none any more), when it changed.
    access_log: Option<Option<Arc<crate::access_log::AccessLog>>>,
}

/// The bound socket(s) of a listener that starts.
#[derive(Debug)]
enum Bound {
    /// One per worker (SO_REUSEPORT).
    Tcp(Vec<std::net::TcpListener>),
    /// One socket: a client's datagrams must all reach the task that holds its flow.
    Udp(std::net::UdpSocket),
}

/// The control task's state.
pub struct Controller {
    shared: Arc<Shared>,
    workers: Vec<UnboundedSender<WorkerCommand>>,
    shutdown: CancellationToken,
    drain_deadline: CancellationToken,
    /// Stops the control thread's background work (health checks, discovery).
    stop: CancellationToken,
    config_path: Option<PathBuf>,
    pinger: Option<crate::health::icmp::Pinger>,
    /// Each pool's discovery loop, by pool name.
    discovery: HashMap<String, CancellationToken>,
    /// The listening sockets of every listener (one per worker), kept to offer them to a successor.
    sockets: Arc<ArcSwap<HashMap<String, Arc<Vec<std::net::TcpListener>>>>>,
    handoff: Option<takeover::Handoff>,
    /// Keep copies of the listening sockets (only to offer them to a successor).
    keep_sockets: bool,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("config_path", &self.config_path)
            .finish_non_exhaustive()
    }
}

impl Controller {
    pub(crate) fn new(
        shared: Arc<Shared>,
        workers: Vec<UnboundedSender<WorkerCommand>>,
        shutdown: CancellationToken,
        drain_deadline: CancellationToken,
        stop: CancellationToken,
        config_path: Option<PathBuf>,
        keep_sockets: bool,
    ) -> Self {
        Controller {
            shared,
            workers,
            shutdown,
            drain_deadline,
            stop,
            config_path,
            pinger: None,
            discovery: HashMap::new(),
            sockets: Arc::default(),
            handoff: None,
            keep_sockets,
        }
    }

    /// Runs commands until the process stops.
    pub(crate) async fn run(mut self, mut commands: UnboundedReceiver<Command>) {
        let shutdown = self.shutdown.clone();
        let mut stopping = std::pin::pin!(shutdown.cancelled());
        let mut upkeep = tokio::time::interval(Duration::from_secs(1));
        upkeep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = upkeep.tick() => self.sweep_filters(),
                command = commands.recv() => match command {
                    Some(command) => self.handle(command),
                    None => return,
                },
                _ = &mut stopping, if self.handoff.is_some() || !self.sockets.load().is_empty() => {
                    // Draining: let go of the copies of the listening sockets, so that they close
                    // with the accept loops (a successor that took them over keeps its own).
                    self.sockets.store(Arc::default());
                    self.handoff = None;
                }
            }
        }
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::AddServer {
                pool,
                server,
                reply,
            } => {
                let _ = reply.send(self.add_server(&pool, server));
            }
            Command::RemoveServer { pool, name, reply } => {
                let _ = reply.send(self.remove_server(&pool, &name));
            }
            Command::SetState {
                pool,
                name,
                state,
                reply,
            } => {
                let _ = reply.send(self.set_state(&pool, &name, state));
            }
            Command::SetWeight {
                pool,
                name,
                weight,
                reply,
            } => {
                let result = self
                    .pool(&pool)
                    .and_then(|p| p.set_weight(&name, weight).map_err(Into::into));
                let _ = reply.send(result);
            }
            Command::Reload { reply } => {
                let result = self.reload();
                let counter = match &result {
                    Ok(_) => &self.shared.reloads.ok,
                    Err(_) => &self.shared.reloads.failed,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                let _ = reply.send(result);
            }
            Command::SetAccess {
                listener,
                access,
                reply,
            } => {
                let state = self.shared.state();
                let result = match state.listeners.iter().find(|l| l.name == listener) {
                    None => Err(ControlError::new(
                        404,
                        format!("no listener named `{listener}`"),
                        Some("listener"),
                    )),
                    Some(l) if l.filter().is_none() => Err(ControlError::new(
                        400,
                        format!("listener `{listener}` is udp: it has no access lists"),
                        Some("listener"),
                    )),
                    Some(l) => {
                        let filter = l.filter().expect("checked above");
                        let current = filter.load();
                        let mut cfg = l_filter_config(&state.config, &listener);
                        cfg.access = access.clone();
                        let policy = current.policy.clone();
                        filter.store(Arc::new(ListenerFilter::new(
                            &cfg,
                            policy.as_ref(),
                            Some(&current),
                            &state.config.store,
                            &listener,
                        )));
                        tracing::info!(listener = %listener, "access lists replaced through the admin API");
                        Ok(access)
                    }
                };
                let _ = reply.send(result);
            }
            Command::Discovered {
                pool,
                source,
                servers,
            } => {
                if let Ok(p) = self.pool(&pool) {
                    let applied = p.replace_discovered(&source, &servers);
                    for s in &applied.added {
                        tracing::info!(pool = %pool, server = %s.name, address = %s.address, "server discovered");
                    }
                    for s in &applied.removed {
                        tracing::info!(pool = %pool, server = %s.name, "server no longer in DNS: removed");
                    }
                    self.start_checks(&p, &applied.added);
                }
            }
            Command::Drained { pool, server } => {
                let Ok(p) = self.pool(&pool) else { return };
                // Only if it is still the same server and still on its way out.
                let same = p
                    .server(&server.name)
                    .is_some_and(|s| Arc::ptr_eq(&s, &server));
                if same && server.is_removing() && p.remove(&server.name).is_ok() {
                    tracing::info!(pool = %pool, server = %server.name, "server removed");
                }
            }
        }
    }

    /// Drops what rate limiters and ban tables no longer need.
    fn sweep_filters(&self) {
        for l in &self.shared.state().listeners {
            if let Some(filter) = l.filter() {
                filter.load().sweep();
            }
            let Some(http) = l.http() else { continue };
            let router = http.router.load();
            for (_, t) in &router.routes {
                if let Some(f) = &t.filter {
                    f.sweep();
                }
            }
        }
    }

    fn pool(&self, name: &str) -> Result<Arc<Pool>, ControlError> {
        self.shared
            .pool(name)
            .ok_or_else(|| ControlError::unknown_pool(name))
    }

    fn add_server(
        &mut self,
        pool: &str,
        server: ServerConfig,
    ) -> Result<Arc<Server>, ControlError> {
        let p = self.pool(pool)?;
        let added = p.add(&server, Source::Api)?;
        tracing::info!(pool = %pool, server = %added.name, address = %added.address, "server added");
        self.start_checks(&p, std::slice::from_ref(&added));
        Ok(added)
    }

    fn remove_server(&mut self, pool: &str, name: &str) -> Result<Duration, ControlError> {
        let p = self.pool(pool)?;
        let server = p.begin_removal(name)?;
        let delay = p.config().deregistration_delay;
        tracing::info!(pool = %pool, server = %name, ?delay, "server draining before removal");
        let shared = self.shared.clone();
        let pool = pool.to_owned();
        tokio::spawn(async move {
            let drained = async {
                while server.stats.in_flight() > 0 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            };
            let _ = tokio::time::timeout(delay, drained).await;
            shared.notify(Command::Drained { pool, server });
        });
        Ok(delay)
    }

    fn set_state(
        &mut self,
        pool: &str,
        name: &str,
        state: AdminState,
    ) -> Result<Arc<Server>, ControlError> {
        let p = self.pool(pool)?;
        let server = p.server(name).ok_or_else(|| {
            ControlError::from(MembershipError::UnknownServer {
                pool: pool.to_owned(),
                name: name.to_owned(),
            })
        })?;
        let (new, label) = match state {
            AdminState::Ready => (ServerState::Up, "ready"),
            AdminState::Drain => (ServerState::Draining, "drain"),
            AdminState::Maint => (ServerState::Maint, "maint"),
        };
        if state == AdminState::Ready {
            p.cancel_removal(name);
            if server.state() != ServerState::Up && p.config().slow_start.is_some() {
                server.health.start_ramp();
            }
        }
        server.set_state(new);
        tracing::info!(pool = %pool, server = %name, state = label, "server state set");
        Ok(server)
    }

    /// Re-reads the configuration file and applies it.
    fn reload(&mut self) -> Result<ReloadReport, ControlError> {
        if self.shutdown.is_cancelled() {
            return Err(ControlError::unavailable());
        }
        let Some(path) = self.config_path.clone() else {
            return Err(ControlError::new(
                400,
                "this fulcrum was not started from a configuration file",
                None,
            ));
        };
        let outcome = crate::config::load(&path)
            .map_err(|e| ControlError::new(400, e.to_string(), e.key.as_deref().or(Some("config"))))
            .and_then(|config| {
                crate::runtime::check_capabilities(&config)
                    .map_err(|e| ControlError::new(400, e.to_string(), e.field().as_deref()))?;
                self.prepare(config, None)
                    .map_err(|e| ControlError::new(400, e.to_string(), e.field().as_deref()))
            });
        match outcome {
            Ok(prepared) => {
                let report = self.commit(prepared);
                tracing::info!(file = %path.display(), ?report, "configuration reloaded");
                Ok(report)
            }
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "configuration reload refused; the running configuration stays");
                Err(e)
            }
        }
    }

    /// Validates what a configuration needs beyond its file and binds the listeners it adds.
    pub(crate) fn prepare(
        &mut self,
        config: Config,
        mut inherited: Option<&mut Inherited>,
    ) -> Result<Prepared, StartError> {
        let old = self.shared.state();
        let workers = self.workers.len();
        // Stickiness: kept when its configuration and the store did not change.
        let mut sticky = Vec::with_capacity(config.pools.len());
        for p in &config.pools {
            let kept = old.pool(&p.name).and_then(|e| {
                let same = e.sticky.is_some()
                    && e.pool.config().sticky == p.sticky
                    && old.config.store == config.store;
                same.then(|| e.sticky.clone()).flatten()
            });
            sticky.push(match (&p.sticky, kept) {
                (None, _) => None,
                (Some(_), Some(kept)) => Some(kept),
                (Some(s), None) => Some(Arc::new(Sticky::new(&p.name, s, &config.store).map_err(
                    |message| StartError::Store {
                        pool: p.name.clone(),
                        message,
                    },
                )?)),
            });
        }
        // Bind the listeners that start; a taken port refuses the whole change.
        let mut sockets = HashMap::new();
        for (i, l) in config.listeners.iter().enumerate() {
            if self.kept_listener(&old, &config, i).is_some() {
                continue;
            }
            let bind_err = |source| StartError::Bind {
                name: l.name.clone(),
                index: i,
                addr: l.bind,
                source,
            };
            if l.protocol == Protocol::Udp {
                // A successor taking over binds next to its predecessor (SO_REUSEPORT); otherwise a
                // port another process holds is refused, as for TCP.
                if inherited.is_none() && l.bind.port() != 0 {
                    drop(std::net::UdpSocket::bind(l.bind).map_err(bind_err)?);
                }
                let socket = listener::bind_udp_reuseport(l.bind).map_err(bind_err)?;
                let bound = socket.local_addr().map_err(bind_err)?;
                sockets.insert(i, (bound, Bound::Udp(socket)));
                continue;
            }
            // HTTP listeners accept with delayed ACKs (see `listener::tune_accepting`).
            let delayed_acks = l.protocol != Protocol::Tcp;
            let mut bound_sockets = inherited
                .as_deref_mut()
                .and_then(|inh| inh.take_tcp(&l.name, l.bind))
                .unwrap_or_default();
            for s in &bound_sockets {
                s.set_nonblocking(true).map_err(bind_err)?;
                listener::tune_accepting(s, delayed_acks).map_err(bind_err)?;
            }
            if bound_sockets.is_empty() {
                if l.bind.port() != 0 {
                    // SO_REUSEPORT would let this process share a port another process listens on
                    // (another fulcrum, started twice): find out with a plain bind first.
                    drop(std::net::TcpListener::bind(l.bind).map_err(bind_err)?);
                }
                bound_sockets
                    .push(listener::bind_reuseport(l.bind, delayed_acks).map_err(bind_err)?);
            }
            let bound = bound_sockets[0].local_addr().map_err(bind_err)?;
            while bound_sockets.len() < workers {
                bound_sockets
                    .push(listener::bind_reuseport(bound, delayed_acks).map_err(bind_err)?);
            }
            sockets.insert(i, (bound, Bound::Tcp(bound_sockets)));
        }
        // The access log: kept when its settings did not change, else (re)started.
        let current = self.shared.access_log.load_full();
        let access_log = match (&config.access_log, current) {
            (None, None) => None,
            (Some(want), Some(log)) if log.settings() == want => None,
            (None, Some(_)) => Some(None),
            (Some(want), _) => Some(Some(
                crate::access_log::AccessLog::start(want.clone()).map_err(|source| {
                    StartError::AccessLog {
                        path: match &want.destination {
                            crate::access_log::Destination::File(p) => p.display().to_string(),
                            crate::access_log::Destination::Stdout => "stdout".into(),
                        },
                        source,
                    }
                })?,
            )),
        };
        Ok(Prepared {
            config,
            sticky,
            sockets,
            access_log,
        })
    }

    /// The running listener that listener `i` of `new` continues: same name, address and protocol.
    fn kept_listener<'a>(
        &self,
        old: &'a State,
        new: &Config,
        i: usize,
    ) -> Option<&'a ListenerInfo> {
        let l = &new.listeners[i];
        let before = old.config.listeners.iter().find(|o| o.name == l.name)?;
        if before.bind != l.bind || before.protocol != l.protocol {
            return None;
        }
        old.listeners.iter().find(|o| o.name == l.name)
    }

    /// Applies a prepared configuration. Must run on the control runtime (it spawns health checks).
    pub(crate) fn commit(&mut self, prepared: Prepared) -> ReloadReport {
        let Prepared {
            config,
            sticky,
            mut sockets,
            access_log,
        } = prepared;
        if let Some(log) = access_log {
            self.shared.access_log.store(log);
        }
        let old = self.shared.state();
        let workers = self.workers.len();
        let mut report = ReloadReport::default();
        let ha_identity = |c: &Config| {
            c.ha.as_ref()
                .map(|h| (h.interface.clone(), h.virtual_ip, h.router_id))
        };
        if !old.listeners.is_empty() && ha_identity(&old.config) != ha_identity(&config) {
            tracing::warn!(
                "[ha]: interface, virtual_ip and router_id (or adding/removing [ha]) apply at the next \
                 restart; priority, advert_interval, preempt and fault_when apply now"
            );
        }
        let admin_bind = |c: &Config| c.admin.as_ref().map(|a| a.bind);
        if !old.listeners.is_empty() && admin_bind(&old.config) != admin_bind(&config) {
            tracing::warn!(
                "admin.bind changed: the admin API moves at the next restart or takeover"
            );
        }

        // Pools: reconfigure the ones that stay, create the new ones.
        let mut pools = Vec::with_capacity(config.pools.len());
        for (cfg, sticky) in config.pools.iter().zip(sticky) {
            let pool = match old.pool(&cfg.name) {
                Some(entry) => {
                    let before = entry.pool.config();
                    let applied = entry.pool.reconfigure(cfg);
                    for s in &applied.added {
                        report
                            .servers_added
                            .push(format!("{}/{}", cfg.name, s.name));
                    }
                    for s in &applied.removed {
                        report
                            .servers_removed
                            .push(format!("{}/{}", cfg.name, s.name));
                    }
                    if before.health_check != cfg.health_check {
                        // New checks for every server (their health state stays).
                        let all = entry.pool.snapshot_full().servers.clone();
                        self.start_checks(&entry.pool, &all);
                    } else {
                        self.start_checks(&entry.pool, &applied.added);
                    }
                    entry.pool.clone()
                }
                None => {
                    let pool = Arc::new(Pool::new(cfg));
                    if !old.config.pools.is_empty() || !old.pools.is_empty() {
                        report.pools_added.push(cfg.name.clone());
                    }
                    let all = pool.snapshot_full().servers.clone();
                    self.start_checks(&pool, &all);
                    pool
                }
            };
            // The cache: kept (with its entries) when its settings did not change.
            let caches = cfg
                .cache
                .as_ref()
                .map(|c| kept_cache(&old, &cfg.name, &cfg.name, c))
                .into_iter()
                .collect();
            pools.push(PoolEntry {
                pool,
                sticky,
                caches,
            });
        }
        for entry in &old.pools {
            if !config.pools.iter().any(|p| p.name == entry.pool.name) {
                entry.pool.retire();
                report.pools_removed.push(entry.pool.name.clone());
            }
        }
        self.restart_discovery(&config, &pools);

        // Listeners: swap the routes of the ones that stay, start the new ones, drain the others.
        let store = config.store.clone();
        let route_caches = std::cell::RefCell::new(Vec::new());
        let target = |i: usize,
                      max_body_size: Option<u64>,
                      filter: &crate::config::FilterConfig,
                      cache: &RouteCache,
                      scope: String| Target {
            pool: pools[i].pool.clone(),
            sticky: pools[i].sticky.clone(),
            max_body_size,
            filter: (!filter.is_empty())
                .then(|| Arc::new(Filter::new(filter, None, &store, &scope))),
            cache: match cache {
                RouteCache::Off => None,
                RouteCache::Pool => pools[i].cache().cloned(),
                RouteCache::Own(c) => {
                    let cache = kept_cache(&old, &pools[i].pool.name, &scope, c);
                    route_caches.borrow_mut().push((i, cache.clone()));
                    Some(cache)
                }
            },
        };
        let mut listeners = Vec::with_capacity(config.listeners.len());
        let mut offered = HashMap::new();
        for (i, l) in config.listeners.iter().enumerate() {
            let pool = config.pools[l.pool].name.clone();
            let kept = self.kept_listener(&old, &config, i);
            let kept_handler = kept.map(|k| &k.handler);
            // The protocol side: updated in place when the listener stays, built when it starts.
            let handler = match l.protocol {
                Protocol::Http | Protocol::Https => {
                    let router = HttpRouter {
                        routes: l
                            .routes
                            .iter()
                            .enumerate()
                            .map(|(j, r)| {
                                let scope = format!("{}:route{j}", l.name);
                                (
                                    r.matcher.clone(),
                                    target(r.pool, r.max_body_size, &r.filter, &r.cache, scope),
                                )
                            })
                            .collect(),
                        default: target(
                            l.pool,
                            None,
                            &crate::config::FilterConfig::default(),
                            &RouteCache::Pool,
                            l.name.clone(),
                        ),
                    };
                    match kept_handler {
                        Some(Handler::Http(http)) => {
                            http.router.store(Arc::new(router));
                            let filter = ListenerFilter::new(
                                &l.filter,
                                l.auto_ban.as_ref(),
                                Some(&http.filter.load()),
                                &config.store,
                                &l.name,
                            );
                            http.filter.store(Arc::new(filter));
                            // Certificates were re-read with the configuration: new handshakes use
                            // them, open connections keep theirs.
                            http.tls
                                .store(l.tls.as_ref().and_then(TlsListener::new).map(Arc::new));
                            let settings = ConnSettings::of(l);
                            if *http.builders.load().settings != settings {
                                http.builders.store(Arc::new(Builders::new(settings)));
                            }
                            update_per_ip(&http.per_ip, l.max_connections_per_ip);
                            http.explain.store(explain(l, &config));
                            None
                        }
                        _ => Some(Handler::Http(Arc::new(HttpListener {
                            name: l.name.clone(),
                            proto: l.protocol.as_str(),
                            router: ArcSwap::from_pointee(router),
                            builders: ArcSwap::from_pointee(Builders::new(ConnSettings::of(l))),
                            stats: Default::default(),
                            per_ip: arc_swap::ArcSwapOption::new(
                                l.max_connections_per_ip.map(|n| Arc::new(PerIp::new(n))),
                            ),
                            filter: ArcSwap::from_pointee(ListenerFilter::new(
                                &l.filter,
                                l.auto_ban.as_ref(),
                                None,
                                &config.store,
                                &l.name,
                            )),
                            tls: arc_swap::ArcSwapOption::new(
                                l.tls.as_ref().and_then(TlsListener::new).map(Arc::new),
                            ),
                            access_log: self.shared.access_log.clone(),
                            log_name: Arc::from(l.name.as_str()),
                            explain: arc_swap::ArcSwapOption::new(explain(l, &config)),
                        }))),
                    }
                }
                Protocol::Tcp => {
                    let tcp_target = |p: usize| TcpTarget {
                        pool: pools[p].pool.clone(),
                        sticky: pools[p].sticky.clone(),
                    };
                    let router = TcpRouter {
                        routes: l
                            .routes
                            .iter()
                            .filter_map(|r| Some((r.matcher.sni.clone()?, tcp_target(r.pool))))
                            .collect(),
                        default: tcp_target(l.pool),
                    };
                    match kept_handler {
                        Some(Handler::Tcp(tcp)) => {
                            tcp.router.store(Arc::new(router));
                            let filter = ListenerFilter::new(
                                &l.filter,
                                None,
                                Some(&tcp.filter.load()),
                                &config.store,
                                &l.name,
                            );
                            tcp.filter.store(Arc::new(filter));
                            tcp.settings.store(Arc::new(TcpSettings::of(l)));
                            update_per_ip(&tcp.per_ip, l.max_connections_per_ip);
                            None
                        }
                        _ => Some(Handler::Tcp(Arc::new(TcpProxy {
                            name: l.name.clone(),
                            stats: Default::default(),
                            tcp: Default::default(),
                            per_ip: arc_swap::ArcSwapOption::new(
                                l.max_connections_per_ip.map(|n| Arc::new(PerIp::new(n))),
                            ),
                            filter: ArcSwap::from_pointee(ListenerFilter::new(
                                &l.filter,
                                None,
                                None,
                                &config.store,
                                &l.name,
                            )),
                            router: ArcSwap::from_pointee(router),
                            settings: ArcSwap::from_pointee(TcpSettings::of(l)),
                            access_log: self.shared.access_log.clone(),
                            log_name: Arc::from(l.name.as_str()),
                        }))),
                    }
                }
                Protocol::Udp => {
                    let settings = UdpSettings {
                        idle_timeout: l.idle_timeout,
                        max_flows: l.max_flows,
                    };
                    match kept_handler {
                        Some(Handler::Udp(udp, _)) => {
                            udp.pool.store(pools[l.pool].pool.clone());
                            udp.settings.store(Arc::new(settings));
                            None
                        }
                        _ => Some(Handler::Udp(
                            Arc::new(
                                UdpProxy::new(l.name.clone(), pools[l.pool].pool.clone(), settings)
                                    .with_access_log(self.shared.access_log.clone()),
                            ),
                            Default::default(),
                        )),
                    }
                }
            };
            if let (Some(kept), None) = (kept, &handler) {
                if kept.slots.limit() != l.max_connections {
                    kept.slots.resize(l.max_connections);
                }
                if let Some(s) = self.sockets.load().get(&l.name) {
                    offered.insert(l.name.clone(), s.clone());
                }
                listeners.push(ListenerInfo {
                    pool,
                    ..kept.clone()
                });
                continue;
            }
            let (Some(handler), Some((bound, socks))) = (handler, sockets.remove(&i)) else {
                continue;
            };
            let info = ListenerInfo {
                name: l.name.clone(),
                bound,
                protocol: l.protocol.as_str(),
                pool,
                handler,
                slots: Arc::new(Slots::new(l.max_connections)),
                stop: self.shutdown.child_token(),
                deadline: self.drain_deadline.child_token(),
            };
            match socks {
                Bound::Tcp(socks) => {
                    if self.keep_sockets {
                        let copies: Vec<std::net::TcpListener> =
                            socks.iter().filter_map(|s| s.try_clone().ok()).collect();
                        offered.insert(l.name.clone(), Arc::new(copies));
                    }
                    for (k, socket) in socks.into_iter().enumerate() {
                        let _ = self.workers[k % workers].send(WorkerCommand::Listen {
                            socket,
                            handler: info.handler.clone(),
                            slots: info.slots.clone(),
                            stop: info.stop.clone(),
                            deadline: info.deadline.clone(),
                        });
                    }
                }
                Bound::Udp(socket) => {
                    if let Handler::Udp(proxy, _) = &info.handler {
                        let _ = self.workers[i % workers].send(WorkerCommand::Udp {
                            socket,
                            proxy: proxy.clone(),
                            stop: info.stop.clone(),
                        });
                    }
                }
            }
            if !old.listeners.is_empty() {
                report.listeners_added.push(l.name.clone());
                tracing::info!(listener = %l.name, bind = %bound, "listener added");
            }
            listeners.push(info);
        }
        for l in &old.listeners {
            if listeners.iter().any(|n| n.same(l)) {
                continue;
            }
            report.listeners_removed.push(l.name.clone());
            tracing::info!(listener = %l.name, "listener removed: draining its connections");
            l.stop.cancel();
            let deadline = l.deadline.clone();
            let grace = config.shutdown_timeout;
            tokio::spawn(async move {
                tokio::time::sleep(grace).await;
                deadline.cancel();
            });
        }
        self.sockets.store(Arc::new(offered));
        for (i, cache) in route_caches.into_inner() {
            if !pools[i].caches.iter().any(|c| Arc::ptr_eq(c, &cache)) {
                pools[i].caches.push(cache);
            }
        }
        self.shared.publish(State {
            config,
            pools,
            listeners,
        });
        report
    }

    /// Starts (or restarts) the active health checks of `servers` of `pool`, if it has checks.
    fn start_checks(&mut self, pool: &Pool, servers: &[Arc<Server>]) {
        let cfg = pool.config();
        let Some(check) = &cfg.health_check else {
            for s in servers {
                s.set_checks(None);
                s.health.clear_checks();
            }
            return;
        };
        let pinger = match check.kind {
            crate::config::HealthCheckKind::Icmp => {
                if self.pinger.is_none() {
                    match crate::health::icmp::Pinger::new() {
                        Ok(p) => self.pinger = Some(p),
                        Err(e) => {
                            tracing::error!(pool = %pool.name, error = %e, "icmp health checks cannot run");
                            return;
                        }
                    }
                }
                self.pinger.clone()
            }
            _ => None,
        };
        // A pool that speaks TLS to its servers is checked over TLS too (ALPN for the check's
        // protocol: HTTP/1.1 for `http`, h2 for `grpc`).
        let tls = cfg.tls.as_ref().and_then(|t| {
            let mut client = rustls::ClientConfig::clone(t.client.as_deref()?);
            client.alpn_protocols = match check.kind {
                crate::config::HealthCheckKind::Grpc => vec![b"h2".to_vec()],
                _ => vec![b"http/1.1".to_vec()],
            };
            Some(crate::health::CheckTls {
                connector: tokio_rustls::TlsConnector::from(Arc::new(client)),
                sni: t.sni.clone(),
            })
        });
        for server in servers {
            // The seed spreads the first checks over the first interval, the same way on every start.
            let seed =
                crate::balance::hash_key(format!("{}/{}", pool.name, server.name).as_bytes());
            let spec = crate::health::CheckSpec {
                pool: pool.name.clone(),
                server: server.name.clone(),
                address: server.address,
                cfg: check.clone(),
                pinger: pinger.clone(),
                seed,
                tls: tls.clone(),
            };
            let token = self.stop.child_token();
            server.set_checks(Some(token.clone()));
            crate::health::spawn_checks(spec, server.clone(), token);
        }
    }

    /// Restarts the DNS discovery loop of every pool that has DNS names.
    fn restart_discovery(&mut self, config: &Config, pools: &[PoolEntry]) {
        for (_, token) in self.discovery.drain() {
            token.cancel();
        }
        let mut resolver = None;
        for (cfg, entry) in config.pools.iter().zip(pools) {
            let targets = dns_targets(cfg);
            if targets.is_empty() {
                continue;
            }
            let resolver = match &resolver {
                Some(r) => r,
                None => match Resolver::new(&config.dns_nameservers) {
                    Ok(r) => resolver.insert(r),
                    Err(e) => {
                        tracing::error!(error = %e, "DNS discovery cannot run");
                        return;
                    }
                },
            };
            let token = self.stop.child_token();
            self.discovery.insert(cfg.name.clone(), token.clone());
            tokio::spawn(discover(
                self.shared.clone(),
                resolver.clone(),
                entry.pool.name.clone(),
                targets,
                cfg.resolve_interval,
                token,
            ));
        }
    }

    /// Offers this process's listening sockets at `path` to a successor (`fulcrum run --takeover`):
    /// once it confirms it serves, this process drains and exits.
    pub(crate) fn offer_handoff(&mut self, path: PathBuf, admin: Option<std::net::TcpListener>) {
        let sockets = self.sockets.clone();
        let shared = self.shared.clone();
        let offer = move || {
            let mut out = Vec::new();
            if let Some(s) = admin.as_ref().and_then(|s| s.try_clone().ok()) {
                out.push((
                    crate::runtime::ADMIN_SOCKET.to_owned(),
                    takeover::Kind::Tcp,
                    std::os::fd::OwnedFd::from(s),
                ));
            }
            for (name, socks) in sockets.load().iter() {
                for s in socks.iter() {
                    match s.try_clone() {
                        Ok(s) => out.push((
                            name.clone(),
                            takeover::Kind::Tcp,
                            std::os::fd::OwnedFd::from(s),
                        )),
                        Err(e) => {
                            tracing::error!(listener = %name, error = %e, "cannot offer a socket")
                        }
                    }
                }
            }
            out
        };
        let admin_stop = self.stop.clone();
        let on_ready = move || {
            tracing::info!("a new fulcrum took over the listening sockets: draining");
            if let Some(ha) = &shared.ha {
                ha.keep_address_on_exit();
            }
            shared.request_shutdown();
            // The successor answers the admin API from now on: a change sent here would be lost.
            admin_stop.cancel();
        };
        match takeover::Handoff::serve(&path, offer, on_ready) {
            Ok(h) => {
                tracing::info!(path = %path.display(), "offering the listening sockets to a successor");
                self.handoff = Some(h);
            }
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "cannot offer the listening sockets")
            }
        }
    }
}

/// The filtering configuration of listener `name` in `config` (default when absent).
fn l_filter_config(config: &Config, name: &str) -> crate::config::FilterConfig {
    config
        .listeners
        .iter()
        .find(|l| l.name == name)
        .map(|l| l.filter.clone())
        .unwrap_or_default()
}

/// The DNS targets of a pool: its host-name servers and its `dns_srv`.
fn dns_targets(cfg: &PoolConfig) -> Vec<(String, DnsTarget)> {
    let mut targets: Vec<(String, DnsTarget)> = cfg
        .dns_servers
        .iter()
        .map(|d| {
            (
                d.name.clone(),
                DnsTarget::Host {
                    host: d.host.clone(),
                    port: d.port,
                    weight: d.weight,
                    base_name: d.name.clone(),
                },
            )
        })
        .collect();
    if let Some(name) = &cfg.dns_srv {
        targets.push((name.clone(), DnsTarget::Srv { name: name.clone() }));
    }
    targets
}

/// Resolves a pool's DNS targets now and every `interval`, and sends what changed to the control task.
/// A failed resolution keeps the servers of the last good one.
async fn discover(
    shared: Arc<Shared>,
    resolver: Resolver,
    pool: String,
    targets: Vec<(String, DnsTarget)>,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut last: HashMap<String, Vec<ServerConfig>> = HashMap::new();
    loop {
        for (source, target) in &targets {
            match resolver.resolve(target).await {
                Ok(found) => {
                    let servers: Vec<ServerConfig> = found
                        .into_iter()
                        .map(|d| ServerConfig {
                            name: d.name,
                            address: d.address,
                            weight: d.weight.max(1),
                        })
                        .collect();
                    if last.get(source) != Some(&servers) {
                        last.insert(source.clone(), servers.clone());
                        shared.notify(Command::Discovered {
                            pool: pool.clone(),
                            source: source.clone(),
                            servers,
                        });
                    }
                }
                Err(e) => {
                    tracing::warn!(pool = %pool, target = %source, error = %e, "DNS resolution failed; keeping the servers found before");
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

/// Applies a new `max_connections_per_ip` to a listener that stays.
/// What an HTTP listener's `explain` allows: nothing, or explanations for requests carrying the admin
/// token (when one is set).
fn explain(l: &crate::config::ListenerConfig, config: &Config) -> Option<Arc<Option<String>>> {
    l.explain
        .then(|| Arc::new(config.admin.as_ref().and_then(|a| a.token.clone())))
}

fn update_per_ip(per_ip: &arc_swap::ArcSwapOption<PerIp>, limit: Option<usize>) {
    let current = per_ip.load().as_ref().map(|p| p.limit());
    if current != limit {
        per_ip.store(limit.map(|n| Arc::new(PerIp::new(n))));
    }
}

/// The running cache of `pool` at `scope` when its settings are `config`, else a new, empty one.
fn kept_cache(
    old: &State,
    pool: &str,
    scope: &str,
    config: &crate::config::CacheConfig,
) -> Arc<crate::cache::Cache> {
    old.pool(pool)
        .and_then(|e| {
            e.caches
                .iter()
                .find(|c| c.scope == scope && c.config == *config)
                .cloned()
        })
        .unwrap_or_else(|| Arc::new(crate::cache::Cache::new(pool, scope, config)))
}

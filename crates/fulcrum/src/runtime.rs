//! Builds the running system from a [`Config`] and runs it: worker threads that serve the listeners,
//! an admin thread, and a graceful stop.
//!
//! Threads: one worker per available core, each a single-threaded tokio runtime with its own
//! `SO_REUSEPORT` socket per listener, so the kernel spreads connections and a request never crosses
//! threads (no work-stealing, no cross-core wakeups). Pools, servers and counters are shared and only
//! touched with atomics. The admin API runs on its own thread so that it answers even when the workers
//! are saturated.
//!
//! Stopping: [`Running::shutdown`] marks the system draining (`/readyz` answers 503), closes the
//! listening sockets, asks every open connection to close after its current request, and waits for
//! them up to `shutdown_timeout`; what is still open then is cut.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Protocol};
use crate::http::proxy::{HttpListener, HttpRouter, ListenerStats, Target};
use crate::http::server::{self, ServeOptions};
use crate::http::upstream;
use crate::pool::Pool;
use crate::sticky::Sticky;

/// A listener as the admin side sees it.
#[derive(Debug)]
pub struct ListenerInfo {
    /// Its name from the configuration.
    pub name: String,
    /// The address actually bound (differs from the configuration when it asked for port 0).
    pub bound: SocketAddr,
    /// `http`, `tcp`, …
    pub protocol: &'static str,
    /// The HTTP request path's state (routes, counters).
    pub http: Arc<HttpListener>,
}

/// State shared by the workers and the admin side.
#[derive(Debug)]
pub struct Shared {
    /// The configuration the system was built from.
    pub config: Config,
    /// Every pool, in configuration order.
    pub pools: Vec<Arc<Pool>>,
    /// Every listener, in configuration order.
    pub listeners: Vec<ListenerInfo>,
    /// When the system started.
    pub started: Instant,
    draining: AtomicBool,
}

impl Shared {
    /// True once a graceful stop has begun.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}

/// Why the system could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listening socket could not be bound.
    #[error("listener `{name}`: cannot bind {addr}: {source}")]
    Bind {
        name: String,
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
    /// ICMP health checks are configured but this process may not send ICMP.
    #[error("pool `{pool}`: {message}")]
    Icmp { pool: String, message: String },
    /// A thread or runtime could not be created.
    #[error("cannot start: {0}")]
    Io(#[from] std::io::Error),
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

fn bind_reuseport(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol as SockProto, Socket, Type};
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM,
        Some(SockProto::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
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
    start_with_workers(config, default_workers())
}

/// Starts the system described by `config` with `workers` worker threads.
pub fn start_with_workers(config: Config, workers: usize) -> Result<Running, StartError> {
    raise_fd_limit();
    check_capabilities(&config)?;
    let workers = workers.max(1);
    let pools: Vec<Arc<Pool>> = config
        .pools
        .iter()
        .map(|p| Arc::new(Pool::new(p, workers)))
        .collect();

    // One stickiness (and stick table) per pool, shared by every route to it.
    let mut sticky: Vec<Option<Arc<Sticky>>> = Vec::with_capacity(config.pools.len());
    for p in &config.pools {
        sticky.push(match &p.sticky {
            Some(s) => Some(Arc::new(Sticky::new(&p.name, s, &config.store).map_err(
                |message| StartError::Store {
                    pool: p.name.clone(),
                    message,
                },
            )?)),
            None => None,
        });
    }

    // Bind everything first, so that a taken port fails the start before any thread runs.
    let mut listeners = Vec::new();
    let mut sockets: Vec<Vec<std::net::TcpListener>> = (0..workers).map(|_| Vec::new()).collect();
    let mut options = Vec::new();
    for l in &config.listeners {
        let protocol = match l.protocol {
            Protocol::Http => "http",
            // Rejected by configuration validation until their listeners land.
            Protocol::Https | Protocol::Tcp | Protocol::Udp => unreachable!("validated"),
        };
        let bind_err = |source| StartError::Bind {
            name: l.name.clone(),
            addr: l.bind,
            source,
        };
        let first = bind_reuseport(l.bind).map_err(bind_err)?;
        let bound = first.local_addr().map_err(bind_err)?;
        sockets[0].push(first);
        for worker_sockets in sockets.iter_mut().skip(1) {
            worker_sockets.push(bind_reuseport(bound).map_err(bind_err)?);
        }
        let target = |i: usize| Target {
            pool: pools[i].clone(),
            sticky: sticky[i].clone(),
        };
        let router = HttpRouter {
            routes: l
                .routes
                .iter()
                .map(|r| (r.matcher.clone(), target(r.pool)))
                .collect(),
            default: target(l.pool),
        };
        let http = Arc::new(HttpListener {
            name: l.name.clone(),
            proto: "http",
            router,
            stats: ListenerStats::default(),
        });
        options.push(ServeOptions {
            request_header_timeout: l.request_header_timeout,
            max_connections: Arc::new(Semaphore::new(l.max_connections)),
        });
        listeners.push(ListenerInfo {
            name: l.name.clone(),
            bound,
            protocol,
            http,
        });
    }
    let admin_socket = match &config.admin {
        Some(a) => Some(
            std::net::TcpListener::bind(a.bind)
                .and_then(|s| s.set_nonblocking(true).map(|_| s))
                .map_err(|source| StartError::AdminBind {
                    addr: a.bind,
                    source,
                })?,
        ),
        None => None,
    };
    let admin_addr = admin_socket.as_ref().and_then(|s| s.local_addr().ok());

    let shared = Arc::new(Shared {
        config,
        pools,
        listeners,
        started: Instant::now(),
        draining: AtomicBool::new(false),
    });
    let shutdown = CancellationToken::new();
    let drain_deadline = CancellationToken::new();
    let admin_stop = CancellationToken::new();
    let (done_tx, done) = mpsc::channel();
    let mut threads = Vec::new();

    for (id, worker_sockets) in sockets.into_iter().enumerate() {
        let shared = shared.clone();
        let options = options.clone();
        let shutdown = shutdown.clone();
        let drain_deadline = drain_deadline.clone();
        let done_tx = done_tx.clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        threads.push(std::thread::Builder::new().name(format!("fulcrum-worker-{id}")).spawn(move || {
            upstream::set_worker_id(id);
            rt.block_on(async move {
                let mut tasks = tokio::task::JoinSet::new();
                for ((socket, info), opts) in worker_sockets.into_iter().zip(&shared.listeners).zip(options) {
                    let listener = match tokio::net::TcpListener::from_std(socket) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!(listener = %info.name, error = %e, "cannot register listener");
                            continue;
                        }
                    };
                    tasks.spawn(server::serve(
                        listener,
                        info.http.clone(),
                        opts,
                        shutdown.clone(),
                        drain_deadline.clone(),
                    ));
                }
                while tasks.join_next().await.is_some() {}
            });
            let _ = done_tx.send(());
        })?);
    }

    // The control thread: the admin API (if configured) and the active health checks, apart from the
    // workers so that both keep their pace when the workers are saturated.
    {
        let shared = shared.clone();
        let stop = admin_stop.clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        threads.push(
            std::thread::Builder::new()
                .name("fulcrum-control".into())
                .spawn(move || {
                    rt.block_on(async move {
                        start_health_checks(&shared, &stop);
                        match admin_socket.map(tokio::net::TcpListener::from_std) {
                            Some(Ok(listener)) => crate::admin::serve(listener, shared, stop).await,
                            Some(Err(e)) => {
                                tracing::error!(error = %e, "cannot register admin listener")
                            }
                            None => stop.cancelled().await,
                        }
                    });
                })?,
        );
    }

    for l in &shared.listeners {
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

/// Starts the active health checks of every pool that has them, on the current (control) runtime.
fn start_health_checks(shared: &Shared, stop: &CancellationToken) {
    for (pool, cfg) in shared.pools.iter().zip(&shared.config.pools) {
        let Some(check) = &cfg.health_check else {
            continue;
        };
        let pinger = match check.kind {
            crate::config::HealthCheckKind::Icmp => match crate::health::icmp::Pinger::new() {
                Ok(p) => Some(p),
                Err(e) => {
                    tracing::error!(pool = %pool.name, error = %e, "icmp health checks cannot run");
                    continue;
                }
            },
            _ => None,
        };
        for server in &pool.snapshot_full().servers {
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
            };
            crate::health::spawn_checks(spec, server.clone(), stop.clone());
        }
        tracing::info!(pool = %pool.name, kind = check.kind.as_str(), interval = ?check.interval, "health checks started");
    }
}

impl Running {
    /// The shared state (pools, listeners, counters).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The address a listener is bound to, by name.
    pub fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        self.shared
            .listeners
            .iter()
            .find(|l| l.name == name)
            .map(|l| l.bound)
    }

    /// The admin API's address, when configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Begins a graceful stop: no new connections, open ones finish their current request.
    pub fn shutdown(&self) {
        if !self.shared.draining.swap(true, Ordering::Relaxed) {
            tracing::info!(timeout = ?self.shared.config.shutdown_timeout, "draining");
        }
        self.shutdown.cancel();
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
        let deadline = Instant::now() + self.shared.config.shutdown_timeout;
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

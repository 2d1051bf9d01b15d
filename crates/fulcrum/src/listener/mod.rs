//! Protocol-neutral listeners: the accept loop, connection slots, accept backoff and drain, shared by
//! every kind of listener. A protocol plugs in as a [`ConnHandler`], which gets each accepted
//! connection (HTTP is one: [`crate::http::server::HttpHandler`]).
//!
//! Each worker thread runs its own accept loop on its own `SO_REUSEPORT` socket of the listener. A full
//! listener (at `max_connections`) holds the connection it just accepted until a slot frees and stops
//! accepting, so further clients wait in the kernel's backlog instead of failing. Accept errors (out of
//! file descriptors) back off instead of spinning.
//!
//! A listener stops when its `stop` token fires — at shutdown, or when a reload removes it — and then
//! lets its open connections finish until its `deadline` token fires.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Live counters of one listener.
#[derive(Debug, Default)]
pub struct ListenerStats {
    /// Client connections open now.
    pub active_connections: AtomicI64,
    /// Of those, the ones parked without a task while they wait for a request (HTTP/1 on plain TCP).
    pub parked_connections: AtomicI64,
    /// Client connections accepted so far.
    pub connections_total: AtomicU64,
    /// Responses sent to clients by status class (1xx … 5xx), fulcrum's own included (HTTP only).
    pub responses: [AtomicU64; 5],
    /// Connections refused because their client address was at `max_connections_per_ip`.
    pub refused_per_ip: AtomicU64,
    /// Connections closed because the client sent nothing, or nothing more, for `idle_timeout`.
    pub idle_timeouts: AtomicU64,
    /// Connections cut because the client read nothing of its response for `write_timeout`.
    pub write_timeouts: AtomicU64,
    /// Response body bytes moved to clients with `splice(2)`, kernel to kernel (HTTP/1 on plain TCP).
    pub spliced_bytes: AtomicU64,
    /// TLS handshakes completed (https).
    pub tls_handshakes: AtomicU64,
    /// TLS handshakes that failed or timed out (https).
    pub tls_handshake_failures: AtomicU64,
    /// TLS handshakes that resumed an earlier session (https).
    pub tls_resumed: AtomicU64,
}

impl ListenerStats {
    /// Responses sent so far.
    pub fn requests_total(&self) -> u64 {
        self.responses
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    /// Counts a response with `status`.
    #[inline]
    pub fn count(&self, status: u16) {
        let class = usize::from((status / 100).clamp(1, 5)) - 1;
        self.responses[class].fetch_add(1, Ordering::Relaxed);
    }
}

/// The connection slots of a listener (`max_connections`), shared by its accept loops on every worker
/// and resizable at reload.
#[derive(Debug)]
pub struct Slots {
    semaphore: Arc<Semaphore>,
    limit: std::sync::Mutex<usize>,
}

impl Slots {
    /// `limit` slots.
    pub fn new(limit: usize) -> Self {
        Slots {
            semaphore: Arc::new(Semaphore::new(limit)),
            limit: std::sync::Mutex::new(limit),
        }
    }

    /// The configured limit.
    pub fn limit(&self) -> usize {
        *self.limit.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes the limit: more slots free at once; fewer are taken back as connections close.
    pub fn resize(&self, limit: usize) {
        let mut current = self.limit.lock().unwrap_or_else(|e| e.into_inner());
        if limit > *current {
            self.semaphore.add_permits(limit - *current);
        } else if limit < *current {
            let mut owed = *current - limit;
            owed -= self.semaphore.forget_permits(owed);
            if owed > 0 {
                // Permits held by open connections: take them back as they are released.
                let semaphore = self.semaphore.clone();
                tokio::spawn(async move {
                    for _ in 0..owed {
                        match semaphore.acquire().await {
                            Ok(p) => p.forget(),
                            Err(_) => return,
                        }
                    }
                });
            }
        }
        *current = limit;
    }
}

/// One accepted connection, handed to a [`ConnHandler`] with what governs its life.
#[derive(Debug)]
pub struct Accepted<S = TcpStream> {
    /// The client's socket (or, once a handler has wrapped it, e.g. in TLS, that stream).
    pub stream: S,
    /// The client's address.
    pub peer: SocketAddr,
    /// Fires when the listener stops: finish the current exchange and close.
    pub stop: CancellationToken,
    /// Fires when the connection must close now.
    pub deadline: CancellationToken,
    /// Tasks that outlive the connection's own (a WebSocket tunnel) are spawned here, so that a drain
    /// waits for them too.
    pub tracker: TaskTracker,
    /// Keeps the connection counted (its slot, its client address's share, the open-connections gauge)
    /// for as long as it, or anything it handed over to (a tunnel), is alive.
    pub guard: Arc<ConnGuard>,
    /// Where a connection that waits long for its client parks without a task (see [`Parking`]).
    pub parking: Arc<Parking>,
}

/// A connection parked without a task: it is resumed by its socket's readiness (its own business),
/// and closed from here when its idle deadline passes or the listener stops.
pub trait Parked: Send + Sync {
    /// When the connection's wait ends without a request.
    fn until(&self) -> tokio::time::Instant;

    /// Closes the connection unless it was resumed already; `timeout`: its deadline passed (else
    /// the listener stops). False when it was resumed.
    fn close(&self, timeout: bool) -> bool;
}

/// The parked connections of one listener on one worker. A connection with no request under way for
/// a while gives up its task (most of what an idle connection costs) and waits here: its socket's
/// readiness starts a new task for it, and the accept loop closes it when its idle deadline passes
/// (checked every [`SWEEP_EVERY`]) or at once when the listener stops.
#[derive(Default)]
pub struct Parking {
    set: std::sync::Mutex<ParkSet>,
}

#[derive(Default)]
struct ParkSet {
    conns: slab::Slab<Arc<dyn Parked>>,
    /// The listener stopped: nothing parks any more.
    closed: bool,
}

impl std::fmt::Debug for Parking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parking")
            .field("parked", &self.len())
            .finish()
    }
}

/// How often the accept loop closes parked connections whose idle deadline passed.
pub const SWEEP_EVERY: Duration = Duration::from_millis(250);

impl Parking {
    fn lock(&self) -> std::sync::MutexGuard<'_, ParkSet> {
        self.set.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Parks a connection made by `make` from its key here; `None` once the listener stopped.
    pub fn park<P: Parked + 'static>(&self, make: impl FnOnce(usize) -> Arc<P>) -> Option<Arc<P>> {
        let mut set = self.lock();
        if set.closed {
            return None;
        }
        let entry = set.conns.vacant_entry();
        let parked = make(entry.key());
        entry.insert(parked.clone());
        Some(parked)
    }

    /// Forgets the connection parked at `key` (it was resumed).
    pub fn unpark(&self, key: usize, which: &Arc<dyn Parked>) {
        let mut set = self.lock();
        if set.conns.get(key).is_some_and(|p| Arc::ptr_eq(p, which)) {
            set.conns.remove(key);
        }
    }

    /// Closes the parked connections whose deadline is `now` or earlier; how many.
    pub fn sweep(&self, now: tokio::time::Instant) -> usize {
        let mut closed = 0;
        self.lock().conns.retain(|_, p| {
            let done = p.until() <= now && p.close(true);
            closed += usize::from(done);
            !done
        });
        closed
    }

    /// The listener stops: closes every parked connection, and nothing parks any more.
    pub fn close_all(&self) {
        let mut set = self.lock();
        set.closed = true;
        for p in set.conns.drain() {
            p.close(false);
        }
    }

    /// Connections parked now.
    pub fn len(&self) -> usize {
        self.lock().conns.len()
    }

    /// Whether none is parked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Closes the parked connections of an accept loop when it ends, however it ends: a parked
/// connection, its socket's registration (which holds its waker) and this set refer to each other,
/// and closing it is what breaks that.
struct CloseParked(Arc<Parking>);

impl Drop for CloseParked {
    fn drop(&mut self) {
        self.0.close_all();
    }
}

/// What keeps an accepted connection counted; dropping the last clone frees its slot.
#[derive(Debug)]
pub struct ConnGuard {
    _permit: OwnedSemaphorePermit,
    stats: Arc<ListenerStats>,
    per_ip: Option<(Arc<PerIp>, IpAddr)>,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.stats
            .active_connections
            .fetch_sub(1, Ordering::Relaxed);
        if let Some((per_ip, ip)) = &self.per_ip {
            per_ip.release(*ip);
        }
    }
}

/// Open connections per client address (`max_connections_per_ip`).
#[derive(Debug)]
pub struct PerIp {
    limit: usize,
    open: std::sync::Mutex<std::collections::HashMap<IpAddr, usize>>,
}

impl PerIp {
    /// At most `limit` open connections per client address.
    pub fn new(limit: usize) -> Self {
        PerIp {
            limit,
            open: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<IpAddr, usize>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one more connection from `ip`; false (and nothing counted) when it is at its limit.
    fn acquire(&self, ip: IpAddr) -> bool {
        let mut open = self.lock();
        let n = open.entry(ip).or_insert(0);
        if *n >= self.limit {
            return false;
        }
        *n += 1;
        true
    }

    /// The limit.
    pub fn limit(&self) -> usize {
        self.limit
    }

    fn release(&self, ip: IpAddr) {
        let mut open = self.lock();
        if let Some(n) = open.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&ip);
            }
        }
    }
}

/// What serves the connections a listener accepts.
pub trait ConnHandler: Send + Sync + 'static {
    /// Serves one accepted connection to its end.
    fn serve(self: Arc<Self>, conn: Accepted) -> impl Future<Output = ()> + Send;

    /// The listener's name, for logs.
    fn name(&self) -> &str;

    /// The listener's counters.
    fn stats(&self) -> &Arc<ListenerStats>;

    /// The per-client-address limit, if any.
    fn per_ip(&self) -> Option<Arc<PerIp>> {
        None
    }

    /// Whether a client at `ip` may connect at all (access lists, bans); refused ones are closed at
    /// once, before a byte is read.
    fn admit(&self, _ip: IpAddr) -> bool {
        true
    }
}

/// Accepts and serves connections until `stop` fires, then lets open connections finish (each is
/// told to close after its current exchange) until `deadline` fires.
pub async fn serve<H: ConnHandler>(
    listener: TcpListener,
    handler: Arc<H>,
    slots: Arc<Slots>,
    stop: CancellationToken,
    deadline: CancellationToken,
) {
    let tracker = TaskTracker::new();
    let parking = Arc::new(Parking::default());
    let _close_parked = CloseParked(parking.clone());
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut backoff = Duration::from_millis(5);
    loop {
        let (stream, addr) = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            now = sweep.tick() => {
                parking.sweep(now);
                continue;
            }
            r = listener.accept() => match r {
                Ok(pair) => { backoff = Duration::from_millis(5); pair }
                Err(e) => {
                    tracing::warn!(listener = %handler.name(), error = %e, "accept failed; backing off");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
        };
        let stats = handler.stats().clone();
        if !handler.admit(addr.ip()) {
            continue;
        }
        // A client at its share of connections is refused at once (the socket closes).
        let per_ip = handler.per_ip();
        if let Some(per_ip) = &per_ip {
            if !per_ip.acquire(addr.ip()) {
                stats.refused_per_ip.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        }
        let per_ip = per_ip.map(|p| (p, addr.ip()));
        // Accept first, then wait for a slot: a permit taken before `accept` could sit idle on this
        // worker's socket while the next client queues on another worker's socket.
        let permit = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            p = slots.semaphore.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        stats.active_connections.fetch_add(1, Ordering::Relaxed);
        stats.connections_total.fetch_add(1, Ordering::Relaxed);
        let guard = Arc::new(ConnGuard {
            _permit: permit,
            stats,
            per_ip,
        });
        let conn = Accepted {
            stream,
            peer: addr,
            stop: stop.clone(),
            deadline: deadline.clone(),
            tracker: tracker.clone(),
            guard,
            parking: parking.clone(),
        };
        tracker.spawn(handler.clone().serve(conn));
    }
    drop(listener);
    parking.close_all();
    tracker.close();
    tokio::select! {
        _ = tracker.wait() => {}
        _ = deadline.cancelled() => {}
    }
}

/// Binds a TCP listening socket with `SO_REUSEPORT`, so that every worker (and, during a takeover,
/// the next process) can have its own socket on the same address; `delayed_acks` as
/// [`tune_accepting`].
pub fn bind_reuseport(
    addr: SocketAddr,
    delayed_acks: bool,
) -> std::io::Result<std::net::TcpListener> {
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
    let listener = socket.into();
    tune_accepting(&listener, delayed_acks)?;
    Ok(listener)
}

/// Options every connection accepted on `listener` inherits, so they cost no system call per
/// connection: `TCP_NODELAY`, and on Linux the ACK mode. With `delayed_acks` (HTTP listeners)
/// `TCP_QUICKACK` is off, so that the ACK of a request rides on its answer instead of going out
/// alone (one segment less per new connection), as HAProxy's `tcp-smart-accept` does on its HTTP
/// frontends. TCP listeners keep the kernel's quick ACKs at a connection's start, as HAProxy's TCP
/// frontends do: a client of an unknown protocol that writes twice with Nagle on before it reads
/// would wait for a delayed ACK. The kernel resets the ACK mode at `listen(2)`, so this comes after
/// it; an inherited socket gets it again.
pub fn tune_accepting(listener: &std::net::TcpListener, delayed_acks: bool) -> std::io::Result<()> {
    let socket = socket2::SockRef::from(listener);
    socket.set_tcp_nodelay(true)?;
    #[cfg(target_os = "linux")]
    socket.set_tcp_quickack(!delayed_acks)?;
    #[cfg(not(target_os = "linux"))]
    let _ = delayed_acks;
    Ok(())
}

/// Binds a UDP socket with `SO_REUSEPORT` (non-blocking), so that a successor process taking over can
/// bind the same port while this one still drains.
pub fn bind_udp_reuseport(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol as SockProto, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(SockProto::UDP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

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
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Live counters of one listener.
#[derive(Debug, Default)]
pub struct ListenerStats {
    /// Client connections open now.
    pub active_connections: AtomicI64,
    /// Client connections accepted so far.
    pub connections_total: AtomicU64,
    /// Responses sent to clients by status class (1xx … 5xx), fulcrum's own included (HTTP only).
    pub responses: [AtomicU64; 5],
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

/// What serves the connections a listener accepts.
pub trait ConnHandler: Send + Sync + 'static {
    /// Serves one accepted connection to its end. `stop` fires when the listener stops (the
    /// connection should finish its current exchange and close); `deadline` when it must close now.
    fn serve(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        stop: CancellationToken,
        deadline: CancellationToken,
    ) -> impl Future<Output = ()> + Send;

    /// The listener's name, for logs.
    fn name(&self) -> &str;

    /// The listener's counters.
    fn stats(&self) -> &ListenerStats;
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
    let mut backoff = Duration::from_millis(5);
    loop {
        let (stream, addr) = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
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
        let _ = stream.set_nodelay(true);
        let stats = handler.stats();
        stats.active_connections.fetch_add(1, Ordering::Relaxed);
        stats.connections_total.fetch_add(1, Ordering::Relaxed);
        let handler = handler.clone();
        let stop = stop.clone();
        let deadline = deadline.clone();
        tracker.spawn(async move {
            handler.clone().serve(stream, addr, stop, deadline).await;
            handler
                .stats()
                .active_connections
                .fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    }
    drop(listener);
    tracker.close();
    tokio::select! {
        _ = tracker.wait() => {}
        _ = deadline.cancelled() => {}
    }
}

/// Binds a TCP listening socket with `SO_REUSEPORT`, so that every worker (and, during a takeover,
/// the next process) can have its own socket on the same address.
pub fn bind_reuseport(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
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

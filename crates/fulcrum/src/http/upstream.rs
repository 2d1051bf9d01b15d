//! Connections to servers: HTTP/1.1 with keep-alive, pooled per server and per worker thread.
//!
//! Each worker thread keeps its own stack of idle connections per server, so checking one out takes an
//! uncontended lock and no hashing. A connection goes back to the stack only when the response body it
//! carried has been read to its end (see [`super::body`]); a connection whose response was abandoned is
//! closed, never reused with bytes still in flight.

use std::cell::Cell;
use std::io;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Idle connections kept per server and worker; more are closed when returned.
const MAX_IDLE_PER_WORKER: usize = 512;

thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// Marks the current thread as worker `id` (selects its idle-connection stacks).
pub fn set_worker_id(id: usize) {
    WORKER.with(|w| w.set(id));
}

/// A request sender on an established HTTP/1.1 connection.
pub type Sender = SendRequest<Incoming>;

/// Idle keep-alive connections to one server, one stack per worker thread.
#[derive(Debug)]
pub struct IdleConns {
    per_worker: Box<[Mutex<Vec<Sender>>]>,
}

impl IdleConns {
    /// Empty stacks for `workers` worker threads.
    pub fn new(workers: usize) -> Self {
        IdleConns {
            per_worker: (0..workers.max(1))
                .map(|_| Mutex::new(Vec::new()))
                .collect(),
        }
    }

    fn slot(&self) -> &Mutex<Vec<Sender>> {
        let id = WORKER.with(Cell::get);
        &self.per_worker[id % self.per_worker.len()]
    }

    /// The most recently used idle connection that is still open.
    #[inline]
    pub fn take(&self) -> Option<Sender> {
        let mut stack = self.slot().lock().unwrap_or_else(|e| e.into_inner());
        while let Some(sender) = stack.pop() {
            if !sender.is_closed() {
                return Some(sender);
            }
        }
        None
    }

    /// Returns a connection whose last exchange is complete.
    #[inline]
    pub fn put(&self, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let mut stack = self.slot().lock().unwrap_or_else(|e| e.into_inner());
        if stack.len() < MAX_IDLE_PER_WORKER {
            stack.push(sender);
        }
    }

    /// Closes every idle connection (the server is being removed).
    pub fn clear(&self) {
        for slot in self.per_worker.iter() {
            slot.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
    }
}

/// Why a connection could not be established.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The TCP connect failed (refused, unreachable, reset).
    #[error("connect to {0}: {1}")]
    Io(SocketAddr, io::Error),
    /// The TCP connect did not complete within the pool's `connect_timeout`.
    #[error("connect to {0}: timed out after {1:?}")]
    Timeout(SocketAddr, Duration),
    /// The HTTP/1.1 handshake failed.
    #[error("handshake with {0}: {1}")]
    Handshake(SocketAddr, hyper::Error),
}

/// Opens a new HTTP/1.1 connection to `addr` and spawns its driver on the current runtime.
pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<Sender, ConnectError> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(ConnectError::Io(addr, e)),
        Err(_) => return Err(ConnectError::Timeout(addr, timeout)),
    };
    let _ = stream.set_nodelay(true);
    let (sender, conn) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| ConnectError::Handshake(addr, e))?;
    tokio::spawn(async move {
        // Upgrades (WebSocket) take the connection over; otherwise it ends when the server or the last
        // sender closes it. Errors here were already reported to the request that saw them.
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(server = %addr, error = %e, "server connection closed");
        }
    });
    Ok(sender)
}

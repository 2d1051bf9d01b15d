//! Accepting client connections and serving HTTP/1.1 and h2c (prior knowledge) on them with hyper.
//!
//! Each worker thread runs its own accept loop on its own `SO_REUSEPORT` socket. Accepting waits for a
//! permit of the listener's connection limit, so a full listener leaves new connections in the kernel's
//! backlog instead of failing them. Accept errors (out of file descriptors) back off instead of spinning.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::proxy::{self, Client, HttpListener};

/// The answer to a client that started a request head and did not finish it in time.
const REQUEST_TIMEOUT_RESPONSE: &[u8] = b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n\
content-length: 60\r\nconnection: close\r\n\r\n408 Request Timeout: the request head did not arrive in time\n";

/// Connection-level settings of an HTTP listener.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// A request head must arrive within this (an idle keep-alive connection is closed after it too).
    pub request_header_timeout: Duration,
    /// Open client connections allowed at once (shared by every worker).
    pub max_connections: Arc<Semaphore>,
}

/// Builds the hyper connection builder shared by every connection of a listener.
pub fn builder(opts: &ServeOptions) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1().timer(TokioTimer::new()).header_read_timeout(opts.request_header_timeout).keep_alive(true);
    b.http2().timer(TokioTimer::new()).max_concurrent_streams(256);
    b
}

/// Accepts and serves connections until `shutdown` fires, then lets open connections finish (each
/// is told to close after its current request) until `drain_deadline` fires.
pub async fn serve(
    listener: TcpListener,
    http: Arc<HttpListener>,
    opts: ServeOptions,
    shutdown: CancellationToken,
    drain_deadline: CancellationToken,
) {
    let builder = Arc::new(builder(&opts));
    let graceful = GracefulShutdown::new();
    let mut backoff = Duration::from_millis(5);
    loop {
        let permit = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            p = opts.max_connections.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, addr) = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(pair) => { backoff = Duration::from_millis(5); pair }
                Err(e) => {
                    tracing::warn!(listener = %http.name, error = %e, "accept failed; backing off");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let http = http.clone();
        let builder = builder.clone();
        let timed_out = Arc::new(AtomicBool::new(false));
        let io = TokioIo::new(ClientIo::new(stream, timed_out.clone()));
        let client = Client::new(addr);
        http.stats.active_connections.fetch_add(1, Ordering::Relaxed);
        http.stats.connections_total.fetch_add(1, Ordering::Relaxed);
        let svc_http = http.clone();
        let svc = service_fn(move |req| proxy::handle(svc_http.clone(), client.clone(), req));
        let conn = graceful.watch(builder.serve_connection_with_upgrades(io, svc).into_owned());
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                let header_timeout =
                    e.downcast_ref::<hyper::Error>().is_some_and(|e| e.is_timeout());
                if header_timeout {
                    timed_out.store(true, Ordering::Relaxed);
                } else {
                    tracing::debug!(client = %addr, error = %e, "client connection ended with an error");
                }
            }
            http.stats.active_connections.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = drain_deadline.cancelled() => {}
    }
}

/// A client connection that remembers whether a request head is half-read, so that a header timeout
/// can be answered with 408 (hyper itself just closes the connection).
///
/// When the connection is dropped after a header timeout, and bytes of a new request had arrived
/// since the last response, it writes the 408 before closing; an idle keep-alive connection that
/// times out is closed silently, as HAProxy does.
struct ClientIo {
    stream: TcpStream,
    /// Bytes were read since the last write: a request is being received.
    partial: bool,
    timed_out: Arc<AtomicBool>,
}

impl ClientIo {
    fn new(stream: TcpStream, timed_out: Arc<AtomicBool>) -> Self {
        ClientIo { stream, partial: false, timed_out }
    }
}

impl Drop for ClientIo {
    fn drop(&mut self) {
        if self.partial && self.timed_out.load(Ordering::Relaxed) {
            // A short write on a socket with an empty send buffer; if it cannot go out now, the
            // client was not going to read it either.
            let _ = self.stream.try_write(REQUEST_TIMEOUT_RESPONSE);
        }
    }
}

impl AsyncRead for ClientIo {
    #[inline]
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.partial = true;
        }
        r
    }
}

impl AsyncWrite for ClientIo {
    #[inline]
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.partial = false;
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    #[inline]
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.partial = false;
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    #[inline]
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    #[inline]
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    #[inline]
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

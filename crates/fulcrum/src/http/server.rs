//! Serving HTTP/1.1 and h2c (prior knowledge) with hyper on the client connections an HTTP listener
//! accepts (the accept loop itself is protocol-neutral: [`crate::listener`]).
//!
//! The protocol is told from the first bytes (`PRI` starts the HTTP/2 preface) with one `peek`, under
//! the request-header timeout, so a connection that never sends anything is closed like an idle one.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::proxy::{self, Client, HttpListener};
use crate::listener::{ConnHandler, ListenerStats};

/// The answer to a client that started a request head and did not finish it in time.
const REQUEST_TIMEOUT_RESPONSE: &[u8] = b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n\
content-length: 60\r\nconnection: close\r\n\r\n408 Request Timeout: the request head did not arrive in time\n";

/// The start of the HTTP/2 connection preface.
const H2_PREFACE_START: &[u8] = b"PRI ";

/// hyper's connection builders of one listener, rebuilt when a reload changes its settings.
#[derive(Debug)]
pub struct Builders {
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
    header_timeout: Duration,
}

impl Builders {
    /// Builders whose request heads must arrive within `request_header_timeout` (an idle keep-alive
    /// connection is closed after it too).
    pub fn new(request_header_timeout: Duration) -> Self {
        let mut h1 = http1::Builder::new();
        h1.timer(TokioTimer::new())
            .header_read_timeout(request_header_timeout)
            .keep_alive(true);
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new()).max_concurrent_streams(256);
        Builders {
            h1,
            h2,
            header_timeout: request_header_timeout,
        }
    }

    /// The request-header timeout these builders apply.
    pub fn header_timeout(&self) -> Duration {
        self.header_timeout
    }
}

impl ConnHandler for HttpListener {
    async fn serve(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        stop: CancellationToken,
        deadline: CancellationToken,
    ) {
        let builders = self.builders.load_full();
        serve_connection(
            stream,
            Client::new(peer),
            &self,
            &builders,
            &stop,
            &deadline,
        )
        .await;
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn stats(&self) -> &ListenerStats {
        &self.stats
    }
}

/// Is this connection HTTP/2 with prior knowledge? `None` when it closed or sent nothing in time.
async fn sniff_h2(stream: &TcpStream, timeout: Duration) -> Option<bool> {
    let sniff = async {
        let mut buf = [0u8; H2_PREFACE_START.len()];
        loop {
            let n = stream.peek(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            if buf[..n] != H2_PREFACE_START[..n] {
                return Some(false);
            }
            if n == buf.len() {
                return Some(true);
            }
            // A preface split over segments: wait for the rest rather than spin on the same bytes.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    tokio::time::timeout(timeout, sniff).await.ok().flatten()
}

async fn serve_connection(
    stream: TcpStream,
    client: Client,
    http: &Arc<HttpListener>,
    builders: &Builders,
    shutdown: &CancellationToken,
    deadline: &CancellationToken,
) {
    let Some(h2) = sniff_h2(&stream, builders.header_timeout).await else {
        return;
    };
    let timed_out = Arc::new(AtomicBool::new(false));
    let io = TokioIo::new(ClientIo::new(stream, timed_out.clone()));
    let addr = client.addr;
    let ctx = Arc::new(proxy::ConnContext {
        listener: http.clone(),
        client,
    });
    let svc = hyper::service::service_fn(move |req| proxy::handle(ctx.clone(), req));
    let result = if h2 {
        drive(
            builders.h2.serve_connection(io, svc),
            shutdown,
            deadline,
            &timed_out,
        )
        .await
    } else {
        drive(
            builders.h1.serve_connection(io, svc).with_upgrades(),
            shutdown,
            deadline,
            &timed_out,
        )
        .await
    };
    if let Err(e) = result {
        if !e.is_timeout() {
            tracing::debug!(client = %addr, error = %e, "client connection ended with an error");
        }
    }
}

/// A hyper server connection that can be asked to finish its current exchange and close.
trait GracefulConn: Future<Output = hyper::Result<()>> {
    fn graceful(self: Pin<&mut Self>);
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<I, S, B> GracefulConn for http1::UpgradeableConnection<I, S>
where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<BoxError>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: http_body::Body + 'static,
    B::Error: Into<BoxError>,
{
    fn graceful(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, S, B, E> GracefulConn for http2::Connection<I, S, E>
where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<BoxError>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
    B: http_body::Body + 'static,
    B::Error: Into<BoxError>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn graceful(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// Runs `conn` to its end; on `shutdown` asks it to close after the current exchange, on `deadline`
/// drops it. A header timeout is flagged before the connection (and its socket) is dropped.
async fn drive<C: GracefulConn>(
    conn: C,
    shutdown: &CancellationToken,
    deadline: &CancellationToken,
    timed_out: &AtomicBool,
) -> hyper::Result<()> {
    tokio::pin!(conn);
    let result = tokio::select! {
        biased;
        r = conn.as_mut() => Some(r),
        _ = shutdown.cancelled() => None,
    };
    let result = match result {
        Some(r) => r,
        None => {
            conn.as_mut().graceful();
            tokio::select! {
                biased;
                r = conn.as_mut() => r,
                _ = deadline.cancelled() => Ok(()),
            }
        }
    };
    if let Err(e) = &result {
        if e.is_timeout() {
            timed_out.store(true, Ordering::Relaxed);
        }
    }
    result
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
        ClientIo {
            stream,
            partial: false,
            timed_out,
        }
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
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
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
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
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

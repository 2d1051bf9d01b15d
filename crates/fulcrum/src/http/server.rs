//! Serving HTTP/1.1 and h2c (prior knowledge) with hyper on the client connections an HTTP listener
//! accepts (the accept loop itself is protocol-neutral: [`crate::listener`]).
//!
//! The protocol is told from the first bytes (`PRI ` starts the HTTP/2 preface): they are read (never
//! peeked in a loop, so a client that sends one byte costs nothing while it waits) within the request
//! header timeout (or the idle timeout, if shorter) and handed back to hyper by [`ClientIo`], which also enforces the connection's clocks:
//! - `idle_timeout`: no byte either way while no request is in flight (an HTTP/2 connection without
//!   streams, a silent new connection); an HTTP/1.1 keep-alive connection also waits at most
//!   `request_header_timeout` for its next request head (hyper's header timer);
//! - `write_timeout`: a client that takes nothing of its response for that long is cut, so a client that
//!   never reads cannot hold a slot, a server connection and an in-flight count for ever.
//!
//! Limits: request heads above `max_header_size` or with more than `max_headers` fields get 431 (HTTP/1.1,
//! from hyper); HTTP/2 clients get at most `h2_max_concurrent_streams` streams, a header list bounded by
//! `max_header_size` (CONTINUATION floods end there), and h2's reset-flood limits (rapid reset).

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::stream::{FuturesUnordered, StreamExt};
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;

use super::body::RequestIn;
use super::proxy::{self, Client, HttpListener};
use crate::config::ListenerConfig;
use crate::listener::{Accepted, ConnHandler, ListenerStats, PerIp};

/// The answer to a client that started a request head and did not finish it in time.
const REQUEST_TIMEOUT_RESPONSE: &[u8] = b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n\
content-length: 60\r\nconnection: close\r\n\r\n408 Request Timeout: the request head did not arrive in time\n";

/// The start of the HTTP/2 connection preface.
const H2_PREFACE_START: &[u8] = b"PRI ";

/// Stream resets a client may cause before the connection is closed (HTTP/2 rapid reset).
const H2_MAX_PENDING_RESETS: usize = 20;

/// The connection-level settings of an HTTP listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnSettings {
    /// A request head must arrive within this.
    pub request_header_timeout: Duration,
    /// No byte either way while no request is in flight.
    pub idle_timeout: Duration,
    /// No progress writing to the client.
    pub write_timeout: Duration,
    /// No progress reading a request body.
    pub body_timeout: Duration,
    /// No traffic either way on a WebSocket tunnel.
    pub tunnel_timeout: Duration,
    /// The largest request head.
    pub max_header_size: usize,
    /// The most request header fields.
    pub max_headers: usize,
    /// HTTP/2 streams per connection.
    pub h2_max_concurrent_streams: u32,
    /// The largest request body (routes may say otherwise).
    pub max_body_size: Option<u64>,
    /// `Strict-Transport-Security` added to every answer (`tls.hsts`).
    pub hsts: Option<http::HeaderValue>,
    /// Answer every request with a redirect to HTTPS on this port (`https_redirect`).
    pub https_redirect: Option<u16>,
}

impl ConnSettings {
    /// The settings of listener `l`.
    pub fn of(l: &ListenerConfig) -> Self {
        ConnSettings {
            request_header_timeout: l.request_header_timeout,
            idle_timeout: l.idle_timeout,
            write_timeout: l.write_timeout,
            body_timeout: l.body_timeout,
            tunnel_timeout: l.tunnel_timeout,
            max_header_size: l.max_header_size,
            max_headers: l.max_headers,
            h2_max_concurrent_streams: l.h2_max_concurrent_streams,
            max_body_size: l.max_body_size,
            hsts: l
                .tls
                .as_ref()
                .and_then(|t| t.hsts)
                .and_then(|d| format!("max-age={}", d.as_secs()).parse().ok()),
            https_redirect: l.https_redirect,
        }
    }
}

/// hyper's connection builders of one listener and its settings, rebuilt when a reload changes them.
#[derive(Debug)]
pub struct Builders {
    h1: http1::Builder,
    h2: http2::Builder<StreamsHere>,
    /// The settings the builders apply (shared with every connection accepted under them).
    pub settings: Arc<ConnSettings>,
}

impl Builders {
    /// Builders applying `settings`.
    pub fn new(settings: ConnSettings) -> Self {
        let mut h1 = http1::Builder::new();
        h1.timer(TokioTimer::new())
            .header_read_timeout(settings.request_header_timeout)
            .max_buf_size(settings.max_header_size.max(8192))
            .max_headers(settings.max_headers)
            .keep_alive(true);
        let mut h2 = http2::Builder::new(StreamsHere);
        h2.timer(TokioTimer::new())
            .max_concurrent_streams(settings.h2_max_concurrent_streams)
            .max_header_list_size(settings.max_header_size as u32)
            .max_pending_accept_reset_streams(H2_MAX_PENDING_RESETS);
        Builders {
            h1,
            h2,
            settings: Arc::new(settings),
        }
    }
}

impl ConnHandler for HttpListener {
    fn serve(self: Arc<Self>, conn: Accepted) -> impl Future<Output = ()> + Send {
        // The task holds its future for the connection's whole life, idle time included. What runs
        // once (the first bytes, a TLS handshake, hyper's connections) is boxed and dropped when done,
        // and the accepted connection is moved into that box, so that what stays for a plain HTTP/1
        // connection is little more than fulcrum's own (`h1::Lean`).
        let mut start = Some(Box::pin(start_connection(self, conn)));
        async move {
            let lean = match start.take() {
                Some(start) => start.await,
                None => None,
            };
            if let Some(lean) = lean {
                lean.serve().await;
            }
        }
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn stats(&self) -> &Arc<ListenerStats> {
        &self.stats
    }

    fn per_ip(&self) -> Option<Arc<PerIp>> {
        self.per_ip.load_full()
    }

    #[inline]
    fn admit(&self, ip: std::net::IpAddr) -> bool {
        self.filter.load().admit(ip)
    }
}

/// Everything a connection does before it is either served by hyper to its end (h2c, TLS) or handed
/// over as a plain HTTP/1 connection.
async fn start_connection(http: Arc<HttpListener>, conn: Accepted) -> Option<super::h1::Lean> {
    let builders = http.builders.load_full();
    match http.tls.load_full() {
        None => serve_connection(conn, &http, &builders).await,
        Some(tls) => {
            Box::pin(serve_tls(conn, &http, &builders, &tls)).await;
            None
        }
    }
}

/// The first bytes of a connection, read into a connection buffer: at least the length of `PRI `, or
/// fewer when they already differ. `None` when the client closed or sent nothing within `timeout`.
async fn read_prefix<S: ClientStream>(stream: &mut S, timeout: Duration) -> Option<BytesMut> {
    let mut buf = super::h1::take_buf();
    let read = async {
        loop {
            // Waits for readiness: a client that sent one byte costs nothing while it waits.
            let got = poll_fn(|cx| stream.poll_read_into(cx, &mut buf))
                .await
                .ok()?;
            if got == 0 {
                return None;
            }
            let n = buf.len().min(H2_PREFACE_START.len());
            if n == H2_PREFACE_START.len() || buf[..n] != H2_PREFACE_START[..n] {
                return Some(());
            }
        }
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(Some(())) => Some(buf),
        _ => {
            super::h1::give_buf(buf);
            None
        }
    }
}

/// The TLS side of an `https` listener: rebuilt (certificates re-read) at every reload.
pub struct TlsListener {
    /// Accepts with the listener's rustls configuration.
    pub acceptor: tokio_rustls::TlsAcceptor,
    /// `tls.handshake_timeout`.
    pub handshake_timeout: Duration,
}

impl std::fmt::Debug for TlsListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsListener")
            .field("handshake_timeout", &self.handshake_timeout)
            .finish_non_exhaustive()
    }
}

impl TlsListener {
    /// The TLS side of a listener with `tls` (loaded: `tls.server` is set).
    pub fn new(tls: &crate::config::TlsConfig) -> Option<Self> {
        Some(TlsListener {
            acceptor: tokio_rustls::TlsAcceptor::from(tls.server.clone()?),
            handshake_timeout: tls.handshake_timeout,
        })
    }
}

/// Completes the TLS handshake (within `handshake_timeout`, or until the listener stops), then serves
/// HTTP on the decrypted stream: HTTP/2 when ALPN chose `h2` (or the client starts with its preface),
/// HTTP/1.1 otherwise.
async fn serve_tls(
    conn: Accepted,
    http: &Arc<HttpListener>,
    builders: &Builders,
    tls: &TlsListener,
) {
    let Accepted {
        stream,
        peer,
        stop,
        deadline,
        tracker,
        guard,
        parking,
    } = conn;
    let handshake = tokio::select! {
        r = tokio::time::timeout(tls.handshake_timeout, tls.acceptor.accept(stream)) => r,
        _ = stop.cancelled() => return,
    };
    let stream = match handshake.unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into())) {
        Ok(s) => s,
        Err(e) => {
            http.stats
                .tls_handshake_failures
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(client = %peer, error = %e, "TLS handshake failed");
            return;
        }
    };
    http.stats.tls_handshakes.fetch_add(1, Ordering::Relaxed);
    let (_, session) = stream.get_ref();
    if session.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
        http.stats.tls_resumed.fetch_add(1, Ordering::Relaxed);
    }
    let conn = Accepted {
        stream,
        peer,
        stop,
        deadline,
        tracker,
        guard,
        parking,
    };
    // A TLS stream is never handed to fulcrum's own HTTP/1 connection.
    let _ = serve_connection(conn, http, builders).await;
}

/// What a client connection is read from and written to: the TCP stream, or TLS over it.
pub trait ClientStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Writes `bytes` now if the socket takes them, without waiting (plain TCP only: the 408 sent
    /// when a connection is dropped after a header timeout).
    fn try_write_now(&self, bytes: &[u8]);

    /// The plain TCP stream, which fulcrum's own HTTP/1 connection serves ([`super::h1`]); TLS stays
    /// with hyper.
    fn into_tcp(self) -> Result<TcpStream, Self>
    where
        Self: Sized;

    /// Reads into `buf`'s spare room.
    fn poll_read_into(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
    ) -> Poll<io::Result<usize>> {
        tokio_util::io::poll_read_buf(Pin::new(self), cx, buf)
    }
}

impl ClientStream for TcpStream {
    fn try_write_now(&self, bytes: &[u8]) {
        let _ = self.try_write(bytes);
    }

    fn into_tcp(self) -> Result<TcpStream, Self> {
        Ok(self)
    }

    /// Plain TCP: a short read clears the socket's readiness ([`super::h1::read_draining`]).
    fn poll_read_into(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
    ) -> Poll<io::Result<usize>> {
        super::h1::poll_read_draining(self, cx, buf)
    }
}

impl ClientStream for tokio_rustls::server::TlsStream<TcpStream> {
    fn try_write_now(&self, _: &[u8]) {}

    fn into_tcp(self) -> Result<TcpStream, Self> {
        Err(self)
    }
}

/// Reads the first bytes, then serves h2c and TLS clients with hyper; a plain HTTP/1 connection is
/// returned, ready for fulcrum's own connection ([`super::h1`]).
async fn serve_connection<S: ClientStream>(
    conn: Accepted<S>,
    http: &Arc<HttpListener>,
    builders: &Builders,
) -> Option<super::h1::Lean> {
    let Accepted {
        mut stream,
        peer,
        stop,
        deadline,
        tracker,
        guard,
        parking,
    } = conn;
    let settings = &builders.settings;
    // A new connection owes its first request within the header timeout (or the idle one, if shorter).
    let first = settings.request_header_timeout.min(settings.idle_timeout);
    let Some(prefix) = read_prefix(&mut stream, first).await else {
        http.stats.idle_timeouts.fetch_add(1, Ordering::Relaxed);
        return None;
    };
    let h2 = prefix.starts_with(H2_PREFACE_START);
    let ctx = Arc::new(proxy::ConnContext {
        listener: http.clone(),
        client: Client::new(peer),
        active: AtomicUsize::new(0),
        tracker,
        guard,
        stop,
        deadline,
        settings: settings.clone(),
        parking,
    });
    if !h2 {
        match stream.into_tcp() {
            Ok(tcp) => return Some(super::h1::Lean::new(tcp, prefix, ctx)),
            Err(s) => stream = s,
        }
    }
    Box::pin(serve_hyper(stream, prefix.freeze(), h2, ctx, builders)).await;
    None
}

/// Serves h2c and TLS clients with hyper.
async fn serve_hyper<S: ClientStream>(
    stream: S,
    prefix: Bytes,
    h2: bool,
    ctx: Arc<proxy::ConnContext>,
    builders: &Builders,
) {
    let (stop, deadline, peer) = (ctx.stop.clone(), ctx.deadline.clone(), ctx.client.addr);
    let timed_out = Arc::new(AtomicBool::new(false));
    let io = TokioIo::new(ClientIo::<S>::new(
        stream,
        prefix,
        timed_out.clone(),
        ctx.clone(),
    ));
    let result = if h2 {
        // Each stream runs inside this connection's task (`StreamsHere`); its (large) proxy future
        // is boxed once, so handing the stream over moves a pointer, not the whole future.
        let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            Box::pin(proxy::handle(ctx.clone(), req.map(RequestIn::Client)))
        });
        drive(
            builders.h2.serve_connection(io, svc),
            &stop,
            &deadline,
            &timed_out,
        )
        .await
    } else {
        let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            proxy::handle(ctx.clone(), req.map(RequestIn::Client))
        });
        drive(
            builders.h1.serve_connection(io, svc).with_upgrades(),
            &stop,
            &deadline,
            &timed_out,
        )
        .await
    };
    if let Err(e) = result {
        if !e.is_timeout() {
            tracing::debug!(client = %peer, error = %e, "client connection ended with an error");
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

/// hyper's executor for the HTTP/2 streams of a client connection: a stream runs inside the task of
/// its connection, not as a task of its own. [`drive`] collects the streams a poll of the connection
/// starts and polls them with it, so a request costs no task spawn, and a stream's wake-ups (the
/// server's answer arriving, the connection taking its frames) stay within one task. A stream started
/// outside such a poll (hyper does not do that) becomes a task, as before.
#[derive(Clone, Copy, Debug)]
pub struct StreamsHere;

type StreamFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

thread_local! {
    /// Whether a connection is being polled by [`drive`] on this thread.
    static COLLECTING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// The streams that poll started, for [`drive`] to take.
    static STARTED: std::cell::RefCell<Vec<StreamFuture>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Marks this thread's connection poll as collecting its started streams, until dropped (a panic
/// inside the poll included).
struct Collecting;

impl Collecting {
    fn start() -> Self {
        COLLECTING.with(|c| c.set(true));
        Collecting
    }
}

impl Drop for Collecting {
    fn drop(&mut self) {
        COLLECTING.with(|c| c.set(false));
    }
}

impl<F> hyper::rt::Executor<F> for StreamsHere
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, stream: F) {
        if COLLECTING.with(|c| c.get()) {
            STARTED.with(|s| s.borrow_mut().push(Box::pin(stream)));
        } else {
            tokio::spawn(stream);
        }
    }
}

/// Runs `conn` to its end; on `shutdown` asks it to close after the current exchange, on `deadline`
/// drops it. A header timeout is flagged before the connection (and its socket) is dropped. The
/// streams the connection starts ([`StreamsHere`]) run here too, to their end.
async fn drive<C: GracefulConn>(
    conn: C,
    shutdown: &CancellationToken,
    deadline: &CancellationToken,
    timed_out: &AtomicBool,
) -> hyper::Result<()> {
    tokio::pin!(conn);
    let mut streams = FuturesUnordered::new();
    let mut ended = None;
    let result = tokio::select! {
        biased;
        r = with_streams(conn.as_mut(), &mut streams, &mut ended) => Some(r),
        _ = shutdown.cancelled() => None,
    };
    let result = match result {
        Some(r) => r,
        None => {
            if ended.is_none() {
                conn.as_mut().graceful();
            }
            tokio::select! {
                biased;
                r = with_streams(conn.as_mut(), &mut streams, &mut ended) => r,
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

/// Polls `conn` (until it ends, its result kept in `ended`) and the streams its polls start, until
/// the connection has ended and every stream has finished.
fn with_streams<'a, C: Future<Output = hyper::Result<()>>>(
    mut conn: Pin<&'a mut C>,
    streams: &'a mut FuturesUnordered<StreamFuture>,
    ended: &'a mut Option<hyper::Result<()>>,
) -> impl Future<Output = hyper::Result<()>> + 'a {
    poll_fn(move |cx| {
        if ended.is_none() {
            let polled = {
                let _collecting = Collecting::start();
                conn.as_mut().poll(cx)
            };
            STARTED.with(|s| streams.extend(s.borrow_mut().drain(..)));
            if let Poll::Ready(r) = polled {
                *ended = Some(r);
            }
        }
        while let Poll::Ready(Some(())) = streams.poll_next_unpin(cx) {}
        match ended {
            Some(_) if streams.is_empty() => Poll::Ready(ended.take().unwrap_or(Ok(()))),
            _ => Poll::Pending,
        }
    })
}

/// A client connection as hyper sees it: the bytes read to tell the protocol are handed back first, a
/// half-read request head is remembered (so that a header timeout can be answered with 408, as hyper
/// itself just closes), and the idle and write clocks run here.
///
/// When the connection is dropped after a header timeout, and bytes of a new request had arrived
/// since the last response, it writes the 408 before closing; an idle keep-alive connection that
/// times out is closed silently, as HAProxy does.
struct ClientIo<S: ClientStream> {
    stream: S,
    /// Bytes read before hyper took over that hyper has not had yet.
    prefix: Bytes,
    /// Bytes were read since the last write: a request is being received.
    partial: bool,
    timed_out: Arc<AtomicBool>,
    ctx: Arc<proxy::ConnContext>,
    /// The last byte read or written.
    last_io: Instant,
    /// Since when a write has been waiting for the client to take bytes.
    write_blocked: Option<Instant>,
    /// The idle or write deadline being waited for.
    timer: Option<Pin<Box<Sleep>>>,
}

impl<S: ClientStream> ClientIo<S> {
    fn new(
        stream: S,
        prefix: Bytes,
        timed_out: Arc<AtomicBool>,
        ctx: Arc<proxy::ConnContext>,
    ) -> Self {
        ClientIo {
            stream,
            partial: !prefix.is_empty(),
            prefix,
            timed_out,
            ctx,
            last_io: Instant::now(),
            write_blocked: None,
            timer: None,
        }
    }

    /// Waits for `deadline`; `Ready` once it has passed.
    fn poll_deadline(&mut self, cx: &mut Context<'_>, deadline: Instant) -> Poll<()> {
        let deadline = tokio::time::Instant::from_std(deadline);
        match &mut self.timer {
            Some(t) if t.deadline() == deadline => {}
            Some(t) => t.as_mut().reset(deadline),
            None => self.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
        }
        match &mut self.timer {
            Some(t) => t.as_mut().poll(cx),
            None => Poll::Pending,
        }
    }
}

impl<S: ClientStream> Drop for ClientIo<S> {
    fn drop(&mut self) {
        if self.partial && self.timed_out.load(Ordering::Relaxed) {
            // A short write on a socket with an empty send buffer; if it cannot go out now, the
            // client was not going to read it either.
            self.stream.try_write_now(REQUEST_TIMEOUT_RESPONSE);
        }
    }
}

fn timed_out(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, what.to_owned())
}

impl<S: ClientStream> AsyncRead for ClientIo<S> {
    #[inline]
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix.split_to(n));
            if this.prefix.is_empty() {
                // Its buffer is freed, not kept behind an empty view.
                this.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    this.partial = true;
                    this.last_io = Instant::now();
                }
                Poll::Ready(r)
            }
            Poll::Pending => {
                // Idle: nothing in flight and nothing either way for `idle_timeout`.
                if this.ctx.active.load(Ordering::Relaxed) == 0 {
                    let deadline = this.last_io + this.ctx.settings.idle_timeout;
                    if this.poll_deadline(cx, deadline).is_ready() {
                        this.ctx
                            .listener
                            .stats
                            .idle_timeouts
                            .fetch_add(1, Ordering::Relaxed);
                        return Poll::Ready(Err(timed_out("idle timeout")));
                    }
                }
                Poll::Pending
            }
        }
    }
}

impl<S: ClientStream> ClientIo<S> {
    /// Runs the write clock around one write attempt.
    #[inline]
    fn after_write(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match r {
            Poll::Ready(r) => {
                self.partial = false;
                self.write_blocked = None;
                self.last_io = Instant::now();
                Poll::Ready(r)
            }
            Poll::Pending => {
                let since = *self.write_blocked.get_or_insert_with(Instant::now);
                let deadline = since + self.ctx.settings.write_timeout;
                ready!(self.poll_deadline(cx, deadline));
                self.ctx
                    .listener
                    .stats
                    .write_timeouts
                    .fetch_add(1, Ordering::Relaxed);
                Poll::Ready(Err(timed_out("write timeout: the client reads nothing")))
            }
        }
    }
}

impl<S: ClientStream> AsyncWrite for ClientIo<S> {
    #[inline]
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.after_write(cx, r)
    }

    #[inline]
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.after_write(cx, r)
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

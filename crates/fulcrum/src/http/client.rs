//! Connections to the servers of pools with `tls` or `http2`, through hyper's client connections.
//!
//! Plain HTTP/1.1 pools use fulcrum's own lean client ([`super::upstream`]); a pool that speaks TLS
//! or HTTP/2 to its servers goes through here:
//! - **HTTP/2** (`http2 = true`: h2c in plain text, h2 by ALPN over TLS): requests are multiplexed
//!   over a bounded set of connections per server ([`H2_MAX_CONNECTIONS`]); a new connection is
//!   opened only when every open one carries [`H2_STREAMS_PER_CONNECTION`] streams, and one
//!   connection at a time is dialled per server (a burst waits for it instead of opening one
//!   connection per request). Trailers pass both ways (gRPC status), bodies stream both ways.
//! - **HTTP/1.1 over TLS**: idle keep-alive connections are kept per server.
//!
//! Retries stay safe: a request hyper did not send (the connection was closed or refused it before a
//! byte went out) is handed back with its body and may go to another server; after that, only a
//! request without a body and with an idempotent method is tried again (as for plain pools). A
//! stream the server refused (`REFUSED_STREAM`, or beyond a `GOAWAY`'s last stream) was not
//! processed, so it counts as unanswered.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Sleep;

use crate::config::PoolConfig;
use crate::pool::{InFlight, PoolSettings, Server};

/// Streams one HTTP/2 connection to a server carries before another is opened.
pub const H2_STREAMS_PER_CONNECTION: usize = 100;
/// HTTP/2 connections per server at most (beyond, streams share the least loaded one).
pub const H2_MAX_CONNECTIONS: usize = 8;
/// Idle HTTP/1.1 (TLS) connections kept per server.
const H1_MAX_IDLE: usize = 256;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of a request sent through hyper.
pub type ReqBody = UnsyncBoxBody<Bytes, BoxError>;

/// How a pool reaches its servers when it is not plain HTTP/1.1.
pub struct Transport {
    tls: Option<(tokio_rustls::TlsConnector, Option<ServerName<'static>>)>,
    http2: bool,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("tls", &self.tls.is_some())
            .field("http2", &self.http2)
            .finish()
    }
}

impl Transport {
    /// The transport of pool `cfg`; `None` for plain HTTP/1.1.
    pub fn of(cfg: &PoolConfig) -> Option<Arc<Transport>> {
        if !cfg.http2 && cfg.tls.is_none() {
            return None;
        }
        let tls = cfg.tls.as_ref().and_then(|t| {
            let client = t.client.clone()?;
            let sni = t
                .sni
                .as_deref()
                .and_then(|n| ServerName::try_from(n.to_owned()).ok());
            Some((tokio_rustls::TlsConnector::from(client), sni))
        });
        Some(Arc::new(Transport {
            tls,
            http2: cfg.http2,
        }))
    }

    /// The servers speak HTTP/2.
    pub fn http2(&self) -> bool {
        self.http2
    }

    /// The URI scheme of requests to the servers.
    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }
}

struct H2Conn {
    sender: http2::SendRequest<ReqBody>,
    /// Streams open on it.
    load: Arc<AtomicUsize>,
}

#[derive(Default)]
struct ServerConns {
    h1: Vec<http1::SendRequest<ReqBody>>,
    h2: Vec<H2Conn>,
    /// HTTP/2 connections being dialled.
    dialing: usize,
    /// Wakes the requests that wait for a connection being dialled.
    dialled: Arc<Notify>,
}

static CONNS: LazyLock<Mutex<HashMap<u64, ServerConns>>> = LazyLock::new(Default::default);

fn conns() -> std::sync::MutexGuard<'static, HashMap<u64, ServerConns>> {
    CONNS.lock().unwrap_or_else(|e| e.into_inner())
}

/// The connections open to server `id`: idle HTTP/1.1 ones, HTTP/2 ones.
pub fn open_connections(id: u64) -> (usize, usize) {
    conns().get(&id).map_or((0, 0), |e| {
        (
            e.h1.iter().filter(|s| !s.is_closed()).count(),
            e.h2.iter().filter(|c| !c.sender.is_closed()).count(),
        )
    })
}

/// Drops the connections kept for server `id` (it left its pool).
pub fn forget(id: u64) {
    conns().remove(&id);
}

/// Counts a stream on an HTTP/2 connection until dropped.
#[derive(Debug)]
pub struct StreamGuard(Arc<AtomicUsize>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

enum Checkout {
    H1(http1::SendRequest<ReqBody>),
    H2(http2::SendRequest<ReqBody>, StreamGuard),
}

#[derive(Debug)]
enum DialError {
    Refused(std::io::Error),
    Other(String),
}

impl std::fmt::Display for DialError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DialError::Refused(e) => write!(f, "connect: {e}"),
            DialError::Other(why) => f.write_str(why),
        }
    }
}

async fn dial(
    server: &Server,
    transport: &Transport,
    timeout: Duration,
) -> Result<Checkout, DialError> {
    let tcp = tokio::time::timeout(timeout, TcpStream::connect(server.address))
        .await
        .map_err(|_| DialError::Other("connect timed out".into()))?
        .map_err(DialError::Refused)?;
    let _ = tcp.set_nodelay(true);
    match &transport.tls {
        None => handshake(TokioIo::new(tcp), transport.http2).await,
        Some((connector, sni)) => {
            let name = sni
                .clone()
                .unwrap_or_else(|| ServerName::from(server.address.ip()));
            let tls = tokio::time::timeout(timeout, connector.connect(name, tcp))
                .await
                .map_err(|_| DialError::Other("TLS handshake timed out".into()))?
                .map_err(|e| DialError::Other(format!("TLS handshake: {e}")))?;
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            if transport.http2 && !h2 {
                return Err(DialError::Other(
                    "the server did not agree to HTTP/2 (ALPN)".into(),
                ));
            }
            handshake(TokioIo::new(tls), transport.http2).await
        }
    }
}

async fn handshake<I>(io: I, h2: bool) -> Result<Checkout, DialError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    if h2 {
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .handshake(io)
            .await
            .map_err(|e| DialError::Other(format!("HTTP/2 handshake: {e}")))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "HTTP/2 server connection ended");
            }
        });
        Ok(Checkout::H2(
            sender,
            StreamGuard(Arc::new(AtomicUsize::new(0))),
        ))
    } else {
        let (sender, conn) = http1::handshake(io)
            .await
            .map_err(|e| DialError::Other(format!("HTTP/1.1 handshake: {e}")))?;
        // With upgrades: a `101` hands the connection to the WebSocket tunnel.
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "HTTP/1.1 server connection ended");
            }
        });
        Ok(Checkout::H1(sender))
    }
}

/// A connection (or a stream on one) to `server`.
async fn checkout(
    server: &Server,
    transport: &Transport,
    timeout: Duration,
) -> Result<Checkout, DialError> {
    if !transport.http2 {
        {
            let mut all = conns();
            let entry = all.entry(server.id).or_default();
            entry.h1.retain(|s| !s.is_closed());
            if let Some(i) = entry.h1.iter().position(|s| s.is_ready()) {
                return Ok(Checkout::H1(entry.h1.swap_remove(i)));
            }
        }
        return dial(server, transport, timeout).await;
    }
    let give_up = tokio::time::Instant::now() + timeout;
    loop {
        let dialled = {
            let mut all = conns();
            let entry = all.entry(server.id).or_default();
            entry.h2.retain(|c| !c.sender.is_closed());
            let best = entry
                .h2
                .iter()
                .min_by_key(|c| c.load.load(Ordering::Relaxed));
            let full = entry.h2.len() + entry.dialing >= H2_MAX_CONNECTIONS;
            match best {
                Some(c)
                    if c.load.load(Ordering::Relaxed) < H2_STREAMS_PER_CONNECTION
                        || full
                        || entry.dialing > 0 =>
                {
                    c.load.fetch_add(1, Ordering::Relaxed);
                    return Ok(Checkout::H2(c.sender.clone(), StreamGuard(c.load.clone())));
                }
                None if entry.dialing > 0 => Some(entry.dialled.clone()),
                _ => {
                    entry.dialing += 1;
                    None
                }
            }
        };
        match dialled {
            Some(notify) => {
                // Another request is dialling: wait for its connection (or its failure).
                let wait = notify.notified();
                tokio::pin!(wait);
                wait.as_mut().enable();
                let ready = conns()
                    .get(&server.id)
                    .is_some_and(|e| e.dialing == 0 || !e.h2.is_empty());
                if !ready && tokio::time::timeout_at(give_up, wait).await.is_err() {
                    return Err(DialError::Other("waited too long for a connection".into()));
                }
            }
            None => {
                let result = dial(server, transport, timeout).await;
                let mut all = conns();
                let entry = all.entry(server.id).or_default();
                entry.dialing -= 1;
                entry.dialled.notify_waiters();
                return match result {
                    Ok(Checkout::H2(sender, _)) => {
                        let load = Arc::new(AtomicUsize::new(1));
                        entry.h2.push(H2Conn {
                            sender: sender.clone(),
                            load: load.clone(),
                        });
                        Ok(Checkout::H2(sender, StreamGuard(load)))
                    }
                    other => other,
                };
            }
        }
    }
}

/// Gives an HTTP/1.1 connection back once its answer has come (hyper reports it ready again when
/// the answer's body has been read).
fn put_back(server: &Server, sender: http1::SendRequest<ReqBody>) {
    if sender.is_closed() {
        return;
    }
    let mut all = conns();
    let entry = all.entry(server.id).or_default();
    if entry.h1.len() < H1_MAX_IDLE {
        entry.h1.push(sender);
    }
}

/// What went wrong with the client's upload, if anything (set by [`Upload`]).
#[derive(Debug, Default)]
pub struct UploadState {
    fault: AtomicU8,
    /// Milliseconds (on [`crate::clock`]) of the upload's last progress.
    last_progress: AtomicU64,
}

const FAULT_TOO_LARGE: u8 = 1;
const FAULT_TIMEOUT: u8 = 2;
const FAULT_CLIENT: u8 = 3;

impl UploadState {
    /// The answer the client gets for its upload's fault, if it had one.
    pub fn client_fault(&self) -> Option<StatusCode> {
        match self.fault.load(Ordering::Relaxed) {
            FAULT_TOO_LARGE => Some(StatusCode::PAYLOAD_TOO_LARGE),
            FAULT_TIMEOUT => Some(StatusCode::REQUEST_TIMEOUT),
            FAULT_CLIENT => Some(StatusCode::BAD_REQUEST),
            _ => None,
        }
    }
}

/// The client's request body on its way to a server: at most `max` bytes, and progress at least
/// every `timeout`; either fault is recorded in [`UploadState`] and fails the upload.
pub struct Upload {
    inner: super::body::RequestIn,
    max: Option<u64>,
    seen: u64,
    timeout: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    state: Arc<UploadState>,
}

impl Upload {
    /// Wraps `inner`.
    pub fn new(
        inner: super::body::RequestIn,
        max: Option<u64>,
        timeout: Duration,
        state: Arc<UploadState>,
    ) -> Self {
        state
            .last_progress
            .store(crate::clock::now_ms(), Ordering::Relaxed);
        Upload {
            inner,
            max,
            seen: 0,
            timeout,
            timer: None,
            state,
        }
    }

    fn fault(&self, fault: u8, why: &str) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.state.fault.store(fault, Ordering::Relaxed);
        Poll::Ready(Some(Err(why.into())))
    }
}

impl Body for Upload {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.timer = None;
                this.state
                    .last_progress
                    .store(crate::clock::now_ms(), Ordering::Relaxed);
                if let Some(data) = frame.data_ref() {
                    this.seen += data.len() as u64;
                    if this.max.is_some_and(|m| this.seen > m) {
                        return this.fault(FAULT_TOO_LARGE, "request body over the limit");
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.state.fault.store(FAULT_CLIENT, Ordering::Relaxed);
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                this.state
                    .last_progress
                    .store(crate::clock::now_ms(), Ordering::Relaxed);
                Poll::Ready(None)
            }
            Poll::Pending => {
                let timeout = this.timeout;
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                if timer.as_mut().poll(cx).is_ready() {
                    return this.fault(FAULT_TIMEOUT, "request body stalled");
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Why an exchange through hyper failed.
pub enum ClientFailure {
    /// Nothing was sent; the request's body is handed back for another server.
    NotSent(ReqBody),
    /// Connecting failed (nothing sent, the body was not taken).
    ConnectFailed { reset: bool },
    /// The server closed or refused the request without processing it.
    Unanswered,
    /// The client's upload failed: answer with this.
    Client(StatusCode),
    /// The exchange failed after the request went out: answer with this.
    Failed(StatusCode),
}

/// A server's answer through hyper and how long it took.
pub struct Answer {
    pub response: Response<Incoming>,
    pub elapsed: Duration,
    /// The HTTP/2 stream, counted until the answer's body is done.
    pub stream: Option<StreamGuard>,
}

/// Sends `req` to `server` and waits for the answer's head, within the pool's response timeout
/// counted from the upload's last progress.
pub async fn exchange(
    server: &Server,
    settings: &PoolSettings,
    transport: &Transport,
    mut req: Request<ReqBody>,
    upload: &UploadState,
    replayable: bool,
) -> Result<Answer, ClientFailure> {
    let checkout = match checkout(server, transport, settings.connect_timeout).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(server = %server.name, error = %e, "server connect failed");
            return Err(ClientFailure::ConnectFailed {
                reset: matches!(&e, DialError::Refused(io) if io.kind() == std::io::ErrorKind::ConnectionReset),
            });
        }
    };
    let started = Instant::now();
    let host = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .unwrap_or_else(|| server.address.to_string());
    let (sent, h1, stream) = match checkout {
        Checkout::H2(mut sender, stream) => {
            let path = req
                .uri()
                .path_and_query()
                .map(|pq| pq.as_str())
                .unwrap_or("/");
            if let Ok(uri) = format!("{}://{host}{path}", transport.scheme()).parse::<Uri>() {
                *req.uri_mut() = uri;
            }
            req.headers_mut().remove(http::header::HOST);
            *req.version_mut() = Version::HTTP_2;
            (
                futures_util::future::Either::Left(sender.try_send_request(req)),
                None,
                Some(stream),
            )
        }
        Checkout::H1(mut sender) => {
            *req.version_mut() = Version::HTTP_11;
            let fut = sender.try_send_request(req);
            (futures_util::future::Either::Right(fut), Some(sender), None)
        }
    };
    tokio::pin!(sent);
    // The response timeout runs from the upload's last progress (a long upload is not a slow server).
    let result = loop {
        let last = upload.last_progress.load(Ordering::Relaxed);
        let since = Duration::from_millis(crate::clock::now_ms().saturating_sub(last));
        let wait = settings.response_timeout.saturating_sub(since);
        match tokio::time::timeout(wait, sent.as_mut()).await {
            Ok(r) => break r,
            Err(_) if upload.last_progress.load(Ordering::Relaxed) != last => continue,
            Err(_) => {
                tracing::warn!(server = %server.name, timeout = ?settings.response_timeout, "server timed out");
                return Err(ClientFailure::Failed(StatusCode::GATEWAY_TIMEOUT));
            }
        }
    };
    match result {
        Ok(response) => {
            // A connection that switched protocols belongs to its tunnel now.
            if let Some(sender) =
                h1.filter(|_| response.status() != StatusCode::SWITCHING_PROTOCOLS)
            {
                put_back(server, sender);
            }
            Ok(Answer {
                response,
                elapsed: started.elapsed(),
                stream,
            })
        }
        Err(mut e) => {
            if let Some(status) = upload.client_fault() {
                return Err(ClientFailure::Client(status));
            }
            if let Some(req) = e.take_message() {
                return Err(ClientFailure::NotSent(req.into_body()));
            }
            let error = e.error();
            if refused_stream(error) || replayable {
                tracing::warn!(server = %server.name, error = %error, "the server did not process the request; trying the next one");
                return Err(ClientFailure::Unanswered);
            }
            tracing::warn!(server = %server.name, error = %error, "server exchange failed");
            Err(ClientFailure::Failed(StatusCode::BAD_GATEWAY))
        }
    }
}

/// True when HTTP/2 says the stream was never processed (`REFUSED_STREAM`, or a `GOAWAY` that did
/// not cover it).
fn refused_stream(error: &hyper::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM)
                || (h2.is_go_away() && h2.is_remote());
        }
        source = e.source();
    }
    false
}

/// A server's body through hyper, passed on frame by frame (data and trailers); the request counts
/// as in flight (and its HTTP/2 stream as open) until it is dropped.
#[derive(Debug)]
pub struct ClientBody {
    inner: Incoming,
    guard: InFlight,
    _stream: Option<StreamGuard>,
}

impl ClientBody {
    /// Wraps a server's body.
    pub fn new(inner: Incoming, guard: InFlight, stream: Option<StreamGuard>) -> Self {
        ClientBody {
            inner,
            guard,
            _stream: stream,
        }
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Err(e))) => {
                self.guard.server().stats.record_failure();
                Poll::Ready(Some(Err(std::io::Error::other(e))))
            }
            other => other.map(|f| f.map(|r| r.map_err(std::io::Error::other))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Boxes a request body for hyper.
pub fn boxed<B>(body: B) -> ReqBody
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

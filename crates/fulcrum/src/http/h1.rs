//! fulcrum's own HTTP/1.x server connection, for clients on plain TCP (HTTP/2 and TLS clients are
//! served by hyper, [`super::server`]).
//!
//! What it is for: an idle keep-alive connection holds no buffer. Between requests the connection's
//! task waits for the socket to become readable holding only the socket, the connection's context and
//! its timer; when bytes arrive it takes a buffer from a per-worker pool, parses the head
//! ([`super::request_head`], strict RFC 9112 framing), hands the request to the proxy, writes the
//! response, and gives the buffer back. The work of one request (the proxy's future, the response
//! writer) lives in one boxed future that exists only while the request does.
//!
//! Behaviour follows hyper's HTTP/1 server, which it replaces for these connections: the same framing
//! rules and error answers (400, 431, 505, each closing the connection), `Expect: 100-continue`
//! answered when the body is first read, pipelined requests answered in order, WebSocket upgrades
//! handed to the proxy's tunnel with any bytes already read, `Connection: close` and HTTP/1.0
//! keep-alive, a `Date` on every answer, the response framed by its `Content-Length`, its
//! `Transfer-Encoding`, its body's known length or chunked encoding. The listener's clocks apply as
//! they do for hyper: the request head must arrive within `request_header_timeout` (a half-received
//! head gets 408), a connection with nothing in flight closes after `idle_timeout`, and a client that
//! takes nothing of its response for `write_timeout` is cut.
//!
//! A connection that has waited [`PARK_AFTER`] for its next request gives up its task too: it parks
//! ([`crate::listener::Parking`]) holding only the socket and its context, with its own waker in the
//! socket's registration. Bytes (or a close) from the client start a new task that carries on where
//! the old one stopped; the listener's accept loop closes it when its idle deadline passes, or at once
//! when the listener stops. Under load a connection never waits that long, so parking costs nothing
//! per request.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, DATE, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::body::{ProxyBody, RequestIn};
use super::chunked::{encode_size_line, ChunkedDecoder, Step};
use super::proxy::{self, ConnContext};
use super::request_head::{self, BodyFraming, RequestHead};

/// The size of a pooled buffer.
const BUF_SIZE: usize = 8 * 1024;
/// Pooled buffers kept per worker thread.
const POOL_MAX: usize = 64;
/// Bytes of a response body copied next to its head (one write for both); larger data goes out
/// with a vectored write beside what is buffered.
const COALESCE: usize = 16 * 1024;
/// A server's `Content-Length` body with at least this much left unread moves to the client with
/// `splice(2)` ([`crate::pipe`]), never through user space.
const SPLICE_MIN: u64 = 16 * 1024;
/// The answer to a client that started a request head and did not finish it in time.
const REQUEST_TIMEOUT_RESPONSE: &[u8] = b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n\
content-length: 60\r\nconnection: close\r\n\r\n408 Request Timeout: the request head did not arrive in time\n";
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
/// How long a connection waits for its next request in its own task before it parks without one.
/// Short, so that few connections hold a task at any time (the freed task memory of connections that
/// waited longer is then reused rather than kept): a request after a longer pause costs one task
/// spawn, next to a network round trip; a busy connection (its next request within 100 ms) never parks.
pub const PARK_AFTER: Duration = Duration::from_millis(100);

thread_local! {
    static POOL: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
    static DATE_CACHE: RefCell<(u64, HeaderValue)> =
        const { RefCell::new((u64::MAX, HeaderValue::from_static(""))) };
}

pub(super) fn take_buf() -> BytesMut {
    POOL.with(|p| p.borrow_mut().pop())
        .unwrap_or_else(|| BytesMut::with_capacity(BUF_SIZE))
}

pub(super) fn give_buf(mut buf: BytesMut) {
    buf.clear();
    if buf.capacity() < BUF_SIZE / 2 || buf.capacity() > 8 * BUF_SIZE {
        return;
    }
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < POOL_MAX {
            p.push(buf);
        }
    });
}

/// Reads into `buf`'s spare room once the socket is readable (see [`read_draining`]).
pub(super) fn poll_read_draining(
    stream: &TcpStream,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
) -> Poll<io::Result<usize>> {
    loop {
        ready!(stream.poll_read_ready(cx))?;
        match read_draining(stream, buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            r => return Poll::Ready(r),
        }
    }
}

/// One `recv(2)` into `buf`'s spare room. A read that leaves room emptied the socket, so the next
/// wait goes to the reactor at once instead of through one more `recv` that finds nothing (a system
/// call saved per request; see [`crate::pipe::try_io_short`]).
pub(super) fn read_draining(stream: &TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    let room = buf.capacity() - buf.len();
    crate::pipe::try_io_short(stream, Interest::READABLE, room, || {
        stream.try_read_buf(buf)
    })
}

/// The `Date` header value, formatted once a second per worker.
fn date() -> HeaderValue {
    let now = std::time::SystemTime::now();
    let secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    DATE_CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != secs {
            let text = httpdate::fmt_http_date(now);
            if let Ok(v) = HeaderValue::from_str(&text) {
                *c = (secs, v);
            }
        }
        c.1.clone()
    })
}

/// The client's socket, shared by the connection, its request body and a WebSocket tunnel (each
/// reads or writes in turn; tokio's `TcpStream` takes `&self` for both).
#[derive(Debug)]
pub struct Io {
    stream: TcpStream,
}

impl Io {
    fn poll_read_into(&self, cx: &mut Context<'_>, buf: &mut BytesMut) -> Poll<io::Result<usize>> {
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(BUF_SIZE);
        }
        poll_read_draining(&self.stream, cx, buf)
    }

    fn poll_write(&self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.stream.poll_write_ready(cx))?;
            match self.stream.try_write(data) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(r),
            }
        }
    }

    fn poll_write_vectored(
        &self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.stream.poll_write_ready(cx))?;
            match self.stream.try_write_vectored(bufs) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(r),
            }
        }
    }

    /// Sends bytes that the end of the response follows at once, with [`crate::pipe::MORE`], so
    /// that the kernel holds them for [`Io::write_closing`]'s `shutdown` to send with the FIN.
    fn poll_send_more(&self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.stream.poll_write_ready(cx))?;
            let sent = self.stream.try_io(Interest::WRITABLE, || {
                rustix::net::send(&self.stream, data, crate::pipe::MORE).map_err(io::Error::from)
            });
            match sent {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(r),
            }
        }
    }

    /// The last bytes of a connection that closes after them: they and the FIN leave in one
    /// segment, instead of the answer, the client's ACK of it, then the FIN (two segments fewer
    /// per `Connection: close` exchange).
    async fn write_closing(&self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            let n = poll_fn(|cx| self.poll_send_more(cx, bytes)).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            bytes = &bytes[n..];
        }
        socket2::SockRef::from(&self.stream).shutdown(std::net::Shutdown::Write)
    }

    /// Writes `head` then `data` (either may be empty), with vectored writes.
    async fn write_two(&self, mut head: &[u8], mut data: &[u8]) -> io::Result<()> {
        while !head.is_empty() || !data.is_empty() {
            let n = poll_fn(|cx| {
                if head.is_empty() {
                    self.poll_write(cx, data)
                } else if data.is_empty() {
                    self.poll_write(cx, head)
                } else {
                    self.poll_write_vectored(cx, &[IoSlice::new(head), IoSlice::new(data)])
                }
            })
            .await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            let from_head = n.min(head.len());
            head = &head[from_head..];
            data = &data[n - from_head..];
        }
        Ok(())
    }
}

/// The client connection after a WebSocket upgrade: the bytes read past the request head first,
/// then the socket.
#[derive(Debug)]
pub struct Upgraded {
    io: Arc<Io>,
    early: Bytes,
}

impl AsyncRead for Upgraded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.early.is_empty() {
            let n = self.early.len().min(buf.remaining());
            buf.put_slice(&self.early[..n]);
            self.early.advance(n);
            return Poll::Ready(Ok(()));
        }
        loop {
            ready!(self.io.stream.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match self.io.stream.try_read(unfilled) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for Upgraded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.io.poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(socket2::SockRef::from(&self.io.stream).shutdown(std::net::Shutdown::Write))
    }
}

/// Where the proxy waits for the client side of an upgrade: from hyper, or from this connection.
pub enum ClientUpgrade {
    /// A hyper connection (h2c, TLS).
    Hyper(hyper::upgrade::OnUpgrade),
    /// This module's connection: sent once the `101` has been written.
    Lean(oneshot::Receiver<Upgraded>),
}

/// The extension a request of this module's connections carries when it asks for an upgrade.
#[derive(Clone)]
struct PendingUpgrade(Arc<Mutex<Option<oneshot::Receiver<Upgraded>>>>);

/// The client side of `req`'s upgrade, whichever connection it came on.
pub fn on_upgrade(req: &mut Request<RequestIn>) -> ClientUpgrade {
    let lean = req
        .extensions()
        .get::<PendingUpgrade>()
        .and_then(|p| p.0.lock().ok().and_then(|mut rx| rx.take()));
    match lean {
        Some(rx) => ClientUpgrade::Lean(rx),
        None => ClientUpgrade::Hyper(hyper::upgrade::on(req)),
    }
}

/// An upgraded client connection, whichever server produced it (`Either` reads and writes through
/// to the side it holds).
pub type UpgradedIo =
    tokio_util::either::Either<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>, Upgraded>;

impl ClientUpgrade {
    /// Waits for the `101` to have gone out.
    pub async fn wait(self) -> Result<UpgradedIo, String> {
        match self {
            ClientUpgrade::Hyper(on) => on
                .await
                .map(|u| tokio_util::either::Either::Left(hyper_util::rt::TokioIo::new(u)))
                .map_err(|e| e.to_string()),
            ClientUpgrade::Lean(rx) => rx
                .await
                .map(tokio_util::either::Either::Right)
                .map_err(|_| "the client connection ended before the upgrade".to_owned()),
        }
    }
}

/// How far the request body has been read.
#[derive(Debug)]
enum Reading {
    Length(u64),
    Chunked(Box<ChunkedDecoder>),
    Done,
    Failed(&'static str),
}

#[derive(Debug)]
struct BodyState {
    /// Bytes read from the client and not yet handed out (the body's, then maybe the next request's).
    buf: BytesMut,
    reading: Reading,
    /// `Expect: 100-continue` not answered yet (and how much of the answer is out).
    continue_pending: Option<usize>,
}

#[derive(Debug)]
struct Exchange {
    io: Arc<Io>,
    state: Mutex<BodyState>,
}

/// A request body read from this module's connection, as it arrives.
#[derive(Debug)]
pub struct RequestBody {
    shared: Arc<Exchange>,
}

/// Why a request body could not be read.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BodyError(String);

impl RequestBody {
    fn lock(&self) -> std::sync::MutexGuard<'_, BodyState> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let shared = &*self.get_mut().shared;
        let io = &shared.io;
        let mut guard = shared.state.lock().unwrap_or_else(|e| e.into_inner());
        let st = &mut *guard;
        loop {
            match &mut st.reading {
                Reading::Done => return Poll::Ready(None),
                Reading::Failed(why) => return Poll::Ready(Some(Err(BodyError((*why).into())))),
                Reading::Length(0) => {
                    st.reading = Reading::Done;
                    return Poll::Ready(None);
                }
                Reading::Length(left) => {
                    if !st.buf.is_empty() {
                        let take = (*left).min(st.buf.len() as u64) as usize;
                        *left -= take as u64;
                        if *left == 0 {
                            st.reading = Reading::Done;
                        }
                        let data = st.buf.split_to(take).freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                Reading::Chunked(decoder) => match decoder.step(&mut st.buf) {
                    Ok(Step::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(Step::Done) => {
                        st.reading = Reading::Done;
                        return Poll::Ready(None);
                    }
                    Ok(Step::NeedMore) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "client request body");
                        st.reading = Reading::Failed("malformed chunked request body");
                        continue;
                    }
                },
            }
            // More bytes are needed: answer `Expect: 100-continue` first.
            while let Some(sent) = st.continue_pending {
                let n = ready!(io.poll_write(cx, &CONTINUE[sent..]))
                    .map_err(|e| BodyError(e.to_string()))?;
                st.continue_pending = (sent + n < CONTINUE.len()).then_some(sent + n);
            }
            match ready!(io.poll_read_into(cx, &mut st.buf)) {
                Ok(0) => st.reading = Reading::Failed("the client closed inside the request body"),
                Ok(_) => {}
                Err(e) => return Poll::Ready(Some(Err(BodyError(e.to_string())))),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.lock().reading, Reading::Done | Reading::Length(0))
    }

    fn size_hint(&self) -> SizeHint {
        match self.lock().reading {
            Reading::Length(n) => SizeHint::with_exact(n),
            Reading::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

/// A plain-TCP HTTP/1.x client connection, ready to be served.
#[derive(Debug)]
pub struct Lean {
    io: Arc<Io>,
    /// Bytes read and not yet used; `None` while there are none (the idle state).
    buf: Option<BytesMut>,
    ctx: Arc<ConnContext>,
    /// Since when the connection waits for its next request head (its clocks run from there).
    since: Instant,
}

/// A connection parked without a task (see the module's documentation).
struct ParkedConn {
    /// Its place in the listener's [`crate::listener::Parking`].
    key: usize,
    /// Its idle deadline.
    until: Instant,
    /// Resumed or closed (whichever came first takes the connection).
    claimed: AtomicBool,
    conn: Mutex<Option<Lean>>,
}

impl ParkedConn {
    /// The connection, for whichever of resume and close comes first.
    fn claim(&self) -> Option<Lean> {
        if self.claimed.swap(true, Ordering::AcqRel) {
            return None;
        }
        let lean = self.conn.lock().unwrap_or_else(|e| e.into_inner()).take()?;
        let stats = &lean.ctx.listener.stats;
        stats.parked_connections.fetch_sub(1, Ordering::Relaxed);
        Some(lean)
    }

    /// Takes the connection back from the listener's parked ones.
    fn resume(self: &Arc<Self>) -> Option<Lean> {
        let lean = self.claim()?;
        let me: Arc<dyn crate::listener::Parked> = self.clone();
        lean.ctx.parking.unpark(self.key, &me);
        Some(lean)
    }
}

impl std::task::Wake for ParkedConn {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    /// The client sent bytes or closed: the connection gets a task again, on this worker.
    fn wake_by_ref(self: &Arc<Self>) {
        let Some(lean) = self.resume() else { return };
        if tokio::runtime::Handle::try_current().is_ok() {
            let tracker = lean.ctx.tracker.clone();
            tracker.spawn(lean.serve());
        }
    }
}

impl crate::listener::Parked for ParkedConn {
    fn until(&self) -> Instant {
        self.until
    }

    fn close(&self, timeout: bool) -> bool {
        let Some(lean) = self.claim() else {
            return false;
        };
        if timeout {
            lean.ctx
                .listener
                .stats
                .idle_timeouts
                .fetch_add(1, Ordering::Relaxed);
        }
        true
    }
}

/// Parks `lean` (idle until `until`): `None` when it parked (or closed, the listener stopping);
/// the connection back when the client's bytes are already there.
fn park(lean: Lean, until: Instant) -> Option<Lean> {
    let io = lean.io.clone();
    let parking = lean.ctx.parking.clone();
    let parked = parking.park(|key| {
        let stats = &lean.ctx.listener.stats;
        stats.parked_connections.fetch_add(1, Ordering::Relaxed);
        Arc::new(ParkedConn {
            key,
            until,
            claimed: AtomicBool::new(false),
            conn: Mutex::new(Some(lean)),
        })
    })?;
    let waker = std::task::Waker::from(parked.clone());
    match io.stream.poll_read_ready(&mut Context::from_waker(&waker)) {
        Poll::Pending => None,
        Poll::Ready(_) => parked.resume(),
    }
}

impl Lean {
    /// The connection on `stream`; `first`: the buffer (from the worker's pool) holding the bytes
    /// already read, those that told HTTP/1 from HTTP/2.
    pub fn new(stream: TcpStream, first: BytesMut, ctx: Arc<ConnContext>) -> Lean {
        Lean {
            io: Arc::new(Io { stream }),
            buf: Some(first),
            ctx,
            since: Instant::now(),
        }
    }

    /// Serves the connection until it closes, times out, or the listener stops. (Its fields are
    /// used in place, not moved into locals: the future keeps its argument for its whole life.)
    pub async fn serve(self) {
        // The listener's stop is awaited once for the connection's life (not once per wait): an
        // idle connection closes at once, one with a request under way finishes it first.
        // One slot watches the stop, then (while a request finishes) the deadline that cuts it.
        // Bytes already read (a new connection's first ones) are a request under way.
        let waiting = AtomicBool::new(self.buf.as_ref().is_none_or(|b| b.is_empty()));
        let (stop, deadline) = (self.ctx.stop.clone(), self.ctx.deadline.clone());
        let run = self.run(&waiting);
        tokio::pin!(run);
        let watch = stop.cancelled();
        tokio::pin!(watch);
        let mut stopping = false;
        loop {
            tokio::select! {
                biased;
                () = &mut run => return,
                () = &mut watch => {
                    if stopping || waiting.load(Ordering::Relaxed) {
                        return;
                    }
                    stopping = true;
                    watch.set(deadline.cancelled());
                }
            }
        }
    }

    /// The connection's requests, one after the other. `waiting`: nothing of a request has arrived.
    async fn run(mut self, waiting: &AtomicBool) {
        // The current request head must be complete by then (the first one since the connection
        // opened, or since it parked).
        let mut head_since = self.since;
        // One timer for the connection's life, moved only when a deadline comes earlier; a deadline
        // that moved later is found when the timer fires early (no timer churn per request).
        let first = self
            .ctx
            .settings
            .request_header_timeout
            .min(self.ctx.settings.idle_timeout);
        let sleep = tokio::time::sleep_until(head_since + first);
        tokio::pin!(sleep);
        loop {
            // (In a block of its own, so that nothing of it borrows the connection after it.)
            {
                // What the bytes so far allow (decided before any await, so that the parsed head is not kept
                // in the connection's future while it waits).
                let next = match self.buf.as_deref() {
                    Some(b) if !b.is_empty() => {
                        match request_head::parse(
                            b,
                            self.ctx.settings.max_header_size,
                            self.ctx.settings.max_headers,
                        ) {
                            Err(e) => {
                                tracing::debug!(client = %self.ctx.client.addr, error = %e, "refused request head");
                                Next::Refuse(e.status())
                            }
                            Ok(Some((head, len))) => match self.buf.take() {
                                Some(mut rest) => {
                                    rest.advance(len);
                                    Next::Exchange(Box::pin(exchange(
                                        &self.io, &self.ctx, head, rest,
                                    )))
                                }
                                None => return,
                            },
                            Ok(None) => Next::Wait,
                        }
                    }
                    _ => Next::Wait,
                };
                match next {
                    Next::Refuse(status) => {
                        Box::pin(refuse(&self.io, status)).await;
                        return;
                    }
                    Next::Exchange(exchange) => {
                        let rest = exchange.await;
                        match rest {
                            Some(rest) if rest.is_empty() => give_buf(rest),
                            Some(rest) => self.buf = Some(rest),
                            None => return,
                        }
                        if self.ctx.stop.is_cancelled() {
                            return;
                        }
                        head_since = Instant::now();
                        continue;
                    }
                    Next::Wait => {}
                }
            }
            // Wait for bytes. With nothing received the connection holds no buffer.
            let partial = self.buf.as_ref().is_some_and(|b| !b.is_empty());
            let settings = &self.ctx.settings;
            let until = if partial {
                head_since + settings.request_header_timeout
            } else {
                head_since + settings.request_header_timeout.min(settings.idle_timeout)
            };
            // With nothing received, the connection parks when it has waited long enough.
            let park_at = (!partial)
                .then_some(head_since + PARK_AFTER)
                .filter(|at| *at < until);
            let wake_at = park_at.unwrap_or(until);
            if sleep.is_elapsed() || wake_at < sleep.deadline() {
                sleep.as_mut().reset(wake_at);
            }
            waiting.store(!partial, Ordering::Relaxed);
            let ready = if partial {
                tokio::select! {
                    biased;
                    r = self.io.stream.readable() => r.is_ok(),
                    _ = &mut sleep => {
                        if Instant::now() < until {
                            continue;
                        }
                        let _ = self.io.stream.try_write(REQUEST_TIMEOUT_RESPONSE);
                        return;
                    }
                }
            } else {
                let woke = tokio::select! {
                    biased;
                    r = self.io.stream.readable() => Woke::Ready(r.is_ok()),
                    _ = &mut sleep => Woke::Timer,
                };
                match woke {
                    Woke::Ready(ok) => ok,
                    Woke::Timer => {
                        let now = Instant::now();
                        if now >= until {
                            self.ctx
                                .listener
                                .stats
                                .idle_timeouts
                                .fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                        if park_at.is_some_and(|at| now >= at) && !self.ctx.stop.is_cancelled() {
                            self.since = head_since;
                            if let Some(b) = self.buf.take() {
                                give_buf(b);
                            }
                            match park(self, until) {
                                Some(back) => self = back,
                                None => return,
                            }
                        }
                        continue;
                    }
                }
            };
            if !ready {
                return;
            }
            let b = self.buf.get_or_insert_with(take_buf);
            if b.capacity() - b.len() < 1024 {
                b.reserve(BUF_SIZE);
            }
            match read_draining(&self.io.stream, b) {
                Ok(0) => return,
                Ok(_) => waiting.store(false, Ordering::Relaxed),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if b.is_empty() {
                        if let Some(b) = self.buf.take() {
                            give_buf(b);
                        }
                    }
                }
                Err(_) => return,
            }
        }
    }
}

/// What ended an idle connection's wait.
enum Woke {
    /// Its socket (false: with an error).
    Ready(bool),
    /// Its timer: the idle deadline, or the time to park.
    Timer,
}

/// What to do next on a connection.
enum Next<'a> {
    Refuse(StatusCode),
    Exchange(Pin<Box<dyn std::future::Future<Output = Option<BytesMut>> + Send + 'a>>),
    Wait,
}

/// The answer to a head that cannot be served; the connection closes after it.
async fn refuse(io: &Io, status: StatusCode) {
    let mut out = BytesMut::with_capacity(160);
    let extra: [&[u8]; 2] = [b"content-length: 0\r\n", b"connection: close\r\n"];
    write_head(&mut out, status, &HeaderMap::new(), &extra);
    let _ = tokio::time::timeout(Duration::from_secs(1), io.write_two(&out, &[])).await;
}

/// One request: hands it to the proxy and writes the answer. Returns the bytes read past the
/// request (the start of the next one) when the connection may carry another request.
async fn exchange(
    io: &Arc<Io>,
    ctx: &Arc<ConnContext>,
    head: RequestHead,
    rest: BytesMut,
) -> Option<BytesMut> {
    let RequestHead {
        method,
        uri,
        version,
        headers,
        framing,
        keep_alive,
        expect_continue,
        wants_upgrade,
    } = head;
    let is_head = method == Method::HEAD;
    let (body, shared, mut rest) = match framing {
        BodyFraming::Empty => (RequestIn::Empty, None, Some(rest)),
        BodyFraming::Length(n) => lean_body(io, rest, Reading::Length(n), expect_continue),
        BodyFraming::Chunked => {
            lean_body(io, rest, Reading::Chunked(Box::default()), expect_continue)
        }
    };
    let mut req = Request::new(body);
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = version;
    *req.headers_mut() = headers;
    let mut upgrade = None;
    if wants_upgrade {
        let (tx, rx) = oneshot::channel();
        req.extensions_mut()
            .insert(PendingUpgrade(Arc::new(Mutex::new(Some(rx)))));
        upgrade = Some(tx);
    }
    let resp = match proxy::handle(ctx.clone(), req).await {
        Ok(r) => r,
        Err(never) => match never {},
    };
    let mut keep_alive = keep_alive && !ctx.stop.is_cancelled();
    // The request body must have been read to its end for the next request to be found.
    if let Some(shared) = &shared {
        let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
        if matches!(st.reading, Reading::Done) {
            rest = Some(std::mem::take(&mut st.buf));
        } else {
            keep_alive = false;
        }
    }
    let (parts, body) = resp.into_parts();
    if parts.status == StatusCode::SWITCHING_PROTOCOLS {
        let early = rest.map(BytesMut::freeze).unwrap_or_default();
        let mut out = take_buf();
        write_head(&mut out, parts.status, &parts.headers, &[]);
        let wrote = write(io, ctx, &out, &[]).await;
        give_buf(out);
        if wrote {
            if let Some(tx) = upgrade {
                let _ = tx.send(Upgraded {
                    io: io.clone(),
                    early,
                });
            }
        }
        return None;
    }
    let wrote = write_response(io, ctx, parts, body, version, is_head, &mut keep_alive).await;
    match rest {
        _ if wrote && keep_alive => Some(rest.unwrap_or_else(take_buf)),
        // The connection closes: its buffer goes back to the worker's pool.
        Some(rest) => {
            give_buf(rest);
            None
        }
        None => None,
    }
}

fn lean_body(
    io: &Arc<Io>,
    rest: BytesMut,
    reading: Reading,
    expect_continue: bool,
) -> (RequestIn, Option<Arc<Exchange>>, Option<BytesMut>) {
    // A client that already sent body bytes is not waiting for the 100.
    let continue_pending = (expect_continue && rest.is_empty()).then_some(0);
    let shared = Arc::new(Exchange {
        io: io.clone(),
        state: Mutex::new(BodyState {
            buf: rest,
            reading,
            continue_pending,
        }),
    });
    (
        RequestIn::Lean(RequestBody {
            shared: shared.clone(),
        }),
        Some(shared),
        None,
    )
}

/// How the response body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Out {
    None,
    Length,
    Chunked,
    Close,
}

/// The status line and headers, with `extra` header lines (each ending in CRLF) before the blank line.
fn write_head(out: &mut BytesMut, status: StatusCode, headers: &HeaderMap, extra: &[&[u8]]) {
    out.put_slice(b"HTTP/1.1 ");
    out.put_slice(status.as_str().as_bytes());
    out.put_u8(b' ');
    out.put_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.put_slice(b"\r\n");
    for (name, value) in headers {
        out.put_slice(name.as_str().as_bytes());
        out.put_slice(b": ");
        out.put_slice(value.as_bytes());
        out.put_slice(b"\r\n");
    }
    if !headers.contains_key(DATE) {
        out.put_slice(b"date: ");
        out.put_slice(date().as_bytes());
        out.put_slice(b"\r\n");
    }
    for line in extra {
        out.put_slice(line);
    }
    out.put_slice(b"\r\n");
}

/// Writes within the listener's `write_timeout`; false when the client is gone or too slow.
async fn write(io: &Io, ctx: &ConnContext, head: &[u8], data: &[u8]) -> bool {
    within_write_timeout(ctx, io.write_two(head, data)).await
}

/// Writes the end of a response: when the connection closes after it, together with the FIN.
async fn write_end(io: &Io, ctx: &ConnContext, bytes: &[u8], keep_alive: bool) -> bool {
    if keep_alive {
        return write(io, ctx, bytes, &[]).await;
    }
    within_write_timeout(ctx, io.write_closing(bytes)).await
}

/// Runs `writing` within the listener's `write_timeout`; false when it failed or timed out (counted
/// in `write_timeouts`).
async fn within_write_timeout(
    ctx: &ConnContext,
    writing: impl std::future::Future<Output = io::Result<()>>,
) -> bool {
    match tokio::time::timeout(ctx.settings.write_timeout, writing).await {
        Ok(r) => r.is_ok(),
        Err(_) => {
            ctx.listener
                .stats
                .write_timeouts
                .fetch_add(1, Ordering::Relaxed);
            false
        }
    }
}

/// Writes the response; false when the connection must close now (the client went away, the body
/// failed midway).
async fn write_response(
    io: &Io,
    ctx: &ConnContext,
    parts: http::response::Parts,
    mut body: ProxyBody,
    version: Version,
    is_head: bool,
    keep_alive: &mut bool,
) -> bool {
    let status = parts.status;
    let headers = &parts.headers;
    let bodyless = is_head
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let mut length_line = Vec::new();
    let framing = if bodyless {
        Out::None
    } else if headers.contains_key(TRANSFER_ENCODING) {
        Out::Chunked
    } else if headers.contains_key(CONTENT_LENGTH) {
        Out::Length
    } else if let Some(n) = body.size_hint().exact() {
        length_line = format!("content-length: {n}\r\n").into_bytes();
        Out::Length
    } else if version == Version::HTTP_11 {
        Out::Chunked
    } else {
        *keep_alive = false;
        Out::Close
    };
    let mut extra: Vec<&[u8]> = Vec::with_capacity(3);
    if !length_line.is_empty() {
        extra.push(&length_line);
    }
    if framing == Out::Chunked && !headers.contains_key(TRANSFER_ENCODING) {
        extra.push(b"transfer-encoding: chunked\r\n");
    }
    let asks_close = super::headers::has_token(headers, CONNECTION, "close");
    if asks_close {
        *keep_alive = false;
    } else if !*keep_alive && version == Version::HTTP_11 {
        extra.push(b"connection: close\r\n");
    } else if *keep_alive && version == Version::HTTP_10 {
        extra.push(b"connection: keep-alive\r\n");
    }
    let mut out = take_buf();
    write_head(&mut out, status, headers, &extra);
    drop(extra);
    if framing == Out::None {
        drop(body);
        let ok = write_end(io, ctx, &out, *keep_alive).await;
        give_buf(out);
        return ok;
    }
    let mut trailers: Option<HeaderMap> = None;
    let mut ok = true;
    // A chunk's size line, reused for every chunk of the response.
    let mut line = Vec::new();
    loop {
        if framing == Out::Length {
            if let Some((server, left)) = body.splice_source(SPLICE_MIN) {
                // The rest of a large body moves kernel to kernel, after what is already here.
                if !write(io, ctx, &out, &[]).await {
                    give_buf(out);
                    return false;
                }
                out.clear();
                let mut moved = 0;
                let r = crate::pipe::splice_exact(
                    server,
                    &io.stream,
                    left,
                    ctx.settings.write_timeout,
                    &mut moved,
                )
                .await;
                let server_failed = matches!(r, Err(crate::pipe::SpliceError::Source(_)));
                body.spliced(moved, server_failed);
                let stats = &ctx.listener.stats;
                stats.spliced_bytes.fetch_add(moved, Ordering::Relaxed);
                match r {
                    Ok(()) => continue,
                    Err(e) => {
                        if matches!(e, crate::pipe::SpliceError::Timeout) {
                            stats.write_timeouts.fetch_add(1, Ordering::Relaxed);
                        }
                        tracing::debug!(error = ?e, "response body failed midway: closing the client connection");
                        give_buf(out);
                        return false;
                    }
                }
            }
        }
        let frame = poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
        let data = match frame {
            None => break,
            Some(Err(e)) => {
                tracing::debug!(error = %e, "response body failed midway: closing the client connection");
                ok = false;
                break;
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                Err(frame) => {
                    if let Ok(t) = frame.into_trailers() {
                        trailers = Some(t);
                    }
                    continue;
                }
            },
        };
        if data.is_empty() {
            continue;
        }
        if framing == Out::Chunked {
            line.clear();
            encode_size_line(data.len(), &mut line);
            out.put_slice(&line);
        }
        if out.len() + data.len() <= COALESCE {
            out.put_slice(&data);
        } else {
            if !write(io, ctx, &out, &data).await {
                give_buf(out);
                return false;
            }
            out.clear();
        }
        if framing == Out::Chunked {
            out.put_slice(b"\r\n");
        }
        if out.len() >= COALESCE && !body.is_end_stream() {
            if !write(io, ctx, &out, &[]).await {
                give_buf(out);
                return false;
            }
            out.clear();
        }
    }
    if ok && framing == Out::Chunked {
        out.put_slice(b"0\r\n");
        for (name, value) in trailers.iter().flatten() {
            out.put_slice(name.as_str().as_bytes());
            out.put_slice(b": ");
            out.put_slice(value.as_bytes());
            out.put_slice(b"\r\n");
        }
        out.put_slice(b"\r\n");
    }
    let wrote = write_end(io, ctx, &out, *keep_alive && ok).await;
    give_buf(out);
    ok && wrote
}

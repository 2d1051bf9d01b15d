//! The response body fulcrum sends to clients: a server's body read straight from its connection as
//! the client side asks for it, or a short local body.
//!
//! A streamed body carries an [`InFlight`] guard: the request counts as in flight on its server until
//! the body is dropped, which hyper does once the last byte has been written to the client (or the
//! client went away). The server connection goes back to the idle pool as soon as the body has been
//! read to its end, if the server allows keep-alive and sent nothing past it.
//!
//! A body that fails (the server closed inside it, or sent broken chunked framing) closes the server
//! connection and fails towards hyper, which then closes the client connection without ending the
//! response: no terminating chunk, or fewer bytes than the `Content-Length` announced, so the client
//! sees the response cut off, never complete. hyper writes the response head together with the first
//! body bytes and drops everything it holds on a body error, so a failure is reported one poll late:
//! the poll that finds it wakes the task and returns `Pending`, hyper writes out the head and the data
//! so far, and the next poll returns the error. (A body broken from its first bytes never gets here:
//! [`super::upstream::UpstreamConn::read_head`] refuses it, and the client gets a 502.)

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use std::sync::Arc;
use std::time::Instant;

use tokio::net::TcpStream;

use super::chunked::Step;
use super::upstream::{Framing, UpstreamConn};
use crate::access_log::{AccessLog, Record, Termination};
use crate::pool::InFlight;

/// A server's response body, read from its connection.
#[derive(Debug)]
pub struct UpstreamBody {
    /// `None` once the body is complete (the connection went back to the pool or was closed).
    conn: Option<UpstreamConn>,
    framing: Framing,
    keep_alive: bool,
    guard: InFlight,
    /// A failure found by the previous poll, to report on this one (see the module documentation).
    failed: Option<io::Error>,
}

impl UpstreamBody {
    /// The body delimited by `framing` on `conn`.
    pub fn new(conn: UpstreamConn, framing: Framing, keep_alive: bool, guard: InFlight) -> Self {
        let mut body = UpstreamBody {
            conn: Some(conn),
            framing,
            keep_alive,
            guard,
            failed: None,
        };
        if matches!(body.framing, Framing::Empty) {
            body.finish(true);
        }
        body
    }

    /// The body is read: reuse the connection if the exchange ended cleanly, else close it.
    fn finish(&mut self, clean: bool) {
        self.framing = Framing::Empty;
        if let Some(conn) = self.conn.take() {
            if clean && self.keep_alive && conn.buf.is_empty() {
                super::upstream::put_idle(self.guard.server(), conn);
            }
        }
    }

    /// The body failed: the connection is closed, and the error reported on the next poll, after
    /// hyper has had the chance to write out what it holds.
    fn fail(
        &mut self,
        e: io::Error,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.guard.server().stats.record_failure();
        self.finish(false);
        self.failed = Some(e);
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

fn cut_short() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the server closed the connection inside the body",
    )
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        if let Some(e) = this.failed.take() {
            return Poll::Ready(Some(Err(e)));
        }
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match &mut this.framing {
                Framing::Empty => {
                    this.finish(true);
                    return Poll::Ready(None);
                }
                Framing::Length(remaining) => {
                    if !conn.buf.is_empty() {
                        let n = (*remaining).min(conn.buf.len() as u64);
                        let data = conn.buf.split_to(n as usize).freeze();
                        *remaining -= n;
                        if *remaining == 0 {
                            this.finish(true);
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    let want = (*remaining).min(usize::MAX as u64) as usize;
                    match ready!(conn.poll_fill(cx, want)) {
                        Ok(0) => return this.fail(cut_short(), cx),
                        Ok(_) => {}
                        Err(e) => return this.fail(e, cx),
                    }
                }
                Framing::Chunked(decoder) => match decoder.step(&mut conn.buf) {
                    Ok(Step::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(Step::Done) => {
                        this.finish(true);
                        return Poll::Ready(None);
                    }
                    Ok(Step::NeedMore) => match ready!(conn.poll_fill(cx, 0)) {
                        Ok(0) => return this.fail(cut_short(), cx),
                        Ok(_) => {}
                        Err(e) => return this.fail(e, cx),
                    },
                    Err(e) => return this.fail(io::Error::new(io::ErrorKind::InvalidData, e), cx),
                },
                Framing::Close => {
                    if !conn.buf.is_empty() {
                        let data = conn.buf.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    match ready!(conn.poll_fill(cx, 0)) {
                        Ok(0) => {
                            this.finish(false);
                            return Poll::Ready(None);
                        }
                        Ok(_) => {}
                        Err(e) => return this.fail(e, cx),
                    }
                }
            }
        }
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        self.failed.is_none()
            && (self.conn.is_none() || matches!(self.framing, Framing::Empty | Framing::Length(0)))
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        match (&self.conn, &self.framing) {
            _ if self.failed.is_some() => SizeHint::default(),
            (None, _) | (_, Framing::Empty) => SizeHint::with_exact(0),
            (_, Framing::Length(n)) => SizeHint::with_exact(*n),
            _ => SizeHint::default(),
        }
    }
}

impl UpstreamBody {
    /// The server's socket and the bytes left, when the rest of the body can move kernel to kernel:
    /// a `Content-Length` body of at least `min` bytes of which nothing is buffered.
    fn splice_source(&self, min: u64) -> Option<(&TcpStream, u64)> {
        match (&self.conn, &self.framing) {
            (Some(conn), Framing::Length(left))
                if self.failed.is_none() && conn.buf.is_empty() && *left >= min =>
            {
                Some((&conn.stream, *left))
            }
            _ => None,
        }
    }

    /// `n` bytes of the body were moved past it; `failed`: the server's side failed.
    fn spliced(&mut self, n: u64, failed: bool) {
        if failed {
            self.guard.server().stats.record_failure();
            self.finish(false);
            return;
        }
        if let Framing::Length(left) = &mut self.framing {
            *left = left.saturating_sub(n);
            if *left == 0 {
                self.finish(true);
            }
        }
    }
}

impl ProxyBody {
    /// See [`UpstreamBody::splice_source`] (a server's body, logged or not).
    pub fn splice_source(&self, min: u64) -> Option<(&TcpStream, u64)> {
        match self {
            ProxyBody::Upstream(body) => body.splice_source(min),
            ProxyBody::Logged(body) => body.inner.splice_source(min),
            _ => None,
        }
    }

    /// `n` bytes of the body were moved kernel to kernel, after [`Self::splice_source`]; `failed`:
    /// the server's side failed (the connection to it is closed).
    pub fn spliced(&mut self, n: u64, failed: bool) {
        match self {
            ProxyBody::Upstream(body) => body.spliced(n, failed),
            ProxyBody::Logged(body) => {
                body.sent += n;
                body.inner.spliced(n, failed);
                body.failed |= failed;
                if failed || body.inner.is_end_stream() {
                    body.finish();
                }
            }
            _ => {}
        }
    }
}

/// A request body on its way to a server: the client's, or none at all (a request fulcrum makes
/// itself, such as the cache's background revalidation).
#[derive(Debug)]
pub enum RequestIn {
    /// The client's body as hyper reads it (h2c, TLS).
    Client(hyper::body::Incoming),
    /// The client's body as fulcrum's own HTTP/1 connection reads it.
    Lean(super::h1::RequestBody),
    /// No body.
    Empty,
}

/// Why a client's request body could not be read.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

impl Body for RequestIn {
    type Data = Bytes;
    type Error = BodyError;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            RequestIn::Client(body) => Pin::new(body)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(Into::into))),
            RequestIn::Lean(body) => Pin::new(body)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(Into::into))),
            RequestIn::Empty => Poll::Ready(None),
        }
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        match self {
            RequestIn::Client(body) => body.is_end_stream(),
            RequestIn::Lean(body) => body.is_end_stream(),
            RequestIn::Empty => true,
        }
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        match self {
            RequestIn::Client(body) => body.size_hint(),
            RequestIn::Lean(body) => body.size_hint(),
            RequestIn::Empty => SizeHint::with_exact(0),
        }
    }
}

/// A response body: streamed from a server, or generated by fulcrum.
#[derive(Debug)]
pub enum ProxyBody {
    /// A server's body, passed through as it arrives.
    Upstream(UpstreamBody),
    /// A server's body through hyper (TLS or HTTP/2 pools), trailers included.
    Client(super::client::ClientBody),
    /// A complete body (error pages, local answers); `None` once sent.
    Full(Option<Bytes>),
    /// A body whose request is logged once it has been sent (or given up).
    Logged(Box<LoggedBody>),
    /// A server's body copied into the cache as it passes.
    Cached(Box<crate::cache::Tee>),
}

impl ProxyBody {
    /// A complete body.
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        ProxyBody::Full(if bytes.is_empty() { None } else { Some(bytes) })
    }

    /// An empty body.
    pub fn empty() -> Self {
        ProxyBody::Full(None)
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = io::Error;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match self.get_mut() {
            ProxyBody::Upstream(body) => Pin::new(body).poll_frame(cx),
            ProxyBody::Client(body) => Pin::new(body).poll_frame(cx),
            ProxyBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Logged(body) => Pin::new(&mut **body).poll_frame(cx),
            ProxyBody::Cached(body) => Pin::new(&mut **body).poll_frame(cx),
        }
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Upstream(body) => body.is_end_stream(),
            ProxyBody::Client(body) => body.is_end_stream(),
            ProxyBody::Full(bytes) => bytes.is_none(),
            ProxyBody::Logged(body) => body.inner.is_end_stream(),
            ProxyBody::Cached(body) => body.is_end_stream(),
        }
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Upstream(body) => body.size_hint(),
            ProxyBody::Client(body) => body.size_hint(),
            ProxyBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            ProxyBody::Full(None) => SizeHint::with_exact(0),
            ProxyBody::Logged(body) => body.inner.size_hint(),
            ProxyBody::Cached(body) => body.size_hint(),
        }
    }
}

/// A response body that writes its request's access log line when it ends: complete (`ok`), failed
/// at the server (`server_abort`), or dropped before its end because the client went away
/// (`client_abort`).
#[derive(Debug)]
pub struct LoggedBody {
    inner: ProxyBody,
    pending: Option<(Arc<AccessLog>, Record, Instant)>,
    sent: u64,
    failed: bool,
}

impl LoggedBody {
    /// `inner`, logging `record` to `log` when it ends; `started` is when the request arrived.
    pub fn wrap(
        inner: ProxyBody,
        log: Arc<AccessLog>,
        record: Record,
        started: Instant,
    ) -> ProxyBody {
        ProxyBody::Logged(Box::new(LoggedBody {
            inner,
            pending: Some((log, record, started)),
            sent: 0,
            failed: false,
        }))
    }

    fn finish(&mut self) {
        let Some((log, mut record, started)) = self.pending.take() else {
            return;
        };
        record.bytes_out = self.sent;
        record.request_time = started.elapsed();
        if record.termination == Termination::Ok {
            if self.failed {
                record.termination = Termination::ServerAbort;
            } else if !self.inner.is_end_stream() {
                record.termination = Termination::ClientAbort;
            }
        }
        log.log(record);
    }
}

impl Body for LoggedBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.sent += data.len() as u64;
                }
                if this.inner.is_end_stream() {
                    this.finish();
                }
            }
            Poll::Ready(Some(Err(_))) => {
                this.failed = true;
                this.finish();
            }
            Poll::Ready(None) => this.finish(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        self.finish();
    }
}

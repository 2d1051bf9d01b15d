//! Connections to servers: a lean HTTP/1.1 client, driven from the request's own task.
//!
//! fulcrum speaks HTTP/1.1 to servers itself rather than through a client library: the request head is
//! encoded into a reused buffer and written with one syscall, the response head is parsed with
//! `httparse` straight from the read buffer (header values are zero-copy slices of it), and the
//! response body is read by [`super::body::ProxyBody`] as the client side asks for it. No connection
//! task, no channel and no wake-up sits between the client and the server socket.
//!
//! Idle keep-alive connections are kept per server and per worker thread, so checking one out takes an
//! uncontended lock and no hashing. A connection goes back only when its response has been read to the
//! end with nothing left over; before reuse, the reactor's cached readiness tells (without a syscall)
//! whether the server closed it meanwhile.
//!
//! Answers are held to RFC 9112 as strictly as requests are: a response whose framing is ambiguous
//! (a `Content-Length` that is not plain digits, two that differ, a transfer coding other than
//! `chunked`, `Transfer-Encoding` in HTTP/1.0) is refused as malformed, so the proxy answers 502
//! instead of passing on something the client or the next exchange on this connection could read
//! differently. With both `Transfer-Encoding` and `Content-Length`, the first wins, the second is not
//! passed on, and the connection is not reused (§6.3). The chunked body bytes that arrived with the
//! head are checked before the head is handed on, so a body broken from its first bytes is a 502 too.
//!
//! A server may answer before it has read the whole request body (a `413` to a large upload) and
//! close. While the body is being sent, whenever sending would wait (for the client's next bytes, or
//! for room in the socket) or a write fails, the server's side is checked: once it has closed, or
//! begun a final answer that is not a success, sending stops and the answer is read as usual; the
//! connection is not reused. A `2xx` that starts while the body is still going is a server streaming
//! its answer as it reads (full duplex, as an echo does): the body goes on, and the answer is read
//! once it is sent. Nor is a connection reused after an error answer to a request with a body, which
//! may well have been sent before the server read that body even when all of it fitted in the socket
//! buffers.

use std::cell::Cell;
use std::collections::HashMap;
use std::future::poll_fn;
use std::hash::{BuildHasherDefault, Hasher};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Mutex, OnceLock};
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use super::body::RequestIn;
use bytes::{Buf, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use http_body::Body;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::chunked::{encode_size_line, ChunkedDecoder, ChunkedError};
use super::headers::has_token;
use crate::pool::Server;

/// Idle connections kept per server and worker; more are closed when returned.
const MAX_IDLE_PER_WORKER: usize = 512;
/// The largest response head accepted.
const MAX_HEAD: usize = 64 * 1024;
/// The most response headers accepted.
const MAX_HEADERS: usize = 128;
/// Read buffer growth step.
const READ_CHUNK: usize = 16 * 1024;

/// Read buffers kept per worker for the server connections that are not reading (see [`lend_buf`]).
const SPARE_BUFS: usize = 32;

thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(0) };
    /// Read buffers of idle server connections, lent to the next one that reads.
    static SPARE: std::cell::RefCell<Vec<BytesMut>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Makes sure `buf` has room to read into. A connection without a buffer (idle ones hand theirs
/// back) borrows a spare one first: a pooled idle connection holds no 16 KiB buffer, and in a steady
/// stream of requests the same few buffers go round without an allocation.
#[inline]
fn room(buf: &mut BytesMut, want: usize) {
    if buf.capacity() == 0 {
        if let Some(spare) = SPARE.with(|s| s.borrow_mut().pop()) {
            *buf = spare;
        }
    }
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(want);
    }
}

/// Hands an empty read buffer back to the worker's spares.
#[inline]
fn spare(buf: &mut BytesMut) {
    if buf.is_empty() && buf.capacity() >= 1024 {
        let b = std::mem::take(buf);
        SPARE.with(|s| {
            let mut s = s.borrow_mut();
            if s.len() < SPARE_BUFS {
                s.push(b);
            }
        });
    }
}

/// Marks the current thread as worker `id` (selects its idle-connection stacks).
pub fn set_worker_id(id: usize) {
    WORKER.with(|w| w.set(id));
}

/// An open HTTP/1.1 connection to a server.
#[derive(Debug)]
pub struct UpstreamConn {
    pub(super) stream: TcpStream,
    /// Bytes read from the server and not consumed yet.
    pub(super) buf: BytesMut,
    /// The request head being written (kept to reuse its allocation).
    out: Vec<u8>,
    /// How much of the last request's body was sent.
    body: BodySent,
}

/// How much of a request's body was sent, which decides whether the connection may be reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodySent {
    /// The request had no body.
    None,
    /// All of it.
    Whole,
    /// Not all of it (the server answered early, or writing failed): the connection is out of step.
    Cut,
}

/// How a request body is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestBody {
    /// No body (and, for methods that expect one, `Content-Length: 0`).
    Empty,
    /// The client's `Content-Length` is kept; bytes are copied as they come.
    Length,
    /// Length unknown: `Transfer-Encoding: chunked`.
    Chunked,
}

impl RequestBody {
    /// How to send the body of a request with these headers.
    pub fn of(headers: &HeaderMap, body: &RequestIn) -> Self {
        use http_body::Body;
        if body.is_end_stream() {
            RequestBody::Empty
        } else if headers.contains_key(header::CONTENT_LENGTH) {
            RequestBody::Length
        } else {
            RequestBody::Chunked
        }
    }
}

/// How the response body is delimited.
#[derive(Debug, Clone)]
pub enum Framing {
    /// No body (HEAD, 1xx, 204, 304) or the body has been read.
    Empty,
    /// `Content-Length`: this many bytes remain.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked(ChunkedDecoder),
    /// Until the server closes the connection.
    Close,
}

/// A parsed response head.
#[derive(Debug)]
pub struct ResponseHead {
    /// The status.
    pub status: StatusCode,
    /// The headers, hop-by-hop included (the caller strips them).
    pub headers: HeaderMap,
    /// How the body is delimited.
    pub framing: Framing,
    /// The connection may carry another request after this response.
    pub keep_alive: bool,
}

/// Why sending a request failed.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// Writing the head failed: the server cannot have acted on an incomplete request.
    #[error("writing the request head: {0}")]
    Head(io::Error),
    /// The client's body failed (client went away, malformed).
    #[error("reading the client's request body: {0}")]
    Client(super::body::BodyError),
    /// The client's body made no progress for the listener's `body_timeout`.
    #[error("the client's request body stopped arriving")]
    ClientTimeout,
    /// The client's body went past `max_body_size`.
    #[error("the client's request body is over the limit")]
    TooLarge,
    /// The server took none of the body for the pool's `response_timeout`.
    #[error("the server stopped reading the request body")]
    ServerTimeout,
}

/// What bounds a request body on its way to the server.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    /// No progress from the client for this long: the client's fault (408).
    pub client_timeout: Duration,
    /// No progress into the server for this long: the server's fault (504).
    pub server_timeout: Duration,
    /// The most bytes a body may have (413 past it).
    pub max: Option<u64>,
}

/// Why reading a response head failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The server closed (or reset) the connection before sending a byte.
    #[error("the server closed the connection without answering")]
    Closed,
    /// The connection ended inside the response head.
    #[error("the response head was cut short")]
    Truncated,
    /// Reading failed.
    #[error("reading the response: {0}")]
    Io(io::Error),
    /// The response head is not valid HTTP/1.x.
    #[error("malformed response head: {0}")]
    Malformed(&'static str),
    /// The chunked body bytes that came with the head are malformed.
    #[error("{0}")]
    Body(ChunkedError),
}

impl UpstreamConn {
    fn new(stream: TcpStream) -> Self {
        UpstreamConn {
            stream,
            buf: BytesMut::new(),
            out: Vec::with_capacity(1024),
            body: BodySent::None,
        }
    }

    /// False when the server closed the connection (or sent something unasked) while it was idle.
    ///
    /// Uses the reactor's cached readiness: an idle connection that is not readable is open, and
    /// finding that out costs no syscall.
    fn is_usable(&self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        match self.stream.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }

    /// Writes the request: its head, then its body as the client sends it.
    ///
    /// A write error on the body, or an answer (or a close) from the server while sending the body
    /// would wait, ends the body early without an error: [`read_head`](Self::read_head) then reads
    /// what the server said, or reports that it said nothing.
    pub async fn send(
        &mut self,
        parts: &http::request::Parts,
        body: &mut RequestIn,
        framing: RequestBody,
        limits: BodyLimits,
    ) -> Result<(), SendError> {
        self.body = BodySent::None;
        encode_head(&mut self.out, parts, framing);
        self.stream
            .write_all(&self.out)
            .await
            .map_err(SendError::Head)?;
        if framing == RequestBody::Empty {
            return Ok(());
        }
        self.body = if self.send_body(body, framing, limits).await? {
            BodySent::Whole
        } else {
            BodySent::Cut
        };
        Ok(())
    }

    /// Streams the request body; false when it stopped before its end (see [`send`](Self::send)).
    async fn send_body(
        &mut self,
        body: &mut RequestIn,
        framing: RequestBody,
        limits: BodyLimits,
    ) -> Result<bool, SendError> {
        let (stream, buf) = (&mut self.stream, &mut self.buf);
        let mut total: u64 = 0;
        // Whether the server's side is still watched (until it starts a streamed answer).
        let watch = &mut true;
        loop {
            let next = poll_fn(|cx| {
                if let Poll::Ready(frame) = Pin::new(&mut *body).poll_frame(cx) {
                    return Poll::Ready(Some(frame));
                }
                ready!(poll_early(stream, buf, watch, cx));
                Poll::Ready(None)
            });
            let frame = tokio::time::timeout(limits.client_timeout, next)
                .await
                .map_err(|_| SendError::ClientTimeout)?;
            if let Some(Some(Ok(f))) = &frame {
                if let Some(data) = f.data_ref() {
                    total += data.len() as u64;
                    if limits.max.is_some_and(|max| total > max) {
                        return Err(SendError::TooLarge);
                    }
                }
            }
            let data = match frame {
                None => return Ok(false),
                Some(None) => break,
                Some(Some(frame)) => match frame.map_err(SendError::Client)?.into_data() {
                    Ok(data) if !data.is_empty() => data,
                    _ => continue,
                },
            };
            let wrote = async {
                if framing == RequestBody::Chunked {
                    self.out.clear();
                    encode_size_line(data.len(), &mut self.out);
                    write_body(stream, buf, watch, &self.out).await
                        && write_body(stream, buf, watch, &data).await
                        && write_body(stream, buf, watch, b"\r\n").await
                } else {
                    write_body(stream, buf, watch, &data).await
                }
            };
            if !tokio::time::timeout(limits.server_timeout, wrote)
                .await
                .map_err(|_| SendError::ServerTimeout)?
            {
                return Ok(false);
            }
        }
        if framing != RequestBody::Chunked {
            return Ok(true);
        }
        tokio::time::timeout(
            limits.server_timeout,
            write_body(stream, buf, watch, b"0\r\n\r\n"),
        )
        .await
        .map_err(|_| SendError::ServerTimeout)
    }

    /// Reads the response head (skipping `100 Continue` and other interim answers except `101`).
    pub async fn read_head(&mut self, method: &Method) -> Result<ResponseHead, ReadError> {
        let mut received = !self.buf.is_empty();
        loop {
            if !self.buf.is_empty() {
                if let Some(mut head) = parse_head(&mut self.buf, method)? {
                    if head.status.is_informational()
                        && head.status != StatusCode::SWITCHING_PROTOCOLS
                    {
                        continue;
                    }
                    // What came with the head is checked before the head is handed on: once it is
                    // on its way to the client, a broken body can only cut the response off.
                    if let Framing::Chunked(decoder) = &head.framing {
                        decoder.check(&self.buf).map_err(ReadError::Body)?;
                    }
                    // A connection whose request body was cut short is out of step. An error answer
                    // to a request with a body is often sent before the server read the body (a 413,
                    // a 401 to an upload), and followed by a close that the next request would race:
                    // all of the body may have fitted in the socket buffers without the server
                    // reading a byte of it. Neither connection is reused.
                    if self.body == BodySent::Cut
                        || (self.body == BodySent::Whole
                            && (head.status.is_client_error() || head.status.is_server_error()))
                    {
                        head.keep_alive = false;
                    }
                    return Ok(head);
                }
                if self.buf.len() >= MAX_HEAD {
                    return Err(ReadError::Malformed("response head too large"));
                }
            }
            room(&mut self.buf, READ_CHUNK);
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) if received => return Err(ReadError::Truncated),
                Ok(0) => return Err(ReadError::Closed),
                Ok(_) => received = true,
                Err(e) if !received && e.kind() == io::ErrorKind::ConnectionReset => {
                    return Err(ReadError::Closed)
                }
                Err(e) => return Err(ReadError::Io(e)),
            }
        }
    }

    /// Reads more of the response into the buffer; `Ok(0)` at end of stream.
    pub(super) fn poll_fill(
        &mut self,
        cx: &mut Context<'_>,
        want: usize,
    ) -> Poll<io::Result<usize>> {
        room(&mut self.buf, want.clamp(READ_CHUNK, 4 * READ_CHUNK));
        tokio_util::io::poll_read_buf(std::pin::Pin::new(&mut self.stream), cx, &mut self.buf)
    }

    /// The socket and whatever was read past the response head (for an upgraded connection).
    pub fn into_parts(self) -> (TcpStream, BytesMut) {
        (self.stream, self.buf)
    }
}

/// Writes all of `data` to the server; false when the server refused the body (or closed) while the
/// write waited for room, or when the write failed — the body stops there either way.
async fn write_body(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    watch: &mut bool,
    mut data: &[u8],
) -> bool {
    poll_fn(|cx| {
        while !data.is_empty() {
            match Pin::new(&mut *stream).poll_write(cx, data) {
                Poll::Ready(Ok(n)) if n > 0 => data = &data[n..],
                Poll::Ready(Ok(_)) => return Poll::Ready(false),
                Poll::Ready(Err(e)) => {
                    tracing::debug!(error = %e, "writing the request body failed; reading the server's answer");
                    return Poll::Ready(false);
                }
                Poll::Pending => {
                    ready!(poll_early(stream, buf, watch, cx));
                    return Poll::Ready(false);
                }
            }
        }
        Poll::Ready(true)
    })
    .await
}

/// What the server said while the request body was being sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Early {
    /// Nothing decisive: nothing, part of a status line, interim answers (consumed).
    Nothing,
    /// A `2xx` answer: the server streams its answer while it reads the body.
    Streaming,
    /// The server refused the body (any other final answer, or something that is not HTTP), closed
    /// the connection, or failed.
    Stop,
}

/// While sending the request body waits and `watch` holds: ready when the body must stop (see
/// [`Early::Stop`]). A streamed answer ends the watch (`watch` turns false) and leaves its bytes in
/// `buf` for [`UpstreamConn::read_head`]; nothing more is read from the server while the body goes
/// on, so a long streamed answer is never buffered here.
///
/// The reactor's cached readiness answers first, so a server that sends nothing costs no syscall.
fn poll_early(
    stream: &TcpStream,
    buf: &mut BytesMut,
    watch: &mut bool,
    cx: &mut Context<'_>,
) -> Poll<()> {
    while *watch {
        if ready!(stream.poll_read_ready(cx)).is_err() {
            return Poll::Ready(());
        }
        room(buf, READ_CHUNK);
        match stream.try_read_buf(buf) {
            Ok(0) => return Poll::Ready(()),
            Ok(_) => match early_answer(buf) {
                Early::Nothing => {}
                Early::Streaming => *watch = false,
                Early::Stop => return Poll::Ready(()),
            },
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return Poll::Ready(()),
        }
    }
    Poll::Pending
}

/// Reads the start of what the server sent while the request body was being sent; complete interim
/// answers are removed from the front of `buf`.
fn early_answer(buf: &mut BytesMut) -> Early {
    /// A status line starts so (`?`: any byte).
    const STATUS_LINE: &[u8] = b"HTTP/1.? ";
    loop {
        let n = buf.len().min(STATUS_LINE.len());
        if !buf[..n]
            .iter()
            .zip(STATUS_LINE)
            .all(|(&b, &p)| p == b'?' || b == p)
        {
            return Early::Stop;
        }
        match buf.get(STATUS_LINE.len()) {
            None => return Early::Nothing,
            Some(b'2') => return Early::Streaming,
            Some(b'1') => {}
            Some(_) => return Early::Stop,
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(buf) {
            Ok(httparse::Status::Complete(_)) if resp.code == Some(101) => return Early::Stop,
            Ok(httparse::Status::Complete(len)) => buf.advance(len),
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return Early::Nothing,
            Ok(httparse::Status::Partial) | Err(_) => return Early::Stop,
        }
    }
}

fn encode_head(out: &mut Vec<u8>, parts: &http::request::Parts, framing: RequestBody) {
    out.clear();
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(
        parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
            .as_bytes(),
    );
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &parts.headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        RequestBody::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        RequestBody::Empty
            if !parts.headers.contains_key(header::CONTENT_LENGTH)
                && matches!(parts.method, Method::POST | Method::PUT | Method::PATCH) =>
        {
            out.extend_from_slice(b"content-length: 0\r\n")
        }
        _ => {}
    }
    out.extend_from_slice(b"\r\n");
}

/// True when the `Transfer-Encoding` fields list exactly one coding, `chunked` (RFC 9112 §6.1; empty
/// list elements are ignored, RFC 9110 §5.6.1).
fn is_only_chunked(headers: &HeaderMap) -> bool {
    let mut codings = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(trim_ows)
        .filter(|c| !c.is_empty());
    codings
        .next()
        .is_some_and(|c| c.eq_ignore_ascii_case(b"chunked"))
        && codings.next().is_none()
}

/// Removes optional whitespace (SP, HTAB) around `v`.
fn trim_ows(v: &[u8]) -> &[u8] {
    let start = v.iter().position(|&b| b != b' ' && b != b'\t');
    let end = v.iter().rposition(|&b| b != b' ' && b != b'\t');
    match (start, end) {
        (Some(s), Some(e)) => &v[s..=e],
        _ => &[],
    }
}

/// The body length the `Content-Length` fields give, `None` without any (RFC 9110 §8.6, RFC 9112
/// §6.3): each value is decimal digits only (no sign, no spaces inside, no overflow); a list, or
/// repeated fields, must all say the same, and are then passed on as one field.
fn content_length(headers: &mut HeaderMap) -> Result<Option<u64>, ReadError> {
    let mut length = None;
    let mut fields = 0;
    let mut canonical = true;
    for v in headers.get_all(header::CONTENT_LENGTH) {
        fields += 1;
        for element in v.as_bytes().split(|&b| b == b',') {
            let digits = trim_ows(element);
            let n = parse_decimal(digits).ok_or(ReadError::Malformed("invalid content-length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(ReadError::Malformed("conflicting content-length"));
            }
            canonical &= digits.len() == v.len() && (digits[0] != b'0' || digits.len() == 1);
            length = Some(n);
        }
    }
    if let Some(n) = length {
        if fields > 1 || !canonical {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
    }
    Ok(length)
}

/// `digits` as a decimal number: ASCII digits only, at least one, no overflow.
fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &b| {
        if b.is_ascii_digit() {
            n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        } else {
            None
        }
    })
}

/// Parses a complete response head off the front of `buf`; `None` when more bytes are needed.
///
/// Public for the parser tests (`tests/fuzz_parsers.rs`); the proxy reads heads with
/// [`UpstreamConn::read_head`].
pub fn parse_head(buf: &mut BytesMut, method: &Method) -> Result<Option<ResponseHead>, ReadError> {
    // Offsets of (name, value) in `buf`, so the head can be split off before building the map.
    let mut spans = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
    let (len, code, minor, count) = {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut headers);
        let len = match resp.parse(buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(ReadError::Malformed("too many headers"))
            }
            Err(_) => return Err(ReadError::Malformed("not an HTTP/1.x response")),
        };
        let base = buf.as_ptr() as usize;
        for (span, h) in spans.iter_mut().zip(resp.headers.iter()) {
            *span = (
                (h.name.as_ptr() as usize - base) as u32,
                h.name.len() as u32,
                (h.value.as_ptr() as usize - base) as u32,
                h.value.len() as u32,
            );
        }
        (
            len,
            resp.code.unwrap_or(0),
            resp.version.unwrap_or(1),
            resp.headers.len(),
        )
    };
    let head = buf.split_to(len).freeze();
    // RFC 9110 §15: codes outside 100..=599 are invalid.
    let status = StatusCode::from_u16(code)
        .ok()
        .filter(|s| s.as_u16() <= 599)
        .ok_or(ReadError::Malformed("invalid status code"))?;
    let mut headers = HeaderMap::with_capacity(count);
    for &(no, nl, vo, vl) in &spans[..count] {
        let name = HeaderName::from_bytes(&head[no as usize..(no + nl) as usize])
            .map_err(|_| ReadError::Malformed("invalid header name"))?;
        let value = HeaderValue::from_maybe_shared(head.slice(vo as usize..(vo + vl) as usize))
            .map_err(|_| ReadError::Malformed("invalid header value"))?;
        headers.append(name, value);
    }

    // A malformed length is refused on every response, even one without a body, so that it is
    // never passed on.
    let length = content_length(&mut headers)?;
    let mut reusable = true;
    let framing = if method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Framing::Empty
    } else if headers.contains_key(header::TRANSFER_ENCODING) {
        // RFC 9112 §6.1: Transfer-Encoding in HTTP/1.0 means the framing is faulty. fulcrum decodes
        // `chunked` and no other coding: anything else would reach the client still encoded, with
        // the header that says so removed.
        if minor == 0 {
            return Err(ReadError::Malformed(
                "transfer-encoding in an HTTP/1.0 response",
            ));
        }
        if !is_only_chunked(&headers) {
            return Err(ReadError::Malformed("unsupported transfer-encoding"));
        }
        // §6.3: Transfer-Encoding overrides Content-Length, which an intermediary removes; such a
        // message may be an attempt at response splitting, so the connection is not reused.
        if length.is_some() {
            headers.remove(header::CONTENT_LENGTH);
            reusable = false;
        }
        Framing::Chunked(ChunkedDecoder::default())
    } else {
        match length {
            Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
            None => Framing::Close,
        }
    };
    let keep_alive = reusable
        && !matches!(framing, Framing::Close)
        && if minor >= 1 {
            !has_token(&headers, header::CONNECTION, "close")
        } else {
            has_token(&headers, header::CONNECTION, "keep-alive")
        };
    Ok(Some(ResponseHead {
        status,
        headers,
        framing,
        keep_alive,
    }))
}

/// The HTTP connector's idle keep-alive connections to servers, keyed by server identity
/// ([`Server::id`]), one map per worker thread so that a request never takes a lock another thread
/// holds. It belongs to the HTTP layer: a server knows nothing of HTTP connections.
///
/// A server that leaves its pool is [`forget`]-ten (its idle connections close), and a connection
/// returned for a retired server is closed instead of kept.
#[derive(Debug)]
struct Connector {
    per_worker: Box<[Mutex<IdleMap>]>,
}

/// Idle connections by server id.
type IdleMap = HashMap<u64, Vec<UpstreamConn>, BuildHasherDefault<IdHasher>>;

/// Server ids are sequential integers: they hash to themselves.
#[derive(Debug, Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Slots of the process-wide connector: enough for one per worker thread on any machine this runs on
/// (a worker past the last slot shares one, which stays correct).
const CONNECTOR_SLOTS: usize = 256;

fn connector() -> &'static Connector {
    static CONNECTOR: OnceLock<Connector> = OnceLock::new();
    CONNECTOR.get_or_init(|| Connector {
        per_worker: (0..CONNECTOR_SLOTS)
            .map(|_| Mutex::new(HashMap::default()))
            .collect(),
    })
}

impl Connector {
    fn slot(&self) -> &Mutex<IdleMap> {
        let id = WORKER.with(Cell::get);
        &self.per_worker[id % self.per_worker.len()]
    }
}

/// The most recently used idle connection to `server` that is still open.
#[inline]
pub fn take_idle(server: &Server) -> Option<UpstreamConn> {
    let mut slot = connector().slot().lock().unwrap_or_else(|e| e.into_inner());
    let stack = slot.get_mut(&server.id)?;
    while let Some(conn) = stack.pop() {
        if conn.is_usable() {
            return Some(conn);
        }
    }
    None
}

/// Returns a connection to `server` whose last exchange is complete.
#[inline]
pub fn put_idle(server: &Server, mut conn: UpstreamConn) {
    spare(&mut conn.buf);
    let mut slot = connector().slot().lock().unwrap_or_else(|e| e.into_inner());
    // Checked under the lock: `forget` runs after the server is marked retired, so a connection is
    // either refused here or removed there.
    if server.is_retired() {
        return;
    }
    let stack = slot.entry(server.id).or_default();
    if stack.len() < MAX_IDLE_PER_WORKER {
        stack.push(conn);
    }
}

/// Closes every idle connection to the server `id` (it left its pool).
pub fn forget(id: u64) {
    for slot in connector().per_worker.iter() {
        slot.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
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
}

impl ConnectError {
    /// The connection was reset as it opened: the server's side accepted it and closed it at once (a
    /// refused connection is not reset). The server was reached, and failed.
    pub fn was_reset(&self) -> bool {
        matches!(self, ConnectError::Io(_, e) if e.kind() == io::ErrorKind::ConnectionReset)
    }
}

/// Opens a new connection to `addr`.
pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<UpstreamConn, ConnectError> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(ConnectError::Io(addr, e)),
        Err(_) => return Err(ConnectError::Timeout(addr, timeout)),
    };
    let _ = stream.set_nodelay(true);
    Ok(UpstreamConn::new(stream))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, method: Method) -> Result<Option<ResponseHead>, ReadError> {
        let mut buf = BytesMut::from(text.as_bytes());
        parse_head(&mut buf, &method)
    }

    #[test]
    fn parses_a_head_and_leaves_the_body() {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-A: 1\r\nX-A: 2\r\n\r\nabc"[..],
        );
        let head = parse_head(&mut buf, &Method::GET).unwrap().unwrap();
        assert_eq!(head.status, StatusCode::OK);
        assert!(matches!(head.framing, Framing::Length(3)));
        assert!(head.keep_alive);
        assert_eq!(head.headers.get_all("x-a").iter().count(), 2);
        assert_eq!(&buf[..], b"abc");
    }

    #[test]
    fn partial_heads_wait_for_more() {
        assert!(parse("HTTP/1.1 200 OK\r\nContent-Le", Method::GET)
            .unwrap()
            .is_none());
    }

    #[test]
    fn framing_rules() {
        let f = |t: &str, m: Method| parse(t, m).unwrap().unwrap();
        assert!(matches!(
            f(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                Method::GET
            )
            .framing,
            Framing::Chunked(_)
        ));
        assert!(matches!(
            f("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", Method::HEAD).framing,
            Framing::Empty
        ));
        assert!(matches!(
            f("HTTP/1.1 204 No Content\r\n\r\n", Method::GET).framing,
            Framing::Empty
        ));
        let close = f("HTTP/1.1 200 OK\r\n\r\n", Method::GET);
        assert!(matches!(close.framing, Framing::Close) && !close.keep_alive);
        assert!(
            !f(
                "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n",
                Method::GET
            )
            .keep_alive
        );
        assert!(!f("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", Method::GET).keep_alive);
        assert!(
            f(
                "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\n",
                Method::GET
            )
            .keep_alive
        );
    }

    #[test]
    fn malformed_heads_are_errors() {
        assert!(parse(
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            Method::GET
        )
        .is_err());
        assert!(parse("HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", Method::GET).is_err());
        assert!(parse("SSH-2.0-OpenSSH\r\n\r\n", Method::GET).is_err());
    }

    #[test]
    fn content_length_is_digits_only_and_passed_on_as_one_value() {
        for bad in [
            "+2",
            "-1",
            "1,2",
            "0x2",
            "",
            "2 2",
            "18446744073709551616",
            "2,,2",
        ] {
            let text = format!("HTTP/1.1 200 OK\r\nContent-Length: {bad}\r\n\r\n");
            assert!(parse(&text, Method::GET).is_err(), "{bad:?}");
        }
        for (good, n) in [("2", 2), ("002", 2), (" 2\t", 2), ("2, 2", 2), ("0", 0)] {
            let text = format!("HTTP/1.1 200 OK\r\nContent-Length: {good}\r\n\r\n");
            let head = parse(&text, Method::GET).unwrap().unwrap();
            assert_eq!(
                head.headers["content-length"],
                n.to_string().as_str(),
                "{good:?}"
            );
        }
        // Malformed even where there is no body.
        assert!(parse("HTTP/1.1 204 No\r\nContent-Length: +0\r\n\r\n", Method::GET).is_err());
    }

    #[test]
    fn transfer_encoding_rules() {
        let head = parse(
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            Method::GET,
        )
        .unwrap()
        .unwrap();
        assert!(matches!(head.framing, Framing::Chunked(_)));
        assert!(!head.headers.contains_key("content-length"));
        assert!(
            !head.keep_alive,
            "a message with both is not followed on its connection"
        );
        for bad in ["gzip", "gzip, chunked", "chunked, chunked", "identity", ""] {
            let text = format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: {bad}\r\n\r\n");
            assert!(parse(&text, Method::GET).is_err(), "{bad:?}");
        }
        assert!(parse(
            "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            Method::GET
        )
        .is_err());
        assert!(parse("HTTP/1.1 600 X\r\n\r\n", Method::GET).is_err());
    }

    #[test]
    fn early_answers_while_the_body_is_sent() {
        let early = |text: &[u8]| {
            let mut buf = BytesMut::from(text);
            let e = early_answer(&mut buf);
            (e, buf)
        };
        assert_eq!(early(b"").0, Early::Nothing);
        assert_eq!(early(b"HTTP/1.1").0, Early::Nothing);
        assert_eq!(early(b"HTTP/1.1 2").0, Early::Streaming);
        assert_eq!(early(b"HTTP/1.1 413 Too Large\r\n").0, Early::Stop);
        assert_eq!(early(b"HTTP/1.0 302").0, Early::Stop);
        assert_eq!(early(b"SSH-2.0").0, Early::Stop);
        assert_eq!(early(b"HTTP/1.1 100 Cont").0, Early::Nothing);
        assert_eq!(early(b"HTTP/1.1 101 Switching\r\n\r\n").0, Early::Stop);
        let (e, rest) = early(b"HTTP/1.1 100 Continue\r\n\r\n");
        assert_eq!((e, rest.is_empty()), (Early::Nothing, true));
        let (e, rest) = early(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n");
        assert_eq!(
            (e, &rest[..]),
            (Early::Streaming, &b"HTTP/1.1 200 OK\r\n"[..])
        );
    }

    #[test]
    fn request_head_encoding() {
        let (parts, _) = http::Request::post("/a?b=c")
            .header("host", "h")
            .body(())
            .unwrap()
            .into_parts();
        let mut out = Vec::new();
        encode_head(&mut out, &parts, RequestBody::Empty);
        assert_eq!(
            out,
            b"POST /a?b=c HTTP/1.1\r\nhost: h\r\ncontent-length: 0\r\n\r\n"
        );
        encode_head(&mut out, &parts, RequestBody::Chunked);
        assert_eq!(
            out,
            b"POST /a?b=c HTTP/1.1\r\nhost: h\r\ntransfer-encoding: chunked\r\n\r\n"
        );
    }
}

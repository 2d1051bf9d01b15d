//! The relay of a TCP session: bytes both ways between the client's socket and the server's, until
//! both directions have ended, one fails, or nothing has moved for the idle timeout.
//!
//! One hand-written future drives both directions. It holds, while the session is idle, two small
//! state machines and one timer — no buffer, no pipe, no task or waiter node per direction: it waits
//! through the sockets' own reader and writer slots (`poll_read_ready` / `poll_write_ready`).
//!
//! How a direction moves bytes:
//! - **Small transfers are copied.** When bytes arrive, a 16 KiB buffer is borrowed from the thread's
//!   spares, filled by one `recv(2)` and written on by `send(2)`, then given back. A `recv` that
//!   returns less than the buffer emptied the socket's receive queue, so the direction waits for the
//!   next readiness edge at once instead of asking again for an `EAGAIN` (one system call fewer per
//!   burst). That is safe with edge-triggered readiness: bytes that arrive after the `recv` raise a new
//!   edge, and a close (FIN, RST) stays a ready state until it is read.
//! - **Bulk transfers are spliced.** A `recv` that fills the whole buffer marks the direction as bulk
//!   (with `splice = true`, the default); from then on it moves bytes with `splice(2)`, socket to pipe
//!   to socket, never copying them into user space, through a pipe borrowed per burst. A short splice
//!   proves nothing (a pipe stops at 16 segments), so spliced reads go on until `EAGAIN`.
//!
//! A source that closes (FIN) is passed on as a half-close (`shutdown(SHUT_WR)` of the other socket)
//! while the other direction keeps flowing; the last direction to end skips it, as the `close(2)` that
//! follows sends the FIN anyway. When the reactor has already seen the source's FIN as its last bytes
//! are read (a server that answers and closes), those bytes are sent with `MSG_MORE` and the
//! `shutdown(2)` follows at once: bytes and FIN reach the client in one segment, with no separate ACK
//! of the bytes and no `recv` that returns 0.

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;

use super::tcp::{is_proxy_header, TcpStats};
use crate::pipe::{try_io_short, Pipe, MORE, SPLICE_CHUNK};
use crate::pool::{ServerStats, FROM_SERVER, TO_SERVER};

/// The buffer a copying direction borrows while bytes flow.
const RELAY_BUFFER: usize = 16 * 1024;
/// Buffers kept per worker thread for reuse.
const POOLED_BUFFERS: usize = 64;

/// How a relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ended {
    /// Both sides closed (or one failed).
    Closed,
    /// No byte either way for the idle timeout.
    Idle,
    /// An untrusted client started with a PROXY header.
    ProxyHeader,
}

/// The counters a session's bytes go to: its listener's and its server's.
#[derive(Clone, Copy)]
pub(super) struct Counters<'a> {
    pub(super) tcp: &'a TcpStats,
    pub(super) server: &'a ServerStats,
    /// The session's own counts, when its access log line needs them.
    pub(super) session: Option<&'a [AtomicU64; 2]>,
}

impl Counters<'_> {
    /// Counts `n` bytes moved to the server (`direction` [`TO_SERVER`]) or from it.
    #[inline]
    fn add(&self, direction: usize, n: usize) {
        let listener = if direction == TO_SERVER {
            &self.tcp.bytes_in
        } else {
            &self.tcp.bytes_out
        };
        listener.fetch_add(n as u64, Ordering::Relaxed);
        self.server.record_l4(direction, n, false);
        if let Some(session) = self.session {
            session[direction].fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

/// Relays bytes between `client` and `server` until both directions have ended, one fails, or
/// nothing has moved for `idle`. `check_first`: the client's first bytes must not be a PROXY header.
/// `splice`: bulk transfers move with `splice(2)` (else every byte is copied through a buffer).
pub(super) async fn relay(
    client: &TcpStream,
    server: &TcpStream,
    idle: Duration,
    counters: Counters<'_>,
    check_first: bool,
    splice: bool,
) -> Ended {
    let mut up = Direction::new(TO_SERVER, splice, check_first);
    let mut down = Direction::new(FROM_SERVER, splice, false);
    let mut last = crate::clock::now();
    let timer = tokio::time::sleep(idle);
    tokio::pin!(timer);
    let mut deferred = false;
    loop {
        let step = poll_fn(|cx| {
            let mut moved = false;
            if let Poll::Ready(Err(e)) = up.poll(cx, (client, server), &counters, &mut moved) {
                return Poll::Ready(Some(ended_by(&e)));
            }
            if let Poll::Ready(Err(e)) = down.poll(cx, (server, client), &counters, &mut moved) {
                return Poll::Ready(Some(ended_by(&e)));
            }
            if up.has_ended() && down.has_ended() {
                // Both sockets close next: `close(2)` sends the FINs, no `shutdown(2)` is needed.
                return Poll::Ready(Some(Ended::Closed));
            }
            if moved {
                last = crate::clock::now();
            }
            if up.is_closing() || down.is_closing() {
                // A source closed while the other way still runs. The close is passed on after one
                // more turn of the worker's event loop: a client that closes as soon as it has its
                // answer (HTTP with `Connection: close`) is then usually seen closing first, and
                // the session ends without a half-close — and without this end keeping TIME_WAIT.
                if !deferred {
                    deferred = true;
                    return Poll::Ready(None);
                }
                deferred = false;
                up.pass_close(server);
                down.pass_close(client);
            }
            // The timer is not moved on each transfer: when it fires, it is set again from the last one.
            while timer.as_mut().poll(cx).is_ready() {
                let quiet = crate::clock::now().saturating_duration_since(last);
                if quiet >= idle {
                    return Poll::Ready(Some(Ended::Idle));
                }
                timer.as_mut().reset(last + idle);
            }
            Poll::Pending
        })
        .await;
        match step {
            Some(ended) => return ended,
            None => tokio::task::yield_now().await,
        }
    }
}

/// How a failed direction ends the session.
fn ended_by(e: &io::Error) -> Ended {
    if e.kind() == io::ErrorKind::PermissionDenied {
        return Ended::ProxyHeader;
    }
    tracing::debug!(error = %e, "TCP session ended with an error");
    Ended::Closed
}

/// One direction of a session: from one socket to the other.
struct Direction {
    stage: Stage,
    /// [`TO_SERVER`] or [`FROM_SERVER`], for the counters.
    way: usize,
    /// A read may turn the direction to splicing.
    may_splice: bool,
    /// Bulk: bytes move with `splice(2)` from now on.
    spliced: bool,
    /// The first bytes must not be a PROXY header (an untrusted client's).
    check_first: bool,
}

enum Stage {
    /// Waiting for bytes, holding nothing.
    Read,
    /// Writing `buf[at..len]` on; `fin`: the source closed after these bytes, and the close goes
    /// with them.
    Write {
        buf: Buffer,
        at: usize,
        len: usize,
        fin: bool,
    },
    /// Moving the bytes `pipe` holds on.
    Drain(Pipe),
    /// The source has closed; the close is to be passed on.
    Closing,
    /// The source has closed and the close was passed on (or needs not be).
    Done,
}

impl Direction {
    fn new(way: usize, may_splice: bool, check_first: bool) -> Self {
        Direction {
            stage: Stage::Read,
            way,
            may_splice,
            spliced: false,
            check_first,
        }
    }

    /// The source has closed (its close passed on or not).
    fn has_ended(&self) -> bool {
        matches!(self.stage, Stage::Closing | Stage::Done)
    }

    /// The source has closed and its close is still to be passed on.
    fn is_closing(&self) -> bool {
        matches!(self.stage, Stage::Closing)
    }

    /// Passes a source's close on as a half-close of `to` (`shutdown(SHUT_WR)`), while the other
    /// direction keeps flowing.
    fn pass_close(&mut self, to: &TcpStream) {
        if self.is_closing() {
            let _ = socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write);
            self.stage = Stage::Done;
        }
    }

    /// Moves what can move now. Ready(Ok) once the direction has ended, Ready(Err) when it failed,
    /// Pending while it waits on a socket.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        (from, to): (&TcpStream, &TcpStream),
        counters: &Counters<'_>,
        moved: &mut bool,
    ) -> Poll<io::Result<()>> {
        use rustix::net::{recv, send, RecvFlags, SendFlags};
        loop {
            match &mut self.stage {
                Stage::Done | Stage::Closing => return Poll::Ready(Ok(())),
                Stage::Read if self.spliced => {
                    ready!(from.poll_read_ready(cx))?;
                    let mut pipe = Pipe::take()?;
                    match pipe.fill(from, SPLICE_CHUNK) {
                        Ok(0) => {
                            drop(pipe);
                            self.stage = Stage::Closing;
                            return Poll::Ready(Ok(()));
                        }
                        Ok(n) => {
                            counters.add(self.way, n);
                            *moved = true;
                            self.stage = Stage::Drain(pipe);
                        }
                        // Nothing more for now: the (empty) pipe goes back, the direction waits.
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Poll::Ready(Err(e)),
                    }
                }
                Stage::Read => {
                    ready!(from.poll_read_ready(cx))?;
                    let mut buf = Buffer::take();
                    let asked = buf.len();
                    let n = match try_io_short(from, Interest::READABLE, asked, || {
                        Ok(recv(from, &mut buf[..], RecvFlags::empty())?.0)
                    }) {
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                        Err(e) => return Poll::Ready(Err(e)),
                    };
                    if n == 0 {
                        drop(buf);
                        self.stage = Stage::Closing;
                        return Poll::Ready(Ok(()));
                    }
                    if self.check_first {
                        self.check_first = false;
                        if is_proxy_header(&buf[..n]) {
                            return Poll::Ready(Err(io::Error::new(
                                io::ErrorKind::PermissionDenied,
                                "PROXY header from an untrusted source",
                            )));
                        }
                    }
                    // A full buffer: more is waiting, a bulk transfer — splice from now on.
                    self.spliced = self.may_splice && n == buf.len();
                    counters.add(self.way, n);
                    *moved = true;
                    // A short read that the source's FIN follows (the reactor saw it): these are the
                    // last bytes, and they leave with the close in one segment.
                    let fin = n < asked && read_closed(from);
                    self.stage = Stage::Write {
                        buf,
                        at: 0,
                        len: n,
                        fin,
                    };
                }
                Stage::Write { buf, at, len, fin } => {
                    ready!(to.poll_write_ready(cx))?;
                    let rest = &buf[*at..*len];
                    let flags = if *fin {
                        SendFlags::NOSIGNAL | MORE
                    } else {
                        SendFlags::NOSIGNAL
                    };
                    match try_io_short(to, Interest::WRITABLE, rest.len(), || {
                        Ok(send(to, rest, flags)?)
                    }) {
                        Ok(n) => *at += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Poll::Ready(Err(e)),
                    }
                    if at == len {
                        if *fin {
                            // The held bytes go with the FIN; the source's end is passed on.
                            socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write)?;
                            self.stage = Stage::Done;
                            return Poll::Ready(Ok(()));
                        }
                        // The buffer goes back; the direction waits for more.
                        self.stage = Stage::Read;
                    }
                }
                Stage::Drain(pipe) => {
                    ready!(to.poll_write_ready(cx))?;
                    match pipe.drain(to) {
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Poll::Ready(Err(e)),
                    }
                    if pipe.held() == 0 {
                        self.stage = Stage::Read;
                    }
                }
            }
        }
    }
}

/// True when the reactor has seen `stream`'s source close (a FIN, or a reset) — known without a
/// system call: the readiness tokio keeps holds it until the socket is dropped.
fn read_closed(stream: &TcpStream) -> bool {
    let ready = std::pin::pin!(stream.ready(Interest::READABLE));
    let mut cx = Context::from_waker(std::task::Waker::noop());
    matches!(ready.poll(&mut cx), Poll::Ready(Ok(r)) if r.is_read_closed())
}

thread_local! {
    static BUFFERS: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

/// A relay buffer, taken from this thread's spares (or allocated) and given back on drop.
struct Buffer(Option<Box<[u8]>>);

impl Buffer {
    fn take() -> Self {
        let spare = BUFFERS.with(|b| b.borrow_mut().pop());
        Buffer(Some(
            spare.unwrap_or_else(|| vec![0u8; RELAY_BUFFER].into_boxed_slice()),
        ))
    }
}

impl std::ops::Deref for Buffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.0.as_deref().unwrap_or(&[])
    }
}

impl std::ops::DerefMut for Buffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.0.as_deref_mut().unwrap_or(&mut [])
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        if let Some(b) = self.0.take() {
            // Given back to the thread it is dropped on (tasks may move between workers).
            let _ = BUFFERS.try_with(|spares| {
                let mut spares = spares.borrow_mut();
                if spares.len() < POOLED_BUFFERS {
                    spares.push(b);
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A connected pair of loopback sockets: (the end the relay holds, the test's end).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let outside = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (inside, _) = listener.accept().await.unwrap();
        (inside, outside)
    }

    /// Runs a relay between two pairs; returns the test's ends (client side, server side) and the
    /// relay's task, which reports how it ended and the counted bytes (to server, from server).
    async fn start(
        splice: bool,
        idle: Duration,
    ) -> (
        TcpStream,
        TcpStream,
        tokio::task::JoinHandle<(Ended, [u64; 2])>,
    ) {
        let (client_in, client_out) = pair().await;
        let (server_in, server_out) = pair().await;
        let task = tokio::spawn(async move {
            let tcp = TcpStats::default();
            let server = ServerStats::default();
            let counters = Counters {
                tcp: &tcp,
                server: &server,
                session: None,
            };
            let ended = relay(&client_in, &server_in, idle, counters, false, splice).await;
            let moved = [
                tcp.bytes_in.load(Ordering::Relaxed),
                tcp.bytes_out.load(Ordering::Relaxed),
            ];
            (ended, moved)
        });
        (client_out, server_out, task)
    }

    const LONG: Duration = Duration::from_secs(60);
    const BOUND: Duration = Duration::from_secs(30);

    /// Bytes and a FIN that are already queued together when the relay first reads: the short read
    /// that empties the queue must not lose the close (the next readiness edge never comes).
    #[tokio::test]
    async fn bytes_and_a_close_queued_together_both_pass() {
        for splice in [true, false] {
            let (mut client, mut server, task) = start(splice, LONG).await;
            client.write_all(b"request").await.unwrap();
            client.shutdown().await.unwrap();
            let mut got = Vec::new();
            tokio::time::timeout(BOUND, server.read_to_end(&mut got))
                .await
                .expect("the client's close reached the server")
                .unwrap();
            assert_eq!(got, b"request");
            server.write_all(b"answer").await.unwrap();
            drop(server);
            let mut answer = Vec::new();
            tokio::time::timeout(BOUND, client.read_to_end(&mut answer))
                .await
                .expect("the server's close reached the client")
                .unwrap();
            assert_eq!(answer, b"answer");
            let (ended, moved) = tokio::time::timeout(BOUND, task).await.unwrap().unwrap();
            assert_eq!(ended, Ended::Closed);
            assert_eq!(moved, [7, 6]);
        }
    }

    /// Small messages (copied), then a bulk transfer (which turns the direction to splicing), then
    /// small messages again: every byte arrives, in order, and is counted.
    #[tokio::test]
    async fn a_direction_turning_to_splice_keeps_every_byte_in_order() {
        for splice in [true, false] {
            let (mut client, mut server, task) = start(splice, LONG).await;
            let bulk: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
            let mut sent = b"hello".to_vec();
            sent.extend_from_slice(&bulk);
            sent.extend_from_slice(b"bye");
            let writer = {
                let sent = sent.clone();
                tokio::spawn(async move {
                    client.write_all(&sent[..5]).await.unwrap();
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    client.write_all(&sent[5..sent.len() - 3]).await.unwrap();
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    client.write_all(&sent[sent.len() - 3..]).await.unwrap();
                    client.shutdown().await.unwrap();
                    client
                })
            };
            let mut got = Vec::new();
            tokio::time::timeout(BOUND, server.read_to_end(&mut got))
                .await
                .expect("the whole stream arrived")
                .unwrap();
            assert!(
                got == sent,
                "{} bytes of {} arrived, or out of order",
                got.len(),
                sent.len()
            );
            let mut client = writer.await.unwrap();
            drop(server);
            let mut rest = Vec::new();
            tokio::time::timeout(BOUND, client.read_to_end(&mut rest))
                .await
                .unwrap()
                .unwrap();
            let (ended, moved) = tokio::time::timeout(BOUND, task).await.unwrap().unwrap();
            assert_eq!(ended, Ended::Closed);
            assert_eq!(moved, [sent.len() as u64, 0]);
        }
    }

    /// With nothing moving, the relay ends after the idle time; bytes moving keep it alive.
    #[tokio::test(start_paused = true)]
    async fn the_idle_timer_counts_from_the_last_transfer() {
        let (mut client, mut server, task) = start(true, Duration::from_secs(10)).await;
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(6)).await;
            client.write_all(b"ping").await.unwrap();
            let mut b = [0u8; 4];
            server.read_exact(&mut b).await.unwrap();
        }
        assert!(
            !task.is_finished(),
            "18 s with a transfer every 6 s is not idle"
        );
        let (ended, _) = task.await.unwrap();
        assert_eq!(ended, Ended::Idle);
    }
}

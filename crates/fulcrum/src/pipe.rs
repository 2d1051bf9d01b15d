//! Moving bytes from one socket to another: with `splice(2)`, kernel to kernel through a pipe, never
//! copying them into user space (the L4 relay's bulk transfers, [`crate::l4`], and the large
//! `Content-Length` response bodies of fulcrum's own HTTP/1 connection, [`crate::http::h1`]); and the
//! rule both use for their copied transfers, that a short `recv` or `send` empties or fills its socket
//! ([`try_io_short`]).
//!
//! Pipes are borrowed per burst from a per-thread pool, so a connection that waits holds none.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::os::fd::OwnedFd;
use std::time::Duration;

use rustix::pipe::{splice, SpliceFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Bytes moved per `splice` call (the default pipe holds 64 KiB).
pub const SPLICE_CHUNK: usize = 64 * 1024;

/// `MSG_MORE` where there is one (else no flag): bytes that the FIN follows at once are held for the
/// `shutdown(2)` right after them to send with it, in one segment (the h1 server's closing answer,
/// the L4 relay's last bytes).
#[cfg(target_os = "linux")]
pub const MORE: rustix::net::SendFlags = rustix::net::SendFlags::MORE;
#[cfg(not(target_os = "linux"))]
pub const MORE: rustix::net::SendFlags = rustix::net::SendFlags::empty();
/// Empty pipes kept per worker thread for reuse.
const POOLED_PIPES: usize = 64;

thread_local! {
    static PIPES: RefCell<Vec<(OwnedFd, OwnedFd)>> = const { RefCell::new(Vec::new()) };
}

/// A pipe borrowed while bytes flow: taken from this thread's spares (or opened) when bytes arrive,
/// given back empty when they stop, so an idle connection holds none.
pub struct Pipe {
    /// (read end, write end); taken only on drop.
    fds: Option<(OwnedFd, OwnedFd)>,
    /// Bytes in it; a pipe that still holds some is closed, not reused.
    held: usize,
}

impl Pipe {
    /// A pipe from this thread's spares, or a new one.
    pub fn take() -> io::Result<Self> {
        use rustix::pipe::{pipe_with, PipeFlags};
        let fds = match PIPES.with(|p| p.borrow_mut().pop()) {
            Some(fds) => fds,
            None => pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?,
        };
        Ok(Pipe {
            fds: Some(fds),
            held: 0,
        })
    }

    /// Bytes the pipe holds.
    pub fn held(&self) -> usize {
        self.held
    }

    /// One `splice` of up to `max` bytes from `from` into the pipe: the bytes moved (`Ok(0)`: `from`
    /// has closed), or `WouldBlock` (its readiness cleared) when `from` has none now.
    pub fn fill(&mut self, from: &TcpStream, max: usize) -> io::Result<usize> {
        let (_, pipe_in) = self.fds.as_ref().ok_or(io::ErrorKind::BrokenPipe)?;
        let n = from.try_io(Interest::READABLE, || {
            Ok(splice(from, None, pipe_in, None, max, FLAGS)?)
        })?;
        self.held += n;
        Ok(n)
    }

    /// One `splice` of what the pipe holds on to `to`: the bytes moved, or `WouldBlock` (its readiness
    /// cleared) when `to` takes none now.
    pub fn drain(&mut self, to: &TcpStream) -> io::Result<usize> {
        let (pipe_out, _) = self.fds.as_ref().ok_or(io::ErrorKind::BrokenPipe)?;
        let n = to.try_io(Interest::WRITABLE, || {
            Ok(splice(pipe_out, None, to, None, self.held, FLAGS)?)
        })?;
        self.held -= n;
        Ok(n)
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        if let Some(fds) = self.fds.take() {
            if self.held == 0 {
                let _ = PIPES.try_with(|spares| {
                    let mut spares = spares.borrow_mut();
                    if spares.len() < POOLED_PIPES {
                        spares.push(fds);
                    }
                });
            }
        }
    }
}

/// `splice(2)` flags: move pages rather than copy them, never block.
const FLAGS: SpliceFlags = SpliceFlags::MOVE.union(SpliceFlags::NONBLOCK);

/// Runs `op`, one `recv` or `send` of at most `asked` bytes on `stream`, through tokio's readiness
/// for `interest`. A transfer that moved fewer bytes than asked emptied the socket's receive queue (or
/// filled its send buffer), so the readiness is cleared as an `EAGAIN` would clear it: the next wait
/// goes to the reactor at once instead of through one more call that moves nothing. That is safe with
/// edge-triggered readiness: bytes (or room) arriving after the call raise a new edge, and a close
/// stays a ready state until it is read. The bytes moved; `WouldBlock` when none could move.
pub fn try_io_short(
    stream: &TcpStream,
    interest: Interest,
    asked: usize,
    op: impl FnOnce() -> io::Result<usize>,
) -> io::Result<usize> {
    let mut moved = 0;
    match stream.try_io(interest, || {
        let n = op()?;
        if n > 0 && n < asked {
            moved = n;
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    }) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && moved > 0 => Ok(moved),
        r => r,
    }
}

/// Why [`splice_exact`] stopped short.
#[derive(Debug)]
pub enum SpliceError {
    /// The source failed, or closed before the last byte.
    Source(io::Error),
    /// The destination failed.
    Sink(io::Error),
    /// The destination took nothing for the write timeout.
    Timeout,
}

/// Moves exactly `len` bytes from `from` to `to` with `splice(2)`: never more (the source may hold
/// what follows), stopping when either side fails, the source closes early, or `to` takes nothing for
/// `write_timeout`. `moved` counts the bytes that reached `to`.
pub async fn splice_exact(
    from: &TcpStream,
    to: &TcpStream,
    len: u64,
    write_timeout: Duration,
    moved: &mut u64,
) -> Result<(), SpliceError> {
    let mut pipe = Pipe::take().map_err(SpliceError::Source)?;
    let mut left = len;
    // The source closed early; what the pipe holds still goes on first.
    let mut cut = false;
    while left > 0 || pipe.held > 0 {
        if cut && pipe.held == 0 {
            return Err(SpliceError::Source(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the server closed the connection inside the body",
            )));
        }
        if left > 0 && pipe.held < SPLICE_CHUNK && !cut {
            let want = (SPLICE_CHUNK - pipe.held).min(left.min(usize::MAX as u64) as usize);
            match pipe.fill(from, want) {
                Ok(0) => {
                    cut = true;
                    continue;
                }
                Ok(n) => left -= n as u64,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if pipe.held == 0 {
                        poll_fn(|cx| from.poll_read_ready(cx))
                            .await
                            .map_err(SpliceError::Source)?;
                        continue;
                    }
                }
                Err(e) => return Err(SpliceError::Source(e)),
            }
        }
        if pipe.held > 0 {
            match pipe.drain(to) {
                Ok(n) => *moved += n as u64,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    match tokio::time::timeout(write_timeout, poll_fn(|cx| to.poll_write_ready(cx)))
                        .await
                    {
                        Ok(r) => r.map_err(SpliceError::Sink)?,
                        Err(_) => return Err(SpliceError::Timeout),
                    }
                }
                Err(e) => return Err(SpliceError::Sink(e)),
            }
        }
    }
    Ok(())
}

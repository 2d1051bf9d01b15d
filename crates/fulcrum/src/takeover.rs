//! Binary takeover: handing the very listening sockets of a running fulcrum
//! to its successor over a Unix socket (as HAProxy's `-x` or Envoy's hot
//! restart do), so that an upgrade refuses not a single connection.
//!
//! # Why pass descriptors rather than overlap with `SO_REUSEPORT`
//!
//! With `SO_REUSEPORT` alone, the new process binds sockets of its own next
//! to the old ones and the old process then closes its sockets. But each
//! listening socket of a reuseport group has an accept queue of its own, and
//! the kernel spreads new connections across the group by hash: a connection
//! whose handshake completed into the old process's queue and that the old
//! process has not accepted yet is *reset* when that socket is closed (unless
//! `net.ipv4.tcp_migrate_req` is 1, which is not the default and not the case
//! on our hosts). Under load there is always something in those queues.
//!
//! Passing the descriptors themselves (`SCM_RIGHTS`) avoids the problem
//! entirely: the new process gets *the same kernel sockets*, with their accept
//! queues, their bound addresses and their options (`SO_REUSEPORT`, backlog,
//! ...). Once the new process serves, the old one stops accepting and closes
//! its descriptors, which only drops references: the sockets, and every
//! connection queued on them, live on in the new process.
//!
//! # Protocol
//!
//! The old process [`Handoff::serve`]s a Unix stream socket. For each
//! connection it sends (all integers big-endian):
//!
//! 1. a preamble: the magic `b"FLTO"`, a version byte ([`PROTOCOL_VERSION`])
//!    and the `u32` length of the manifest;
//! 2. the manifest: the `u32` number of entries, the `u32` total number of
//!    descriptors, then per entry a kind byte (0 = TCP listener, 1 = UDP
//!    socket), the `u32` number of descriptors and the `u16`-length-prefixed
//!    UTF-8 listener name;
//! 3. the descriptors, in manifest order, in chunks of at most
//!    [`MAX_FDS_PER_MESSAGE`]: each chunk is one `sendmsg` whose data is the
//!    `u32` number of descriptors it carries by `SCM_RIGHTS` (ancillary data
//!    needs at least one byte of data to ride on).
//!
//! The new process ([`receive`]) then answers one line, `ready\n`
//! ([`Ready::confirm`]) once it serves: the takeover is complete and the old
//! process's `on_ready` callback runs. If the new process closes the
//! connection without it (it failed to start, it crashed), the takeover failed
//! and the old process carries on as if nothing had happened.
//!
//! # Using it
//!
//! Old process (any running fulcrum):
//!
//! ```ignore
//! let handoff = Handoff::serve(&path, move || {
//!     // `try_clone` (dup) the listeners currently open.
//!     listeners.iter().filter_map(|(name, l)| {
//!         Some((name.clone(), Kind::Tcp, l.as_fd().try_clone_to_owned().ok()?))
//!     }).collect()
//! }, move || { let _ = stop_accepting_tx.send(()); })?;
//! ```
//!
//! New process: `let (mut inherited, ready) = receive(&path, timeout)?;`,
//! then for each configured listener `inherited.take_tcp(name, addr)` (falling
//! back to binding afresh), start serving, and [`Ready::confirm`]. Sockets left
//! in [`Inherited`] (listeners no longer configured) should be dropped. The new
//! process then serves the handoff socket itself for the next upgrade; binding
//! the same path replaces the old process's socket file, and the old process
//! does not remove a file that is no longer its own.
//!
//! # Pitfalls this module takes care of, and some it cannot
//!
//! * Descriptors are received with `MSG_CMSG_CLOEXEC`, so they do not leak
//!   into children the new process spawns.
//! * On a stream socket, `SCM_RIGHTS` descriptors ride on the first byte of
//!   the `sendmsg` that carried them, and a `read` that happens to consume
//!   that byte without an ancillary buffer *silently closes them*. Every read
//!   of the receiving side is therefore a `recvmsg` with room for the
//!   kernel's maximum number of descriptors per message (`SCM_MAX_FD`, 253),
//!   which also rules out `MSG_CTRUNC` (checked anyway).
//! * Anyone who can connect to the handoff socket gets the listening sockets:
//!   the socket file is made `0600` and peers whose `SO_PEERCRED` uid is
//!   neither the owner's nor root are turned away. Put it in a directory only
//!   fulcrum's user can write to.
//! * **Blocking mode is shared.** `O_NONBLOCK` belongs to the open file
//!   description, which the old and the new process share. Received
//!   descriptors are left as received (typically non-blocking already, since
//!   the old process runs them under tokio); the caller sets them
//!   non-blocking, as tokio requires, and must never set them *blocking*
//!   while the old process may still accept on them.
//! * Until the old process stops accepting, both processes accept from the
//!   same queues; that is harmless (each connection is accepted once).

use std::collections::HashMap;
use std::fmt;
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::io::Errno;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketType,
};

/// Version of the wire protocol; bumped on any incompatible change.
pub const PROTOCOL_VERSION: u8 = 1;
/// At most this many descriptors are sent per message (the kernel's limit,
/// `SCM_MAX_FD`, is 253).
pub const MAX_FDS_PER_MESSAGE: usize = 200;

const MAGIC: [u8; 4] = *b"FLTO";
/// `SCM_MAX_FD`: the most descriptors the kernel passes in one message; the
/// receive buffer is sized for it so that nothing is ever truncated.
const SCM_MAX_FD: usize = 253;
const PREAMBLE_LEN: usize = MAGIC.len() + 1 + 4;
const MAX_MANIFEST_LEN: usize = 1 << 20;
const MAX_TOTAL_FDS: usize = 1 << 16;
const READY_LINE: &[u8] = b"ready\n";
/// How long the old process waits on a peer that does not read what it sends.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`Ready::confirm`] may block.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);

/// What kind of socket a descriptor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A listening TCP socket.
    Tcp,
    /// A bound UDP socket.
    Udp,
}

impl Kind {
    fn to_wire(self) -> u8 {
        match self {
            Kind::Tcp => 0,
            Kind::Udp => 1,
        }
    }

    fn from_wire(byte: u8) -> io::Result<Kind> {
        match byte {
            0 => Ok(Kind::Tcp),
            1 => Ok(Kind::Udp),
            other => Err(invalid(format!("unknown socket kind {other}"))),
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Tcp => "tcp",
            Kind::Udp => "udp",
        })
    }
}

/// Listening sockets by listener name: TCP listeners (several per name: one
/// per worker, `SO_REUSEPORT`) and UDP sockets.
///
/// The sockets are in whatever blocking mode the old process left them in
/// (see the module docs): set them non-blocking before handing them to tokio.
#[derive(Debug, Default)]
pub struct Inherited {
    /// TCP listeners by listener name.
    pub tcp: HashMap<String, Vec<TcpListener>>,
    /// UDP sockets by listener name.
    pub udp: HashMap<String, Vec<UdpSocket>>,
}

impl Inherited {
    /// Takes the sockets of `name` whose local address equals `addr` (TCP),
    /// if any were inherited. Sockets of `name` bound elsewhere stay.
    pub fn take_tcp(&mut self, name: &str, addr: SocketAddr) -> Option<Vec<TcpListener>> {
        take_matching(&mut self.tcp, name, |l| l.local_addr().ok() == Some(addr))
    }

    /// Takes the sockets of `name` whose local address equals `addr` (UDP),
    /// if any were inherited.
    pub fn take_udp(&mut self, name: &str, addr: SocketAddr) -> Option<Vec<UdpSocket>> {
        take_matching(&mut self.udp, name, |s| s.local_addr().ok() == Some(addr))
    }

    /// Whether no socket is left.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many sockets are left, of both kinds.
    pub fn len(&self) -> usize {
        self.tcp.values().map(Vec::len).sum::<usize>()
            + self.udp.values().map(Vec::len).sum::<usize>()
    }
}

fn take_matching<T>(
    map: &mut HashMap<String, Vec<T>>,
    name: &str,
    matches: impl Fn(&T) -> bool,
) -> Option<Vec<T>> {
    let all = map.get_mut(name)?;
    let (taken, kept): (Vec<T>, Vec<T>) = std::mem::take(all).into_iter().partition(|s| matches(s));
    if kept.is_empty() {
        map.remove(name);
    } else {
        *all = kept;
    }
    (!taken.is_empty()).then_some(taken)
}

/// The sockets offered per request: listener name, kind and an owned (dup'd)
/// descriptor, e.g. `listener.as_fd().try_clone_to_owned()`.
pub type Offer = Vec<(String, Kind, OwnedFd)>;

type OnReady = Box<dyn FnOnce() + Send>;

struct Shared {
    stopping: AtomicBool,
    on_ready: Mutex<Option<OnReady>>,
    /// Connections being served: a clone of the stream (to shut it down on
    /// drop) and the thread serving it.
    conns: Mutex<Vec<(UnixStream, JoinHandle<()>)>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The old process's side of a takeover: serves a Unix stream socket on a
/// thread of its own until dropped.
///
/// Each connection gets every socket currently offered, then may answer
/// `ready\n` (the takeover is complete: `on_ready` is called, once) or close
/// (the takeover failed: the old process carries on). Requests keep being
/// served after `on_ready` until the `Handoff` is dropped.
///
/// Dropping it stops the thread, breaks off connections still waiting for
/// their answer (so `on_ready` never runs after the drop returned) and removes
/// the socket file if it is still the one it bound. `on_ready` runs on a
/// handoff thread: it must not drop the `Handoff` itself; send a message to
/// whoever owns it instead.
pub struct Handoff {
    path: PathBuf,
    /// (device, inode) of the socket file bound, to remove only our own.
    ident: (u64, u64),
    /// A clone of the listening socket, to wake the accept loop on drop.
    listener: UnixListener,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl fmt::Debug for Handoff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handoff")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Handoff {
    /// Binds `path` (an existing socket file there is replaced: it is stale,
    /// or the previous generation's, which is done offering) and serves
    /// handoff requests on a thread of its own until dropped.
    ///
    /// `offer` is called once per request, on the accepting thread, for the
    /// sockets to send; the descriptors it returns are closed once sent.
    /// `on_ready` is called once, on the first `ready\n` received.
    pub fn serve(
        path: &Path,
        offer: impl Fn() -> Offer + Send + 'static,
        on_ready: impl FnOnce() + Send + 'static,
    ) -> io::Result<Handoff> {
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path)?,
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!(
                        "takeover socket {}: exists and is not a socket",
                        path.display()
                    ),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = UnixListener::bind(path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("binding takeover socket {}: {e}", path.display()),
            )
        })?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        let meta = std::fs::metadata(path)?;
        let ident = (meta.dev(), meta.ino());
        let owner = meta.uid();

        let shared = Arc::new(Shared {
            stopping: AtomicBool::new(false),
            on_ready: Mutex::new(Some(Box::new(on_ready))),
            conns: Mutex::new(Vec::new()),
        });
        let waker = listener.try_clone()?;
        let thread = std::thread::Builder::new()
            .name("fulcrum-takeover".into())
            .spawn({
                let shared = Arc::clone(&shared);
                let path = path.to_owned();
                move || accept_loop(listener, &path, owner, &offer, &shared)
            })?;
        tracing::debug!(path = %path.display(), "takeover socket served");
        Ok(Handoff {
            path: path.to_owned(),
            ident,
            listener: waker,
            shared,
            thread: Some(thread),
        })
    }

    /// The path served.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Handoff {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // Shutting a listening socket down wakes a thread blocked in accept
        // (EINVAL on Linux). Should it not, connect once to wake it.
        if rustix::net::shutdown(&self.listener, rustix::net::Shutdown::Read).is_err() {
            let _ = UnixStream::connect(&self.path);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let conns = std::mem::take(&mut *lock(&self.shared.conns));
        for (stream, thread) in conns {
            let _ = stream.shutdown(std::net::Shutdown::Both);
            let _ = thread.join();
        }
        // Remove the socket file unless a successor has replaced it already.
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.ident {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

fn accept_loop(
    listener: UnixListener,
    path: &Path,
    owner: u32,
    offer: &dyn Fn() -> Offer,
    shared: &Arc<Shared>,
) {
    loop {
        let accepted = listener.accept();
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // EMFILE and the like: do not spin.
                tracing::warn!(path = %path.display(), error = %e, "takeover socket: accept failed");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if let Err(e) = check_peer(&stream, owner) {
            tracing::warn!(path = %path.display(), error = %e, "takeover request refused");
            continue;
        }
        let sockets = offer();
        let clone = match stream.try_clone() {
            Ok(clone) => clone,
            Err(e) => {
                tracing::warn!(error = %e, "takeover request dropped");
                continue;
            }
        };
        let spawned = std::thread::Builder::new()
            .name("fulcrum-takeover-conn".into())
            .spawn({
                let shared = Arc::clone(shared);
                move || serve_one(stream, sockets, &shared)
            });
        let mut conns = lock(&shared.conns);
        conns.retain(|(_, thread)| !thread.is_finished());
        match spawned {
            Ok(thread) => conns.push((clone, thread)),
            Err(e) => tracing::warn!(error = %e, "takeover request dropped: cannot spawn a thread"),
        }
    }
}

/// Only the owner of the socket file (fulcrum's user) and root may take over.
fn check_peer(stream: &UnixStream, owner: u32) -> io::Result<()> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        let cred = rustix::net::sockopt::socket_peercred(stream)?;
        let uid = cred.uid.as_raw();
        if uid != owner && uid != 0 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "peer pid {} runs as uid {uid}, not {owner}",
                    cred.pid.as_raw_pid()
                ),
            ));
        }
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = (stream, owner);
    Ok(())
}

fn serve_one(stream: UnixStream, sockets: Offer, shared: &Shared) {
    let count = sockets.len();
    let sent = stream
        .set_write_timeout(Some(SEND_TIMEOUT))
        .and_then(|()| send_sockets(&stream, &sockets));
    drop(sockets);
    if let Err(e) = sent {
        tracing::warn!(error = %e, "takeover: sending the sockets failed");
        return;
    }
    tracing::info!(
        sockets = count,
        "takeover: sockets handed over, waiting for the new process"
    );
    match read_answer(&stream) {
        Ok(true) => {
            let on_ready = lock(&shared.on_ready).take();
            if shared.stopping.load(Ordering::SeqCst) {
                return;
            }
            tracing::info!("takeover complete: the new process serves");
            if let Some(on_ready) = on_ready {
                on_ready();
            }
        }
        Ok(false) => tracing::warn!("takeover failed: the new process closed without confirming"),
        Err(e) => {
            tracing::warn!(error = %e, "takeover failed: no confirmation from the new process")
        }
    }
}

/// Reads the peer's one-line answer: `Ok(true)` for `ready\n`, `Ok(false)`
/// if it closed without a word.
fn read_answer(mut stream: &UnixStream) -> io::Result<bool> {
    let mut line = Vec::with_capacity(READY_LINE.len());
    let mut byte = [0u8; 1];
    while line.len() < 64 {
        match stream.read(&mut byte) {
            Ok(0) if line.is_empty() => return Ok(false),
            Ok(0) => break,
            Ok(_) => {
                line.push(byte[0]);
                if byte[0] == b'\n' {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    if line == READY_LINE {
        Ok(true)
    } else {
        Err(invalid(format!(
            "unexpected answer {:?}",
            String::from_utf8_lossy(&line)
        )))
    }
}

/// Encodes the manifest of `sockets`, checking names fit.
fn manifest(sockets: &[(String, Kind, OwnedFd)]) -> io::Result<Vec<u8>> {
    // Consecutive sockets of the same name and kind make one entry.
    let mut entries: Vec<(&str, Kind, u32)> = Vec::new();
    for (name, kind, _) in sockets {
        match entries.last_mut() {
            Some((n, k, count)) if *n == name.as_str() && *k == *kind => *count += 1,
            _ => entries.push((name, *kind, 1)),
        }
    }
    if sockets.len() > MAX_TOTAL_FDS {
        return Err(invalid(format!(
            "{} sockets offered, at most {MAX_TOTAL_FDS}",
            sockets.len()
        )));
    }
    let mut body = Vec::new();
    body.extend_from_slice(&(entries.len() as u32).to_be_bytes());
    body.extend_from_slice(&(sockets.len() as u32).to_be_bytes());
    for (name, kind, count) in entries {
        let len = u16::try_from(name.len())
            .map_err(|_| invalid(format!("listener name too long: {name:.40}...")))?;
        body.push(kind.to_wire());
        body.extend_from_slice(&count.to_be_bytes());
        body.extend_from_slice(&len.to_be_bytes());
        body.extend_from_slice(name.as_bytes());
    }
    if body.len() > MAX_MANIFEST_LEN {
        return Err(invalid("manifest too long".into()));
    }
    Ok(body)
}

fn send_sockets(stream: &UnixStream, sockets: &[(String, Kind, OwnedFd)]) -> io::Result<()> {
    let body = manifest(sockets)?;
    let mut head = Vec::with_capacity(PREAMBLE_LEN + body.len());
    head.extend_from_slice(&MAGIC);
    head.push(PROTOCOL_VERSION);
    head.extend_from_slice(&(body.len() as u32).to_be_bytes());
    head.extend_from_slice(&body);
    let mut writer = stream;
    writer.write_all(&head)?;
    let fds: Vec<BorrowedFd<'_>> = sockets.iter().map(|(_, _, fd)| fd.as_fd()).collect();
    for chunk in fds.chunks(MAX_FDS_PER_MESSAGE) {
        send_with_fds(stream, &(chunk.len() as u32).to_be_bytes(), chunk)?;
    }
    Ok(())
}

/// Sends `data` with `fds` attached (to its first byte).
fn send_with_fds(stream: &UnixStream, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let mut space = vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other("ancillary buffer too small"));
    }
    let sent = loop {
        match rustix::net::sendmsg(
            stream,
            &[IoSlice::new(data)],
            &mut control,
            SendFlags::NOSIGNAL,
        ) {
            Ok(sent) => break sent,
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    // The descriptors went with the first byte; the rest is plain data.
    let mut writer = stream;
    writer.write_all(&data[sent..])
}

/// The new process's side: connects to `path`, receives the sockets offered
/// (within `timeout` overall) and returns them with the [`Ready`] handle to
/// confirm the takeover with once the new process serves.
///
/// Received sockets are left in the blocking mode they have (shared with the
/// old process): set them non-blocking before use with tokio. On any error
/// every descriptor received is closed.
pub fn receive(path: &Path, timeout: Duration) -> io::Result<(Inherited, Ready)> {
    let deadline = Instant::now() + timeout;
    let stream = connect(path, deadline).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("connecting to takeover socket {}: {e}", path.display()),
        )
    })?;
    let mut fds = Vec::new();

    let mut preamble = [0u8; PREAMBLE_LEN];
    recv_exact(&stream, &mut preamble, &mut fds, deadline)?;
    if preamble[..MAGIC.len()] != MAGIC {
        return Err(invalid("not a fulcrum takeover socket (bad magic)".into()));
    }
    let version = preamble[MAGIC.len()];
    if version != PROTOCOL_VERSION {
        return Err(invalid(format!(
            "takeover protocol version {version}, expected {PROTOCOL_VERSION}"
        )));
    }
    let len = u32::from_be_bytes(preamble[MAGIC.len() + 1..].try_into().expect("4 bytes")) as usize;
    if len > MAX_MANIFEST_LEN {
        return Err(invalid(format!(
            "manifest of {len} bytes, at most {MAX_MANIFEST_LEN}"
        )));
    }
    let mut body = vec![0u8; len];
    recv_exact(&stream, &mut body, &mut fds, deadline)?;
    let (entries, total) = parse_manifest(&body)?;

    let mut expected = 0usize;
    while expected < total {
        let mut marker = [0u8; 4];
        recv_exact(&stream, &mut marker, &mut fds, deadline)?;
        let n = u32::from_be_bytes(marker) as usize;
        if n == 0 || n > MAX_FDS_PER_MESSAGE || expected + n > total {
            return Err(invalid(format!(
                "bad descriptor chunk of {n} after {expected} of {total}"
            )));
        }
        expected += n;
        if fds.len() != expected {
            return Err(invalid(format!(
                "expected {expected} descriptors so far, received {}",
                fds.len()
            )));
        }
    }
    if fds.len() != total {
        return Err(invalid(format!(
            "expected {total} descriptors, received {}",
            fds.len()
        )));
    }

    let mut inherited = Inherited::default();
    let mut fds = fds.into_iter();
    for (name, kind, count) in entries {
        for _ in 0..count {
            let fd = fds.next().expect("counts checked above");
            match kind {
                Kind::Tcp => {
                    let listener = tcp_listener(fd).map_err(|e| context(e, &name, kind))?;
                    inherited
                        .tcp
                        .entry(name.clone())
                        .or_default()
                        .push(listener);
                }
                Kind::Udp => {
                    let socket = udp_socket(fd).map_err(|e| context(e, &name, kind))?;
                    inherited.udp.entry(name.clone()).or_default().push(socket);
                }
            }
        }
    }
    stream.set_read_timeout(None)?;
    tracing::info!(sockets = total, path = %path.display(), "takeover: sockets received");
    Ok((inherited, Ready { stream }))
}

/// Connects to `path` by `deadline`: a blocking `connect` would wait without
/// bound on a listener whose backlog is full (an old process that is stuck).
fn connect(path: &Path, deadline: Instant) -> io::Result<UnixStream> {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags};
    let addr = SocketAddrUnix::new(path)?;
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )?;
    loop {
        match rustix::net::connect(&fd, &addr) {
            Ok(()) => break,
            Err(Errno::INTR) => continue,
            // Unix sockets connect at once or, backlog full, fail with EAGAIN.
            Err(Errno::AGAIN) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(Errno::AGAIN) => return Err(timed_out()),
            Err(e) => return Err(e.into()),
        }
    }
    let stream = UnixStream::from(fd);
    stream.set_nonblocking(false)?;
    Ok(stream)
}

fn context(e: io::Error, name: &str, kind: Kind) -> io::Error {
    io::Error::new(
        e.kind(),
        format!("inherited {kind} socket of listener {name:?}: {e}"),
    )
}

fn tcp_listener(fd: OwnedFd) -> io::Result<TcpListener> {
    if rustix::net::sockopt::socket_type(&fd)? != SocketType::STREAM {
        return Err(invalid("not a stream socket".into()));
    }
    #[cfg(not(target_vendor = "apple"))]
    if !rustix::net::sockopt::socket_acceptconn(&fd)? {
        return Err(invalid("not listening".into()));
    }
    let listener = TcpListener::from(fd);
    listener.local_addr()?; // fails unless it is an IPv4/IPv6 socket
    Ok(listener)
}

fn udp_socket(fd: OwnedFd) -> io::Result<UdpSocket> {
    if rustix::net::sockopt::socket_type(&fd)? != SocketType::DGRAM {
        return Err(invalid("not a datagram socket".into()));
    }
    let socket = UdpSocket::from(fd);
    socket.local_addr()?;
    Ok(socket)
}

type Entries = Vec<(String, Kind, usize)>;

fn parse_manifest(body: &[u8]) -> io::Result<(Entries, usize)> {
    let mut cur = body;
    let mut take = |n: usize| -> io::Result<&[u8]> {
        if cur.len() < n {
            return Err(invalid("truncated manifest".into()));
        }
        let (head, rest) = cur.split_at(n);
        cur = rest;
        Ok(head)
    };
    let be32 = |b: &[u8]| u32::from_be_bytes(b.try_into().expect("4 bytes")) as usize;
    let n_entries = be32(take(4)?);
    let total = be32(take(4)?);
    if total > MAX_TOTAL_FDS {
        return Err(invalid(format!(
            "{total} descriptors announced, at most {MAX_TOTAL_FDS}"
        )));
    }
    let mut entries = Vec::new();
    let mut sum = 0usize;
    for _ in 0..n_entries {
        let kind = Kind::from_wire(take(1)?[0])?;
        let count = be32(take(4)?);
        let name_len = u16::from_be_bytes(take(2)?.try_into().expect("2 bytes")) as usize;
        let name = std::str::from_utf8(take(name_len)?)
            .map_err(|_| invalid("listener name is not UTF-8".into()))?
            .to_owned();
        sum += count;
        if sum > total {
            return Err(invalid(format!(
                "entries list more than the {total} descriptors announced"
            )));
        }
        entries.push((name, kind, count));
    }
    if sum != total {
        return Err(invalid(format!(
            "entries list {sum} descriptors, {total} announced"
        )));
    }
    if !cur.is_empty() {
        return Err(invalid("trailing bytes after the manifest".into()));
    }
    Ok((entries, total))
}

/// Fills `buf` from `stream`, collecting every descriptor that arrives with
/// the data into `fds`. Every read is a `recvmsg` with room for `SCM_MAX_FD`
/// descriptors: a plain `read` would silently close descriptors riding on
/// the bytes it consumes.
fn recv_exact(
    stream: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    deadline: Instant,
) -> io::Result<()> {
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(SCM_MAX_FD))];
    let mut filled = 0;
    while filled < buf.len() {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(timed_out());
        }
        stream.set_read_timeout(Some(remaining))?;
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let received = rustix::net::recvmsg(
            stream,
            &mut [IoSliceMut::new(&mut buf[filled..])],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        );
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(received_fds) = message {
                fds.extend(received_fds);
            }
        }
        let received = match received {
            Ok(received) => received,
            Err(Errno::INTR) => continue,
            Err(Errno::AGAIN) => return Err(timed_out()),
            Err(e) => return Err(e.into()),
        };
        if received.flags.contains(ReturnFlags::CTRUNC) {
            return Err(invalid("descriptors truncated (MSG_CTRUNC)".into()));
        }
        if received.bytes == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the old process closed the takeover connection early",
            ));
        }
        filled += received.bytes;
    }
    Ok(())
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("takeover: {msg}"))
}

fn timed_out() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "takeover: timed out waiting for the old process",
    )
}

/// The new process's pledge: [`confirm`](Ready::confirm) it once serving.
/// Dropping it unconfirmed tells the old process the takeover failed.
#[derive(Debug)]
pub struct Ready {
    stream: UnixStream,
}

impl Ready {
    /// Tells the old process the new one serves (writes `ready\n`): the old
    /// process then stops accepting and winds down.
    pub fn confirm(self) -> io::Result<()> {
        self.stream.set_write_timeout(Some(CONFIRM_TIMEOUT))?;
        let mut writer = &self.stream;
        writer.write_all(READY_LINE)?;
        // Let the old process see the end of the line at once.
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
        Ok(())
    }
}

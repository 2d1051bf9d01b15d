//! TCP listeners: each accepted connection is relayed byte for byte to a server of the pool.
//!
//! The path of one connection ([`TcpProxy::serve`]):
//! 1. From a source in `accept_proxy_protocol`, a PROXY header (v1 or v2) is read first; its source
//!    address becomes the client's (for hashing, stickiness, the header sent on, logs).
//! 2. With `sni` routes, the TLS ClientHello is read (not altered, not terminated) within
//!    `hello_timeout`; its server name picks the route, else the listener's pool. A connection that is
//!    not TLS, or whose hello is malformed or larger than 16 KiB, is closed and counted.
//! 3. A server is picked (any algorithm; `source_ip` / `source_ip_port` hash keys; `source_ip`
//!    stickiness) among those that may take it (up, not draining, under `max_connections_per_server`);
//!    a failed connect (within the pool's `connect_timeout`) tries the next one, up to `retries`.
//!    No server: the connection is closed at once and counted.
//! 4. The PROXY header the listener sends (`proxy_protocol`), then the bytes read so far, go to the
//!    server; then bytes flow both ways until both sides have closed. A side that closes its writing
//!    half (FIN) is passed on as such, while the other direction keeps flowing.
//!
//! The relay ([`super::relay`]) holds nothing while a connection is idle but two small state machines
//! and a timer: small transfers are copied through a buffer borrowed per burst, bulk ones (a read that
//! fills the buffer) are spliced through a pipe borrowed per burst (`splice = true`, the default). An
//! idle session costs its task (about 1 KiB with its two sockets' registrations) and its two sockets.
//! No byte either way for `idle_timeout` closes both sides; a drain (listener removed, shutdown) lets
//! sessions run until the deadline. The session counts as in flight on its server (least connections,
//! saturation, a draining server's removal) until it ends.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::relay::{relay, Counters, Ended};
use crate::access_log::{Kind, Record, Termination};
use crate::config::{HashKey, HostMatch, ProxyProtocol};
use crate::filter::CidrSet;
use crate::http::filter::ListenerFilter;
use crate::listener::{Accepted, ConnHandler, ListenerStats, PerIp};
use crate::pool::{InFlight, Pool, Server, TO_SERVER};
use crate::sticky::Sticky;

/// The largest ClientHello read to route by SNI.
const MAX_HELLO: usize = 16 * 1024;

/// Where a TCP connection goes.
#[derive(Debug, Clone)]
pub struct TcpTarget {
    /// The pool.
    pub pool: Arc<Pool>,
    /// Its stickiness (`source_ip` applies to TCP).
    pub sticky: Option<Arc<Sticky>>,
}

/// A TCP listener's routes: by the ClientHello's server name, else the default.
#[derive(Debug)]
pub struct TcpRouter {
    /// `sni` routes in order; the first match wins.
    pub routes: Vec<(HostMatch, TcpTarget)>,
    /// The listener's pool.
    pub default: TcpTarget,
}

impl TcpRouter {
    /// The target for a hello naming `name` (or none).
    pub fn route(&self, name: Option<&str>) -> &TcpTarget {
        let Some(name) = name else {
            return &self.default;
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        self.routes
            .iter()
            .find(|(m, _)| m.matches(&name))
            .map_or(&self.default, |(_, t)| t)
    }
}

/// The settings of a TCP listener that a reload may change.
#[derive(Debug, Clone, PartialEq)]
pub struct TcpSettings {
    /// No byte either way for this long closes the session.
    pub idle_timeout: Duration,
    /// The PROXY header and the ClientHello must arrive within this.
    pub hello_timeout: Duration,
    /// Send a PROXY header of this version to the server.
    pub proxy_protocol: Option<ProxyProtocol>,
    /// Read a PROXY header from connections of these sources.
    pub accept_proxy_protocol: Option<CidrSet>,
    /// Move bytes with `splice(2)` through a pipe per direction instead of through a buffer.
    pub splice: bool,
}

impl TcpSettings {
    /// The settings of listener `l`.
    pub fn of(l: &crate::config::ListenerConfig) -> Self {
        TcpSettings {
            idle_timeout: l.idle_timeout,
            hello_timeout: l.hello_timeout,
            proxy_protocol: l.proxy_protocol,
            accept_proxy_protocol: l.accept_proxy_protocol.clone(),
            splice: l.splice,
        }
    }
}

/// Counters of a TCP listener beyond [`ListenerStats`].
#[derive(Debug, Default)]
pub struct TcpStats {
    /// Bytes from clients to servers.
    pub bytes_in: AtomicU64,
    /// Bytes from servers to clients.
    pub bytes_out: AtomicU64,
    /// Connections closed at once: no server could take them (none up, all at their limit, every
    /// connect failed).
    pub refused_no_server: AtomicU64,
    /// Connections closed because their ClientHello was not TLS, malformed, too large or late.
    pub bad_hello: AtomicU64,
    /// Connections closed because their PROXY header was missing, malformed or late.
    pub bad_proxy_header: AtomicU64,
    /// Sessions closed after `idle_timeout` without a byte.
    pub idle_timeouts: AtomicU64,
}

/// A TCP listener.
#[derive(Debug)]
pub struct TcpProxy {
    /// The listener's name.
    pub name: String,
    /// Connection counters (shared with the accept loop).
    pub stats: Arc<ListenerStats>,
    /// TCP counters.
    pub tcp: Arc<TcpStats>,
    /// Open connections per client address, when limited.
    pub per_ip: arc_swap::ArcSwapOption<PerIp>,
    /// Access lists and bans (checked at accept).
    pub filter: ArcSwap<ListenerFilter>,
    /// Routes.
    pub router: ArcSwap<TcpRouter>,
    /// Timeouts and the PROXY protocol.
    pub settings: ArcSwap<TcpSettings>,
    /// The access log: a line per session when it ends.
    pub access_log: crate::access_log::Slot,
    /// The listener's name for log lines.
    pub log_name: Arc<str>,
}

impl ConnHandler for TcpProxy {
    async fn serve(self: Arc<Self>, conn: Accepted) {
        let Some(log) = self.access_log.load_full().filter(|log| log.sampled()) else {
            self.serve_conn(conn, None).await;
            return;
        };
        // The logged path: the session's bytes are counted for its line.
        let mut record = Record::new(Kind::Tcp, conn.peer, self.log_name.clone());
        let started = Instant::now();
        let bytes = [AtomicU64::new(0), AtomicU64::new(0)];
        let mut session = Session::default();
        let termination = Box::pin(self.serve_conn(conn, Some((&bytes, &mut session)))).await;
        record.client = session.client.unwrap_or(record.client);
        record.pool = session.pool;
        record.server = session.server;
        record.server_time = session.connect_time;
        record.bytes_in = bytes[0].load(Ordering::Relaxed);
        record.bytes_out = bytes[1].load(Ordering::Relaxed);
        record.request_time = started.elapsed();
        record.termination = termination;
        log.log(record);
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

    fn admit(&self, ip: std::net::IpAddr) -> bool {
        self.filter.load().admit(ip)
    }
}

/// What a logged session reports for its access log line.
#[derive(Default)]
struct Session {
    client: Option<SocketAddr>,
    pool: Option<Arc<str>>,
    server: Option<Arc<str>>,
    connect_time: Option<Duration>,
}

/// A session ready to relay: its server picked, connected and counted, what came first sent on.
struct Opened {
    upstream: TcpStream,
    server: Arc<Server>,
    /// Keeps the session counted on its server (least connections, limits, drains).
    _in_flight: InFlight,
    /// The client's first bytes must not be a PROXY header (an untrusted source, no SNI routes).
    check_first: bool,
}

impl TcpProxy {
    /// Serves one connection; with `log`, counts its bytes there and fills in its [`Session`].
    async fn serve_conn(
        &self,
        conn: Accepted,
        log: Option<(&[AtomicU64; 2], &mut Session)>,
    ) -> Termination {
        let Accepted {
            mut stream,
            peer,
            stop,
            deadline,
            tracker,
            guard: _guard,
            parking: _,
        } = conn;
        drop((stop, tracker));
        let settings = self.settings.load_full();
        let (idle, splice) = (settings.idle_timeout, settings.splice);
        let session_bytes = log.as_ref().map(|(bytes, _)| *bytes);
        // The phases before the relay are boxed: for as long as the session lasts, its task keeps only
        // the relay's state, not the largest phase's.
        let opened = match Box::pin(self.open(&mut stream, peer, settings, log)).await {
            Ok(opened) => opened,
            Err(termination) => return termination,
        };
        let counters = Counters {
            tcp: &self.tcp,
            server: &opened.server.stats,
            session: session_bytes,
        };
        let outcome = tokio::select! {
            r = relay(&stream, &opened.upstream, idle, counters, opened.check_first, splice) => r,
            _ = deadline.cancelled() => return Termination::Cut,
        };
        match outcome {
            Ended::Idle => {
                self.tcp.idle_timeouts.fetch_add(1, Ordering::Relaxed);
                Termination::Idle
            }
            Ended::ProxyHeader => {
                self.tcp.bad_proxy_header.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(listener = %self.name, client = %peer, "PROXY header from an untrusted source: refused");
                Termination::Refused
            }
            Ended::Closed => Termination::Ok,
        }
    }

    /// Everything before the relay: the PROXY header read, the ClientHello routed, the server
    /// connected, the header sent and the bytes read so far passed on.
    async fn open(
        &self,
        stream: &mut TcpStream,
        peer: SocketAddr,
        settings: Arc<TcpSettings>,
        mut log: Option<(&[AtomicU64; 2], &mut Session)>,
    ) -> Result<Opened, Termination> {
        let mut client = peer;
        let mut early = Vec::new();
        let trusted = settings
            .accept_proxy_protocol
            .as_ref()
            .map(|trusted| trusted.contains(peer.ip()));
        // A source outside `accept_proxy_protocol` may not claim another address: a connection of one
        // that starts with a PROXY header is refused.
        let refuse_header = trusted == Some(false);
        if trusted == Some(true) {
            match super::proxy_protocol::read(stream, settings.hello_timeout).await {
                Ok(received) => {
                    if let Some(source) = received.source {
                        client = source;
                    }
                    early = received.leftover;
                }
                Err(e) => {
                    self.tcp.bad_proxy_header.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(listener = %self.name, client = %peer, error = %e, "bad PROXY header");
                    return Err(Termination::Refused);
                }
            }
        }
        let router = self.router.load_full();
        let target = if router.routes.is_empty() {
            &router.default
        } else {
            let mut reader = (&early[..]).chain(&mut *stream);
            match super::sni::read_client_hello(&mut reader, settings.hello_timeout, MAX_HELLO)
                .await
            {
                Ok(hello) => {
                    early = hello.bytes;
                    if refuse_header && is_proxy_header(&early) {
                        self.tcp.bad_proxy_header.fetch_add(1, Ordering::Relaxed);
                        return Err(Termination::Refused);
                    }
                    router.route(hello.server_name.as_deref())
                }
                Err(e) => {
                    self.tcp.bad_hello.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(listener = %self.name, client = %client, error = %e, "no usable TLS ClientHello");
                    return Err(Termination::Refused);
                }
            }
        };
        if let Some((_, session)) = &mut log {
            session.client = Some(client);
            session.pool = Some(Arc::from(target.pool.name.as_str()));
        }
        let Some((server, upstream, in_flight, connect_time)) = connect(target, client).await
        else {
            self.tcp.refused_no_server.fetch_add(1, Ordering::Relaxed);
            return Err(Termination::NoServer);
        };
        let mut session_bytes = None;
        if let Some((bytes, session)) = log.take() {
            session.server = Some(Arc::from(server.name.as_str()));
            session.connect_time = Some(connect_time);
            session_bytes = Some(bytes);
        }
        let mut upstream = upstream;
        let mut head = Vec::new();
        if let Some(version) = settings.proxy_protocol {
            // The listener's own address (`getsockname`), asked only when a header needs it.
            let local = stream.local_addr().unwrap_or(peer);
            head = super::proxy_protocol::encode(version, client, local);
        }
        head.extend_from_slice(&early);
        if !head.is_empty() && upstream.write_all(&head).await.is_err() {
            server.stats.record_failure();
            return Err(Termination::ServerAbort);
        }
        self.tcp
            .bytes_in
            .fetch_add(early.len() as u64, Ordering::Relaxed);
        server.stats.record_l4(TO_SERVER, early.len(), false);
        if let Some(bytes) = session_bytes {
            bytes[0].fetch_add(early.len() as u64, Ordering::Relaxed);
        }
        Ok(Opened {
            upstream,
            server,
            _in_flight: in_flight,
            check_first: refuse_header && router.routes.is_empty(),
        })
    }
}

/// Picks a server and connects to it: the sticky one first, then the algorithm's candidates, skipping
/// those that may not take a connection; a failed connect tries the next, up to the pool's `retries`.
async fn connect(
    target: &TcpTarget,
    client: SocketAddr,
) -> Option<(Arc<Server>, TcpStream, InFlight, Duration)> {
    let snapshot = target.pool.snapshot_full();
    let key = snapshot.settings.hash_key.as_ref().and_then(|k| match k {
        HashKey::SourceIp => Some(crate::balance::address_key(client, false)),
        HashKey::SourceIpPort => Some(crate::balance::address_key(client, true)),
        // HTTP keys: a TCP connection has none, so the pool's fallback algorithm picks.
        _ => None,
    });
    let sticky = match &target.sticky {
        Some(s) => Some((
            s,
            s.lookup(&http::HeaderMap::new(), client.ip(), &snapshot)
                .await,
        )),
        None => None,
    };
    let sticky_server = sticky
        .as_ref()
        .and_then(|(_, c)| c.server)
        .map(|i| snapshot.servers[i].clone())
        .filter(|s| s.is_available() && !snapshot.at_limit(s));
    let mut candidates = snapshot.pick(key);
    let mut attempts = snapshot.settings.retries + 1;
    let mut first = sticky_server.clone();
    while attempts > 0 {
        let server = match first.take() {
            Some(s) => s,
            None => loop {
                match snapshot.next_available(&mut candidates) {
                    Some(s) if sticky_server.as_ref().is_some_and(|t| Arc::ptr_eq(t, s)) => {
                        continue
                    }
                    Some(s) => break s.clone(),
                    None => return None,
                }
            },
        };
        attempts -= 1;
        let in_flight = InFlight::start(server.clone());
        let started = Instant::now();
        match tokio::time::timeout(
            snapshot.settings.connect_timeout,
            connect_to(server.address),
        )
        .await
        {
            Ok(Ok(upstream)) => {
                let _ = upstream.set_nodelay(true);
                let connect_time = started.elapsed();
                server.stats.record_session(connect_time);
                snapshot.observe(&server, true);
                if let Some((sticky, c)) = &sticky {
                    let stuck_here = c
                        .server
                        .is_some_and(|i| Arc::ptr_eq(&snapshot.servers[i], &server));
                    sticky.remember(c, &server, stuck_here, false, &mut http::HeaderMap::new());
                }
                return Some((server, upstream, in_flight, connect_time));
            }
            Ok(Err(e)) => {
                tracing::warn!(server = %server.name, error = %e, "server connect failed");
            }
            Err(_) => {
                tracing::warn!(server = %server.name, "server connect timed out");
            }
        }
        server.stats.record_failure();
        snapshot.observe(&server, false);
    }
    None
}

/// Connects to `addr`, as `TcpStream::connect` does but without its `getsockopt(SO_ERROR)` after every
/// connect (one system call less per session): the socket's readiness tells a failed connect (its
/// write side is closed), and only then is the error asked for.
async fn connect_to(addr: SocketAddr) -> std::io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        None,
    )?;
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INPROGRESS.raw_os_error()) => {}
        Err(e) => return Err(e),
    }
    let stream = TcpStream::from_std(std::net::TcpStream::from(socket))?;
    let ready = stream.ready(tokio::io::Interest::WRITABLE).await?;
    if ready.is_write_closed() {
        return Err(stream
            .take_error()?
            .unwrap_or_else(|| std::io::ErrorKind::ConnectionRefused.into()));
    }
    Ok(stream)
}

/// True when `bytes` start like a PROXY protocol header (v1 `PROXY `, or v2's signature).
pub(super) fn is_proxy_header(bytes: &[u8]) -> bool {
    const V2: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
    let starts =
        |sig: &[u8]| bytes[..bytes.len().min(sig.len())] == sig[..bytes.len().min(sig.len())];
    !bytes.is_empty() && (starts(b"PROXY ") || starts(V2))
}

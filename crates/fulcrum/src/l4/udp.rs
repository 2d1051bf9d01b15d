//! UDP listeners: datagrams balanced over a pool, one *flow* per client address.
//!
//! # Flows
//!
//! UDP has no connections, so the proxy makes its own: the first datagram from a client address
//! (`SocketAddr`, IP and port) picks a server of the pool (the snapshot's pick, first available
//! candidate; the hash key is the client's address when the pool hashes `source_ip` or
//! `source_ip_port`) and opens a *connected* UDP socket to it (`bind` to the unspecified address of
//! the server's family, `connect` to the server). Every later datagram of that client goes out on the
//! same socket, so the server sees one stable peer per client, and the server's answers come back on
//! that socket only (a connected socket drops datagrams from anyone else). A reply task per flow reads
//! the server socket and sends each answer to the client from the listener's own socket, so that the
//! client sees its answers come from the address it sent to.
//!
//! A flow holds an [`InFlight`] on its server for as long as it lives: least connections, bounded
//! loads, `max_connections_per_server` and drains count flows, as they count TCP tunnels. The server's
//! counters take each flow (`sessions`), each datagram and its payload bytes either way
//! ([`crate::pool::ServerStats::record_l4`]); an ICMP "port unreachable" answer from a server counts
//! as a failure there ([`crate::pool::ServerStats::record_failure`]).
//!
//! # Ownership and the datagram path
//!
//! [`serve`] is one task per listener socket, and that task alone owns the flow table (a plain
//! `HashMap`, no lock). The reply tasks share with it only the listener socket (`Arc<UdpSocket>`)
//! and, per flow, two atomics: the time of the last datagram either way and a "closed" flag. A
//! datagram from a client costs one table lookup, one relaxed store and one non-blocking `send`: the
//! listener task never waits on one flow (a server socket whose send buffer is full drops the datagram
//! and counts it, as the network would), so one slow server cannot stall the others' clients. After a
//! wake-up the listener reads up to 64 datagrams before it looks at its stop token and timer again.
//!
//! Several sockets may serve one address (`SO_REUSEPORT`): the kernel sends a client's datagrams to
//! one socket consistently, so each flow lives in exactly one table; `max_flows` bounds each table.
//!
//! # Buffers
//!
//! The listener task reads into one 64 KiB buffer, reused (a UDP payload is at most 65,507 bytes over
//! IPv4, 65,527 over IPv6). A reply task has no buffer of its own: when its server socket is readable
//! it receives into a 64 KiB scratch buffer of the worker thread it runs on and sends the answer to the
//! client right away, without yielding (`try_recv`, `try_send_to`). Only when the listener's send
//! buffer is full is the answer copied out (to a `Vec` of its exact size) and sent with `send_to(..).await`.
//! So 100,000 idle flows hold no datagram buffer at all (64 KiB each would be 6.4 GiB), and no answer
//! is truncated, which a small per-flow buffer grown on demand would do to the first large one.
//!
//! # Ends of a flow
//!
//! * **Idle**: a flow with no datagram either way for `idle_timeout` ends. Nothing is re-armed per
//!   datagram: the listener task sweeps its table every `idle_timeout / 2` (between 50 ms and 1 s),
//!   so a flow ends between `idle_timeout` and `idle_timeout` plus one sweep interval after its last
//!   datagram. With 100,000 flows a sweep is a pass over the table once a second, far cheaper than
//!   resetting a timer on every datagram. Counted in `flows_expired`.
//! * **Server unavailable**: when a datagram arrives for a flow whose server may no longer take
//!   traffic (down, draining, maintenance, or retired from its pool), the flow ends and the datagram
//!   opens a new flow to an available server: a down server's flows move (`flows_moved`).
//! * **Server socket failed**: the reply task ends and marks the flow closed; the next datagram from
//!   the client opens a new flow, and the next sweep removes it if none comes.
//! * **Stop**: [`serve`] returns and drops its table.
//!
//! Ending a flow drops it from the table: its reply task is aborted, its server socket closes and its
//! `InFlight` is released.
//!
//! # Limits
//!
//! A new flow beyond `max_flows` is refused: its datagram is dropped and `flows_refused` counted
//! (each datagram of a refused client counts again), while the existing flows keep working. A datagram
//! that finds no available server is dropped and counted in `dropped`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;

use crate::access_log::{AccessLog, Kind, Record, Termination};
use crate::balance::address_key;
use crate::clock::now_ms;
use crate::config::HashKey;
use crate::pool::{InFlight, Pool, Server, FROM_SERVER, TO_SERVER};

/// Size of the receive buffers: any UDP payload fits.
const MAX_DATAGRAM: usize = 64 * 1024;

/// Datagrams the listener task reads per wake-up before it looks at its stop token and timer again.
const BATCH: usize = 64;

/// Bounds of the interval between two sweeps of the flow table.
const SWEEP_MIN: Duration = Duration::from_millis(50);
const SWEEP_MAX: Duration = Duration::from_secs(1);

/// Settings of a UDP listener; a reload may swap them ([`UdpProxy::settings`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpSettings {
    /// A flow with no datagram either way for this long ends (its server socket closes).
    pub idle_timeout: Duration,
    /// Flows a listener socket keeps at most: a new client beyond them is refused (its datagram is
    /// dropped) while the existing flows keep working. 0 refuses every client.
    pub max_flows: usize,
}

/// Counters of a UDP listener (every socket serving it), updated with relaxed atomics.
#[derive(Debug, Default)]
pub struct UdpStats {
    /// Datagrams received from clients.
    pub datagrams_in: AtomicU64,
    /// Datagrams (servers' answers) sent to clients.
    pub datagrams_out: AtomicU64,
    /// Payload bytes received from clients.
    pub bytes_in: AtomicU64,
    /// Payload bytes sent to clients.
    pub bytes_out: AtomicU64,
    /// Flows opened (a flow moved to another server counts again).
    pub flows_total: AtomicU64,
    /// Datagrams of new clients refused because the flow table was full.
    pub flows_refused: AtomicU64,
    /// Flows ended after `idle_timeout` without traffic.
    pub flows_expired: AtomicU64,
    /// Flows moved to another server because theirs could no longer take traffic.
    pub flows_moved: AtomicU64,
    /// Datagrams dropped either way: no server available, a server socket that could not be opened,
    /// a full send buffer, a send error.
    pub dropped: AtomicU64,
    /// Flows open now.
    pub flows_active: AtomicI64,
}

/// A UDP listener's shared state: its counters, settings and target pool. [`serve`] runs it on a
/// socket; several sockets (tasks) may serve one proxy.
#[derive(Debug)]
pub struct UdpProxy {
    /// The listener's name, for logs.
    pub name: String,
    /// The listener's counters.
    pub stats: Arc<UdpStats>,
    /// Idle timeout and flow limit; read when a flow opens and at every sweep, so a swap applies to
    /// the flows that exist.
    pub settings: ArcSwap<UdpSettings>,
    /// The target pool; a reload may swap it. Existing flows keep their server while it stays
    /// available (a server leaving its pool is retired, and its flows move on their next datagram).
    pub pool: ArcSwap<Pool>,
    /// The access log: a line per flow when it ends.
    pub access_log: crate::access_log::Slot,
}

impl UdpProxy {
    /// A proxy balancing over `pool`.
    pub fn new(name: impl Into<String>, pool: Arc<Pool>, settings: UdpSettings) -> Self {
        UdpProxy {
            name: name.into(),
            stats: Arc::default(),
            settings: ArcSwap::from_pointee(settings),
            pool: ArcSwap::new(pool),
            access_log: Arc::default(),
        }
    }

    /// The proxy logging its flows to the access log found in `slot`.
    pub fn with_access_log(mut self, slot: crate::access_log::Slot) -> Self {
        self.access_log = slot;
        self
    }
}

/// Serves datagrams on `socket` until `stop` fires.
///
/// The task owns the socket's flow table; when it returns, every flow ends (reply tasks aborted,
/// server sockets closed) and `flows_active` drops by their number.
pub async fn serve(socket: UdpSocket, proxy: Arc<UdpProxy>, stop: CancellationToken) {
    let socket = Arc::new(socket);
    let mut table = Table {
        proxy: proxy.clone(),
        socket: socket.clone(),
        flows: HashMap::new(),
    };
    let mut buf = vec![0u8; MAX_DATAGRAM].into_boxed_slice();
    // Pinned once: a fresh timer or cancellation future per datagram would register and deregister
    // with the timer wheel and the token's waiter list each time.
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    let sweep = tokio::time::sleep(sweep_period(proxy.settings.load().idle_timeout));
    tokio::pin!(sweep);
    loop {
        tokio::select! {
            biased;
            () = &mut stopped => break,
            () = &mut sweep => {
                table.sweep(now_ms());
                let period = sweep_period(proxy.settings.load().idle_timeout);
                sweep.as_mut().reset(tokio::time::Instant::now() + period);
            }
            received = socket.recv_from(&mut buf) => match received {
                Ok((n, client)) => {
                    let now = now_ms();
                    table.forward(client, &buf[..n], now);
                    for _ in 1..BATCH {
                        match socket.try_recv_from(&mut buf) {
                            Ok((n, client)) => table.forward(client, &buf[..n], now),
                            Err(e) => {
                                if e.kind() != io::ErrorKind::WouldBlock {
                                    receive_failed(&proxy.name, &e).await;
                                }
                                break;
                            }
                        }
                    }
                }
                Err(e) => receive_failed(&proxy.name, &e).await,
            },
        }
    }
    let open = table.flows.len();
    drop(table);
    proxy
        .stats
        .flows_active
        .fetch_sub(open as i64, Ordering::Relaxed);
}

/// A failed receive on the listener socket: ICMP errors some systems report there are ignored;
/// anything else is logged and the listener pauses briefly rather than spin.
async fn receive_failed(listener: &str, e: &io::Error) {
    match e.kind() {
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionRefused
        | io::ErrorKind::Interrupted => {}
        _ => {
            tracing::warn!(listener, error = %e, "UDP receive failed; pausing");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The interval between two sweeps for `idle_timeout`: half of it, within 50 ms and 1 s.
fn sweep_period(idle_timeout: Duration) -> Duration {
    (idle_timeout / 2).clamp(SWEEP_MIN, SWEEP_MAX)
}

/// The hash key of a client for the pool's `hash_key`, made as the HTTP proxy makes it (the IP's
/// octets, then the port big-endian for `source_ip_port`) from the canonical address, so that an IPv4
/// client hashes alike on an IPv4 and on a dual-stack socket. `None` for the keys UDP has not (URI,
/// header, cookie): the pool's fallback algorithm picks.
fn flow_key(key: &HashKey, client: SocketAddr) -> Option<u64> {
    let canonical = SocketAddr::new(client.ip().to_canonical(), client.port());
    match key {
        HashKey::SourceIp => Some(address_key(canonical, false)),
        HashKey::SourceIpPort => Some(address_key(canonical, true)),
        HashKey::Uri | HashKey::Header(_) | HashKey::Cookie(_) => None,
    }
}

/// What a flow's reply task shares with the listener task.
#[derive(Debug)]
struct Activity {
    /// When the last datagram went either way ([`crate::clock::now_ms`]).
    last_ms: AtomicU64,
    /// The reply task has ended (its server socket failed).
    closed: AtomicBool,
    /// Payload bytes from the client and to it (for the access log).
    bytes: [AtomicU64; 2],
}

/// What the access log's line of a flow needs, kept while the flow lives (only when it is logged).
struct FlowLog {
    log: Arc<AccessLog>,
    record: Record,
    started: std::time::Instant,
}

/// One client's flow: its server, the socket connected to it, and the task relaying its answers.
struct Flow {
    upstream: Arc<UdpSocket>,
    activity: Arc<Activity>,
    reply: AbortHandle,
    /// Counts the flow on its server; holds the server.
    in_flight: InFlight,
    /// The access log line written when the flow ends.
    log: Option<Box<FlowLog>>,
    /// Why the flow ends (set by whoever ends it).
    end: Termination,
}

impl Flow {
    /// True while the flow may carry the client's next datagram.
    #[inline]
    fn usable(&self) -> bool {
        let server = self.in_flight.server();
        server.is_available()
            && !server.is_retired()
            && !self.activity.closed.load(Ordering::Relaxed)
    }

    /// Sends a client's datagram to the flow's server without waiting.
    ///
    /// The send is a plain non-blocking `send(2)` on the socket (`SockRef`), not tokio's `try_send`:
    /// tokio answers `WouldBlock` without trying until its reactor has seen the socket writable, which
    /// for a socket opened a moment ago (every flow's first datagram) it has not yet. A UDP send never
    /// waits for the peer, and a full send buffer drops the datagram either way.
    #[inline]
    fn send(&self, datagram: &[u8], now: u64, stats: &UdpStats) {
        self.activity.last_ms.store(now, Ordering::Relaxed);
        let socket = SockRef::from(&*self.upstream);
        let sent = match socket.send(datagram) {
            Ok(_) => true,
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                // An earlier datagram met "port unreachable"; the error is reported (and cleared) now.
                self.in_flight.server().stats.record_failure();
                socket.send(datagram).is_ok()
            }
            Err(_) => false,
        };
        if sent {
            self.activity.bytes[0].fetch_add(datagram.len() as u64, Ordering::Relaxed);
            self.in_flight
                .server()
                .stats
                .record_l4(TO_SERVER, datagram.len(), true);
        } else {
            stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Flow {
    fn drop(&mut self) {
        // The task holds the other reference to the server socket: aborting it closes the socket.
        self.reply.abort();
        if let Some(mut log) = self.log.take() {
            log.record.bytes_in = self.activity.bytes[0].load(Ordering::Relaxed);
            log.record.bytes_out = self.activity.bytes[1].load(Ordering::Relaxed);
            log.record.request_time = log.started.elapsed();
            log.record.termination = if self.activity.closed.load(Ordering::Relaxed) {
                Termination::ServerAbort
            } else {
                self.end
            };
            log.log.log(log.record);
        }
    }
}

/// A listener socket's flows, owned by its [`serve`] task.
struct Table {
    proxy: Arc<UdpProxy>,
    socket: Arc<UdpSocket>,
    flows: HashMap<SocketAddr, Flow>,
}

impl Table {
    /// Forwards a client's datagram: on its flow, or on a new one.
    #[inline]
    fn forward(&mut self, client: SocketAddr, datagram: &[u8], now: u64) {
        let stats = &*self.proxy.stats;
        stats.datagrams_in.fetch_add(1, Ordering::Relaxed);
        stats
            .bytes_in
            .fetch_add(datagram.len() as u64, Ordering::Relaxed);
        if let Some(flow) = self.flows.get(&client) {
            if flow.usable() {
                flow.send(datagram, now, stats);
                return;
            }
        }
        self.forward_new(client, datagram, now);
    }

    /// The slow path of [`Table::forward`]: the client has no usable flow. An unusable one (its server
    /// is unavailable, or its socket failed) ends and the datagram opens a new flow in its place.
    #[cold]
    fn forward_new(&mut self, client: SocketAddr, datagram: &[u8], now: u64) {
        let stats = self.proxy.stats.clone();
        let replaced = match self.flows.remove(&client) {
            Some(mut old) => {
                // Its server can no longer take traffic.
                old.end = Termination::ServerAbort;
                true
            }
            None => false,
        };
        if replaced {
            stats.flows_active.fetch_sub(1, Ordering::Relaxed);
        }
        if self.flows.len() >= self.proxy.settings.load().max_flows {
            stats.flows_refused.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let Some(flow) = self.open(client, now) else {
            stats.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        stats.flows_total.fetch_add(1, Ordering::Relaxed);
        stats.flows_active.fetch_add(1, Ordering::Relaxed);
        if replaced {
            stats.flows_moved.fetch_add(1, Ordering::Relaxed);
        }
        flow.send(datagram, now, &stats);
        self.flows.insert(client, flow);
    }

    /// Opens a flow for `client`: picks a server, connects a socket to it, starts the reply task.
    /// `None` when no server is available or the socket cannot be opened.
    fn open(&self, client: SocketAddr, now: u64) -> Option<Flow> {
        let pool = self.proxy.pool.load();
        let snapshot = pool.snapshot();
        let key = snapshot
            .settings
            .hash_key
            .as_ref()
            .and_then(|k| flow_key(k, client));
        let mut candidates = snapshot.pick(key);
        let server = snapshot.next_available(&mut candidates)?.clone();
        let upstream = match connect(server.address) {
            Ok(socket) => Arc::new(socket),
            Err(e) => {
                tracing::debug!(listener = %self.proxy.name, server = %server.name, error = %e,
                    "cannot open a UDP socket to the server");
                return None;
            }
        };
        let activity = Arc::new(Activity {
            last_ms: AtomicU64::new(now),
            closed: AtomicBool::new(false),
            bytes: Default::default(),
        });
        let log = self
            .proxy
            .access_log
            .load_full()
            .filter(|log| log.sampled())
            .map(|log| {
                let mut record =
                    Record::new(Kind::Udp, client, Arc::from(self.proxy.name.as_str()));
                record.pool = Some(Arc::from(pool.name.as_str()));
                record.server = Some(Arc::from(server.name.as_str()));
                Box::new(FlowLog {
                    log,
                    record,
                    started: std::time::Instant::now(),
                })
            });
        let reply = tokio::spawn(reply(
            upstream.clone(),
            self.socket.clone(),
            client,
            activity.clone(),
            server.clone(),
            self.proxy.stats.clone(),
        ))
        .abort_handle();
        server
            .stats
            .sessions
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Some(Flow {
            upstream,
            activity,
            reply,
            in_flight: InFlight::start(server),
            log,
            end: Termination::Cut,
        })
    }

    /// Ends the flows idle for `idle_timeout` and those whose reply task ended.
    fn sweep(&mut self, now: u64) {
        let idle_ms = self.proxy.settings.load().idle_timeout.as_millis() as u64;
        let before = self.flows.len();
        let mut expired = 0u64;
        self.flows.retain(|_, flow| {
            if flow.activity.closed.load(Ordering::Relaxed) {
                return false;
            }
            let idle = now.saturating_sub(flow.activity.last_ms.load(Ordering::Relaxed)) >= idle_ms;
            expired += u64::from(idle);
            if idle {
                flow.end = Termination::Idle;
            }
            !idle
        });
        let ended = before - self.flows.len();
        let stats = &self.proxy.stats;
        stats.flows_expired.fetch_add(expired, Ordering::Relaxed);
        stats
            .flows_active
            .fetch_sub(ended as i64, Ordering::Relaxed);
        // Give back the memory of a burst of flows once it has passed.
        if self.flows.capacity() > 1024 && self.flows.len() < self.flows.capacity() / 4 {
            self.flows.shrink_to(self.flows.len() * 2);
        }
    }
}

/// A non-blocking UDP socket bound to an ephemeral port of `server`'s family and connected to it.
fn connect(server: SocketAddr) -> io::Result<UdpSocket> {
    let local = match server {
        SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    };
    let socket = std::net::UdpSocket::bind(local)?;
    socket.connect(server)?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket)
}

thread_local! {
    /// The reply tasks' receive buffer, one per worker thread: a task fills it and empties it without
    /// yielding, so one buffer serves every flow the thread runs.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; MAX_DATAGRAM].into_boxed_slice());
}

/// What one readable server socket gave.
enum Relayed {
    /// An answer of this many bytes went to the client.
    Sent(usize),
    /// An answer the listener socket could not take now, to send with waiting.
    Later(Vec<u8>),
    /// Nothing to read (the readiness was stale).
    Nothing,
    /// The server answered "port unreachable".
    Refused,
    /// An answer that could not be sent to the client.
    Dropped,
    /// The server socket failed.
    Failed(io::Error),
}

/// Receives one answer from the server socket into `buf` and sends it to the client, without waiting.
fn relay(
    upstream: &UdpSocket,
    listener: &UdpSocket,
    client: SocketAddr,
    buf: &mut [u8],
) -> Relayed {
    let n = match upstream.try_recv(buf) {
        Ok(n) => n,
        Err(e) => {
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Relayed::Nothing,
                io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionReset => {
                    Relayed::Refused
                }
                _ => Relayed::Failed(e),
            }
        }
    };
    match listener.try_send_to(&buf[..n], client) {
        Ok(_) => Relayed::Sent(n),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Relayed::Later(buf[..n].to_vec()),
        Err(_) => Relayed::Dropped,
    }
}

/// A flow's reply task: relays the server's answers to the client until the flow ends (the task is
/// aborted) or the server socket fails (then it marks the flow closed). ICMP errors from the server
/// ("port unreachable") count as failures on the server and the flow goes on: the server may come back.
async fn reply(
    upstream: Arc<UdpSocket>,
    listener: Arc<UdpSocket>,
    client: SocketAddr,
    activity: Arc<Activity>,
    server: Arc<Server>,
    stats: Arc<UdpStats>,
) {
    let sent = |n: usize| {
        activity.last_ms.store(now_ms(), Ordering::Relaxed);
        activity.bytes[1].fetch_add(n as u64, Ordering::Relaxed);
        server.stats.record_l4(FROM_SERVER, n, true);
        stats.datagrams_out.fetch_add(1, Ordering::Relaxed);
        stats.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
    };
    loop {
        let ready = match upstream.ready(Interest::READABLE | Interest::ERROR).await {
            Ok(ready) => ready,
            Err(e) => {
                tracing::debug!(server = %server.name, error = %e, "UDP server socket failed");
                break;
            }
        };
        if ready.is_error() {
            // An ICMP error (port or host unreachable) is pending on the socket: epoll reports it as
            // an error, not as readable. Taking it clears it; the `WouldBlock` after it clears tokio's
            // error readiness.
            while let Ok(e) = upstream.try_io(Interest::ERROR, || {
                upstream
                    .take_error()?
                    .ok_or_else(|| io::ErrorKind::WouldBlock.into())
            }) {
                tracing::trace!(server = %server.name, error = %e, "UDP server refused");
                server.stats.record_failure();
            }
        }
        if !ready.is_readable() {
            continue;
        }
        match SCRATCH.with_borrow_mut(|buf| relay(&upstream, &listener, client, buf)) {
            Relayed::Sent(n) => sent(n),
            Relayed::Later(answer) => match listener.send_to(&answer, client).await {
                Ok(_) => sent(answer.len()),
                Err(_) => {
                    stats.dropped.fetch_add(1, Ordering::Relaxed);
                }
            },
            Relayed::Nothing => {}
            Relayed::Refused => server.stats.record_failure(),
            Relayed::Dropped => {
                stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
            Relayed::Failed(e) => {
                tracing::debug!(server = %server.name, error = %e, "UDP server socket failed");
                break;
            }
        }
    }
    activity.closed.store(true, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::hash_key;

    #[test]
    fn keys_are_made_from_the_canonical_client_address() {
        let v4: SocketAddr = "10.1.2.3:5000".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:10.1.2.3]:5000".parse().unwrap();
        let other_port: SocketAddr = "10.1.2.3:5001".parse().unwrap();
        let ip = flow_key(&HashKey::SourceIp, v4).unwrap();
        assert_eq!(ip, hash_key(&[10, 1, 2, 3]), "the HTTP proxy's key");
        assert_eq!(flow_key(&HashKey::SourceIp, mapped), Some(ip));
        assert_eq!(flow_key(&HashKey::SourceIp, other_port), Some(ip));
        let ip_port = flow_key(&HashKey::SourceIpPort, v4).unwrap();
        assert_eq!(ip_port, hash_key(&[10, 1, 2, 3, 0x13, 0x88]));
        assert_eq!(flow_key(&HashKey::SourceIpPort, mapped), Some(ip_port));
        assert_ne!(flow_key(&HashKey::SourceIpPort, other_port), Some(ip_port));
        let v6: SocketAddr = "[2001:db8::1]:53".parse().unwrap();
        let mut bytes = [0u8; 18];
        bytes[..16].copy_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        bytes[16..].copy_from_slice(&53u16.to_be_bytes());
        assert_eq!(
            flow_key(&HashKey::SourceIp, v6),
            Some(hash_key(&bytes[..16]))
        );
        assert_eq!(flow_key(&HashKey::SourceIpPort, v6), Some(hash_key(&bytes)));
        assert_eq!(flow_key(&HashKey::Uri, v4), None);
        assert_eq!(flow_key(&HashKey::Cookie("c".into()), v4), None);
    }

    #[test]
    fn sweeps_run_every_half_idle_timeout_within_bounds() {
        assert_eq!(sweep_period(Duration::from_millis(20)), SWEEP_MIN);
        assert_eq!(
            sweep_period(Duration::from_millis(400)),
            Duration::from_millis(200)
        );
        assert_eq!(sweep_period(Duration::from_secs(60)), SWEEP_MAX);
        assert_eq!(sweep_period(Duration::ZERO), SWEEP_MIN);
    }
}

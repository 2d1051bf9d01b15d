//! Binary takeover: listening sockets handed over a Unix socket.

use std::io::{IoSlice, Read, Write};
use std::mem::MaybeUninit;
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fulcrum::takeover::{receive, Handoff, Kind, Offer};
use socket2::{Domain, Protocol, Socket, Type};

const LOCALHOST: &str = "127.0.0.1:0";

/// A listening SO_REUSEPORT TCP socket on `addr`.
fn reuseport_listener(addr: SocketAddr) -> TcpListener {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
    socket.set_reuse_address(true).unwrap();
    socket.set_reuse_port(true).unwrap();
    socket.bind(&addr.into()).unwrap();
    socket.listen(128).unwrap();
    socket.into()
}

/// An offer closure over dups of `sockets`, dup'd afresh per request.
fn offer_of(sockets: Vec<(String, Kind, OwnedFd)>) -> impl Fn() -> Offer + Send + 'static {
    move || {
        sockets
            .iter()
            .map(|(name, kind, fd)| (name.clone(), *kind, fd.try_clone().unwrap()))
            .collect()
    }
}

fn dup(fd: impl AsFd) -> OwnedFd {
    fd.as_fd().try_clone_to_owned().unwrap()
}

fn ready_counter() -> (
    Arc<AtomicUsize>,
    impl FnOnce() + Send + 'static,
    mpsc::Receiver<()>,
) {
    let count = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = mpsc::channel();
    let c = Arc::clone(&count);
    (
        count,
        move || {
            c.fetch_add(1, Ordering::SeqCst);
            let _ = tx.send(());
        },
        rx,
    )
}

/// Accepts `n` connections from any of `listeners` within a few seconds.
fn accept_n(listeners: &[TcpListener], n: usize) -> Vec<TcpStream> {
    for l in listeners {
        l.set_nonblocking(true).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut accepted = Vec::new();
    while accepted.len() < n {
        assert!(
            Instant::now() < deadline,
            "accepted {} of {n} connections",
            accepted.len()
        );
        let mut any = false;
        for l in listeners {
            match l.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    accepted.push(s);
                    any = true;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("accept: {e}"),
            }
        }
        if !any {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    accepted
}

#[test]
fn queued_connections_survive_the_handoff() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("takeover.sock");

    // The old process: two SO_REUSEPORT listeners on one port, and a UDP socket.
    let l1 = reuseport_listener(LOCALHOST.parse().unwrap());
    let addr = l1.local_addr().unwrap();
    let l2 = reuseport_listener(addr);
    let udp = UdpSocket::bind(LOCALHOST).unwrap();
    let udp_addr = udp.local_addr().unwrap();

    // Connections the old process never accepts: they sit in the accept
    // queues of l1 and l2 (spread by the reuseport hash).
    const QUEUED: usize = 16;
    let mut clients: Vec<TcpStream> = (0..QUEUED)
        .map(|i| {
            let mut c = TcpStream::connect(addr).unwrap();
            c.write_all(format!("hello {i}\n").as_bytes()).unwrap();
            c
        })
        .collect();
    let sender = UdpSocket::bind(LOCALHOST).unwrap();
    sender.send_to(b"queued datagram", udp_addr).unwrap();

    let offer = offer_of(vec![
        ("web".into(), Kind::Tcp, dup(&l1)),
        ("web".into(), Kind::Tcp, dup(&l2)),
        ("dns".into(), Kind::Udp, dup(&udp)),
    ]);
    let (count, on_ready, ready_rx) = ready_counter();
    let handoff = Handoff::serve(&path, offer, on_ready).unwrap();

    // The new process.
    let (mut inherited, ready) = receive(&path, Duration::from_secs(5)).unwrap();
    assert_eq!(inherited.len(), 3);
    ready.confirm().unwrap();
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("on_ready after confirm");
    assert_eq!(count.load(Ordering::SeqCst), 1);

    // The old process closes every descriptor it had.
    drop(handoff);
    drop((l1, l2, udp));
    assert!(!path.exists(), "socket file removed on drop");

    let web = inherited
        .take_tcp("web", addr)
        .expect("web listeners inherited");
    assert_eq!(web.len(), 2);
    for l in &web {
        assert_eq!(l.local_addr().unwrap(), addr);
        // The same kernel sockets: options such as SO_REUSEPORT come along.
        assert!(socket2::SockRef::from(l).reuse_port().unwrap());
    }
    assert!(inherited.take_tcp("web", addr).is_none(), "taken once");
    let other: SocketAddr = "127.0.0.1:1".parse().unwrap();
    assert!(
        inherited.take_udp("dns", other).is_none(),
        "address must match"
    );
    let dns = inherited
        .take_udp("dns", udp_addr)
        .expect("dns socket inherited");
    assert_eq!(dns.len(), 1);
    assert!(inherited.is_empty());

    // Every queued connection is accepted through the inherited listeners,
    // none reset; and new ones too.
    clients.push(TcpStream::connect(addr).unwrap());
    clients
        .last_mut()
        .unwrap()
        .write_all(b"hello new\n")
        .unwrap();
    let mut greetings: Vec<String> = accept_n(&web, QUEUED + 1)
        .into_iter()
        .map(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = [0u8; 64];
            let n = s.read(&mut buf).unwrap();
            s.write_all(b"bye\n").unwrap();
            String::from_utf8_lossy(&buf[..n]).into_owned()
        })
        .collect();
    greetings.sort();
    let mut want: Vec<String> = (0..QUEUED).map(|i| format!("hello {i}\n")).collect();
    want.push("hello new\n".into());
    want.sort();
    assert_eq!(greetings, want);
    for mut c in clients {
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 4];
        c.read_exact(&mut buf).expect("client served, not reset");
        assert_eq!(&buf, b"bye\n");
    }

    // The datagram queued before the handoff is there too.
    dns[0]
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 64];
    let (n, _) = dns[0].recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"queued datagram");
}

/// The control experiment, i.e. why the sockets are handed over rather than
/// bound anew with SO_REUSEPORT: closing a listener resets the connections
/// queued on it (with net.ipv4.tcp_migrate_req = 0, the default).
#[test]
fn closing_a_listener_resets_its_queued_connections() {
    let l = reuseport_listener(LOCALHOST.parse().unwrap());
    let addr = l.local_addr().unwrap();
    let migrate = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_migrate_req").unwrap_or_default();
    if migrate.trim() == "1" {
        return; // the kernel would migrate them to a sibling listener
    }
    let mut c = TcpStream::connect(addr).unwrap();
    c.write_all(b"hello\n").unwrap();
    let successor = reuseport_listener(addr); // SO_REUSEPORT overlap
    drop(l);
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 1];
    let err = c.read(&mut buf).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    drop(successor);
}

#[test]
fn on_ready_fires_only_after_confirm() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("takeover.sock");
    let l = TcpListener::bind(LOCALHOST).unwrap();
    let (count, on_ready, ready_rx) = ready_counter();
    let _handoff = Handoff::serve(
        &path,
        offer_of(vec![("web".into(), Kind::Tcp, dup(&l))]),
        on_ready,
    )
    .unwrap();

    let (inherited, ready) = receive(&path, Duration::from_secs(5)).unwrap();
    assert_eq!(inherited.tcp["web"].len(), 1);
    assert!(
        ready_rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "not before confirm"
    );
    assert_eq!(count.load(Ordering::SeqCst), 0);
    ready.confirm().unwrap();
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("on_ready after confirm");

    // A second takeover still gets the sockets, but on_ready fires once.
    let (inherited, ready) = receive(&path, Duration::from_secs(5)).unwrap();
    assert_eq!(inherited.len(), 1);
    ready.confirm().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(count.load(Ordering::SeqCst), 1);
}

#[test]
fn peer_closing_without_confirming_leaves_on_ready_uncalled() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("takeover.sock");
    let l = TcpListener::bind(LOCALHOST).unwrap();
    let (count, on_ready, ready_rx) = ready_counter();
    let handoff = Handoff::serve(
        &path,
        offer_of(vec![("web".into(), Kind::Tcp, dup(&l))]),
        on_ready,
    )
    .unwrap();

    // A new process that fails: it gets the sockets and dies.
    let (inherited, ready) = receive(&path, Duration::from_secs(5)).unwrap();
    drop(inherited);
    drop(ready);
    // A peer that answers something else.
    let mut garbage = UnixStream::connect(&path).unwrap();
    garbage.write_all(b"nope\n").unwrap();
    drop(garbage);
    assert!(ready_rx.recv_timeout(Duration::from_millis(300)).is_err());
    assert_eq!(count.load(Ordering::SeqCst), 0);

    // The old process carries on: its listener works, and a later takeover succeeds.
    let addr = l.local_addr().unwrap();
    let _c = TcpStream::connect(addr).unwrap();
    l.accept().unwrap();
    let (_inherited, ready) = receive(&path, Duration::from_secs(5)).unwrap();
    ready.confirm().unwrap();
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("on_ready after confirm");
    drop(handoff);
    assert_eq!(count.load(Ordering::SeqCst), 1);
}

#[test]
fn receiving_where_nothing_serves_fails_quickly() {
    let dir = tempfile::tempdir().unwrap();
    let timeout = Duration::from_secs(10);

    // No file at all.
    let start = Instant::now();
    let err = receive(&dir.path().join("absent.sock"), timeout).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound, "{err}");

    // A stale socket file nobody listens on.
    let stale = dir.path().join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let err = receive(&stale, timeout).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    assert!(start.elapsed() < Duration::from_secs(2));

    // Something listens but never answers: the timeout applies.
    let mute = dir.path().join("mute.sock");
    let _listener = UnixListener::bind(&mute).unwrap();
    let start = Instant::now();
    let err = receive(&mute, Duration::from_millis(300)).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
    assert!(start.elapsed() < Duration::from_secs(2));

    // A stuck listener whose backlog is full: connect itself must not hang.
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let full = dir.path().join("full.sock");
    let addr = SocketAddrUnix::new(&full).unwrap();
    let unix_socket = |flags| {
        rustix::net::socket_with(AddressFamily::UNIX, SocketType::STREAM, flags, None).unwrap()
    };
    let listener = unix_socket(SocketFlags::CLOEXEC);
    rustix::net::bind(&listener, &addr).unwrap();
    rustix::net::listen(&listener, 0).unwrap();
    let mut queued = Vec::new();
    loop {
        let c = unix_socket(SocketFlags::CLOEXEC | SocketFlags::NONBLOCK);
        if rustix::net::connect(&c, &addr).is_err() {
            break;
        }
        queued.push(c);
        assert!(queued.len() < 1000, "backlog never filled");
    }
    let start = Instant::now();
    let err = receive(&full, Duration::from_millis(300)).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
    assert!(start.elapsed() < Duration::from_secs(2));
}

#[test]
fn stale_socket_is_replaced_and_only_our_own_file_removed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("takeover.sock");
    drop(UnixListener::bind(&path).unwrap()); // stale

    let udp = UdpSocket::bind(LOCALHOST).unwrap();
    let old = Handoff::serve(
        &path,
        offer_of(vec![("dns".into(), Kind::Udp, dup(&udp))]),
        || {},
    )
    .unwrap();
    // The successor serves the same path while the old one still runs.
    let new = Handoff::serve(&path, offer_of(vec![]), || {}).unwrap();
    let start = Instant::now();
    drop(old);
    assert!(start.elapsed() < Duration::from_secs(2), "drop is prompt");
    assert!(path.exists(), "the successor's socket file stays");
    let (inherited, _ready) = receive(&path, Duration::from_secs(5)).unwrap();
    assert!(inherited.is_empty(), "served by the successor");
    drop(new);
    assert!(!path.exists());

    // Not a socket: refused, left alone.
    std::fs::write(&path, b"data").unwrap();
    let err = Handoff::serve(&path, offer_of(vec![]), || {}).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists);
    assert!(path.exists());
}

#[test]
fn more_descriptors_than_one_message_carries() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("takeover.sock");
    let udp = UdpSocket::bind(LOCALHOST).unwrap();
    let addr = udp.local_addr().unwrap();
    let l = TcpListener::bind(LOCALHOST).unwrap();
    let mut sockets: Vec<(String, Kind, OwnedFd)> = (0..450)
        .map(|i| (format!("u{}", i % 3), Kind::Udp, dup(&udp)))
        .collect();
    sockets.push(("web".into(), Kind::Tcp, dup(&l)));
    let _handoff = Handoff::serve(&path, offer_of(sockets), || {}).unwrap();

    let (mut inherited, _ready) = receive(&path, Duration::from_secs(5)).unwrap();
    assert_eq!(inherited.len(), 451);
    for name in ["u0", "u1", "u2"] {
        assert_eq!(inherited.take_udp(name, addr).unwrap().len(), 150);
    }
    assert_eq!(
        inherited
            .take_tcp("web", l.local_addr().unwrap())
            .unwrap()
            .len(),
        1
    );
    assert!(inherited.is_empty());
}

/// A fake old process sending `head`, then `fds` with the given chunk marker.
fn fake_server(
    path: &Path,
    head: Vec<u8>,
    marker: u32,
    fds: Vec<OwnedFd>,
) -> std::thread::JoinHandle<()> {
    let listener = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        // The receiver may hang up early (it rejects the manifest): ignore errors.
        if s.write_all(&head).is_ok() && !fds.is_empty() {
            let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
            let mut space =
                vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(borrowed.len()))];
            let mut control = rustix::net::SendAncillaryBuffer::new(&mut space);
            assert!(control.push(rustix::net::SendAncillaryMessage::ScmRights(&borrowed)));
            let flags = rustix::net::SendFlags::NOSIGNAL;
            let _ = rustix::net::sendmsg(
                &s,
                &[IoSlice::new(&marker.to_be_bytes())],
                &mut control,
                flags,
            );
        }
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    })
}

fn wire(version: u8, entries: &[(u8, u32, &[u8])], total: u32) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(entries.len() as u32).to_be_bytes());
    body.extend_from_slice(&total.to_be_bytes());
    for (kind, count, name) in entries {
        body.push(*kind);
        body.extend_from_slice(&count.to_be_bytes());
        body.extend_from_slice(&(name.len() as u16).to_be_bytes());
        body.extend_from_slice(name);
    }
    let mut head = b"FLTO".to_vec();
    head.push(version);
    head.extend_from_slice(&(body.len() as u32).to_be_bytes());
    head.extend_from_slice(&body);
    head
}

#[test]
fn malformed_handoffs_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let udp = UdpSocket::bind(LOCALHOST).unwrap();
    let l = TcpListener::bind(LOCALHOST).unwrap();
    // (what, bytes before the descriptors, chunk marker, descriptors, error mentions)
    type Case = (&'static str, Vec<u8>, u32, Vec<OwnedFd>, &'static str);
    let cases: Vec<Case> = vec![
        ("magic", b"HTTP/1.1 200 OK\r\n".to_vec(), 0, vec![], "magic"),
        ("version", wire(9, &[], 0), 0, vec![], "version"),
        (
            "kind",
            wire(1, &[(7, 1, b"web")], 1),
            1,
            vec![dup(&l)],
            "kind",
        ),
        (
            "utf8",
            wire(1, &[(0, 1, b"\xff\xfe")], 1),
            1,
            vec![dup(&l)],
            "UTF-8",
        ),
        (
            "sum",
            wire(1, &[(0, 2, b"web")], 1),
            1,
            vec![dup(&l)],
            "announced",
        ),
        (
            "fewer fds",
            wire(1, &[(0, 2, b"web")], 2),
            2,
            vec![dup(&l)],
            "received 1",
        ),
        (
            "wrong kind",
            wire(1, &[(0, 1, b"web")], 1),
            1,
            vec![dup(&udp)],
            "stream",
        ),
        (
            "not listening",
            wire(1, &[(0, 1, b"web")], 1),
            1,
            vec![dup(TcpStream::connect(l.local_addr().unwrap()).unwrap())],
            "listening",
        ),
    ];
    for (i, (what, head, marker, fds, needle)) in cases.into_iter().enumerate() {
        let path = dir.path().join(format!("{i}.sock"));
        let server = fake_server(&path, head, marker, fds);
        let err = receive(&path, Duration::from_secs(2)).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "{what}: {err}");
        assert!(err.to_string().contains(needle), "{what}: {err}");
        server.join().unwrap();
    }
}

//! L4 listeners against real sockets on 127.0.0.x: TCP relaying (a gibibyte intact, half-close, a
//! thousand connections, retries, limits, draining), the PROXY protocol both ways, SNI routing of TLS
//! passthrough to real TLS servers, and UDP flows through a configured listener.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::tls::Ca;
use common::*;
use fulcrum::runtime::Running;
use fulcrum_app::{AppConfig, TlsFiles};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

/// A TCP echo server; every accepted connection is echoed until the client half-closes, then closed.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// A server that reads what a connection sends until its half-close, then answers how many bytes it
/// got and which PROXY header (if any) came first, then closes.
async fn counting_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut all = Vec::new();
                let _ = s.read_to_end(&mut all).await;
                let (source, rest) = match proxy_header::ProxyHeader::parse(
                    &all,
                    proxy_header::ParseConfig::default(),
                ) {
                    Ok((header, used)) => (
                        header
                            .proxied_address()
                            .map(|a| a.source.to_string())
                            .unwrap_or_else(|| "local".into()),
                        all.len() - used,
                    ),
                    Err(_) => ("none".into(), all.len()),
                };
                let answer = format!("source={source} bytes={rest}");
                let _ = s.write_all(answer.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

/// A config with one `tcp` listener `edge` over `servers`; extras appended to the listener and pool.
fn tcp_config(servers: &[SocketAddr], listener_extra: &str, pool_extra: &str) -> String {
    let list: Vec<String> = servers
        .iter()
        .enumerate()
        .map(|(i, a)| format!("{{ name = \"S{i}\", address = \"{a}\" }}"))
        .collect();
    format!(
        "shutdown_timeout = \"2s\"\n[admin]\nbind = \"127.0.0.1:0\"\n\n\
         [[listeners]]\nname = \"edge\"\nbind = \"127.0.0.1:0\"\nprotocol = \"tcp\"\npool = \"p\"\n{listener_extra}\n\n\
         [[pools]]\nname = \"p\"\nservers = [{}]\n{pool_extra}\n",
        list.join(", ")
    )
}

fn edge(lb: &Running) -> SocketAddr {
    lb.listener_addr("edge").expect("listener edge")
}

fn tcp_stats(lb: &Running) -> std::sync::Arc<fulcrum::l4::tcp::TcpStats> {
    match &lb.shared().state().listeners[0].handler {
        fulcrum::runtime::Handler::Tcp(t) => t.tcp.clone(),
        _ => panic!("not a tcp listener"),
    }
}

/// Sends `msg`, half-closes, reads everything back.
async fn exchange(addr: SocketAddr, msg: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(msg).await.unwrap();
    s.shutdown().await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("answer in time")
        .unwrap();
    out
}

/// A server's last bytes and its close reach the client in one segment: the client receives the
/// SYN-ACK, the ACK of its request (a TCP listener keeps the kernel's quick ACKs) and that one
/// segment, where it used to receive the bytes and a FIN apart. The relay merges them when the
/// reactor has seen the FIN by the time it reads the bytes, so one connection of twenty showing
/// three is the proof; none may show more than four.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_servers_last_bytes_and_close_reach_the_client_in_one_segment() {
    let server = raw_server(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", true).await;
    let lb = fulcrum(&tcp_config(&[server.addr], "", ""));
    let mut counts = Vec::new();
    for _ in 0..20 {
        let (answer, segments) =
            exchange_counting_segments(edge(&lb), b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").await;
        assert_eq!(answer, b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
        counts.push(segments);
    }
    assert!(
        counts.iter().all(|&n| n <= 4),
        "segments received: {counts:?}"
    );
    assert!(counts.contains(&3), "segments received: {counts:?}");
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gibibyte_passes_intact_both_ways() {
    let echo = echo_server().await;
    let lb = fulcrum(&tcp_config(&[echo], "", ""));
    let s = TcpStream::connect(edge(&lb)).await.unwrap();
    let (mut r, mut w) = s.into_split();
    const TOTAL: usize = 1 << 30;
    let writer = tokio::spawn(async move {
        let mut hash = Sha256::new();
        let mut chunk = vec![0u8; 256 * 1024];
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut sent = 0;
        while sent < TOTAL {
            for b in chunk.chunks_mut(8) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                b.copy_from_slice(&state.to_le_bytes()[..b.len()]);
            }
            hash.update(&chunk);
            w.write_all(&chunk).await.unwrap();
            sent += chunk.len();
        }
        w.shutdown().await.unwrap();
        hash.finalize()
    });
    let reader = tokio::spawn(async move {
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut got = 0;
        loop {
            let n = r.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
            got += n;
        }
        (got, hash.finalize())
    });
    let started = Instant::now();
    let (sent_hash, (got, got_hash)) = tokio::time::timeout(Duration::from_secs(300), async {
        (writer.await.unwrap(), reader.await.unwrap())
    })
    .await
    .expect("a gibibyte within 5 minutes");
    eprintln!("1 GiB echoed through fulcrum in {:?}", started.elapsed());
    assert_eq!(got, TOTAL);
    assert_eq!(sent_hash, got_hash, "the bytes changed on the way");
    let stats = tcp_stats(&lb);
    assert_eq!(
        stats.bytes_in.load(std::sync::atomic::Ordering::Relaxed),
        TOTAL as u64
    );
    assert_eq!(
        stats.bytes_out.load(std::sync::atomic::Ordering::Relaxed),
        TOTAL as u64
    );
    // The same bytes on the server's counters, as the metrics show them.
    let metrics = common::metrics(&lb).await;
    for direction in ["to_server", "from_server"] {
        let line = format!(
            "fulcrum_server_l4_bytes_total{{pool=\"p\",server=\"S0\",direction=\"{direction}\"}} {TOTAL}"
        );
        assert!(metrics.contains(&line), "{line} in\n{metrics}");
    }
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_close_passes_while_the_other_way_flows() {
    let counting = counting_server().await;
    let lb = fulcrum(&tcp_config(&[counting], "", ""));
    // The client sends and closes its side; the server only answers after that FIN reached it.
    let answer = exchange(edge(&lb), &[7u8; 100_000]).await;
    assert_eq!(String::from_utf8_lossy(&answer), "source=none bytes=100000");
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_connections_at_once() {
    let _ = rlimit::increase_nofile_limit(16_384);
    let servers = [echo_server().await, echo_server().await];
    let lb = fulcrum(&tcp_config(
        &servers,
        "",
        "algorithm = \"least_connections\"",
    ));
    let addr = edge(&lb);
    let mut open = Vec::new();
    for _ in 0..1000 {
        open.push(TcpStream::connect(addr).await.unwrap());
    }
    let mut tasks = Vec::new();
    for (i, mut s) in open.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let msg = format!("connection {i}");
            s.write_all(msg.as_bytes()).await.unwrap();
            let mut buf = vec![0u8; msg.len()];
            tokio::time::timeout(Duration::from_secs(30), s.read_exact(&mut buf))
                .await
                .expect("echo in time")
                .unwrap();
            assert_eq!(buf, msg.as_bytes());
            s
        }));
    }
    let mut held = Vec::new();
    for t in tasks {
        held.push(t.await.unwrap());
    }
    // Least connections spread the sessions held open over both servers.
    let pool = lb.shared().pool("p").unwrap();
    let active: Vec<i64> = pool
        .snapshot_full()
        .servers
        .iter()
        .map(|s| s.stats.in_flight())
        .collect();
    assert_eq!(active.iter().sum::<i64>(), 1000, "{active:?}");
    assert!(active.iter().all(|&n| n >= 400), "{active:?}");
    drop(held);
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_connect_tries_the_next_server_and_limits_refuse_fast() {
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let echo = echo_server().await;
    let lb = fulcrum(&tcp_config(&[dead, echo], "", "retries = 1"));
    for i in 0..6 {
        let msg = format!("try {i}");
        assert_eq!(exchange(edge(&lb), msg.as_bytes()).await, msg.as_bytes());
    }
    let dead_server = lb.shared().pool("p").unwrap().server("S0").unwrap();
    assert!(dead_server.stats.failures_total() >= 1);
    stop(lb).await;

    // max_connections_per_server = 2: a third session is closed at once and counted.
    let lb = fulcrum(&tcp_config(&[echo], "", "max_connections_per_server = 2"));
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(edge(&lb)).await.unwrap();
        s.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        held.push(s);
    }
    let mut third = TcpStream::connect(edge(&lb)).await.unwrap();
    let mut out = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), third.read_to_end(&mut out)).await;
    assert!(
        matches!(closed, Ok(Ok(0))),
        "the third session was not refused: {closed:?}"
    );
    let refused = tcp_stats(&lb)
        .refused_no_server
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(refused, 1);
    drop(held);
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_server_keeps_its_sessions_and_gets_no_new_ones() {
    let servers = [echo_server().await, echo_server().await];
    let lb = fulcrum(&tcp_config(&servers, "", "algorithm = \"round_robin\""));
    let pool = lb.shared().pool("p").unwrap();
    // One session on each server.
    let mut sessions = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(edge(&lb)).await.unwrap();
        s.write_all(b"hi").await.unwrap();
        let mut b = [0u8; 2];
        s.read_exact(&mut b).await.unwrap();
        sessions.push(s);
    }
    let s0 = pool.server("S0").unwrap();
    assert_eq!(s0.stats.in_flight(), 1);
    s0.set_state(fulcrum::pool::ServerState::Draining);
    // The sessions still flow both ways.
    for s in &mut sessions {
        s.write_all(b"still here").await.unwrap();
        let mut b = [0u8; 10];
        s.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"still here");
    }
    // New sessions all go to S1.
    let before = s0.stats.sessions.load(std::sync::atomic::Ordering::Relaxed);
    for _ in 0..4 {
        assert_eq!(exchange(edge(&lb), b"new").await, b"new");
    }
    assert_eq!(
        s0.stats.sessions.load(std::sync::atomic::Ordering::Relaxed),
        before
    );
    drop(sessions);
    stop(lb).await;
}

/// Connects from `source` (a 127.0.0.x address).
async fn connect_from(source: &str, to: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    socket.connect(to).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_protocol_carries_the_client_address_both_ways() {
    let counting = counting_server().await;
    for version in ["v1", "v2"] {
        let lb = fulcrum(&tcp_config(
            &[counting],
            &format!("proxy_protocol = \"{version}\""),
            "",
        ));
        let mut s = connect_from("127.0.0.7", edge(&lb)).await;
        s.write_all(b"hello").await.unwrap();
        s.shutdown().await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(
            out.starts_with("source=127.0.0.7:") && out.ends_with(" bytes=5"),
            "{version}: {out}"
        );
        stop(lb).await;
    }
    // Behind another balancer: a trusted source's header names the client; fulcrum passes that on.
    let lb = fulcrum(&tcp_config(
        &[counting],
        "proxy_protocol = \"v1\"\naccept_proxy_protocol = [\"127.0.0.1/32\"]",
        "",
    ));
    let client: SocketAddr = "203.0.113.9:4444".parse().unwrap();
    let header =
        fulcrum::l4::proxy_protocol::encode(fulcrum::config::ProxyProtocol::V2, client, edge(&lb));
    let mut s = connect_from("127.0.0.1", edge(&lb)).await;
    s.write_all(&[&header[..], b"payload"].concat())
        .await
        .unwrap();
    s.shutdown().await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert_eq!(out, "source=203.0.113.9:4444 bytes=7");
    // An untrusted source may not claim an address: its connection is refused, and counted.
    let mut s = connect_from("127.0.0.5", edge(&lb)).await;
    s.write_all(&[&header[..], b"payload"].concat())
        .await
        .unwrap();
    let _ = s.shutdown().await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    assert!(out.is_empty(), "{}", String::from_utf8_lossy(&out));
    let refused = tcp_stats(&lb)
        .bad_proxy_header
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(refused, 1);
    // An untrusted source without a header is served as it is.
    let mut s = connect_from("127.0.0.5", edge(&lb)).await;
    s.write_all(b"plain").await.unwrap();
    s.shutdown().await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert_eq!(
        out,
        "source=127.0.0.5:".to_owned() + &out["source=127.0.0.5:".len()..]
    );
    assert!(out.ends_with(" bytes=5"), "{out}");
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_routes_tls_passthrough_to_the_named_servers() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("passthrough CA");
    let (a_cert, a_key) = ca.leaf(&["a.test"]).write(dir.path(), "a");
    let (b_cert, b_key) = ca.leaf(&["*.b.test"]).write(dir.path(), "b");
    let apps = apps_with(vec![
        AppConfig::new("A").with_tls(TlsFiles::new(a_cert, a_key)),
        AppConfig::new("B").with_tls(TlsFiles::new(b_cert, b_key)),
    ])
    .await;
    let text = format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n\n\
         [[listeners]]\nname = \"edge\"\nbind = \"127.0.0.1:0\"\nprotocol = \"tcp\"\npool = \"pa\"\n\
         hello_timeout = \"1s\"\n\n\
           [[listeners.routes]]\n  sni = \"*.b.test\"\n  pool = \"pb\"\n\n\
           [[listeners.routes]]\n  sni = \"a.test\"\n  pool = \"pa\"\n\n\
         [[pools]]\nname = \"pa\"\nservers = [{{ address = \"{}\" }}]\n\n\
         [[pools]]\nname = \"pb\"\nservers = [{{ address = \"{}\" }}]\n",
        apps[0].addr(),
        apps[1].addr()
    );
    let lb = fulcrum(&text);
    let client = common::tls::connector(&[&ca], &[b"h2", b"http/1.1"], None, false);
    for (sni, server) in [("a.test", "A"), ("x.b.test", "B"), ("y.b.test", "B")] {
        // The handshake completes end to end (the client verifies the server's certificate for the
        // name it asked), and the answer names the server.
        let reply = common::tls::get_once(&client, edge(&lb), sni, "/")
            .await
            .unwrap_or_else(|e| panic!("{sni}: {e}"));
        assert_eq!(reply.headers["x-server"], server, "{sni}");
        assert!(reply.body.contains("HTTP/2.0"), "{}", reply.body);
    }
    // Not TLS, and a client that never sends its hello: closed and counted.
    let mut s = TcpStream::connect(edge(&lb)).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: a.test\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    assert!(out.is_empty());
    let mut silent = TcpStream::connect(edge(&lb)).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(10), silent.read_to_end(&mut out)).await;
    assert!(closed.is_ok(), "a silent client kept its connection");
    let until = Instant::now() + Duration::from_secs(10);
    while tcp_stats(&lb)
        .bad_hello
        .load(std::sync::atomic::Ordering::Relaxed)
        < 2
        && Instant::now() < until
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        tcp_stats(&lb)
            .bad_hello
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_udp_listener_keeps_each_client_on_its_server() {
    // Two UDP servers answering "<name>:<payload>".
    let mut servers = Vec::new();
    for name in ["U0", "U1"] {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        servers.push(socket.local_addr().unwrap());
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = socket.recv_from(&mut buf).await {
                let answer = [name.as_bytes(), b":", &buf[..n]].concat();
                let _ = socket.send_to(&answer, from).await;
            }
        });
    }
    let list: Vec<String> = servers
        .iter()
        .map(|a| format!("{{ address = \"{a}\" }}"))
        .collect();
    let text = format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n\n\
         [[listeners]]\nname = \"dns\"\nbind = \"127.0.0.1:0\"\nprotocol = \"udp\"\npool = \"p\"\n\
         idle_timeout = \"30s\"\nmax_flows = 100\n\n\
         [[pools]]\nname = \"p\"\nservers = [{}]\n",
        list.join(", ")
    );
    let lb = fulcrum(&text);
    let addr = lb.listener_addr("dns").unwrap();
    let mut seen = std::collections::HashSet::new();
    for i in 2..8 {
        let client = UdpSocket::bind(format!("127.0.0.{i}:0")).await.unwrap();
        let mut first = None;
        for j in 0..5 {
            client
                .send_to(format!("q{j}").as_bytes(), addr)
                .await
                .unwrap();
            let mut buf = [0u8; 2048];
            let (n, from) =
                tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf))
                    .await
                    .expect("an answer")
                    .unwrap();
            assert_eq!(from, addr, "answers come from the listener's address");
            let answer = String::from_utf8_lossy(&buf[..n]).into_owned();
            let (server, payload) = answer.split_once(':').unwrap();
            assert_eq!(payload, format!("q{j}"));
            match &first {
                None => first = Some(server.to_owned()),
                Some(f) => assert_eq!(f, server, "client {i} moved"),
            }
        }
        seen.insert(first.unwrap());
    }
    assert_eq!(seen.len(), 2, "clients spread over both servers");
    let flows: u64 = lb
        .shared()
        .pool("p")
        .unwrap()
        .snapshot_full()
        .servers
        .iter()
        .map(|s| s.stats.sessions.load(std::sync::atomic::Ordering::Relaxed))
        .sum();
    assert_eq!(
        flows, 6,
        "each client's flow counts as a session on its server"
    );
    let metrics = common::metrics(&lb).await;
    assert!(
        metrics.contains("fulcrum_udp_flows_total{listener=\"dns\"} 6"),
        "{metrics}"
    );
    // Per server: every datagram sent to a server and answered by it, in the metrics (an answer is
    // counted just after it is sent: the count may trail the client for a moment).
    let per_server = |metrics: &str, direction: &str| -> u64 {
        metrics
            .lines()
            .filter(|l| {
                l.starts_with("fulcrum_server_datagrams_total{")
                    && l.contains(&format!("direction=\"{direction}\""))
            })
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    };
    let sent = lb
        .shared()
        .state()
        .listeners
        .iter()
        .find_map(|l| match &l.handler {
            fulcrum::runtime::Handler::Udp(proxy, _) => Some(
                proxy
                    .stats
                    .datagrams_in
                    .load(std::sync::atomic::Ordering::Relaxed),
            ),
            _ => None,
        })
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = common::metrics(&lb).await;
        let counted = (
            per_server(&metrics, "to_server"),
            per_server(&metrics, "from_server"),
        );
        if counted == (sent, sent) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{counted:?} of {sent}: {metrics}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_copies_move_the_same_bytes_and_pass_a_half_close() {
    let echo = echo_server().await;
    let counting = counting_server().await;
    let lb = fulcrum(&tcp_config(&[echo], "splice = false", ""));
    let s = TcpStream::connect(edge(&lb)).await.unwrap();
    let (mut r, mut w) = s.into_split();
    const TOTAL: usize = 64 << 20;
    let data: Vec<u8> = (0..TOTAL).map(|i| (i * 7 + i / 4093) as u8).collect();
    let expected = Sha256::digest(&data);
    let writer = tokio::spawn(async move {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut got = Vec::with_capacity(TOTAL);
    tokio::time::timeout(Duration::from_secs(120), r.read_to_end(&mut got))
        .await
        .expect("echo in time")
        .unwrap();
    writer.await.unwrap();
    assert_eq!(got.len(), TOTAL);
    assert_eq!(Sha256::digest(&got), expected);
    let server = lb.shared().pool("p").unwrap().snapshot_full().servers[0].clone();
    for direction in [fulcrum::pool::TO_SERVER, fulcrum::pool::FROM_SERVER] {
        assert_eq!(
            server.stats.l4_bytes[direction].load(std::sync::atomic::Ordering::Relaxed),
            TOTAL as u64
        );
    }
    stop(lb).await;
    let lb = fulcrum(&tcp_config(&[counting], "splice = false", ""));
    let answer = exchange(edge(&lb), &[7u8; 100_000]).await;
    assert_eq!(String::from_utf8_lossy(&answer), "source=none bytes=100000");
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_session_is_closed_after_the_idle_timeout() {
    let echo = echo_server().await;
    let lb = fulcrum(&tcp_config(&[echo], "idle_timeout = \"1s\"", ""));
    let mut s = TcpStream::connect(edge(&lb)).await.unwrap();
    s.write_all(b"ping").await.unwrap();
    let mut b = [0u8; 4];
    s.read_exact(&mut b).await.unwrap();
    // Silence: closed by fulcrum well within the bound, and counted.
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "an idle session stayed open");
    let until = Instant::now() + Duration::from_secs(10);
    while tcp_stats(&lb)
        .idle_timeouts
        .load(std::sync::atomic::Ordering::Relaxed)
        == 0
        && Instant::now() < until
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        tcp_stats(&lb)
            .idle_timeouts
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    stop(lb).await;
}

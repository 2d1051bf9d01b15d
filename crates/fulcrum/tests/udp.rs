//! The UDP proxy (`fulcrum::l4::udp`) against real UDP echo servers on 127.0.0.1, with clients on
//! several loopback addresses (127.0.0.2 to 127.0.0.9). Real sockets need real time: every wait is
//! bounded and generous, so the tests hold on a loaded two-core machine.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fulcrum::l4::udp::{serve, UdpProxy, UdpSettings};
use fulcrum::pool::{Pool, ServerState, FROM_SERVER, TO_SERVER};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long a client waits for an answer that must come.
const ANSWER: Duration = Duration::from_secs(2);
/// How long a client waits to conclude that no answer comes.
const SILENCE: Duration = Duration::from_millis(300);

/// A UDP echo server that answers every datagram with `<name>:<payload>`.
struct Echo {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Echo {
    async fn start(name: &str) -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let prefix = format!("{name}:").into_bytes();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            let mut answer = Vec::with_capacity(65536);
            loop {
                let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
                    continue;
                };
                answer.clear();
                answer.extend_from_slice(&prefix);
                answer.extend_from_slice(&buf[..n]);
                let _ = socket.send_to(&answer, peer).await;
            }
        });
        Echo { addr, task }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A pool `p` of the echo servers named `names`, with `algorithm`. The configuration needs a
/// listener: an HTTP one, never started.
fn pool(algorithm: &str, servers: &[(&str, &Echo)]) -> Arc<Pool> {
    let list = servers
        .iter()
        .map(|(name, echo)| format!("{{name=\"{name}\", address=\"{}\"}}", echo.addr))
        .collect::<Vec<_>>()
        .join(", ");
    let text = format!(
        "[[listeners]]\nname=\"l\"\nbind=\"127.0.0.1:1\"\nprotocol=\"http\"\npool=\"p\"\n\
         [[pools]]\nname=\"p\"\nalgorithm=\"{algorithm}\"\nservers=[{list}]\n"
    );
    let cfg = fulcrum::config::parse(&text, "test.toml").expect("valid config");
    Arc::new(Pool::new(&cfg.pools[0]))
}

/// A running UDP proxy.
struct Proxy {
    proxy: Arc<UdpProxy>,
    addr: SocketAddr,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Proxy {
    async fn start(pool: Arc<Pool>, idle_timeout: Duration, max_flows: usize) -> Self {
        let proxy = Arc::new(UdpProxy::new(
            "udp-test",
            pool,
            UdpSettings {
                idle_timeout,
                max_flows,
            },
        ));
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve(socket, proxy.clone(), stop.clone()));
        Proxy {
            proxy,
            addr,
            stop,
            task,
        }
    }

    fn stat(&self, pick: impl Fn(&fulcrum::l4::udp::UdpStats) -> u64) -> u64 {
        pick(&self.proxy.stats)
    }

    fn active(&self) -> i64 {
        self.proxy.stats.flows_active.load(Ordering::Relaxed)
    }

    /// Flows counted in flight on the pool's servers.
    fn in_flight(&self) -> i64 {
        self.proxy
            .pool
            .load()
            .snapshot()
            .servers
            .iter()
            .map(|s| s.stats.in_flight())
            .sum()
    }

    /// Stops the proxy and waits for `serve` to return.
    async fn stop(self) -> Arc<UdpProxy> {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("serve returns when stopped")
            .unwrap();
        self.proxy
    }
}

/// A client socket on 127.0.0.`n`, on an ephemeral port.
async fn client(n: u8) -> UdpSocket {
    UdpSocket::bind((Ipv4Addr::new(127, 0, 0, n), 0))
        .await
        .unwrap_or_else(|e| panic!("bind 127.0.0.{n}: {e}"))
}

/// Sends `payload` to `to` and waits up to `wait` for its answer `<server>:<payload>` (answers to
/// anything else are skipped); returns the server's name.
async fn ask(socket: &UdpSocket, to: SocketAddr, payload: &str, wait: Duration) -> Option<String> {
    socket.send_to(payload.as_bytes(), to).await.unwrap();
    let deadline = tokio::time::Instant::now() + wait;
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, from) = tokio::time::timeout_at(deadline, socket.recv_from(&mut buf))
            .await
            .ok()?
            .ok()?;
        assert_eq!(from, to, "answers come from the proxy's address");
        let answer = std::str::from_utf8(&buf[..n]).expect("utf-8 answer");
        if let Some((server, echoed)) = answer.split_once(':') {
            if echoed == payload {
                return Some(server.to_owned());
            }
        }
    }
}

/// Waits (at most 10 s) until `done` holds.
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_client_keeps_its_server_and_clients_spread_over_servers() {
    let (a, b, c) = (
        Echo::start("a").await,
        Echo::start("b").await,
        Echo::start("c").await,
    );
    let pool = pool("round_robin", &[("a", &a), ("b", &b), ("c", &c)]);
    let proxy = Proxy::start(pool, Duration::from_secs(60), 1000).await;
    let mut clients_per_server = std::collections::HashMap::<String, usize>::new();
    for n in 2..=9u8 {
        let socket = client(n).await;
        let mut seen = Vec::new();
        for i in 0..5 {
            let server = ask(&socket, proxy.addr, &format!("client{n}-{i}"), ANSWER)
                .await
                .unwrap_or_else(|| panic!("client {n} datagram {i} answered"));
            seen.push(server);
        }
        assert!(
            seen.iter().all(|s| s == &seen[0]),
            "client {n} stays on one server: {seen:?}"
        );
        *clients_per_server.entry(seen[0].clone()).or_default() += 1;
    }
    // Round robin over new flows: 8 clients over 3 servers, 2 or 3 each.
    assert_eq!(clients_per_server.len(), 3, "{clients_per_server:?}");
    assert!(
        clients_per_server.values().all(|&k| (2..=3).contains(&k)),
        "{clients_per_server:?}"
    );
    assert_eq!(proxy.stat(|s| s.flows_total.load(Ordering::Relaxed)), 8);
    assert_eq!(proxy.active(), 8);
    assert_eq!(proxy.in_flight(), 8, "each flow counts on its server");
    assert_eq!(proxy.stat(|s| s.datagrams_in.load(Ordering::Relaxed)), 40);
    eventually("40 answers counted", || {
        proxy.stat(|s| s.datagrams_out.load(Ordering::Relaxed)) == 40
    })
    .await;
    let bytes_in = proxy.stat(|s| s.bytes_in.load(Ordering::Relaxed));
    assert_eq!(bytes_in, 40 * "client2-0".len() as u64);
    // Each answer carries "x:" in front of the payload.
    assert_eq!(
        proxy.stat(|s| s.bytes_out.load(Ordering::Relaxed)),
        bytes_in + 40 * 2
    );
    assert_eq!(proxy.stat(|s| s.dropped.load(Ordering::Relaxed)), 0);
    // Per server: the datagrams (and bytes) of the clients it kept, both ways.
    let servers = proxy.proxy.pool.load().snapshot().servers.clone();
    for server in &servers {
        let clients = clients_per_server.get(&server.name).copied().unwrap_or(0) as u64;
        let stats = &server.stats;
        assert_eq!(
            stats.datagrams[TO_SERVER].load(Ordering::Relaxed),
            clients * 5,
            "datagrams to {}",
            server.name
        );
        assert_eq!(
            stats.l4_bytes[TO_SERVER].load(Ordering::Relaxed),
            clients * 5 * "client2-0".len() as u64
        );
        eventually("answers counted per server", || {
            stats.datagrams[FROM_SERVER].load(Ordering::Relaxed) == clients * 5
        })
        .await;
        assert_eq!(
            stats.l4_bytes[FROM_SERVER].load(Ordering::Relaxed),
            clients * 5 * "a:client2-0".len() as u64
        );
        assert_eq!(stats.sessions.load(Ordering::Relaxed), clients);
    }
    // Stopping ends every flow.
    let pool_view = proxy.proxy.clone();
    let stopped = proxy.stop().await;
    assert_eq!(stopped.stats.flows_active.load(Ordering::Relaxed), 0);
    let in_flight: i64 = pool_view
        .pool
        .load()
        .snapshot()
        .servers
        .iter()
        .map(|s| s.stats.in_flight())
        .sum();
    assert_eq!(in_flight, 0, "stopped flows release their servers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_flows_expire_and_the_next_datagram_opens_a_new_flow() {
    let (a, b) = (Echo::start("a").await, Echo::start("b").await);
    let pool = pool("round_robin", &[("a", &a), ("b", &b)]);
    let proxy = Proxy::start(pool, Duration::from_millis(200), 1000).await;
    let mut clients = Vec::new();
    for n in 2..=5u8 {
        let socket = client(n).await;
        assert!(ask(&socket, proxy.addr, "hello", ANSWER).await.is_some());
        clients.push(socket);
    }
    assert_eq!(proxy.stat(|s| s.flows_total.load(Ordering::Relaxed)), 4);
    let silent = Instant::now();
    eventually("idle flows expire", || proxy.active() == 0).await;
    assert!(
        silent.elapsed() >= Duration::from_millis(150),
        "flows lived about their idle timeout: {:?}",
        silent.elapsed()
    );
    assert!(proxy.stat(|s| s.flows_expired.load(Ordering::Relaxed)) >= 4);
    assert_eq!(proxy.in_flight(), 0, "expired flows release their servers");
    // The same client again: a new flow.
    assert!(ask(&clients[0], proxy.addr, "again", ANSWER)
        .await
        .is_some());
    assert_eq!(proxy.stat(|s| s.flows_total.load(Ordering::Relaxed)), 5);
    assert_eq!(proxy.active(), 1);
    assert_eq!(proxy.in_flight(), 1);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_with_traffic_does_not_expire() {
    let a = Echo::start("a").await;
    let pool = pool("round_robin", &[("a", &a)]);
    let proxy = Proxy::start(pool, Duration::from_millis(1500), 1000).await;
    let socket = client(2).await;
    // 3 s of traffic, a datagram every 100 ms: twice the idle timeout.
    let start = Instant::now();
    let mut i = 0;
    while start.elapsed() < Duration::from_secs(3) {
        assert!(ask(&socket, proxy.addr, &format!("ping{i}"), ANSWER)
            .await
            .is_some());
        i += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(proxy.stat(|s| s.flows_total.load(Ordering::Relaxed)), 1);
    assert_eq!(proxy.stat(|s| s.flows_expired.load(Ordering::Relaxed)), 0);
    eventually("the silent flow expires", || proxy.active() == 0).await;
    assert_eq!(proxy.stat(|s| s.flows_expired.load(Ordering::Relaxed)), 1);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_flows_beyond_max_flows_are_refused_and_existing_ones_keep_working() {
    let (a, b) = (Echo::start("a").await, Echo::start("b").await);
    let pool = pool("round_robin", &[("a", &a), ("b", &b)]);
    let proxy = Proxy::start(pool, Duration::from_secs(60), 3).await;
    let mut clients = Vec::new();
    for n in 2..=6u8 {
        clients.push(client(n).await);
    }
    for (i, socket) in clients.iter().take(3).enumerate() {
        assert!(
            ask(socket, proxy.addr, "first", ANSWER).await.is_some(),
            "client {i} answered"
        );
    }
    for (i, socket) in clients.iter().enumerate().skip(3) {
        assert_eq!(
            ask(socket, proxy.addr, "refused", SILENCE).await,
            None,
            "client {i} is beyond max_flows"
        );
    }
    assert_eq!(proxy.stat(|s| s.flows_refused.load(Ordering::Relaxed)), 2);
    for (i, socket) in clients.iter().take(3).enumerate() {
        assert!(
            ask(socket, proxy.addr, "still", ANSWER).await.is_some(),
            "client {i} still answered"
        );
    }
    assert_eq!(proxy.active(), 3);
    assert_eq!(proxy.in_flight(), 3);
    assert_eq!(proxy.stat(|s| s.flows_total.load(Ordering::Relaxed)), 3);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_style_requests_under_load_lose_no_answer() {
    const CLIENTS: u8 = 8;
    const REQUESTS: usize = 500;
    let (a, b, c) = (
        Echo::start("a").await,
        Echo::start("b").await,
        Echo::start("c").await,
    );
    let pool = pool("least_connections", &[("a", &a), ("b", &b), ("c", &c)]);
    let proxy = Proxy::start(pool, Duration::from_secs(60), 1000).await;
    let to = proxy.addr;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for n in 2..2 + CLIENTS {
        tasks.push(tokio::spawn(async move {
            let socket = client(n).await;
            let mut lost = Vec::new();
            let mut servers = std::collections::HashSet::new();
            for id in 0..REQUESTS {
                // A unique id per request; `ask` accepts only the answer that echoes it.
                match ask(&socket, to, &format!("q{n}.{id:04}"), ANSWER).await {
                    Some(server) => {
                        servers.insert(server);
                    }
                    None => lost.push(id),
                }
            }
            (lost, servers)
        }));
    }
    let mut lost = 0;
    for (n, task) in tasks.into_iter().enumerate() {
        let (missing, servers) = tokio::time::timeout(Duration::from_secs(120), task)
            .await
            .expect("the load finishes in time")
            .unwrap();
        assert!(missing.is_empty(), "client {n} lost answers {missing:?}");
        assert_eq!(servers.len(), 1, "client {n} kept one server: {servers:?}");
        lost += missing.len();
    }
    let total = u64::from(CLIENTS) * REQUESTS as u64;
    assert_eq!(lost, 0);
    assert_eq!(
        proxy.stat(|s| s.datagrams_in.load(Ordering::Relaxed)),
        total
    );
    assert_eq!(
        proxy.stat(|s| s.datagrams_out.load(Ordering::Relaxed)),
        total
    );
    assert_eq!(proxy.stat(|s| s.dropped.load(Ordering::Relaxed)), 0);
    assert_eq!(
        proxy.stat(|s| s.flows_total.load(Ordering::Relaxed)),
        u64::from(CLIENTS)
    );
    // Least connections over flows: 8 flows over 3 servers, no server idle.
    let per_server: Vec<i64> = proxy
        .proxy
        .pool
        .load()
        .snapshot()
        .servers
        .iter()
        .map(|s| s.stats.in_flight())
        .collect();
    assert!(per_server.iter().all(|&k| k >= 2), "{per_server:?}");
    eprintln!(
        "{total} request/response exchanges over {CLIENTS} clients in {:?}; flows per server {per_server:?}",
        started.elapsed()
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_servers_flows_move_to_an_available_server() {
    let (a, b) = (Echo::start("a").await, Echo::start("b").await);
    let pool = pool("round_robin", &[("a", &a), ("b", &b)]);
    let proxy = Proxy::start(pool.clone(), Duration::from_secs(60), 1000).await;
    let socket = client(2).await;
    let first = ask(&socket, proxy.addr, "one", ANSWER).await.unwrap();
    let other = if first == "a" { "b" } else { "a" };
    let first_server = pool.server(&first).unwrap();
    let other_server = pool.server(other).unwrap();
    assert_eq!(first_server.stats.in_flight(), 1);

    first_server.set_state(ServerState::Maint);
    assert_eq!(
        ask(&socket, proxy.addr, "two", ANSWER).await.as_deref(),
        Some(other),
        "the flow moved"
    );
    assert_eq!(proxy.stat(|s| s.flows_moved.load(Ordering::Relaxed)), 1);
    assert_eq!(first_server.stats.in_flight(), 0, "the old flow ended");
    assert_eq!(other_server.stats.in_flight(), 1);
    assert_eq!(proxy.active(), 1);

    // The first server is back: the moved flow stays where it is.
    first_server.set_state(ServerState::Up);
    assert_eq!(
        ask(&socket, proxy.addr, "three", ANSWER).await.as_deref(),
        Some(other)
    );

    // Health says down (not an operator): the flow moves back.
    other_server.set_state(ServerState::Down);
    assert_eq!(
        ask(&socket, proxy.addr, "four", ANSWER).await.as_deref(),
        Some(first.as_str())
    );
    assert_eq!(proxy.stat(|s| s.flows_moved.load(Ordering::Relaxed)), 2);

    // No server available: the datagram is dropped and counted; the flow ended.
    first_server.set_state(ServerState::Draining);
    assert_eq!(ask(&socket, proxy.addr, "five", SILENCE).await, None);
    assert_eq!(proxy.stat(|s| s.dropped.load(Ordering::Relaxed)), 1);
    assert_eq!(proxy.active(), 0);
    assert_eq!(proxy.in_flight(), 0);

    // A server comes back: traffic flows again.
    other_server.set_state(ServerState::Up);
    assert_eq!(
        ask(&socket, proxy.addr, "six", ANSWER).await.as_deref(),
        Some(other)
    );
    assert_eq!(proxy.active(), 1);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hash_pool_sends_every_port_of_a_client_ip_to_one_server() {
    let (a, b, c) = (
        Echo::start("a").await,
        Echo::start("b").await,
        Echo::start("c").await,
    );
    // `ip_hash` hashes `source_ip` by default.
    let pool = pool("ip_hash", &[("a", &a), ("b", &b), ("c", &c)]);
    let proxy = Proxy::start(pool, Duration::from_secs(60), 1000).await;
    for n in 2..=9u8 {
        let mut seen = Vec::new();
        for port in 0..3 {
            let socket = client(n).await;
            seen.push(
                ask(&socket, proxy.addr, &format!("{n}/{port}"), ANSWER)
                    .await
                    .unwrap(),
            );
        }
        assert!(
            seen.iter().all(|s| s == &seen[0]),
            "127.0.0.{n}: one server for every port: {seen:?}"
        );
    }
    assert_eq!(proxy.stat(|s| s.flows_total.load(Ordering::Relaxed)), 24);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swapped_pool_takes_new_flows() {
    let (a, b) = (Echo::start("a").await, Echo::start("b").await);
    let proxy = Proxy::start(
        pool("round_robin", &[("a", &a)]),
        Duration::from_secs(60),
        1000,
    )
    .await;
    let old = client(2).await;
    assert_eq!(
        ask(&old, proxy.addr, "x", ANSWER).await.as_deref(),
        Some("a")
    );
    let previous = proxy.proxy.pool.swap(pool("round_robin", &[("b", &b)]));
    // An existing flow keeps its server while it stays available ...
    assert_eq!(
        ask(&old, proxy.addr, "y", ANSWER).await.as_deref(),
        Some("a")
    );
    // ... new clients go to the new pool ...
    let new = client(3).await;
    assert_eq!(
        ask(&new, proxy.addr, "z", ANSWER).await.as_deref(),
        Some("b")
    );
    // ... and once the old pool's servers retire, its flows move.
    previous.retire();
    assert_eq!(
        ask(&old, proxy.addr, "w", ANSWER).await.as_deref(),
        Some("b")
    );
    assert_eq!(previous.snapshot().servers[0].stats.in_flight(), 0);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_server_port_counts_failures_on_the_server() {
    // An address where nothing listens: the kernel answers "port unreachable".
    let closed = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let text = format!(
        "[[listeners]]\nname=\"l\"\nbind=\"127.0.0.1:1\"\nprotocol=\"http\"\npool=\"p\"\n\
         [[pools]]\nname=\"p\"\nservers=[{{name=\"gone\", address=\"{closed}\"}}]\n"
    );
    let cfg = fulcrum::config::parse(&text, "test.toml").expect("valid config");
    let pool = Arc::new(Pool::new(&cfg.pools[0]));
    let proxy = Proxy::start(pool.clone(), Duration::from_secs(60), 1000).await;
    let socket = client(2).await;
    let gone = pool.server("gone").unwrap();
    assert_eq!(ask(&socket, proxy.addr, "one", SILENCE).await, None);
    eventually("the refusal is counted on the server", || {
        gone.stats.failures_total() >= 1
    })
    .await;
    // The flow survives the refusal (the server may come back).
    assert_eq!(proxy.active(), 1);
    assert_eq!(ask(&socket, proxy.addr, "two", SILENCE).await, None);
    eventually("the second refusal is counted too", || {
        gone.stats.failures_total() >= 2
    })
    .await;
    assert_eq!(proxy.stat(|s| s.flows_total.load(Ordering::Relaxed)), 1);
    proxy.stop().await;
}

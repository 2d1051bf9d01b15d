//! Sessions: the problem (a login on one server is unknown to the others) and the balancer-side cures
//! (sticky cookie, learned application cookie, client address), with real fulcrum-app servers.

mod common;

use std::net::Ipv4Addr;

use common::browser::{logged_in_behind_round_robin, me_in_turn, Browser};
use common::*;
use http::StatusCode;

fn sticky_config(apps: &[fulcrum_app::AppHandle], sticky: &str) -> String {
    config(
        "round_robin",
        &servers(apps),
        "",
        &format!("[pools.sticky]\n{sticky}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_problem_round_robin_loses_the_login() {
    let apps = apps(&["A", "B", "C"]).await;
    let lb = fulcrum(&config("round_robin", &servers(&apps), "", ""));
    let base = format!("http://{}", web(&lb));
    let mut browser = Browser::new();
    let at = browser.login(&base).await;
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let r = browser.me(&base).await;
        statuses.push((r.server(), r.status.as_u16()));
    }
    // The session lives on one server only: the others answer 401.
    assert!(
        statuses
            .iter()
            .filter(|(s, _)| *s != at)
            .all(|(_, code)| *code == 401),
        "{statuses:?}"
    );
    assert!(
        statuses.iter().any(|(_, code)| *code == 401),
        "{statuses:?}"
    );
    stop(lb).await;
}

async fn every_me_succeeds(sticky: &str, browser: impl FnOnce() -> Browser) {
    let apps = apps(&["A", "B", "C"]).await;
    let lb = fulcrum(&sticky_config(&apps, sticky));
    let base = format!("http://{}", web(&lb));
    let mut b = browser();
    let at = b.login(&base).await;
    for i in 0..10 {
        let r = b.me(&base).await;
        assert_eq!(
            r.status,
            StatusCode::OK,
            "{sticky}: /me #{i} on {}: {}",
            r.server(),
            r.body
        );
        assert_eq!(
            r.server(),
            at,
            "{sticky}: stays on the server that holds the session"
        );
    }
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cure_a_cookie_inserted_by_the_balancer() {
    every_me_succeeds("kind = \"cookie\"", Browser::new).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cure_the_application_session_cookie_learned() {
    every_me_succeeds(
        "kind = \"app_cookie\"\ncookie = \"SESSIONID\"",
        Browser::new,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cure_the_client_address() {
    let apps = apps(&["A", "B", "C"]).await;
    let lb = fulcrum(&sticky_config(&apps, "kind = \"source_ip\""));
    let base = format!("http://{}", web(&lb));
    let mut homes = Vec::new();
    for last in 2..=7u8 {
        let mut b = Browser::from(Ipv4Addr::new(127, 0, 0, last));
        let at = b.login(&base).await;
        for _ in 0..4 {
            let r = b.me(&base).await;
            assert_eq!(
                (r.status, r.server()),
                (StatusCode::OK, at.clone()),
                "127.0.0.{last}"
            );
        }
        homes.push(at);
    }
    homes.sort();
    homes.dedup();
    assert!(
        homes.len() >= 2,
        "new clients are still spread by the algorithm: {homes:?}"
    );
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cookie_is_opaque_and_well_formed() {
    let apps = apps(&["A", "B"]).await;
    let lb = fulcrum(&sticky_config(&apps, "kind = \"cookie\""));
    let r = get(&client(), &format!("http://{}/", web(&lb))).await;
    let set = r
        .headers
        .get("set-cookie")
        .expect("cookie set")
        .to_str()
        .unwrap()
        .to_string();
    assert!(set.starts_with("FULCRUM_SRV="), "{set}");
    assert!(
        !set.contains("Max-Age"),
        "a session cookie unless max_age is set: {set}"
    );
    assert!(
        set.contains("; Path=/") && set.contains("; HttpOnly") && set.contains("; SameSite=Lax"),
        "{set}"
    );
    for app in &apps {
        assert!(
            !set.contains(&app.addr().to_string()) && !set.contains(&app.addr().port().to_string()),
            "no address in {set}"
        );
    }
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_sticky_server_dies_the_client_is_redispatched_without_a_5xx() {
    for sticky in [
        "kind = \"cookie\"",
        "kind = \"app_cookie\"\ncookie = \"SESSIONID\"",
    ] {
        let mut apps = apps(&["A", "B", "C"]).await;
        let lb = fulcrum(&sticky_config(&apps, sticky));
        let base = format!("http://{}", web(&lb));
        let mut b = Browser::new();
        let at = b.login(&base).await;
        let index = (at.as_bytes()[0] - b'A') as usize;
        apps.remove(index).stop().await;
        // Memory sessions: the new server does not know the user (401), but nothing fails.
        let r = b.me(&base).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{sticky}: {}", r.body);
        let moved_to = r.server();
        assert_ne!(moved_to, at);
        // Logged in again there, the client now sticks to its new server.
        assert_eq!(b.login(&base).await, moved_to, "{sticky}");
        for _ in 0..5 {
            let r = b.me(&base).await;
            assert_eq!(
                (r.status, r.server()),
                (StatusCode::OK, moved_to.clone()),
                "{sticky}"
            );
        }
        stop(lb).await;
    }
}

/// A real `redis-server` on a free loopback port, killed on drop.
struct RedisServer {
    child: std::process::Child,
    port: u16,
}

impl RedisServer {
    async fn start(port: Option<u16>) -> Self {
        let port = port.unwrap_or_else(|| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        });
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                &std::env::temp_dir().to_string_lossy(),
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (scripts/test.sh installs it)");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not start"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        RedisServer { child, port }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One client from `ip` sends GETs through `addr` (at most `max`, a 2 ms pause between them) until
/// the returned flag is set; the task returns every status it got.
fn steady_load(
    addr: std::net::SocketAddr,
    ip: Ipv4Addr,
    max: usize,
) -> (
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    tokio::task::JoinHandle<Vec<u16>>,
) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let load = tokio::spawn(async move {
        let mut b = Browser::from(ip);
        let mut statuses = Vec::new();
        for _ in 0..max {
            if flag.load(std::sync::atomic::Ordering::Relaxed) {
                break;
            }
            statuses.push(
                b.call("GET", &format!("http://{addr}/"), "")
                    .await
                    .status
                    .as_u16(),
            );
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        statuses
    });
    (stop, load)
}

fn with_redis(text: String, port: u16) -> String {
    let store = format!("[store]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:{port}\"\nkey_prefix = \"test{}\"\n\n[admin]", std::process::id());
    text.replacen("[admin]", &store, 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_balancers_share_the_stick_table_through_redis() {
    let redis = RedisServer::start(None).await;
    let apps = apps(&["A", "B", "C"]).await;
    let text = with_redis(
        sticky_config(&apps, "kind = \"app_cookie\"\ncookie = \"SESSIONID\""),
        redis.port,
    );
    let (lb1, lb2) = (fulcrum(&text), fulcrum(&text));
    let (base1, base2) = (
        format!("http://{}", web(&lb1)),
        format!("http://{}", web(&lb2)),
    );
    let mut b = Browser::new();
    let at = b.login(&base1).await;
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    for i in 0..6 {
        let r = b.me(&base2).await;
        assert_eq!(
            (r.status, r.server()),
            (StatusCode::OK, at.clone()),
            "/me #{i} through the second balancer"
        );
    }
    stop(lb1).await;
    stop(lb2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_never_becomes_a_client_error_and_sharing_resumes() {
    let mut redis = RedisServer::start(None).await;
    let port = redis.port;
    let apps = apps(&["A", "B", "C"]).await;
    let text = with_redis(sticky_config(&apps, "kind = \"source_ip\""), port);
    let (lb1, lb2) = (fulcrum(&text), fulcrum(&text));
    let addr = web(&lb1);
    let (stop_load, load) = steady_load(addr, Ipv4Addr::new(127, 0, 0, 11), 5_000);
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    redis.kill();
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    let _redis = RedisServer::start(Some(port)).await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    stop_load.store(true, std::sync::atomic::Ordering::Relaxed);
    let statuses = load.await.unwrap();
    let errors = statuses.iter().filter(|&&s| s >= 500).count();
    assert!(statuses.len() > 50, "the load ran: {}", statuses.len());
    assert_eq!(
        errors,
        0,
        "{errors} server errors out of {} during the outage",
        statuses.len()
    );
    let redis_errors = lb1.shared().state().pools[0]
        .sticky
        .as_ref()
        .unwrap()
        .shared()
        .unwrap()
        .errors();
    assert!(redis_errors > 0, "the outage was seen and counted");
    let metrics = common::metrics(&lb1).await;
    assert!(
        metrics.contains(&format!(
            "fulcrum_store_errors_total{{pool=\"p\"}} {redis_errors}"
        )) || metrics.contains("fulcrum_store_errors_total{pool=\"p\"}"),
        "{metrics}"
    );

    // Sharing resumes once Redis is back (after the breaker): a client that arrives through the first
    // balancer keeps its server through the second.
    let prefix = format!("test{}", std::process::id());
    wait_shared(
        &lb1,
        &lb2,
        port,
        &prefix,
        20,
        std::time::Duration::from_secs(5),
    )
    .await;
    stop(lb1).await;
    stop(lb2).await;
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits (at most `limit`) until a new client (a fresh address from 127.0.0.`first_octet` on) that
/// arrives through `lb1` is stored in the Redis at `port` and kept on its server through `lb2`.
async fn wait_shared(
    lb1: &fulcrum::runtime::Running,
    lb2: &fulcrum::runtime::Running,
    port: u16,
    prefix: &str,
    first_octet: u8,
    limit: std::time::Duration,
) {
    let started = std::time::Instant::now();
    loop {
        let ip = Ipv4Addr::new(
            127,
            0,
            0,
            first_octet + (started.elapsed().as_millis() / 300) as u8,
        );
        let first = Browser::from(ip)
            .call("GET", &format!("http://{}/", web(lb1)), "")
            .await
            .server();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let stored = redis_get(port, &format!("{prefix}:stick:p:source_ip:{ip}")).await;
        let second = Browser::from(ip)
            .call("GET", &format!("http://{}/", web(lb2)), "")
            .await
            .server();
        if stored.as_deref() == Some(first.as_str()) && second == first {
            return;
        }
        assert!(
            started.elapsed() < limit,
            "not shared: {first} through the first balancer, stored {stored:?}, {second} through the second"
        );
    }
}

/// `GET key` on a Redis at `port`, over plain RESP.
async fn redis_get(port: u16, key: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let cmd = format!("*2\r\n$3\r\nGET\r\n${}\r\n{key}\r\n", key.len());
    s.write_all(cmd.as_bytes()).await.ok()?;
    let mut buf = vec![0u8; 512];
    let n = tokio::time::timeout(std::time::Duration::from_secs(1), s.read(&mut buf))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&buf[..n]).to_string();
    if text.starts_with("$-1") {
        return None;
    }
    text.lines().nth(1).map(|l| l.trim().to_string())
}

/// `INFO replication` of a Redis at `port`.
async fn redis_info(port: u16) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return String::new();
    };
    if s.write_all(b"INFO replication\r\n").await.is_err() {
        return String::new();
    }
    let mut buf = vec![0u8; 4096];
    match tokio::time::timeout(std::time::Duration::from_secs(1), s.read(&mut buf)).await {
        Ok(Ok(n)) => String::from_utf8_lossy(&buf[..n]).to_string(),
        _ => String::new(),
    }
}

/// Asks a sentinel which address the master has now.
async fn sentinel_master(sentinel: u16) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", sentinel))
        .await
        .ok()?;
    s.write_all(b"SENTINEL get-master-addr-by-name mymaster\r\n")
        .await
        .ok()?;
    let mut buf = vec![0u8; 256];
    let n = tokio::time::timeout(std::time::Duration::from_secs(1), s.read(&mut buf))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&buf[..n]).to_string();
    text.lines()
        .filter(|l| !l.starts_with(['*', '$']))
        .nth(1)?
        .trim()
        .parse()
        .ok()
}

/// A master, its replica in sync, and three sentinels watching the master as `mymaster`
/// (`down-after-milliseconds 1000`).
struct SentinelSetup {
    _dir: tempfile::TempDir,
    master: RedisServer,
    _replica: RedisServer,
    replica_port: u16,
    sentinels: Vec<RedisServer>,
}

impl SentinelSetup {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let master = RedisServer::start(None).await;
        let replica_port = free_port();
        let replica = std::process::Command::new("redis-server")
            .args([
                "--port",
                &replica_port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--replicaof", "127.0.0.1", &master.port.to_string()])
            .arg("--dir")
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let _replica = RedisServer {
            child: replica,
            port: replica_port,
        };
        // The sentinels learn the replica from the master's INFO: let it be in sync before they start.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !redis_info(replica_port)
            .await
            .contains("master_link_status:up")
        {
            assert!(std::time::Instant::now() < deadline, "replica did not sync");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let mut sentinels = Vec::new();
        for i in 0..3 {
            let port = free_port();
            let conf = dir.path().join(format!("sentinel-{i}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\nsentinel monitor mymaster 127.0.0.1 {} 2\n\
                     sentinel down-after-milliseconds mymaster 1000\nsentinel failover-timeout mymaster 5000\n",
                    master.port
                ),
            )
            .unwrap();
            let child = std::process::Command::new("redis-server")
                .arg(&conf)
                .arg("--sentinel")
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap();
            sentinels.push(RedisServer { child, port });
        }
        for s in &sentinels {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while sentinel_master(s.port).await != Some(master.port) {
                assert!(
                    std::time::Instant::now() < deadline,
                    "sentinel {} did not come up",
                    s.port
                );
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
        SentinelSetup {
            _dir: dir,
            master,
            _replica,
            replica_port,
            sentinels,
        }
    }

    /// Kills the master and waits (at most 20 s) until the sentinels name the replica.
    async fn fail_over(&mut self) {
        self.master.kill();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while sentinel_master(self.sentinels[0].port).await != Some(self.replica_port) {
            assert!(std::time::Instant::now() < deadline, "no failover");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fulcrum_follows_a_sentinel_failover_without_client_errors() {
    let mut setup = SentinelSetup::start().await;
    let (replica_port, sentinels) = (setup.replica_port, &setup.sentinels);
    let apps = apps(&["A", "B", "C"]).await;
    let nodes: Vec<String> = sentinels
        .iter()
        .map(|s| format!("\"127.0.0.1:{}\"", s.port))
        .collect();
    let store = format!(
        "[store]\nkind = \"redis\"\nsentinel = {{ master = \"mymaster\", nodes = [{}] }}\nkey_prefix = \"sentinel{}\"\n\n[admin]",
        nodes.join(", "),
        std::process::id()
    );
    let text = sticky_config(&apps, "kind = \"source_ip\"").replacen("[admin]", &store, 1);
    let (lb1, lb2) = (fulcrum(&text), fulcrum(&text));
    let addr = web(&lb1);
    let (stop_load, load) = steady_load(addr, Ipv4Addr::new(127, 0, 0, 31), 20_000);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    setup.fail_over().await;
    eprintln!("failover done");
    // After the failover (and the breaker), entries written through one balancer reach the other.
    // The entry lands in the new master, and the second balancer honours it.
    let prefix = format!("sentinel{}", std::process::id());
    wait_shared(
        &lb1,
        &lb2,
        replica_port,
        &prefix,
        40,
        std::time::Duration::from_secs(8),
    )
    .await;
    stop_load.store(true, std::sync::atomic::Ordering::Relaxed);
    let statuses = load.await.unwrap();
    let errors = statuses.iter().filter(|&&s| s >= 500).count();
    assert!(statuses.len() > 50, "the load ran: {}", statuses.len());
    assert_eq!(
        errors,
        0,
        "{errors} server errors out of {} across the failover",
        statuses.len()
    );
    stop(lb1).await;
    stop(lb2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_sessions_in_redis_a_dying_server_loses_no_login() {
    let redis = RedisServer::start(None).await;
    let url = format!("redis://127.0.0.1:{}", redis.port);
    let configs = ["A", "B", "C"]
        .iter()
        .map(|n| {
            fulcrum_app::AppConfig::new(*n).with_sessions(fulcrum_app::Sessions::Redis(url.clone()))
        })
        .collect();
    let mut apps = apps_with(configs).await;
    let lb = fulcrum(&sticky_config(&apps, "kind = \"cookie\""));
    let base = format!("http://{}", web(&lb));
    let mut b = Browser::new();
    let at = b.login(&base).await;
    let index = (at.as_bytes()[0] - b'A') as usize;
    apps.remove(index).stop().await;
    for _ in 0..5 {
        let r = b.me(&base).await;
        assert_eq!(
            r.status,
            StatusCode::OK,
            "the session lives in Redis: {}",
            r.body
        );
        assert_ne!(r.server(), at);
    }
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cookie_may_carry_a_max_age_and_a_custom_name() {
    let apps = apps(&["A", "B"]).await;
    let lb = fulcrum(&sticky_config(
        &apps,
        "kind = \"cookie\"\ncookie = \"LB\"\nmax_age = \"1h\"",
    ));
    let r = get(&client(), &format!("http://{}/", web(&lb))).await;
    let set = r
        .headers
        .get("set-cookie")
        .expect("cookie set")
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        set.starts_with("LB=") && set.ends_with("; Max-Age=3600"),
        "{set}"
    );
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_server_keeps_its_sticky_clients_but_gets_no_new_ones() {
    let apps = apps(&["A", "B"]).await;
    let lb = fulcrum(&sticky_config(&apps, "kind = \"cookie\""));
    let base = format!("http://{}", web(&lb));
    let mut old = Browser::new();
    let at = old.login(&base).await;
    let snapshot = lb.shared().pools()[0].snapshot_full();
    let draining = snapshot.servers.iter().find(|s| s.name == at).unwrap();
    draining.set_state(fulcrum::pool::ServerState::Draining);
    for _ in 0..5 {
        let r = old.me(&base).await;
        assert_eq!(
            (r.status, r.server()),
            (StatusCode::OK, at.clone()),
            "a sticky client stays"
        );
    }
    for _ in 0..6 {
        let newcomer = Browser::new().call("GET", &format!("{base}/"), "").await;
        assert_ne!(
            newcomer.server(),
            at,
            "no new client goes to a draining server"
        );
    }
    stop(lb).await;
}

/// Places new sessions while clients stuck to A hold 8 slow requests on it; returns where the new
/// sessions went.
async fn new_sessions_beside_a_busy_server(sticky: &str) -> Vec<String> {
    let apps = apps(&["A", "B"]).await;
    let lb = fulcrum(&sticky_config(&apps, sticky));
    let base = format!("http://{}", web(&lb));
    let mut on_a = Vec::new();
    for _ in 0..100 {
        if on_a.len() == 8 {
            break;
        }
        let mut b = Browser::new();
        if b.call("GET", &format!("{base}/"), "").await.server() == "A" {
            on_a.push(b);
        }
    }
    assert_eq!(on_a.len(), 8, "round robin placed clients on A");
    let held: Vec<_> = on_a
        .into_iter()
        .map(|mut b| {
            let url = format!("{base}/delay/8000");
            tokio::spawn(async move { b.call("GET", &url, "").await.server() })
        })
        .collect();
    let pool = format!("http://{}/api/v1/pools/p", lb.admin_addr().unwrap());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let view: serde_json::Value =
            serde_json::from_str(&get(&client(), &pool).await.body).unwrap();
        if view["in_flight"].as_i64() == Some(8) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "8 requests in flight on A: {view}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let mut placed = Vec::new();
    for _ in 0..10 {
        placed.push(
            Browser::new()
                .call("GET", &format!("{base}/"), "")
                .await
                .server(),
        );
    }
    for h in held {
        assert_eq!(h.await.unwrap(), "A", "a stuck client kept its server");
    }
    stop(lb).await;
    placed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_bound_sends_new_sessions_away_from_a_busy_sticky_server() {
    // Without a bound, round robin gives the busy server its turn.
    let placed = new_sessions_beside_a_busy_server("kind = \"cookie\"").await;
    assert!(placed.iter().any(|s| s == "A"), "{placed:?}");
    // With one, A (8 in flight against a mean of 4.5) is passed over for every new session.
    let placed = new_sessions_beside_a_busy_server("kind = \"cookie\"\nload_bound = 1.25").await;
    assert!(placed.iter().all(|s| s == "B"), "{placed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_sessions_behind_sentinel_a_failover_loses_no_login() {
    let mut setup = SentinelSetup::start().await;
    let seeds: Vec<String> = setup
        .sentinels
        .iter()
        .map(|s| format!("127.0.0.1:{}", s.port))
        .collect();
    let sessions: fulcrum_app::Sessions = format!("redis-sentinel://{}/mymaster", seeds.join(","))
        .parse()
        .expect("a redis-sentinel:// value");
    let (_apps, lb, base, users) = logged_in_behind_round_robin(sessions, 20).await;
    // Asynchronous replication: let the replica have every login before its master dies.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let info = redis_info(setup.master.port).await;
        let offset = info
            .lines()
            .find_map(|l| l.strip_prefix("master_repl_offset:"))
            .map(|v| format!("offset={},", v.trim()));
        if offset.is_some_and(|o| {
            info.lines()
                .any(|l| l.starts_with("slave0:") && l.contains(&o))
        }) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "replica in sync: {info}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    let started = std::time::Instant::now();
    let stop_flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop_flag.clone();
    let load = me_in_turn(users, base.clone(), started, flag);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let killed_at = started.elapsed();
    setup.fail_over().await;
    let promoted_at = started.elapsed();
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    stop_flag.store(true, std::sync::atomic::Ordering::Relaxed);
    let (samples, mut users) = load.await.unwrap();
    assert!(samples.len() > 50, "the load ran: {}", samples.len());
    let lost: Vec<_> = samples.iter().filter(|s| s.status == 401).collect();
    assert!(lost.is_empty(), "sessions lost: {lost:?}");
    // 503 (the store did not answer) only between the kill and 1.5 s after the promotion.
    let outside: Vec<_> = samples
        .iter()
        .filter(|s| {
            s.status != 200
                && (s.at < killed_at || s.at > promoted_at + std::time::Duration::from_millis(1500))
        })
        .collect();
    assert!(
        outside.is_empty(),
        "errors outside the failover ({killed_at:?}..{promoted_at:?}): {outside:?}"
    );
    let errors = samples.iter().filter(|s| s.status != 200).count();
    eprintln!(
        "master killed: replica promoted after {:?}; {errors} of {} requests answered 503",
        promoted_at - killed_at,
        samples.len()
    );
    for b in &mut users {
        let r = b.me(&base).await;
        assert_eq!(r.status, StatusCode::OK, "after the failover: {}", r.body);
    }
    stop(lb).await;
}

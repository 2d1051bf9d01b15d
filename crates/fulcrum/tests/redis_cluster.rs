//! Sessions on a real Redis Cluster (3 masters, 3 replicas on loopback ports): fulcrum's stick table
//! (`[store] kind = "redis_cluster"`) and fulcrum-app's sessions (`--sessions redis-cluster://…`), each
//! under load while a master is killed. What is measured: the failover window (from the kill until the
//! cluster is whole again) and every client error's place in time.

mod common;

use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::browser::{logged_in_behind_round_robin, me_in_turn, Browser, Sample};
use common::*;
use http::StatusCode;

/// A Redis Cluster of six `redis-server` processes started for one test.
struct RedisCluster {
    _dir: tempfile::TempDir,
    nodes: Vec<(u16, Option<Child>)>,
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for (_, child) in &mut self.nodes {
            if let Some(mut child) = child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// A free port for a cluster node, with its cluster bus port (port + 10000) free too. Both lie below
/// the kernel's ephemeral range (32768 and up), so that no outgoing connection (the nodes' own bus
/// links among them) can take one between this check and the node's `bind`; and no two nodes of
/// this test binary's clusters (its tests run side by side) get the same one.
fn cluster_port() -> u16 {
    static TAKEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    const FIRST: u16 = 12_000;
    const SPAN: u16 = 10_000;
    let mut taken = TAKEN.lock().unwrap_or_else(|e| e.into_inner());
    let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
    // Start somewhere else each run, so that a node a killed run left behind is not tried first.
    let start = (std::process::id() % u32::from(SPAN)) as u16;
    let port = (0..SPAN)
        .map(|i| FIRST + (start + i) % SPAN)
        .find(|&p| !taken.contains(&p) && free(p) && free(p + 10_000))
        .expect("a free port pair below 32768");
    taken.push(port);
    port
}

/// `redis-cli -p port args…`, its output (empty when the node does not answer).
fn cli(port: u16, args: &[&str]) -> String {
    Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

async fn wait_until(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl RedisCluster {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<u16> = (0..6).map(|_| cluster_port()).collect();
        let mut nodes = Vec::new();
        for &port in &ports {
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "1000"])
                .args(["--cluster-config-file", &format!("nodes-{port}.conf")])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(dir.path())
                .stdout(Stdio::null())
                .spawn()
                .expect("redis-server (scripts/test.sh installs it)");
            nodes.push((port, Some(child)));
        }
        let cluster = RedisCluster { _dir: dir, nodes };
        for &port in &ports {
            wait_until("a node answers PING", Duration::from_secs(10), || {
                cli(port, &["ping"]).contains("PONG")
            })
            .await;
        }
        let addresses: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli");
        assert!(
            created.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&created.stdout)
        );
        for &port in &ports {
            wait_until("the cluster is whole", Duration::from_secs(20), || {
                let info = cli(port, &["cluster", "info"]);
                info.contains("cluster_state:ok") && info.contains("cluster_known_nodes:6")
            })
            .await;
        }
        cluster.wait_replicas_in_sync().await;
        cluster
    }

    /// `(port, role)` of every live node, from `CLUSTER NODES` asked of a live node.
    fn roles(&self) -> Vec<(u16, &'static str)> {
        let Some(live) = self.live_port() else {
            return Vec::new();
        };
        cli(live, &["cluster", "nodes"])
            .lines()
            .filter(|l| !l.contains("fail"))
            .filter_map(|l| {
                let fields: Vec<&str> = l.split_whitespace().collect();
                let port = fields.get(1)?.split(['@', ':']).nth(1)?.parse().ok()?;
                let role = if fields.get(2)?.contains("master") {
                    "master"
                } else {
                    "replica"
                };
                Some((port, role))
            })
            .collect()
    }

    fn masters(&self) -> Vec<u16> {
        let mut masters: Vec<u16> = self
            .roles()
            .into_iter()
            .filter(|(_, r)| *r == "master")
            .map(|(p, _)| p)
            .collect();
        masters.sort();
        masters
    }

    fn live_port(&self) -> Option<u16> {
        self.nodes
            .iter()
            .find(|(_, c)| c.is_some())
            .map(|(port, _)| *port)
    }

    fn seeds(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|(p, _)| format!("127.0.0.1:{p}"))
            .collect()
    }

    /// Every master's writes acknowledged by its replica (asynchronous replication: a write the replica
    /// has not received is lost with its master, as on any Redis Cluster).
    async fn wait_replicas_in_sync(&self) {
        for master in self.masters() {
            // A replica first needs a full resync (an RDB transfer after the master's 5 s diskless
            // delay), slow on a loaded machine: a wide bound, and what the master last said if it
            // passes.
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let info = cli(master, &["info", "replication"]);
                let offset = info
                    .lines()
                    .find_map(|l| l.strip_prefix("master_repl_offset:"))
                    .map(|v| v.trim().to_owned());
                let in_sync = offset.is_some_and(|offset| {
                    info.lines().filter(|l| l.starts_with("slave")).any(|l| {
                        l.contains("state=online") && l.contains(&format!("offset={offset},"))
                    })
                });
                if in_sync {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "timed out waiting: replicas of {master} in sync; roles {:?}; INFO replication:\n{info}",
                    self.roles()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// Kills the master holding the most keys and waits until its replica has taken its place.
    /// Returns the killed port and the failover window (kill → cluster whole again).
    async fn kill_busiest_master(&mut self) -> (u16, Duration) {
        let masters = self.masters();
        let victim = *masters
            .iter()
            .max_by_key(|&&p| cli(p, &["dbsize"]).trim().parse::<u64>().unwrap_or(0))
            .unwrap();
        let killed_at = Instant::now();
        let slot = self.nodes.iter_mut().find(|(p, _)| *p == victim).unwrap();
        let mut child = slot.1.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        let others: Vec<u16> = self
            .nodes
            .iter()
            .filter(|(_, c)| c.is_some())
            .map(|(p, _)| *p)
            .collect();
        wait_until(
            "a replica replaces the killed master",
            Duration::from_secs(30),
            || {
                others.iter().all(|&p| {
                    let info = cli(p, &["cluster", "info"]);
                    info.contains("cluster_state:ok")
                }) && {
                    let masters = self.masters();
                    masters.len() == 3 && !masters.contains(&victim)
                }
            },
        )
        .await;
        (victim, killed_at.elapsed())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stick_table_lives_in_the_cluster_and_survives_a_masters_death() {
    let mut cluster = RedisCluster::start().await;
    let apps = apps(&["A", "B", "C"]).await;
    let seeds: Vec<String> = cluster.seeds()[..3]
        .iter()
        .map(|s| format!("\"{s}\""))
        .collect();
    let store = format!(
        "[store]\nkind = \"redis_cluster\"\nnodes = [{}]\nkey_prefix = \"c{}\"\n\n[admin]",
        seeds.join(", "),
        std::process::id()
    );
    let text = config(
        "round_robin",
        &servers(&apps),
        "",
        "[pools.sticky]\nkind = \"source_ip\"",
    )
    .replacen("[admin]", &store, 1);
    let (lb1, lb2) = (fulcrum(&text), fulcrum(&text));

    // 40 clients arrive through the first balancer and keep their server through the second.
    let clients: Vec<Ipv4Addr> = (0..40).map(|i| Ipv4Addr::new(127, 0, 3, 10 + i)).collect();
    let mut placed = Vec::new();
    for &ip in &clients {
        let first = Browser::from(ip)
            .call("GET", &format!("http://{}/", web(&lb1)), "")
            .await;
        assert_eq!(first.status, StatusCode::OK);
        placed.push(first.server());
    }
    // Entries are written after the answer: give the writes a moment, then read through the second.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (ip, server) in clients.iter().zip(&placed) {
        let r = Browser::from(*ip)
            .call("GET", &format!("http://{}/", web(&lb2)), "")
            .await;
        assert_eq!(&r.server(), server, "{ip} through the second balancer");
    }
    // The entries spread over the cluster's masters (one key each, no hash tag to pin them).
    let holding = cluster
        .masters()
        .iter()
        .filter(|&&p| cli(p, &["dbsize"]).trim().parse::<u64>().unwrap_or(0) > 0)
        .count();
    assert!(holding >= 2, "40 entries on {holding} master(s)");
    cluster.wait_replicas_in_sync().await;

    // Under load through both balancers, kill the busiest master.
    let stop_flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop_flag.clone();
    let (addr1, addr2) = (web(&lb1), web(&lb2));
    let load_clients = clients.clone();
    let load = tokio::spawn(async move {
        let started = Instant::now();
        let mut samples = Vec::new();
        for i in 0..20_000usize {
            if flag.load(std::sync::atomic::Ordering::Relaxed) {
                break;
            }
            let ip = load_clients[i % load_clients.len()];
            let addr = if i % 2 == 0 { addr1 } else { addr2 };
            let r = Browser::from(ip)
                .call("GET", &format!("http://{addr}/"), "")
                .await;
            samples.push((
                i % load_clients.len(),
                Sample {
                    at: started.elapsed(),
                    status: r.status.as_u16(),
                    server: r.server(),
                },
            ));
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        samples
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (victim, window) = cluster.kill_busiest_master().await;
    eprintln!("master {victim} killed; the cluster was whole again after {window:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop_flag.store(true, std::sync::atomic::Ordering::Relaxed);
    let samples = load.await.unwrap();
    assert!(samples.len() > 100, "the load ran: {}", samples.len());
    let errors = samples.iter().filter(|(_, s)| s.status >= 500).count();
    assert_eq!(errors, 0, "client errors across the failover");
    let moved: Vec<_> = samples
        .iter()
        .filter(|(c, s)| s.server != placed[*c])
        .map(|(c, s)| (clients[*c], s.at, s.server.clone()))
        .collect();
    assert!(
        moved.is_empty(),
        "clients moved to another server: {moved:?}"
    );

    // A balancer started after the failover has nothing of its own: every client still finds its
    // server in the cluster — the dead master's entries came from its promoted replica.
    let lb3 = fulcrum(&text);
    for (ip, server) in clients.iter().zip(&placed) {
        let r = Browser::from(*ip)
            .call("GET", &format!("http://{}/", web(&lb3)), "")
            .await;
        assert_eq!(
            &r.server(),
            server,
            "{ip} through a balancer started after the failover"
        );
    }
    stop(lb1).await;
    stop(lb2).await;
    stop(lb3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_sessions_in_the_cluster_survive_a_masters_death() {
    let mut cluster = RedisCluster::start().await;
    let url = format!("redis-cluster://{}", cluster.seeds()[..3].join(","));
    let sessions: fulcrum_app::Sessions = url.parse().expect("a redis-cluster:// value");
    let (_apps, lb, base, mut users) = logged_in_behind_round_robin(sessions, 30).await;
    let mut seen = std::collections::HashSet::new();
    for b in &mut users {
        for _ in 0..3 {
            let r = b.me(&base).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.body);
            seen.insert(r.server());
        }
    }
    assert_eq!(
        seen.len(),
        3,
        "every server answered for the sessions: {seen:?}"
    );
    cluster.wait_replicas_in_sync().await;

    let started = Instant::now();
    let stop_flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop_flag.clone();
    let load = me_in_turn(users, base.clone(), started, flag);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let killed_at = started.elapsed();
    let (victim, window) = cluster.kill_busiest_master().await;
    let whole_at = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop_flag.store(true, std::sync::atomic::Ordering::Relaxed);
    let (samples, mut users) = load.await.unwrap();
    assert!(samples.len() > 100, "the load ran: {}", samples.len());

    // No session is ever lost: never a 401.
    let lost: Vec<_> = samples
        .iter()
        .filter(|s| s.status == 401)
        .map(|s| s.at)
        .collect();
    assert!(lost.is_empty(), "sessions lost at {lost:?}");
    // Errors (503: the store did not answer) only inside the failover window, with a second of
    // margin for the apps to read the new slot map.
    let errors: Vec<(Duration, u16, &str)> = samples
        .iter()
        .filter(|s| s.status != 200)
        .map(|s| (s.at, s.status, s.server.as_str()))
        .collect();
    let outside: Vec<_> = errors
        .iter()
        .filter(|(at, _, _)| *at < killed_at || *at > whole_at + Duration::from_secs(1))
        .collect();
    assert!(
        outside.is_empty(),
        "errors outside the failover window ({killed_at:?}..{whole_at:?}): {outside:?}"
    );
    assert!(
        errors.iter().all(|(_, status, _)| *status == 503),
        "{errors:?}"
    );
    let (first, last) = (
        errors.first().map(|e| e.0 - killed_at),
        errors.last().map(|e| e.0 - killed_at),
    );
    eprintln!(
        "master {victim} killed: cluster whole after {window:?}; {} of {} requests answered 503, \
         from {first:?} to {last:?} after the kill",
        errors.len(),
        samples.len()
    );
    // After the failover every session answers, on every server.
    for b in &mut users {
        let r = b.me(&base).await;
        assert_eq!(r.status, StatusCode::OK, "after the failover: {}", r.body);
    }
    stop(lb).await;
}

//! Balancer redundancy (`[ha]`, VRRP v3) on a network of namespaces the tests build: a client, two
//! balancers and three fulcrum-app servers, each in its own namespace on one bridge. Needs root.
//!
//! Timings are real (VRRP runs on the wall clock between processes), so the assertions are on order
//! and wide bounds: the keepalived anchor on this machine is 0.69 s for a SIGKILLed master with a
//! 200 ms advert; the tests allow 3 s.

mod common;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::browser::Browser;
use common::netns::Lab;
use common::process::BIN;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 100);
const APPS: [(&str, &str, &str); 3] = [
    ("a", "A", "10.77.0.21"),
    ("b", "B", "10.77.0.22"),
    ("c", "C", "10.77.0.23"),
];
/// What the failover of a killed master may take here: 3 × 200 ms + skew is 0.72 s; the rest is
/// margin for a loaded machine.
const FAILOVER_BOUND: Duration = Duration::from_secs(3);

/// The network: client 10.77.0.2, balancers lb1 10.77.0.11 and lb2 10.77.0.12, apps A, B, C on
/// 10.77.0.21-23 (port 8080), each app running.
fn network(client_extra: &[&str]) -> Lab {
    let mut lab = Lab::new();
    let mut client = vec!["10.77.0.2/24"];
    client.extend_from_slice(client_extra);
    lab.host("client", &client);
    lab.host("lb1", &["10.77.0.11/24"]);
    lab.host("lb2", &["10.77.0.12/24"]);
    for (host, name, ip) in APPS {
        lab.host(host, &[&format!("{ip}/24")]);
        lab.spawn(
            host,
            host,
            BIN,
            &["app", "--listen", "0.0.0.0:8080", "--name", name],
        );
    }
    lab
}

fn servers() -> String {
    let list: Vec<String> = APPS
        .iter()
        .map(|(_, name, ip)| format!("{{ name = \"{name}\", address = \"{ip}:8080\" }}"))
        .collect();
    format!("servers = [{}]", list.join(", "))
}

/// A balancer of the group: round robin over A, B, C with cookie stickiness under a shared secret,
/// HTTP health checks, the admin API on 127.0.0.1:9090 of its own namespace.
fn balancer_config(priority: u8, interval: &str) -> String {
    balancer_config_with(priority, interval, "")
}

/// [`balancer_config`] with `extra` appended (top-level tables, more listeners and pools).
fn balancer_config_with(priority: u8, interval: &str, extra: &str) -> String {
    format!(
        r#"shutdown_timeout = "1s"
[admin]
bind = "127.0.0.1:9090"

[ha]
interface = "eth0"
virtual_ip = "{VIP}/24"
router_id = 51
priority = {priority}
advert_interval = "{interval}"

[[listeners]]
name = "web"
bind = "0.0.0.0:80"
protocol = "http"
pool = "apps"

[[pools]]
name = "apps"
algorithm = "round_robin"
{servers}
[pools.sticky]
kind = "cookie"
secret = "a-secret-both-balancers-share"
[pools.health_check]
kind = "http"
interval = "200ms"
timeout = "150ms"
rise = 1
fall = 2
{extra}"#,
        servers = servers()
    )
}

/// A second listener whose pool sticks by fulcrum-app's own session cookie, the stick table in Redis
/// on 10.77.0.30 (shared by both balancers).
const APP_COOKIE_THROUGH_REDIS: &str = r#"
[store]
kind = "redis"
url = "redis://10.77.0.30:6379/0"

[[listeners]]
name = "app-cookie"
bind = "0.0.0.0:82"
protocol = "http"
pool = "by-session"

[[pools]]
name = "by-session"
algorithm = "round_robin"
servers = [{ name = "A", address = "10.77.0.21:8080" }, { name = "B", address = "10.77.0.22:8080" }, { name = "C", address = "10.77.0.23:8080" }]
[pools.sticky]
kind = "app_cookie"
cookie = "SESSIONID"
"#;

/// Starts redis-server on a host `redis` (10.77.0.30) and waits until the client reaches it.
fn start_redis(lab: &mut Lab) {
    lab.host("redis", &["10.77.0.30/24"]);
    lab.spawn(
        "redis",
        "redis",
        "redis-server",
        &[
            "--port",
            "6379",
            "--bind",
            "0.0.0.0",
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
        ],
    );
    wait_until("redis answers", Duration::from_secs(10), || {
        lab.block_in("client", || async {
            tokio::net::TcpStream::connect("10.77.0.30:6379")
                .await
                .is_ok()
        })
    });
}

/// Users logged in through `base` from the client host, with the server each logged in on.
fn log_in(lab: &Lab, base: &'static str, users: usize) -> Vec<(Browser, String)> {
    lab.block_in("client", move || async move {
        let mut out = Vec::new();
        for _ in 0..users {
            let mut b = Browser::new();
            let home = b.login(base).await;
            out.push((b, home));
        }
        out
    })
}

/// Each user asks `/me` once more through `base`: all must be answered 200 by the server they logged
/// in on. Gives the users back.
fn still_logged_in(
    lab: &Lab,
    base: &'static str,
    users: Vec<(Browser, String)>,
) -> Vec<(Browser, String)> {
    let (users, answers) = lab.block_in("client", move || async move {
        let mut answers = Vec::new();
        let mut back = Vec::new();
        for (mut b, home) in users {
            let r = b.me(base).await;
            answers.push((r.status.as_u16(), r.server(), home.clone()));
            back.push((b, home));
        }
        (back, answers)
    });
    for (status, server, home) in &answers {
        assert_eq!((*status, server), (200, home), "{answers:?}");
    }
    users
}

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn start_balancer(lab: &mut Lab, host: &str, config: &Path) {
    let config = config.to_str().unwrap().to_owned();
    lab.spawn(host, host, BIN, &["run", "--config", &config]);
}

/// `GET /api/v1/ha` of the balancer in `host` (None while it does not answer).
fn ha(lab: &Lab, host: &str) -> Option<serde_json::Value> {
    admin(lab, host, "GET", "/api/v1/ha", None)
}

/// An admin call inside `host`; None when it does not answer.
fn admin(
    lab: &Lab,
    host: &str,
    method: &'static str,
    path: &str,
    body: Option<String>,
) -> Option<serde_json::Value> {
    let path = path.to_owned();
    lab.block_in(host, move || async move {
        let client = common::client();
        let req = http::Request::builder()
            .method(method)
            .uri(format!("http://127.0.0.1:9090{path}"))
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(
                body.unwrap_or_default(),
            )))
            .unwrap();
        let reply = common::try_send(&client, req, Duration::from_secs(2))
            .await
            .ok()?;
        serde_json::from_str(&reply.body).ok()
    })
}

/// Waits until the balancer in `host` reports `state`; returns the last transition's wall-clock
/// time (ms since the epoch).
fn wait_state(lab: &Lab, host: &str, state: &str, within: Duration) -> u64 {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = ha(lab, host) {
            if v["state"] == state {
                return v["transitions"]
                    .as_array()
                    .and_then(|t| t.last())
                    .and_then(|t| t["at_ms"].as_u64())
                    .unwrap_or(0);
            }
            assert!(
                Instant::now() < deadline,
                "{host} is {} after {within:?}, not {state}: {v}",
                v["state"]
            );
        } else {
            assert!(Instant::now() < deadline, "{host}'s admin API is not up");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_until(what: &str, within: Duration, mut f: impl FnMut() -> bool) -> Instant {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "{what} within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    Instant::now()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// One answer of the load loop.
#[derive(Debug, Clone)]
struct Sample {
    at: Instant,
    user: usize,
    /// 0: no answer (refused, reset, timed out).
    status: u16,
    server: String,
}

/// Logged-in users asking `GET /me` in turn from the client's namespace (5 ms apart, at most 20,000
/// requests or 120 s) until `stop`. Each user logs in first, from its own source address when
/// `sources` names some. Returns where each user logged in, and every answer.
fn load(
    lab: &Lab,
    base: &'static str,
    users: usize,
    sources: Vec<Ipv4Addr>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(Vec<String>, Vec<Sample>)> {
    lab.run_in("client", move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut browsers: Vec<Browser> = (0..users)
                .map(|i| match sources.get(i) {
                    Some(ip) => Browser::from(*ip),
                    None => Browser::new(),
                })
                .collect();
            let mut homes = Vec::new();
            for b in &mut browsers {
                homes.push(b.login(base).await);
            }
            let started = Instant::now();
            let mut samples = Vec::new();
            for i in 0..20_000usize {
                if stop.load(Ordering::Relaxed) || started.elapsed() > Duration::from_secs(120) {
                    break;
                }
                let user = i % users;
                let r = browsers[user]
                    .try_call("GET", &format!("{base}/me"), "", Duration::from_secs(2))
                    .await;
                let (status, server) = match r {
                    Ok(r) => (r.status.as_u16(), r.server()),
                    Err(_) => (0, String::new()),
                };
                samples.push(Sample {
                    at: Instant::now(),
                    user,
                    status,
                    server,
                });
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (homes, samples)
        })
    })
}

/// The failed answers between `from` and `to`: (count, time of the last one after `from`).
fn failures(samples: &[Sample], from: Instant, to: Instant) -> (usize, Option<Duration>) {
    let failed: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.at >= from && s.at < to && s.status != 200)
        .collect();
    (failed.len(), failed.last().map(|s| s.at - from))
}

/// Every user was answered by the server it logged in on, never with 401, and every failure falls in
/// one of `windows` (start, length).
fn check_sessions(homes: &[String], samples: &[Sample], windows: &[(Instant, Duration)]) {
    for s in samples {
        assert_ne!(
            s.status, 401,
            "user {} was logged out (server {})",
            s.user, s.server
        );
        if s.status == 200 {
            assert_eq!(s.server, homes[s.user], "user {} moved", s.user);
        } else {
            assert!(
                windows
                    .iter()
                    .any(|(at, len)| s.at >= *at && s.at <= *at + *len),
                "a failure outside the switch windows: {s:?}"
            );
        }
    }
}

#[test]
fn a_killed_master_is_replaced_within_the_bound_and_logged_in_users_stay_logged_in() {
    let mut lab = network(&[]);
    start_redis(&mut lab);
    let dir = tempfile::tempdir().unwrap();
    let lb1 = write(
        &dir,
        "lb1.toml",
        &balancer_config_with(150, "200ms", APP_COOKIE_THROUGH_REDIS),
    );
    let lb2 = write(
        &dir,
        "lb2.toml",
        &balancer_config_with(100, "200ms", APP_COOKIE_THROUGH_REDIS),
    );
    start_balancer(&mut lab, "lb1", &lb1);
    wait_state(&lab, "lb1", "master", Duration::from_secs(15));
    start_balancer(&mut lab, "lb2", &lb2);
    wait_state(&lab, "lb2", "backup", Duration::from_secs(15));
    assert!(lab.has_address("lb1", VIP));
    assert!(!lab.has_address("lb2", VIP));
    // What the dashboard's header shows.
    let status = admin(&lab, "lb1", "GET", "/api/v1/status", None).unwrap();
    assert_eq!(
        status["ha"],
        serde_json::json!({"state": "master", "virtual_ip": "10.77.0.100/24", "holding": true})
    );
    wait_until("lb2 hears lb1", Duration::from_secs(5), || {
        ha(&lab, "lb2").is_some_and(|v| v["master"] == "10.77.0.11" && v["master_priority"] == 150)
    });

    // Users of the app-cookie listener log in through lb1, which learns their sessions into Redis.
    let app_users = log_in(&lab, "http://10.77.0.100:82", 6);
    let stop = Arc::new(AtomicBool::new(false));
    let loop_ = load(&lab, "http://10.77.0.100", 9, Vec::new(), stop.clone());
    std::thread::sleep(Duration::from_secs(1));

    // kill -9: the master vanishes without a word (its namespace keeps the address, as a dead
    // keepalived's does); lb2 takes over when the adverts stop and announces the address.
    let killed = Instant::now();
    let killed_ms = now_ms();
    lab.kill("lb1", "-KILL");
    let took_ms = wait_state(&lab, "lb2", "master", Duration::from_secs(10));
    let detect = Duration::from_millis(took_ms.saturating_sub(killed_ms));
    assert!(lab.has_address("lb2", VIP));
    std::thread::sleep(Duration::from_secs(3));
    // lb2 never saw their logins: it finds their servers in Redis.
    let app_users = still_logged_in(&lab, "http://10.77.0.100:82", app_users);

    // The old master comes back with the higher priority and takes the address back (preempt).
    let back = Instant::now();
    start_balancer(&mut lab, "lb1", &lb1);
    wait_state(&lab, "lb1", "master", Duration::from_secs(15));
    wait_state(&lab, "lb2", "backup", Duration::from_secs(5));
    wait_until("lb2 gives up the address", Duration::from_secs(5), || {
        !lab.has_address("lb2", VIP)
    });
    let back_done = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    // The restarted lb1 starts with nothing in memory: Redis again.
    still_logged_in(&lab, "http://10.77.0.100:82", app_users);
    stop.store(true, Ordering::Relaxed);
    let (homes, samples) = loop_.join().unwrap();

    let (lost_kill, last_kill) = failures(&samples, killed, back);
    let (lost_back, last_back) = failures(&samples, back, back_done + Duration::from_secs(2));
    eprintln!(
        "kill -9: lb2 master after {detect:?}; {lost_kill} requests failed, the last {last_kill:?} \
         after the kill. Preempt: {lost_back} failed, the last {last_back:?} after lb1 restarted \
         ({:?} to master); {} requests in all",
        back_done - back,
        samples.len()
    );
    assert!(samples
        .iter()
        .filter(|s| s.at < killed)
        .all(|s| s.status == 200));
    assert!(
        detect < FAILOVER_BOUND,
        "lb2 became master {detect:?} after the kill"
    );
    check_sessions(
        &homes,
        &samples,
        &[
            (killed, FAILOVER_BOUND),
            (back, back_done - back + FAILOVER_BOUND),
        ],
    );
    // Service came back: the last second of each phase answered.
    let ok_after = |t: Instant| samples.iter().any(|s| s.at > t && s.status == 200);
    assert!(ok_after(killed + FAILOVER_BOUND) && ok_after(back_done + Duration::from_secs(1)));
    // Cookie stickiness spread the users over more than one server, and kept each on its own.
    let mut distinct = homes.clone();
    distinct.sort();
    distinct.dedup();
    assert!(distinct.len() > 1, "{homes:?}");
}

#[test]
fn a_stopping_master_hands_over_at_once_and_a_master_that_cannot_serve_steps_down() {
    let mut lab = network(&[]);
    let dir = tempfile::tempdir().unwrap();
    // 1 s adverts: a backup that had to wait for silence would need 3.6 s; a handover takes the
    // skew only (156/256 s for priority 100).
    let lb1 = write(&dir, "lb1.toml", &balancer_config(150, "1s"));
    let lb2 = write(&dir, "lb2.toml", &balancer_config(100, "1s"));
    start_balancer(&mut lab, "lb1", &lb1);
    wait_state(&lab, "lb1", "master", Duration::from_secs(15));
    start_balancer(&mut lab, "lb2", &lb2);
    wait_state(&lab, "lb2", "backup", Duration::from_secs(15));

    // SIGTERM: a priority 0 advert, the address removed, lb2 master after the skew.
    let stopped_ms = now_ms();
    lab.kill("lb1", "-TERM");
    let took_ms = wait_state(&lab, "lb2", "master", Duration::from_secs(10));
    let handover = Duration::from_millis(took_ms.saturating_sub(stopped_ms));
    eprintln!("SIGTERM: lb2 master after {handover:?}");
    assert!(
        handover < Duration::from_millis(2_500),
        "a clean stop took {handover:?}: lb2 waited for silence (3.6 s) instead of the skew"
    );
    assert!(
        !lab.has_address("lb1", VIP),
        "a stopped master left the address"
    );
    assert!(lab.has_address("lb2", VIP));

    // Back with priority 150 (offering its sockets to a successor): it preempts.
    let socket = dir.path().join("takeover.sock");
    let socket = socket.to_str().unwrap().to_owned();
    let config = lb1.to_str().unwrap().to_owned();
    let upgrade = ["run", "--config", &config, "--takeover-socket", &socket];
    lab.spawn("lb1", "lb1", BIN, &upgrade);
    wait_state(&lab, "lb1", "master", Duration::from_secs(15));
    wait_state(&lab, "lb2", "backup", Duration::from_secs(10));

    // Every server of lb1's only pool in maintenance: its listeners cannot serve, it steps down.
    set_every_server(&lab, "lb1", "maint");
    wait_state(&lab, "lb1", "fault", Duration::from_secs(5));
    wait_state(&lab, "lb2", "master", Duration::from_secs(5));
    assert!(!lab.has_address("lb1", VIP));
    let v = ha(&lab, "lb1").unwrap();
    assert_eq!(v["can_serve"], false, "{v}");
    let reasons: Vec<&str> = v["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["reason"].as_str().unwrap())
        .collect();
    assert_eq!(reasons.last(), Some(&"listeners cannot serve"), "{v}");

    // Servers back: it rejoins and, with the higher priority, takes the address again.
    set_every_server(&lab, "lb1", "ready");
    wait_state(&lab, "lb1", "master", Duration::from_secs(10));
    wait_state(&lab, "lb2", "backup", Duration::from_secs(5));
    // The metrics tell the same story.
    let metrics = lab.block_in("lb1", || async {
        common::get(&common::client(), "http://127.0.0.1:9090/metrics")
            .await
            .body
    });
    assert!(
        metrics.contains("fulcrum_ha_state{state=\"master\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("fulcrum_ha_transitions_total{to=\"fault\"} 1"),
        "{metrics}"
    );

    // A binary upgrade (takeover) keeps the address where it is: lb2 never becomes master.
    let lb2_masters = |lab: &Lab| {
        ha(lab, "lb2").unwrap()["transitions"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["to"] == "master")
            .count()
    };
    let before = lb2_masters(&lab);
    lab.spawn("lb1", "lb1-new", BIN, &upgrade);
    lab.wait_exit("lb1", Duration::from_secs(20));
    // The successor answers the admin API; its group starts right away, as master.
    wait_state(&lab, "lb1", "master", Duration::from_secs(10));
    let v = ha(&lab, "lb1").unwrap();
    assert_eq!(
        v["transitions"][0]["reason"], "took over from the previous process",
        "{v}"
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(lab.has_address("lb1", VIP));
    assert_eq!(
        lb2_masters(&lab),
        before,
        "lb2 took the address during the upgrade"
    );
}

/// Puts every server of the balancer's pool in `state` (`maint`, `ready`) through its admin API.
fn set_every_server(lab: &Lab, host: &str, state: &str) {
    for (_, name, _) in APPS {
        let path = format!("/api/v1/pools/apps/servers/{name}/state");
        let body = serde_json::json!({ "state": state }).to_string();
        admin(lab, host, "PUT", &path, Some(body)).expect("state change");
    }
}

/// keepalived's configuration for the group, as docs/ha.md gives it.
fn keepalived_config(priority: u8) -> String {
    format!(
        r#"global_defs {{
    vrrp_version 3
}}
vrrp_instance fulcrum {{
    state BACKUP
    interface eth0
    virtual_router_id 51
    priority {priority}
    advert_int 0.2
    virtual_ipaddress {{
        {VIP}/24
    }}
}}
"#
    )
}

fn start_keepalived(lab: &mut Lab, dir: &tempfile::TempDir, priority: u8) {
    let conf = write(dir, "keepalived.conf", &keepalived_config(priority));
    let pid = dir.path().join("keepalived.pid");
    let vrrp_pid = dir.path().join("vrrp.pid");
    lab.spawn(
        "lb2",
        "keepalived",
        "keepalived",
        &[
            "-n", // no fork
            "-G", // no syslog
            "-P", // VRRP only
            "-f",
            conf.to_str().unwrap(),
            "-p",
            pid.to_str().unwrap(),
            "-r",
            vrrp_pid.to_str().unwrap(),
        ],
    );
}

#[test]
fn fulcrum_and_keepalived_elect_and_fail_over_in_one_group() {
    let mut lab = network(&[]);
    let dir = tempfile::tempdir().unwrap();
    let lb1 = write(&dir, "lb1.toml", &balancer_config(150, "200ms"));
    start_balancer(&mut lab, "lb1", &lb1);
    wait_state(&lab, "lb1", "master", Duration::from_secs(15));
    start_keepalived(&mut lab, &dir, 100);
    // keepalived hears fulcrum's adverts and stays backup: it never takes the address.
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !lab.has_address("lb2", VIP),
        "keepalived took the address from a live master"
    );
    assert!(lab.has_address("lb1", VIP));

    // fulcrum killed: keepalived takes over.
    let killed = Instant::now();
    lab.kill("lb1", "-KILL");
    let took = wait_until(
        "keepalived holds the address",
        Duration::from_secs(10),
        || lab.has_address("lb2", VIP),
    ) - killed;
    eprintln!("keepalived took over {took:?} after fulcrum was killed");
    assert!(took < FAILOVER_BOUND, "{took:?}");

    // fulcrum back: it hears keepalived (priority 100), then preempts with 150.
    start_balancer(&mut lab, "lb1", &lb1);
    wait_state(&lab, "lb1", "master", Duration::from_secs(15));
    wait_until(
        "keepalived gives the address back",
        Duration::from_secs(5),
        || !lab.has_address("lb2", VIP),
    );
    let v = ha(&lab, "lb1").unwrap();
    assert!(v["adverts_received"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["adverts_rejected"], 0, "{v}");
    let heard_backup = v["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["to"] == "backup");
    assert!(heard_backup, "{v}");

    // A reload lowers fulcrum's priority below keepalived's: keepalived preempts, fulcrum follows.
    std::fs::write(&lb1, balancer_config(50, "200ms")).unwrap();
    admin(&lab, "lb1", "POST", "/api/v1/reload", Some("{}".into())).expect("reload");
    wait_state(&lab, "lb1", "backup", Duration::from_secs(10));
    wait_until(
        "keepalived holds the address",
        Duration::from_secs(5),
        || lab.has_address("lb2", VIP),
    );
    assert!(!lab.has_address("lb1", VIP));
    let v = ha(&lab, "lb1").unwrap();
    assert_eq!(v["master"], "10.77.0.12", "{v}");
    assert_eq!(v["master_priority"], 100, "{v}");
    assert_eq!(v["priority"], 50, "{v}");
    lab.kill("keepalived", "-TERM");
}

/// Two instances serving at once behind an ECMP route (what a router with a BGP session to each
/// does), no virtual IP election: the service address is on each instance's loopback.
fn active_active_config() -> String {
    format!(
        r#"shutdown_timeout = "1s"
[admin]
bind = "127.0.0.1:9090"

[store]
kind = "redis"
url = "redis://10.77.0.30:6379/0"

[[listeners]]
name = "sticky"
bind = "0.0.0.0:80"
protocol = "http"
pool = "apps"

[[listeners]]
name = "hashed"
bind = "0.0.0.0:81"
protocol = "http"
pool = "hashed"

[[listeners]]
name = "app-cookie"
bind = "0.0.0.0:82"
protocol = "http"
pool = "by-session"

[[pools]]
name = "apps"
algorithm = "round_robin"
{servers}
[pools.sticky]
kind = "source_ip"

[[pools]]
name = "by-session"
algorithm = "round_robin"
{servers}
[pools.sticky]
kind = "app_cookie"
cookie = "SESSIONID"

[[pools]]
name = "hashed"
algorithm = "maglev"
hash_key = "source_ip"
{servers}
"#,
        servers = servers()
    )
}

#[test]
fn active_active_behind_ecmp_losing_an_instance_moves_no_client() {
    const SERVICE: &str = "10.77.1.100";
    let sources: Vec<String> = (101..=116).map(|i| format!("10.77.0.{i}/24")).collect();
    let refs: Vec<&str> = sources.iter().map(String::as_str).collect();
    let mut lab = network(&refs);
    start_redis(&mut lab);
    for lb in ["lb1", "lb2"] {
        lab.ip(lb, &["addr", "add", &format!("{SERVICE}/32"), "dev", "lo"]);
    }
    // The client's router: one route, two next hops, flows spread by their ports.
    lab.sh("client", "sysctl -qw net.ipv4.fib_multipath_hash_policy=1");
    lab.ip(
        "client",
        &[
            "route",
            "add",
            &format!("{SERVICE}/32"),
            "nexthop",
            "via",
            "10.77.0.11",
            "nexthop",
            "via",
            "10.77.0.12",
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let config = write(&dir, "lb.toml", &active_active_config());
    start_balancer(&mut lab, "lb1", &config);
    start_balancer(&mut lab, "lb2", &config);
    for lb in ["lb1", "lb2"] {
        wait_until("the balancer answers", Duration::from_secs(15), || {
            admin(&lab, lb, "GET", "/api/v1/status", None).is_some()
        });
        assert_eq!(ha(&lab, lb).unwrap()["state"], "standalone");
    }
    let ips: Vec<Ipv4Addr> = (101..=116).map(|i| Ipv4Addr::new(10, 77, 0, i)).collect();
    let hashed_homes = |lab: &Lab, ips: Vec<Ipv4Addr>| {
        lab.block_in("client", move || async move {
            let mut homes = Vec::new();
            for ip in ips {
                let mut b = Browser::from(ip);
                let r = b.call("GET", &format!("http://{SERVICE}:81/"), "").await;
                homes.push(r.server());
            }
            homes
        })
    };
    let hashed_before = hashed_homes(&lab, ips.clone());
    // Users who log in on the app-cookie listener: their session cookie's server is learned into the
    // Redis stick table by whichever instance saw the login.
    let app_users = {
        let ips = ips.clone();
        lab.block_in("client", move || async move {
            let mut users = Vec::new();
            for ip in ips {
                let mut b = Browser::from(ip);
                let home = b.login(&format!("http://{SERVICE}:82")).await;
                users.push((b, home));
            }
            users
        })
    };

    let stop = Arc::new(AtomicBool::new(false));
    let loop_ = load(
        &lab,
        "http://10.77.1.100",
        ips.len(),
        ips.clone(),
        stop.clone(),
    );
    std::thread::sleep(Duration::from_secs(2));
    let served = |lab: &Lab, lb: &str| {
        admin(lab, lb, "GET", "/api/v1/status", None).unwrap()["listeners"][0]["requests_total"]
            .as_u64()
            .unwrap()
    };
    let (on1, on2) = (served(&lab, "lb1"), served(&lab, "lb2"));
    assert!(
        on1 > 0 && on2 > 0,
        "ECMP sent everything one way: {on1} / {on2}"
    );

    // lb1 dies; the router withdraws its next hop (a BGP session dropping does this).
    let killed = Instant::now();
    lab.kill("lb1", "-KILL");
    lab.ip(
        "client",
        &[
            "route",
            "replace",
            &format!("{SERVICE}/32"),
            "via",
            "10.77.0.12",
        ],
    );
    let withdrawn = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let (homes, samples) = loop_.join().unwrap();
    let (lost, last) = failures(&samples, killed, Instant::now());
    let users_hit = {
        let mut u: Vec<usize> = samples
            .iter()
            .filter(|s| s.at >= killed && s.status != 200)
            .map(|s| s.user)
            .collect();
        u.sort();
        u.dedup();
        u.len()
    };
    eprintln!(
        "active-active: {on1} / {on2} requests on lb1 / lb2 before the kill; {lost} failed after \
         it (the last {last:?} after), {users_hit} of {} users saw a failure; {} requests in all",
        ips.len(),
        samples.len()
    );
    // Every user stayed on its server (the stick table in Redis) and logged in; failures only
    // between the kill and the withdrawal (plus a margin), and never for every user.
    check_sessions(
        &homes,
        &samples,
        &[(killed, withdrawn - killed + Duration::from_secs(1))],
    );
    assert!(users_hit < ips.len(), "every user failed, not only lb1's");
    // The app-cookie users, some of whom logged in through lb1: lb2 finds each session's server in
    // Redis, so all are still logged in on the server they logged in on.
    let after: Vec<(u16, String, String)> = lab.block_in("client", move || async move {
        let mut out = Vec::new();
        for (mut b, home) in app_users {
            let r = b.me(&format!("http://{SERVICE}:82")).await;
            out.push((r.status.as_u16(), r.server(), home));
        }
        out
    });
    for (status, server, home) in &after {
        assert_eq!((*status, server), (200, home), "{after:?}");
    }
    // Maglev on the source address: the surviving instance sends each client where both did.
    assert_eq!(hashed_homes(&lab, ips), hashed_before);
    let mut spread = hashed_before.clone();
    spread.sort();
    spread.dedup();
    assert!(spread.len() > 1, "{hashed_before:?}");
}

#[test]
fn a_missing_interface_or_capability_stops_the_start_with_a_clear_error() {
    let mut lab = Lab::new();
    lab.host("lb1", &["10.77.0.11/24"]);
    let dir = tempfile::tempdir().unwrap();
    // Readable by the unprivileged user below.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let config = |interface: &str| {
        format!(
            "[ha]\ninterface = \"{interface}\"\nvirtual_ip = \"{VIP}/24\"\nrouter_id = 51\n\
             [[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\npool = \"p\"\n\
             [[pools]]\nname = \"p\"\nservers = [{{ address = \"127.0.0.1:9\" }}]\n"
        )
    };
    let run = |path: &Path, prefix: &str| {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &lab.ns("lb1"), "sh", "-c"])
            .arg(format!("{prefix} {BIN} run --config {}", path.display()))
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let missing = write(&dir, "missing.toml", &config("eth9"));
    let (ok, err) = run(&missing, "");
    assert!(!ok);
    assert!(
        err.contains("ha.interface: no interface \"eth9\" here (there are: lo, eth0)"),
        "{err}"
    );
    let good = write(&dir, "good.toml", &config("eth0"));
    std::fs::set_permissions(&good, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (ok, err) = run(&good, "setpriv --reuid=65534 --regid=65534 --clear-groups");
    assert!(!ok);
    assert!(
        err.contains("ha: cannot open a raw socket for VRRP") && err.contains("CAP_NET_RAW"),
        "{err}"
    );
}

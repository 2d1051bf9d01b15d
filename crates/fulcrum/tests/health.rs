//! Health checks, passive detection, retries and slow start, against real server processes.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::Full;

const BIN: &str = env!("CARGO_BIN_EXE_fulcrum");

/// A demo server in its own process (`fulcrum app`), so that it can be killed or frozen.
struct AppProcess {
    child: Child,
    addr: SocketAddr,
}

impl AppProcess {
    async fn start(name: &str) -> Self {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let child = Command::new(BIN)
            .args(["app", "--listen", &addr.to_string(), "--name", name])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn fulcrum app");
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            assert!(Instant::now() < deadline, "app {name} did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        AppProcess { child, addr }
    }

    fn signal(&self, sig: &str) {
        assert!(Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success());
    }
}

impl Drop for AppProcess {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn state(lb: &fulcrum::runtime::Running, pool: usize, server: &str) -> &'static str {
    let snap = lb.shared().pools()[pool].snapshot_full();
    let s = snap
        .servers
        .iter()
        .find(|s| s.name == server)
        .expect("server");
    s.effective_state().as_str()
}

/// Waits (at most `limit`) until `server` reaches `want`; returns how long it took.
async fn wait_state(
    lb: &fulcrum::runtime::Running,
    pool: usize,
    server: &str,
    want: &str,
    limit: Duration,
) -> Duration {
    let started = Instant::now();
    while state(lb, pool, server) != want {
        assert!(
            started.elapsed() < limit,
            "{server} not {want} within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    started.elapsed()
}

/// Steady load: one client sends GETs back to back until `stop`, at most 20,000; returns (ok, failed).
fn steady_load(
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(usize, Vec<String>)> {
    tokio::spawn(async move {
        let c = client();
        let (mut ok, mut failed) = (0, Vec::new());
        for _ in 0..20_000 {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let r = get(&c, &format!("http://{addr}/")).await;
            if r.status == StatusCode::OK {
                ok += 1;
            } else {
                failed.push(format!("{} {}", r.status, r.body.trim()));
            }
        }
        (ok, failed)
    })
}

const CHECK: &str = "[pools.health_check]\nkind = \"http\"\ninterval = \"200ms\"\ntimeout = \"150ms\"\nrise = 2\nfall = 2";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_is_marked_down_in_time_and_no_client_request_fails() {
    let a = AppProcess::start("A").await;
    let b = AppProcess::start("B").await;
    let c = AppProcess::start("C").await;
    let s: Vec<_> = [("A", &a), ("B", &b), ("C", &c)]
        .iter()
        .map(|(n, p)| (n.to_string(), p.addr, 1))
        .collect();
    let lb = fulcrum(&config(
        "round_robin",
        &s,
        "",
        &format!("retries = 2\n{CHECK}"),
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let load = steady_load(web(&lb), stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;

    b.signal("-KILL");
    let detection = wait_state(&lb, 0, "B", "down", Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = load.await.unwrap();
    eprintln!("kill -9 detected in {detection:?} (bound interval*fall+timeout = 550 ms + jitter); {ok} GETs ok");
    assert!(failed.is_empty(), "failed client GETs: {failed:?}");
    assert!(ok > 50, "the load ran: {ok}");
    // interval × fall + timeout, with the ±10% jitter of two intervals and scheduling slack.
    assert!(
        detection <= Duration::from_millis(550 + 40 + 250),
        "detection took {detection:?}"
    );
    let change = lb.shared().pools()[0].snapshot_full().servers[1]
        .health
        .last_change()
        .unwrap();
    assert!(change.reason.contains("failed check"), "{}", change.reason);
    stop_lb(lb).await;
}

async fn stop_lb(lb: fulcrum::runtime::Running) {
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_server_times_out_and_no_request_waits_past_the_timeouts() {
    let a = AppProcess::start("A").await;
    let b = AppProcess::start("B").await;
    let s = vec![("A".to_string(), a.addr, 1), ("B".to_string(), b.addr, 1)];
    let lb = fulcrum(&config(
        "round_robin",
        &s,
        "",
        &format!("response_timeout = \"500ms\"\n{CHECK}"),
    ));
    b.signal("-STOP");
    let started = Instant::now();
    let c = client();
    let mut worst = Duration::ZERO;
    let mut statuses = Vec::new();
    while started.elapsed() < Duration::from_millis(1500) {
        let t = Instant::now();
        let r = get(&c, &format!("http://{}/", web(&lb))).await;
        worst = worst.max(t.elapsed());
        statuses.push(r.status.as_u16());
    }
    assert_eq!(
        state(&lb, 0, "B"),
        "down",
        "frozen server's checks time out"
    );
    let timeouts = statuses.iter().filter(|&&s| s == 504).count();
    eprintln!(
        "frozen server: worst client wait {worst:?}; {} requests, {timeouts} answered 504",
        statuses.len()
    );
    assert!(
        worst < Duration::from_millis(500 + 400),
        "a request waited {worst:?}"
    );
    // Once it is down, every request goes to A.
    for _ in 0..10 {
        assert_eq!(
            get(&c, &format!("http://{}/", web(&lb))).await.server(),
            "A"
        );
    }
    b.signal("-CONT");
    stop(lb).await;
}

async fn set_health(addr: SocketAddr, status: u16) {
    let req = Request::post(format!("http://{addr}/health"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(format!("{{\"status\": {status}}}"))))
        .unwrap();
    assert_eq!(send(&client(), req).await.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_l7_check_sees_what_an_l4_check_cannot() {
    let apps = apps(&["A", "B"]).await;
    let list = |p: &str| {
        format!("servers = [{{ name = \"A\", address = \"{}\" }}, {{ name = \"B\", address = \"{}\" }}]\n[pools.health_check]\nkind = \"{p}\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\nrise = 1\nfall = 1\n", apps[0].addr(), apps[1].addr())
    };
    let text = format!(
        "[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\npool = \"l7\"\n\
         [[pools]]\nname = \"l7\"\n{}\n[[pools]]\nname = \"l4\"\n{}",
        list("http"),
        list("tcp")
    );
    let lb = fulcrum(&text);
    set_health(apps[1].addr(), 503).await;
    wait_state(&lb, 0, "B", "down", Duration::from_secs(3)).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        state(&lb, 1, "B"),
        "up",
        "the TCP check still connects, so B looks fine at L4"
    );
    let last = lb.shared().pools()[0].snapshot_full().servers[1]
        .health
        .last_check()
        .unwrap();
    assert!(!last.ok && last.message.contains("HTTP 503"), "{last:?}");
    // Traffic avoids B; then B recovers.
    let seq = pick_sequence(web(&lb), 6).await;
    assert!(seq.iter().all(|s| s == "A"), "{seq:?}");
    set_health(apps[1].addr(), 200).await;
    wait_state(&lb, 0, "B", "up", Duration::from_secs(3)).await;
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recovered_server_comes_back_after_rise_and_ramps_up_with_slow_start() {
    let apps = apps(&["A", "B"]).await;
    let check = "[pools.health_check]\nkind = \"http\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\nrise = 3\nfall = 1";
    let lb = fulcrum(&config(
        "round_robin",
        &servers(&apps),
        "",
        &format!("slow_start = \"3s\"\n{check}"),
    ));
    set_health(apps[1].addr(), 500).await;
    wait_state(&lb, 0, "B", "down", Duration::from_secs(3)).await;
    set_health(apps[1].addr(), 200).await;
    let back = wait_state(&lb, 0, "B", "up", Duration::from_secs(3)).await;
    assert!(
        back >= Duration::from_millis(200),
        "rise = 3 checks at 100 ms: came back after {back:?}"
    );
    // B's share of traffic, per 750 ms window, over the 3 s ramp and after it.
    let c = client();
    let mut shares = Vec::new();
    for _ in 0..5 {
        let window = Instant::now();
        let (mut total, mut to_b) = (0usize, 0usize);
        while window.elapsed() < Duration::from_millis(750) && total < 5_000 {
            let r = get(&c, &format!("http://{}/", web(&lb))).await;
            total += 1;
            to_b += usize::from(r.server() == "B");
        }
        shares.push(to_b as f64 / total as f64);
    }
    eprintln!("B's share per 750 ms window after recovery: {shares:.3?}");
    assert!(shares[0] < 0.2, "starts with a trickle: {shares:?}");
    assert!(shares[0] < shares[2], "grows: {shares:?}");
    assert!(shares[4] > 0.4, "full share after the ramp: {shares:?}");
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passive_detection_ejects_a_failing_server_within_the_bound() {
    let apps = apps(&["A"]).await;
    const BOOM: &[u8] = b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 4\r\n\r\nboom";
    let (failing1, failing2) = (raw_server(BOOM, false).await, raw_server(BOOM, false).await);
    let (bad1, seen1) = (failing1.addr, failing1.requests.clone());
    let (bad2, seen2) = (failing2.addr, failing2.requests.clone());
    let s = vec![
        ("A".to_string(), apps[0].addr(), 1),
        ("bad1".to_string(), bad1, 1),
        ("bad2".to_string(), bad2, 1),
    ];
    let passive = "[pools.passive]\nconsecutive_failures = 3\nbase_ejection = \"10s\"\nmax_ejected_percent = 34";
    let lb = fulcrum(&config("round_robin", &s, "", passive));
    let c = client();
    let mut fives = 0;
    for _ in 0..60 {
        let r = get(&c, &format!("http://{}/", web(&lb))).await;
        fives += usize::from(r.status == StatusCode::INTERNAL_SERVER_ERROR);
    }
    let snap = lb.shared().pools()[0].snapshot_full();
    let ejected: Vec<_> = snap
        .servers
        .iter()
        .filter(|s| s.health.is_ejected())
        .map(|s| s.name.clone())
        .collect();
    assert_eq!(
        ejected.len(),
        1,
        "34% of 3 servers: exactly one ejected: {ejected:?}"
    );
    let (e, other_seen) = if ejected[0] == "bad1" {
        (&seen1, &seen2)
    } else {
        (&seen2, &seen1)
    };
    assert_eq!(
        e.load(Ordering::SeqCst),
        3,
        "ejected after 3 failures in a row"
    );
    assert!(
        other_seen.load(Ordering::SeqCst) > 10,
        "the other failing server stays in: bound respected"
    );
    assert!(fives < 60, "{fives}");
    let reason = snap
        .servers
        .iter()
        .find(|s| s.name == ejected[0])
        .unwrap()
        .health
        .last_change()
        .unwrap()
        .reason;
    assert!(reason.contains("passive: 3 failures in a row"), "{reason}");
    // Visible in the API and the metrics.
    let admin = lb.admin_addr().unwrap();
    let pools: serde_json::Value =
        serde_json::from_str(&get(&c, &format!("http://{admin}/api/v1/pools")).await.body).unwrap();
    let view = pools["pools"][0]["servers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == ejected[0].as_str())
        .unwrap()
        .clone();
    assert_eq!(view["state"], "down");
    assert_eq!(view["ejected"], true);
    let metrics = get(&c, &format!("http://{admin}/metrics")).await.body;
    assert!(
        metrics.contains(&format!(
            "fulcrum_server_ejections_total{{pool=\"p\",server=\"{}\"}} 1",
            ejected[0]
        )),
        "{metrics}"
    );
    stop(lb).await;
}

/// A network namespace with a veth pair, removed on drop: a host of our own at 10.231.77.2.
struct Namespace {
    name: String,
}

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Namespace {
    fn create() -> Option<Self> {
        let name = format!("fulcrum-icmp-{}", std::process::id());
        let (here, there) = ("fulcrumv0", "fulcrumv1");
        let _ = ip(&["netns", "del", &name]);
        let _ = ip(&["link", "del", here]);
        if !ip(&["netns", "add", &name]) {
            return None;
        }
        let ns = Namespace { name };
        let n = ns.name.as_str();
        let ok = ip(&["link", "add", here, "type", "veth", "peer", "name", there])
            && ip(&["link", "set", there, "netns", n])
            && ip(&["addr", "add", "10.231.77.1/30", "dev", here])
            && ip(&["link", "set", here, "up"])
            && ip(&["-n", n, "addr", "add", "10.231.77.2/30", "dev", there])
            && ip(&["-n", n, "link", "set", there, "up"])
            && ip(&["-n", n, "link", "set", "lo", "up"]);
        ok.then_some(ns)
    }

    fn set_host_link(&self, up: bool) {
        assert!(ip(&[
            "-n",
            &self.name,
            "link",
            "set",
            "fulcrumv1",
            if up { "up" } else { "down" }
        ]));
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", "fulcrumv0"]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn icmp_checks_answer_on_loopback_and_see_a_host_go_away() {
    if let Err(e) = fulcrum::health::icmp::available() {
        panic!("this test needs ICMP sockets (run as root, as CI does): {e}");
    }
    let Some(ns) = Namespace::create() else {
        panic!("this test needs `ip netns` (root, iproute2), as CI has");
    };
    let text = "[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\npool = \"p\"\n\
                [[pools]]\nname = \"p\"\nservers = [{ name = \"loopback\", address = \"127.0.0.1:9\" }, \
                { name = \"host\", address = \"10.231.77.2:9\" }]\n\
                [pools.health_check]\nkind = \"icmp\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\nrise = 1\nfall = 2\n";
    let lb = fulcrum(text);
    // Both answer pings first.
    let started = Instant::now();
    loop {
        let snap = lb.shared().pools()[0].snapshot_full();
        let checked: Vec<_> = snap
            .servers
            .iter()
            .filter_map(|s| s.health.last_check())
            .collect();
        if checked.len() == 2 && checked.iter().all(|c| c.ok) {
            assert!(
                checked[0].message.starts_with("ICMP echo reply"),
                "{:?}",
                checked[0]
            );
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "no ICMP replies: {checked:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(state(&lb, 0, "host"), "up");
    // The host's link goes down: its pings go unanswered, loopback's do not.
    ns.set_host_link(false);
    wait_state(&lb, 0, "host", "down", Duration::from_secs(3)).await;
    assert_eq!(state(&lb, 0, "loopback"), "up");
    let last = lb.shared().pools()[0].snapshot_full().servers[1]
        .health
        .last_check()
        .unwrap();
    assert!(last.message.contains("no ICMP echo reply"), "{last:?}");
    ns.set_host_link(true);
    wait_state(&lb, 0, "host", "up", Duration::from_secs(3)).await;
    stop(lb).await;
    drop(ns);
}

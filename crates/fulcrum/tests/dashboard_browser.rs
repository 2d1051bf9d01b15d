//! The live dashboard, seen in a real headless browser: Debian's `chromium` driven through
//! `chromedriver` (WebDriver), against a real balancer and real fulcrum-app servers on 127.0.0.1.
//! The page must render the pools and servers, show its figures moving under load (request counts,
//! rates, percentiles, the share chart, health-check marks, the stick table's size), and its drain
//! button must drain the server. A screenshot is left in `target/test-artifacts/dashboard.png`.
//!
//! Also, without a browser: the pools API fields the page reads (latency histogram, check history,
//! stick table).
//!
//! Every wait is a bounded poll with generous margins, for a loaded 2-core machine.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::Full;
use serde_json::{json, Value};

const CHROMIUM: &str = "/usr/bin/chromium";
const INSTALL: &str = "install them with `apt-get install -y chromium chromium-driver` (Debian; \
                       scripts/test.sh does it when run as root)";

/// Health checks every 200 ms (a long timeout, for a loaded machine), an application-cookie stick
/// table and a cache, so the page has check marks, a table size and a hit ratio to show.
const POOL_EXTRAS: &str = "[pools.health_check]\nkind = \"http\"\npath = \"/health\"\n\
                           interval = \"200ms\"\ntimeout = \"3s\"\nrise = 1\nfall = 2\n\n\
                           [pools.sticky]\nkind = \"app_cookie\"\ncookie = \"SESSIONID\"\n\n\
                           [pools.cache]\n";

/// `chromedriver` on `PATH`, or a failure saying how to install it (and chromium).
fn browser_binaries() -> PathBuf {
    let driver = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("chromedriver"))
            .find(|p| p.is_file())
    });
    let Some(driver) = driver else {
        panic!("`chromedriver` is not on PATH: the dashboard's browser test needs it and {CHROMIUM}; {INSTALL}");
    };
    assert!(
        Path::new(CHROMIUM).is_file(),
        "{CHROMIUM} is missing: the dashboard's browser test needs it and chromedriver; {INSTALL}"
    );
    driver
}

/// A running `chromedriver` in its own process group: dropping it kills the group (the driver and
/// every browser process it started).
struct Chromedriver {
    child: Child,
    port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Chromedriver {
    async fn start(bin: &Path) -> Self {
        use std::os::unix::process::CommandExt;
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("chromedriver.log");
        let port = process::free_port().port();
        let child = Command::new(bin)
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}; {INSTALL}", bin.display()));
        let mut driver = Chromedriver {
            child,
            port,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return driver;
            }
            if let Some(status) = driver.child.try_wait().unwrap() {
                panic!("chromedriver exited ({status}):\n{}", driver.log_tail());
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver did not listen on 127.0.0.1:{port} within 60 s:\n{}",
                driver.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// A headless chromium session.
    async fn browser(&self) -> fantoccini::Client {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": CHROMIUM,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run",
                    "--window-size=1760,1100",
                ],
            }),
        );
        let mut builder = fantoccini::ClientBuilder::new(
            hyper_util::client::legacy::connect::HttpConnector::new(),
        );
        builder.capabilities(caps);
        let url = format!("http://127.0.0.1:{}", self.port);
        match tokio::time::timeout(Duration::from_secs(120), builder.connect(&url)).await {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => panic!("no browser session: {e}\n{}", self.log_tail()),
            Err(_) => panic!("no browser session within 120 s\n{}", self.log_tail()),
        }
    }
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill")
            .args(["-KILL", "--", &group])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where test artifacts go: `target/test-artifacts` (`$CARGO_TARGET_DIR` when set, else found from
/// this test binary's path, `<target>/<profile>/deps/<binary>`).
fn artifacts_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .filter(|d| d.is_absolute())
        .unwrap_or_else(|| {
            let exe = std::env::current_exe().unwrap();
            exe.ancestors()
                .nth(3)
                .expect("the test binary sits in <target>/<profile>/deps")
                .to_owned()
        });
    let dir = target.join("test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// What the page shows now, read in one script run (so from one rendering): per pool, its header
/// figures, share chart and per server the text of every `data-field` cell, the check marks and the
/// action buttons.
const SNAPSHOT: &str = r#"
var out = { conn: document.getElementById('conn').textContent,
            ha: document.getElementById('ha').textContent, pools: {} };
document.querySelectorAll('section.card[data-pool]').forEach(function (sec) {
  var p = { meta: {}, servers: {}, chart_total: null, segments: [] };
  sec.querySelectorAll('h2 [data-field]').forEach(function (e) { p.meta[e.dataset.field] = e.textContent.trim(); });
  var chart = sec.querySelector('[data-field=share-chart]');
  if (chart) {
    p.chart_total = chart.dataset.total;
    chart.querySelectorAll('i[data-server]').forEach(function (i) { p.segments.push(i.dataset.server); });
  }
  sec.querySelectorAll('tr[data-server]').forEach(function (tr) {
    var f = {};
    tr.querySelectorAll('td[data-field]').forEach(function (td) { f[td.dataset.field] = td.textContent.trim(); });
    var marks = tr.querySelector('.marks');
    f.marks = marks ? Number(marks.dataset.checks) : 0;
    f.failed_marks = marks ? Number(marks.dataset.failed) : 0;
    f.buttons = Array.prototype.map.call(tr.querySelectorAll('button[data-action]'), function (b) { return b.dataset.action; });
    p.servers[tr.dataset.server] = f;
  });
  out.pools[sec.dataset.pool] = p;
});
return out;
"#;

async fn snapshot(browser: &fantoccini::Client) -> Value {
    browser
        .execute(SNAPSHOT, vec![])
        .await
        .expect("read the page")
}

/// A displayed number (`1,234`, `0.42`, `> 10,000`, `52.3%`), or None for `—` and the like.
fn number(text: &Value) -> Option<f64> {
    let t = text.as_str()?.replace([',', '>', ' ', '%'], "");
    t.parse().ok()
}

/// Polls the page until `ok` holds, for at most `within`; fails with the last snapshot.
async fn wait_page(
    browser: &fantoccini::Client,
    within: Duration,
    what: &str,
    ok: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let page = snapshot(browser).await;
        if ok(&page) {
            return page;
        }
        assert!(
            Instant::now() < deadline,
            "the page did not show {what} within {within:?}; it shows:\n{page:#}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn admin_get(admin: SocketAddr, path: &str) -> Value {
    let r = get(&client(), &format!("http://{admin}{path}")).await;
    assert_eq!(r.status, StatusCode::OK, "GET {path}: {}", r.body);
    serde_json::from_str(&r.body).unwrap()
}

async fn post_json(url: &str, body: Value) -> Reply {
    let req = Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    send(&client(), req).await
}

/// Requests through the balancer from 4 concurrent clients until `stop`, at most `max` of them and
/// for at most `for_at_most`; returns how many were answered 200.
fn spawn_load(
    web: SocketAddr,
    stop: Arc<AtomicBool>,
    max: u64,
    for_at_most: Duration,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let sent = Arc::new(AtomicU64::new(0));
        let deadline = Instant::now() + for_at_most;
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let (stop, sent) = (stop.clone(), sent.clone());
            tasks.push(tokio::spawn(async move {
                let c = client();
                let mut ok = 0;
                while !stop.load(Ordering::Relaxed)
                    && Instant::now() < deadline
                    && sent.fetch_add(1, Ordering::Relaxed) < max
                {
                    if get(&c, &format!("http://{web}/")).await.status == StatusCode::OK {
                        ok += 1;
                    }
                    // About 100 requests a second per client: enough to see, not a load test.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                ok
            }));
        }
        let mut ok = 0;
        for t in tasks {
            ok += t.await.unwrap();
        }
        ok
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_live_figures_and_its_drain_button_drains() {
    let started = Instant::now();
    let driver_bin = browser_binaries();
    let apps = apps(&["A", "B", "C"]).await;
    // C fails its health checks from the start: red marks, state down.
    let c = post_json(
        &format!("http://{}/health", apps[2].addr()),
        json!({"status": 503}),
    )
    .await;
    assert_eq!(c.status, StatusCode::OK, "{}", c.body);
    let lb = fulcrum(&config("round_robin", &servers(&apps), "", POOL_EXTRAS));
    let (web, admin) = (web(&lb), lb.admin_addr().expect("admin listener"));

    let driver = Chromedriver::start(&driver_bin).await;
    let browser = driver.browser().await;
    tokio::time::timeout(
        Duration::from_secs(60),
        browser.goto(&format!("http://{admin}/")),
    )
    .await
    .expect("the dashboard loads within 60 s")
    .expect("open the dashboard");

    // Pools and servers render, the page says it is live, and C goes down with failed marks.
    let page = wait_page(
        &browser,
        Duration::from_secs(60),
        "pool p with servers A, B, C, and C down",
        |p| {
            let s = &p["pools"]["p"]["servers"];
            p["conn"] == "live"
                && ["A", "B", "C"].iter().all(|n| s[n].is_object())
                && s["C"]["state"]
                    .as_str()
                    .is_some_and(|t| t.starts_with("down"))
                && s["C"]["failed_marks"].as_u64() >= Some(2)
                && s["A"]["marks"].as_u64() >= Some(1)
        },
    )
    .await;
    // No [ha]: the header says this instance stands alone.
    assert_eq!(page["ha"], "standalone");
    let before = |n: &str| number(&page["pools"]["p"]["servers"][n]["requests"]).unwrap();
    let (a0, b0) = (before("A"), before("B"));
    assert_eq!(
        page["pools"]["p"]["servers"]["A"]["buttons"],
        json!(["drain", "maint"])
    );

    // Some logins (each leaves its session cookie in the stick table), then steady load.
    for user in ["ada", "brian", "carol"] {
        let r = post_json(&format!("http://{web}/login"), json!({"user": user})).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    }
    let stop_load = Arc::new(AtomicBool::new(false));
    let load = spawn_load(web, stop_load.clone(), 20_000, Duration::from_secs(120));

    // The figures move: request counts grow past what they were, and rate, percentiles, the share
    // chart and the stick table size show up.
    let page = wait_page(
        &browser,
        Duration::from_secs(90),
        "requests, rates, p50/p99, the share chart and 3 stick-table entries",
        |p| {
            let pool = &p["pools"]["p"];
            let s = &pool["servers"];
            let n = |name: &str, f: &str| number(&s[name][f]);
            n("A", "requests").is_some_and(|v| v >= a0 + 20.0)
                && n("B", "requests").is_some_and(|v| v >= b0 + 20.0)
                && n("A", "rate").is_some_and(|v| v > 0.0)
                && number(&pool["meta"]["pool-rate"]).is_some_and(|v| v > 0.0)
                && n("A", "p50").is_some()
                && n("A", "p99").is_some()
                && n("A", "share").is_some_and(|v| v > 10.0)
                && pool["segments"] == json!(["A", "B"])
                && number(&pool["meta"]["sticky-entries"]) == Some(3.0)
                && number(&pool["meta"]["cache-hit-ratio"]).is_some()
        },
    )
    .await;
    // And they keep moving while the load goes on.
    let a1 = number(&page["pools"]["p"]["servers"]["A"]["requests"]).unwrap();
    wait_page(
        &browser,
        Duration::from_secs(60),
        "A's request count grow again",
        |p| number(&p["pools"]["p"]["servers"]["A"]["requests"]).is_some_and(|v| v > a1),
    )
    .await;
    // C, down, took none of them.
    let c_share = &page["pools"]["p"]["servers"]["C"]["share"];
    assert_eq!(number(c_share), Some(0.0), "C's share: {c_share}");

    // The drain button drains B (the load goes on, so the screenshot shows live figures). The page re-renders every second, so a click may find its button
    // replaced: find and click again until one lands.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last_error = String::new();
    loop {
        assert!(
            Instant::now() < deadline,
            "could not click B's drain button within 60 s: {last_error}"
        );
        let clicked = match browser
            .find(fantoccini::Locator::Css(
                r#"tr[data-server="B"] button[data-action="drain"]"#,
            ))
            .await
        {
            Ok(button) => button.click().await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match clicked {
            Ok(()) => break,
            Err(e) => last_error = e,
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let b = admin_get(admin, "/api/v1/pools/p/servers/B").await;
        if b["state"] == "draining" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "B is not draining 30 s after the click: {b}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let a = admin_get(admin, "/api/v1/pools/p/servers/A").await;
    assert_eq!(a["state"], "up", "only B was drained: {a}");
    wait_page(
        &browser,
        Duration::from_secs(30),
        "B draining with an up button",
        |p| {
            let b = &p["pools"]["p"]["servers"]["B"];
            b["state"]
                .as_str()
                .is_some_and(|t| t.starts_with("draining"))
                && b["buttons"] == json!(["maint", "ready"])
        },
    )
    .await;

    let png = tokio::time::timeout(Duration::from_secs(60), browser.screenshot())
        .await
        .expect("a screenshot within 60 s")
        .expect("screenshot");
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    let path = artifacts_dir().join("dashboard.png");
    std::fs::write(&path, &png).unwrap();
    eprintln!(
        "dashboard screenshot: {} ({} bytes); test took {:.1?}",
        path.display(),
        png.len(),
        started.elapsed()
    );

    stop_load.store(true, Ordering::Relaxed);
    let answered = load.await.unwrap();
    assert!(answered >= 40, "only {answered} requests answered");

    let _ = tokio::time::timeout(Duration::from_secs(30), browser.close()).await;
    drop(driver);
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pools_api_has_latency_buckets_check_history_and_the_stick_table_size() {
    let apps = apps(&["A", "B"]).await;
    let lb = fulcrum(&config("round_robin", &servers(&apps), "", POOL_EXTRAS));
    let (web, admin) = (web(&lb), lb.admin_addr().unwrap());
    for user in ["ada", "brian", "carol", "dave"] {
        let r = post_json(&format!("http://{web}/login"), json!({"user": user})).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    }
    pick_sequence(web, 20).await;

    // Checks every 200 ms: the history fills up to its bound of 20 and stays there.
    let deadline = Instant::now() + Duration::from_secs(60);
    let pool = loop {
        let pool = admin_get(admin, "/api/v1/pools/p").await;
        let full = pool["servers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["check_history"].as_array().unwrap().len() == 20);
        if full {
            break pool;
        }
        assert!(
            Instant::now() < deadline,
            "the check history did not reach 20 entries within 60 s: {pool:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    assert_eq!(
        pool["sticky"],
        json!({"kind": "app_cookie", "entries": 4, "bytes": pool["sticky"]["bytes"]})
    );
    assert!(pool["sticky"]["bytes"].as_u64().unwrap() > 4 * 32);

    let mut requests = 0;
    for s in pool["servers"].as_array().unwrap() {
        let history = s["check_history"].as_array().unwrap();
        let times: Vec<u64> = history
            .iter()
            .map(|m| m["at_unix_ms"].as_u64().unwrap())
            .collect();
        assert!(
            times.windows(2).all(|w| w[0] <= w[1]),
            "oldest first: {times:?}"
        );
        for m in history {
            assert_eq!(m["ok"], true, "{m}");
            assert_eq!(m["message"], "HTTP 200", "{m}");
            assert!(m["latency_ms"].as_f64().unwrap() >= 0.0);
        }

        let le: Vec<f64> = s["latency_buckets"]["le_ms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(le.len(), fulcrum::pool::LATENCY_BUCKETS.len());
        for (ms, s) in le.iter().zip(fulcrum::pool::LATENCY_BUCKETS) {
            assert!((ms - s * 1000.0).abs() < 1e-9, "{le:?}");
        }
        let counts: Vec<u64> = s["latency_buckets"]["counts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert_eq!(counts.len(), le.len() + 1, "a count per bound, then +Inf");
        assert!(
            counts.windows(2).all(|w| w[0] <= w[1]),
            "cumulative: {counts:?}"
        );
        assert_eq!(
            *counts.last().unwrap(),
            s["requests_total"].as_u64().unwrap(),
            "the +Inf bucket counts every response"
        );
        requests += s["requests_total"].as_u64().unwrap();
    }
    assert_eq!(requests, 24, "4 logins and 20 GETs");
    stop(lb).await;
}

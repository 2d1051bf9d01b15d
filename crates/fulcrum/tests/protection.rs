//! Hostile clients: each attack of the protection issue against a real balancer on 127.0.0.1, and
//! what must hold — slots freed, memory and CPU bounded, the right 4xx, other clients still served.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::process::*;
use common::*;
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `raw` on a new connection and returns what came back until the server closed or 5 s passed.
async fn raw_exchange(addr: SocketAddr, raw: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(raw).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn status_of(answer: &str) -> u16 {
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// True when a normal request gets 200 within `within`.
async fn served_within(addr: SocketAddr, within: Duration) -> bool {
    matches!(
        tokio::time::timeout(within, async {
            get(&client(), &format!("http://{addr}/")).await.status
        })
        .await,
        Ok(StatusCode::OK)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_only_start_a_preface_do_not_hold_the_slots() {
    let apps = apps(&["A"]).await;
    let lb = fulcrum(&config(
        "round_robin",
        &servers(&apps),
        "max_connections = 20\nidle_timeout = \"1s\"\nrequest_header_timeout = \"1s\"",
        "",
    ));
    let web = web(&lb);
    // 20 connections that send the start of the HTTP/2 preface, and 20 that send one byte of it.
    let mut hogs = Vec::new();
    for i in 0..40 {
        let mut s = TcpStream::connect(web).await.unwrap();
        s.write_all(if i % 2 == 0 { b"PRI " } else { b"P" })
            .await
            .unwrap();
        hogs.push(s);
    }
    // Every slot is taken for now; within a few idle timeouts they are closed and a client is served.
    assert!(
        served_within(web, Duration::from_secs(8)).await,
        "slots never freed"
    );
    // The hogs were closed by fulcrum (reads end: EOF or a reset; an HTTP/2 hog may first get the
    // server's SETTINGS and GOAWAY).
    for mut s in hogs {
        let mut buf = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
        assert!(r.is_ok(), "a hog was not closed");
    }
    let metrics = metrics(&lb).await;
    assert!(
        metrics.contains("fulcrum_listener_idle_timeouts_total{listener=\"web\"}"),
        "{metrics}"
    );
    stop(lb).await;
}

/// CPU seconds (user + system) used so far by process `pid`.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_one_byte_prefaces_cost_no_cpu() {
    let apps = apps(&["A"]).await;
    let (text, web, _admin) = fixed_ports(&config(
        "round_robin",
        &servers(&apps),
        "request_header_timeout = \"30s\"\nidle_timeout = \"30s\"",
        "",
    ));
    let dir = tempfile::tempdir().unwrap();
    let mut child = spawn_fulcrum(&write_config(&dir, &text));
    wait_listening(web).await;
    let mut hogs = Vec::new();
    for _ in 0..1000 {
        let mut s = TcpStream::connect(web).await.unwrap();
        s.write_all(b"P").await.unwrap();
        hogs.push(s);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = cpu_seconds(child.id());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let used = cpu_seconds(child.id()) - before;
    // A 1 ms re-peek per connection would burn seconds of CPU here; waiting on readiness burns none.
    assert!(
        used < 0.5,
        "{used} CPU seconds in 3 s for 1000 idle half-prefaces"
    );
    assert!(served_within(web, Duration::from_secs(5)).await);
    drop(hogs);
    signal(&child, "-TERM");
    tokio::task::spawn_blocking(move || wait_exit(&mut child, Duration::from_secs(20)))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_its_large_response_is_cut() {
    let apps = apps(&["A"]).await;
    let lb = fulcrum(&config(
        "round_robin",
        &servers(&apps),
        "write_timeout = \"1s\"",
        "",
    ));
    let web = web(&lb);
    let mut s = TcpStream::connect(web).await.unwrap();
    s.write_all(b"GET /bytes/50000000 HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    // Never read. Within a few write timeouts the request leaves the server and the connection closes.
    let pool = lb.shared().pool("p").unwrap();
    let server = pool.server("A").unwrap();
    let started = Instant::now();
    while server.stats.in_flight() == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the request never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    while server.stats.in_flight() > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the stalled client holds its request for ever"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let state = lb.shared().state();
    let stats = state.listeners[0].stats();
    let started = Instant::now();
    while stats
        .active_connections
        .load(std::sync::atomic::Ordering::Relaxed)
        > 0
    {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the slot was not freed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        stats
            .write_timeouts
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    drop(s);
    // The body went kernel to kernel until the client stopped taking it.
    assert!(
        stats
            .spliced_bytes
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_tunnels_count_against_the_limits_and_time_out_when_idle() {
    let apps = apps(&["A"]).await;
    let lb = fulcrum(&config(
        "round_robin",
        &servers(&apps),
        "max_connections = 2\ntunnel_timeout = \"2s\"",
        "",
    ));
    let web = web(&lb);
    let (ws1, _) = tokio_tungstenite::connect_async(format!("ws://{web}/ws"))
        .await
        .unwrap();
    let (ws2, _) = tokio_tungstenite::connect_async(format!("ws://{web}/ws"))
        .await
        .unwrap();
    // Two tunnels hold both slots: a third client waits.
    assert!(
        !served_within(web, Duration::from_millis(700)).await,
        "a third connection was served while two tunnels held the two slots"
    );
    // Idle tunnels close after tunnel_timeout and free their slots.
    assert!(
        served_within(web, Duration::from_secs(10)).await,
        "idle tunnels never freed their slots"
    );
    drop((ws1, ws2));
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_ends_open_tunnels_at_the_deadline() {
    let apps = apps(&["A"]).await;
    let text = config("round_robin", &servers(&apps), "", "")
        .replace("shutdown_timeout = \"5s\"", "shutdown_timeout = \"1s\"");
    let lb = fulcrum(&text);
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", web(&lb)))
        .await
        .unwrap();
    let started = Instant::now();
    let clean = tokio::task::spawn_blocking(move || lb.stop())
        .await
        .unwrap();
    assert!(
        !clean,
        "an open tunnel is still open when the drain starts: the drain waits for it"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    use futures_util::StreamExt;
    let next = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap();
    assert!(
        !matches!(
            next,
            Some(Ok(tokio_tungstenite::tungstenite::Message::Text(_)))
        ),
        "{next:?}"
    );
}

/// A head within a raised `max_header_size` whose request target is longer than a URI holds gets
/// 414 (URI Too Long), not 400; a target just within the limit is passed on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_target_too_long_for_a_uri_gets_414() {
    let apps = apps(&["A"]).await;
    let lb = fulcrum(&config(
        "round_robin",
        &servers(&apps),
        "max_header_size = \"1MiB\"",
        "",
    ));
    let web = web(&lb);
    let request = |len: usize| {
        format!(
            "GET /{} HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
            "a".repeat(len - 1)
        )
    };
    let over = raw_exchange(web, request(70_000).as_bytes()).await;
    assert_eq!(status_of(&over), 414, "{}", &over[..over.len().min(200)]);
    let within = raw_exchange(web, request(60_000).as_bytes()).await;
    assert_ne!(
        status_of(&within),
        414,
        "{}",
        &within[..within.len().min(200)]
    );
    assert_ne!(
        status_of(&within),
        400,
        "{}",
        &within[..within.len().min(200)]
    );
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_must_name_their_host_once_and_keep_their_heads_small() {
    let apps = apps(&["A"]).await;
    let lb = fulcrum(&config(
        "round_robin",
        &servers(&apps),
        "max_headers = 20\nmax_header_size = \"16KiB\"",
        "",
    ));
    let web = web(&lb);
    let no_host = raw_exchange(web, b"GET / HTTP/1.1\r\n\r\n").await;
    assert_eq!(status_of(&no_host), 400, "{no_host}");
    let two_hosts = raw_exchange(web, b"GET / HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n").await;
    assert_eq!(status_of(&two_hosts), 400, "{two_hosts}");
    let big = format!(
        "GET / HTTP/1.1\r\nhost: a\r\nx-big: {}\r\n\r\n",
        "a".repeat(200_000)
    );
    let big = raw_exchange(web, big.as_bytes()).await;
    assert_eq!(status_of(&big), 431, "{}", &big[..big.len().min(200)]);
    let many: String = (0..40).map(|i| format!("x-h{i}: v\r\n")).collect();
    let many = raw_exchange(
        web,
        format!("GET / HTTP/1.1\r\nhost: a\r\n{many}\r\n").as_bytes(),
    )
    .await;
    assert_eq!(status_of(&many), 431, "{many}");
    // HTTP/1.0 without Host is fine, but a client's own X-Forwarded-Host never reaches the server.
    let old = raw_exchange(
        web,
        b"GET / HTTP/1.0\r\nx-forwarded-host: evil.example\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&old), 200, "{old}");
    assert!(!old.contains("evil.example"), "{old}");
    // A good request still passes.
    let good = raw_exchange(
        web,
        b"GET / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&good), 200, "{good}");
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_route_limit_get_413() {
    let apps = apps(&["A"]).await;
    let listener_extra = "max_body_size = \"1MiB\"\n\n  [[listeners.routes]]\n  path_prefix = \"/small/\"\n  pool = \"p\"\n  max_body_size = 1024\n";
    let lb = fulcrum(&config("round_robin", &servers(&apps), listener_extra, ""));
    let web = web(&lb);
    let post = |path: &str, n: usize| {
        format!(
            "POST {path} HTTP/1.1\r\nhost: a\r\ncontent-length: {n}\r\nconnection: close\r\n\r\n{}",
            "x".repeat(n)
        )
    };
    assert_eq!(
        status_of(&raw_exchange(web, post("/small/x", 5000).as_bytes()).await),
        413
    );
    assert_eq!(
        status_of(&raw_exchange(web, post("/echo", 5000).as_bytes()).await),
        200
    );
    let huge = format!(
        "POST /echo HTTP/1.1\r\nhost: a\r\ncontent-length: {}\r\n\r\n",
        2 << 20
    );
    assert_eq!(status_of(&raw_exchange(web, huge.as_bytes()).await), 413);
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_address_gets_only_its_share_of_connections() {
    let apps = apps(&["A"]).await;
    let lb = fulcrum(&config(
        "round_robin",
        &servers(&apps),
        "max_connections_per_ip = 2",
        "",
    ));
    let web = web(&lb);
    let a = TcpStream::connect(web).await.unwrap();
    let b = TcpStream::connect(web).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The third from 127.0.0.1 is closed at once.
    let third = raw_exchange(web, b"GET / HTTP/1.1\r\nhost: a\r\n\r\n").await;
    assert_eq!(
        third, "",
        "over the per-address limit: closed without an answer"
    );
    // Another address is served.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut other = socket.connect(web).await.unwrap();
    other
        .write_all(b"GET / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    other.read_to_end(&mut out).await.unwrap();
    assert_eq!(status_of(&String::from_utf8_lossy(&out)), 200);
    // Once one closes, 127.0.0.1 may connect again.
    drop(a);
    let started = Instant::now();
    loop {
        let r = raw_exchange(
            web,
            b"GET / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
        )
        .await;
        if status_of(&r) == 200 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the freed share was not given back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let state = lb.shared().state();
    assert!(
        state.listeners[0]
            .stats()
            .refused_per_ip
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    drop(b);
    stop(lb).await;
}

/// `GET /` through `addr` with `cookie`; returns the server and the `Set-Cookie` sent back, if any.
async fn with_cookie(addr: SocketAddr, cookie: &str) -> (String, Option<String>) {
    let req = http::Request::get(format!("http://{addr}/"))
        .header("cookie", cookie)
        .body(http_body_util::Full::<bytes::Bytes>::default())
        .unwrap();
    let r = send(&client(), req).await;
    assert_eq!(r.status, StatusCode::OK);
    let set = r
        .headers
        .get("set-cookie")
        .map(|v| v.to_str().unwrap().split(';').next().unwrap().to_string());
    (r.server(), set)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_cookies_cannot_be_forged_and_a_shared_secret_is_shared() {
    let apps = apps(&["A", "B", "C"]).await;
    let sticky = "[pools.sticky]\nkind = \"cookie\"\nsecret = \"0123456789abcdef-shared\"";
    let lb1 = fulcrum(&config("round_robin", &servers(&apps), "", sticky));
    let lb2 = fulcrum(&config("round_robin", &servers(&apps), "", sticky));
    let other = fulcrum(&config(
        "round_robin",
        &servers(&apps),
        "",
        "[pools.sticky]\nkind = \"cookie\"\nsecret = \"another-secret-of-16+\"",
    ));
    let (at, set) = with_cookie(web(&lb1), "x=1").await;
    let cookie = set.expect("a sticky cookie");
    // The same secret: the other instance honours it, every time.
    for _ in 0..6 {
        assert_eq!(with_cookie(web(&lb2), &cookie).await.0, at);
    }
    // Another secret: not recognised; the client is balanced and gets that instance's cookie.
    let (_, reissued) = with_cookie(web(&other), &cookie).await;
    assert!(
        reissued.is_some_and(|c| c != cookie),
        "a foreign cookie is replaced"
    );
    // Made-up values (random, or a plain hash of a name) pin nobody.
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..9 {
        let forged = format!(
            "FULCRUM_SRV={:032x}",
            0x1234_5678_9abc_def0_u128.wrapping_mul(i + 1)
        );
        let (server, set) = with_cookie(web(&lb1), &forged).await;
        assert!(set.is_some(), "a forged cookie is replaced by a real one");
        seen.insert(server);
    }
    assert_eq!(
        seen.len(),
        3,
        "forged cookies are balanced like no cookie: {seen:?}"
    );
    for lb in [lb1, lb2, other] {
        stop(lb).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_app_cookie_values_are_never_stored() {
    let apps = apps(&["A", "B"]).await;
    let lb = fulcrum(&config(
        "round_robin",
        &servers(&apps),
        "",
        "[pools.sticky]\nkind = \"app_cookie\"\ncookie = \"SESSIONID\"",
    ));
    let web = web(&lb);
    let big = "v".repeat(60_000);
    for i in 0..300 {
        let value = if i % 2 == 0 {
            format!("made-up-{i}")
        } else {
            format!("{big}{i}")
        };
        let req = http::Request::get(format!("http://{web}/"))
            .header("cookie", format!("SESSIONID={value}"))
            .body(http_body_util::Full::<bytes::Bytes>::default())
            .unwrap();
        assert_eq!(send(&client(), req).await.status, StatusCode::OK);
    }
    let state = lb.shared().state();
    let table = state.pools[0].sticky.as_ref().unwrap().table();
    assert_eq!(table.len(), 0, "client-made session ids were stored");
    // A session the server creates is learned.
    let r = send(
        &client(),
        http::Request::post(format!("http://{web}/login"))
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                b"{\"user\":\"martin\"}",
            )))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(table.len(), 1);
    stop(lb).await;
}

/// A raw `GET path` from the local address `from`; the answer's status (0: closed without one).
async fn get_from(from: &str, addr: SocketAddr, path: &str) -> (u16, String) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let mut s = socket.connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n");
    let _ = s.write_all(req.as_bytes()).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    (status_of(&text), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_its_rate_gets_429_and_others_are_unaffected() {
    let apps = apps(&["A"]).await;
    let lb = fulcrum(&config(
        "round_robin",
        &servers(&apps),
        "rate_limit = { rate = 5, per = \"10s\", burst = 5 }",
        "",
    ));
    let web = web(&lb);
    let mut statuses = Vec::new();
    for _ in 0..8 {
        statuses.push(get_from("127.0.0.1", web, "/").await.0);
    }
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429, 429, 429]);
    let (status, text) = get_from("127.0.0.1", web, "/").await;
    assert_eq!(status, 429);
    let retry: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("retry-after: "))
        .expect("Retry-After")
        .trim()
        .parse()
        .unwrap();
    assert!((1..=10).contains(&retry), "{retry}");
    // Another client address has its own bucket.
    assert_eq!(get_from("127.0.0.2", web, "/").await.0, 200);
    let metrics = metrics(&lb).await;
    assert!(
        metrics.contains("fulcrum_rate_limited_requests_total{listener=\"web\"} 4"),
        "{metrics}"
    );
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scanner_collecting_404s_is_banned_then_let_back_in() {
    let apps = apps(&["A"]).await;
    let lb = fulcrum(&config(
        "round_robin",
        &servers(&apps),
        "auto_ban = { window = \"10s\", max_errors = 5, ban = \"2s\" }",
        "",
    ));
    let web = web(&lb);
    // fulcrum-app answers 404 to unknown paths: a scanner's walk.
    let mut statuses = Vec::new();
    for i in 0..10 {
        statuses.push(
            get_from("127.0.0.3", web, &format!("/wp-admin/{i}"))
                .await
                .0,
        );
    }
    assert!(statuses[..5].iter().all(|&s| s == 404), "{statuses:?}");
    // Banned: refused at accept (closed without an answer) or 403 on an open connection.
    let banned_at = statuses
        .iter()
        .position(|&s| s == 0 || s == 403)
        .expect("never banned");
    assert!(banned_at <= 7, "{statuses:?}");
    let bans = get(
        &client(),
        &format!(
            "http://{}/api/v1/listeners/web/bans",
            lb.admin_addr().unwrap()
        ),
    )
    .await;
    assert!(bans.body.contains("127.0.0.3"), "{}", bans.body);
    // Others are served meanwhile.
    assert_eq!(get_from("127.0.0.1", web, "/").await.0, 200);
    // After the ban, the scanner's address is served again.
    let started = Instant::now();
    while get_from("127.0.0.3", web, "/").await.0 != 200 {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "never unbanned"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_lists_refuse_at_accept_and_the_admin_api_edits_lists_and_bans() {
    let apps = apps(&["A"]).await;
    let listener = "deny = [\"127.0.0.4/32\"]\n\n  [[listeners.routes]]\n  path_prefix = \"/internal/\"\n  pool = \"p\"\n  allow = [\"127.0.0.1\"]\n";
    let lb = fulcrum(&config("round_robin", &servers(&apps), listener, ""));
    let web = web(&lb);
    let admin = lb.admin_addr().unwrap();
    assert_eq!(
        get_from("127.0.0.4", web, "/").await.0,
        0,
        "denied at accept"
    );
    assert_eq!(get_from("127.0.0.1", web, "/").await.0, 200);
    assert_eq!(
        get_from("127.0.0.5", web, "/internal/x").await.0,
        403,
        "route allow list"
    );
    assert_eq!(
        get_from("127.0.0.1", web, "/internal/x").await.0,
        404,
        "allowed through to the app"
    );

    let call = |method: http::Method, path: &str, body: Option<&str>| {
        let mut req = http::Request::builder()
            .method(method)
            .uri(format!("http://{admin}{path}"));
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let body = http_body_util::Full::new(bytes::Bytes::from(body.unwrap_or("").to_string()));
        let req = req.body(body).unwrap();
        async move { send(&client(), req).await }
    };
    // Lists: replace the deny list; 127.0.0.4 gets in, 127.0.0.6 does not.
    let r = call(
        http::Method::PUT,
        "/api/v1/listeners/web/access",
        Some("{\"deny\": [\"127.0.0.6\"]}"),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(r.body.contains("127.0.0.6/32"), "{}", r.body);
    assert_eq!(get_from("127.0.0.4", web, "/").await.0, 200);
    assert_eq!(get_from("127.0.0.6", web, "/").await.0, 0);
    let r = call(
        http::Method::PUT,
        "/api/v1/listeners/web/access",
        Some("{\"deny\": [\"10.0.0.1/8\"]}"),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    assert!(r.body.contains("\"field\":\"deny\""), "{}", r.body);
    // Bans: ban 127.0.0.7, see it listed, lift it.
    let r = call(
        http::Method::POST,
        "/api/v1/listeners/web/bans",
        Some("{\"ip\": \"127.0.0.7\", \"duration\": \"1h\", \"note\": \"test\"}"),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(get_from("127.0.0.7", web, "/").await.0, 0);
    let r = call(http::Method::GET, "/api/v1/listeners/web/bans", None).await;
    assert!(
        r.body.contains("127.0.0.7") && r.body.contains("test"),
        "{}",
        r.body
    );
    let r = call(
        http::Method::DELETE,
        "/api/v1/listeners/web/bans/127.0.0.7",
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(get_from("127.0.0.7", web, "/").await.0, 200);
    let r = call(
        http::Method::DELETE,
        "/api/v1/listeners/web/bans/127.0.0.7",
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = call(http::Method::GET, "/api/v1/listeners/nope/bans", None).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_patterns_get_403_and_are_counted_per_rule() {
    let apps = apps(&["A"]).await;
    let listener = "block = [\"path_traversal\", \"scanners\"]\n\n  [[listeners.block_rules]]\n  name = \"no-debug\"\n  target = \"query\"\n  contains = \"debug=1\"\n";
    let lb = fulcrum(&config("round_robin", &servers(&apps), listener, ""));
    let web = web(&lb);
    for path in [
        "/../../etc/passwd",
        "/static/%2e%2e/%2e%2e/etc/passwd",
        "/.git/config",
        "/.env",
        "/x?debug=1",
    ] {
        let (status, text) = get_from("127.0.0.1", web, path).await;
        assert_eq!(status, 403, "{path}: {text}");
    }
    // Ordinary requests pass (the app answers: 200, or 404 for a file it does not have).
    for path in ["/", "/static/app.js", "/?page=2"] {
        let status = get_from("127.0.0.1", web, path).await.0;
        assert!(status == 200 || status == 404, "{path}: {status}");
    }
    let metrics = metrics(&lb).await;
    assert!(
        metrics.contains("fulcrum_blocked_requests_total{listener=\"web\",rule=\"no-debug\"} 1"),
        "{metrics}"
    );
    let traversal: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("fulcrum_blocked_requests_total") && l.contains("path_traversal"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(traversal, 2, "{metrics}");
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_the_per_server_limit_wait_in_a_bounded_queue() {
    let apps = apps(&["A", "B"]).await;
    let lb = fulcrum(&config(
        "round_robin",
        &servers(&apps),
        "",
        "max_connections_per_server = 1\nmax_queue = 4\nqueue_timeout = \"30s\"",
    ));
    let web = web(&lb);
    let pool = lb.shared().pool("p").unwrap();
    // Watch the servers: never more than one request in flight on either.
    let watching = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let peak = {
        let (pool, watching) = (pool.clone(), watching.clone());
        tokio::spawn(async move {
            let mut peak = 0;
            while watching.load(std::sync::atomic::Ordering::Relaxed) {
                for s in pool.snapshot().servers.iter() {
                    peak = peak.max(s.stats.in_flight());
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            peak
        })
    };
    // Six slow requests at once: two served, four queued, all answered.
    let started = Instant::now();
    let slow: Vec<_> = (0..6)
        .map(|_| {
            tokio::spawn(async move {
                get(&client(), &format!("http://{web}/delay/400"))
                    .await
                    .status
            })
        })
        .collect();
    for s in slow {
        assert_eq!(s.await.unwrap(), StatusCode::OK);
    }
    assert!(
        started.elapsed() >= Duration::from_millis(1100),
        "three rounds of 400 ms: {:?}",
        started.elapsed()
    );
    watching.store(false, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(peak.await.unwrap(), 1, "a server took more than its limit");

    // Room for two in flight and four waiting. Six slow requests fill it; once the pool shows them
    // all (two in flight, four queued), two more are refused with 503 at once. Ordered by what the
    // pool reports, not by timing, so a loaded machine cannot let a late request find a freed slot.
    let queue = pool.snapshot().servers[0].queue.clone();
    let filling: Vec<_> = (0..6)
        .map(|_| {
            tokio::spawn(async move {
                get(&client(), &format!("http://{web}/delay/3000"))
                    .await
                    .status
            })
        })
        .collect();
    let full_by = Instant::now() + Duration::from_secs(20);
    loop {
        let in_flight: u64 = pool
            .snapshot()
            .servers
            .iter()
            .map(|s| s.stats.in_flight() as u64)
            .sum();
        if in_flight == 2 && queue.waiting() == 4 {
            break;
        }
        assert!(
            Instant::now() < full_by,
            "in flight {in_flight}, queued {}",
            queue.waiting()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for _ in 0..2 {
        let refused = get(&client(), &format!("http://{web}/delay/10")).await;
        assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    }
    for s in filling {
        assert_eq!(s.await.unwrap(), StatusCode::OK);
    }
    let metrics = metrics(&lb).await;
    assert!(
        metrics.contains("fulcrum_pool_queue_refused_total{pool=\"p\"} 2"),
        "{metrics}"
    );
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_waits_queue_timeout_in_vain_gets_503() {
    let apps = apps(&["A"]).await;
    let lb = fulcrum(&config(
        "round_robin",
        &servers(&apps),
        "",
        "max_connections_per_server = 1\nqueue_timeout = \"300ms\"",
    ));
    let web = web(&lb);
    let slow = tokio::spawn(async move {
        get(&client(), &format!("http://{web}/delay/3000"))
            .await
            .status
    });
    let pool = lb.shared().pool("p").unwrap();
    while pool.server("A").unwrap().stats.in_flight() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let started = Instant::now();
    let r = get(&client(), &format!("http://{web}/")).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_millis(2500),
        "{waited:?}"
    );
    assert_eq!(slow.await.unwrap(), StatusCode::OK);
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_port_closes_slow_clients_and_keeps_answering() {
    let apps = apps(&["A"]).await;
    let lb = fulcrum(&config("round_robin", &servers(&apps), "", ""));
    let admin = lb.admin_addr().unwrap();
    let mut slow = Vec::new();
    for _ in 0..50 {
        let mut s = TcpStream::connect(admin).await.unwrap();
        s.write_all(b"GET /api/v1/pools HTTP/1.1\r\nhost: a\r\n")
            .await
            .unwrap();
        slow.push(s);
    }
    // Others are answered meanwhile.
    assert_eq!(
        get(&client(), &format!("http://{admin}/healthz"))
            .await
            .status,
        StatusCode::OK
    );
    // The unfinished heads are cut after the admin's header timeout (10 s).
    let started = Instant::now();
    for mut s in slow {
        let mut buf = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut buf)).await;
        assert!(r.is_ok(), "a slow admin client was never closed");
    }
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    stop(lb).await;
}

/// A throwaway redis-server on a free loopback port (scripts/test.sh installs it).
struct Redis {
    child: std::process::Child,
    port: u16,
}

impl Redis {
    async fn start() -> Redis {
        let port = free_port().port();
        let dir = tempfile::tempdir().unwrap();
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
            ])
            .arg("--dir")
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (scripts/test.sh installs it)");
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "redis-server did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        std::mem::forget(dir);
        Redis { child, port }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_rate_limit_holds_across_two_instances() {
    let redis = Redis::start().await;
    let apps = apps(&["A"]).await;
    let text = format!(
        "{}\n[store]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:{}\"\nkey_prefix = \"rl-test\"\n",
        config(
            "round_robin",
            &servers(&apps),
            "rate_limit = { rate = 6, per = \"1m\", shared = true }",
            "",
        ),
        redis.port,
    );
    let lb1 = fulcrum(&text);
    let lb2 = fulcrum(&text);
    // Warm up: each instance connects to Redis (with another client address); a connect slower than
    // the 100 ms command bound trips the 1 s breaker, so give that time to pass.
    for lb in [&lb1, &lb2] {
        assert_eq!(get_from("127.0.0.9", web(lb), "/").await.0, 200);
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let mut statuses = Vec::new();
    for i in 0..10 {
        let web = if i % 2 == 0 { web(&lb1) } else { web(&lb2) };
        statuses.push(get_from("127.0.0.1", web, "/").await.0);
    }
    // Six for the whole fleet in this minute, whichever instance answers (unless the minute turned
    // over during the loop, which at most doubles the allowance).
    let ok = statuses.iter().filter(|&&s| s == 200).count();
    assert!(
        ok == 6 || (ok > 6 && ok <= 10 && statuses.contains(&429)),
        "{statuses:?}"
    );
    assert!(
        statuses.iter().all(|&s| s == 200 || s == 429),
        "{statuses:?}"
    );
    assert_eq!(&statuses[..6], &[200; 6], "{statuses:?}");
    // Alone, each instance would have allowed six (five each here): all ten would have passed.
    assert!(statuses.contains(&429), "{statuses:?}");
    // Another address has its own count.
    assert_eq!(get_from("127.0.0.2", web(&lb2), "/").await.0, 200);
    stop(lb1).await;
    stop(lb2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_uploads_get_408_and_never_count_against_the_server() {
    let apps = apps(&["A"]).await;
    let lb = fulcrum(&config(
        "round_robin",
        &servers(&apps),
        "body_timeout = \"1s\"",
        "response_timeout = \"2s\"\n[pools.passive]\nconsecutive_failures = 2\nbase_ejection = \"60s\"",
    ));
    let web = web(&lb);
    // Five uploads that stall after a few bytes (longer than the response timeout, too).
    let mut stalled = Vec::new();
    for _ in 0..5 {
        stalled.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(web).await.unwrap();
            s.write_all(
                b"POST /sha256 HTTP/1.1\r\nhost: a\r\ncontent-length: 100000\r\n\r\nsome bytes",
            )
            .await
            .unwrap();
            let mut out = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
            status_of(&String::from_utf8_lossy(&out))
        }));
    }
    for s in stalled {
        assert_eq!(s.await.unwrap(), 408);
    }
    let server = lb.shared().pool("p").unwrap().server("A").unwrap();
    assert_eq!(
        server.stats.failures_total(),
        0,
        "the client's stall was blamed on the server"
    );
    assert!(!server.health.is_ejected(), "a healthy server was ejected");
    assert!(served_within(web, Duration::from_secs(5)).await);
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_over_the_limit_gets_413() {
    let apps = apps(&["A"]).await;
    let lb = fulcrum(&config(
        "round_robin",
        &servers(&apps),
        "max_body_size = 1000",
        "",
    ));
    let web = web(&lb);
    let mut raw = b"POST /echo HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n".to_vec();
    for _ in 0..5 {
        raw.extend_from_slice(b"190\r\n");
        raw.extend_from_slice(&[b'x'; 400]);
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"0\r\n\r\n");
    assert_eq!(status_of(&raw_exchange(web, &raw).await), 413);
    let small = b"POST /echo HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    assert_eq!(status_of(&raw_exchange(web, small).await), 200);
    let server = lb.shared().pool("p").unwrap().server("A").unwrap();
    assert_eq!(server.stats.failures_total(), 0);
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_rapid_reset_flood_ends_the_connection_and_others_are_served() {
    let apps = apps(&["A"]).await;
    let lb = fulcrum(&config("round_robin", &servers(&apps), "", ""));
    let web = web(&lb);
    let tcp = TcpStream::connect(web).await.unwrap();
    let (mut h2, conn) = h2::client::handshake(tcp).await.unwrap();
    let driver = tokio::spawn(conn);
    // Open streams and reset each at once (CVE-2023-44487): the server must give up on this
    // connection long before 20,000 of them (the client queues frames faster than a loaded server
    // reads them, so the count it sees is well above the server's limit).
    let mut sent = 0;
    for _ in 0..20_000 {
        let ready = match tokio::time::timeout(Duration::from_secs(5), h2.clone().ready()).await {
            Ok(Ok(ready)) => ready,
            _ => break,
        };
        h2 = ready;
        let req = http::Request::get(format!("http://{web}/delay/100"))
            .body(())
            .unwrap();
        match h2.send_request(req, true) {
            Ok((_, mut stream)) => {
                stream.send_reset(h2::Reason::CANCEL);
                sent += 1;
            }
            Err(_) => break,
        }
    }
    let ended = tokio::time::timeout(Duration::from_secs(10), driver).await;
    eprintln!("rapid reset: the server ended the connection after {sent} reset streams: {ended:?}");
    // The server says GOAWAY ENHANCE_YOUR_CALM and closes; a client still writing its resets when
    // the socket closes sees that as a broken pipe or a reset instead.
    let why = format!("{ended:?}");
    let ended_by_server = why.contains("ENHANCE_YOUR_CALM")
        || why.contains("BrokenPipe")
        || why.contains("ConnectionReset");
    assert!(
        sent < 20_000 && ended_by_server,
        "the connection survived {sent} rapid resets: {why}"
    );
    // Other clients are served.
    assert!(served_within(web, Duration::from_secs(5)).await);
    stop(lb).await;
}

/// The `fulcrum_listener_connections_parked` gauge of listener `web`.
async fn parked(lb: &fulcrum::runtime::Running) -> i64 {
    let metrics = metrics(lb).await;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("fulcrum_listener_connections_parked{listener=\"web\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no parked gauge: {metrics}"))
}

/// Sends a keep-alive `GET /` on `s` and reads its whole answer; the status.
async fn keep_alive_get(s: &mut TcpStream) -> u16 {
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    read_answers(s, 1).await[0]
}

/// Reads `n` whole answers (each framed by its `Content-Length`) from `s`; their statuses.
async fn read_answers(s: &mut TcpStream, n: usize) -> Vec<u16> {
    let mut got: Vec<u8> = Vec::new();
    let mut statuses = Vec::new();
    let mut buf = [0u8; 4096];
    while statuses.len() < n {
        // Whole answers at the front of what was read are taken off it.
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).into_owned();
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .expect("content-length");
            if got.len() >= end + 4 + length {
                statuses.push(status_of(&head));
                got.drain(..end + 4 + length);
                continue;
            }
        }
        let r = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("no answer")
            .unwrap();
        assert!(r > 0, "closed before the answers ended");
        got.extend_from_slice(&buf[..r]);
    }
    statuses
}

/// Polls `parked` until it is `want` (or 15 s pass).
async fn wait_parked(lb: &fulcrum::runtime::Running, want: i64) {
    let by = Instant::now() + Duration::from_secs(15);
    loop {
        let now = parked(lb).await;
        if now == want {
            return;
        }
        assert!(Instant::now() < by, "{now} connections parked, not {want}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_keep_alive_connection_parks_and_is_served_when_it_speaks_again() {
    let apps = apps(&["A"]).await;
    let lb = fulcrum(&config(
        "round_robin",
        &servers(&apps),
        "idle_timeout = \"60s\"\nrequest_header_timeout = \"60s\"",
        "",
    ));
    let web = web(&lb);
    let mut conns = Vec::new();
    for _ in 0..20 {
        let mut s = TcpStream::connect(web).await.unwrap();
        assert_eq!(keep_alive_get(&mut s).await, 200);
        conns.push(s);
    }
    // 100 ms past its last answer each of them gives up its task.
    wait_parked(&lb, 20).await;
    // Each is served again on the same connection: a whole request, a request in two parts, and two
    // pipelined requests.
    for (i, s) in conns.iter_mut().enumerate() {
        match i % 3 {
            0 => assert_eq!(keep_alive_get(s).await, 200),
            1 => {
                s.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
                s.write_all(b"host: x\r\n\r\n").await.unwrap();
                assert_eq!(read_answers(s, 1).await, [200]);
            }
            _ => {
                s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\nGET / HTTP/1.1\r\nhost: x\r\n\r\n")
                    .await
                    .unwrap();
                assert_eq!(read_answers(s, 2).await, [200, 200]);
            }
        }
    }
    // Every one of them parks again, and all of them are still open.
    wait_parked(&lb, 20).await;
    for s in conns.iter_mut() {
        assert_eq!(keep_alive_get(s).await, 200);
    }
    // A client that closes its parked connection frees it.
    wait_parked(&lb, 20).await;
    conns.truncate(5);
    wait_parked(&lb, 5).await;
    // The listener stops: the parked connections close at once.
    let stopping = Instant::now();
    stop(lb).await;
    for mut s in conns {
        let mut rest = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest)).await;
        assert!(r.is_ok(), "a parked connection stayed open after the stop");
    }
    assert!(stopping.elapsed() < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_connection_closes_at_its_idle_timeout() {
    let apps = apps(&["A"]).await;
    let lb = fulcrum(&config(
        "round_robin",
        &servers(&apps),
        "idle_timeout = \"3s\"\nrequest_header_timeout = \"30s\"",
        "",
    ));
    let web = web(&lb);
    let mut conns = Vec::new();
    let answered = Instant::now();
    for _ in 0..10 {
        let mut s = TcpStream::connect(web).await.unwrap();
        assert_eq!(keep_alive_get(&mut s).await, 200);
        conns.push(s);
    }
    wait_parked(&lb, 10).await;
    // Closed by the listener's sweep once 3 s have passed since each answer: not before, and not
    // much after (the sweep runs every 250 ms; 10 s allows for a loaded machine).
    for mut s in conns {
        let mut rest = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut rest)).await;
        assert!(r.is_ok(), "a parked connection outlived its idle timeout");
        assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    }
    let waited = answered.elapsed();
    assert!(
        waited >= Duration::from_millis(2900) && waited < Duration::from_secs(15),
        "{waited:?}"
    );
    assert_eq!(parked(&lb).await, 0);
    let metrics = metrics(&lb).await;
    assert!(
        metrics.contains("fulcrum_listener_idle_timeouts_total{listener=\"web\"} 10"),
        "{metrics}"
    );
    stop(lb).await;
}

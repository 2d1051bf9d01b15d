//! The runtime-control proof: a minute of steady load through a `fulcrum` process while it is changed
//! in every way an operator changes a running balancer — a server added, one drained while slow
//! requests are in flight on it, one removed, one put in maintenance, a weight changed, ten reloads (one
//! invalid, one adding a listener, one removing a server) and a binary takeover by a second process.
//! Every request opens a new connection and every response is checked: none may fail, no connection
//! may be refused.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::process::*;
use common::*;
use fulcrum_app::AppHandle;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};

/// What the load saw.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    slow_ok: AtomicU64,
    failures: Mutex<Vec<String>>,
}

/// One request on a new connection; `Err` describes a failure.
async fn one(addr: SocketAddr, path: &str) -> Result<String, String> {
    let stream = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    .map_err(|_| "connect timed out".to_string())?
    .map_err(|e| format!("connect: {e}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", addr.to_string())
        .body(Full::<Bytes>::default())
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(20), sender.send_request(req))
        .await
        .map_err(|_| "no answer in 20 s".to_string())?
        .map_err(|e| format!("request: {e}"))?;
    let status = resp.status();
    let server = resp
        .headers()
        .get("x-server")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?;
    if status != StatusCode::OK || server.is_empty() {
        return Err(format!(
            "{status} from {server:?}: {}",
            String::from_utf8_lossy(&body.to_bytes())
        ));
    }
    Ok(server)
}

/// Loops `path` requests through `addr` until `stop`, counting into `tally`.
fn load(
    addr: SocketAddr,
    path: &'static str,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            match one(addr, path).await {
                Ok(_) if path == "/" => tally.ok.fetch_add(1, Ordering::Relaxed),
                Ok(_) => tally.slow_ok.fetch_add(1, Ordering::Relaxed),
                Err(e) => {
                    tally.failures.lock().unwrap().push(format!("{path}: {e}"));
                    0
                }
            };
        }
    })
}

async fn admin_call(
    admin: SocketAddr,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://{admin}{path}"));
    let body = match body {
        Some(v) => {
            req = req.header("content-type", "application/json");
            Full::new(Bytes::from(v.to_string()))
        }
        None => Full::default(),
    };
    let r = send(&client(), req.body(body).unwrap()).await;
    (
        r.status,
        serde_json::from_str(&r.body).unwrap_or(Value::Null),
    )
}

/// The configuration file: listener `web` and the admin on fixed ports, pool `p` over `servers`.
fn file(
    web: SocketAddr,
    admin: SocketAddr,
    apps: &[AppHandle],
    servers: &[usize],
    extra: &str,
) -> String {
    let list: Vec<String> = servers
        .iter()
        .map(|&i| {
            format!(
                "{{ name = \"{}\", address = \"{}\" }}",
                (b'A' + i as u8) as char,
                apps[i].addr()
            )
        })
        .collect();
    format!(
        "shutdown_timeout = \"20s\"\n[admin]\nbind = \"{admin}\"\n\n\
         [[listeners]]\nname = \"web\"\nbind = \"{web}\"\nprotocol = \"http\"\npool = \"p\"\n\n\
         [[pools]]\nname = \"p\"\nalgorithm = \"round_robin\"\nderegistration_delay = \"15s\"\n\
         servers = [{}]\n{extra}\n",
        list.join(", ")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minute_of_changes_under_load_fails_no_request() {
    let apps = apps(&["A", "B", "C", "D", "E"]).await;
    let dir = tempfile::tempdir().unwrap();
    let web = free_port();
    let admin = free_port();
    let path = dir.path().join("fulcrum.toml");
    let takeover = dir.path().join("takeover.sock");
    std::fs::write(&path, file(web, admin, &apps, &[0, 1, 2, 3], "")).unwrap();
    let mut first = spawn_fulcrum_with(
        &path,
        &[
            std::ffi::OsStr::new("--takeover-socket"),
            takeover.as_os_str(),
        ],
    );
    wait_listening(web).await;
    wait_listening(admin).await;

    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut loaders: Vec<_> = (0..4)
        .map(|_| load(web, "/", tally.clone(), stop.clone()))
        .collect();
    loaders.extend((0..4).map(|_| load(web, "/delay/700", tally.clone(), stop.clone())));
    let started = Instant::now();
    let at = |secs: u64| async move {
        let when = started + Duration::from_secs(secs);
        tokio::time::sleep_until(when.into()).await;
    };

    // A server added, one drained with slow requests in flight, one removed, one in maintenance,
    // a weight changed.
    at(3).await;
    let (s, v) = admin_call(
        admin,
        Method::POST,
        "/api/v1/pools/p/servers",
        Some(json!({"name": "E", "address": apps[4].addr().to_string()})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    at(6).await;
    let (s, v) = admin_call(admin, Method::GET, "/api/v1/pools/p/servers/B", None).await;
    assert_eq!(s, StatusCode::OK);
    let b_in_flight = v["active_connections"].as_i64().unwrap();
    let (s, _) = admin_call(
        admin,
        Method::PUT,
        "/api/v1/pools/p/servers/B/state",
        Some(json!({"state": "drain"})),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    at(9).await;
    let (s, _) = admin_call(admin, Method::DELETE, "/api/v1/pools/p/servers/C", None).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    at(12).await;
    let (s, _) = admin_call(
        admin,
        Method::PUT,
        "/api/v1/pools/p/servers/D/state",
        Some(json!({"state": "maint"})),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = admin_call(
        admin,
        Method::PUT,
        "/api/v1/pools/p/servers/A/weight",
        Some(json!({"weight": 3})),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    at(15).await;
    let (_, v) = admin_call(admin, Method::GET, "/api/v1/pools/p", None).await;
    let names: Vec<&str> = v["servers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert!(
        !names.contains(&"C"),
        "C was removed once drained: {names:?}"
    );
    let b = v["servers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "B")
        .unwrap();
    assert_eq!(b["state"], "draining");
    assert_eq!(
        b["active_connections"], 0,
        "B's in-flight requests finished"
    );

    // Ten reloads: an invalid file, one adding a listener, one removing a server.
    let second = free_port();
    let with_second = format!(
        "[[listeners]]\nname = \"second\"\nbind = \"{second}\"\nprotocol = \"http\"\npool = \"p\"\n"
    );
    let variants: Vec<(String, bool)> = vec![
        (file(web, admin, &apps, &[0, 1, 2, 3], ""), true),
        (file(web, admin, &apps, &[0, 1, 2, 3], "retries = 3"), true),
        (
            file(web, admin, &apps, &[0, 1, 2, 3], "retries = \"three\""),
            false,
        ),
        (file(web, admin, &apps, &[0, 1, 2, 3], &with_second), true),
        (file(web, admin, &apps, &[0, 1, 3], &with_second), true),
        (
            file(web, admin, &apps, &[0, 1, 3], "connect_timeout = \"2s\""),
            true,
        ),
        (
            file(web, admin, &apps, &[0, 1, 3], "slow_start = \"2s\""),
            true,
        ),
        (file(web, admin, &apps, &[0, 1, 3], ""), true),
        (file(web, admin, &apps, &[0, 1, 2, 3], ""), true),
        (file(web, admin, &apps, &[0, 1, 2, 3], ""), true),
    ];
    for (i, (text, valid)) in variants.into_iter().enumerate() {
        at(17 + 2 * i as u64).await;
        std::fs::write(&path, text).unwrap();
        let (s, v) = admin_call(admin, Method::POST, "/api/v1/reload", Some(json!({}))).await;
        if valid {
            assert_eq!(s, StatusCode::OK, "reload {i}: {v}");
        } else {
            assert_eq!(
                (s, v["field"].as_str()),
                (StatusCode::BAD_REQUEST, Some("pools[0].retries")),
                "reload {i}: {v}"
            );
        }
        if i == 3 {
            assert_eq!(v["listeners_added"], json!(["second"]));
            assert_eq!(
                one(second, "/").await.map(|_| ()),
                Ok(()),
                "the added listener serves"
            );
        }
        if i == 4 {
            assert_eq!(v["servers_removed"], json!(["p/C"]), "{v}");
        }
    }

    // A binary takeover: a second process takes the listening sockets, the first drains and exits.
    at(40).await;
    let mut successor = spawn_fulcrum_with(
        &path,
        &[
            std::ffi::OsStr::new("--takeover-socket"),
            takeover.as_os_str(),
        ],
    );
    let status =
        tokio::task::spawn_blocking(move || wait_exit(&mut first, Duration::from_secs(30)))
            .await
            .unwrap();
    assert!(
        status.success(),
        "the old process drained and exited: {status}"
    );
    let (s, _) = admin_call(admin, Method::GET, "/api/v1/pools/p", None).await;
    assert_eq!(s, StatusCode::OK, "the successor serves the admin API");
    at(55).await;
    stop.store(true, Ordering::Relaxed);
    for l in loaders {
        l.await.unwrap();
    }
    signal(&successor, "-TERM");
    tokio::task::spawn_blocking(move || wait_exit(&mut successor, Duration::from_secs(30)))
        .await
        .unwrap();

    let failures = tally.failures.lock().unwrap();
    let ok = tally.ok.load(Ordering::Relaxed);
    let slow_ok = tally.slow_ok.load(Ordering::Relaxed);
    eprintln!("soak: {ok} fast + {slow_ok} slow requests answered, {} failed; B had {b_in_flight} in flight when drained", failures.len());
    assert!(
        ok > 500 && slow_ok > 100,
        "the load ran: {ok} fast, {slow_ok} slow"
    );
    assert!(
        failures.is_empty(),
        "{} failures: {:?}",
        failures.len(),
        &failures[..failures.len().min(20)]
    );
}

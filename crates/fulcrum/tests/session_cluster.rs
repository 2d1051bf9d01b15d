//! Session clustering behind the balancer: round robin over fulcrum-app servers that replicate their
//! sessions to each other (`--sessions cluster`), so no stickiness is needed and a server's death
//! logs nobody out.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use fulcrum_app::{AppConfig, AppHandle, ClusterConfig, Sessions};
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use serde_json::{json, Value};

/// Longest any wait for replication may take.
const DEADLINE: Duration = Duration::from_secs(20);

fn cluster_app(name: &str, cluster: ClusterConfig) -> AppConfig {
    AppConfig::new(name)
        .with_sessions(Sessions::Cluster)
        .with_cluster(cluster)
}

/// Three cluster apps A, B, C: B lists A, C lists A and B; the others learn the rest.
async fn three_apps() -> Vec<AppHandle> {
    let mut apps: Vec<AppHandle> = Vec::new();
    for name in ["A", "B", "C"] {
        let peers = apps.iter().map(|a| a.addr().to_string()).collect();
        let cfg = cluster_app(
            name,
            ClusterConfig {
                peers,
                ..ClusterConfig::default()
            },
        );
        apps.push(fulcrum_app::spawn(LOCAL, cfg).await.expect("start app"));
    }
    apps
}

/// `method path` with the session cookie; the status, the answering server and the JSON body.
async fn call(
    http: &HttpClient,
    method: Method,
    url: &str,
    session: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, String, Value) {
    let mut req = Request::builder().method(method).uri(url);
    if let Some(id) = session {
        req = req.header("cookie", format!("SESSIONID={id}"));
    }
    let body = match body {
        Some(v) => {
            req = req.header("content-type", "application/json");
            Full::new(Bytes::from(v.to_string()))
        }
        None => Full::default(),
    };
    let r = send(http, req.body(body).unwrap()).await;
    let json = serde_json::from_str(&r.body).unwrap_or(Value::Null);
    let session = r
        .headers
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("SESSIONID="))
        .and_then(|v| v.split(';').next())
        .unwrap_or("")
        .to_owned();
    let server = r.server();
    // A login answers its new session id in place of the server name.
    if !session.is_empty() {
        return (r.status, session, json);
    }
    (r.status, server, json)
}

async fn login(http: &HttpClient, base: &str) -> String {
    let (status, id, body) = call(
        http,
        Method::POST,
        &format!("{base}/login"),
        None,
        Some(json!({"user": "martin"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(!id.is_empty(), "a session cookie");
    id
}

/// The value of `name` in an app's `/metrics`.
async fn app_metric(http: &HttpClient, addr: SocketAddr, name: &str) -> f64 {
    let r = get(http, &format!("http://{addr}/metrics")).await;
    r.body
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {name} in\n{}", r.body))
        .trim()
        .parse()
        .unwrap()
}

async fn wait_held(http: &HttpClient, addr: SocketAddr, n: f64) {
    let start = Instant::now();
    while app_metric(http, addr, "fulcrum_app_sessions_held").await != n {
        assert!(start.elapsed() < DEADLINE, "{addr} never held {n} sessions");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the app at `addr` has `n` peers up: it has read its membership.
async fn wait_peers_up(http: &HttpClient, addr: SocketAddr, n: usize) {
    let start = Instant::now();
    loop {
        let r = get(http, &format!("http://{addr}/_cluster/status")).await;
        let status: Value = serde_json::from_str(&r.body).unwrap();
        let up = status["peers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["state"] == json!("up"))
            .count();
        if up == n {
            return;
        }
        assert!(start.elapsed() < DEADLINE, "{addr}: {status:#}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_keeps_the_login_on_every_server_and_through_a_death() {
    let mut apps = three_apps().await;
    let lb = fulcrum(&config("round_robin", &servers(&apps), "", ""));
    let base = format!("http://{}", web(&lb));
    let http = client();
    for app in &apps {
        wait_peers_up(&http, app.addr(), 2).await;
    }

    let id = login(&http, &base).await;
    // Every server answers for the session at once (a pull covers the replication delay).
    let mut seen = std::collections::HashSet::new();
    for _ in 0..12 {
        let (status, server, body) =
            call(&http, Method::GET, &format!("{base}/me"), Some(&id), None).await;
        assert_eq!(status, StatusCode::OK, "{server}: {body}");
        assert_eq!(body["user"], json!("martin"));
        seen.insert(server);
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    for app in &apps {
        wait_held(&http, app.addr(), 1.0).await;
    }

    // One server dies while the browser goes on: nobody is logged out.
    let victim = apps.remove(1);
    let reads = tokio::spawn({
        let (http, base, id) = (http.clone(), base.clone(), id.clone());
        async move {
            let mut statuses = Vec::new();
            for _ in 0..60 {
                let (status, server, _) =
                    call(&http, Method::GET, &format!("{base}/me"), Some(&id), None).await;
                statuses.push((status, server));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            statuses
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    victim.stop().await;
    let statuses = reads.await.unwrap();
    assert!(
        !statuses.iter().any(|(s, _)| *s == StatusCode::UNAUTHORIZED),
        "logged out: {statuses:?}"
    );
    let ok = statuses
        .iter()
        .filter(|(s, _)| *s == StatusCode::OK)
        .count();
    assert!(ok * 3 >= statuses.len() * 2, "{statuses:?}");
    // After the death, every answer is a logged-in one.
    for _ in 0..6 {
        let (status, server, body) =
            call(&http, Method::GET, &format!("{base}/me"), Some(&id), None).await;
        assert_eq!(status, StatusCode::OK, "{server}: {body}");
    }
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_come_from_the_admin_api_pool() {
    // The apps' addresses go into the balancer's pool, then the apps read the pool.
    let mut listeners = Vec::new();
    for _ in 0..4 {
        listeners.push(tokio::net::TcpListener::bind(LOCAL).await.unwrap());
    }
    let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let pool: Vec<(String, SocketAddr, u32)> = ["A", "B", "C"]
        .iter()
        .zip(&addrs)
        .map(|(n, a)| ((*n).to_owned(), *a, 1))
        .collect();
    let lb = fulcrum(&config("round_robin", &pool, "", ""));
    let admin = lb.admin_addr().unwrap();
    let cluster = ClusterConfig {
        peers_from: Some(format!("http://{admin}/api/v1/pools/p")),
        refresh: Duration::from_millis(200),
        ..ClusterConfig::default()
    };
    let mut stops = Vec::new();
    for (name, listener) in ["A", "B", "C", "D"].into_iter().zip(listeners) {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let cfg = cluster_app(name, cluster.clone());
        tokio::spawn(async move {
            let _ = fulcrum_app::serve(listener, cfg, async {
                let _ = rx.await;
            })
            .await;
        });
        stops.push(tx);
    }
    let base = format!("http://{}", web(&lb));
    let http = client();
    for addr in &addrs[..3] {
        wait_peers_up(&http, *addr, 2).await;
    }

    let id = login(&http, &base).await;
    for addr in &addrs[..3] {
        wait_held(&http, *addr, 1.0).await;
    }
    // D joins the pool through the admin API: it becomes everyone's peer and has the session.
    let req = Request::post(format!("http://{admin}/api/v1/pools/p/servers"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            json!({"address": addrs[3].to_string(), "name": "D"}).to_string(),
        )))
        .unwrap();
    let r = send(&http, req).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    wait_held(&http, addrs[3], 1.0).await;
    let second = login(&http, &base).await;
    for addr in &addrs {
        wait_held(&http, *addr, 2.0).await;
    }
    for session in [&id, &second] {
        for _ in 0..8 {
            let (status, server, body) = call(
                &http,
                Method::GET,
                &format!("{base}/me"),
                Some(session),
                None,
            )
            .await;
            assert_eq!(status, StatusCode::OK, "{server}: {body}");
        }
    }
    // Each app lists the three others (itself excluded) as peers.
    for addr in &addrs {
        let r = get(&http, &format!("http://{addr}/_cluster/status")).await;
        let status: Value = serde_json::from_str(&r.body).unwrap();
        let peers = status["peers"].as_array().unwrap();
        let others = peers.iter().filter(|p| p["state"] != json!("self")).count();
        assert_eq!(others, 3, "{status:#}");
    }
    drop(stops);
    stop(lb).await;
}

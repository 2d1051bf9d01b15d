//! Black-box tests of the balancing algorithms against real fulcrum-app servers.

mod common;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use fulcrum_app::AppConfig;
use http::Request;
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// 12 concurrent clients send GETs for `duration` (at most 4,000 requests in all); returns the count
/// of answers per server.
async fn load(addr: std::net::SocketAddr, duration: Duration) -> HashMap<String, usize> {
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    for _ in 0..12 {
        tasks.push(tokio::spawn(async move {
            let c = client();
            let mut seen = HashMap::new();
            for _ in 0..4_000 / 12 {
                if Instant::now() > deadline {
                    break;
                }
                let r = get(&c, &format!("http://{addr}/")).await;
                assert_eq!(r.status, http::StatusCode::OK);
                *seen.entry(r.server()).or_insert(0) += 1;
            }
            seen
        }));
    }
    let mut total = HashMap::new();
    for t in tasks {
        for (k, v) in t.await.unwrap() {
            *total.entry(k).or_insert(0) += v;
        }
    }
    total
}

/// One server 150 ms slow and two fast ones behind `algorithm`, under 12 clients for `duration`:
/// the slow server's share of the requests, and the count per server.
async fn measure_slow_share(algorithm: &str, duration: Duration) -> (f64, HashMap<String, usize>) {
    let apps = apps_with(vec![
        AppConfig::new("slow").with_delay(Duration::from_millis(150)),
        AppConfig::new("fast1"),
        AppConfig::new("fast2"),
    ])
    .await;
    let s: Vec<_> = apps
        .iter()
        .zip(["slow", "fast1", "fast2"])
        .map(|(a, n)| (n.to_string(), a.addr(), 1))
        .collect();
    let lb = fulcrum(&config(algorithm, &s, "", ""));
    let counts = load(web(&lb), duration).await;
    stop(lb).await;
    let total: usize = counts.values().sum();
    assert!(
        total > 100,
        "{algorithm}: too few requests to judge: {counts:?}"
    );
    let share = counts.get("slow").copied().unwrap_or(0) as f64 / total as f64;
    (share, counts)
}

async fn slow_server_share(algorithm: &str) -> f64 {
    let (share, counts) = measure_slow_share(algorithm, Duration::from_secs(3)).await;
    let total: usize = counts.values().sum();
    eprintln!(
        "{algorithm}: the slow server took {:.2}% of {total} requests ({counts:?})",
        share * 100.0
    );
    assert!(
        share <= 0.15,
        "{algorithm}: the slow server took {:.1}% ({counts:?})",
        share * 100.0
    );
    share
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_connections_avoids_a_slow_server() {
    slow_server_share("least_connections").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_response_time_avoids_a_slow_server() {
    slow_server_share("least_response_time").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2c_avoids_a_slow_server() {
    slow_server_share("p2c").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_does_not_avoid_a_slow_server() {
    // The control: without load awareness the slow server keeps its third of the requests it can
    // answer, which shows the assertion above can fail.
    let (share, counts) = measure_slow_share("round_robin", Duration::from_secs(2)).await;
    assert!(
        share > 0.25,
        "round robin gives the slow server its turn: {counts:?}"
    );
}

fn client_from(ip: Ipv4Addr) -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_local_address(Some(IpAddr::V4(ip)));
    Client::builder(TokioExecutor::new()).build(connector)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_hash_keeps_each_client_address_on_its_server() {
    let apps = apps(&["A", "B", "C"]).await;
    let lb = fulcrum(&config("ip_hash", &servers(&apps), "", ""));
    let mut first_choice = HashMap::new();
    for round in 0..4 {
        for last in 2..=9u8 {
            let ip = Ipv4Addr::new(127, 0, 0, last);
            // A new client (new connection, new source port) each time: only the address matters.
            let r = get(&client_from(ip), &format!("http://{}/", web(&lb))).await;
            let server = r.server();
            let first = first_choice.entry(ip).or_insert_with(|| server.clone());
            assert_eq!(*first, server, "round {round}: {ip} moved");
        }
    }
    let distinct: std::collections::HashSet<_> = first_choice.values().collect();
    assert!(
        distinct.len() >= 2,
        "8 addresses spread over more than one server: {first_choice:?}"
    );
    stop(lb).await;
}

async fn mapping(algorithm: &str, apps: &[fulcrum_app::AppHandle]) -> Vec<String> {
    let lb = fulcrum(&config(
        algorithm,
        &servers(apps),
        "",
        "hash_key = \"header:x-user\"",
    ));
    let c = client();
    let mut out = Vec::new();
    for user in 0..60 {
        let req = Request::get(format!("http://{}/", web(&lb)))
            .header("x-user", format!("user-{user}"))
            .body(Full::<Bytes>::default())
            .unwrap();
        out.push(send(&c, req).await.server());
    }
    stop(lb).await;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_mappings_are_identical_across_a_restart() {
    let apps = apps(&["A", "B", "C", "D"]).await;
    for algorithm in ["consistent_hash", "maglev"] {
        let first = mapping(algorithm, &apps).await;
        let second = mapping(algorithm, &apps).await;
        assert_eq!(first, second, "{algorithm}: a restart moved keys");
        let distinct: std::collections::HashSet<_> = first.iter().collect();
        assert!(
            distinct.len() >= 3,
            "{algorithm}: 60 keys over 4 servers: {first:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_the_hash_key_falls_back_to_round_robin() {
    let apps = apps(&["A", "B", "C"]).await;
    let lb = fulcrum(&config(
        "consistent_hash",
        &servers(&apps),
        "",
        "hash_key = \"cookie:uid\"",
    ));
    let seq = pick_sequence(web(&lb), 9).await;
    let distinct: std::collections::HashSet<_> = seq.iter().collect();
    assert_eq!(
        distinct.len(),
        3,
        "no cookie: requests spread by the fallback: {seq:?}"
    );
    // With the cookie, one server.
    let c = client();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..6 {
        let req = Request::get(format!("http://{}/", web(&lb)))
            .header("cookie", "uid=42")
            .body(Full::<Bytes>::default())
            .unwrap();
        seen.insert(send(&c, req).await.server());
    }
    assert_eq!(seen.len(), 1, "one key, one server: {seen:?}");
    stop(lb).await;
}

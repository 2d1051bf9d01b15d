//! Runtime control: the admin API's changes (add, drain, maint, weight, remove), its authentication and
//! errors, the OpenAPI document, configuration reloads (good, invalid, adding and removing listeners and
//! servers), and round robin's spread around an unavailable server. Real fulcrum-app servers and a
//! real balancer on 127.0.0.1.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use fulcrum_app::AppConfig;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use serde_json::{json, Value};

/// An admin call: method, path, optional JSON body, optional token. Returns status and JSON (or Null).
async fn call(
    admin: SocketAddr,
    method: Method,
    path: &str,
    body: Option<Value>,
    token: Option<&str>,
) -> (StatusCode, Value) {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://{admin}{path}"));
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let body = match body {
        Some(v) => {
            req = req.header("content-type", "application/json");
            Full::new(Bytes::from(v.to_string()))
        }
        None => Full::default(),
    };
    let r = send(&client(), req.body(body).unwrap()).await;
    let json = serde_json::from_str(&r.body).unwrap_or(Value::Null);
    (r.status, json)
}

async fn pool_json(admin: SocketAddr, pool: &str) -> Value {
    let (status, v) = call(
        admin,
        Method::GET,
        &format!("/api/v1/pools/{pool}"),
        None,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    v
}

fn server<'a>(pool: &'a Value, name: &str) -> Option<&'a Value> {
    pool["servers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
}

/// Counts which server answered `n` requests.
async fn spread(addr: SocketAddr, n: usize) -> std::collections::BTreeMap<String, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for name in pick_sequence(addr, n).await {
        *counts.entry(name).or_insert(0) += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_are_added_drained_reweighted_and_removed_through_the_api() {
    let apps = apps(&["A", "B", "C"]).await;
    let lb = fulcrum(&config(
        "weighted_round_robin",
        &servers(&apps[..2]),
        "",
        "deregistration_delay = \"20s\"",
    ));
    let admin = lb.admin_addr().unwrap();
    let web = web(&lb);

    // Add C: 201, and it takes traffic.
    let (status, v) = call(
        admin,
        Method::POST,
        "/api/v1/pools/p/servers",
        Some(json!({"address": apps[2].addr().to_string(), "name": "C", "weight": 2})),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert_eq!(
        (v["name"].as_str(), v["source"].as_str()),
        (Some("C"), Some("api"))
    );
    let counts = spread(web, 40).await;
    assert_eq!(counts.get("C"), Some(&20), "weight 2 of 4: {counts:?}");

    // Weight 1 for C: the three share equally.
    let (status, v) = call(
        admin,
        Method::PUT,
        "/api/v1/pools/p/servers/C/weight",
        Some(json!({"weight": 1})),
        None,
    )
    .await;
    assert_eq!((status, v["weight"].as_u64()), (StatusCode::OK, Some(1)));
    let counts = spread(web, 30).await;
    assert!(counts.values().all(|&n| n == 10), "{counts:?}");

    // A in maintenance: no traffic; drain B: no new traffic; ready again: back.
    for (name, state, shown) in [("A", "maint", "maint"), ("B", "drain", "draining")] {
        let (status, v) = call(
            admin,
            Method::PUT,
            &format!("/api/v1/pools/p/servers/{name}/state"),
            Some(json!({ "state": state })),
            None,
        )
        .await;
        assert_eq!((status, v["state"].as_str()), (StatusCode::OK, Some(shown)));
    }
    assert_eq!(spread(web, 10).await.get("C"), Some(&10));
    for name in ["A", "B"] {
        let (status, _) = call(
            admin,
            Method::PUT,
            &format!("/api/v1/pools/p/servers/{name}/state"),
            Some(json!({"state": "ready"})),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::OK);
    }
    assert_eq!(spread(web, 30).await.len(), 3);

    // Remove B while a slow request is in flight on it: 202, B drains (no new requests), the slow
    // request finishes with 200, then B leaves the pool (long before the 20 s delay).
    let slow = {
        tokio::spawn(async move {
            let c = client();
            // Round robin: send until a slow request lands on B.
            loop {
                let r = get(&c, &format!("http://{web}/delay/1500")).await;
                if r.server() == "B" {
                    return r.status;
                }
            }
        })
    };
    // Wait until the slow request is in flight on B.
    let started = Instant::now();
    loop {
        let p = pool_json(admin, "p").await;
        if server(&p, "B").unwrap()["active_connections"].as_i64() == Some(1) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no slow request on B"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, v) = call(
        admin,
        Method::DELETE,
        "/api/v1/pools/p/servers/B",
        None,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["deregistration_delay_ms"], 20_000);
    let p = pool_json(admin, "p").await;
    assert_eq!(server(&p, "B").unwrap()["state"], "draining");
    assert_eq!(server(&p, "B").unwrap()["removing"], true);
    let counts = spread(web, 10).await;
    assert_eq!(
        counts.get("B"),
        None,
        "a draining server gets no new requests"
    );
    assert_eq!(
        slow.await.unwrap(),
        StatusCode::OK,
        "the in-flight request finished"
    );
    let started = Instant::now();
    while server(&pool_json(admin, "p").await, "B").is_some() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "B was not removed after its drain"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removal_waits_at_most_the_deregistration_delay() {
    let apps = apps(&["A", "B"]).await;
    let lb = fulcrum(&config(
        "round_robin",
        &servers(&apps),
        "",
        "deregistration_delay = \"500ms\"\nresponse_timeout = \"30s\"",
    ));
    let admin = lb.admin_addr().unwrap();
    let web = web(&lb);
    let slow = tokio::spawn(async move {
        let c = client();
        loop {
            let r = get(&c, &format!("http://{web}/delay/6000")).await;
            if r.server() == "A" {
                return (r.status, Instant::now());
            }
        }
    });
    let started = Instant::now();
    while lb
        .shared()
        .pool("p")
        .unwrap()
        .server("A")
        .unwrap()
        .stats
        .in_flight()
        == 0
    {
        assert!(started.elapsed() < Duration::from_secs(20));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, _) = call(
        admin,
        Method::DELETE,
        "/api/v1/pools/p/servers/A",
        None,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    // A leaves while its request is still in flight ...
    let started = Instant::now();
    while server(&pool_json(admin, "p").await, "A").is_some() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "A never removed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let removed_at = Instant::now();
    // ... and that request still completes, after the removal.
    let (status, done_at) = slow.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(
        done_at > removed_at,
        "the removal did not wait for the slow request"
    );
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_calls_are_authenticated_and_errors_name_the_field() {
    let apps = apps(&["A"]).await;
    let text = config("round_robin", &servers(&apps), "", "").replace(
        "bind = \"127.0.0.1:0\"\n\n[[listeners]]",
        "bind = \"127.0.0.1:0\"\ntoken = \"s3cret\"\n\n[[listeners]]",
    );
    assert!(text.contains("token"));
    let lb = fulcrum(&text);
    let admin = lb.admin_addr().unwrap();
    let add = |body: Value| async move {
        call(
            admin,
            Method::POST,
            "/api/v1/pools/p/servers",
            Some(body),
            Some("s3cret"),
        )
        .await
    };

    // Reads need no token; changes do.
    assert_eq!(
        call(admin, Method::GET, "/api/v1/pools", None, None)
            .await
            .0,
        StatusCode::OK
    );
    let (status, v) = call(
        admin,
        Method::POST,
        "/api/v1/pools/p/servers",
        Some(json!({"address": "127.0.0.1:9"})),
        None,
    )
    .await;
    assert_eq!(
        (status, v["field"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("authorization"))
    );
    let (status, _) = call(
        admin,
        Method::DELETE,
        "/api/v1/pools/p/servers/A",
        None,
        Some("wrong"),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = call(
        admin,
        Method::POST,
        "/api/v1/reload",
        Some(json!({})),
        Some("s3cre"),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // A form post (no JSON) is refused, token or not.
    let form = Request::post(format!("http://{admin}/api/v1/pools/p/servers"))
        .header("authorization", "Bearer s3cret")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Full::new(Bytes::from_static(b"address=127.0.0.1:9")))
        .unwrap();
    assert_eq!(
        send(&client(), form).await.status,
        StatusCode::UNSUPPORTED_MEDIA_TYPE
    );

    // Bad input: status and field.
    let a = apps[0].addr().to_string();
    let cases: Vec<(Value, StatusCode, &str)> = vec![
        (json!({}), StatusCode::BAD_REQUEST, "address"),
        (
            json!({"address": "nowhere"}),
            StatusCode::BAD_REQUEST,
            "address",
        ),
        (
            json!({"address": "127.0.0.1:0"}),
            StatusCode::BAD_REQUEST,
            "address",
        ),
        (json!({"address": 5}), StatusCode::BAD_REQUEST, "address"),
        (
            json!({"address": "127.0.0.1:9", "weight": 0}),
            StatusCode::BAD_REQUEST,
            "weight",
        ),
        (
            json!({"address": "127.0.0.1:9", "weight": "2"}),
            StatusCode::BAD_REQUEST,
            "weight",
        ),
        (
            json!({"address": "127.0.0.1:9", "name": ""}),
            StatusCode::BAD_REQUEST,
            "name",
        ),
        (
            json!({"address": "127.0.0.1:9", "colour": 1}),
            StatusCode::BAD_REQUEST,
            "colour",
        ),
        (
            json!({"address": "127.0.0.1:9", "name": "A"}),
            StatusCode::CONFLICT,
            "name",
        ),
        (
            json!({"address": a, "name": "A2"}),
            StatusCode::CONFLICT,
            "address",
        ),
    ];
    for (body, want, field) in cases {
        let (status, v) = add(body.clone()).await;
        assert_eq!(status, want, "{body} -> {v}");
        assert_eq!(v["field"].as_str(), Some(field), "{body} -> {v}");
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
    }
    let (status, v) = call(
        admin,
        Method::POST,
        "/api/v1/pools/nope/servers",
        Some(json!({"address": "127.0.0.1:9"})),
        Some("s3cret"),
    )
    .await;
    assert_eq!(
        (status, v["field"].as_str()),
        (StatusCode::NOT_FOUND, Some("pool"))
    );
    for (method, path, body, want, field) in [
        (
            Method::PUT,
            "/api/v1/pools/p/servers/Z/state",
            json!({"state": "drain"}),
            StatusCode::NOT_FOUND,
            "name",
        ),
        (
            Method::PUT,
            "/api/v1/pools/p/servers/A/state",
            json!({"state": "sleep"}),
            StatusCode::BAD_REQUEST,
            "state",
        ),
        (
            Method::PUT,
            "/api/v1/pools/p/servers/A/state",
            json!({}),
            StatusCode::BAD_REQUEST,
            "state",
        ),
        (
            Method::PUT,
            "/api/v1/pools/p/servers/A/weight",
            json!({"weight": 2_000_000}),
            StatusCode::BAD_REQUEST,
            "weight",
        ),
        (
            Method::PUT,
            "/api/v1/pools/p/servers/Z/weight",
            json!({"weight": 2}),
            StatusCode::NOT_FOUND,
            "name",
        ),
    ] {
        let (status, v) = call(admin, method, path, Some(body), Some("s3cret")).await;
        assert_eq!(
            (status, v["field"].as_str()),
            (want, Some(field)),
            "{path}: {v}"
        );
    }
    let (status, v) = call(
        admin,
        Method::DELETE,
        "/api/v1/pools/p/servers/Z",
        None,
        Some("s3cret"),
    )
    .await;
    assert_eq!(
        (status, v["field"].as_str()),
        (StatusCode::NOT_FOUND, Some("name"))
    );
    // Not started from a file: a reload says so.
    let (status, v) = call(admin, Method::POST, "/api/v1/reload", None, Some("s3cret")).await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{v}");
    let (status, v) = call(
        admin,
        Method::POST,
        "/api/v1/reload",
        Some(json!({})),
        Some("s3cret"),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    // With the token, a good call passes.
    let (status, v) = add(json!({"address": "127.0.0.1:9", "name": "Z"})).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_matches_the_routes() {
    let apps = apps(&["A"]).await;
    let lb = fulcrum(&config("round_robin", &servers(&apps), "", ""));
    let admin = lb.admin_addr().unwrap();
    let (status, doc) = call(admin, Method::GET, "/api/openapi.json", None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(doc["openapi"], "3.1.0");
    let mut documented = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            if method != "parameters" {
                documented.push((method.clone(), path.clone()));
            }
        }
    }
    let mut routed: Vec<(String, String)> = fulcrum::admin::ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    documented.sort();
    routed.sort();
    assert_eq!(
        documented, routed,
        "the document and the router list the same routes"
    );
    // Every listed route exists in the router: a request with that method is not 404/405 for lack
    // of a route (the path parameters name a real pool and server; bodies are empty).
    for (method, path) in fulcrum::admin::ROUTES {
        let path = path
            .replace("{pool}", "p")
            .replace("{name}", "A")
            .replace("{listener}", "web")
            .replace("{ip}", "192.0.2.1");
        let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        let req = Request::builder()
            .method(method.clone())
            .uri(format!("http://{admin}{path}"))
            .body(Full::default())
            .unwrap();
        let r = send(&client(), req).await;
        // The router's own 404 has no body; a handler's 404 names what it did not find.
        let unrouted = r.status == StatusCode::NOT_FOUND && !r.body.contains("\"error\"");
        assert!(
            r.status != StatusCode::METHOD_NOT_ALLOWED && !unrouted,
            "{method} {path}: {}",
            r.status
        );
    }
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_spreads_a_down_servers_share_evenly() {
    let apps = apps(&["A", "B", "C"]).await;
    let lb = fulcrum(&config("round_robin", &servers(&apps), "", ""));
    let admin = lb.admin_addr().unwrap();
    let (status, _) = call(
        admin,
        Method::PUT,
        "/api/v1/pools/p/servers/A/state",
        Some(json!({"state": "maint"})),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let counts = spread(web(&lb), 300).await;
    assert_eq!(counts.get("A"), None);
    for name in ["B", "C"] {
        let share = *counts.get(name).unwrap_or(&0) as f64 / 300.0;
        assert!(
            (0.45..=0.55).contains(&share),
            "{name}: {share} of {counts:?}"
        );
    }
    stop(lb).await;
}

/// A config file for the reload tests: listener `web` over pool `p` with the given servers, and extra
/// text appended.
fn reload_config(servers: &[(String, SocketAddr, u32)], extra: &str) -> String {
    format!("{}\n{extra}", config("round_robin", servers, "", ""))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_apply_the_difference_and_refuse_bad_files() {
    let apps = apps(&["A", "B", "C"]).await;
    let all = servers(&apps);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fulcrum.toml");
    std::fs::write(&path, reload_config(&all[..2], "")).unwrap();
    let lb = fulcrum_file(&path);
    let admin = lb.admin_addr().unwrap();
    let web = web(&lb);
    spread(web, 10).await;
    let a_before = lb.shared().pool("p").unwrap().server("A").unwrap();
    assert_eq!(a_before.stats.requests_total(), 5);

    // Add C and a second listener with its own pool.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let extra = format!(
        "[[listeners]]\nname = \"second\"\nbind = \"127.0.0.1:{port}\"\nprotocol = \"http\"\npool = \"q\"\n\n\
         [[pools]]\nname = \"q\"\nservers = [{{ name = \"C\", address = \"{}\" }}]\n",
        apps[2].addr()
    );
    std::fs::write(&path, reload_config(&all, &extra)).unwrap();
    let (status, report) = call(admin, Method::POST, "/api/v1/reload", Some(json!({})), None).await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(report["servers_added"], json!(["p/C"]));
    assert_eq!(report["listeners_added"], json!(["second"]));
    assert_eq!(report["pools_added"], json!(["q"]));
    let a_after = lb.shared().pool("p").unwrap().server("A").unwrap();
    assert!(
        std::sync::Arc::ptr_eq(&a_before, &a_after),
        "A kept its identity"
    );
    assert_eq!(spread(web, 30).await.len(), 3);
    let second: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert_eq!(pick_sequence(second, 2).await, vec!["C", "C"]);

    // An invalid file: 400 naming key and line; the running configuration stays.
    std::fs::write(
        &path,
        reload_config(&all, &extra)
            .replace("algorithm = \"round_robin\"", "algorithm = \"fastest\""),
    )
    .unwrap();
    let (status, v) = call(admin, Method::POST, "/api/v1/reload", Some(json!({})), None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["field"], "pools[0].algorithm");
    assert!(
        v["error"].as_str().unwrap().contains("fulcrum.toml:"),
        "{v}"
    );
    assert_eq!(
        spread(web, 30).await.len(),
        3,
        "still serving the old configuration"
    );

    // A port that cannot be bound: refused, nothing changed.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = extra.clone()
        + &format!(
            "\n[[listeners]]\nname = \"third\"\nbind = \"{}\"\nprotocol = \"http\"\npool = \"q\"\n",
            taken.local_addr().unwrap()
        );
    std::fs::write(&path, reload_config(&all, &busy)).unwrap();
    let (status, v) = call(admin, Method::POST, "/api/v1/reload", Some(json!({})), None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["field"], "listeners[2].bind");
    assert!(lb.listener_addr("third").is_none());

    // Remove B and the second listener: B leaves, the listener stops accepting.
    std::fs::write(&path, reload_config(&[all[0].clone(), all[2].clone()], "")).unwrap();
    let report = tokio::task::block_in_place(|| lb.reload()).expect("reload");
    assert_eq!(report.servers_removed, vec!["p/B"]);
    assert_eq!(report.listeners_removed, vec!["second"]);
    assert_eq!(report.pools_removed, vec!["q"]);
    let counts = spread(web, 20).await;
    assert_eq!(counts.get("B"), None, "{counts:?}");
    let started = Instant::now();
    while tokio::net::TcpStream::connect(second).await.is_ok() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the removed listener still accepts"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The reloads are counted by result.
    let metrics = get(&client(), &format!("http://{admin}/metrics"))
        .await
        .body;
    assert!(
        metrics.contains("fulcrum_config_reloads_total{result=\"ok\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("fulcrum_config_reloads_total{result=\"error\"} 2"),
        "{metrics}"
    );
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_changes_and_the_file_combine_across_a_reload() {
    let apps = apps(&["A", "B", "C"]).await;
    let all = servers(&apps);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fulcrum.toml");
    std::fs::write(&path, reload_config(&all[..2], "")).unwrap();
    let lb = fulcrum_file(&path);
    let admin = lb.admin_addr().unwrap();
    // Through the API: C added, A in maintenance, B's weight 5.
    let (status, _) = call(
        admin,
        Method::POST,
        "/api/v1/pools/p/servers",
        Some(json!({"address": apps[2].addr().to_string(), "name": "C"})),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    call(
        admin,
        Method::PUT,
        "/api/v1/pools/p/servers/A/state",
        Some(json!({"state": "maint"})),
        None,
    )
    .await;
    call(
        admin,
        Method::PUT,
        "/api/v1/pools/p/servers/B/weight",
        Some(json!({"weight": 5})),
        None,
    )
    .await;
    // A reload of the unchanged file: the API-added server and the states stay; the file's weights apply.
    let report = tokio::task::block_in_place(|| lb.reload()).expect("reload");
    assert!(
        report.servers_added.is_empty() && report.servers_removed.is_empty(),
        "{report:?}"
    );
    let p = pool_json(admin, "p").await;
    assert_eq!(server(&p, "C").unwrap()["source"], "api");
    assert_eq!(server(&p, "A").unwrap()["state"], "maint");
    assert_eq!(server(&p, "B").unwrap()["weight"], 1);
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saturation_tells_an_autoscaler_when_to_add_servers() {
    let apps = apps_with(vec![AppConfig::new("A")]).await;
    let lb = fulcrum(&config(
        "round_robin",
        &servers(&apps),
        "",
        "saturation_target = 2",
    ));
    let admin = lb.admin_addr().unwrap();
    let web = web(&lb);
    let p = pool_json(admin, "p").await;
    assert_eq!(
        (p["saturation"].as_f64(), p["available_servers"].as_u64()),
        (Some(0.0), Some(1))
    );
    // Four slow requests on one server with a target of 2: saturation 2.
    let slow: Vec<_> = (0..4)
        .map(|_| {
            tokio::spawn(async move {
                get(&client(), &format!("http://{web}/delay/2000"))
                    .await
                    .status
            })
        })
        .collect();
    let started = Instant::now();
    loop {
        let p = pool_json(admin, "p").await;
        if p["in_flight"] == 4 {
            assert_eq!(p["saturation"].as_f64(), Some(2.0), "{p}");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{p}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let metrics = get(&client(), &format!("http://{admin}/metrics"))
        .await
        .body;
    assert!(
        metrics.contains("fulcrum_pool_saturation{pool=\"p\"} 2"),
        "{metrics}"
    );
    for s in slow {
        assert_eq!(s.await.unwrap(), StatusCode::OK);
    }
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_removes_health_checks_brings_a_down_server_back() {
    let apps = apps(&["A", "B"]).await;
    let all = servers(&apps);
    // B's health endpoint fails.
    let r = send(
        &client(),
        Request::post(format!("http://{}/health", apps[1].addr()))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(b"{\"status\": 503}")))
            .unwrap(),
    )
    .await;
    assert!(r.status.is_success(), "{}", r.body);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fulcrum.toml");
    let checks = "[pools.health_check]\nkind = \"http\"\npath = \"/health\"\ninterval = \"100ms\"\nfall = 1\nrise = 1\n";
    std::fs::write(&path, reload_config(&all, checks)).unwrap();
    let lb = fulcrum_file(&path);
    let admin = lb.admin_addr().unwrap();
    let started = Instant::now();
    while server(&pool_json(admin, "p").await, "B").unwrap()["state"] != "down" {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "B never marked down"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    std::fs::write(&path, reload_config(&all, "")).unwrap();
    tokio::task::block_in_place(|| lb.reload()).expect("reload");
    let p = pool_json(admin, "p").await;
    assert_eq!(server(&p, "B").unwrap()["state"], "up", "{p}");
    assert_eq!(spread(web(&lb), 20).await.len(), 2);
    stop(lb).await;
}

//! TLS and HTTP/2 to the servers: real fulcrum-app servers over TLS (h1 and h2 by ALPN) and h2c,
//! multiplexing of many streams over few connections, and gRPC end to end (unary, server streaming,
//! bidirectional, status and trailers, deadlines) with a real tonic server and client.

mod common;
#[path = "common/grpc.rs"]
mod grpc;

use std::time::Duration;

use common::tls::Ca;
use common::*;
use fulcrum_app::{AppConfig, TlsFiles};
use grpc::EchoRequest;
use http::StatusCode;

/// A TLS app named `name` with a certificate for `app.test` signed by `ca`.
async fn tls_app(ca: &Ca, dir: &std::path::Path, name: &str) -> fulcrum_app::AppHandle {
    let (cert, key) = ca.leaf(&["app.test"]).write(dir, name);
    apps_with(vec![AppConfig::new(name).with_tls(TlsFiles::new(cert, key))])
        .await
        .remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_servers_is_verified_and_speaks_h1_or_h2() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("servers CA");
    let ca_path = ca.write(dir.path(), "ca");
    let apps = vec![tls_app(&ca, dir.path(), "A").await];
    for (http2, version) in [(false, "HTTP/1.1"), (true, "HTTP/2.0")] {
        let pool = format!("http2 = {http2}\ntls = {{ ca = {ca_path:?}, sni = \"app.test\" }}");
        let lb = fulcrum(&config("round_robin", &servers(&apps), "", &pool));
        let reply = get(&client(), &format!("http://{}/", web(&lb))).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        assert!(
            reply.body.contains(&format!("GET / {version}")),
            "expected {version}: {}",
            reply.body
        );
        assert_eq!(reply.headers["x-server"], "A");
        stop(lb).await;
    }
    // Verification is on by default: a server whose certificate is not from the configured CA, or
    // not for the configured name, is never used.
    let other = Ca::new("another CA");
    let other_path = other.write(dir.path(), "other");
    for tls in [
        format!("tls = {{ ca = {other_path:?}, sni = \"app.test\" }}"),
        format!("tls = {{ ca = {ca_path:?}, sni = \"wrong.test\" }}"),
    ] {
        let lb = fulcrum(&config("round_robin", &servers(&apps), "", &tls));
        let reply = get(&client(), &format!("http://{}/", web(&lb))).await;
        assert!(reply.status.is_server_error(), "{tls}: {}", reply.status);
        let server = lb.shared().pool("p").unwrap().server("A").unwrap();
        assert!(server.stats.failures_total() >= 1);
        stop(lb).await;
    }
    // verify = false accepts the certificate as it is.
    let lb = fulcrum(&config(
        "round_robin",
        &servers(&apps),
        "",
        "tls = { verify = false }",
    ));
    let reply = get(&client(), &format!("http://{}/", web(&lb))).await;
    assert_eq!(reply.status, StatusCode::OK);
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_multiplexes_a_hundred_streams_over_few_connections() {
    let apps = apps_with(vec![AppConfig::new("A")]).await;
    let lb = fulcrum(&config("round_robin", &servers(&apps), "", "http2 = true"));
    let web = web(&lb);
    let reply = get(&client(), &format!("http://{web}/")).await;
    assert!(reply.body.contains("GET / HTTP/2.0"), "{}", reply.body);
    // 100 requests at once (each held 300 ms by the server), from 100 client connections.
    let mut tasks = Vec::new();
    for _ in 0..100 {
        tasks.push(tokio::spawn(async move {
            let c = client();
            get(&c, &format!("http://{web}/delay/300")).await.status
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
    let id = lb.shared().pool("p").unwrap().server("A").unwrap().id;
    let (_, h2) = fulcrum::http::client::open_connections(id);
    assert!(
        (1..=2).contains(&h2),
        "100 concurrent streams used {h2} HTTP/2 connections"
    );
    // Uploads stream through, and a body over the limit is the client's fault.
    let body = vec![b'x'; 300_000];
    let req = http::Request::post(format!("http://{web}/sha256"))
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let reply = send(&client(), req).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.body.contains("\"bytes\":300000"), "{}", reply.body);
    stop(lb).await;
    let lb = fulcrum(&config(
        "round_robin",
        &servers(&apps),
        "max_body_size = 1000",
        "http2 = true",
    ));
    let req = http::Request::post(format!("http://{}/echo", common::web(&lb)))
        .header("transfer-encoding", "chunked")
        .body(http_body_util::Full::new(bytes::Bytes::from(vec![
            b'y';
            5000
        ])))
        .unwrap();
    assert_eq!(
        send(&client(), req).await.status,
        StatusCode::PAYLOAD_TOO_LARGE
    );
    let server = lb.shared().pool("p").unwrap().server("A").unwrap();
    assert_eq!(
        server.stats.failures_total(),
        0,
        "the client's fault was blamed on the server"
    );
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_passes_through_with_status_trailers_and_deadlines() {
    let servers_g = [grpc::spawn_echo("G1").await, grpc::spawn_echo("G2").await];
    let list: Vec<(String, std::net::SocketAddr, u32)> = servers_g
        .iter()
        .map(|s| (s.name.clone(), s.addr, 1))
        .collect();
    let lb = fulcrum(&config(
        "round_robin",
        &list,
        "",
        "http2 = true\n[pools.health_check]\nkind = \"grpc\"\ninterval = \"200ms\"\nrise = 1\nfall = 1",
    ));
    let mut echo = grpc::client(web(&lb)).await;
    // Unary, over both servers.
    let mut seen = std::collections::HashSet::new();
    for i in 0..4 {
        let reply = echo
            .unary(EchoRequest::new(&format!("hi {i}")))
            .await
            .unwrap();
        let server = reply
            .metadata()
            .get("x-server")
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();
        assert_eq!(reply.get_ref().message, format!("hi {i}"));
        seen.insert(server);
    }
    assert_eq!(
        seen.len(),
        2,
        "round robin over both gRPC servers: {seen:?}"
    );
    // Server streaming: five replies in order.
    let mut req = EchoRequest::new("stream");
    req.count = 5;
    let mut stream = echo.server_stream(req).await.unwrap().into_inner();
    let (replies, end) = grpc::collect(&mut stream).await;
    assert!(end.is_ok(), "{end:?}");
    assert_eq!(
        replies.iter().map(|r| r.index).collect::<Vec<_>>(),
        vec![0, 1, 2, 3, 4]
    );
    // Bidirectional: a reply per request.
    let requests: Vec<EchoRequest> = (0..3).map(|i| EchoRequest::new(&format!("b{i}"))).collect();
    let mut stream = echo
        .bidi(tonic::codegen::tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let (replies, end) = grpc::collect(&mut stream).await;
    assert!(end.is_ok(), "{end:?}");
    assert_eq!(
        replies
            .iter()
            .map(|r| r.message.as_str())
            .collect::<Vec<_>>(),
        vec!["b0", "b1", "b2"]
    );
    // A failure keeps its code, message and trailer metadata; in a stream, after the replies.
    let mut failing = EchoRequest::new("fail");
    failing.fail_code = tonic::Code::PermissionDenied as i32;
    let status = echo.unary(failing.clone()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert_eq!(status.metadata().get("x-detail").unwrap(), "why");
    failing.count = 2;
    let mut stream = echo.server_stream(failing).await.unwrap().into_inner();
    let (replies, end) = grpc::collect(&mut stream).await;
    assert_eq!(replies.len(), 2);
    let status = end.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert_eq!(status.metadata().get("x-detail").unwrap(), "why");
    // Deadlines: the grpc-timeout reaches the server, which gives up in time.
    let mut slow = tonic::Request::new({
        let mut r = EchoRequest::new("slow");
        r.delay_ms = 3000;
        r
    });
    slow.set_timeout(Duration::from_millis(300));
    let started = std::time::Instant::now();
    let status = echo.unary(slow).await.unwrap_err();
    assert!(
        matches!(
            status.code(),
            tonic::Code::Cancelled | tonic::Code::DeadlineExceeded
        ),
        "{status:?}"
    );
    assert!(started.elapsed() < Duration::from_millis(2500));
    assert!(servers_g.iter().any(|s| s
        .request_headers()
        .iter()
        .any(|h| h.get("grpc-timeout").is_some())));
    assert!(servers_g.iter().all(|s| s.all_had_te_trailers()));
    // The gRPC health check follows the server's status: a NOT_SERVING server gets nothing.
    servers_g[0].set_health(false).await;
    let pool = lb.shared().pool("p").unwrap();
    let g1 = pool.server("G1").unwrap();
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while g1.health.is_healthy() && std::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!g1.health.is_healthy(), "G1 still up");
    for _ in 0..4 {
        let reply = echo.unary(EchoRequest::new("x")).await.unwrap();
        assert_eq!(reply.metadata().get("x-server").unwrap(), "G2");
    }
    stop(lb).await;
}

/// A WebSocket reaches a TLS pool's server over TLS and echoes both ways, twice, with a plain request
/// served after each tunnel; an `http2` pool answers 501.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_reaches_a_tls_pool_and_an_http2_pool_answers_501() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("servers CA");
    let ca_path = ca.write(dir.path(), "ca");
    let apps = vec![tls_app(&ca, dir.path(), "A").await];
    let pool = format!("tls = {{ ca = {ca_path:?}, sni = \"app.test\" }}");
    let lb = fulcrum(&config("round_robin", &servers(&apps), "", &pool));
    for round in 0..2 {
        let (mut ws, resp) = tokio_tungstenite::connect_async(format!("ws://{}/ws", web(&lb)))
            .await
            .expect("ws handshake");
        assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
        for msg in ["hello", "over", "tls"] {
            let msg = format!("{msg} {round}");
            ws.send(Message::text(msg.clone())).await.unwrap();
            let echoed = tokio::time::timeout(Duration::from_secs(5), ws.next())
                .await
                .expect("echo in time")
                .unwrap()
                .unwrap();
            assert_eq!(echoed.into_text().unwrap().as_str(), msg);
        }
        ws.close(None).await.unwrap();
        let reply = get(&client(), &format!("http://{}/", web(&lb))).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        assert!(reply.body.contains("GET / HTTP/1.1"), "{}", reply.body);
    }
    stop(lb).await;
    let pool = format!("http2 = true\ntls = {{ ca = {ca_path:?}, sni = \"app.test\" }}");
    let lb = fulcrum(&config("round_robin", &servers(&apps), "", &pool));
    let refused = tokio_tungstenite::connect_async(format!("ws://{}/ws", web(&lb))).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), StatusCode::NOT_IMPLEMENTED)
        }
        other => panic!("expected 501, got {other:?}"),
    }
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_of_a_tls_pool_speak_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("servers CA");
    let ca_path = ca.write(dir.path(), "ca");
    let apps = vec![tls_app(&ca, dir.path(), "A").await];
    for http2 in [false, true] {
        let pool = format!(
            "http2 = {http2}\ntls = {{ ca = {ca_path:?}, sni = \"app.test\" }}\n\
             [pools.health_check]\nkind = \"http\"\npath = \"/health\"\ninterval = \"100ms\"\n\
             timeout = \"2s\"\nrise = 1\nfall = 1\ninitial_state = \"down\""
        );
        let lb = fulcrum(&config("round_robin", &servers(&apps), "", &pool));
        let server = lb.shared().pool("p").unwrap().server("A").unwrap();
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while !server.health.is_healthy() && std::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            server.health.is_healthy(),
            "the TLS server never passed its check"
        );
        let reply = get(&client(), &format!("http://{}/", web(&lb))).await;
        assert_eq!(reply.status, StatusCode::OK);
        stop(lb).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_goes_away_loses_no_request() {
    // Two HTTP/2 servers; one stops (HTTP/2 GOAWAY, then its port closes) while requests run. Its
    // streams in flight finish, requests it did not take go to the other server: none fails.
    let apps = apps_with(vec![AppConfig::new("A"), AppConfig::new("B")]).await;
    let lb = fulcrum(&config(
        "round_robin",
        &servers(&apps),
        "",
        "http2 = true\nretries = 2",
    ));
    let web = web(&lb);
    let mut apps = apps.into_iter();
    let a = apps.next().unwrap();
    let _b = apps.next().unwrap();
    let mut tasks = Vec::new();
    for i in 0..8 {
        tasks.push(tokio::spawn(async move {
            let c = client();
            let mut statuses = Vec::new();
            for j in 0..40 {
                let path = if (i + j) % 4 == 0 { "/delay/50" } else { "/" };
                statuses.push(get(&c, &format!("http://{web}{path}")).await.status);
            }
            statuses
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    a.stop().await;
    let mut served = 0;
    for t in tasks {
        for status in t.await.unwrap() {
            assert_eq!(status, StatusCode::OK);
            served += 1;
        }
    }
    assert_eq!(served, 320);
    stop(lb).await;
}

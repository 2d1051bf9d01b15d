//! Black-box tests of the HTTP proxy: real fulcrum-app servers, a real balancer, real sockets.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http::{Request, StatusCode};
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn count(seq: &[String], name: &str) -> usize {
    seq.iter().filter(|s| *s == name).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_is_exact_and_in_turn() {
    let apps = apps(&["A", "B", "C"]).await;
    let lb = fulcrum(&config("round_robin", &servers(&apps), "", ""));
    let seq = pick_sequence(web(&lb), 30).await;
    for n in ["A", "B", "C"] {
        assert_eq!(count(&seq, n), 10, "{seq:?}");
    }
    // In turn: each window of three distinct.
    assert!(
        seq.chunks(3)
            .all(|w| w[0] != w[1] && w[1] != w[2] && w[0] != w[2]),
        "{seq:?}"
    );
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_round_robin_one_two_three_is_exact_and_interleaved() {
    let apps = apps(&["A", "B", "C"]).await;
    let mut s = servers(&apps);
    s[1].2 = 2;
    s[2].2 = 3;
    let lb = fulcrum(&config("weighted_round_robin", &s, "", ""));
    let seq = pick_sequence(web(&lb), 60).await;
    assert_eq!(
        (count(&seq, "A"), count(&seq, "B"), count(&seq, "C")),
        (10, 20, 30),
        "{seq:?}"
    );
    // Smooth: C (weight 3 of 6) never gets three in a row, and every cycle of 6 holds 1 A, 2 B, 3 C.
    assert!(
        seq.windows(3).all(|w| !(w[0] == w[1] && w[1] == w[2])),
        "bursty: {seq:?}"
    );
    for cycle in seq.chunks(6) {
        assert_eq!(
            (count(cycle, "A"), count(cycle, "B"), count(cycle, "C")),
            (1, 2, 3),
            "cycle {cycle:?}"
        );
    }
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_are_set_and_hop_by_hop_headers_stripped() {
    let apps = apps(&["A"]).await;
    let lb = fulcrum(&config("round_robin", &servers(&apps), "", ""));
    let addr = web(&lb);
    // Raw HTTP/1.1 so that the client library does not rewrite what we send.
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = "GET /echo-headers?x=1 HTTP/1.1\r\nHost: shop.example:81\r\nConnection: keep-alive, x-secret\r\n\
               X-Secret: hidden\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Connection: keep-alive\r\n\
               X-Forwarded-For: 203.0.113.9\r\nX-Custom: kept\r\n\r\n";
    s.write_all(req.as_bytes()).await.unwrap();
    let text = read_response(&mut s).await;
    let lower = text.to_ascii_lowercase();
    assert!(
        lower.starts_with("http/1.1 404"),
        "demo server answers unknown paths with 404: {text}"
    );
    // The app echoes only on `/`; send that too on the same connection.
    let req = "GET /?x=1 HTTP/1.1\r\nHost: shop.example:81\r\nConnection: keep-alive, x-secret\r\n\
               X-Secret: hidden\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nUpgrade: h2c\r\n\
               X-Forwarded-For: 203.0.113.9\r\nX-Custom: kept\r\n\r\n";
    s.write_all(req.as_bytes()).await.unwrap();
    let text = read_response(&mut s).await.to_ascii_lowercase();
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    assert!(
        body.starts_with("server: a\nget /?x=1 http/1.1\n"),
        "{body}"
    );
    assert!(
        body.contains("\nx-forwarded-for: 203.0.113.9, 127.0.0.1\n"),
        "{body}"
    );
    assert!(body.contains("\nx-forwarded-proto: http\n"), "{body}");
    assert!(
        body.contains("\nx-forwarded-host: shop.example:81\n"),
        "{body}"
    );
    assert!(body.contains("\nx-custom: kept\n"), "{body}");
    for gone in [
        "x-secret",
        "keep-alive:",
        "\nte:",
        "upgrade",
        "proxy-connection",
    ] {
        assert!(!body.contains(gone), "{gone} reached the server: {body}");
    }
    stop(lb).await;
}

/// Reads one HTTP/1.1 response with a Content-Length body.
async fn read_response(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let len = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap())
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                break;
            }
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_through_the_proxy() {
    let apps = apps(&["A"]).await;
    let lb = fulcrum(&config("round_robin", &servers(&apps), "", ""));
    let (mut ws, resp) = tokio_tungstenite::connect_async(format!("ws://{}/ws", web(&lb)))
        .await
        .expect("ws handshake");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    for msg in ["hello", "through", "fulcrum"] {
        ws.send(tokio_tungstenite::tungstenite::Message::text(msg))
            .await
            .unwrap();
        let echoed = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(echoed.into_text().unwrap().as_str(), msg);
    }
    ws.close(None).await.unwrap();
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_clients_are_served_over_http1_servers() {
    let apps = apps(&["A"]).await;
    let lb = fulcrum(&config("round_robin", &servers(&apps), "", ""));
    let c = h2c_client();
    let r = get(&c, &format!("http://{}/?via=h2", web(&lb))).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        r.body.contains("GET /?via=h2 HTTP/1.1"),
        "server sees HTTP/1.1: {}",
        r.body
    );
    assert!(
        r.body.contains(&format!("host: {}", web(&lb))),
        "authority becomes Host: {}",
        r.body
    );
    stop(lb).await;
}

/// The streams of one HTTP/2 connection run side by side (they live in the connection's task), and a
/// stop lets those in flight finish: twenty 300 ms requests on one h2c connection, the balancer told
/// to stop while they wait, all answered 200, in far less than the 6 s they would take one by one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_streams_run_side_by_side_and_finish_through_a_stop() {
    let apps = apps(&["A"]).await;
    let lb = fulcrum(&config("round_robin", &servers(&apps), "", ""));
    let c = h2c_client();
    // One request first, so that the twenty share its connection.
    let warm = get(&c, &format!("http://{}/", web(&lb))).await;
    assert_eq!(warm.status, StatusCode::OK);
    let started = Instant::now();
    let url = format!("http://{}/delay/300", web(&lb));
    let waiting: Vec<_> = (0..20)
        .map(|_| {
            let (c, url) = (c.clone(), url.clone());
            tokio::spawn(async move { get(&c, &url).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stopping = tokio::spawn(stop(lb));
    for w in waiting {
        let r = w.await.unwrap();
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(4),
        "twenty streams took {took:?}"
    );
    stopping.await.unwrap();
}

/// A server that accepts, reads the request, counts it, and closes without answering.
async fn black_hole() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let s = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = l.accept().await {
            let s = s.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                if let Ok(n) = sock.read(&mut buf).await {
                    if n > 0 {
                        s.fetch_add(1, Ordering::SeqCst);
                    }
                }
            });
        }
    });
    (addr, seen)
}

/// An address with nothing listening.
async fn dead_addr() -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_failure_gives_502_and_the_request_is_never_replayed() {
    let (addr, seen) = black_hole().await;
    let apps = apps(&["B"]).await;
    let s = vec![
        ("hole".to_string(), addr, 1),
        ("B".to_string(), apps[0].addr(), 1),
    ];
    let lb = fulcrum(&config("round_robin", &s, "", "retries = 2"));
    let c = client();
    // Round robin starts at the black hole: it takes the POST, and the POST must not go to B as well.
    let req = Request::post(format!("http://{}/login", web(&lb)))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(br#"{"user":"martin"}"#)))
        .unwrap();
    let r = send(&c, req).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert!(r.body.contains("502 Bad Gateway"), "{}", r.body);
    assert_eq!(
        seen.load(Ordering::SeqCst),
        1,
        "the server saw the request exactly once"
    );
    let snap = lb.shared().pools()[0].snapshot_full();
    assert_eq!(
        snap.servers[1].stats.requests_total(),
        0,
        "the POST was not replayed on B"
    );
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_failures_are_retried_on_the_next_server() {
    let apps = apps(&["A", "B"]).await;
    let dead = dead_addr().await;
    let s = vec![
        ("dead".to_string(), dead, 1),
        ("A".to_string(), apps[0].addr(), 1),
        ("B".to_string(), apps[1].addr(), 1),
    ];
    let lb = fulcrum(&config("round_robin", &s, "", "retries = 2"));
    let c = client();
    for _ in 0..12 {
        let req = Request::post(format!("http://{}/login", web(&lb)))
            .body(Full::new(Bytes::from_static(br#"{"user":"u"}"#)))
            .unwrap();
        let r = send(&c, req).await;
        assert_eq!(
            r.status,
            StatusCode::OK,
            "a refused connect sent nothing, so even a POST moves on: {}",
            r.body
        );
    }
    assert!(
        lb.shared().pools()[0].snapshot_full().servers[0]
            .stats
            .failures_total()
            >= 4
    );
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_reachable_server_gives_503_with_a_body_at_once() {
    let s = vec![
        ("x".to_string(), dead_addr().await, 1),
        ("y".to_string(), dead_addr().await, 1),
    ];
    let lb = fulcrum(&config("round_robin", &s, "", ""));
    let started = Instant::now();
    let r = get(&client(), &format!("http://{}/", web(&lb))).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.body.contains("no server is available"), "{}", r.body);
    assert!(started.elapsed() < Duration::from_secs(3), "never a hang");
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_server_gives_504() {
    let apps = apps(&["A"]).await;
    let lb = fulcrum(&config(
        "round_robin",
        &servers(&apps),
        "",
        "response_timeout = \"300ms\"",
    ));
    let r = get(&client(), &format!("http://{}/delay/3000", web(&lb))).await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(r.body.contains("did not answer in time"), "{}", r.body);
    // The pool recovers at once for a fast request.
    let r = get(&client(), &format!("http://{}/delay/10", web(&lb))).await;
    assert_eq!(r.status, StatusCode::OK);
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_client_gets_408() {
    let apps = apps(&["A"]).await;
    let lb = fulcrum(&config(
        "round_robin",
        &servers(&apps),
        "request_header_timeout = \"300ms\"",
        "",
    ));
    let mut s = TcpStream::connect(web(&lb)).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: slow\r\n")
        .await
        .unwrap(); // head never finished
    let started = Instant::now();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("closed in time")
        .unwrap();
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 408"), "got {text:?}");
    assert!(started.elapsed() >= Duration::from_millis(250));
    // An idle keep-alive connection is closed silently, not with a 408.
    let mut idle = TcpStream::connect(web(&lb)).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), idle.read_to_end(&mut buf))
        .await
        .expect("closed in time")
        .unwrap();
    assert!(
        buf.is_empty(),
        "idle connection got {:?}",
        String::from_utf8_lossy(&buf)
    );
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_send_requests_to_their_pools() {
    let apps = apps(&["A", "B"]).await;
    let text = format!(
        "[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\npool = \"main\"\n\
         [[listeners.routes]]\npath_prefix = \"/api/\"\npool = \"api\"\n\
         [[listeners.routes]]\nhost = \"*.beta.test\"\npool = \"api\"\n\
         [[listeners.routes]]\nheaders = {{ \"x-version\" = \"2\" }}\npool = \"api\"\n\
         [[listeners.routes]]\ncookie = {{ name = \"beta\", value = \"1\" }}\npool = \"api\"\n\
         [[listeners.routes]]\nquery = {{ \"v\" = \"2\" }}\nmethod = \"GET\"\npool = \"api\"\n\
         [[listeners.routes]]\npath_regex = \"^/v[0-9]+/\"\npool = \"api\"\n\
         [[pools]]\nname = \"main\"\nservers = [{{ address = \"{}\" }}]\n\
         [[pools]]\nname = \"api\"\nservers = [{{ address = \"{}\" }}]\n",
        apps[0].addr(),
        apps[1].addr()
    );
    let lb = fulcrum(&text);
    let base = format!("http://{}", web(&lb));
    let c = client();
    let via = |req: http::request::Builder| req.body(Full::default()).unwrap();
    let cases: Vec<(Request<Full<Bytes>>, &str)> = vec![
        (via(Request::get(format!("{base}/"))), "A"),
        (via(Request::get(format!("{base}/api/users"))), "B"),
        (via(Request::get(format!("{base}/apix"))), "A"),
        (
            via(Request::get(format!("{base}/")).header("host", "x.beta.test")),
            "B",
        ),
        (
            via(Request::get(format!("{base}/")).header("x-version", "2")),
            "B",
        ),
        (
            via(Request::get(format!("{base}/")).header("x-version", "3")),
            "A",
        ),
        (
            via(Request::get(format!("{base}/")).header("cookie", "a=b; beta=1")),
            "B",
        ),
        (via(Request::get(format!("{base}/?v=2"))), "B"),
        (via(Request::post(format!("{base}/?v=2"))), "A"),
        (via(Request::get(format!("{base}/v2/x"))), "B"),
    ];
    for (i, (req, want)) in cases.into_iter().enumerate() {
        let r = send(&c, req).await;
        assert_eq!(r.server(), want, "case {i}: {}", r.body);
    }
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_metrics_probes_and_dashboard() {
    let apps = apps(&["A", "B"]).await;
    let lb = fulcrum(&config("round_robin", &servers(&apps), "", ""));
    let admin = lb.admin_addr().unwrap();
    pick_sequence(web(&lb), 4).await;
    let c = client();
    let pools = get(&c, &format!("http://{admin}/api/v1/pools")).await;
    assert_eq!(pools.status, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_str(&pools.body).unwrap();
    let servers = &v["pools"][0]["servers"];
    assert_eq!(v["pools"][0]["name"], "p");
    for s in servers.as_array().unwrap() {
        for key in [
            "name",
            "address",
            "weight",
            "state",
            "active_connections",
            "requests_total",
            "failures_total",
            "latency_ewma_ms",
        ] {
            assert!(s.get(key).is_some(), "missing {key}: {s}");
        }
        assert_eq!(s["state"], "up");
        assert_eq!(s["requests_total"], 2);
        assert_eq!(s["active_connections"], 0, "in flight ends with the body");
    }
    let m = get(&c, &format!("http://{admin}/metrics")).await;
    assert!(
        m.body
            .contains("fulcrum_listener_responses_total{listener=\"web\",class=\"2xx\"} 4"),
        "{}",
        m.body
    );
    assert!(
        m.body
            .contains("fulcrum_server_requests_total{pool=\"p\",server=\"A\",class=\"2xx\"} 2"),
        "{}",
        m.body
    );
    assert!(
        m.body
            .contains("fulcrum_server_response_seconds_count{pool=\"p\",server=\"A\"} 2"),
        "{}",
        m.body
    );
    assert!(
        m.body
            .contains("fulcrum_server_state{pool=\"p\",server=\"B\",state=\"up\"} 1"),
        "{}",
        m.body
    );
    assert_eq!(
        get(&c, &format!("http://{admin}/healthz")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        get(&c, &format!("http://{admin}/readyz")).await.status,
        StatusCode::OK
    );
    let dash = get(&c, &format!("http://{admin}/")).await;
    assert!(
        dash.body.contains("<html") && dash.body.contains("/api/v1/pools"),
        "dashboard page"
    );
    let status = get(&c, &format!("http://{admin}/api/v1/status")).await;
    let v: serde_json::Value = serde_json::from_str(&status.body).unwrap();
    assert_eq!(v["listeners"][0]["requests_total"], 4);
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_listener_queues_new_connections_instead_of_failing_them() {
    let apps = apps(&["A"]).await;
    let extra = "max_connections = 1\nrequest_header_timeout = \"600ms\"";
    let lb = fulcrum(&config("round_robin", &servers(&apps), extra, ""));
    // The first connection takes the only slot and sends nothing; it is closed after 600 ms.
    let hog = TcpStream::connect(web(&lb)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let r = get(&client(), &format!("http://{}/", web(&lb))).await;
    assert_eq!(r.status, StatusCode::OK, "served once the slot frees up");
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "waited for the slot: {:?}",
        started.elapsed()
    );
    drop(hog);
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_connections_are_kept_alive_and_reused() {
    let ok = raw_server(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", false).await;
    let (addr, conns) = (ok.addr, ok.connections);
    let lb = fulcrum(&config("round_robin", &[("s".into(), addr, 1)], "", ""));
    // One client connection (so one worker), twenty requests in turn.
    let mut s = TcpStream::connect(web(&lb)).await.unwrap();
    for _ in 0..20 {
        s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        let text = read_response(&mut s).await;
        assert!(
            text.starts_with("HTTP/1.1 200") && text.ends_with("\r\n\r\nok"),
            "{text}"
        );
    }
    assert_eq!(
        conns.load(Ordering::SeqCst),
        1,
        "one server connection carried all 20 requests"
    );
    stop(lb).await;
}

/// An answer the connection closes after leaves with the FIN in one segment, and the request's ACK
/// rides on it (the listener accepts with delayed ACKs): the client receives the SYN-ACK and that one
/// segment, where it used to receive an ACK, the answer and a FIN. A request that waited longer than
/// the delayed-ACK timer (40 ms) gets its ACK alone, so one connection of twenty showing two segments
/// is the proof, and none may show more than three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closing_answer_and_its_fin_reach_the_client_in_one_segment() {
    let ok = raw_server(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", false).await;
    let lb = fulcrum(&config("round_robin", &[("s".into(), ok.addr, 1)], "", ""));
    let mut counts = Vec::new();
    for _ in 0..20 {
        let (answer, segments) = exchange_counting_segments(
            web(&lb),
            b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        )
        .await;
        let text = String::from_utf8_lossy(&answer);
        assert!(
            text.starts_with("HTTP/1.1 200") && text.ends_with("\r\n\r\nok"),
            "{text}"
        );
        assert!(text.contains("connection: close\r\n"), "{text}");
        counts.push(segments);
    }
    assert!(
        counts.iter().all(|&n| n <= 3),
        "segments received: {counts:?}"
    );
    assert!(counts.contains(&2), "segments received: {counts:?}");
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keep_alive_connection_the_server_closed_is_not_reused() {
    let ok = raw_server(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", true).await;
    let (addr, conns) = (ok.addr, ok.connections);
    let lb = fulcrum(&config("round_robin", &[("s".into(), addr, 1)], "", ""));
    let c = client();
    for i in 0..10 {
        // Give the server's close time to arrive, as between real requests.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let req = Request::post(format!("http://{}/", web(&lb)))
            .body(Full::new(Bytes::from_static(b"x")))
            .unwrap();
        let r = send(&c, req).await;
        assert_eq!(
            (r.status, r.body.as_str()),
            (StatusCode::OK, "ok"),
            "request {i}"
        );
    }
    assert_eq!(conns.load(Ordering::SeqCst), 10);
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_bodies_head_and_bodiless_statuses_pass_through() {
    let apps = apps(&["A"]).await;
    let lb = fulcrum(&config("round_robin", &servers(&apps), "", ""));
    let base = format!("http://{}", web(&lb));
    let c = client();
    // /echo streams its answer back (chunked), the request body here has a length.
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let req = Request::post(format!("{base}/echo"))
        .body(Full::new(Bytes::from(payload.clone())))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    use http_body_util::BodyExt;
    let echoed = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(echoed.len(), payload.len());
    assert!(echoed[..] == payload[..], "echo intact");
    // HEAD: a Content-Length but no body; must not wait for one.
    let r = send(
        &c,
        Request::head(format!("{base}/bytes/5000"))
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body, "");
    // 204 and 304 carry no body; the connection stays usable after them.
    for code in [204u16, 304, 200] {
        let r = get(&c, &format!("{base}/status/{code}")).await;
        assert_eq!(r.status.as_u16(), code);
    }
    stop(lb).await;
}

/// Reads one HTTP/1.1 response with a `Content-Length` body from `s`: (head, body). The body is cut
/// short when the connection closes first.
async fn read_sized_response(s: &mut TcpStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let n = s.read(&mut chunk).await.unwrap();
        assert!(
            n > 0,
            "closed inside the head: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .expect("a content-length")
        .trim()
        .parse()
        .unwrap();
    let mut body = buf.split_off(end);
    while body.len() < len {
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    assert!(body.len() <= len, "more than the content-length arrived");
    (head, body)
}

/// fulcrum-app's `/bytes` pattern: `a` to `z`, over and over.
fn is_pattern(body: &[u8]) -> bool {
    body.iter()
        .enumerate()
        .all(|(i, b)| *b == b'a' + (i % 26) as u8)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_are_spliced_intact_around_small_ones_on_one_connection() {
    let apps = apps(&["A"]).await;
    let lb = fulcrum(&config("round_robin", &servers(&apps), "", ""));
    let mut s = TcpStream::connect(web(&lb)).await.unwrap();
    // Below, at and above the splice threshold (16 KiB left after the first read), and large.
    let sizes = [10, 16_383, 16_384, 40_000, 1_048_583, 10, 3_000_000, 65_536];
    for n in sizes {
        s.write_all(format!("GET /bytes/{n} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let (head, body) = read_sized_response(&mut s).await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert_eq!(body.len(), n, "{head}");
        assert!(is_pattern(&body), "the {n}-byte body was altered");
    }
    // Pipelined: two large answers back to back on the same connection.
    s.write_all(b"GET /bytes/200000 HTTP/1.1\r\nhost: x\r\n\r\nGET /bytes/300000 HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    for n in [200_000, 300_000] {
        let (_, body) = read_sized_response(&mut s).await;
        assert_eq!(body.len(), n);
        assert!(is_pattern(&body));
    }
    // Most of the large bodies went kernel to kernel, and the counter is exported.
    let state = lb.shared().state();
    let spliced = state.listeners[0]
        .stats()
        .spliced_bytes
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        (3_000_000..=4_700_000).contains(&spliced),
        "{spliced} bytes spliced"
    );
    let metrics = common::metrics(&lb).await;
    assert!(
        metrics.contains(&format!(
            "fulcrum_listener_spliced_bytes_total{{listener=\"web\"}} {spliced}"
        )),
        "{metrics}"
    );
    stop(lb).await;
}

/// A raw server whose every answer declares `length` bytes and sends 100,000 of the `/bytes` pattern
/// (closing after each with `close`), and a balancer in front of it.
async fn pattern_server_behind_fulcrum(
    length: usize,
    close: bool,
) -> (RawServer, fulcrum::runtime::Running) {
    let mut answer = format!("HTTP/1.1 200 OK\r\ncontent-length: {length}\r\n\r\n").into_bytes();
    answer.extend((0..100_000).map(|i| b'a' + (i % 26) as u8));
    let server = raw_server(Box::leak(answer.into_boxed_slice()), close).await;
    let lb = fulcrum(&config(
        "round_robin",
        &[("A".into(), server.addr, 1)],
        "",
        "",
    ));
    (server, lb)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spliced_body_leaves_the_server_connection_reusable() {
    let (server, lb) = pattern_server_behind_fulcrum(100000, false).await;
    let mut s = TcpStream::connect(web(&lb)).await.unwrap();
    for _ in 0..5 {
        s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let (_, body) = read_sized_response(&mut s).await;
        assert_eq!(body.len(), 100_000);
        assert!(is_pattern(&body));
    }
    assert_eq!(server.requests.load(Ordering::SeqCst), 5);
    assert_eq!(
        server.connections.load(Ordering::SeqCst),
        1,
        "the server connection was not reused after its spliced bodies"
    );
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_closes_inside_a_spliced_body_cuts_the_client_off() {
    let (server, lb) = pattern_server_behind_fulcrum(1000000, true).await;
    for _ in 0..2 {
        let mut s = TcpStream::connect(web(&lb)).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        // The client gets what the server sent, then the close: never a hang, never a padded body.
        let (head, body) =
            tokio::time::timeout(Duration::from_secs(20), read_sized_response(&mut s))
                .await
                .expect("the client was left waiting");
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert_eq!(body.len(), 100_000);
        assert!(is_pattern(&body));
        let mut rest = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(20), s.read(&mut rest))
            .await
            .expect("the client connection stayed open")
            .unwrap_or(0);
        assert_eq!(n, 0);
    }
    // Each request got a new server connection: the cut one was not pooled.
    assert_eq!(server.connections.load(Ordering::SeqCst), 2);
    stop(lb).await;
}

//! The access log (JSON and combined lines for HTTP, WebSocket, retried and timed-out requests, TCP
//! sessions and UDP flows) and explainable picks (the `X-Fulcrum-*` headers and
//! `GET /api/v1/pools/{pool}/explain`), against real fulcrum-app servers on 127.0.0.1.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http::{Request, StatusCode};
use http_body_util::Full;
use serde_json::Value;

/// A port nothing listens on (bound, then closed).
fn dead_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// Reads the log file until it holds at least `n` lines (the writer thread flushes within moments).
async fn lines(path: &Path, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_owned).collect();
        if lines.len() >= n {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {n} lines in time:\n{text}",
            lines.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn log_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("access.log")
}

/// One HTTP listener `web` over the apps (and a dead server first, so that round robin retries).
fn http_config(
    apps: &[fulcrum_app::AppHandle],
    dead: SocketAddr,
    log: &Path,
    format: &str,
) -> String {
    let mut servers = vec![("dead".to_owned(), dead, 1)];
    servers.extend(common::servers(apps));
    let mut text = config(
        "round_robin",
        &servers,
        "",
        "response_timeout = \"300ms\"\nretries = 2",
    );
    text.push_str(&format!(
        "\n[access_log]\nformat = \"{format}\"\npath = \"{}\"\n",
        log.display()
    ));
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_describe_plain_retried_timed_out_and_websocket_requests() {
    let apps = apps(&["A", "B"]).await;
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    let lb = fulcrum(&http_config(&apps, dead_port(), &path, "json"));
    let c = client();
    let base = format!("http://{}", web(&lb));
    // Three GETs: round robin meets the dead server once, and that request is retried.
    for _ in 0..3 {
        let r = send(
            &c,
            Request::get(format!("{base}/?q=1"))
                .header("user-agent", "tester/1")
                .header("referer", "http://example.test/")
                .body(Full::default())
                .unwrap(),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    }
    // A POST with a body, a request that times out at the server, a WebSocket.
    let r = send(
        &c,
        Request::post(format!("{base}/echo"))
            .body(Full::new(Bytes::from_static(b"0123456789")))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = get(&c, &format!("{base}/delay/3000")).await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", web(&lb)))
        .await
        .expect("websocket through fulcrum");
    ws.send(tokio_tungstenite::tungstenite::Message::text("hi"))
        .await
        .unwrap();
    let echoed = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("echo in time");
    assert!(echoed.is_some());
    drop(ws);

    let lines = lines(&path, 6).await;
    let parsed: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    for v in &parsed {
        assert_eq!(v["kind"], "http");
        assert_eq!(v["listener"], "web");
        assert_eq!(v["pool"], "p");
        assert!(
            v["client"].as_str().unwrap().starts_with("127.0.0.1:"),
            "{v}"
        );
        assert!(v["time"].as_str().unwrap().ends_with('Z'), "{v}");
        assert!(v["request_time_ms"].as_f64().unwrap() >= 0.0);
        assert_eq!(v["route"], Value::Null);
        assert_eq!(v["sticky"], "none");
    }
    let gets: Vec<&Value> = parsed.iter().filter(|v| v["path"] == "/?q=1").collect();
    assert_eq!(gets.len(), 3);
    for v in &gets {
        assert_eq!(v["status"], 200);
        assert_eq!(v["method"], "GET");
        assert_eq!(v["protocol"], "HTTP/1.1");
        assert_eq!(v["user_agent"], "tester/1");
        assert_eq!(v["referer"], "http://example.test/");
        assert_eq!(v["termination"], "ok");
        assert!(v["bytes_out"].as_u64().unwrap() > 0);
        assert!(v["server_time_ms"].as_f64().is_some());
        assert_ne!(v["server"], "dead");
    }
    let retried: Vec<&&Value> = gets.iter().filter(|v| v["retries"] == 1).collect();
    assert_eq!(retried.len(), 1, "one GET met the dead server: {gets:?}");
    let post = parsed.iter().find(|v| v["path"] == "/echo").unwrap();
    assert_eq!(post["method"], "POST");
    assert_eq!(post["bytes_in"], 10);
    let timed_out = parsed.iter().find(|v| v["path"] == "/delay/3000").unwrap();
    assert_eq!(timed_out["status"], 504);
    assert_eq!(timed_out["termination"], "timeout");
    assert!(timed_out["server"].is_string(), "{timed_out}");
    let ws = parsed.iter().find(|v| v["path"] == "/ws").unwrap();
    assert_eq!(ws["status"], 101);
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn combined_lines_follow_the_apache_format() {
    let apps = apps(&["A"]).await;
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    let lb = fulcrum(&http_config(&apps, dead_port(), &path, "combined"));
    let c = client();
    let base = format!("http://{}", web(&lb));
    for _ in 0..2 {
        let r = send(
            &c,
            Request::get(format!("{base}/bytes/100"))
                .header("user-agent", "tester \"quoted\"")
                .body(Full::default())
                .unwrap(),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
    }
    let r = get(&c, &format!("{base}/delay/3000")).await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", web(&lb)))
        .await
        .expect("websocket through fulcrum");
    drop(ws);
    let lines = lines(&path, 4).await;
    // client - - [dd/Mon/yyyy:hh:mm:ss +0000] "METHOD target PROTO" status bytes "referer" "ua"
    let re = regex::Regex::new(
        r#"^127\.0\.0\.1 - - \[\d{2}/[A-Z][a-z]{2}/\d{4}:\d{2}:\d{2}:\d{2} \+0000\] "(\S+) (\S+) (HTTP/1\.1)" (\d{3}) (\d+|-) "([^"]*)" "([^"]*)"$"#,
    )
    .unwrap();
    let mut statuses = Vec::new();
    for line in &lines {
        let m = re
            .captures(line)
            .unwrap_or_else(|| panic!("not a combined line: {line}"));
        statuses.push(m[4].to_owned());
        if &m[2] == "/bytes/100" {
            assert_eq!(&m[5], "100");
            assert_eq!(&m[7], "tester \\x22quoted\\x22");
            assert_eq!(&m[6], "-");
        }
    }
    statuses.sort();
    assert_eq!(statuses, ["101", "200", "200", "504"]);
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_filter_logs_only_the_chosen_statuses() {
    let apps = apps(&["A"]).await;
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    let mut text = config("round_robin", &common::servers(&apps), "", "");
    text.push_str(&format!(
        "\n[access_log]\npath = \"{}\"\nstatus = [\"5xx\", 404]\n",
        path.display()
    ));
    let lb = fulcrum(&text);
    let c = client();
    let base = format!("http://{}", web(&lb));
    for code in [200, 404, 201, 503, 200] {
        let r = get(&c, &format!("{base}/status/{code}")).await;
        assert_eq!(r.status.as_u16(), code);
    }
    let lines = lines(&path, 2).await;
    // Give a third line (which must not come) a moment to appear.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let lines_after = std::fs::read_to_string(&path).unwrap();
    assert_eq!(lines_after.lines().count(), 2, "{lines_after}");
    let statuses: Vec<u64> = lines
        .iter()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["status"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(statuses, [404, 503]);
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_sessions_and_udp_flows_get_a_line_each() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A TCP echo server and a UDP echo server.
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tcp_addr = tcp.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = tcp.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let udp_addr = udp.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = udp.recv_from(&mut buf).await {
            let _ = udp.send_to(&buf[..n], from).await;
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(&dir);
    let text = format!(
        "[[listeners]]\nname = \"t\"\nbind = \"127.0.0.1:0\"\nprotocol = \"tcp\"\npool = \"tp\"\n\n\
         [[listeners]]\nname = \"u\"\nbind = \"127.0.0.1:0\"\nprotocol = \"udp\"\npool = \"up\"\nidle_timeout = \"200ms\"\n\n\
         [[pools]]\nname = \"tp\"\nservers = [{{ name = \"echo\", address = \"{tcp_addr}\" }}]\n\n\
         [[pools]]\nname = \"up\"\nservers = [{{ name = \"uecho\", address = \"{udp_addr}\" }}]\n\n\
         [access_log]\npath = \"{}\"\n",
        path.display()
    );
    let lb = fulcrum(&text);
    let mut s = tokio::net::TcpStream::connect(lb.listener_addr("t").unwrap())
        .await
        .unwrap();
    s.write_all(b"hello tcp").await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, b"hello tcp");
    let u = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    u.send_to(b"hello udp", lb.listener_addr("u").unwrap())
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let (n, _) = tokio::time::timeout(Duration::from_secs(10), u.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf[..n], b"hello udp");
    // The UDP flow's line comes when it expires (idle_timeout 200 ms).
    let lines = lines(&path, 2).await;
    let parsed: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let tcp_line = parsed
        .iter()
        .find(|v| v["kind"] == "tcp")
        .expect("a tcp line");
    assert_eq!(tcp_line["listener"], "t");
    assert_eq!(tcp_line["pool"], "tp");
    assert_eq!(tcp_line["server"], "echo");
    assert_eq!(tcp_line["bytes_in"], 9);
    assert_eq!(tcp_line["bytes_out"], 9);
    assert_eq!(tcp_line["termination"], "ok");
    assert!(tcp_line["server_time_ms"].as_f64().is_some());
    let udp_line = parsed
        .iter()
        .find(|v| v["kind"] == "udp")
        .expect("a udp line");
    assert_eq!(udp_line["listener"], "u");
    assert_eq!(udp_line["server"], "uecho");
    assert_eq!(udp_line["bytes_in"], 9);
    assert_eq!(udp_line["bytes_out"], 9);
    assert_eq!(udp_line["termination"], "idle_timeout");
    stop(lb).await;
}

/// Sends `GET path` with the explain header (and `extra` headers) and returns the reply.
async fn explained(c: &HttpClient, base: &str, path: &str, extra: &[(&str, &str)]) -> Reply {
    let mut req = Request::get(format!("{base}{path}")).header("x-fulcrum-explain", "1");
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let r = send(c, req.body(Full::default()).unwrap()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    r
}

fn header<'a>(r: &'a Reply, name: &str) -> &'a str {
    r.headers
        .get(name)
        .unwrap_or_else(|| panic!("{name} in {:?}", r.headers))
        .to_str()
        .unwrap()
}

async fn explain_api(lb: &fulcrum::runtime::Running, query: &str) -> Value {
    let r = get(
        &client(),
        &format!(
            "http://{}/api/v1/pools/p/explain?{query}",
            lb.admin_addr().unwrap()
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    serde_json::from_str(&r.body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_headers_and_endpoint_agree_with_where_requests_go() {
    let apps = apps(&["A", "B", "C"]).await;
    let servers = common::servers(&apps);
    let c = client();

    // Each algorithm family: the header names the server that really answered, and the candidates
    // start with it when it was available.
    for algorithm in [
        "round_robin",
        "least_connections",
        "p2c",
        "least_response_time",
    ] {
        let lb = fulcrum(&config(algorithm, &servers, "explain = true", ""));
        let base = format!("http://{}", web(&lb));
        for _ in 0..6 {
            let r = explained(&c, &base, "/", &[]).await;
            assert_eq!(header(&r, "x-fulcrum-server"), r.server(), "{algorithm}");
            assert_eq!(header(&r, "x-fulcrum-algorithm"), algorithm);
            assert_eq!(header(&r, "x-fulcrum-pool"), "p");
            assert_eq!(header(&r, "x-fulcrum-route"), "default");
            assert_eq!(header(&r, "x-fulcrum-retries"), "0");
            let candidates = header(&r, "x-fulcrum-candidates");
            assert!(
                candidates.starts_with(&format!("{} (state=up", r.server())),
                "{algorithm}: {candidates}"
            );
            assert_eq!(candidates.matches("state=").count(), 3, "{candidates}");
        }
        // Without the header: no explanation.
        let r = get(&c, &format!("{base}/")).await;
        assert!(r.headers.get("x-fulcrum-server").is_none());
        stop(lb).await;
    }

    // Hashing on a header: the endpoint, asked for a key, names the server requests with that key
    // reach; the header agrees.
    let lb = fulcrum(&config(
        "consistent_hash",
        &servers,
        "explain = true",
        "hash_key = \"header:x-user\"",
    ));
    let base = format!("http://{}", web(&lb));
    for user in ["alice", "bob", "carol", "dave", "erin", "frank"] {
        let api = explain_api(&lb, &format!("key={user}")).await;
        let api_by_header = explain_api(&lb, &format!("header=x-user:%20{user}")).await;
        assert_eq!(
            api["server"], api_by_header["server"],
            "{api} {api_by_header}"
        );
        assert_eq!(api["hash_key"], "header:x-user");
        let r = explained(&c, &base, "/", &[("x-user", user)]).await;
        assert_eq!(api["server"], r.server(), "{user}: {api}");
        let hash = header(&r, "x-fulcrum-hash-key");
        assert_eq!(
            hash,
            format!("{}; owner={}", api["key"].as_str().unwrap(), r.server())
        );
    }
    stop(lb).await;

    // Sticky by cookie: the endpoint reads the client's cookie as a request would.
    let lb = fulcrum(&config(
        "round_robin",
        &servers,
        "explain = true",
        "sticky = { kind = \"cookie\" }",
    ));
    let base = format!("http://{}", web(&lb));
    let first = explained(&c, &base, "/", &[]).await;
    assert_eq!(header(&first, "x-fulcrum-sticky"), "miss");
    let cookie = header(&first, "set-cookie")
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let again = explained(&c, &base, "/", &[("cookie", &cookie)]).await;
    assert_eq!(header(&again, "x-fulcrum-sticky"), "hit");
    assert_eq!(again.server(), first.server());
    let api = explain_api(
        &lb,
        &form_urlencoded::Serializer::new(String::new())
            .append_pair("cookie", &cookie)
            .finish(),
    )
    .await;
    assert_eq!(api["server"], first.server());
    assert_eq!(api["sticky"]["known"], true);
    assert!(
        api["reason"].as_str().unwrap().starts_with("sticky"),
        "{api}"
    );
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_admin_token_only_requests_carrying_it_are_explained() {
    let apps = apps(&["A", "B"]).await;
    let mut text = config("round_robin", &common::servers(&apps), "explain = true", "");
    text = text.replace(
        "[admin]\nbind = \"127.0.0.1:0\"\n",
        "[admin]\nbind = \"127.0.0.1:0\"\ntoken = \"s3cret\"\n",
    );
    let lb = fulcrum(&text);
    let c = client();
    let base = format!("http://{}", web(&lb));
    let plain = send(
        &c,
        Request::get(format!("{base}/"))
            .header("x-fulcrum-explain", "1")
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(plain.status, StatusCode::OK);
    assert!(plain.headers.get("x-fulcrum-server").is_none());
    let with_token = explained(&c, &base, "/", &[]).await;
    assert!(with_token.headers.get("x-fulcrum-server").is_none());
    let r = send(
        &c,
        Request::get(format!("{base}/"))
            .header("x-fulcrum-explain", "Bearer s3cret")
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(header(&r, "x-fulcrum-server"), r.server());
    stop(lb).await;
}

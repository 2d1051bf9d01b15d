//! Answers from servers are held to the same standard as requests from clients: a server that sends a
//! broken answer, closes without answering or answers early never leaves a client without an answer,
//! never puts a connection out of step back in the pool, and is counted against only when it is at
//! fault. Raw TCP servers send the exact bytes; a real balancer sits in front of them.

mod common;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

// ---------------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------------

/// What a client got for one request.
#[derive(Debug)]
enum Got {
    /// No response at all: the connection closed (or failed) before a response head.
    NoAnswer(String),
    /// A response whose body arrived complete.
    Complete(StatusCode, HeaderMap, Bytes),
    /// A response head, then the body was cut off (the proxy aborted it).
    Aborted(StatusCode, String),
}

impl Got {
    fn status(&self) -> Option<StatusCode> {
        match self {
            Got::NoAnswer(_) => None,
            Got::Complete(s, ..) | Got::Aborted(s, _) => Some(*s),
        }
    }
}

/// Sends `req` and reads the whole answer, within `limit`.
async fn try_send(c: &HttpClient, req: Request<Full<Bytes>>, limit: Duration) -> Got {
    let attempt = async {
        let resp = match c.request(req).await {
            Ok(r) => r,
            Err(e) => return Got::NoAnswer(format!("{e:?}")),
        };
        let (parts, body) = resp.into_parts();
        match body.collect().await {
            Ok(b) => Got::Complete(parts.status, parts.headers, b.to_bytes()),
            Err(e) => Got::Aborted(parts.status, format!("{e:?}")),
        }
    };
    tokio::time::timeout(limit, attempt)
        .await
        .expect("an answer (or a definite failure) in time")
}

async fn try_get(c: &HttpClient, url: &str) -> Got {
    try_send(
        c,
        Request::get(url).body(Full::default()).unwrap(),
        Duration::from_secs(10),
    )
    .await
}

type Handler = Arc<dyn Fn(TcpStream) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// A TCP server on 127.0.0.1 that runs `handler` on each accepted connection; counts connections.
async fn tcp_server(handler: Handler) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let c = conns.clone();
    tokio::spawn(async move {
        while let Ok((sock, _)) = l.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(handler(sock));
        }
    });
    (addr, conns)
}

/// Reads one request head (and a `Content-Length` body, if `body` is set) off `sock`, keeping what
/// follows in `buf`; false when the connection ended first.
async fn read_request(sock: &mut TcpStream, buf: &mut Vec<u8>, body: bool) -> bool {
    let mut chunk = [0u8; 16 * 1024];
    let end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        match sock.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    buf.drain(..end);
    if !body {
        return true;
    }
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0);
    while buf.len() < len {
        match sock.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    buf.drain(..len);
    true
}

fn one_server(addr: SocketAddr, pool_extra: &str) -> String {
    config("round_robin", &[("s".into(), addr, 1)], "", pool_extra)
}

fn failures(lb: &fulcrum::runtime::Running, server: usize) -> u64 {
    lb.shared().pools()[0].snapshot_full().servers[server]
        .stats
        .failures_total()
}

// ---------------------------------------------------------------------------------------------------
// 1. A valid head, then a broken body
// ---------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_chunk_size_after_a_valid_head_is_a_502_and_the_connection_is_not_kept() {
    for answer in [
        &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"[..],
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n+5\r\nhello\r\n0\r\n\r\n",
    ] {
        let raw = raw_server(answer.to_vec().leak(), false).await;
        let lb = fulcrum(&one_server(raw.addr, ""));
        let c = client();
        let url = format!("http://{}/", web(&lb));
        for i in 1..=2 {
            let got = try_get(&c, &url).await;
            assert_eq!(
                got.status(),
                Some(StatusCode::BAD_GATEWAY),
                "{:?}: {got:?}",
                String::from_utf8_lossy(answer)
            );
            // Each request needed a new server connection: the broken one was not pooled.
            assert_eq!(raw.connections.load(Ordering::SeqCst), i);
        }
        assert!(failures(&lb, 0) >= 2);
        stop(lb).await;
    }
}

/// When the head went out before the body broke, the client sees a response that is visibly cut
/// off (no terminating chunk, or fewer bytes than announced) — never silence, never a body that looks
/// complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_breaks_later_is_aborted_visibly() {
    // (head, later part): the later part arrives after a pause, so the head is on its way already.
    let cases: [(&[u8], &[u8]); 3] = [
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
            b"zz\r\n",
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"zz\r\n",
        ),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello", b""),
    ];
    for (head, later) in cases {
        let handler: Handler = Arc::new(move |mut sock| {
            Box::pin(async move {
                let mut buf = Vec::new();
                if read_request(&mut sock, &mut buf, false).await {
                    let _ = sock.write_all(head).await;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let _ = sock.write_all(later).await;
                }
            })
        });
        let (addr, _) = tcp_server(handler).await;
        let lb = fulcrum(&one_server(addr, ""));
        let got = try_get(&client(), &format!("http://{}/", web(&lb))).await;
        assert!(
            matches!(got, Got::Aborted(StatusCode::OK, _)),
            "{:?}: {got:?}",
            String::from_utf8_lossy(head)
        );
        stop(lb).await;
    }
}

/// A body cut short by the server's close, all of it in the first read: before the fix the head was
/// held back by hyper with the first body bytes and dropped with them, and the client got nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_cut_short_by_a_close_never_leaves_the_client_without_an_answer() {
    for answer in [
        &b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello"[..],
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
    ] {
        let raw = raw_server(answer.to_vec().leak(), true).await;
        let lb = fulcrum(&one_server(raw.addr, ""));
        let c = client();
        for _ in 0..5 {
            let got = try_get(&c, &format!("http://{}/", web(&lb))).await;
            assert!(
                matches!(
                    got,
                    Got::Aborted(StatusCode::OK, _) | Got::Complete(StatusCode::BAD_GATEWAY, ..)
                ),
                "{:?}: {got:?}",
                String::from_utf8_lossy(answer)
            );
        }
        stop(lb).await;
    }
}

// ---------------------------------------------------------------------------------------------------
// 2. Accepted, then closed without an answer
// ---------------------------------------------------------------------------------------------------

/// A server that reads the request head and closes; with `reset`, with an RST (linger 0).
async fn closes_without_answering(reset: bool) -> (SocketAddr, Arc<AtomicUsize>) {
    let handler: Handler = Arc::new(move |mut sock| {
        Box::pin(async move {
            let mut buf = Vec::new();
            read_request(&mut sock, &mut buf, false).await;
            if reset {
                let _ = sock.set_linger(Some(Duration::ZERO));
            }
        })
    });
    tcp_server(handler).await
}

/// A server that accepts and closes at once, before reading anything, with an RST.
async fn resets_on_accept() -> (SocketAddr, Arc<AtomicUsize>) {
    let handler: Handler = Arc::new(|sock| {
        Box::pin(async move {
            let _ = sock.set_linger(Some(Duration::ZERO));
        })
    });
    tcp_server(handler).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_closes_without_answering_gives_502_and_is_counted() {
    for (name, (addr, _)) in [
        ("fin", closes_without_answering(false).await),
        ("rst", closes_without_answering(true).await),
        ("rst on accept", resets_on_accept().await),
    ] {
        let passive = "[pools.passive]\nconsecutive_failures = 3\nbase_ejection = \"30s\"";
        let lb = fulcrum(&one_server(addr, &format!("retries = 0\n{passive}")));
        let c = client();
        let url = format!("http://{}/", web(&lb));
        let got = try_get(&c, &url).await;
        assert_eq!(
            got.status(),
            Some(StatusCode::BAD_GATEWAY),
            "{name} GET: {got:?}"
        );
        let post = Request::post(&url)
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap();
        let got = try_send(&c, post, Duration::from_secs(10)).await;
        assert_eq!(
            got.status(),
            Some(StatusCode::BAD_GATEWAY),
            "{name} POST: {got:?}"
        );
        assert!(failures(&lb, 0) >= 2, "{name}: counted against the server");
        // Passive health: the third failure in a row ejects it.
        let _ = try_get(&c, &url).await;
        let snap = lb.shared().pools()[0].snapshot_full();
        assert!(snap.servers[0].health.is_ejected(), "{name}: ejected");
        stop(lb).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_server_closes_without_answering_a_retried_get_gives_502() {
    let (a, _) = closes_without_answering(false).await;
    let (b, _) = resets_on_accept().await;
    let s = vec![("a".to_string(), a, 1), ("b".to_string(), b, 1)];
    let lb = fulcrum(&config("round_robin", &s, "", "retries = 1"));
    let c = client();
    for _ in 0..4 {
        let got = try_get(&c, &format!("http://{}/", web(&lb))).await;
        assert_eq!(got.status(), Some(StatusCode::BAD_GATEWAY), "{got:?}");
    }
    assert!(failures(&lb, 0) >= 4 && failures(&lb, 1) >= 4);
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_the_server_closed_on_is_still_retried_on_the_next_server() {
    let (a, seen) = closes_without_answering(false).await;
    let apps = apps(&["B"]).await;
    let s = vec![
        ("a".to_string(), a, 1),
        ("B".to_string(), apps[0].addr(), 1),
    ];
    let lb = fulcrum(&config("round_robin", &s, "", "retries = 1"));
    let c = client();
    for _ in 0..4 {
        let got = try_get(&c, &format!("http://{}/", web(&lb))).await;
        assert_eq!(got.status(), Some(StatusCode::OK), "{got:?}");
    }
    assert!(
        seen.load(Ordering::SeqCst) >= 2,
        "the closing server was tried"
    );
    assert!(failures(&lb, 0) >= 2);
    stop(lb).await;
}

// ---------------------------------------------------------------------------------------------------
// 3. Content-Length and Transfer-Encoding
// ---------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_content_lengths_are_a_502() {
    for value in [
        "+2",
        "-1",
        "1,2",
        "2, 3",
        "0x2",
        "2.0",
        "",
        "2 2",
        "99999999999999999999999",
        "18446744073709551616",
    ] {
        let answer = format!("HTTP/1.1 200 OK\r\nContent-Length: {value}\r\n\r\nok");
        let raw = raw_server(answer.into_bytes().leak(), false).await;
        let lb = fulcrum(&one_server(raw.addr, ""));
        let got = try_get(&client(), &format!("http://{}/", web(&lb))).await;
        assert!(
            matches!(got, Got::Complete(StatusCode::BAD_GATEWAY, ..)),
            "Content-Length: {value:?}: {got:?}"
        );
        stop(lb).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_content_length_forms_pass() {
    for head in [
        "Content-Length: 2",
        "Content-Length:  2 \t",
        "Content-Length: 002",
        "Content-Length: 2, 2",
        "Content-Length: 2\r\nContent-Length: 2",
    ] {
        let answer = format!("HTTP/1.1 200 OK\r\n{head}\r\n\r\nok");
        let raw = raw_server(answer.into_bytes().leak(), false).await;
        let lb = fulcrum(&one_server(raw.addr, ""));
        let got = try_get(&client(), &format!("http://{}/", web(&lb))).await;
        match got {
            Got::Complete(StatusCode::OK, h, body) => {
                assert_eq!(&body[..], b"ok", "{head:?}");
                assert_eq!(h["content-length"], "2", "{head:?}");
            }
            other => panic!("{head:?}: {other:?}"),
        }
        stop(lb).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_content_lengths_that_differ_are_a_502() {
    let raw = raw_server(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nokk",
        false,
    )
    .await;
    let lb = fulcrum(&one_server(raw.addr, ""));
    let got = try_get(&client(), &format!("http://{}/", web(&lb))).await;
    assert_eq!(got.status(), Some(StatusCode::BAD_GATEWAY), "{got:?}");
    stop(lb).await;
}

/// RFC 9112 §6.3: Transfer-Encoding overrides Content-Length, and an intermediary removes the
/// Content-Length before forwarding. The connection is not reused after such a message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_encoding_wins_over_content_length_and_the_length_is_not_passed_on() {
    let raw = raw_server(
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        false,
    )
    .await;
    let lb = fulcrum(&one_server(raw.addr, ""));
    // A raw client, to see exactly what fulcrum sends.
    let mut s = TcpStream::connect(web(&lb)).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 200"), "{text}");
    assert!(!text.contains("content-length: 3"), "{text}");
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(
        head.contains("transfer-encoding: chunked") && body == "5\r\nhello\r\n0\r\n\r\n"
            || head.contains("content-length: 5") && body == "hello",
        "{text}"
    );
    // And the next request opens a new server connection.
    let got = try_get(&client(), &format!("http://{}/", web(&lb))).await;
    assert!(matches!(got, Got::Complete(StatusCode::OK, ..)), "{got:?}");
    assert_eq!(raw.connections.load(Ordering::SeqCst), 2);
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_codings_other_than_chunked_are_a_502() {
    for te in [
        "gzip",
        "gzip, chunked",
        "chunked, chunked",
        "chunked, gzip",
        "chunked\r\nTransfer-Encoding: chunked",
        "identity",
        "",
    ] {
        let answer =
            format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: {te}\r\n\r\n2\r\nok\r\n0\r\n\r\n");
        let raw = raw_server(answer.into_bytes().leak(), true).await;
        let lb = fulcrum(&one_server(raw.addr, ""));
        let got = try_get(&client(), &format!("http://{}/", web(&lb))).await;
        assert_eq!(
            got.status(),
            Some(StatusCode::BAD_GATEWAY),
            "{te:?}: {got:?}"
        );
        stop(lb).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_1_0_answer_with_transfer_encoding_is_a_502() {
    let raw = raw_server(
        b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        true,
    )
    .await;
    let lb = fulcrum(&one_server(raw.addr, ""));
    let got = try_get(&client(), &format!("http://{}/", web(&lb))).await;
    assert_eq!(got.status(), Some(StatusCode::BAD_GATEWAY), "{got:?}");
    stop(lb).await;
}

// ---------------------------------------------------------------------------------------------------
// 4. Early answers
// ---------------------------------------------------------------------------------------------------

const UPLOAD: usize = 3 * 1024 * 1024;

/// Sends a POST with an `UPLOAD`-byte body the way a robust client (curl) does: writing the body while
/// reading the answer, and keeping the answer when the upload is cut off. Returns the answer's bytes.
async fn upload(addr: SocketAddr, path: &str) -> String {
    let s = TcpStream::connect(addr).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {UPLOAD}\r\n\r\n"
    );
    let writer = tokio::spawn(async move {
        let _ = w.write_all(head.as_bytes()).await;
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..UPLOAD / chunk.len() {
            if w.write_all(&chunk).await.is_err() {
                return;
            }
        }
        // Keep the write side open until the reader is done.
        tokio::time::sleep(Duration::from_secs(30)).await;
    });
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    let read = async {
        loop {
            match r.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&chunk[..n]),
            }
            if complete(&out) {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(15), read)
        .await
        .expect("an answer in time");
    writer.abort();
    String::from_utf8_lossy(&out).into_owned()
}

/// A response with a Content-Length body is complete in `out`.
fn complete(out: &[u8]) -> bool {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(out) {
        Ok(httparse::Status::Complete(n)) => {
            let len = resp
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
                .unwrap_or(0usize);
            out.len() >= n + len
        }
        _ => false,
    }
}

const EARLY_413: &[u8] =
    b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 9\r\nConnection: close\r\n\r\ntoo large";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_answer_before_the_upload_is_read_reaches_the_client() {
    // The server reads the head, answers 413 and closes (an RST, since the body is unread).
    let handler: Handler = Arc::new(|mut sock| {
        Box::pin(async move {
            let mut buf = Vec::new();
            if read_request(&mut sock, &mut buf, false).await {
                let _ = sock.write_all(EARLY_413).await;
            }
        })
    });
    let (addr, _) = tcp_server(handler).await;
    let lb = fulcrum(&one_server(addr, ""));
    for i in 0..3 {
        let text = upload(web(&lb), "/upload").await;
        assert!(
            text.starts_with("HTTP/1.1 413") && text.ends_with("too large"),
            "attempt {i}: {text:?}"
        );
    }
    assert_eq!(failures(&lb, 0), 0, "the server was not at fault");
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_answer_from_a_server_that_stops_reading_reaches_the_client() {
    // The server answers without closing and never reads the body: fulcrum's writes block.
    let handler: Handler = Arc::new(|mut sock| {
        Box::pin(async move {
            let mut buf = Vec::new();
            if read_request(&mut sock, &mut buf, false).await {
                let _ = sock
                    .write_all(
                        b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 9\r\n\r\ntoo large",
                    )
                    .await;
                tokio::time::sleep(Duration::from_secs(20)).await;
            }
        })
    });
    let (addr, conns) = tcp_server(handler).await;
    let lb = fulcrum(&one_server(addr, "response_timeout = \"5s\""));
    let text = upload(web(&lb), "/upload").await;
    assert!(
        text.starts_with("HTTP/1.1 413") && text.ends_with("too large"),
        "{text:?}"
    );
    assert_eq!(failures(&lb, 0), 0);
    // The connection carried an unfinished request: it is not reused.
    let got = try_get(&client(), &format!("http://{}/", web(&lb))).await;
    assert_eq!(got.status(), Some(StatusCode::PAYLOAD_TOO_LARGE), "{got:?}");
    assert_eq!(conns.load(Ordering::SeqCst), 2);
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fulcrum_app_refusing_a_large_upload_gives_its_413() {
    let apps = apps(&["A"]).await;
    let lb = fulcrum(&config("round_robin", &servers(&apps), "", ""));
    for i in 0..3 {
        let text = upload(web(&lb), "/login").await;
        assert!(text.starts_with("HTTP/1.1 413"), "attempt {i}: {text:?}");
    }
    assert_eq!(failures(&lb, 0), 0);
    stop(lb).await;
}

/// An interim `100 Continue` while the body is being sent does not stop the upload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interim_answer_during_the_upload_does_not_stop_it() {
    let handler: Handler = Arc::new(|mut sock| {
        Box::pin(async move {
            let mut buf = Vec::new();
            let mut chunk = vec![0u8; 64 * 1024];
            if !read_request(&mut sock, &mut buf, false).await {
                return;
            }
            let _ = sock.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await;
            // Let fulcrum's writes block before reading the body.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let mut got = buf.len();
            while got < UPLOAD {
                match sock.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => got += n,
                }
            }
            let answer = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{got}",
                got.to_string().len()
            );
            let _ = sock.write_all(answer.as_bytes()).await;
        })
    });
    let (addr, _) = tcp_server(handler).await;
    let lb = fulcrum(&one_server(addr, ""));
    let text = upload(web(&lb), "/upload").await;
    assert!(
        text.starts_with("HTTP/1.1 200") && text.ends_with(&UPLOAD.to_string()),
        "{text:?}"
    );
    stop(lb).await;
}

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
    /// A response head, then the body was cut off (the proxy aborted it), and why.
    Aborted(StatusCode, #[allow(dead_code)] String),
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
        drop(c);
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
        drop(c);
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
                let _ = socket2::SockRef::from(&sock).set_linger(Some(Duration::ZERO));
            }
        })
    });
    tcp_server(handler).await
}

/// A server that accepts and closes at once, before reading anything, with an RST.
async fn resets_on_accept() -> (SocketAddr, Arc<AtomicUsize>) {
    let handler: Handler = Arc::new(|sock| {
        Box::pin(async move {
            let _ = socket2::SockRef::from(&sock).set_linger(Some(Duration::ZERO));
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
        drop(c);
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
    drop(c);
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
    drop(c);
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
    upload_of(addr, path, UPLOAD).await
}

async fn upload_of(addr: SocketAddr, path: &str, size: usize) -> String {
    let s = TcpStream::connect(addr).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {size}\r\n\r\n"
    );
    let writer = tokio::spawn(async move {
        let _ = w.write_all(head.as_bytes()).await;
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..size / chunk.len() {
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
    // More than loopback socket buffers hold (a few MB each way), so fulcrum's writes must wait.
    let text = upload_of(web(&lb), "/upload", 16 << 20).await;
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

/// A server that starts a `2xx` answer while it reads the body (full duplex, as an echo does) gets the
/// whole body: fulcrum keeps sending, then relays the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_success_answer_streamed_while_the_upload_is_read_gets_the_whole_body() {
    const SIZE: usize = 16 << 20;
    let handler: Handler = Arc::new(|mut sock| {
        Box::pin(async move {
            let mut buf = Vec::new();
            if !read_request(&mut sock, &mut buf, false).await {
                return;
            }
            let _ = sock
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\n")
                .await;
            // Long enough for fulcrum's writes to wait and see the answer begin.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let mut got = buf.len();
            let mut chunk = vec![0u8; 64 * 1024];
            while got < SIZE {
                match sock.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => got += n,
                }
            }
            let _ = sock.write_all(format!("{got:08}").as_bytes()).await;
        })
    });
    let (addr, _) = tcp_server(handler).await;
    let lb = fulcrum(&one_server(addr, ""));
    let text = upload_of(web(&lb), "/upload", SIZE).await;
    assert!(
        text.starts_with("HTTP/1.1 200") && text.ends_with(&format!("{SIZE:08}")),
        "{text:?}"
    );
    stop(lb).await;
}

/// A small upload fits in the socket buffers, so fulcrum sends all of it without noticing that the
/// server answered first and never read it: after an error answer to a request with a body, the
/// connection is not reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_answer_to_an_upload_does_not_leave_its_connection_to_the_next_request() {
    let handler: Handler = Arc::new(|mut sock| {
        Box::pin(async move {
            let mut buf = Vec::new();
            if read_request(&mut sock, &mut buf, false).await {
                let _ = sock
                    .write_all(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 2\r\n\r\nno")
                    .await;
                tokio::time::sleep(Duration::from_secs(20)).await;
            }
        })
    });
    let (addr, conns) = tcp_server(handler).await;
    let lb = fulcrum(&one_server(addr, "response_timeout = \"3s\""));
    let c = client();
    let url = format!("http://{}/", web(&lb));
    for i in 1..=3 {
        let post = Request::post(&url)
            .body(Full::new(Bytes::from(vec![b'x'; 64 * 1024])))
            .unwrap();
        let got = try_send(&c, post, Duration::from_secs(10)).await;
        assert_eq!(got.status(), Some(StatusCode::UNAUTHORIZED), "{i}: {got:?}");
        assert_eq!(conns.load(Ordering::SeqCst), i);
    }
    assert_eq!(failures(&lb, 0), 0);
    drop(c);
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

// ---------------------------------------------------------------------------------------------------
// 5. A randomised stream of mutated answers
// ---------------------------------------------------------------------------------------------------

mod mutated {
    use super::*;
    use proptest::prelude::*;
    use proptest::sample::Index;
    use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
    use std::sync::Mutex;

    /// Well-formed answers the mutations start from: (bytes, status, body, delimited by the close).
    const BASES: &[(&[u8], u16, &[u8], bool)] = &[
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nX-A: 1\r\n\r\nhello world",
            200,
            b"hello world",
            false,
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=y\r\n world\r\n0\r\n\r\n",
            200,
            b"hello world",
            false,
        ),
        (
            b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-T: 1\r\n\r\n",
            201,
            b"ok",
            false,
        ),
        (
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
            404,
            b"",
            false,
        ),
        (b"HTTP/1.1 204 No Content\r\nX-B: 2\r\n\r\n", 204, b"", false),
        (
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            200,
            b"ok",
            false,
        ),
        (
            b"HTTP/1.0 200 OK\r\nX-C: 3\r\n\r\nuntil the close",
            200,
            b"until the close",
            true,
        ),
    ];

    /// Framing headers and bodies: `Some(body)` when the answer is valid, `None` when it must be a 502.
    const FRAMINGS: &[(&str, &str, Option<&str>)] = &[
        ("Content-Length: +2", "ok", None),
        ("Content-Length: -1", "ok", None),
        ("Content-Length: 1,2", "ok", None),
        ("Content-Length: 2\r\nContent-Length: 3", "ok", None),
        ("Content-Length: 99999999999999999999999", "ok", None),
        ("Content-Length: 0x2", "ok", None),
        ("Content-Length: 2, 2", "ok", Some("ok")),
        (
            "Content-Length: 3\r\nTransfer-Encoding: chunked",
            "2\r\nok\r\n0\r\n\r\n",
            Some("ok"),
        ),
        ("Transfer-Encoding: gzip", "ok", None),
        (
            "Transfer-Encoding: chunked, chunked",
            "2\r\nok\r\n0\r\n\r\n",
            None,
        ),
        ("Transfer-Encoding: chunked", "zz\r\nok\r\n0\r\n\r\n", None),
        ("Transfer-Encoding: chunked", "2\nok\r\n0\r\n\r\n", None),
        ("Transfer-Encoding: chunked", "+2\r\nok\r\n0\r\n\r\n", None),
        ("Transfer-Encoding: chunked", "2\r\nokX\r\n0\r\n\r\n", None),
        (
            "Transfer-Encoding: chunked",
            "2;e=\"v\"\r\nok\r\n0\r\nX-T: 1\r\n\r\n",
            Some("ok"),
        ),
    ];

    /// Bytes that matter to a parser, to flip and insert.
    const ALPHABET: &[u8] = b"\r\n :;,-+0123456789aAfFxHTP/.\t\x00\x7f\xff";

    #[derive(Debug, Clone)]
    enum Mutation {
        Intact,
        /// Cut the answer there and close.
        Truncate(Index),
        /// Replace bytes.
        Flip(Vec<(Index, u8)>),
        /// Insert bytes.
        Insert(Index, Vec<u8>),
        /// A framing header and body of [`FRAMINGS`] instead of the base.
        Framing(usize),
        /// Bytes after the complete answer.
        Extra(Vec<u8>),
        /// Answer after reading only the request head, then close.
        Early,
    }

    #[derive(Debug, Clone)]
    struct Case {
        base: usize,
        mutation: Mutation,
        close_after: bool,
        post: bool,
    }

    fn byte() -> impl Strategy<Value = u8> {
        prop_oneof![any::<u8>(), prop::sample::select(ALPHABET)]
    }

    fn case() -> impl Strategy<Value = Case> {
        let mutation = prop_oneof![
            1 => Just(Mutation::Intact),
            3 => any::<Index>().prop_map(Mutation::Truncate),
            4 => prop::collection::vec((any::<Index>(), byte()), 1..4).prop_map(Mutation::Flip),
            2 => (any::<Index>(), prop::collection::vec(byte(), 1..6))
                .prop_map(|(i, b)| Mutation::Insert(i, b)),
            3 => (0..FRAMINGS.len()).prop_map(Mutation::Framing),
            2 => prop::collection::vec(byte(), 1..40).prop_map(Mutation::Extra),
            1 => Just(Mutation::Early),
        ];
        (0..BASES.len(), mutation, any::<bool>(), any::<bool>()).prop_map(
            |(base, mutation, close_after, post)| Case {
                base,
                mutation,
                close_after,
                post,
            },
        )
    }

    /// What the server sends for `case`.
    fn answer(case: &Case) -> Vec<u8> {
        let base = BASES[case.base].0;
        let mut out = base.to_vec();
        match &case.mutation {
            Mutation::Intact | Mutation::Early => {}
            Mutation::Truncate(at) => out.truncate(at.index(base.len())),
            Mutation::Flip(flips) => {
                for (at, b) in flips {
                    out[at.index(base.len())] = *b;
                }
            }
            Mutation::Insert(at, bytes) => {
                let at = at.index(base.len() + 1);
                out.splice(at..at, bytes.iter().copied());
            }
            Mutation::Framing(i) => {
                let (head, body, _) = FRAMINGS[*i];
                out = format!("HTTP/1.1 200 OK\r\n{head}\r\n\r\n{body}").into_bytes();
            }
            Mutation::Extra(bytes) => out.extend_from_slice(bytes),
        }
        out
    }

    /// Whether the server closes after answering.
    fn closes(case: &Case) -> bool {
        case.close_after
            || BASES[case.base].3
            || matches!(case.mutation, Mutation::Truncate(_) | Mutation::Early)
    }

    /// The next answer the scripted server gives, and how.
    #[derive(Default)]
    struct Plan {
        answer: Option<(Vec<u8>, bool, bool)>,
    }

    /// A server that answers the first request after a plan is set with the planned bytes, and every
    /// other request with `good {path}`. After a planned answer it closes if told to, else waits for
    /// another request on the connection for a short while, then closes (so that a balancer waiting
    /// for bytes that never come is released).
    async fn scripted(plan: Arc<Mutex<Plan>>) -> SocketAddr {
        let handler: Handler = Arc::new(move |mut sock| {
            let plan = plan.clone();
            Box::pin(async move {
                let mut buf = Vec::new();
                let mut lingering = false;
                loop {
                    let head = read_head(&mut sock, &mut buf);
                    let path = if lingering {
                        match tokio::time::timeout(Duration::from_millis(40), head).await {
                            Ok(Some(p)) => p,
                            _ => return,
                        }
                    } else {
                        match head.await {
                            Some(p) => p,
                            None => return,
                        }
                    };
                    let planned = plan.lock().unwrap().answer.take();
                    match planned {
                        Some((bytes, close, early)) => {
                            if !early && !skip_body(&mut sock, &mut buf, &path).await {
                                return;
                            }
                            if sock.write_all(&bytes).await.is_err() {
                                return;
                            }
                            if early {
                                // A lingering close, as servers do: stop writing, then read what
                                // the client still sends, so that unread bytes are not answered with a
                                // reset that can destroy the answer on its way (under load, it does).
                                let _ = sock.shutdown().await;
                                let mut sink = [0u8; 4096];
                                let drain = async {
                                    while matches!(sock.read(&mut sink).await, Ok(n) if n > 0) {}
                                };
                                let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
                                return;
                            }
                            if close {
                                return;
                            }
                            lingering = true;
                        }
                        None => {
                            if !skip_body(&mut sock, &mut buf, &path).await {
                                return;
                            }
                            let body = format!("good {}", path.0);
                            let good = format!(
                                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                                body.len()
                            );
                            if sock.write_all(good.as_bytes()).await.is_err() {
                                return;
                            }
                            lingering = false;
                        }
                    }
                }
            })
        });
        tcp_server(handler).await.0
    }

    /// A request head's path and Content-Length.
    async fn read_head(sock: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(String, usize)> {
        let mut chunk = [0u8; 4096];
        let end = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        let path = head.split(' ').nth(1)?.to_string();
        let len = head
            .to_ascii_lowercase()
            .lines()
            .find_map(|l| l.strip_prefix("content-length:")?.trim().parse().ok())
            .unwrap_or(0);
        Some((path, len))
    }

    async fn skip_body(sock: &mut TcpStream, buf: &mut Vec<u8>, head: &(String, usize)) -> bool {
        let mut chunk = [0u8; 4096];
        while buf.len() < head.1 {
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..head.1);
        true
    }

    /// Is what the client got for `case` acceptable?
    fn judge(case: &Case, sent: &[u8], path: &str, got: &Got) -> Result<(), String> {
        let (_, status, body, close_delimited) = BASES[case.base];
        let exact = |want_status: u16, want_body: &[u8]| match got {
            Got::Complete(s, _, b) if s.as_u16() == want_status && &b[..] == want_body => Ok(()),
            other => Err(format!(
                "expected {want_status} {:?}, got {other:?}",
                String::from_utf8_lossy(want_body)
            )),
        };
        let fulcrum_error = matches!(
            got,
            Got::Complete(s, ..) if *s == StatusCode::BAD_GATEWAY || *s == StatusCode::GATEWAY_TIMEOUT
        );
        match got {
            Got::NoAnswer(e) => return Err(format!("no answer: {e}")),
            // A GET whose connection closed before any answer may be sent again: the retry gets a good answer.
            Got::Complete(_, _, b)
                if sent.is_empty() && !case.post && b[..] == *format!("good {path}").as_bytes() =>
            {
                return Ok(())
            }
            _ => {}
        }
        match &case.mutation {
            // After a close-delimited body, extra bytes are more of it.
            Mutation::Extra(extra) if close_delimited => exact(status, &[body, extra].concat()),
            Mutation::Intact | Mutation::Extra(_) | Mutation::Early => exact(status, body),
            Mutation::Framing(i) => match FRAMINGS[*i].2 {
                Some(b) => exact(200, b.as_bytes()),
                None => exact(502, b"502 Bad Gateway: the server failed to answer\n"),
            },
            Mutation::Truncate(_) if sent.len() == BASES[case.base].0.len() => exact(status, body),
            Mutation::Truncate(_) => match got {
                _ if fulcrum_error => Ok(()),
                Got::Aborted(..) => Ok(()),
                // Only a close-delimited body may end anywhere.
                Got::Complete(s, _, b)
                    if close_delimited && s.as_u16() == status && body.starts_with(b) =>
                {
                    Ok(())
                }
                other => Err(format!("a truncated answer passed as complete: {other:?}")),
            },
            // Anything well-formed, or a definite failure.
            Mutation::Flip(_) | Mutation::Insert(..) => Ok(()),
        }
    }

    #[test]
    fn mutated_answers_never_leave_a_client_without_an_answer_nor_poison_the_pool() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let plan = Arc::new(Mutex::new(Plan::default()));
        let addr = rt.block_on(scripted(plan.clone()));
        // One worker: every client connection shares one pool of server connections, so a connection
        // put back out of step would be the next request's.
        let text = one_server(addr, "retries = 1\nresponse_timeout = \"3s\"");
        let cfg = fulcrum::config::parse(&text, "test.toml").unwrap();
        let lb = rt.block_on(async { fulcrum::runtime::start_with_workers(cfg, 1).unwrap() });
        let base = format!("http://{}", web(&lb));
        let started = std::time::Instant::now();

        // Fixed seed and count; `FUZZ_SEED=n FUZZ_CASES=n` explore further.
        let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
        let config = Config {
            cases: env("FUZZ_CASES").map_or(128, |n| n as u32),
            failure_persistence: None,
            max_shrink_iters: 256,
            ..Config::default()
        };
        let mut seed = [9u8; 32];
        if let Some(n) = env("FUZZ_SEED") {
            seed[..8].copy_from_slice(&n.to_le_bytes());
        }
        let mut runner =
            TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &seed));
        let n = AtomicUsize::new(0);
        let result = runner.run(&case(), |case| {
            let i = n.fetch_add(1, Ordering::Relaxed);
            let sent = answer(&case);
            plan.lock().unwrap().answer = Some((
                sent.clone(),
                closes(&case),
                matches!(case.mutation, Mutation::Early),
            ));
            rt.block_on(async {
                let c = client();
                let path = format!("/case/{i}");
                let req = if case.post {
                    Request::post(format!("{base}{path}"))
                        .body(Full::new(Bytes::from_static(b"{\"a\":1}")))
                        .unwrap()
                } else {
                    Request::get(format!("{base}{path}"))
                        .body(Full::default())
                        .unwrap()
                };
                let got = try_send(&c, req, Duration::from_secs(10)).await;
                judge(&case, &sent, &path, &got).map_err(|e| {
                    TestCaseError::fail(format!("{:?}: {e}", String::from_utf8_lossy(&sent)))
                })?;
                // The pool is in step: a good request gets its own answer.
                plan.lock().unwrap().answer = None;
                let good = format!("/good/{i}");
                let got = try_get(&c, &format!("{base}{good}")).await;
                match &got {
                    Got::Complete(StatusCode::OK, _, b)
                        if b[..] == *format!("good {good}").as_bytes() =>
                    {
                        Ok(())
                    }
                    other => Err(TestCaseError::fail(format!(
                        "after {:?}, a good request got {other:?}",
                        String::from_utf8_lossy(&sent)
                    ))),
                }
            })
        });
        let elapsed = started.elapsed();
        rt.block_on(stop(lb));
        if let Err(e) = result {
            panic!("{e}");
        }
        eprintln!("{} cases in {elapsed:?}", n.load(Ordering::Relaxed));
        if env("FUZZ_CASES").is_none() {
            assert!(elapsed < Duration::from_secs(20), "{elapsed:?}");
        }
    }
}

//! Protocol tests against real app instances on 127.0.0.1: TLS with ALPN `h2`
//! or `http/1.1`, h2c with prior knowledge and HTTP/1.1 on plain listeners,
//! failed TLS handshakes, and graceful shutdown of HTTP/2 connections.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use fulcrum_app::{spawn, AppConfig, AppHandle, TlsFiles, TLS_HANDSHAKE_TIMEOUT};
use futures_util::{SinkExt as _, StreamExt as _};
use http::{header, Request, Response, StatusCode, Version};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// Longest any one step of a test may take.
const LIMIT: Duration = Duration::from_secs(20);

const H2: &[u8] = b"h2";
const HTTP11: &[u8] = b"http/1.1";

async fn bounded<T>(what: &str, step: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, step)
        .await
        .unwrap_or_else(|_| panic!("{what}: timed out after {LIMIT:?}"))
}

fn local() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// An app instance serving TLS with a fresh self-signed `localhost` certificate.
struct TlsApp {
    handle: AppHandle,
    cert: CertificateDer<'static>,
}

impl TlsApp {
    async fn start(name: &str) -> Self {
        let rcgen::CertifiedKey { cert, signing_key } =
            rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let files = TlsFiles::new(dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, signing_key.serialize_pem()).unwrap();
        // The files are read here: the directory may go once this returns.
        let handle = spawn(local(), AppConfig::new(name).with_tls(files))
            .await
            .unwrap();
        Self {
            handle,
            cert: cert.der().clone(),
        }
    }

    /// A TLS connection trusting only this app's certificate, offering `alpn`.
    async fn connect(&self, alpn: &[&[u8]]) -> TlsStream<TcpStream> {
        self.try_connect(alpn, Some(&self.cert)).await.unwrap()
    }

    async fn try_connect(
        &self,
        alpn: &[&[u8]],
        trusted: Option<&CertificateDer<'static>>,
    ) -> io::Result<TlsStream<TcpStream>> {
        let mut roots = rustls::RootCertStore::empty();
        if let Some(cert) = trusted {
            roots.add(cert.clone()).unwrap();
        }
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let tcp = TcpStream::connect(self.handle.addr()).await?;
        let server = ServerName::try_from("localhost").unwrap();
        bounded(
            "TLS handshake",
            TlsConnector::from(Arc::new(config)).connect(server, tcp),
        )
        .await
    }
}

fn alpn(tls: &TlsStream<TcpStream>) -> Option<&[u8]> {
    tls.get_ref().1.alpn_protocol()
}

/// An HTTP/2 client on `io`: TLS after ALPN `h2`, or plain TCP (h2c with prior
/// knowledge).
async fn h2_client<T>(io: T) -> http2::SendRequest<Body>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = bounded(
        "HTTP/2 handshake",
        http2::handshake(TokioExecutor::new(), TokioIo::new(io)),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    sender
}

/// An HTTP/1.1 client on `io`.
async fn h1_client<T>(io: T) -> http1::SendRequest<Body>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = bounded("HTTP/1.1 handshake", http1::handshake(TokioIo::new(io)))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

/// `GET uri` as HTTP/2: the URI must be absolute (`:scheme`, `:authority`).
async fn h2_get(sender: &mut http2::SendRequest<Body>, uri: &str) -> Response<Incoming> {
    let request = Request::get(uri).body(Body::empty()).unwrap();
    bounded("HTTP/2 request", sender.send_request(request))
        .await
        .unwrap()
}

/// `GET path` as HTTP/1.1.
async fn h1_get(sender: &mut http1::SendRequest<Body>, path: &str) -> Response<Incoming> {
    let request = Request::get(path)
        .header(header::HOST, "localhost")
        .body(Body::empty())
        .unwrap();
    bounded("HTTP/1.1 request", sender.send_request(request))
        .await
        .unwrap()
}

async fn body_text(response: Response<Incoming>) -> String {
    let body = bounded("response body", response.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    String::from_utf8(body.to_vec()).unwrap()
}

/// Checks a `GET /` echo from server `name` and returns its request line.
async fn echoed_request_line(response: Response<Incoming>, name: &str) -> String {
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-server"], name);
    let body = body_text(response).await;
    let mut lines = body.lines();
    assert_eq!(
        lines.next(),
        Some(format!("server: {name}").as_str()),
        "{body}"
    );
    lines.next().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn tls_with_alpn_h2_speaks_http2() {
    let app = TlsApp::start("A").await;
    let tls = app.connect(&[H2, HTTP11]).await;
    assert_eq!(alpn(&tls), Some(H2));
    let mut client = h2_client(tls).await;

    let response = h2_get(&mut client, "https://localhost/?x=1").await;
    assert_eq!(response.version(), Version::HTTP_2);
    assert_eq!(
        echoed_request_line(response, "A").await,
        "GET /?x=1 HTTP/2.0"
    );

    // Streams share the connection: two at once, the slower one first.
    let (mut first, mut second) = (client.clone(), client.clone());
    let (slow, fast) = tokio::join!(
        h2_get(&mut first, "https://localhost/delay/100"),
        h2_get(&mut second, "https://localhost/health"),
    );
    for (response, body) in [(slow, "delayed 100ms"), (fast, "ok")] {
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["x-server"], "A");
        assert_eq!(body_text(response).await.trim(), body);
    }
    app.handle.stop().await;
}

#[tokio::test]
async fn tls_without_alpn_h2_speaks_http1() {
    let app = TlsApp::start("B").await;
    for offered in [&[HTTP11][..], &[]] {
        let tls = app.connect(offered).await;
        assert_eq!(alpn(&tls), offered.first().copied());
        let mut client = h1_client(tls).await;
        for _ in 0..2 {
            let response = h1_get(&mut client, "/").await;
            assert_eq!(response.version(), Version::HTTP_11);
            assert_eq!(echoed_request_line(response, "B").await, "GET / HTTP/1.1");
        }
    }
    app.handle.stop().await;
}

#[tokio::test]
async fn websocket_over_tls() {
    use tokio_tungstenite::tungstenite::Message;

    let app = TlsApp::start("C").await;
    let tls = app.connect(&[HTTP11]).await;
    let (mut ws, response) = bounded(
        "WebSocket handshake",
        tokio_tungstenite::client_async("wss://localhost/ws", tls),
    )
    .await
    .unwrap();
    assert_eq!(response.headers()["x-server"], "C");
    ws.send(Message::text("over tls")).await.unwrap();
    let echoed = bounded("WebSocket echo", ws.next()).await.unwrap().unwrap();
    assert_eq!(echoed, Message::text("over tls"));
    ws.close(None).await.unwrap();
}

/// Sends `bytes` on a fresh TCP connection and reads until the server closes it.
async fn send_and_read_to_end(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(bytes).await.unwrap();
    let mut answer = Vec::new();
    // A reset instead of a clean close is fine too: the server hung up.
    let _ = bounded("server closing", tcp.read_to_end(&mut answer)).await;
    answer
}

#[tokio::test]
async fn failed_tls_handshakes_do_not_stop_the_server() {
    let app = TlsApp::start("D").await;
    let addr = app.handle.addr();

    // A connection that never says anything stays open meanwhile.
    let _silent = TcpStream::connect(addr).await.unwrap();

    // Plain HTTP on the TLS port: the server answers with a TLS alert, if
    // anything, and hangs up.
    let answer = send_and_read_to_end(addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(!answer.starts_with(b"HTTP/"), "{answer:?}");
    // Garbage, then a TLS record holding an empty ClientHello.
    send_and_read_to_end(addr, &[0xff; 64]).await;
    send_and_read_to_end(
        addr,
        &[0x16, 0x03, 0x01, 0x00, 0x04, 0x01, 0x00, 0x00, 0x00],
    )
    .await;
    // A client that does not trust the certificate aborts its handshake.
    assert!(app.try_connect(&[H2], None).await.is_err());
    // A client that hangs up in the middle of its handshake.
    drop(TcpStream::connect(addr).await.unwrap());

    for offered in [&[H2][..], &[HTTP11]] {
        let tls = app.connect(offered).await;
        let line = if offered == [H2] {
            let response = h2_get(&mut h2_client(tls).await, "https://localhost/").await;
            echoed_request_line(response, "D").await
        } else {
            let response = h1_get(&mut h1_client(tls).await, "/").await;
            echoed_request_line(response, "D").await
        };
        assert!(line.starts_with("GET / HTTP/"), "{line}");
    }
    app.handle.stop().await;
}

#[tokio::test]
async fn stop_does_not_wait_for_stalled_tls_handshakes() {
    let app = TlsApp::start("E").await;
    let stalled = TcpStream::connect(app.handle.addr()).await.unwrap();
    // Served after the stalled connection was accepted (the accept queue is
    // first in, first out), so its handshake is under way when we stop.
    let tls = app.connect(&[HTTP11]).await;
    let response = h1_get(&mut h1_client(tls).await, "/health").await;
    assert_eq!(response.status(), StatusCode::OK);

    let started = Instant::now();
    bounded("stop", app.handle.stop()).await;
    assert!(
        started.elapsed() < TLS_HANDSHAKE_TIMEOUT / 2,
        "stop took {:?}",
        started.elapsed()
    );
    drop(stalled);
}

#[tokio::test]
async fn spawn_rejects_unusable_tls_files() {
    let dir = tempfile::tempdir().unwrap();
    let missing = TlsFiles::new(dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let err = spawn(local(), AppConfig::new("F").with_tls(missing))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");

    let rcgen::CertifiedKey { cert, .. } =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let other = rcgen::KeyPair::generate().unwrap();
    let files = TlsFiles::new(dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&files.cert, cert.pem()).unwrap();
    std::fs::write(&files.key, "not a key").unwrap();
    let err = spawn(local(), AppConfig::new("F").with_tls(files.clone()))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");

    // A valid key that belongs to another certificate.
    std::fs::write(&files.key, other.serialize_pem()).unwrap();
    let err = spawn(local(), AppConfig::new("F").with_tls(files))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
}

#[tokio::test]
async fn plain_listener_takes_h2c_and_http1() {
    let app = spawn(local(), AppConfig::new("G")).await.unwrap();
    let addr = app.addr();

    let mut h2 = h2_client(TcpStream::connect(addr).await.unwrap()).await;
    let response = h2_get(&mut h2, &format!("http://{addr}/?h2c")).await;
    assert_eq!(response.version(), Version::HTTP_2);
    assert_eq!(
        echoed_request_line(response, "G").await,
        "GET /?h2c HTTP/2.0"
    );
    let response = h2_get(&mut h2, &format!("http://{addr}/status/503")).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()["x-server"], "G");

    let mut h1 = h1_client(TcpStream::connect(addr).await.unwrap()).await;
    let response = h1_get(&mut h1, "/").await;
    assert_eq!(response.version(), Version::HTTP_11);
    assert_eq!(echoed_request_line(response, "G").await, "GET / HTTP/1.1");
    app.stop().await;
}

/// Starts a `POST /echo` whose body is still being sent, stops the app, and
/// checks that the stop waits for the request to finish and that the response
/// arrives whole.
async fn stop_finishes_in_flight_h2_request(
    handle: AppHandle,
    mut client: http2::SendRequest<Body>,
    uri: &str,
) {
    let addr = handle.addr();
    let (body_tx, body_rx) = mpsc::channel::<Bytes>(1);
    let body = futures_util::stream::unfold(body_rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (Ok::<_, io::Error>(chunk), rx))
    });
    let request = Request::post(uri).body(Body::from_stream(body)).unwrap();
    body_tx.send(Bytes::from_static(b"first,")).await.unwrap();
    // `/echo` answers before the body is complete: once the response head is
    // here, the request is in flight on the server.
    let response = bounded("echo response head", client.send_request(request))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    let stopping = tokio::spawn(handle.stop());
    // The listener closes as soon as the stop begins.
    bounded("listener closing", async {
        while TcpStream::connect(addr).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(!stopping.is_finished(), "stop did not wait for the request");

    body_tx.send(Bytes::from_static(b"second")).await.unwrap();
    drop(body_tx);
    assert_eq!(body_text(response).await, "first,second");
    bounded("stop", stopping).await.unwrap();
}

#[tokio::test]
async fn stop_finishes_in_flight_h2c_requests() {
    let handle = spawn(local(), AppConfig::new("H")).await.unwrap();
    let addr = handle.addr();
    let client = h2_client(TcpStream::connect(addr).await.unwrap()).await;
    stop_finishes_in_flight_h2_request(handle, client, &format!("http://{addr}/echo")).await;
}

#[tokio::test]
async fn stop_finishes_in_flight_tls_h2_requests() {
    let app = TlsApp::start("I").await;
    let client = h2_client(app.connect(&[H2]).await).await;
    stop_finishes_in_flight_h2_request(app.handle, client, "https://localhost/echo").await;
}

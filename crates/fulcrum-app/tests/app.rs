//! End-to-end tests: real app instances on 127.0.0.1, spoken to over TCP.

use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use fulcrum_app::{spawn, AppConfig, AppHandle};
use futures_util::{SinkExt as _, StreamExt as _};
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

struct App {
    handle: AppHandle,
    client: Client<HttpConnector, Body>,
}

impl App {
    async fn start(cfg: AppConfig) -> Self {
        let handle = spawn("127.0.0.1:0".parse().unwrap(), cfg).await.unwrap();
        let client = Client::builder(TokioExecutor::new()).build_http();
        Self { handle, client }
    }

    async fn named(name: &str) -> Self {
        Self::start(AppConfig::new(name)).await
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.handle.addr())
    }

    async fn send(&self, request: Request<Body>) -> Response<Incoming> {
        self.client.request(request).await.unwrap()
    }

    async fn get(&self, path: &str) -> Response<Incoming> {
        self.send(Request::get(self.url(path)).body(Body::empty()).unwrap())
            .await
    }

    async fn post(&self, path: &str, body: impl Into<Body>) -> Response<Incoming> {
        self.send(
            Request::post(self.url(path))
                .header(header::CONTENT_TYPE, "application/json")
                .body(body.into())
                .unwrap(),
        )
        .await
    }
}

async fn body_bytes(response: Response<Incoming>) -> Bytes {
    response.into_body().collect().await.unwrap().to_bytes()
}

async fn body_text(response: Response<Incoming>) -> String {
    String::from_utf8(body_bytes(response).await.to_vec()).unwrap()
}

async fn body_json(response: Response<Incoming>) -> Value {
    serde_json::from_slice(&body_bytes(response).await).unwrap()
}

fn x_server(response: &Response<Incoming>) -> &str {
    response.headers()["x-server"].to_str().unwrap()
}

#[tokio::test]
async fn root_names_server_and_echoes_request() {
    let app = App::named("A").await;
    let request = Request::get(app.url("/some?x=1&y=2"))
        .body(Body::empty())
        .unwrap();
    assert_eq!(app.send(request).await.status(), StatusCode::NOT_FOUND);

    let request = Request::get(app.url("/?x=1&y=2"))
        .header("X-Forwarded-For", "10.0.0.1, 10.0.0.2")
        .header("X-Custom", "hello")
        .body(Body::empty())
        .unwrap();
    let response = app.send(request).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(x_server(&response), "A");
    let body = body_text(response).await;
    let lines: Vec<&str> = body.lines().collect();
    assert_eq!(lines[0], "server: A");
    assert_eq!(lines[1], "GET /?x=1&y=2 HTTP/1.1");
    let xff = lines
        .iter()
        .position(|l| *l == "x-forwarded-for: 10.0.0.1, 10.0.0.2");
    let custom = lines.iter().position(|l| *l == "x-custom: hello");
    assert!(xff.unwrap() < custom.unwrap(), "{body}");
    assert!(
        lines.iter().any(|l| l.starts_with("host: 127.0.0.1:")),
        "{body}"
    );
}

#[tokio::test]
async fn every_response_names_the_server() {
    let app = App::named("B").await;
    for path in ["/", "/health", "/me", "/nope", "/status/503", "/delay/x"] {
        let response = app.get(path).await;
        assert_eq!(x_server(&response), "B", "{path}");
    }
}

#[tokio::test]
async fn login_me_logout() {
    let app = App::named("A").await;

    let response = app.get("/me").await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        body_json(response).await,
        json!({"error": "not logged in", "server": "A"})
    );

    for bad in ["", "{}", "not json", r#"{"user": ""}"#, r#"{"user": 7}"#] {
        let response = app.post("/login", bad).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{bad:?}");
    }

    let response = app.post("/login", r#"{"user": "martin"}"#).await;
    assert_eq!(response.status(), StatusCode::OK);
    let cookie = response.headers()[header::SET_COOKIE].to_str().unwrap();
    assert!(
        cookie.ends_with("; Path=/; HttpOnly; SameSite=Lax"),
        "{cookie}"
    );
    let id = cookie
        .strip_prefix("SESSIONID=")
        .and_then(|rest| rest.split(';').next())
        .unwrap()
        .to_owned();
    assert_eq!(id.len(), 32);
    assert_eq!(
        body_json(response).await,
        json!({"user": "martin", "server": "A"})
    );

    let me = |cookie: String| {
        Request::get(app.url("/me"))
            .header(header::COOKIE, cookie)
            .body(Body::empty())
            .unwrap()
    };
    let response = app
        .send(me(format!("theme=dark; SESSIONID={id}; lang=en")))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        body_json(response).await,
        json!({"user": "martin", "server": "A"})
    );
    let response = app.send(me("SESSIONID=0123456789abcdef".into())).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);

    let logout = Request::post(app.url("/logout"))
        .header(header::COOKIE, format!("SESSIONID={id}"))
        .body(Body::empty())
        .unwrap();
    let response = app.send(logout).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()[header::SET_COOKIE],
        "SESSIONID=; Path=/; Max-Age=0"
    );
    let response = app.send(me(format!("SESSIONID={id}"))).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn sessions_are_per_instance() {
    let (a, b) = (App::named("A").await, App::named("B").await);
    let response = a.post("/login", r#"{"user": "martin"}"#).await;
    let cookie = response.headers()[header::SET_COOKIE].to_str().unwrap();
    let pair = cookie.split(';').next().unwrap().to_owned();
    let me = |app: &App| {
        Request::get(app.url("/me"))
            .header(header::COOKIE, pair.clone())
            .body(Body::empty())
            .unwrap()
    };
    assert_eq!(a.send(me(&a)).await.status(), StatusCode::OK);
    assert_eq!(b.send(me(&b)).await.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn health_can_be_set() {
    let app = App::named("A").await;
    let response = app.get("/health").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(body_text(response).await.trim(), "ok");

    let response = app.post("/health", r#"{"status": 503}"#).await;
    assert_eq!(response.status(), StatusCode::OK);
    for _ in 0..2 {
        assert_eq!(
            app.get("/health").await.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    for bad in [r#"{"status": 199}"#, r#"{"status": 600}"#, "{}", "nope"] {
        let response = app.post("/health", bad).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{bad}");
    }
    assert_eq!(
        app.get("/health").await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );

    app.post("/health", r#"{"status": 200}"#).await;
    let response = app.get("/health").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(body_text(response).await.trim(), "ok");
}

#[tokio::test]
async fn status_endpoint() {
    let app = App::named("A").await;
    let response = app.get("/status/418").await;
    assert_eq!(response.status(), StatusCode::IM_A_TEAPOT);
    assert!(body_text(response).await.starts_with("418"));
    let response = app.get("/status/204").await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert!(body_bytes(response).await.is_empty());
    for bad in ["/status/199", "/status/600", "/status/99999", "/status/abc"] {
        assert_eq!(
            app.get(bad).await.status(),
            StatusCode::BAD_REQUEST,
            "{bad}"
        );
    }
}

#[tokio::test]
async fn bytes_endpoint() {
    let app = App::named("A").await;
    let response = app.get("/bytes/100000").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()[header::CONTENT_LENGTH], "100000");
    let body = body_bytes(response).await;
    assert_eq!(body.len(), 100_000);
    assert!(body
        .iter()
        .enumerate()
        .all(|(i, &b)| b == b'a' + (i % 26) as u8));

    let response = app.get("/bytes/0").await;
    assert_eq!(response.headers()[header::CONTENT_LENGTH], "0");
    assert!(body_bytes(response).await.is_empty());

    // The cap itself is accepted: only the headers are read here.
    let response = app.get(&format!("/bytes/{}", 2u64 << 30)).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()[header::CONTENT_LENGTH], "2147483648");
    drop(response);
    let response = app.get(&format!("/bytes/{}", (2u64 << 30) + 1)).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
}

/// A request body of `len` pattern bytes, sent in 64 KiB chunks.
fn streamed_body(len: usize) -> (Body, Vec<u8>) {
    let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
    let chunks: Vec<Result<Bytes, std::io::Error>> = data
        .chunks(64 * 1024)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    (Body::from_stream(futures_util::stream::iter(chunks)), data)
}

#[tokio::test]
async fn sha256_of_streamed_body() {
    let app = App::named("A").await;
    let response = app.post("/sha256", "hello world").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        body_json(response).await,
        json!({
            "bytes": 11,
            "sha256": "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9"
        })
    );

    // Larger than axum's 2 MB default limit for buffered bodies.
    let (body, data) = streamed_body(3 << 20);
    let response = app.post("/sha256", body).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        body_json(response).await,
        json!({"bytes": data.len(), "sha256": hex::encode(Sha256::digest(&data))})
    );
}

#[tokio::test]
async fn echo_streams_body_back() {
    let app = App::named("A").await;
    let (body, data) = streamed_body(3 << 20);
    let response = app.post("/echo", body).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
    assert!(body_bytes(response).await == data);
}

#[tokio::test]
async fn delay_endpoint_waits() {
    let app = App::named("A").await;
    let start = Instant::now();
    let response = app.get("/delay/150").await;
    assert!(start.elapsed() >= Duration::from_millis(150));
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(body_text(response).await.trim(), "delayed 150ms");
    assert_eq!(
        app.get("/delay/60001").await.status(),
        StatusCode::BAD_REQUEST
    );
}

#[tokio::test]
async fn configured_delay_applies_to_every_response() {
    let delay = Duration::from_millis(120);
    let app = App::start(AppConfig::new("slow").with_delay(delay)).await;
    for path in ["/health", "/nope"] {
        let start = Instant::now();
        let response = app.get(path).await;
        assert!(start.elapsed() >= delay, "{path}");
        assert_eq!(x_server(&response), "slow");
    }
}

/// Reads one HTTP/1.1 response with a Content-Length body from `stream`.
async fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> (String, String) {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8(buf[..end].to_vec()).unwrap();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .unwrap()
                .parse()
                .unwrap();
            let total = end + 4 + len;
            while buf.len() < total {
                assert_ne!(stream.read_buf(buf).await.unwrap(), 0, "early EOF");
            }
            let body = String::from_utf8(buf[end + 4..total].to_vec()).unwrap();
            buf.drain(..total);
            return (head, body);
        }
        assert_ne!(stream.read_buf(buf).await.unwrap(), 0, "early EOF");
    }
}

#[tokio::test]
async fn keeps_connections_alive() {
    let app = App::named("A").await;
    let mut stream = TcpStream::connect(app.handle.addr()).await.unwrap();
    let mut buf = Vec::new();
    for path in ["/health", "/?again"] {
        let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let (head, body) = read_response(&mut stream, &mut buf).await;
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.contains("x-server: A"), "{head}");
        assert!(!body.is_empty());
    }
}

#[tokio::test]
async fn stop_finishes_in_flight_requests() {
    let app = App::named("A").await;
    let addr = app.handle.addr();
    let pending = tokio::spawn({
        let client = app.client.clone();
        let url = app.url("/delay/300");
        async move {
            let response = client
                .request(Request::get(url).body(Body::empty()).unwrap())
                .await
                .unwrap();
            (response.status(), body_text(response).await)
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    app.handle.stop().await;
    let (status, body) = pending.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.trim(), "delayed 300ms");
    assert!(TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn websocket_echoes_messages() {
    use tokio_tungstenite::tungstenite::Message;

    let app = App::named("A").await;
    let url = format!("ws://{}/ws", app.handle.addr());
    let (mut ws, response) = tokio_tungstenite::connect_async(url).await.unwrap();
    assert_eq!(response.headers()["x-server"], "A");
    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hello"));
    ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::binary(vec![1u8, 2, 3])
    );
    ws.close(None).await.unwrap();
}

#[tokio::test]
async fn request_method_is_reported() {
    let app = App::named("A").await;
    let request = Request::builder()
        .method(Method::PUT)
        .uri(app.url("/"))
        .body(Body::from("ignored"))
        .unwrap();
    let body = body_text(app.send(request).await).await;
    assert_eq!(body.lines().nth(1), Some("PUT / HTTP/1.1"));
}

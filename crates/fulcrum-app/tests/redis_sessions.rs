//! Redis-backed sessions against real `redis-server` processes on 127.0.0.1.
//!
//! Each test starts its own server on a free port and kills it when done.

use std::future::Future;
use std::net::TcpListener as StdTcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use axum::body::Body;
use fulcrum_app::{spawn, AppConfig, AppHandle, Sessions, REDIS_KEY_PREFIX};
use http::{header, Request, Response, StatusCode};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

const REDIS_SERVER: &str = "redis-server";

/// Longest any single HTTP exchange with an app may take in these tests.
const REQUEST_LIMIT: Duration = Duration::from_secs(5);

/// A `redis-server` child process, killed on drop.
struct RedisServer {
    child: Option<Child>,
    port: u16,
    /// Whether `port` is a TLS port (then `extra` must configure TLS).
    tls: bool,
    /// Extra arguments, used from the next (re)start on.
    extra: Vec<String>,
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers `PING`.
    async fn start() -> Self {
        let mut server = Self::stopped(free_port());
        server.restart().await;
        server
    }

    /// A server on `port` that is not running yet.
    fn stopped(port: u16) -> Self {
        Self {
            child: None,
            port,
            tls: false,
            extra: Vec::new(),
        }
    }

    fn url(&self, db: u8) -> String {
        format!("redis://127.0.0.1:{}/{db}", self.port)
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("redis-server is running").id()
    }

    /// (Re)starts the server on its port and waits until it is ready.
    async fn restart(&mut self) {
        assert!(self.child.is_none(), "redis-server already running");
        let dir = std::env::temp_dir();
        let tls = self.tls;
        let mut command = Command::new(REDIS_SERVER);
        if tls {
            command.args(["--port", "0", "--tls-port"]);
        } else {
            command.arg("--port");
        }
        command
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.child = Some(command.spawn().expect("cannot run redis-server"));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ready = if tls {
                // Readiness = the TLS port accepts connections.
                TcpStream::connect(("127.0.0.1", self.port)).await.is_ok()
            } else {
                ping(self.port).await
            };
            if ready {
                return;
            }
            let child = self.child.as_mut().unwrap();
            if let Some(status) = child.try_wait().unwrap() {
                panic!("redis-server on port {} exited: {status}", self.port);
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} did not become ready",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills the server (SIGKILL: no goodbye to its clients) and reaps it.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `signal` (e.g. `STOP`, `CONT`) to the server process.
    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} failed");
    }

    /// A direct client for checking what the apps stored.
    async fn client(&self, db: u8) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url(db))
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A port nothing listens on right now.
fn free_port() -> u16 {
    StdTcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether a Redis on `port` answers `PING` (with `+PONG`, or `-NOAUTH` when
/// it wants a password).
async fn ping(port: u16) -> bool {
    let attempt = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        stream.write_all(b"PING\r\n").await.ok()?;
        let mut buf = [0u8; 7];
        stream.read_exact(&mut buf).await.ok()?;
        Some(&buf == b"+PONG\r\n" || buf.starts_with(b"-NOAUTH"))
    };
    tokio::time::timeout(Duration::from_secs(1), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

struct App {
    handle: AppHandle,
    client: Client<HttpConnector, Body>,
}

impl App {
    async fn start(name: &str, sessions: &str) -> Self {
        let sessions: Sessions = sessions.parse().unwrap();
        let cfg = AppConfig::new(name).with_sessions(sessions);
        let handle = spawn("127.0.0.1:0".parse().unwrap(), cfg).await.unwrap();
        let client = Client::builder(TokioExecutor::new()).build_http();
        Self { handle, client }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.handle.addr())
    }

    /// Sends `request`, failing the test if the answer takes too long.
    async fn send(&self, request: Request<Body>) -> (StatusCode, Response<Incoming>) {
        let response = bounded(REQUEST_LIMIT, self.client.request(request))
            .await
            .unwrap();
        (response.status(), response)
    }

    async fn get(&self, path: &str, cookie: Option<&str>) -> (StatusCode, Value) {
        let mut request = Request::get(self.url(path));
        if let Some(cookie) = cookie {
            request = request.header(header::COOKIE, cookie);
        }
        let (status, response) = self.send(request.body(Body::empty()).unwrap()).await;
        (status, json_body(response).await)
    }

    async fn me(&self, cookie: &str) -> (StatusCode, Value) {
        self.get("/me", Some(cookie)).await
    }

    /// Logs `user` in; on success also returns the `SESSIONID=…` cookie pair.
    async fn login(&self, user: &str) -> (StatusCode, Value, Option<String>) {
        let request = Request::post(self.url("/login"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(json!({ "user": user }).to_string()))
            .unwrap();
        let (status, response) = self.send(request).await;
        let cookie = response.headers().get(header::SET_COOKIE).map(|value| {
            let value = value.to_str().unwrap();
            value.split(';').next().unwrap().to_owned()
        });
        (status, json_body(response).await, cookie)
    }

    async fn logout(&self, cookie: &str) -> (StatusCode, Value) {
        let request = Request::post(self.url("/logout"))
            .header(header::COOKIE, cookie)
            .body(Body::empty())
            .unwrap();
        let (status, response) = self.send(request).await;
        (status, json_body(response).await)
    }

    async fn text(&self, path: &str) -> (StatusCode, String) {
        let (status, response) = self
            .send(Request::get(self.url(path)).body(Body::empty()).unwrap())
            .await;
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }
}

async fn bounded<T>(limit: Duration, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, future)
        .await
        .unwrap_or_else(|_| panic!("no answer within {limit:?}"))
}

async fn json_body(response: Response<Incoming>) -> Value {
    let body = response.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&body).unwrap_or_else(|_| Value::String(format!("{body:?}")))
}

fn unavailable(server: &str) -> Value {
    json!({"error": "session store unavailable", "server": server})
}

/// Logs `user` in on `app` until that works, for at most `limit`; returns the cookie.
async fn login_when_back(app: &App, user: &str, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let (status, body, cookie) = app.login(user).await;
        if status == StatusCode::OK {
            return cookie.expect("login sets the cookie");
        }
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(
            Instant::now() < deadline,
            "sessions did not work again within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn session_key(cookie: &str) -> String {
    let id = cookie.strip_prefix("SESSIONID=").unwrap();
    format!("{REDIS_KEY_PREFIX}{id}")
}

#[tokio::test]
async fn instances_share_sessions_through_redis() {
    let redis = RedisServer::start().await;
    let url = redis.url(3);
    let (a, b) = (App::start("A", &url).await, App::start("B", &url).await);

    let (status, body, cookie) = a.login("martin").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!({"user": "martin", "server": "A"}));
    let cookie = cookie.unwrap();

    // Stored as documented, in the database the URL names.
    let mut direct = redis.client(3).await;
    let key = session_key(&cookie);
    let value: Option<String> = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut direct)
        .await
        .unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&value.unwrap()).unwrap(),
        json!({"user": "martin"})
    );
    let ttl: i64 = redis::cmd("TTL")
        .arg(&key)
        .query_async(&mut direct)
        .await
        .unwrap();
    assert!((1790..=1800).contains(&ttl), "ttl {ttl}");

    // /me refreshes the TTL.
    let _: () = redis::cmd("EXPIRE")
        .arg(&key)
        .arg(100)
        .query_async(&mut direct)
        .await
        .unwrap();
    assert_eq!(
        b.me(&cookie).await,
        (StatusCode::OK, json!({"user": "martin", "server": "B"}))
    );
    let ttl: i64 = redis::cmd("TTL")
        .arg(&key)
        .query_async(&mut direct)
        .await
        .unwrap();
    assert!(ttl > 1000, "ttl {ttl}");
    assert_eq!(
        a.me(&cookie).await,
        (StatusCode::OK, json!({"user": "martin", "server": "A"}))
    );

    // Unknown and malformed sessions are 401 on both.
    for app in [&a, &b] {
        let (status, _) = app.me("SESSIONID=00000000000000000000000000000000").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, _) = app.me("SESSIONID=not-an-id").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }

    assert_eq!(
        b.logout(&cookie).await,
        (StatusCode::OK, json!({"logged_out": true, "server": "B"}))
    );
    assert_eq!(
        a.me(&cookie).await,
        (
            StatusCode::UNAUTHORIZED,
            json!({"error": "not logged in", "server": "A"})
        )
    );
    assert_eq!(
        a.logout(&cookie).await,
        (StatusCode::OK, json!({"logged_out": false, "server": "A"}))
    );
    let exists: u64 = redis::cmd("EXISTS")
        .arg(&key)
        .query_async(&mut direct)
        .await
        .unwrap();
    assert_eq!(exists, 0);
}

#[tokio::test]
async fn survives_redis_restart() {
    let mut redis = RedisServer::start().await;
    let url = redis.url(0);
    let (a, b) = (App::start("A", &url).await, App::start("B", &url).await);
    let (status, _, cookie) = a.login("martin").await;
    assert_eq!(status, StatusCode::OK);
    let cookie = cookie.unwrap();
    assert_eq!(b.me(&cookie).await.0, StatusCode::OK);

    redis.kill();
    for (app, name) in [(&a, "A"), (&b, "B")] {
        for _ in 0..3 {
            let start = Instant::now();
            let (status, body) = app.me(&cookie).await;
            assert_eq!(
                (status, body),
                (StatusCode::SERVICE_UNAVAILABLE, unavailable(name))
            );
            assert!(
                start.elapsed() < Duration::from_secs(2),
                "{:?}",
                start.elapsed()
            );
        }
        let (status, body, cookie) = app.login("ann").await;
        assert_eq!(
            (status, body),
            (StatusCode::SERVICE_UNAVAILABLE, unavailable(name))
        );
        assert_eq!(cookie, None);
        assert_eq!(
            app.logout("SESSIONID=00000000000000000000000000000000")
                .await
                .0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        // Everything else still works.
        let (status, text) = app.text("/").await;
        assert_eq!(status, StatusCode::OK);
        assert!(text.starts_with(&format!("server: {name}\n")), "{text}");
        assert_eq!(app.text("/health").await.0, StatusCode::OK);
    }

    // Same port again: no restart of the apps needed. (The old session died
    // with the unpersisted Redis.)
    redis.restart().await;
    let cookie = login_when_back(&a, "ann", Duration::from_secs(5)).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, body) = b.me(&cookie).await;
        if status == StatusCode::OK {
            assert_eq!(body, json!({"user": "ann", "server": "B"}));
            break;
        }
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(Instant::now() < deadline, "B did not reconnect");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(a.me(&cookie).await.0, StatusCode::OK);
    assert_eq!(b.logout(&cookie).await.0, StatusCode::OK);
    assert_eq!(a.me(&cookie).await.0, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn stalled_redis_answers_503_in_bounded_time() {
    let redis = RedisServer::start().await;
    let app = App::start("A", &redis.url(0)).await;
    let (status, _, cookie) = app.login("martin").await;
    assert_eq!(status, StatusCode::OK);
    let cookie = cookie.unwrap();

    // A stopped process keeps its socket open but never answers.
    redis.signal("STOP");
    let result = async {
        let start = Instant::now();
        let me = app.me(&cookie).await;
        let login = app.login("ann").await;
        (start.elapsed(), me, login)
    }
    .await;
    redis.signal("CONT");
    let (elapsed, me, (login_status, login_body, _)) = result;
    assert_eq!(me, (StatusCode::SERVICE_UNAVAILABLE, unavailable("A")));
    assert_eq!(
        login_status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{login_body}"
    );
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");

    let deadline = Instant::now() + Duration::from_secs(5);
    while app.me(&cookie).await.0 != StatusCode::OK {
        assert!(Instant::now() < deadline, "sessions did not come back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn starts_while_redis_is_down() {
    let mut redis = RedisServer::stopped(free_port());
    let app = App::start("A", &redis.url(0)).await;

    let (status, text) = app.text("/").await;
    assert_eq!(status, StatusCode::OK);
    assert!(text.starts_with("server: A\n"), "{text}");
    assert_eq!(app.text("/health").await.0, StatusCode::OK);

    let start = Instant::now();
    let (status, body, cookie) = app.login("martin").await;
    assert_eq!(
        (status, body),
        (StatusCode::SERVICE_UNAVAILABLE, unavailable("A"))
    );
    assert_eq!(cookie, None);
    let cookie = "SESSIONID=00000000000000000000000000000000";
    assert_eq!(
        app.me(cookie).await,
        (StatusCode::SERVICE_UNAVAILABLE, unavailable("A"))
    );
    assert_eq!(app.logout(cookie).await.0, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    // Without a cookie there is nothing to look up.
    assert_eq!(app.get("/me", None).await.0, StatusCode::UNAUTHORIZED);

    redis.restart().await;
    let cookie = login_when_back(&app, "martin", Duration::from_secs(5)).await;
    assert_eq!(
        app.me(&cookie).await,
        (StatusCode::OK, json!({"user": "martin", "server": "A"}))
    );
}

#[tokio::test]
async fn invalid_hand_built_url_is_refused() {
    let cfg = AppConfig::new("A").with_sessions(Sessions::Redis("redis://h:1/x".into()));
    let err = spawn("127.0.0.1:0".parse().unwrap(), cfg)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    assert!(err.to_string().starts_with("invalid redis URL"), "{err}");
}

/// Writes a self-signed certificate for 127.0.0.1 into `dir` with the
/// `openssl` tool; `false` if that tool is missing.
fn self_signed_cert(dir: &Path) -> bool {
    let status = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=127.0.0.1"])
        .arg("-keyout")
        .arg(dir.join("key.pem"))
        .arg("-out")
        .arg(dir.join("cert.pem"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    matches!(status, Ok(s) if s.success())
}

#[tokio::test]
async fn rediss_urls_use_tls() {
    let dir = tempfile::tempdir().unwrap();
    if !self_signed_cert(dir.path()) {
        eprintln!("skipped: the openssl tool is not available to make a certificate");
        return;
    }
    let cert = dir.path().join("cert.pem");
    let mut redis = RedisServer::stopped(free_port());
    redis.tls = true;
    redis.extra = vec![
        "--tls-cert-file".into(),
        cert.display().to_string(),
        "--tls-key-file".into(),
        dir.path().join("key.pem").display().to_string(),
        "--tls-ca-cert-file".into(),
        cert.display().to_string(),
        "--tls-auth-clients".into(),
        "no".into(),
    ];
    redis.restart().await;
    let port = redis.port;

    // The self-signed certificate is only accepted with `#insecure`.
    let strict = App::start("S", &format!("rediss://127.0.0.1:{port}/0")).await;
    let (status, body, _) = strict.login("martin").await;
    assert_eq!(
        (status, body),
        (StatusCode::SERVICE_UNAVAILABLE, unavailable("S"))
    );

    let app = App::start("T", &format!("rediss://127.0.0.1:{port}/0#insecure")).await;
    let (status, body, cookie) = app.login("martin").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        app.me(&cookie.unwrap()).await,
        (StatusCode::OK, json!({"user": "martin", "server": "T"}))
    );
}

#[tokio::test]
async fn recovers_from_failed_handshakes() {
    // A reconnection that fails on AUTH (not on I/O) must not wedge the store.
    let mut redis = RedisServer::stopped(free_port());
    let password = |pass: &str| vec!["--requirepass".to_owned(), pass.to_owned()];
    redis.extra = password("s3cret");
    redis.restart().await;
    let url = format!("redis://:s3cret@127.0.0.1:{}/0", redis.port);
    let app = App::start("A", &url).await;
    let (status, body, _) = app.login("martin").await;
    assert_eq!(status, StatusCode::OK, "{body}");

    redis.kill();
    redis.extra = password("other");
    redis.restart().await;
    for _ in 0..3 {
        let (status, body, _) = app.login("martin").await;
        assert_eq!(
            (status, body),
            (StatusCode::SERVICE_UNAVAILABLE, unavailable("A"))
        );
    }

    redis.kill();
    redis.extra = password("s3cret");
    redis.restart().await;
    let cookie = login_when_back(&app, "ann", Duration::from_secs(5)).await;
    assert_eq!(
        app.me(&cookie).await,
        (StatusCode::OK, json!({"user": "ann", "server": "A"}))
    );
}

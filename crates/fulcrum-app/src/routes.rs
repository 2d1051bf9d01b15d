//! The HTTP handlers and the middleware shared by all of them.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::future::Future as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use futures_util::TryStreamExt as _;
use http::header::{CONTENT_TYPE, SET_COOKIE};
use http::{HeaderName, HeaderValue, StatusCode};
use http_body::{Frame, SizeHint};
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest as _, Sha256};
use std::net::SocketAddr;

use crate::sessions::{session_cookie, SessionStore, StoreUnavailable, COOKIE_NAME};
use crate::AppConfig;

/// Header naming the server on every response.
static X_SERVER: HeaderName = HeaderName::from_static("x-server");

/// Longest wait `/delay/{ms}` accepts, in milliseconds.
const MAX_DELAY_MS: u64 = 60_000;

/// Largest body `/bytes/{n}` produces: 2 GiB.
const MAX_BYTES: u64 = 2 << 30;

/// Shared state of one app instance.
struct AppState {
    name: String,
    server_header: HeaderValue,
    delay: Duration,
    health: AtomicU16,
    sessions: SessionStore,
    /// Calls per `/cache/{seconds}` and `/headers/{tag}` endpoint (for cache tests).
    calls: Mutex<HashMap<String, u64>>,
}

impl AppState {
    /// Counts a call to `endpoint`; returns the count including it.
    fn count(&self, endpoint: &str) -> u64 {
        let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        let n = calls.entry(endpoint.to_owned()).or_insert(0);
        *n += 1;
        *n
    }

    fn calls(&self, endpoint: &str) -> u64 {
        let calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        calls.get(endpoint).copied().unwrap_or(0)
    }
}

type Shared = Arc<AppState>;

/// The app's routes; `local` is the listening address (a cluster node
/// advertises it to its peers).
pub(crate) fn router(cfg: AppConfig, local: Option<SocketAddr>) -> Router {
    let sessions = SessionStore::new(&cfg.sessions, &cfg.cluster, local);
    let cluster = sessions.cluster().cloned();
    let state = Arc::new(AppState {
        server_header: header_value_lossy(&cfg.name),
        sessions,
        health: AtomicU16::new(StatusCode::OK.as_u16()),
        delay: cfg.delay,
        name: cfg.name,
        calls: Mutex::new(HashMap::new()),
    });
    let app = Router::new()
        .route("/", any(whoami))
        .route("/health", get(health).post(set_health))
        .route("/login", post(login))
        .route("/me", get(me).put(update_me))
        .route("/metrics", get(metrics))
        .route("/logout", post(logout))
        .route("/delay/{ms}", get(delay))
        .route("/status/{code}", get(status))
        .route("/bytes/{n}", get(bytes))
        .route("/echo", post(echo))
        .route("/sha256", post(sha256))
        .route("/ws", get(websocket))
        .route("/cache/{seconds}", get(cache))
        .route("/headers", any(headers_default))
        .route("/headers/{tag}", any(headers))
        .route("/calls/{endpoint}", get(calls))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), common))
        .with_state(state);
    match cluster {
        // Without the configured delay: replication is not a user request.
        Some(node) => app.merge(crate::cluster::router(node)),
        None => app,
    }
}

/// The server name as a header value, dropping characters a header cannot carry.
fn header_value_lossy(name: &str) -> HeaderValue {
    let clean: String = name.chars().filter(|c| !c.is_control()).collect();
    HeaderValue::from_str(&clean)
        .or_else(|_| HeaderValue::from_bytes(clean.as_bytes()))
        .unwrap_or_else(|_| HeaderValue::from_static("fulcrum-app"))
}

/// Applies the configured delay and stamps `x-server` on every response.
async fn common(State(state): State<Shared>, request: Request, next: Next) -> Response {
    if !state.delay.is_zero() {
        tokio::time::sleep(state.delay).await;
    }
    let mut response = next.run(request).await;
    response
        .headers_mut()
        .insert(X_SERVER.clone(), state.server_header.clone());
    response
}

/// A plain-text response with `status`, using an empty body where HTTP forbids one.
fn text(status: StatusCode, body: impl Into<String>) -> Response {
    if matches!(status, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED) {
        return status.into_response();
    }
    let mut body = body.into();
    if !body.ends_with('\n') {
        body.push('\n');
    }
    (status, body).into_response()
}

fn bad_request(message: impl Into<String>) -> Response {
    text(StatusCode::BAD_REQUEST, message)
}

/// `/`: names the server, then echoes the request line and headers.
async fn whoami(State(state): State<Shared>, request: Request) -> String {
    let mut out = format!("server: {}\n", state.name);
    let target = request.uri().path_and_query().map_or("/", |pq| pq.as_str());
    let _ = writeln!(
        out,
        "{} {} {:?}",
        request.method(),
        target,
        request.version()
    );
    for (name, value) in request.headers() {
        let _ = writeln!(out, "{name}: {}", String::from_utf8_lossy(value.as_bytes()));
    }
    out
}

async fn not_found() -> Response {
    text(StatusCode::NOT_FOUND, "not found")
}

/// `GET /health`: the status set through `POST /health` (200 at start).
async fn health(State(state): State<Shared>) -> Response {
    let status = StatusCode::from_u16(state.health.load(Ordering::Relaxed))
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if status == StatusCode::OK {
        text(status, "ok")
    } else {
        text(status, format!("unhealthy ({})", status.as_u16()))
    }
}

#[derive(Deserialize)]
struct SetHealth {
    status: u16,
}

/// `POST /health` with `{"status": 503}`: sets what `GET /health` answers.
async fn set_health(State(state): State<Shared>, body: Bytes) -> Response {
    let Ok(SetHealth { status }) = serde_json::from_slice(&body) else {
        return bad_request(r#"expected JSON {"status": 200..=599}"#);
    };
    if !(200..=599).contains(&status) {
        return bad_request(format!("status {status} is outside 200..=599"));
    }
    state.health.store(status, Ordering::Relaxed);
    text(StatusCode::OK, format!("health status set to {status}"))
}

#[derive(Deserialize)]
struct Login {
    user: String,
}

/// `POST /login` with `{"user": "martin"}`: starts a session and sets its cookie.
async fn login(State(state): State<Shared>, body: Bytes) -> Response {
    let user = match serde_json::from_slice::<Login>(&body) {
        Ok(Login { user }) if !user.trim().is_empty() => user,
        _ => return bad_request(r#"expected JSON {"user": "<non-empty name>"}"#),
    };
    let Ok(id) = state.sessions.create(&user).await else {
        return store_unavailable(&state);
    };
    let cookie = format!("{COOKIE_NAME}={id}; Path=/; HttpOnly; SameSite=Lax");
    (
        [(SET_COOKIE, cookie)],
        Json(json!({ "user": user, "server": state.name })),
    )
        .into_response()
}

/// `GET /me`: who is logged in under the request's session cookie. Without a
/// cookie the answer is `401` straight away, whatever the store's state.
async fn me(State(state): State<Shared>, headers: http::HeaderMap) -> Response {
    let user = match session_cookie(&headers) {
        Some(id) => match state.sessions.get(id).await {
            Ok(user) => user,
            Err(StoreUnavailable) => return store_unavailable(&state),
        },
        None => None,
    };
    match user {
        Some(user) => Json(json!({ "user": user, "server": state.name })).into_response(),
        None => (
            StatusCode::UNAUTHORIZED,
            Json(json!({ "error": "not logged in", "server": state.name })),
        )
            .into_response(),
    }
}

/// `PUT /me` with `{"user": "ada"}`: changes the user of the current session.
async fn update_me(State(state): State<Shared>, headers: http::HeaderMap, body: Bytes) -> Response {
    let user = match serde_json::from_slice::<Login>(&body) {
        Ok(Login { user }) if !user.trim().is_empty() => user,
        _ => return bad_request(r#"expected JSON {"user": "<non-empty name>"}"#),
    };
    let updated = match session_cookie(&headers) {
        Some(id) => match state.sessions.update(id, &user).await {
            Ok(updated) => updated,
            Err(StoreUnavailable) => return store_unavailable(&state),
        },
        None => false,
    };
    if updated {
        Json(json!({ "user": user, "server": state.name })).into_response()
    } else {
        (
            StatusCode::UNAUTHORIZED,
            Json(json!({ "error": "not logged in", "server": state.name })),
        )
            .into_response()
    }
}

/// `GET /metrics`: the session store's figures in the Prometheus text format.
async fn metrics(State(state): State<Shared>) -> Response {
    let mut out = String::new();
    state.sessions.write_metrics(&mut out);
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        out,
    )
        .into_response()
}

/// `POST /logout`: ends the session and clears its cookie.
async fn logout(State(state): State<Shared>, headers: http::HeaderMap) -> Response {
    let ended = match session_cookie(&headers) {
        Some(id) => match state.sessions.remove(id).await {
            Ok(ended) => ended,
            // The session still exists: keep the cookie.
            Err(StoreUnavailable) => return store_unavailable(&state),
        },
        None => false,
    };
    let cookie = format!("{COOKIE_NAME}=; Path=/; Max-Age=0");
    (
        [(SET_COOKIE, cookie)],
        Json(json!({ "logged_out": ended, "server": state.name })),
    )
        .into_response()
}

/// `503` for a session endpoint while the session store cannot answer.
fn store_unavailable(state: &AppState) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({ "error": "session store unavailable", "server": state.name })),
    )
        .into_response()
}

/// `GET /delay/{ms}`: answers after `ms` milliseconds.
async fn delay(Path(ms): Path<u64>) -> Response {
    if ms > MAX_DELAY_MS {
        return bad_request(format!("delay {ms}ms exceeds the {MAX_DELAY_MS}ms limit"));
    }
    tokio::time::sleep(Duration::from_millis(ms)).await;
    text(StatusCode::OK, format!("delayed {ms}ms"))
}

/// `GET /status/{code}`: answers with that status.
async fn status(Path(code): Path<u16>) -> Response {
    match StatusCode::from_u16(code) {
        Ok(status) if (200..=599).contains(&code) => {
            let reason = status.canonical_reason().unwrap_or("");
            text(status, format!("{code} {reason}").trim_end())
        }
        _ => bad_request(format!("status {code} is outside 200..=599")),
    }
}

/// `GET /bytes/{n}`: `n` bytes of `abc…xyzabc…`, streamed with a Content-Length.
async fn bytes(Path(n): Path<u64>) -> Response {
    if n > MAX_BYTES {
        return bad_request(format!("{n} bytes exceeds the {MAX_BYTES} byte limit"));
    }
    (
        [(CONTENT_TYPE, "application/octet-stream")],
        Body::new(PatternBody { remaining: n }),
    )
        .into_response()
}

/// One chunk of the `/bytes` pattern. Its length is a multiple of 26, so every
/// chunk starts at `a` and consecutive chunks continue the pattern seamlessly.
static PATTERN: LazyLock<Bytes> =
    LazyLock::new(|| (0..26 * 2520).map(|i| b'a' + (i % 26) as u8).collect());

/// A body of `remaining` pattern bytes, sliced from [`PATTERN`] without copying.
struct PatternBody {
    remaining: u64,
}

impl http_body::Body for PatternBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let len = usize::try_from(self.remaining).map_or(PATTERN.len(), |r| r.min(PATTERN.len()));
        self.remaining -= len as u64;
        Poll::Ready(Some(Ok(Frame::data(PATTERN.slice(..len)))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

/// `POST /echo`: streams the request body straight back.
async fn echo(request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let mut response = Response::new(body);
    if let Some(content_type) = parts.headers.get(CONTENT_TYPE) {
        response
            .headers_mut()
            .insert(CONTENT_TYPE, content_type.clone());
    }
    response
}

/// `POST /sha256`: hashes the request body as it streams in.
async fn sha256(body: Body) -> Response {
    let mut hasher = Sha256::new();
    let mut total: u64 = 0;
    let mut stream = body.into_data_stream();
    loop {
        match stream.try_next().await {
            Ok(Some(chunk)) => {
                total += chunk.len() as u64;
                hasher.update(&chunk);
            }
            Ok(None) => break,
            Err(err) => return bad_request(format!("failed to read body: {err}")),
        }
    }
    Json(json!({ "bytes": total, "sha256": hex::encode(hasher.finalize()) })).into_response()
}

/// `GET /ws`: a WebSocket that echoes every text and binary message.
async fn websocket(upgrade: WebSocketUpgrade) -> Response {
    upgrade.on_upgrade(ws_echo)
}

async fn ws_echo(mut socket: WebSocket) {
    while let Some(Ok(message)) = socket.recv().await {
        match message {
            Message::Text(_) | Message::Binary(_) => {
                if socket.send(message).await.is_err() {
                    break;
                }
            }
            Message::Close(_) => break,
            Message::Ping(_) | Message::Pong(_) => {}
        }
    }
}

/// Header carrying how many times the endpoint has been called, this call included.
static X_CALLS: HeaderName = HeaderName::from_static("x-calls");

/// `GET /cache/{seconds}`: `Cache-Control: public, max-age=SECONDS` and an `ETag`, answering 304 to a
/// matching `If-None-Match`; counts its calls (`x-calls`, and `GET /calls/cache-SECONDS`).
async fn cache(
    State(state): State<Shared>,
    Path(seconds): Path<u32>,
    headers: http::HeaderMap,
) -> Response {
    let n = state.count(&format!("cache-{seconds}"));
    let etag = format!("\"{}-cache-{seconds}\"", state.name);
    let matches = headers
        .get_all(http::header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim() == etag || t.trim() == "*");
    let mut response = if matches {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        text(
            StatusCode::OK,
            format!("cacheable for {seconds}s, on {}", state.name),
        )
    };
    let out = response.headers_mut();
    out.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_str(&format!("public, max-age={seconds}"))
            .unwrap_or(HeaderValue::from_static("no-store")),
    );
    if let Ok(etag) = HeaderValue::from_str(&etag) {
        out.insert(http::header::ETAG, etag);
    }
    out.insert(X_CALLS.clone(), HeaderValue::from(n));
    response
}

/// `GET /calls/{endpoint}`: how many times `/headers/{tag}` (endpoint `tag`) or
/// `/cache/{seconds}` (endpoint `cache-SECONDS`) was called.
async fn calls(State(state): State<Shared>, Path(endpoint): Path<String>) -> String {
    format!("{}\n", state.calls(&endpoint))
}

/// What `/headers/{tag}` answers with, from its query string.
#[derive(Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
struct HeadersQuery {
    cache_control: Option<String>,
    vary: Option<String>,
    set_cookie: Option<String>,
    /// An HTTP date, or `-N` / `+N`: N seconds before / after now.
    last_modified: Option<String>,
    etag: Option<String>,
    /// An HTTP date, or `-N` / `+N`: N seconds before / after now.
    expires: Option<String>,
    status: Option<u16>,
    bytes: Option<u64>,
    /// Milliseconds between the first byte of the body and the rest.
    delay: Option<u64>,
}

/// `/headers` is `/headers/default`.
async fn headers_default(
    state: State<Shared>,
    query: Result<Query<HeadersQuery>, QueryRejection>,
    request: Request,
) -> Response {
    headers(state, Path("default".to_owned()), query, request).await
}

/// `ANY /headers/{tag}?cache-control=&vary=&set-cookie=&last-modified=&etag=&expires=&status=&bytes=&delay=`:
/// answers with those response headers, honouring `If-None-Match` / `If-Modified-Since` with a
/// 304, and counts its calls per tag (`x-calls`, and `GET /calls/{tag}`). The body names the tag,
/// the call and the values of the request headers `vary` lists; or it is `bytes` pattern bytes,
/// the first 26 sent at once and the rest after `delay` ms.
async fn headers(
    State(state): State<Shared>,
    Path(tag): Path<String>,
    query: Result<Query<HeadersQuery>, QueryRejection>,
    request: Request,
) -> Response {
    let q = match query {
        Ok(Query(q)) => q,
        Err(e) => return bad_request(e.body_text()),
    };
    let n = state.count(&tag);
    let date = |text: &str| -> String {
        let offset = |s: &str| s.parse::<u64>().ok().map(Duration::from_secs);
        let now = std::time::SystemTime::now();
        let at = match (text.strip_prefix('+'), text.strip_prefix('-')) {
            (Some(s), _) => offset(s).map(|d| now + d),
            (_, Some(s)) => offset(s).map(|d| now - d),
            _ => None,
        };
        at.map_or_else(|| text.to_owned(), httpdate::fmt_http_date)
    };
    let mut headers = http::HeaderMap::new();
    let mut set = |name: http::HeaderName, value: Option<String>| {
        if let Some(v) = value.and_then(|v| HeaderValue::from_str(&v).ok()) {
            headers.insert(name, v);
        }
    };
    set(http::header::CACHE_CONTROL, q.cache_control.clone());
    set(http::header::VARY, q.vary.clone());
    set(http::header::SET_COOKIE, q.set_cookie.clone());
    set(http::header::ETAG, q.etag.clone());
    set(
        http::header::LAST_MODIFIED,
        q.last_modified.as_deref().map(date),
    );
    set(http::header::EXPIRES, q.expires.as_deref().map(date));
    headers.insert(X_CALLS.clone(), HeaderValue::from(n));

    let req_headers = request.headers();
    let etag_matches = q.etag.as_deref().is_some_and(|etag| {
        req_headers
            .get_all(http::header::IF_NONE_MATCH)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim() == etag || t.trim() == "*")
    });
    let modified_matches = req_headers
        .get(http::header::IF_MODIFIED_SINCE)
        .zip(headers.get(http::header::LAST_MODIFIED))
        .is_some_and(|(since, modified)| {
            let since = since
                .to_str()
                .ok()
                .and_then(|s| httpdate::parse_http_date(s).ok());
            let modified = modified
                .to_str()
                .ok()
                .and_then(|s| httpdate::parse_http_date(s).ok());
            matches!((since, modified), (Some(s), Some(m)) if m <= s)
        });
    let conditional = req_headers.contains_key(http::header::IF_NONE_MATCH);
    if etag_matches || (!conditional && modified_matches) {
        let mut response = StatusCode::NOT_MODIFIED.into_response();
        response.headers_mut().extend(headers);
        return response;
    }

    let status = match q.status.map(StatusCode::from_u16) {
        None => StatusCode::OK,
        Some(Ok(s)) if (200..=599).contains(&s.as_u16()) => s,
        Some(_) => return bad_request("status must be from 200 to 599"),
    };
    let mut response = match q.bytes {
        Some(n) if n > MAX_BYTES => {
            return bad_request(format!("{n} bytes exceeds the {MAX_BYTES} byte limit"))
        }
        Some(n) => {
            let delay = Duration::from_millis(q.delay.unwrap_or(0).min(MAX_DELAY_MS));
            let mut response = Response::new(Body::new(DelayedPattern::new(n, delay)));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            response
        }
        None => {
            let mut out = format!("tag {tag} call {n} on {}\n", state.name);
            if let Some(vary) = &q.vary {
                for name in vary.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    let value = req_headers
                        .get(name)
                        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                        .unwrap_or_default();
                    let _ = writeln!(out, "{name}: {value}");
                }
            }
            Response::new(Body::from(out))
        }
    };
    *response.status_mut() = status;
    response.headers_mut().extend(headers);
    response
}

/// `n` pattern bytes: the first 26 at once, the rest after `delay`.
struct DelayedPattern {
    first: u64,
    rest: PatternBody,
    delay: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl DelayedPattern {
    fn new(n: u64, delay: Duration) -> Self {
        let first = n.min(26);
        DelayedPattern {
            first,
            rest: PatternBody {
                remaining: n - first,
            },
            delay: (!delay.is_zero()).then(|| Box::pin(tokio::time::sleep(delay))),
        }
    }
}

impl http_body::Body for DelayedPattern {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.first > 0 {
            let first = self.first as usize;
            self.first = 0;
            return Poll::Ready(Some(Ok(Frame::data(PATTERN.slice(..first)))));
        }
        if let Some(delay) = self.delay.as_mut() {
            std::task::ready!(delay.as_mut().poll(cx));
            self.delay = None;
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.first == 0 && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.first + self.rest.remaining)
    }
}

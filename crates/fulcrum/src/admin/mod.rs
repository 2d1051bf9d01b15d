//! The admin side, on `admin.bind`: the REST API, Prometheus metrics, liveness/readiness probes and
//! the live dashboard. It reads the same atomics the request path writes; it never takes a lock the
//! request path takes.

mod api;
mod explain;
mod metrics;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::routing::{get, post, put};
use axum::Router;
use tokio_util::sync::CancellationToken;

use crate::runtime::Shared;

const DASHBOARD: &str = include_str!("dashboard.html");

/// The OpenAPI 3.1 description of the admin API (`GET /api/openapi.json`); a test checks it against
/// [`ROUTES`] and the router.
pub const OPENAPI: &str = include_str!("openapi.json");

/// Every route of the admin router as `(method, path)`, in OpenAPI's path syntax.
pub const ROUTES: &[(&str, &str)] = &[
    ("get", "/"),
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/api/openapi.json"),
    ("get", "/api/v1/status"),
    ("get", "/api/v1/ha"),
    ("get", "/api/v1/pools"),
    ("get", "/api/v1/pools/{pool}"),
    ("get", "/api/v1/pools/{pool}/explain"),
    ("delete", "/api/v1/pools/{pool}/cache"),
    ("post", "/api/v1/pools/{pool}/servers"),
    ("get", "/api/v1/pools/{pool}/servers/{name}"),
    ("delete", "/api/v1/pools/{pool}/servers/{name}"),
    ("put", "/api/v1/pools/{pool}/servers/{name}/state"),
    ("put", "/api/v1/pools/{pool}/servers/{name}/weight"),
    ("post", "/api/v1/reload"),
    ("get", "/api/v1/listeners/{listener}/bans"),
    ("post", "/api/v1/listeners/{listener}/bans"),
    ("delete", "/api/v1/listeners/{listener}/bans/{ip}"),
    ("get", "/api/v1/listeners/{listener}/access"),
    ("put", "/api/v1/listeners/{listener}/access"),
];

/// The admin router over the running system's shared state.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/", get(|| async { axum::response::Html(DASHBOARD) }))
        .route("/healthz", get(api::healthz))
        .route("/readyz", get(api::readyz))
        .route("/metrics", get(metrics::metrics))
        .route(
            "/api/openapi.json",
            get(|| async {
                (
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    OPENAPI,
                )
            }),
        )
        .route("/api/v1/status", get(api::status))
        .route("/api/v1/ha", get(api::ha))
        .route("/api/v1/pools", get(api::pools))
        .route("/api/v1/pools/{pool}", get(api::pool))
        .route("/api/v1/pools/{pool}/explain", get(explain::explain))
        .route(
            "/api/v1/pools/{pool}/cache",
            axum::routing::delete(api::purge_cache),
        )
        .route("/api/v1/pools/{pool}/servers", post(api::add_server))
        .route(
            "/api/v1/pools/{pool}/servers/{name}",
            get(api::server).delete(api::remove_server),
        )
        .route(
            "/api/v1/pools/{pool}/servers/{name}/state",
            put(api::set_state),
        )
        .route(
            "/api/v1/pools/{pool}/servers/{name}/weight",
            put(api::set_weight),
        )
        .route("/api/v1/reload", post(api::reload))
        .route(
            "/api/v1/listeners/{listener}/bans",
            get(api::bans).post(api::add_ban),
        )
        .route(
            "/api/v1/listeners/{listener}/bans/{ip}",
            axum::routing::delete(api::remove_ban),
        )
        .route(
            "/api/v1/listeners/{listener}/access",
            get(api::access).put(api::set_access),
        )
        // Admin calls are small: bound what a client may send.
        .layer(axum::extract::DefaultBodyLimit::max(64 * 1024))
        .with_state(shared)
}

/// Serves the admin API on `listener` until `stop` fires.
pub async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    let app = router(shared).layer(axum::middleware::from_fn(call_timeout));
    // The admin port is no softer a target than the listeners: bounded connections, request heads
    // within 10 s, idle keep-alive connections closed, and every call answered within 30 s.
    let slots = Arc::new(tokio::sync::Semaphore::new(ADMIN_MAX_CONNECTIONS));
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(ADMIN_HEADER_TIMEOUT)
        .max_buf_size(64 * 1024);
    let builder = Arc::new(builder);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(admin = ?addr, error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue; // full: the connection is closed
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(permit);
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), graceful.shutdown()).await;
}

/// Open admin connections at most.
const ADMIN_MAX_CONNECTIONS: usize = 256;
/// A request head to the admin port must arrive within this.
const ADMIN_HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// An admin call is answered within this.
const ADMIN_CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

async fn call_timeout(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    match tokio::time::timeout(ADMIN_CALL_TIMEOUT, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "the admin call timed out\n",
        )
            .into_response(),
    }
}

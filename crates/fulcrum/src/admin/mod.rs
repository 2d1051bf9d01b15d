//! The admin side, on `admin.bind`: the REST API, Prometheus metrics, liveness/readiness probes and
//! the live dashboard. It reads the same atomics the request path writes; it never takes a lock the
//! request path takes.

mod api;
mod metrics;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::routing::get;
use axum::Router;
use tokio_util::sync::CancellationToken;

use crate::runtime::Shared;

const DASHBOARD: &str = include_str!("dashboard.html");

/// The admin router over the running system's shared state.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/", get(|| async { axum::response::Html(DASHBOARD) }))
        .route("/healthz", get(api::healthz))
        .route("/readyz", get(api::readyz))
        .route("/metrics", get(metrics::metrics))
        .route("/api/v1/status", get(api::status))
        .route("/api/v1/pools", get(api::pools))
        .with_state(shared)
}

/// Serves the admin API on `listener` until `stop` fires.
pub async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    let app = router(shared);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
    {
        tracing::error!(admin = ?addr, error = %e, "admin server failed");
    }
}

//! JSON endpoints of the admin API.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Serialize;

use crate::pool::Pool;
use crate::runtime::Shared;

pub async fn healthz() -> &'static str {
    "ok\n"
}

/// 200 while serving, 503 once draining (so an outer balancer stops sending new clients).
pub async fn readyz(State(shared): State<Arc<Shared>>) -> (StatusCode, &'static str) {
    if shared.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n")
    } else {
        (StatusCode::OK, "ready\n")
    }
}

#[derive(Serialize)]
pub struct StatusView {
    version: &'static str,
    uptime_seconds: f64,
    draining: bool,
    listeners: Vec<ListenerView>,
}

#[derive(Serialize)]
struct ListenerView {
    name: String,
    bind: String,
    protocol: &'static str,
    pool: String,
    active_connections: i64,
    connections_total: u64,
    requests_total: u64,
}

pub async fn status(State(shared): State<Arc<Shared>>) -> Json<StatusView> {
    let listeners = shared
        .listeners
        .iter()
        .map(|l| ListenerView {
            name: l.name.clone(),
            bind: l.bound.to_string(),
            protocol: l.protocol,
            pool: l.http.router.default.pool.name.clone(),
            active_connections: l
                .http
                .stats
                .active_connections
                .load(std::sync::atomic::Ordering::Relaxed),
            connections_total: l
                .http
                .stats
                .connections_total
                .load(std::sync::atomic::Ordering::Relaxed),
            requests_total: l.http.stats.requests_total(),
        })
        .collect();
    Json(StatusView {
        version: env!("CARGO_PKG_VERSION"),
        uptime_seconds: shared.started.elapsed().as_secs_f64(),
        draining: shared.is_draining(),
        listeners,
    })
}

#[derive(Serialize)]
pub struct PoolsView {
    pools: Vec<PoolView>,
}

#[derive(Serialize)]
struct PoolView {
    name: String,
    algorithm: &'static str,
    servers: Vec<ServerView>,
}

#[derive(Serialize)]
struct ServerView {
    name: String,
    address: String,
    weight: u32,
    state: &'static str,
    active_connections: i64,
    requests_total: u64,
    failures_total: u64,
    latency_ewma_ms: f64,
    /// The last active health check, if checks are configured.
    last_check: Option<crate::health::CheckResult>,
    /// The last up/down change and why (checks or passive ejection).
    last_change: Option<crate::health::StateChange>,
    /// Passive detection holds the server out right now.
    ejected: bool,
}

fn pool_view(pool: &Pool) -> PoolView {
    let snapshot = pool.snapshot_full();
    PoolView {
        name: pool.name.clone(),
        algorithm: pool.algorithm.as_str(),
        servers: snapshot
            .servers
            .iter()
            .map(|s| ServerView {
                name: s.name.clone(),
                address: s.address.to_string(),
                weight: s.weight,
                state: s.effective_state().as_str(),
                active_connections: s.stats.in_flight(),
                requests_total: s.stats.requests_total(),
                failures_total: s.stats.failures_total(),
                latency_ewma_ms: (s.stats.latency_ewma_ms() * 1000.0).round() / 1000.0,
                last_check: s.health.last_check(),
                last_change: s.health.last_change(),
                ejected: s.health.is_ejected(),
            })
            .collect(),
    }
}

pub async fn pools(State(shared): State<Arc<Shared>>) -> Json<PoolsView> {
    Json(PoolsView {
        pools: shared.pools.iter().map(|p| pool_view(p)).collect(),
    })
}

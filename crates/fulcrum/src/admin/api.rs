//! JSON endpoints of the admin API.
//!
//! Reads answer from the published state; changes are sent to the control task
//! ([`crate::control`]), which applies them one at a time. Every mutating call needs the bearer token
//! when `admin.token` is set (compared in constant time) and, for `POST` and `PUT`, a JSON body
//! (`Content-Type: application/json`): a web page cannot send one to another origin without the
//! browser asking first, so no cross-site form can change the balancer. Errors are JSON
//! `{"error": "...", "field": "..."}` naming the field at fault.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::config::ServerConfig;
use crate::control::{AdminState, Command, ControlError};
use crate::pool::{Pool, Server, ServerState};
use crate::runtime::{PoolEntry, Shared};

/// An error answer: status and `{"error", "field"}`.
#[derive(Debug)]
pub struct ApiError(StatusCode, ControlError);

impl ApiError {
    pub(super) fn new(status: StatusCode, error: impl Into<String>, field: Option<&str>) -> Self {
        ApiError(
            status,
            ControlError {
                status: status.as_u16(),
                error: error.into(),
                field: field.map(str::to_owned),
            },
        )
    }

    fn bad(error: impl Into<String>, field: &str) -> Self {
        Self::new(StatusCode::BAD_REQUEST, error, Some(field))
    }
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> Self {
        let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        ApiError(status, e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.0, Json(self.1)).into_response();
        if self.0 == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer realm=\"fulcrum\""),
            );
        }
        resp
    }
}

/// Checks the bearer token, when one is configured, in constant time.
fn authorize(shared: &Shared, headers: &HeaderMap) -> Result<(), ApiError> {
    let token = shared.admin_token.load();
    let Some(token) = token.as_ref() else {
        return Ok(());
    };
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(given) = given else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "this call needs `Authorization: Bearer <admin.token>`",
            Some("authorization"),
        ));
    };
    use subtle::ConstantTimeEq;
    if bool::from(given.as_bytes().ct_eq(token.as_bytes())) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "wrong token",
            Some("authorization"),
        ))
    }
}

/// A mutating call's checks: the token, then a JSON body (parsed; an empty body is `{}`).
fn mutating(
    shared: &Shared,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Map<String, Value>, ApiError> {
    authorize(shared, headers)?;
    let json = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
        });
    if !json {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send a JSON body with `Content-Type: application/json`",
            Some("content-type"),
        ));
    }
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "expected a JSON object",
            None,
        )),
        Err(e) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("invalid JSON: {e}"),
            None,
        )),
    }
}

/// Refuses fields other than `allowed`.
fn only(map: &Map<String, Value>, allowed: &[&str]) -> Result<(), ApiError> {
    match map.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(ApiError::bad(
            format!("unknown field (expected one of: {})", allowed.join(", ")),
            k,
        )),
        None => Ok(()),
    }
}

fn weight_field(map: &Map<String, Value>) -> Result<Option<u32>, ApiError> {
    match map.get("weight") {
        None => Ok(None),
        Some(v) => match v.as_u64() {
            Some(w) if (1..=1_000_000).contains(&w) => Ok(Some(w as u32)),
            _ => Err(ApiError::bad(
                "must be an integer from 1 to 1000000",
                "weight",
            )),
        },
    }
}

fn string_field<'a>(map: &'a Map<String, Value>, key: &str) -> Result<Option<&'a str>, ApiError> {
    match map.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(ApiError::bad("must be a string", key)),
    }
}

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

/// The VRRP group as this instance sees it (`[ha]`); `{"enabled": false}` without one.
pub async fn ha(State(shared): State<Arc<Shared>>) -> Json<serde_json::Value> {
    use std::sync::atomic::Ordering::Relaxed;
    let Some(ha) = &shared.ha else {
        return Json(serde_json::json!({ "enabled": false, "state": "standalone" }));
    };
    let mut view = serde_json::to_value(ha.snapshot()).unwrap_or_default();
    if let Some(map) = view.as_object_mut() {
        map.insert("enabled".into(), true.into());
        map.insert("adverts_sent".into(), ha.adverts_sent.load(Relaxed).into());
        map.insert(
            "adverts_received".into(),
            ha.adverts_received.load(Relaxed).into(),
        );
        map.insert(
            "adverts_rejected".into(),
            ha.adverts_rejected.load(Relaxed).into(),
        );
    }
    Json(view)
}

#[derive(Serialize)]
pub struct StatusView {
    version: &'static str,
    uptime_seconds: f64,
    draining: bool,
    reloads_ok: u64,
    reloads_failed: u64,
    /// The VRRP role (`standalone` without `[ha]`), the virtual IP and whether this instance holds it.
    ha: HaSummary,
    listeners: Vec<ListenerView>,
}

#[derive(Serialize)]
pub struct HaSummary {
    state: &'static str,
    virtual_ip: Option<String>,
    holding: bool,
}

#[derive(Serialize)]
pub struct ListenerView {
    name: String,
    bind: String,
    protocol: &'static str,
    pool: String,
    active_connections: i64,
    connections_total: u64,
    requests_total: u64,
    max_connections: usize,
}

pub async fn status(State(shared): State<Arc<Shared>>) -> Json<StatusView> {
    let state = shared.state();
    let listeners = state
        .listeners
        .iter()
        .map(|l| {
            use std::sync::atomic::Ordering::Relaxed;
            // A udp listener's connections are its client flows.
            let (active, total) = match &l.handler {
                crate::runtime::Handler::Udp(u, _) => (
                    u.stats.flows_active.load(Relaxed),
                    u.stats.flows_total.load(Relaxed),
                ),
                _ => (
                    l.stats().active_connections.load(Relaxed),
                    l.stats().connections_total.load(Relaxed),
                ),
            };
            ListenerView {
                name: l.name.clone(),
                bind: l.bound.to_string(),
                protocol: l.protocol,
                pool: l.pool.clone(),
                active_connections: active,
                connections_total: total,
                requests_total: l.stats().requests_total(),
                max_connections: l.slots.limit(),
            }
        })
        .collect();
    let ha = match &shared.ha {
        Some(ha) => {
            let snap = ha.snapshot();
            HaSummary {
                state: snap.state,
                virtual_ip: Some(snap.virtual_ip),
                holding: snap.holding,
            }
        }
        None => HaSummary {
            state: "standalone",
            virtual_ip: None,
            holding: false,
        },
    };
    Json(StatusView {
        version: env!("CARGO_PKG_VERSION"),
        ha,
        uptime_seconds: shared.started.elapsed().as_secs_f64(),
        draining: shared.is_draining(),
        reloads_ok: shared.reloads.ok.load(std::sync::atomic::Ordering::Relaxed),
        reloads_failed: shared
            .reloads
            .failed
            .load(std::sync::atomic::Ordering::Relaxed),
        listeners,
    })
}

#[derive(Serialize)]
pub struct PoolsView {
    pools: Vec<PoolView>,
}

#[derive(Serialize)]
pub struct PoolView {
    name: String,
    algorithm: &'static str,
    /// Servers that may take new requests now.
    available_servers: usize,
    /// Requests in flight on the pool.
    in_flight: i64,
    /// In flight per available server, against `saturation_target` (1.0 = at target); null when no
    /// server is available while requests wait.
    saturation: Option<f64>,
    saturation_target: u32,
    /// Session persistence, when the pool has it: how clients are recognised and the size of the
    /// stick table.
    sticky: Option<StickyView>,
    /// The HTTP caches in front of the pool (its own and its routes'), summed; absent without one.
    #[serde(skip_serializing_if = "Option::is_none")]
    cache: Option<CacheView>,
    servers: Vec<ServerView>,
}

#[derive(Serialize)]
pub struct CacheView {
    hits: u64,
    misses: u64,
    stale: u64,
    bypass: u64,
    stores: u64,
    evictions: u64,
    entries: usize,
    bytes: u64,
    /// (hits + stale) / (hits + stale + misses); null before the first cacheable request.
    hit_ratio: Option<f64>,
}

fn cache_view(caches: &[Arc<crate::cache::Cache>]) -> Option<CacheView> {
    use std::sync::atomic::Ordering::Relaxed;
    if caches.is_empty() {
        return None;
    }
    let sum = |f: &dyn Fn(&crate::cache::Cache) -> u64| caches.iter().map(|c| f(c)).sum::<u64>();
    let hits = sum(&|c| c.stats.hits.load(Relaxed));
    let misses = sum(&|c| c.stats.misses.load(Relaxed));
    let stale = sum(&|c| c.stats.stale.load(Relaxed));
    let answered = hits + stale + misses;
    Some(CacheView {
        hits,
        misses,
        stale,
        bypass: sum(&|c| c.stats.bypass.load(Relaxed)),
        stores: sum(&|c| c.stats.stores.load(Relaxed)),
        evictions: sum(&|c| c.evictions()),
        entries: caches.iter().map(|c| c.entries()).sum(),
        bytes: sum(&|c| c.bytes()),
        hit_ratio: (answered > 0)
            .then(|| ((hits + stale) as f64 / answered as f64 * 1000.0).round() / 1000.0),
    })
}

#[derive(Serialize)]
pub struct StickyView {
    /// `cookie`, `app_cookie` or `source_ip`.
    kind: &'static str,
    /// Entries in this instance's stick table (with a Redis store, its local copy); always 0 for
    /// `cookie`, whose cookie names the server itself.
    entries: usize,
    /// Bytes those entries take, as counted against the table's bound.
    bytes: u64,
}

/// A server's response-time histogram since it joined: `counts[i]` responses took at most
/// `le_ms[i]`; the last count, one more than there are bounds, is every response (the `+Inf` bucket).
/// Two readings subtracted give the histogram of the time between them.
#[derive(Serialize)]
pub struct LatencyBuckets {
    le_ms: Vec<f64>,
    counts: Vec<u64>,
}

fn latency_buckets(s: &Server) -> LatencyBuckets {
    let (buckets, _, _) = s.stats.latency_histogram();
    LatencyBuckets {
        le_ms: crate::pool::LATENCY_BUCKETS
            .iter()
            .map(|b| (b * 1e6).round() / 1e3)
            .collect(),
        counts: buckets.iter().map(|(_, c)| *c).collect(),
    }
}

#[derive(Serialize)]
pub struct ServerView {
    name: String,
    address: String,
    weight: u32,
    state: &'static str,
    /// Where the server came from: `config`, `api` or `dns`.
    source: &'static str,
    /// Draining before its removal.
    removing: bool,
    active_connections: i64,
    requests_total: u64,
    failures_total: u64,
    latency_ewma_ms: f64,
    /// Cumulative response-time histogram, for percentiles over any window.
    latency_buckets: LatencyBuckets,
    /// The last active health check, if checks are configured.
    last_check: Option<crate::health::CheckResult>,
    /// The last active health checks, oldest first (at most [`crate::health::HISTORY_LEN`]).
    check_history: Vec<crate::health::CheckMark>,
    /// The last up/down change and why (checks or passive ejection).
    last_change: Option<crate::health::StateChange>,
    /// Passive detection holds the server out right now.
    ejected: bool,
}

fn server_view(s: &Server) -> ServerView {
    ServerView {
        name: s.name.clone(),
        address: s.address.to_string(),
        weight: s.weight(),
        state: s.effective_state().as_str(),
        source: s.source.as_str(),
        removing: s.is_removing(),
        active_connections: s.stats.in_flight(),
        requests_total: s.stats.requests_total(),
        failures_total: s.stats.failures_total(),
        latency_ewma_ms: (s.stats.latency_ewma_ms() * 1000.0).round() / 1000.0,
        latency_buckets: latency_buckets(s),
        last_check: s.health.last_check(),
        check_history: s.health.check_history(),
        last_change: s.health.last_change(),
        ejected: s.health.is_ejected(),
    }
}

fn pool_view(entry: &PoolEntry) -> PoolView {
    let pool = &entry.pool;
    let snapshot = pool.snapshot_full();
    let target = pool.config().saturation_target;
    let saturation = snapshot.saturation(target);
    PoolView {
        name: pool.name.clone(),
        algorithm: snapshot.algorithm().as_str(),
        available_servers: snapshot.servers.iter().filter(|s| s.is_available()).count(),
        in_flight: snapshot.servers.iter().map(|s| s.stats.in_flight()).sum(),
        saturation: saturation
            .is_finite()
            .then(|| (saturation * 1000.0).round() / 1000.0),
        saturation_target: target,
        sticky: entry.sticky.as_ref().map(|st| StickyView {
            kind: st.kind().as_str(),
            entries: st.table().len(),
            bytes: st.table().bytes(),
        }),
        cache: cache_view(&entry.caches),
        servers: snapshot.servers.iter().map(|s| server_view(s)).collect(),
    }
}

pub async fn pools(State(shared): State<Arc<Shared>>) -> Json<PoolsView> {
    Json(PoolsView {
        pools: shared.state().pools.iter().map(pool_view).collect(),
    })
}

fn no_pool(name: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no pool named `{name}`"),
        Some("pool"),
    )
}

fn find_pool(shared: &Shared, name: &str) -> Result<Arc<Pool>, ApiError> {
    shared.pool(name).ok_or_else(|| no_pool(name))
}

/// `GET /api/v1/pools/{pool}`.
pub async fn pool(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
) -> Result<Json<PoolView>, ApiError> {
    let state = shared.state();
    let entry = state.pool(&name).ok_or_else(|| no_pool(&name))?;
    Ok(Json(pool_view(entry)))
}

/// What `DELETE /api/v1/pools/{pool}/cache` may name: one path, a prefix, or (neither) everything.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PurgeQuery {
    path: Option<String>,
    prefix: Option<String>,
}

/// The answer to a purge.
#[derive(Debug, Serialize)]
pub struct Purged {
    /// Responses removed.
    pub purged: usize,
}

/// `DELETE /api/v1/pools/{pool}/cache[?path=/x | ?prefix=/x]`: removes cached responses from the
/// pool's caches (its own and its routes'); answers how many.
pub async fn purge_cache(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    query: Result<axum::extract::Query<PurgeQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Result<Json<Purged>, ApiError> {
    authorize(&shared, &headers)?;
    let axum::extract::Query(query) = query.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "{}: expected `?path=/x`, `?prefix=/x` or nothing",
                e.body_text()
            ),
            Some("query"),
        )
    })?;
    let what = match (&query.path, &query.prefix) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad("give `path` or `prefix`, not both", "prefix"))
        }
        (Some(p), None) if p.starts_with('/') => crate::cache::Purge::Path(p),
        (None, Some(p)) if p.starts_with('/') => crate::cache::Purge::Prefix(p),
        (Some(_), None) => return Err(ApiError::bad("must start with `/`", "path")),
        (None, Some(_)) => return Err(ApiError::bad("must start with `/`", "prefix")),
        (None, None) => crate::cache::Purge::All,
    };
    let state = shared.state();
    let entry = state.pool(&name).ok_or_else(|| no_pool(&name))?;
    if entry.caches.is_empty() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("pool `{name}` has no cache"),
            Some("pool"),
        ));
    }
    let purged = entry.caches.iter().map(|c| c.purge(what)).sum();
    Ok(Json(Purged { purged }))
}

/// `GET /api/v1/pools/{pool}/servers/{name}`.
pub async fn server(
    State(shared): State<Arc<Shared>>,
    Path((pool, name)): Path<(String, String)>,
) -> Result<Json<ServerView>, ApiError> {
    let p = find_pool(&shared, &pool)?;
    let s = p.server(&name).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("pool `{pool}` has no server `{name}`"),
            Some("name"),
        )
    })?;
    Ok(Json(server_view(&s)))
}

/// `POST /api/v1/pools/{pool}/servers` with `{"address", "weight", "name"}`: 201 and the server.
pub async fn add_server(
    State(shared): State<Arc<Shared>>,
    Path(pool): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<ServerView>), ApiError> {
    let map = mutating(&shared, &headers, &body)?;
    only(&map, &["address", "weight", "name"])?;
    let address_text = string_field(&map, "address")?
        .ok_or_else(|| ApiError::bad("required, e.g. \"127.0.0.1:9004\"", "address"))?;
    let address: SocketAddr = address_text.parse().map_err(|_| {
        ApiError::bad(
            format!("invalid address {address_text:?}: expected IP:PORT, e.g. \"127.0.0.1:9004\""),
            "address",
        )
    })?;
    if address.port() == 0 {
        return Err(ApiError::bad("port 0 is not a server's port", "address"));
    }
    let weight = weight_field(&map)?.unwrap_or(1);
    let name = match string_field(&map, "name")? {
        Some(n) => {
            // Names appear in URLs and in metric labels.
            let bad = |c: char| c.is_control() || c.is_whitespace() || "/?#%\"\\".contains(c);
            if n.is_empty() || n.len() > 200 || n.chars().any(bad) {
                return Err(ApiError::bad(
                    "must be 1 to 200 characters, without spaces, control characters, `/`, `?`, `#`, `%`, `\"` or `\\`",
                    "name",
                ));
            }
            n.to_owned()
        }
        None => address.to_string(),
    };
    let server = ServerConfig {
        name,
        address,
        weight,
    };
    let added = shared
        .control(|reply| Command::AddServer {
            pool,
            server,
            reply,
        })
        .await?;
    Ok((StatusCode::CREATED, Json(server_view(&added))))
}

#[derive(Serialize)]
pub struct Removal {
    name: String,
    state: &'static str,
    /// The server leaves the pool when its requests finish, at the latest after this.
    deregistration_delay_ms: u64,
}

/// `DELETE /api/v1/pools/{pool}/servers/{name}`: drain, then remove (202).
pub async fn remove_server(
    State(shared): State<Arc<Shared>>,
    Path((pool, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<(StatusCode, Json<Removal>), ApiError> {
    authorize(&shared, &headers)?;
    let delay = shared
        .control(|reply| Command::RemoveServer {
            pool,
            name: name.clone(),
            reply,
        })
        .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(Removal {
            name,
            state: ServerState::Draining.as_str(),
            deregistration_delay_ms: delay.as_millis() as u64,
        }),
    ))
}

/// `PUT /api/v1/pools/{pool}/servers/{name}/state` with `{"state": "ready" | "drain" | "maint"}`.
pub async fn set_state(
    State(shared): State<Arc<Shared>>,
    Path((pool, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<ServerView>, ApiError> {
    let map = mutating(&shared, &headers, &body)?;
    only(&map, &["state"])?;
    let state = match string_field(&map, "state")? {
        Some("ready") => AdminState::Ready,
        Some("drain") => AdminState::Drain,
        Some("maint") => AdminState::Maint,
        Some(other) => {
            return Err(ApiError::bad(
                format!("unknown state {other:?}: expected ready, drain or maint"),
                "state",
            ))
        }
        None => return Err(ApiError::bad("required: ready, drain or maint", "state")),
    };
    let server = shared
        .control(|reply| Command::SetState {
            pool,
            name,
            state,
            reply,
        })
        .await?;
    Ok(Json(server_view(&server)))
}

/// `PUT /api/v1/pools/{pool}/servers/{name}/weight` with `{"weight": N}`.
pub async fn set_weight(
    State(shared): State<Arc<Shared>>,
    Path((pool, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<ServerView>, ApiError> {
    let map = mutating(&shared, &headers, &body)?;
    only(&map, &["weight"])?;
    let weight = weight_field(&map)?
        .ok_or_else(|| ApiError::bad("required: an integer from 1 to 1000000", "weight"))?;
    let server = shared
        .control(|reply| Command::SetWeight {
            pool,
            name,
            weight,
            reply,
        })
        .await?;
    Ok(Json(server_view(&server)))
}

/// `POST /api/v1/reload`: reload the configuration file; 400 with the error when it is invalid.
pub async fn reload(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<crate::control::ReloadReport>, ApiError> {
    let map = mutating(&shared, &headers, &body)?;
    only(&map, &[])?;
    let report = shared.control(|reply| Command::Reload { reply }).await?;
    Ok(Json(report))
}

/// The access lists and bans of listener `l` (a udp listener has none: 400).
fn filter_of(
    l: &crate::runtime::ListenerInfo,
) -> Result<arc_swap::Guard<Arc<crate::http::filter::ListenerFilter>>, ApiError> {
    l.filter().map(|f| f.load()).ok_or_else(|| {
        ApiError::bad(
            "this listener is udp: it has no access lists or bans",
            "listener",
        )
    })
}

fn find_listener(shared: &Shared, name: &str) -> Result<crate::runtime::ListenerInfo, ApiError> {
    shared
        .state()
        .listeners
        .iter()
        .find(|l| l.name == name)
        .cloned()
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!("no listener named `{name}`"),
                Some("listener"),
            )
        })
}

#[derive(Serialize)]
pub struct BansView {
    listener: String,
    bans: Vec<crate::filter::BanEntry>,
}

/// `GET /api/v1/listeners/{listener}/bans`.
pub async fn bans(
    State(shared): State<Arc<Shared>>,
    Path(listener): Path<String>,
) -> Result<Json<BansView>, ApiError> {
    let l = find_listener(&shared, &listener)?;
    let bans = filter_of(&l)?.bans.list();
    Ok(Json(BansView { listener, bans }))
}

/// `POST /api/v1/listeners/{listener}/bans` with `{"ip", "duration": "10m", "note"}`: 201.
pub async fn add_ban(
    State(shared): State<Arc<Shared>>,
    Path(listener): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<BansView>), ApiError> {
    let map = mutating(&shared, &headers, &body)?;
    only(&map, &["ip", "duration", "note"])?;
    let l = find_listener(&shared, &listener)?;
    let ip: std::net::IpAddr = string_field(&map, "ip")?
        .ok_or_else(|| ApiError::bad("required, e.g. \"192.0.2.7\"", "ip"))?
        .parse()
        .map_err(|_| ApiError::bad("not an IP address", "ip"))?;
    let duration = match string_field(&map, "duration")? {
        None => std::time::Duration::from_secs(600),
        Some(d) => humantime::parse_duration(d)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| ApiError::bad("expected a duration such as \"10m\"", "duration"))?,
    };
    let note = string_field(&map, "note")?.unwrap_or("banned through the admin API");
    let filter = filter_of(&l)?;
    filter.bans.ban(
        ip,
        duration,
        crate::filter::BanReason::Manual(note.chars().take(200).collect()),
    );
    tracing::warn!(listener = %listener, client = %ip, ?duration, "client banned through the admin API");
    Ok((
        StatusCode::CREATED,
        Json(BansView {
            listener,
            bans: filter.bans.list(),
        }),
    ))
}

/// `DELETE /api/v1/listeners/{listener}/bans/{ip}`.
pub async fn remove_ban(
    State(shared): State<Arc<Shared>>,
    Path((listener, ip)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<BansView>, ApiError> {
    authorize(&shared, &headers)?;
    let l = find_listener(&shared, &listener)?;
    let ip: std::net::IpAddr = ip
        .parse()
        .map_err(|_| ApiError::bad("not an IP address", "ip"))?;
    let filter = filter_of(&l)?;
    if !filter.bans.unban(ip) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("{ip} is not banned"),
            Some("ip"),
        ));
    }
    tracing::info!(listener = %listener, client = %ip, "client unbanned through the admin API");
    Ok(Json(BansView {
        listener,
        bans: filter.bans.list(),
    }))
}

#[derive(Serialize)]
pub struct AccessView {
    listener: String,
    /// Only these addresses may connect (absent: any).
    allow: Option<Vec<String>>,
    /// These addresses may not.
    deny: Vec<String>,
}

fn access_view(listener: String, access: &crate::filter::AccessList) -> AccessView {
    AccessView {
        listener,
        allow: access
            .allow
            .as_ref()
            .map(|a| a.entries().iter().map(|n| n.to_string()).collect()),
        deny: access
            .deny
            .entries()
            .iter()
            .map(|n| n.to_string())
            .collect(),
    }
}

/// `GET /api/v1/listeners/{listener}/access`.
pub async fn access(
    State(shared): State<Arc<Shared>>,
    Path(listener): Path<String>,
) -> Result<Json<AccessView>, ApiError> {
    let l = find_listener(&shared, &listener)?;
    let view = access_view(listener, &filter_of(&l)?.filter.access);
    Ok(Json(view))
}

/// `PUT /api/v1/listeners/{listener}/access` with `{"allow": [...] | null, "deny": [...]}`: replaces
/// the listener's lists until the next reload.
pub async fn set_access(
    State(shared): State<Arc<Shared>>,
    Path(listener): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<AccessView>, ApiError> {
    let map = mutating(&shared, &headers, &body)?;
    only(&map, &["allow", "deny"])?;
    let list = |key: &str| -> Result<Option<Vec<String>>, ApiError> {
        match map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .map(Some)
                .ok_or_else(|| ApiError::bad("expected a list of CIDR strings", key)),
            Some(_) => Err(ApiError::bad("expected a list of CIDR strings", key)),
        }
    };
    let allow = list("allow")?;
    let deny = list("deny")?.unwrap_or_default();
    let access = crate::filter::AccessList::parse(allow.as_deref(), &deny).map_err(|e| {
        let field = if allow.is_some() && e.to_string().contains("allow") {
            "allow"
        } else {
            "deny"
        };
        ApiError::bad(e.to_string(), field)
    })?;
    let access = shared
        .control(|reply| Command::SetAccess {
            listener: listener.clone(),
            access,
            reply,
        })
        .await?;
    Ok(Json(access_view(listener, &access)))
}

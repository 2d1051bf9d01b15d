//! `GET /api/v1/pools/{pool}/explain`: where a request would go, and why, without sending one.
//!
//! The query describes the request: `client` (an IP, or IP:port; default 127.0.0.1:0), `path`
//! (default `/`), `header` (`Name: value`, repeatable), `cookie` (`name=value`, repeatable), or `key`
//! (the value of the pool's hash key directly: an IP for `source_ip`, IP:port for `source_ip_port`, a
//! path for `uri`, the header's or cookie's value). The answer runs the pool's own stick table and
//! picker over that request, exactly as the request path does: the sticky server when the client
//! has one that may take it, else the algorithm's first candidate that is available. For algorithms
//! that keep a turn (round robin, weighted round robin) the explanation takes the turn, as one
//! request would.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Serialize;

use super::api::ApiError;
use crate::balance::{address_key, hash_key};
use crate::config::HashKey;
use crate::runtime::Shared;

/// One candidate server and its score.
#[derive(Debug, Serialize)]
pub struct CandidateView {
    /// The server's name.
    pub name: String,
    /// `up`, `down`, `draining` or `maint`.
    pub state: &'static str,
    /// May take a request now (up, not draining, under its connection limit).
    pub available: bool,
    /// Requests in flight on it.
    pub in_flight: i64,
    /// Its peak-EWMA response time, in milliseconds.
    pub ewma_ms: f64,
    /// Its weight.
    pub weight: u32,
}

/// What the stick table says about the client.
#[derive(Debug, Serialize)]
pub struct StickyView {
    /// `cookie`, `app_cookie` or `source_ip`.
    pub kind: &'static str,
    /// The client's key was known (a valid cookie, a stick-table entry).
    pub known: bool,
    /// The server it sticks to, when that server may take it.
    pub server: Option<String>,
}

/// The answer.
#[derive(Debug, Serialize)]
pub struct Explanation {
    /// The pool.
    pub pool: String,
    /// Its algorithm.
    pub algorithm: &'static str,
    /// The pool's hash key (`source_ip`, `uri`, `header:x-user`, …), when it hashes.
    pub hash_key: Option<String>,
    /// The request's hash key as a hex number (none when the pool does not hash or the request lacks
    /// the key: the fallback algorithm picks).
    pub key: Option<String>,
    /// The stick table's view (sticky pools).
    pub sticky: Option<StickyView>,
    /// Where the request would go (none: no server could take it; the client would get 503).
    pub server: Option<String>,
    /// Why, in words.
    pub reason: String,
    /// Every server in the order the algorithm offered them, with their scores.
    pub candidates: Vec<CandidateView>,
}

fn bad(message: String, field: &str) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, message, Some(field))
}

/// `GET /api/v1/pools/{pool}/explain?client=…&path=…&header=…&cookie=…&key=…`.
pub async fn explain(
    State(shared): State<Arc<Shared>>,
    Path(pool): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Json<Explanation>, ApiError> {
    let state = shared.state();
    let entry = state.pool(&pool).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no pool named `{pool}`"),
            Some("pool"),
        )
    })?;
    let mut client: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut path = "/".to_owned();
    let mut headers = http::HeaderMap::new();
    let mut cookies = Vec::new();
    let mut raw_key = None;
    for (name, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match &*name {
            "client" => {
                client = value
                    .parse::<SocketAddr>()
                    .or_else(|_| value.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 0)))
                    .map_err(|_| {
                        bad(
                            format!("client {value:?}: expected IP or IP:port"),
                            "client",
                        )
                    })?;
            }
            "path" if value.starts_with('/') => path = value.into_owned(),
            "path" => return Err(bad(format!("path {value:?} must start with /"), "path")),
            "header" => {
                let (n, v) = value.split_once(':').ok_or_else(|| {
                    bad(
                        format!("header {value:?}: expected `Name: value`"),
                        "header",
                    )
                })?;
                let n = http::HeaderName::try_from(n.trim())
                    .map_err(|_| bad(format!("header name {n:?}"), "header"))?;
                let v = http::HeaderValue::from_str(v.trim())
                    .map_err(|_| bad(format!("header value {v:?}"), "header"))?;
                headers.append(n, v);
            }
            "cookie" => cookies.push(value.into_owned()),
            "key" => raw_key = Some(value.into_owned()),
            other => return Err(bad(format!("unknown parameter `{other}`"), other)),
        }
    }
    if !cookies.is_empty() {
        let joined = cookies.join("; ");
        let v = http::HeaderValue::from_str(&joined)
            .map_err(|_| bad(format!("cookie {joined:?}"), "cookie"))?;
        headers.insert(http::header::COOKIE, v);
    }
    let mut request = http::Request::builder()
        .uri(&path)
        .body(())
        .map_err(|e| bad(format!("path {path:?}: {e}"), "path"))?;
    *request.headers_mut() = headers;

    let snapshot = entry.pool.snapshot_full();
    let hash = snapshot.settings.hash_key.as_ref();
    let key = match (hash, raw_key) {
        (None, _) => None,
        (Some(kind), Some(raw)) => Some(key_of_value(kind, &raw)?),
        (Some(kind), None) => crate::http::proxy::request_key(
            kind,
            &request,
            &crate::http::proxy::Client::new(client),
        ),
    };
    let sticky = match &entry.sticky {
        Some(s) => Some((s, s.lookup(request.headers(), client.ip(), &snapshot).await)),
        None => None,
    };
    let mut candidates = snapshot.pick(key);
    let offered: Vec<usize> = candidates.clone().take(snapshot.servers.len()).collect();
    let sticky_server = sticky
        .as_ref()
        .and_then(|(_, c)| c.server)
        .map(|i| snapshot.servers[i].clone())
        .filter(|s| s.is_available() && !snapshot.at_limit(s));
    let algorithm = snapshot.algorithm().as_str();
    let (server, reason) = match &sticky_server {
        Some(s) => (
            Some(s.name.clone()),
            format!(
                "sticky: the client's {} names it",
                entry.sticky.as_ref().map_or("key", |s| s.kind().as_str())
            ),
        ),
        None => match snapshot.next_available(&mut candidates) {
            Some(s) => {
                let why = match (key, offered.first()) {
                    (Some(k), Some(&owner)) if Arc::ptr_eq(&snapshot.servers[owner], s) => {
                        format!("{algorithm}: it owns key {k:016x}")
                    }
                    (Some(k), _) => format!(
                        "{algorithm}: the owner of key {k:016x} cannot take it; the next candidate can"
                    ),
                    (None, Some(&first)) if Arc::ptr_eq(&snapshot.servers[first], s) => {
                        format!("{algorithm}: first candidate")
                    }
                    (None, _) => format!(
                        "{algorithm}: the first candidate cannot take it; the next available one can"
                    ),
                };
                let why = match &sticky {
                    Some((_, c)) if c.known() => {
                        format!("{why} (its sticky server cannot take it)")
                    }
                    Some(_) => format!("{why} (new sticky client)"),
                    None => why,
                };
                (Some(s.name.clone()), why)
            }
            None => (None, "no server can take a request".to_owned()),
        },
    };
    Ok(Json(Explanation {
        pool: entry.pool.name.clone(),
        algorithm,
        hash_key: hash.map(hash_key_name),
        key: key.map(|k| format!("{k:016x}")),
        sticky: sticky.as_ref().map(|(s, c)| StickyView {
            kind: s.kind().as_str(),
            known: c.known(),
            server: c.server.map(|i| snapshot.servers[i].name.clone()),
        }),
        server,
        reason,
        candidates: offered
            .iter()
            .map(|&i| {
                let s = &snapshot.servers[i];
                CandidateView {
                    name: s.name.clone(),
                    state: s.effective_state().as_str(),
                    available: s.is_available() && !snapshot.at_limit(s),
                    in_flight: s.stats.in_flight(),
                    ewma_ms: s.stats.latency_estimate_ns() as f64 / 1e6,
                    weight: s.weight(),
                }
            })
            .collect(),
    }))
}

fn hash_key_name(k: &HashKey) -> String {
    match k {
        HashKey::SourceIp => "source_ip".into(),
        HashKey::SourceIpPort => "source_ip_port".into(),
        HashKey::Uri => "uri".into(),
        HashKey::Header(h) => format!("header:{h}"),
        HashKey::Cookie(c) => format!("cookie:{c}"),
    }
}

/// The hash of `raw`, read as the value of the pool's hash key.
fn key_of_value(kind: &HashKey, raw: &str) -> Result<u64, ApiError> {
    Ok(match kind {
        HashKey::SourceIp => {
            let ip: IpAddr = raw.parse().map_err(|_| {
                bad(
                    format!("key {raw:?}: expected an IP (hash_key = source_ip)"),
                    "key",
                )
            })?;
            address_key(SocketAddr::new(ip, 0), false)
        }
        HashKey::SourceIpPort => {
            let addr: SocketAddr = raw.parse().map_err(|_| {
                bad(
                    format!("key {raw:?}: expected IP:port (hash_key = source_ip_port)"),
                    "key",
                )
            })?;
            address_key(addr, true)
        }
        HashKey::Uri | HashKey::Header(_) | HashKey::Cookie(_) => hash_key(raw.as_bytes()),
    })
}

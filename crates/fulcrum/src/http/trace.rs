//! What happened to one request on its way to a server, recorded only when someone asks: the access
//! log (a line per request) or the request itself (`X-Fulcrum-Explain`, on listeners with
//! `explain = true`). A request that neither logs nor explains carries no trace and pays nothing.
//!
//! The explanation comes back as response headers:
//! - `X-Fulcrum-Route`: the index of the route that matched, or `default` (the listener's pool);
//! - `X-Fulcrum-Pool` and `X-Fulcrum-Algorithm`;
//! - `X-Fulcrum-Hash-Key`: the request's hash key (as a hex number) when the pool hashes, with the
//!   server that owns it;
//! - `X-Fulcrum-Candidates`: every server with its score at the time of the pick — state, requests in
//!   flight, peak-EWMA response time, weight — in the order the algorithm offered them;
//! - `X-Fulcrum-Sticky`: `hit`, `miss` or `redispatch` (sticky pools);
//! - `X-Fulcrum-Server`: the server that answered;
//! - `X-Fulcrum-Retries`: how many servers were tried before it, and why each failed.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::access_log::StickyOutcome;
use crate::balance::Candidates;
use crate::pool::{PoolSnapshot, Server};

/// The request header asking for an explanation.
pub const EXPLAIN_HEADER: HeaderName = HeaderName::from_static("x-fulcrum-explain");

/// One request's record of its routing, pick and attempts.
#[derive(Debug, Default)]
pub struct Trace {
    /// Build the explanation (the request asked for it), not only what the log needs.
    pub explain: bool,
    /// The route that matched (`None`: the listener's pool).
    pub route: Option<usize>,
    /// The pool's name.
    pub pool: Option<Arc<str>>,
    /// Explanation: the algorithm's name.
    pub algorithm: Option<&'static str>,
    /// Explanation: the hash key, and the server owning it (the algorithm's first candidate).
    pub hash: Option<(u64, String)>,
    /// Explanation: the candidates and their scores, in the order offered.
    pub candidates: String,
    /// What stickiness did.
    pub sticky: StickyOutcome,
    /// The server that answered.
    pub server: Option<Arc<str>>,
    /// Servers tried before it, with why each failed.
    pub failed: Vec<(Arc<str>, &'static str)>,
    /// From sending the request to the response head.
    pub server_time: Option<Duration>,
    /// The request failed at `server` after it was sent (502, 504): no other server was tried.
    pub gave_up: bool,
    /// What the cache did (`HIT`, `MISS`, `STALE`, `BYPASS`), when the route has one.
    pub cache: Option<&'static str>,
}

impl Trace {
    /// Records the pick: the pool, and for an explanation the algorithm, hash key and candidates.
    pub fn picked(&mut self, snapshot: &PoolSnapshot, key: Option<u64>, candidates: &Candidates) {
        if !self.explain {
            return;
        }
        self.algorithm = Some(snapshot.algorithm().as_str());
        let mut order = candidates.clone();
        let mut first = true;
        for i in order.by_ref().take(snapshot.servers.len()) {
            let s = &snapshot.servers[i];
            if first {
                if let Some(key) = key {
                    self.hash = Some((key, s.name.clone()));
                }
                first = false;
            } else {
                self.candidates.push_str(", ");
            }
            self.candidates.push_str(&score(s));
        }
    }

    /// Records a failed attempt on `server`.
    pub fn failed(&mut self, server: &Server, why: &'static str) {
        self.failed.push((Arc::from(server.name.as_str()), why));
    }

    /// Records the server that answered.
    pub fn answered(&mut self, server: &Server, elapsed: Duration) {
        self.server = Some(Arc::from(server.name.as_str()));
        self.server_time = Some(elapsed);
    }

    /// Servers tried before the one that answered (or before giving up).
    pub fn retries(&self) -> u32 {
        self.failed.len() as u32
    }

    /// Adds the explanation headers to a response.
    pub fn write_headers(&self, headers: &mut HeaderMap) {
        let mut put = |name: &'static str, value: String| {
            if let Ok(v) = HeaderValue::from_str(&value) {
                headers.insert(HeaderName::from_static(name), v);
            }
        };
        put(
            "x-fulcrum-route",
            self.route
                .map_or_else(|| "default".to_owned(), |r| r.to_string()),
        );
        if let Some(pool) = &self.pool {
            put("x-fulcrum-pool", pool.to_string());
        }
        if let Some(algorithm) = self.algorithm {
            put("x-fulcrum-algorithm", algorithm.to_owned());
        }
        if let Some((key, owner)) = &self.hash {
            put("x-fulcrum-hash-key", format!("{key:016x}; owner={owner}"));
        }
        if !self.candidates.is_empty() {
            put("x-fulcrum-candidates", self.candidates.clone());
        }
        if self.sticky != StickyOutcome::None {
            put("x-fulcrum-sticky", self.sticky.as_str().to_owned());
        }
        if let Some(server) = &self.server {
            put("x-fulcrum-server", server.to_string());
        }
        let mut retries = self.failed.len().to_string();
        for (server, why) in &self.failed {
            let _ = write!(retries, "; {server}: {why}");
        }
        put("x-fulcrum-retries", retries);
    }
}

/// `name (state=up in_flight=0 ewma_ms=1.25 weight=1)`.
pub fn score(s: &Server) -> String {
    format!(
        "{} (state={} in_flight={} ewma_ms={:.3} weight={})",
        s.name,
        s.effective_state().as_str(),
        s.stats.in_flight(),
        s.stats.latency_estimate_ns() as f64 / 1e6,
        s.weight()
    )
}

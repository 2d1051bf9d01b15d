//! The HTTP cache: an in-memory shared cache in front of a pool (RFC 9111).
//!
//! A request goes through three phases here before and after the proxy's own:
//! - **lookup**: GET and HEAD requests are looked up by [`key`] (method, host, path, query, configured
//!   headers, then the values of the headers the stored response's `Vary` names). A fresh response
//!   is answered from memory with its `Age`; a stale one inside its `stale-while-revalidate` window
//!   is answered too while one background request revalidates it; any other stale one is revalidated
//!   with a conditional request (`If-None-Match` / `If-Modified-Since`), a 304 refreshing the entry.
//!   Other methods bypass the cache, and an unsafe one that succeeds invalidates the URL (§4.4).
//! - **coalescing**: concurrent misses for one key make one server request; the others wait for it
//!   (at most `coalesce_timeout`) and are answered from the entry it stores, so a hot entry that
//!   expires does not send every waiting client to the servers at once.
//! - **store**: what may be stored is decided by `http-cache-semantics` (status, method,
//!   `Cache-Control` `no-store`/`private`/`max-age`/`s-maxage`, `Expires`, `Authorization`), plus
//!   two rules of our own: a response with `Set-Cookie` only when `store_set_cookie` says so, and
//!   nothing above `max_object_size`. The body streams to the client as it arrives and is copied into
//!   the store on the way ([`Tee`]); a body that turns out too large is abandoned, not buffered.
//!
//! When every server fails or answers 5xx, a stale entry within `stale_if_error` (or the response's
//! own `stale-if-error`) is served instead: the site stays up while its servers are gone.
//!
//! The store ([`store`]) is bounded in bytes with S3-FIFO admission and eviction (`quick_cache`).

mod key;
mod store;
mod tee;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use http_cache_semantics::{AfterResponse, BeforeRequest, CacheOptions, CachePolicy};
use tokio::sync::watch;

use crate::config::CacheConfig;
use crate::http::body::{ProxyBody, RequestIn};
use crate::http::proxy::{forward, ConnContext, Target};
use crate::http::trace::Trace;
use store::{Object, Slot, Store};
pub use tee::Tee;

/// The `X-Cache` header.
pub const X_CACHE: HeaderName = HeaderName::from_static("x-cache");

/// What the cache did for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Answered from the cache (fresh, or revalidated with a 304).
    Hit,
    /// Sent to a server (and stored when it may be).
    Miss,
    /// Answered with a stale entry (stale-while-revalidate, stale-if-error).
    Stale,
    /// Not cacheable by method or upgrade: passed through.
    Bypass,
}

impl Outcome {
    /// `HIT`, `MISS`, `STALE`, `BYPASS`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "HIT",
            Outcome::Miss => "MISS",
            Outcome::Stale => "STALE",
            Outcome::Bypass => "BYPASS",
        }
    }
}

/// Counters of a cache.
#[derive(Debug, Default)]
pub struct CacheStats {
    /// Requests answered from the cache.
    pub hits: AtomicU64,
    /// Cacheable requests sent to a server.
    pub misses: AtomicU64,
    /// Requests answered with a stale entry.
    pub stale: AtomicU64,
    /// Requests that bypassed the cache.
    pub bypass: AtomicU64,
    /// Responses stored.
    pub stores: AtomicU64,
}

/// What to purge.
#[derive(Debug, Clone, Copy)]
pub enum Purge<'a> {
    /// Everything.
    All,
    /// Every response for this path (any host, query or variant).
    Path(&'a str),
    /// Every response whose path starts with this.
    Prefix(&'a str),
}

/// One cache: its settings, its store and the requests in flight for its keys.
#[derive(Debug)]
pub struct Cache {
    /// The pool it fronts.
    pub pool: String,
    /// `pool` for a pool's cache, `{listener}:route{n}` for a route's own.
    pub scope: String,
    /// Its settings.
    pub config: CacheConfig,
    store: Store,
    /// Keys with a server request in flight: waiters subscribe; the sender is dropped when the
    /// response has been stored (or will not be).
    flights: Mutex<HashMap<String, watch::Sender<()>>>,
    /// Counters.
    pub stats: CacheStats,
}

/// The right to fetch a key for everyone waiting on it; released on drop.
#[derive(Debug)]
pub(crate) struct Flight {
    cache: Arc<Cache>,
    key: String,
}

impl Drop for Flight {
    fn drop(&mut self) {
        let sender = self.cache.flights().remove(&self.key);
        drop(sender);
    }
}

enum Joined {
    Leader(Flight),
    Wait(watch::Receiver<()>),
}

/// A response waiting for its body to be stored.
#[derive(Debug)]
pub(crate) struct Pending {
    cache: Arc<Cache>,
    /// The key before `Vary`.
    base: String,
    vary: Option<Arc<Vec<HeaderName>>>,
    /// The variant's key (`base` when there is no `Vary`).
    key: String,
    status: StatusCode,
    headers: HeaderMap,
    policy: CachePolicy,
    path: String,
    head: bool,
}

impl Pending {
    fn store(self, body: Bytes) {
        let Pending {
            cache,
            base,
            vary,
            key,
            status,
            mut headers,
            policy,
            path,
            head,
        } = self;
        if !head {
            headers.remove(header::TRANSFER_ENCODING);
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        }
        if let Some(vary) = vary {
            cache
                .store
                .insert(base, Slot::Vary(vary, Arc::from(path.as_str())));
        }
        let now = SystemTime::now();
        let object = Object {
            status,
            headers,
            body,
            fresh_until: now + policy.time_to_live(now),
            policy,
            path,
        };
        cache.store.insert(key, Slot::Object(Arc::new(object)));
        cache.stats.stores.fetch_add(1, Ordering::Relaxed);
    }
}

impl Cache {
    /// An empty cache for `pool` with these settings.
    pub fn new(pool: &str, scope: &str, config: &CacheConfig) -> Self {
        Cache {
            pool: pool.to_owned(),
            scope: scope.to_owned(),
            config: config.clone(),
            store: Store::new(config.max_size, config.max_object_size),
            flights: Mutex::new(HashMap::new()),
            stats: CacheStats::default(),
        }
    }

    fn flights(&self) -> std::sync::MutexGuard<'_, HashMap<String, watch::Sender<()>>> {
        self.flights.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes held by the store.
    pub fn bytes(&self) -> u64 {
        self.store.bytes()
    }

    /// Entries held by the store.
    pub fn entries(&self) -> usize {
        self.store.entries()
    }

    /// Entries evicted to make room.
    pub fn evictions(&self) -> u64 {
        self.store.evictions()
    }

    /// Removes what `what` names; returns how many responses were removed.
    pub fn purge(&self, what: Purge<'_>) -> usize {
        match what {
            Purge::All => self.store.remove_where(|_| true),
            Purge::Path(p) => self.store.remove_where(|path| path == p),
            Purge::Prefix(p) => self.store.remove_where(|path| path.starts_with(p)),
        }
    }

    /// The key of the request's variant and the response stored there, if any.
    fn lookup(&self, base: &str, headers: &HeaderMap) -> (String, Option<Arc<Object>>) {
        match self.store.get(base) {
            None => (base.to_owned(), None),
            Some(Slot::Object(o)) => (base.to_owned(), Some(o)),
            Some(Slot::Vary(names, _)) => {
                let key = key::variant(base, headers, &names);
                let found = match self.store.get(&key) {
                    Some(Slot::Object(o)) => Some(o),
                    _ => None,
                };
                (key, found)
            }
        }
    }

    fn join(self: &Arc<Self>, key: &str) -> Joined {
        let mut flights = self.flights();
        match flights.get(key) {
            Some(sender) => Joined::Wait(sender.subscribe()),
            None => {
                flights.insert(key.to_owned(), watch::channel(()).0);
                Joined::Leader(Flight {
                    cache: self.clone(),
                    key: key.to_owned(),
                })
            }
        }
    }

    /// Invalidates a URL after an unsafe method succeeded on it (its GET and HEAD responses).
    fn invalidate(&self, base: &str, headers: &HeaderMap) {
        let rest = base.split_once(' ').map_or("", |(_, r)| r);
        for method in ["GET", "HEAD"] {
            let base = format!("{method} {rest}");
            let (key, _) = self.lookup(&base, headers);
            self.store.remove(&key);
            self.store.remove(&base);
        }
    }

    /// What to store of this response to `req`, when it may be stored.
    fn storable(
        self: &Arc<Self>,
        req: &http::request::Parts,
        base: String,
        status: StatusCode,
        headers: &HeaderMap,
        now: SystemTime,
    ) -> Option<Pending> {
        if matches!(status.as_u16(), 206 | 304) || status.is_informational() {
            return None;
        }
        if headers.contains_key(header::SET_COOKIE) && !self.config.store_set_cookie {
            return None;
        }
        let length = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if length.is_some_and(|n| n > self.config.max_object_size) {
            return None;
        }
        let mut vary = Vec::new();
        for value in headers.get_all(header::VARY) {
            for name in value.to_str().ok()?.split(',') {
                let name = name.trim();
                if name == "*" {
                    return None;
                }
                if !name.is_empty() {
                    vary.push(HeaderName::from_bytes(name.as_bytes()).ok()?);
                }
            }
        }
        let policy = self.policy(req, status, headers, now);
        if !policy.is_storable() {
            return None;
        }
        // A response that is stale at once and cannot be revalidated or served stale is of no use.
        let useful = !policy.time_to_live(now).is_zero()
            || headers.contains_key(header::ETAG)
            || headers.contains_key(header::LAST_MODIFIED)
            || !self.config.stale_if_error.is_zero()
            || directive(headers, "stale-if-error").is_some()
            || directive(headers, "stale-while-revalidate").is_some();
        if !useful {
            return None;
        }
        let key = if vary.is_empty() {
            base.clone()
        } else {
            key::variant(&base, &req.headers, &vary)
        };
        Some(Pending {
            cache: self.clone(),
            base,
            vary: (!vary.is_empty()).then(|| Arc::new(vary)),
            key,
            status,
            headers: headers.clone(),
            policy,
            path: req.uri.path().to_owned(),
            head: req.method == Method::HEAD,
        })
    }

    /// The cache policy of a response, with our settings applied: a stored `Set-Cookie` does not
    /// shorten its life, and `default_ttl` gives one to a response that states none.
    fn policy(
        &self,
        req: &http::request::Parts,
        status: StatusCode,
        headers: &HeaderMap,
        now: SystemTime,
    ) -> CachePolicy {
        let mut headers = headers.clone();
        if self.config.store_set_cookie {
            headers.remove(header::SET_COOKIE);
        }
        if let Some(ttl) = self.config.default_ttl {
            let explicit = headers.contains_key(header::EXPIRES)
                || headers.get_all(header::CACHE_CONTROL).iter().any(|v| {
                    directive_in(v, "max-age").is_some() || directive_in(v, "s-maxage").is_some()
                });
            if !explicit {
                headers.append(
                    header::CACHE_CONTROL,
                    HeaderValue::from_str(&format!("max-age={}", ttl.as_secs()))
                        .unwrap_or(HeaderValue::from_static("max-age=0")),
                );
            }
        }
        let mut res = Response::new(());
        *res.status_mut() = status;
        *res.headers_mut() = headers;
        CachePolicy::new_options(req, &res, now, CacheOptions::default())
    }

    /// The entry at `key` refreshed by a 304; `None` when the 304 does not match it.
    fn refresh(
        &self,
        key: &str,
        old: &Object,
        req: &http::request::Parts,
        not_modified: &HeaderMap,
        now: SystemTime,
    ) -> Option<Arc<Object>> {
        let mut res = Response::new(());
        *res.status_mut() = StatusCode::NOT_MODIFIED;
        *res.headers_mut() = not_modified.clone();
        let AfterResponse::NotModified(policy, _) = old.policy.after_response(req, &res, now)
        else {
            return None;
        };
        let mut headers = old.headers.clone();
        for name in not_modified.keys() {
            let skip = [
                header::CONTENT_LENGTH,
                header::TRANSFER_ENCODING,
                header::CONTENT_ENCODING,
                header::CONTENT_RANGE,
                header::CONNECTION,
            ];
            if skip.contains(name) {
                continue;
            }
            headers.remove(name);
            for v in not_modified.get_all(name) {
                headers.append(name.clone(), v.clone());
            }
        }
        let object = Arc::new(Object {
            status: old.status,
            headers,
            body: old.body.clone(),
            fresh_until: now + policy.time_to_live(now),
            policy,
            path: old.path.clone(),
        });
        self.store
            .insert(key.to_owned(), Slot::Object(object.clone()));
        Some(object)
    }

    /// How long past its freshness a stale entry may still be served when the servers fail.
    fn stale_if_error(&self, object: &Object) -> Duration {
        self.config
            .stale_if_error
            .max(directive(&object.headers, "stale-if-error").unwrap_or_default())
    }
}

/// The value in seconds of `name` in a `Cache-Control` value.
fn directive_in(value: &HeaderValue, name: &str) -> Option<Duration> {
    value.to_str().ok()?.split(',').find_map(|d| {
        let (k, v) = d.trim().split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| {
                v.trim()
                    .trim_matches('"')
                    .parse()
                    .ok()
                    .map(Duration::from_secs)
            })
            .flatten()
    })
}

/// The value in seconds of directive `name` in the response's `Cache-Control`.
fn directive(headers: &HeaderMap, name: &str) -> Option<Duration> {
    headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .find_map(|v| directive_in(v, name))
}

/// How long `object` has been stale at `now` (zero when fresh).
fn staleness(object: &Object, now: SystemTime) -> Duration {
    now.duration_since(object.fresh_until).unwrap_or_default()
}

/// The answer from a stored response.
fn answer(object: &Object, now: SystemTime) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::full(object.body.clone()));
    *resp.status_mut() = object.status;
    *resp.headers_mut() = object.headers.clone();
    resp.headers_mut().insert(
        header::AGE,
        HeaderValue::from(object.policy.age(now).as_secs()),
    );
    resp
}

/// A request as the cache policy sees it when it is presented for a stored response. The key already
/// matched its method, host, path and query (as `key.query` says) and its `Vary` values, so the URI is
/// the same by construction: a sorted or ignored query must not make the policy think otherwise.
struct Presented<'a>(&'a Request<RequestIn>);

impl http_cache_semantics::RequestLike for Presented<'_> {
    fn uri(&self) -> http::Uri {
        self.0.uri().clone()
    }

    fn is_same_uri(&self, _: &http::Uri) -> bool {
        true
    }

    fn method(&self) -> &Method {
        self.0.method()
    }

    fn headers(&self) -> &HeaderMap {
        self.0.headers()
    }
}

/// Whether `object` may answer `req` at `now` without asking a server. A request without its own
/// `Cache-Control` or `Pragma` only needs the entry to be fresh (the common case, kept cheap); one
/// with them (`no-cache`, `max-age`, `min-fresh`, `max-stale`) is judged by the policy.
fn fresh(object: &Object, req: &Request<RequestIn>, now: SystemTime) -> Option<BeforeRequest> {
    let h = req.headers();
    if !h.contains_key(header::CACHE_CONTROL)
        && !h.contains_key(header::PRAGMA)
        && now < object.fresh_until
    {
        return None;
    }
    match object.policy.before_request(&Presented(req), now) {
        BeforeRequest::Fresh(_) => None,
        stale => Some(stale),
    }
}

/// A copy of a request's method, URI and headers, for its cache policy.
fn parts_of(req: &Request<RequestIn>) -> http::request::Parts {
    let (mut parts, ()) = Request::new(()).into_parts();
    parts.method = req.method().clone();
    parts.uri = req.uri().clone();
    parts.version = req.version();
    parts.headers = req.headers().clone();
    parts
}

/// The request path through a cache: answered from it, or forwarded and perhaps stored.
pub async fn serve(
    cache: &Arc<Cache>,
    target: &Target,
    ctx: &Arc<ConnContext>,
    req: Request<RequestIn>,
    mut trace: Option<&mut Trace>,
) -> Response<ProxyBody> {
    let (mut resp, outcome) =
        lookup_or_forward(cache, target, ctx, req, trace.as_deref_mut()).await;
    let counter = match outcome {
        Outcome::Hit => &cache.stats.hits,
        Outcome::Miss => &cache.stats.misses,
        Outcome::Stale => &cache.stats.stale,
        Outcome::Bypass => &cache.stats.bypass,
    };
    counter.fetch_add(1, Ordering::Relaxed);
    if let Some(trace) = trace {
        trace.cache = Some(outcome.as_str());
    }
    if cache.config.x_cache {
        resp.headers_mut()
            .insert(X_CACHE, HeaderValue::from_static(outcome.as_str()));
    }
    resp
}

async fn lookup_or_forward(
    cache: &Arc<Cache>,
    target: &Target,
    ctx: &Arc<ConnContext>,
    mut req: Request<RequestIn>,
    trace: Option<&mut Trace>,
) -> (Response<ProxyBody>, Outcome) {
    let method = req.method().clone();
    let base = key::base(&cache.config, &req);
    if (method != Method::GET && method != Method::HEAD)
        || crate::http::headers::is_websocket_upgrade(&req)
    {
        let headers = (!method.is_safe()).then(|| req.headers().clone());
        let resp = forward(target, ctx, req, trace).await;
        let ok = resp.status().is_success() || resp.status().is_redirection();
        if let (Some(headers), true) = (headers, ok) {
            cache.invalidate(&base, &headers);
        }
        return (resp, Outcome::Bypass);
    }
    let now = SystemTime::now();
    let (mut key, found) = cache.lookup(&base, req.headers());
    let mut stale: Option<(Arc<Object>, HeaderMap)> = None;
    if let Some(object) = found {
        match fresh(&object, &req, now) {
            None => return (answer(&object, now), Outcome::Hit),
            Some(BeforeRequest::Stale {
                request,
                matches: true,
            }) => {
                let window = directive(&object.headers, "stale-while-revalidate");
                if window.is_some_and(|w| staleness(&object, now) <= w) {
                    if let Joined::Leader(flight) = cache.join(&key) {
                        let revalidate = Revalidation {
                            cache: cache.clone(),
                            target: target.clone(),
                            ctx: ctx.clone(),
                            key: key.clone(),
                            base: base.clone(),
                            object: object.clone(),
                            request,
                            flight,
                        };
                        tokio::spawn(revalidate.run());
                    }
                    return (answer(&object, now), Outcome::Stale);
                }
                stale = Some((object, request.headers));
            }
            Some(_) => {}
        }
    }

    // One request per key goes to the servers; the others wait for what it stores.
    let deadline = tokio::time::Instant::now() + cache.config.coalesce_timeout;
    let flight = loop {
        match cache.join(&key) {
            Joined::Leader(flight) => break Some(flight),
            Joined::Wait(mut done) => {
                if tokio::time::timeout_at(deadline, done.changed())
                    .await
                    .is_err()
                {
                    break None;
                }
                let now = SystemTime::now();
                let (again, found) = cache.lookup(&base, req.headers());
                key = again;
                if let Some(object) = found {
                    if fresh(&object, &req, now).is_none() {
                        return (answer(&object, now), Outcome::Hit);
                    }
                }
            }
        }
    };

    let parts = parts_of(&req);
    if let Some((_, conditional)) = &stale {
        *req.headers_mut() = conditional.clone();
    }
    let resp = forward(target, ctx, req, trace).await;
    let now = SystemTime::now();
    let status = resp.status();
    if let Some((object, _)) = &stale {
        if status == StatusCode::NOT_MODIFIED {
            if let Some(fresh) = cache.refresh(&key, object, &parts, resp.headers(), now) {
                return (answer(&fresh, now), Outcome::Hit);
            }
        } else if status.is_server_error() && staleness(object, now) <= cache.stale_if_error(object)
        {
            return (answer(object, now), Outcome::Stale);
        }
    }
    match cache.storable(&parts, base, status, resp.headers(), now) {
        Some(pending) => {
            let limit = cache.config.max_object_size;
            let resp = resp
                .map(|body| ProxyBody::Cached(Box::new(Tee::new(body, limit, pending, flight))));
            (resp, Outcome::Miss)
        }
        None => (resp, Outcome::Miss),
    }
}

/// A background revalidation of a stale entry served under `stale-while-revalidate`.
struct Revalidation {
    cache: Arc<Cache>,
    target: Target,
    ctx: Arc<ConnContext>,
    key: String,
    base: String,
    object: Arc<Object>,
    request: http::request::Parts,
    flight: Flight,
}

impl Revalidation {
    async fn run(self) {
        let Revalidation {
            cache,
            target,
            ctx,
            key,
            base,
            object,
            request,
            flight,
        } = self;
        let parts = request.clone();
        let req = Request::from_parts(request, RequestIn::Empty);
        let resp = forward(&target, &ctx, req, None).await;
        let now = SystemTime::now();
        let status = resp.status();
        if status == StatusCode::NOT_MODIFIED {
            cache.refresh(&key, &object, &parts, resp.headers(), now);
            return;
        }
        let Some(pending) = cache.storable(&parts, base, status, resp.headers(), now) else {
            return;
        };
        let limit = cache.config.max_object_size;
        let mut body = Tee::new(resp.into_body(), limit, pending, Some(flight));
        while let Some(frame) = body.frame().await {
            if frame.is_err() {
                break;
            }
        }
    }
}

//! The request path: route, pick, forward, stream back.
//!
//! A request is routed to a pool, the pool's selector orders the candidate servers, and the request
//! goes to the first available one over a pooled HTTP/1.1 connection. What may be retried is decided by
//! what the server saw:
//! - a connect failure (refused, timed out) sent nothing: the next candidate is tried, up to `retries`;
//! - an idle keep-alive connection found closed before the request was written sent nothing either:
//!   a fresh connection to the same server is tried (this does not use up a retry);
//! - a request without a body and with an idempotent method whose connection closed before a byte of
//!   answer came back is sent again (RFC 9110 §9.2.2): on a fresh connection to the same server when
//!   the closed one was a reused keep-alive connection, else to the next candidate;
//! - any other request, once written, is never sent again: a failure answers 502, a server that does
//!   not answer within `response_timeout` 504.
//!
//! With no available server, or when no server could be reached within the retry budget (nothing was
//! sent anywhere), the answer is 503, as HAProxy answers; 502 means a server took the request and failed.
//! A server that accepted the connection and closed it without answering has failed too (counted
//! against it, and 502 when no other server answers), even when the request could be retried.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use arc_swap::ArcSwap;

use super::body::{ProxyBody, RequestIn, UpstreamBody};
use super::client;
use super::filter::{Filter, ListenerFilter};
use super::headers::{check_host, is_websocket_upgrade, rewrite_request, rewrite_response};
use super::route;
use super::server::{Builders, ConnSettings};
use super::trace::Trace;
use super::upstream::{
    self, BodyLimits, ReadError, RequestBody, ResponseHead, SendError, UpstreamConn,
};
use crate::balance::hash_key;
use crate::config::{HashKey, RouteMatch};
use crate::listener::{ConnGuard, ListenerStats, PerIp};
use crate::pool::{InFlight, Pool, PoolSettings, PoolSnapshot, Server};
use crate::sticky::Sticky;

/// Where a route sends requests: a pool, and the pool's stickiness if it has any.
#[derive(Debug, Clone)]
pub struct Target {
    /// The pool.
    pub pool: Arc<Pool>,
    /// Session persistence of the pool (shared by every route to it).
    pub sticky: Option<Arc<Sticky>>,
    /// The largest request body on this route (else the listener's).
    pub max_body_size: Option<u64>,
    /// The route's own filtering (access list, rules, rate limit), when it has any.
    pub filter: Option<Arc<Filter>>,
    /// The HTTP cache in front of the pool on this route, when there is one.
    pub cache: Option<Arc<crate::cache::Cache>>,
}

/// What an HTTP listener routes with.
#[derive(Debug)]
pub struct HttpRouter {
    /// Routes in order; the first match wins.
    pub routes: Vec<(RouteMatch, Target)>,
    /// Where requests no route matches go.
    pub default: Target,
}

impl HttpRouter {
    /// The target for `req`.
    #[inline]
    pub fn route<B>(&self, req: &Request<B>) -> &Target {
        self.route_at(req).1
    }

    /// The target for `req`, with the index of the route that matched (`None`: the default).
    #[inline]
    pub fn route_at<B>(&self, req: &Request<B>) -> (Option<usize>, &Target) {
        self.routes
            .iter()
            .position(|(m, _)| route::matches(m, req))
            .map_or((None, &self.default), |i| (Some(i), &self.routes[i].1))
    }
}

/// Everything the request path of one HTTP listener needs. The routing table and the connection
/// settings are swapped whole by a reload; connections and requests in flight keep the ones they
/// started with.
#[derive(Debug)]
pub struct HttpListener {
    /// The listener's name.
    pub name: String,
    /// `X-Forwarded-Proto` value.
    pub proto: &'static str,
    /// Routing table.
    pub router: ArcSwap<HttpRouter>,
    /// hyper's connection settings (request-header timeout).
    pub builders: ArcSwap<Builders>,
    /// Live counters.
    pub stats: Arc<ListenerStats>,
    /// Open connections per client address, when limited.
    pub per_ip: arc_swap::ArcSwapOption<PerIp>,
    /// Access list, rules, rate limit and bans of the listener.
    pub filter: ArcSwap<ListenerFilter>,
    /// TLS termination (`https` listeners).
    pub tls: arc_swap::ArcSwapOption<super::server::TlsListener>,
    /// The access log (shared by every listener).
    pub access_log: crate::access_log::Slot,
    /// The listener's name for log lines.
    pub log_name: Arc<str>,
    /// `explain = true`: `Some`, holding the admin token the request's `X-Fulcrum-Explain` must carry
    /// (when one is set).
    pub explain: arc_swap::ArcSwapOption<Option<String>>,
}

/// The peer of one client connection, formatted once for `X-Forwarded-For`.
#[derive(Debug, Clone)]
pub struct Client {
    /// The client's socket address.
    pub addr: SocketAddr,
    /// The client's IP as a header value.
    pub ip: HeaderValue,
}

impl Client {
    /// Describes the peer at `addr`.
    pub fn new(addr: SocketAddr) -> Self {
        let ip = HeaderValue::from_str(&addr.ip().to_string())
            .unwrap_or(HeaderValue::from_static("unknown"));
        Client { addr, ip }
    }
}

/// One client connection's context: its listener and its peer. Shared by the connection's requests
/// through one `Arc`, so a request costs one atomic increment to set up.
#[derive(Debug)]
pub struct ConnContext {
    /// The listener the connection came in on.
    pub listener: Arc<HttpListener>,
    /// The peer.
    pub client: Client,
    /// Requests in flight on the connection (the idle clock runs only at 0).
    pub active: AtomicUsize,
    /// Where tasks that outlive the connection's own are spawned (WebSocket tunnels).
    pub tracker: TaskTracker,
    /// Keeps the connection counted against the listener's limits while it or its tunnel lives.
    pub guard: Arc<ConnGuard>,
    /// The listener is stopping.
    pub stop: CancellationToken,
    /// The connection must close now.
    pub deadline: CancellationToken,
    /// The listener's connection settings when the connection was accepted.
    pub settings: Arc<ConnSettings>,
    /// Where the connection parks while it waits long for a request.
    pub parking: Arc<crate::listener::Parking>,
}

/// Counts a request in flight on its connection until dropped.
struct Active<'a>(&'a AtomicUsize);

impl<'a> Active<'a> {
    fn start(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::Relaxed);
        Active(n)
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// hyper service entry point: never fails; errors become 5xx responses.
pub async fn handle(
    ctx: Arc<ConnContext>,
    req: Request<RequestIn>,
) -> Result<Response<ProxyBody>, Infallible> {
    let _active = Active::start(&ctx.active);
    let listener = &ctx.listener;
    let ip = ctx.client.addr.ip();
    // Tracing what happens costs only the requests that are logged or ask for an explanation.
    let log = listener.access_log.load_full().filter(|log| log.sampled());
    let explain = explain_allowed(listener, &req);
    let mut trace = (log.is_some() || explain).then(|| {
        Box::new(Trace {
            explain,
            ..Trace::default()
        })
    });
    let logged = log.map(|log| (log, request_record(&req, &ctx), Instant::now()));
    let filter = listener.filter.load();
    let resp = match check_host(&req) {
        Err(why) => local_with(StatusCode::BAD_REQUEST, why),
        Ok(()) if filter.bans.is_banned(ip).is_some() => {
            filter.filter.refused.fetch_add(1, Ordering::Relaxed);
            local_with(
                StatusCode::FORBIDDEN,
                "403 Forbidden: this address is banned for now\n",
            )
        }
        Ok(()) => match filter.filter.check(&req, ip, false).await {
            Some(refused) => refused,
            None if ctx.settings.https_redirect.is_some() => {
                https_redirect(&req, ctx.settings.https_redirect.unwrap_or(443))
            }
            None => {
                let router = listener.router.load();
                let (route, target) = router.route_at(&req);
                if let Some(trace) = trace.as_deref_mut() {
                    trace.route = route;
                    trace.pool = Some(Arc::from(target.pool.name.as_str()));
                }
                let limit = target.max_body_size.or(ctx.settings.max_body_size);
                let refused = match target.filter.as_ref() {
                    Some(f) => f.check(&req, ip, true).await,
                    None => None,
                };
                match (limit, refused) {
                    (_, Some(refused)) => refused,
                    (Some(max), None) if declared_length(&req).is_some_and(|n| n > max) => {
                        local_with(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            "413 Content Too Large: the request body is over this route's limit\n",
                        )
                    }
                    _ => match &target.cache {
                        Some(cache) => {
                            crate::cache::serve(cache, target, &ctx, req, trace.as_deref_mut())
                                .await
                        }
                        None => forward(target, &ctx, req, trace.as_deref_mut()).await,
                    },
                }
            }
        },
    };
    let mut resp = resp;
    if let Some(hsts) = &ctx.settings.hsts {
        resp.headers_mut()
            .entry(http::header::STRICT_TRANSPORT_SECURITY)
            .or_insert_with(|| hsts.clone());
    }
    let status = resp.status().as_u16();
    filter.record(ip, status);
    listener.stats.count(status);
    if let Some(trace) = trace.as_deref() {
        if trace.explain {
            trace.write_headers(resp.headers_mut());
        }
    }
    if let (Some((log, mut record, started)), Some(trace)) = (logged, trace) {
        if !log.wants_status(status) {
            return Ok(resp);
        }
        record.status = status;
        record.route = trace.route;
        record.retries = trace.retries();
        record.sticky = trace.sticky;
        record.server_time = trace.server_time;
        record.cache = trace.cache;
        let from_cache = matches!(trace.cache, Some("HIT" | "STALE")) && trace.server.is_none();
        record.termination = match (
            (trace.server.is_some() && !trace.gave_up) || from_cache,
            status,
        ) {
            (true, _) => crate::access_log::Termination::Ok,
            (false, 503) => crate::access_log::Termination::NoServer,
            (false, 504) => crate::access_log::Termination::Timeout,
            (false, 502) => crate::access_log::Termination::ServerAbort,
            (false, _) => crate::access_log::Termination::Local,
        };
        record.pool = trace.pool;
        record.server = trace.server;
        return Ok(resp.map(|body| super::body::LoggedBody::wrap(body, log, record, started)));
    }
    Ok(resp)
}

/// Whether `req` may have its routing explained: the listener allows it and the request asks with
/// `X-Fulcrum-Explain` (carrying the admin token when one is set).
fn explain_allowed<B>(listener: &HttpListener, req: &Request<B>) -> bool {
    let explain = listener.explain.load();
    let Some(allowed) = explain.as_deref() else {
        return false;
    };
    let Some(value) = req.headers().get(&super::trace::EXPLAIN_HEADER) else {
        return false;
    };
    match allowed {
        None => true,
        Some(token) => {
            let given = value.as_bytes();
            let given = given.strip_prefix(b"Bearer ").unwrap_or(given);
            bool::from(subtle::ConstantTimeEq::ct_eq(given, token.as_bytes()))
        }
    }
}

/// The access log's record of a request, with what it knows before the request moves on.
fn request_record<B>(req: &Request<B>, ctx: &ConnContext) -> crate::access_log::Record {
    let mut record = crate::access_log::Record::new(
        crate::access_log::Kind::Http,
        ctx.client.addr,
        ctx.listener.log_name.clone(),
    );
    let copy = |name: http::header::HeaderName| {
        req.headers()
            .get(name)
            .and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok())
    };
    record.method = Some(req.method().clone());
    record.path = Some(
        req.uri()
            .path_and_query()
            .map_or_else(|| req.uri().to_string(), |pq| pq.as_str().to_owned()),
    );
    record.version = Some(req.version());
    record.host = copy(http::header::HOST);
    record.referer = copy(http::header::REFERER);
    record.user_agent = copy(http::header::USER_AGENT);
    record.bytes_in = declared_length(req).unwrap_or(0);
    record
}

/// `308 Permanent Redirect` to the same host and path over HTTPS on `port` (the method and body are
/// kept by the client, unlike with 301).
fn https_redirect<B>(req: &Request<B>, port: u16) -> Response<ProxyBody> {
    let host = req
        .uri()
        .authority()
        .map(|a| a.host().to_owned())
        .or_else(|| {
            let h = req.headers().get(http::header::HOST)?.to_str().ok()?;
            Some(h.parse::<http::uri::Authority>().ok()?.host().to_owned())
        });
    let Some(host) = host else {
        return local_with(
            StatusCode::BAD_REQUEST,
            "400 Bad Request: a redirect to HTTPS needs the request's host\n",
        );
    };
    let path = req
        .uri()
        .path_and_query()
        .map(|pq| pq.as_str())
        .unwrap_or("/");
    let location = if port == 443 {
        format!("https://{host}{path}")
    } else {
        format!("https://{host}:{port}{path}")
    };
    let mut resp = local_with(
        StatusCode::PERMANENT_REDIRECT,
        "308 Permanent Redirect: this site is served over HTTPS\n",
    );
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(http::header::LOCATION, v);
    }
    resp
}

/// Why a request got no response from a server.
enum Failure {
    /// The client's own fault, answered with this status (408 stalled body, 413 oversized body).
    ClientStatus(StatusCode),
    /// Nothing the server could act on was sent: the request can go to another server.
    NotSent,
    /// The server took the connection and closed it without answering a request that may still go
    /// to another server (nothing written, or replayable): it failed, so 502 if none answers.
    Unanswered,
    /// The exchange failed after the request was sent: answer with this status.
    Failed(StatusCode),
    /// The client's own request body failed (it went away or sent a malformed body).
    Client,
}

/// The request's `Content-Length`, when it declares one.
fn declared_length<B>(req: &Request<B>) -> Option<u64> {
    req.headers()
        .get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

pub(crate) async fn forward(
    target: &Target,
    ctx: &Arc<ConnContext>,
    mut req: Request<RequestIn>,
    mut trace: Option<&mut Trace>,
) -> Response<ProxyBody> {
    let client = &ctx.client;
    let proto = ctx.listener.proto;
    let snapshot = target.pool.snapshot_full();
    let sticky = match &target.sticky {
        Some(s) => Some((
            s,
            s.lookup(req.headers(), client.addr.ip(), &snapshot).await,
        )),
        None => None,
    };
    let key = snapshot
        .settings
        .hash_key
        .as_ref()
        .and_then(|k| request_key(k, &req, client));
    let websocket = is_websocket_upgrade(&req);
    let transport = snapshot.settings.transport.clone();
    if websocket && transport.as_deref().is_some_and(client::Transport::http2) {
        return local_with(
            StatusCode::NOT_IMPLEMENTED,
            "501 Not Implemented: WebSocket to servers over HTTP/2 is not supported yet\n",
        );
    }
    // gRPC and other trailer users say so with `TE: trailers`, which an HTTP/2 server may need.
    let te_trailers = transport.is_some()
        && super::headers::has_token(req.headers(), http::header::TE, "trailers");
    let mut client_upgrade = websocket.then(|| super::h1::on_upgrade(&mut req));
    rewrite_request(&mut req, &client.ip, proto, websocket);
    if te_trailers {
        req.headers_mut()
            .insert(http::header::TE, HeaderValue::from_static("trailers"));
    }
    let (parts, body) = req.into_parts();
    let framing = RequestBody::of(&parts.headers, &body);
    let max_body = target.max_body_size.or(ctx.settings.max_body_size);
    // A pool with TLS or HTTP/2 to its servers goes through hyper ([`client`]); the body is handed
    // over with the request (and back when it was not sent).
    let mut upload = match &transport {
        None => Upload::Own(body),
        Some(_) => {
            let state = Arc::new(client::UploadState::default());
            let body = client::boxed(client::Upload::new(
                body,
                max_body,
                ctx.settings.body_timeout,
                state.clone(),
            ));
            Upload::Hyper(Some(body), state)
        }
    };

    // A sticky client goes to its server first; the algorithm picks for the others, and for it when
    // its server cannot take it.
    let sticky_server = sticky
        .as_ref()
        .and_then(|(_, c)| c.server)
        .map(|i| &snapshot.servers[i]);
    let mut sticky_first = sticky_server;
    // A new sticky client under `load_bound` is not placed on a server already far above the mean.
    let load_bound = match &sticky {
        Some((s, _)) if sticky_server.is_none() => s.load_bound_pct(),
        _ => None,
    };
    let mut candidates = snapshot.pick(key);
    if let Some(trace) = trace.as_deref_mut() {
        trace.picked(&snapshot, key, &candidates);
    }
    let mut attempts = snapshot.settings.retries + 1;
    let mut unanswered = false;
    let mut queue_deadline = None;
    while attempts > 0 {
        let server = match sticky_first.take() {
            Some(s) => Some(s),
            None => loop {
                let next = match load_bound {
                    Some(pct) => snapshot.next_available_bounded(&mut candidates, pct),
                    None => snapshot.next_available(&mut candidates),
                };
                match next {
                    // The sticky server was tried first already.
                    Some(s) if sticky_server.is_some_and(|t| Arc::ptr_eq(t, s)) => continue,
                    other => break other,
                }
            },
        };
        let Some(server) = server else {
            // Every server that may take requests is at `max_connections_per_server`: wait in the
            // pool's queue for one to finish (before any attempt only), then pick again.
            let fresh = attempts == snapshot.settings.retries + 1;
            if fresh && snapshot.saturated() {
                let deadline = *queue_deadline
                    .get_or_insert_with(|| Instant::now() + snapshot.settings.queue_timeout);
                if wait_for_slot(&snapshot, deadline).await {
                    candidates = snapshot.pick(key);
                    continue;
                }
                return local(StatusCode::SERVICE_UNAVAILABLE);
            }
            break;
        };
        attempts -= 1;
        let guard = InFlight::start(server.clone());
        let client_limits = (ctx.settings.body_timeout, max_body);
        let body = match &mut upload {
            Upload::Own(body) => body,
            Upload::Hyper(body, state) => {
                let replayable = framing == RequestBody::Empty && parts.method.is_idempotent();
                let Some(req_body) = body.take().or_else(|| {
                    replayable.then(|| client::boxed(http_body_util::Empty::<Bytes>::new()))
                }) else {
                    // The body went to a server that failed: it cannot be sent again.
                    break;
                };
                let req = Request::from_parts(parts.clone(), req_body);
                let transport = transport.as_deref().expect("hyper upload has a transport");
                let result = client::exchange(
                    server,
                    &snapshot.settings,
                    transport,
                    req,
                    state,
                    replayable,
                )
                .await;
                match result {
                    Ok(mut answer) => {
                        let status = answer.response.status();
                        server
                            .stats
                            .record_response(status.as_u16(), answer.elapsed);
                        snapshot.observe(server, !status.is_server_error());
                        if let Some(trace) = trace.as_deref_mut() {
                            trace.answered(server, answer.elapsed);
                            trace.sticky = sticky_outcome(&sticky, &snapshot, server);
                        }
                        let mut resp = if status == StatusCode::SWITCHING_PROTOCOLS {
                            // A WebSocket over TLS: the tunnel takes both upgraded connections.
                            let Some(client_upgrade) = client_upgrade.take() else {
                                // A server may not switch protocols unasked.
                                server.stats.record_failure();
                                return local(StatusCode::BAD_GATEWAY);
                            };
                            let upgrade = hyper::upgrade::on(&mut answer.response);
                            ctx.tracker.spawn(tunnel(
                                client_upgrade,
                                ServerSide::Upgraded(upgrade),
                                guard,
                                ctx.clone(),
                            ));
                            let (parts, _) = answer.response.into_parts();
                            Response::from_parts(parts, ProxyBody::empty())
                        } else {
                            respond_client(answer, guard)
                        };
                        remember(&sticky, &snapshot, server, ctx, &mut resp);
                        return resp;
                    }
                    Err(client::ClientFailure::NotSent(returned)) => {
                        *body = Some(returned);
                        server.stats.record_failure();
                        snapshot.observe(server, false);
                        if let Some(trace) = trace.as_deref_mut() {
                            trace.failed(server, "not sent");
                        }
                    }
                    Err(client::ClientFailure::ConnectFailed { reset }) => {
                        unanswered |= reset;
                        server.stats.record_failure();
                        snapshot.observe(server, false);
                        if let Some(trace) = trace.as_deref_mut() {
                            trace.failed(server, "connect failed");
                        }
                    }
                    Err(client::ClientFailure::Unanswered) => {
                        unanswered = true;
                        server.stats.record_failure();
                        snapshot.observe(server, false);
                        if let Some(trace) = trace.as_deref_mut() {
                            trace.failed(server, "closed without answering");
                        }
                    }
                    Err(client::ClientFailure::Client(status)) => return local(status),
                    Err(client::ClientFailure::Failed(status)) => {
                        server.stats.record_failure();
                        snapshot.observe(server, false);
                        if let Some(trace) = trace.as_deref_mut() {
                            trace.server = Some(Arc::from(server.name.as_str()));
                            trace.gave_up = true;
                        }
                        return local(status);
                    }
                }
                continue;
            }
        };
        match exchange(
            server,
            &snapshot.settings,
            &parts,
            body,
            framing,
            client_limits,
        )
        .await
        {
            Ok((head, conn, elapsed)) => {
                server.stats.record_response(head.status.as_u16(), elapsed);
                snapshot.observe(server, !head.status.is_server_error());
                if let Some(trace) = trace.as_deref_mut() {
                    trace.answered(server, elapsed);
                    trace.sticky = sticky_outcome(&sticky, &snapshot, server);
                }
                let mut resp = respond(head, conn, guard, client_upgrade, ctx);
                remember(&sticky, &snapshot, server, ctx, &mut resp);
                return resp;
            }
            Err(f @ (Failure::NotSent | Failure::Unanswered)) => {
                unanswered |= matches!(f, Failure::Unanswered);
                server.stats.record_failure();
                snapshot.observe(server, false);
                if let Some(trace) = trace.as_deref_mut() {
                    trace.failed(
                        server,
                        if matches!(f, Failure::Unanswered) {
                            "closed without answering"
                        } else {
                            "connect failed"
                        },
                    );
                }
            }
            Err(Failure::Failed(status)) => {
                server.stats.record_failure();
                snapshot.observe(server, false);
                if let Some(trace) = trace.as_deref_mut() {
                    trace.server = Some(Arc::from(server.name.as_str()));
                    trace.gave_up = true;
                }
                return local(status);
            }
            Err(Failure::Client) => return local(StatusCode::BAD_REQUEST),
            // The client's fault (a stalled or oversized upload): never counted against the server.
            Err(Failure::ClientStatus(status)) => return local(status),
        }
    }
    local(if unanswered {
        StatusCode::BAD_GATEWAY
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    })
}

/// What stickiness did for a request `server` answered.
fn sticky_outcome(
    sticky: &Option<(&Arc<Sticky>, crate::sticky::ClientKey)>,
    snapshot: &PoolSnapshot,
    server: &Arc<Server>,
) -> crate::access_log::StickyOutcome {
    use crate::access_log::StickyOutcome;
    match sticky {
        None => StickyOutcome::None,
        Some((_, client)) if !client.known() => StickyOutcome::Miss,
        Some((_, client)) => match client.server {
            Some(i) if Arc::ptr_eq(&snapshot.servers[i], server) => StickyOutcome::Hit,
            _ => StickyOutcome::Redispatch,
        },
    }
}

/// After `server` answered: the sticky client is remembered there (its cookie `Secure` on `https`).
fn remember(
    sticky: &Option<(&Arc<Sticky>, crate::sticky::ClientKey)>,
    snapshot: &PoolSnapshot,
    server: &Arc<Server>,
    ctx: &ConnContext,
    resp: &mut Response<ProxyBody>,
) {
    if let Some((sticky, client)) = sticky {
        let stuck_here = client
            .server
            .is_some_and(|i| Arc::ptr_eq(&snapshot.servers[i], server));
        let secure = ctx.listener.proto == "https";
        sticky.remember(client, server, stuck_here, secure, resp.headers_mut());
    }
}

/// A request body on its way: read by fulcrum's own client, or handed to hyper (with what its
/// wrapper records about the client's upload).
enum Upload {
    Own(RequestIn),
    Hyper(Option<client::ReqBody>, Arc<client::UploadState>),
}

/// Answers with a server's response that came through hyper.
fn respond_client(answer: client::Answer, guard: InFlight) -> Response<ProxyBody> {
    let (mut parts, body) = answer.response.into_parts();
    rewrite_response(&mut parts.headers, false);
    parts.version = http::Version::HTTP_11;
    Response::from_parts(
        parts,
        ProxyBody::Client(client::ClientBody::new(body, guard, answer.stream)),
    )
}

/// Waits in the pool's queue until a server is below its limit (true) or `deadline` passes or the
/// queue is full (false, counted as refused).
async fn wait_for_slot(snapshot: &PoolSnapshot, deadline: Instant) -> bool {
    let Some(queue) = snapshot.queue() else {
        return false;
    };
    let Some(place) = queue.join(snapshot.settings.max_queue) else {
        queue.refused.fetch_add(1, Ordering::Relaxed);
        return false;
    };
    loop {
        let freed = place.freed();
        tokio::pin!(freed);
        freed.as_mut().enable();
        if !snapshot.saturated() {
            queue.served.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        if tokio::time::timeout_at(deadline.into(), freed)
            .await
            .is_err()
        {
            queue.refused.fetch_add(1, Ordering::Relaxed);
            return false;
        }
    }
}

/// The request's hash key for the pool's `hash_key`; `None` when the request lacks it.
pub(crate) fn request_key<B>(key: &HashKey, req: &Request<B>, client: &Client) -> Option<u64> {
    Some(match key {
        HashKey::SourceIp => crate::balance::address_key(client.addr, false),
        HashKey::SourceIpPort => crate::balance::address_key(client.addr, true),
        HashKey::Uri => hash_key(
            req.uri()
                .path_and_query()
                .map(|pq| pq.as_str())
                .unwrap_or("/")
                .as_bytes(),
        ),
        HashKey::Header(name) => hash_key(req.headers().get(name)?.as_bytes()),
        HashKey::Cookie(name) => hash_key(route::cookie(req.headers(), name)?.as_bytes()),
    })
}

/// Where an exchange failed.
enum Stage {
    Send(SendError),
    Read(ReadError),
}

/// Sends the request to `server` and reads the response head.
async fn exchange(
    server: &Arc<Server>,
    settings: &PoolSettings,
    parts: &http::request::Parts,
    body: &mut RequestIn,
    framing: RequestBody,
    client_limits: (Duration, Option<u64>),
) -> Result<(ResponseHead, UpstreamConn, Duration), Failure> {
    let limits = BodyLimits {
        client_timeout: client_limits.0,
        server_timeout: settings.response_timeout,
        max: client_limits.1,
    };
    // A request without a body and with an idempotent method may be sent again when a reused
    // connection turns out closed before any byte of answer came back (RFC 9110 §9.2.2).
    let replayable = framing == RequestBody::Empty && parts.method.is_idempotent();
    let mut idle = upstream::take_idle(server);
    loop {
        let reused = idle.is_some();
        let mut conn = match idle.take() {
            Some(c) => c,
            None => match upstream::connect(server.address, settings.connect_timeout).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(server = %server.name, error = %e, "server connect failed");
                    return Err(if e.was_reset() {
                        Failure::Unanswered
                    } else {
                        Failure::NotSent
                    });
                }
            },
        };
        let started = Instant::now();
        // The upload is bounded by progress (the client's body_timeout, the server's
        // response_timeout), not by its length; the response timeout starts once it is sent.
        let error = match conn.send(parts, body, framing, limits).await {
            Err(e) => Stage::Send(e),
            Ok(()) => {
                let head =
                    tokio::time::timeout(settings.response_timeout, conn.read_head(&parts.method))
                        .await;
                match head {
                    Ok(Ok(head)) => return Ok((head, conn, started.elapsed())),
                    Ok(Err(e)) => Stage::Read(e),
                    Err(_) => {
                        tracing::warn!(server = %server.name, timeout = ?settings.response_timeout, "server timed out");
                        return Err(Failure::Failed(StatusCode::GATEWAY_TIMEOUT));
                    }
                }
            }
        };
        match error {
            Stage::Send(SendError::Head(_)) if reused => continue,
            Stage::Read(ReadError::Closed) if reused && replayable => continue,
            // Closed before a byte of answer on a fresh connection: an idempotent request without a
            // body may go to the next server.
            Stage::Read(ReadError::Closed) if replayable => {
                tracing::warn!(server = %server.name, "server closed the connection without answering; trying the next one");
                return Err(Failure::Unanswered);
            }
            Stage::Send(SendError::Head(e)) => {
                tracing::warn!(server = %server.name, error = %e, "sending to the server failed");
                return Err(Failure::Unanswered);
            }
            Stage::Send(SendError::Client(e)) => {
                tracing::debug!(error = %e, "client request body failed");
                return Err(Failure::Client);
            }
            Stage::Send(SendError::ClientTimeout) => {
                return Err(Failure::ClientStatus(StatusCode::REQUEST_TIMEOUT));
            }
            Stage::Send(SendError::TooLarge) => {
                return Err(Failure::ClientStatus(StatusCode::PAYLOAD_TOO_LARGE));
            }
            Stage::Send(SendError::ServerTimeout) => {
                tracing::warn!(server = %server.name, "the server stopped reading the request body");
                return Err(Failure::Failed(StatusCode::GATEWAY_TIMEOUT));
            }
            Stage::Read(e) => {
                tracing::warn!(server = %server.name, error = %e, "server exchange failed");
                return Err(Failure::Failed(StatusCode::BAD_GATEWAY));
            }
        }
    }
}

fn respond(
    head: ResponseHead,
    conn: UpstreamConn,
    guard: InFlight,
    client_upgrade: Option<super::h1::ClientUpgrade>,
    ctx: &Arc<ConnContext>,
) -> Response<ProxyBody> {
    let ResponseHead {
        status,
        mut headers,
        framing,
        keep_alive,
    } = head;
    let body = if status == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client_upgrade) = client_upgrade else {
            // A server may not switch protocols unasked.
            guard.server().stats.record_failure();
            return local(StatusCode::BAD_GATEWAY);
        };
        // The tunnel keeps the client connection counted (its slot, its address's share) and is
        // drained with its listener.
        ctx.tracker.spawn(tunnel(
            client_upgrade,
            ServerSide::Plain(conn),
            guard,
            ctx.clone(),
        ));
        ProxyBody::empty()
    } else {
        rewrite_response(&mut headers, false);
        ProxyBody::Upstream(UpstreamBody::new(conn, framing, keep_alive, guard))
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    resp
}

/// The server's end of a tunnel.
enum ServerSide {
    /// A plain connection of fulcrum's own client, with the bytes it read past the `101`.
    Plain(UpstreamConn),
    /// A connection of hyper's client (TLS), handed over once hyper has read the `101`.
    Upgraded(hyper::upgrade::OnUpgrade),
}

/// Copies bytes both ways between an upgraded client connection and the server until either closes,
/// the tunnel sees no traffic for `tunnel_timeout`, or the connection's deadline fires (a drain that
/// ran out of time).
async fn tunnel(
    client: super::h1::ClientUpgrade,
    server: ServerSide,
    guard: InFlight,
    ctx: Arc<ConnContext>,
) {
    let upgraded = match client.wait().await {
        Ok(u) => u,
        Err(e) => {
            tracing::debug!(error = %e, "client upgrade failed");
            return;
        }
    };
    match server {
        ServerSide::Plain(conn) => {
            let (server, early) = conn.into_parts();
            relay_tunnel(upgraded, server, &early, guard, ctx).await;
        }
        ServerSide::Upgraded(on) => match on.await {
            Ok(server) => {
                let server = hyper_util::rt::TokioIo::new(server);
                relay_tunnel(upgraded, server, &[], guard, ctx).await;
            }
            Err(e) => {
                tracing::debug!(server = %guard.server().name, error = %e, "server upgrade failed")
            }
        },
    }
}

/// The copying half of [`tunnel`]: `early` (bytes the server sent past its `101`) first.
async fn relay_tunnel<C, S>(
    upgraded: C,
    server: S,
    early: &[u8],
    guard: InFlight,
    ctx: Arc<ConnContext>,
) where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let activity = Arc::new(AtomicU64::new(crate::clock::now_ms()));
    let mut client = Watched::new(upgraded, activity.clone());
    let mut server = Watched::new(server, activity.clone());
    if !early.is_empty() && client.write_all(early).await.is_err() {
        return;
    }
    let idle = ctx.settings.tunnel_timeout;
    let quiet = async {
        loop {
            let last = activity.load(Ordering::Relaxed);
            let since = Duration::from_millis(crate::clock::now_ms().saturating_sub(last));
            if since >= idle {
                return;
            }
            tokio::time::sleep(idle - since).await;
        }
    };
    tokio::select! {
        r = tokio::io::copy_bidirectional(&mut client, &mut server) => {
            if let Err(e) = r {
                tracing::debug!(server = %guard.server().name, error = %e, "tunnel closed");
            }
        }
        _ = quiet => tracing::debug!(server = %guard.server().name, "tunnel idle: closed"),
        _ = ctx.deadline.cancelled() => {}
    }
    drop(guard);
}

/// An I/O object that stamps the time of every byte moved (for a tunnel's idle clock).
struct Watched<T> {
    inner: T,
    activity: Arc<AtomicU64>,
}

impl<T> Watched<T> {
    fn new(inner: T, activity: Arc<AtomicU64>) -> Self {
        Watched { inner, activity }
    }

    fn stamp(&self) {
        self.activity
            .store(crate::clock::now_ms(), Ordering::Relaxed);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.stamp();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.stamp();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A response generated by fulcrum itself, with a short plain-text body saying why.
pub fn local(status: StatusCode) -> Response<ProxyBody> {
    let body: &'static str = match status {
        StatusCode::BAD_REQUEST => "400 Bad Request\n",
        StatusCode::REQUEST_TIMEOUT => "408 Request Timeout: the request body stopped arriving\n",
        StatusCode::PAYLOAD_TOO_LARGE => "413 Content Too Large\n",
        StatusCode::BAD_GATEWAY => "502 Bad Gateway: the server failed to answer\n",
        StatusCode::SERVICE_UNAVAILABLE => "503 Service Unavailable: no server is available\n",
        StatusCode::GATEWAY_TIMEOUT => "504 Gateway Timeout: the server did not answer in time\n",
        _ => "error\n",
    };
    local_with(status, body)
}

/// A response generated by fulcrum itself with this body.
pub fn local_with(status: StatusCode, body: &'static str) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::full(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

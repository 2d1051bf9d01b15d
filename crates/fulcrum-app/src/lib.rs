//! `fulcrum-app`: the demo web application server ("WAS") that sits behind the
//! fulcrum load balancer.
//!
//! It exists to make balancing visible and testable: every response names the
//! instance that produced it (`x-server` header, and the first line of `GET /`),
//! `GET /` echoes the request line and headers as received (so proxy headers
//! such as `X-Forwarded-For` can be checked, and the protocol: `GET / HTTP/1.1`
//! or `GET / HTTP/2.0`), and login sessions show what happens to sticky state
//! when requests move between instances. A handful of utility endpoints produce
//! slow, failing, large or streaming traffic:
//!
//! | Endpoint              | Behaviour |
//! |-----------------------|-----------|
//! | `GET /`               | `server: NAME`, the request line, then every request header |
//! | `GET /health`         | `200 ok`, or the status set by `POST /health {"status": 503}` |
//! | `POST /login`         | `{"user": "martin"}` → session + `SESSIONID` cookie |
//! | `GET /me`             | the logged-in user, or `401` |
//! | `PUT /me`             | `{"user": "ada"}` → changes the session's user, or `401` |
//! | `POST /logout`        | ends the session, clears the cookie |
//! | `GET /delay/{ms}`     | answers after `ms` milliseconds (≤ 60 000) |
//! | `GET /status/{code}`  | answers with that status (200..=599) |
//! | `GET /bytes/{n}`      | `n` streamed bytes of `abc…z` (≤ 2 GiB) |
//! | `POST /echo`          | streams the request body back |
//! | `POST /sha256`        | `{"bytes": N, "sha256": "…"}` of the streamed request body |
//! | `GET /ws`             | WebSocket echo (HTTP/1.1 upgrade) |
//! | `GET /cache/{seconds}`| `Cache-Control: public, max-age=SECONDS`, an `ETag` (304 to a matching `If-None-Match`), `x-calls: N` (calls so far) |
//! | `ANY /headers/{tag}`  | response headers from the query (below), 304 on a matching `If-None-Match` / `If-Modified-Since`, `x-calls: N` per tag |
//! | `GET /calls/{tag}`    | how many times `/headers/{tag}` (or `/cache/{s}` as `cache-{s}`) was called |
//! | `GET /metrics`        | session figures in the Prometheus text format |
//!
//! With `--sessions cluster`, `/_cluster/replicate`, `/_cluster/session/{id}`,
//! `/_cluster/snapshot` and `/_cluster/status` serve the peers (see below).
//!
//! `/headers/{tag}` (`/headers` is tag `default`) takes `cache-control`, `vary`, `set-cookie`,
//! `etag`, `last-modified` and `expires` (an HTTP date, or `-N` / `+N` seconds from now),
//! `status`, and `bytes` with `delay`: a body of that many pattern bytes whose first 26 come at once
//! and the rest after `delay` milliseconds. Without `bytes` the body names the tag, the call, and
//! the values of the request headers `vary` lists — what a cache test needs to see which response
//! it was given and how often the server was asked.
//!
//! # Protocols
//!
//! A plain listener takes HTTP/1.1 and h2c (HTTP/2 with prior knowledge: a
//! connection that opens with the HTTP/2 preface). With
//! [`AppConfig::with_tls`] (`--tls cert.pem,key.pem`) the listener takes TLS
//! 1.2/1.3 only, offering ALPN `h2` and `http/1.1`: a client that picks `h2`
//! speaks HTTP/2, any other HTTP/1.1. A TLS handshake that fails or takes
//! longer than [`TLS_HANDSHAKE_TIMEOUT`] closes only that connection.
//!
//! # Sessions
//!
//! [`Sessions::Memory`] (the default) keeps sessions in the process: a login
//! only counts on the instance that made it, which is what sticky balancing is
//! for. With [`Sessions::Redis`] (`--sessions redis://host:port[/db]`, or
//! `rediss://` for TLS) sessions live in Redis under
//! `fulcrum-app:session:{id}` as JSON `{"user": "…"}` with a 30 minute TTL that
//! `GET /me` refreshes, so every instance using that Redis honours every login.
//! [`Sessions::RedisCluster`] (`--sessions redis-cluster://host:port,…`) keeps
//! the same keys on a Redis Cluster, and [`Sessions::RedisSentinel`]
//! (`--sessions redis-sentinel://host:port,…/master`) in the master Redis
//! Sentinel names, asking the Sentinels again after any error to follow a
//! failover.
//!
//! With [`Sessions::Cluster`] (`--sessions cluster --peers host:port,…`) each
//! instance keeps every session in memory and replicates each login, update
//! and logout to its peers over HTTP: any instance answers for any session,
//! and the death of one loses nothing. Peers come from the command line, a
//! file or a fulcrum admin API pool ([`ClusterConfig`]), and may join and
//! leave while the cluster runs; see `docs/sessions.md`, "Session
//! clustering", for versions, pulls on miss, snapshots, metrics and costs.
//!
//! Redis is connected to lazily, so an instance starts (and serves everything
//! else) while Redis is down. Each Redis step is bounded (500 ms to connect,
//! 500 ms per command); when one fails the session endpoints answer
//! `503 {"error": "session store unavailable", "server": NAME}` and a warning
//! is logged. Broken connections are replaced on the next request, so sessions
//! work again as soon as Redis is back, without a restart (sessions stored
//! before a Redis restart survive only if Redis persisted them). A request
//! without a `SESSIONID` cookie never needs Redis: `GET /me` answers `401`.
//!
//! The `fulcrum-app` binary wraps [`serve`]; the balancer's `fulcrum demo` and
//! integration tests embed instances with [`spawn`].

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

mod cluster;
mod routes;
mod server;
mod sessions;
mod tls;

pub use cluster::{
    parse_peer_list, ClusterConfig, DEFAULT_PEERS_REFRESH, PULL_TIMEOUT, QUEUE_CAPACITY,
    TOMBSTONE_TTL,
};
pub use server::TLS_HANDSHAKE_TIMEOUT;
pub use sessions::{ParseSessionsError, Sessions, REDIS_KEY_PREFIX, REDIS_SESSION_TTL};
pub use tls::{ParseTlsFilesError, TlsFiles};

/// Configuration of one app instance.
#[derive(Debug, Clone)]
pub struct AppConfig {
    /// Name reported in the `x-server` header and in response bodies.
    pub name: String,
    /// Where login sessions are stored.
    pub sessions: Sessions,
    /// Extra latency added before every response.
    pub delay: Duration,
    /// Serve TLS with these files instead of plain TCP; see
    /// [`AppConfig::with_tls`].
    pub tls: Option<TlsFiles>,
    /// Peers and secret of a [`Sessions::Cluster`] store (unused otherwise).
    pub cluster: ClusterConfig,
}

impl AppConfig {
    /// A config named `name` with in-memory sessions and no added delay; see
    /// [`AppConfig::with_sessions`] for Redis.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            sessions: Sessions::Memory,
            delay: Duration::ZERO,
            tls: None,
            cluster: ClusterConfig::default(),
        }
    }

    /// Sets the peers and secret used with [`Sessions::Cluster`].
    #[must_use]
    pub fn with_cluster(mut self, cluster: ClusterConfig) -> Self {
        self.cluster = cluster;
        self
    }

    /// Sets the latency added before every response.
    #[must_use]
    pub fn with_delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Sets the session store, e.g. `"redis://127.0.0.1:6379".parse()?` to
    /// share sessions with every instance using that Redis.
    #[must_use]
    pub fn with_sessions(mut self, sessions: Sessions) -> Self {
        self.sessions = sessions;
        self
    }

    /// Serves TLS (1.2 and 1.3) with the certificate chain and key in `files`
    /// instead of plain TCP: ALPN offers `h2` and `http/1.1`, and a client
    /// that picks `h2` speaks HTTP/2, any other HTTP/1.1 (WebSocket included).
    /// [`serve`] and [`spawn`] read the files when they start.
    #[must_use]
    pub fn with_tls(mut self, files: TlsFiles) -> Self {
        self.tls = Some(files);
        self
    }
}

/// The app's routes as an [`axum::Router`], with fresh state (sessions, health)
/// built from `cfg`.
///
/// A Redis session store connects on first use, so this needs no Redis (nor a
/// runtime). A cluster store starts replicating at once, so it must be built
/// inside a tokio runtime, and it advertises no address of its own unless
/// [`ClusterConfig::advertise`] is set. An invalid hand-built [`Sessions::Redis`] URL is logged and makes
/// the session endpoints answer `503`; [`serve`] and [`spawn`] reject it.
pub fn router(cfg: AppConfig) -> axum::Router {
    routes::router(cfg, None)
}

/// Serves the app on an already-bound `listener` until `shutdown` resolves,
/// then stops accepting, lets in-flight requests finish and returns.
///
/// On plain TCP each connection speaks HTTP/1.1 (keep-alive, WebSocket
/// upgrades) or, when it opens with the HTTP/2 preface, h2c (HTTP/2 with
/// prior knowledge). With [`AppConfig::with_tls`] every connection starts with
/// a TLS handshake (at most [`TLS_HANDSHAKE_TIMEOUT`]; a failed one closes only
/// that connection), then speaks HTTP/2 if ALPN chose `h2`, else HTTP/1.1.
///
/// Fails at once with [`io::ErrorKind::InvalidInput`] if `cfg.sessions` holds a
/// Redis URL that does not parse (an unreachable Redis is no error), and with
/// the error of [`TlsFiles::server_config`] if the TLS files cannot be used.
pub async fn serve(
    listener: TcpListener,
    cfg: AppConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let tls = prepare(&cfg)?;
    let local = listener.local_addr().ok();
    server::run(listener, routes::router(cfg, local), tls, shutdown).await;
    Ok(())
}

/// Binds `addr` (use `127.0.0.1:0` for an ephemeral port) and runs [`serve`] on
/// the current tokio runtime in the background.
///
/// The returned handle knows the bound address. Dropping it starts a graceful
/// shutdown in the background; [`AppHandle::stop`] does the same and waits for
/// it to finish. Fails like [`serve`] on an invalid Redis URL or unusable TLS
/// files, before binding.
pub async fn spawn(addr: SocketAddr, cfg: AppConfig) -> io::Result<AppHandle> {
    let tls = prepare(&cfg)?;
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let (shutdown, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        // A send or a dropped sender both end the wait.
        let signal = async {
            let _ = stopped.await;
        };
        server::run(listener, routes::router(cfg, Some(addr)), tls, signal).await;
    });
    Ok(AppHandle {
        addr,
        shutdown,
        task,
    })
}

/// Checks the session store URL and loads the TLS configuration, if any.
fn prepare(cfg: &AppConfig) -> io::Result<Option<Arc<rustls::ServerConfig>>> {
    cfg.sessions
        .validate()
        .map_err(|err| io::Error::new(io::ErrorKind::InvalidInput, err))?;
    if cfg.sessions == Sessions::Cluster {
        cfg.cluster
            .validate()
            .map_err(|err| io::Error::new(io::ErrorKind::InvalidInput, err))?;
    }
    cfg.tls.as_ref().map(TlsFiles::server_config).transpose()
}

/// A running app instance started by [`spawn`].
///
/// Dropping the handle shuts the instance down gracefully in the background.
#[derive(Debug)]
pub struct AppHandle {
    addr: SocketAddr,
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl AppHandle {
    /// The address the instance listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Shuts the instance down and waits until in-flight requests have finished.
    pub async fn stop(self) {
        let _ = self.shutdown.send(());
        let _ = self.task.await;
    }
}

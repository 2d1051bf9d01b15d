//! `fulcrum-app`: the demo web application server ("WAS") that sits behind the
//! fulcrum load balancer.
//!
//! It exists to make balancing visible and testable: every response names the
//! instance that produced it (`x-server` header, and the first line of `GET /`),
//! `GET /` echoes the request line and headers as received (so proxy headers
//! such as `X-Forwarded-For` can be checked), and login sessions show what
//! happens to sticky state when requests move between instances. A handful of
//! utility endpoints produce slow, failing, large or streaming traffic:
//!
//! | Endpoint              | Behaviour |
//! |-----------------------|-----------|
//! | `GET /`               | `server: NAME`, the request line, then every request header |
//! | `GET /health`         | `200 ok`, or the status set by `POST /health {"status": 503}` |
//! | `POST /login`         | `{"user": "martin"}` → session + `SESSIONID` cookie |
//! | `GET /me`             | the logged-in user, or `401` |
//! | `POST /logout`        | ends the session, clears the cookie |
//! | `GET /delay/{ms}`     | answers after `ms` milliseconds (≤ 60 000) |
//! | `GET /status/{code}`  | answers with that status (200..=599) |
//! | `GET /bytes/{n}`      | `n` streamed bytes of `abc…z` (≤ 2 GiB) |
//! | `POST /echo`          | streams the request body back |
//! | `POST /sha256`        | `{"bytes": N, "sha256": "…"}` of the streamed request body |
//! | `GET /ws`             | WebSocket echo |
//!
//! # Sessions
//!
//! [`Sessions::Memory`] (the default) keeps sessions in the process: a login
//! only counts on the instance that made it, which is what sticky balancing is
//! for. With [`Sessions::Redis`] (`--sessions redis://host:port[/db]`, or
//! `rediss://` for TLS) sessions live in Redis under
//! `fulcrum-app:session:{id}` as JSON `{"user": "…"}` with a 30 minute TTL that
//! `GET /me` refreshes, so every instance using that Redis honours every login.
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
use std::time::Duration;

use axum::serve::ListenerExt as _;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

mod routes;
mod sessions;

pub use sessions::{ParseSessionsError, Sessions, REDIS_KEY_PREFIX, REDIS_SESSION_TTL};

/// Configuration of one app instance.
#[derive(Debug, Clone)]
pub struct AppConfig {
    /// Name reported in the `x-server` header and in response bodies.
    pub name: String,
    /// Where login sessions are stored.
    pub sessions: Sessions,
    /// Extra latency added before every response.
    pub delay: Duration,
}

impl AppConfig {
    /// A config named `name` with in-memory sessions and no added delay; see
    /// [`AppConfig::with_sessions`] for Redis.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            sessions: Sessions::Memory,
            delay: Duration::ZERO,
        }
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
}

/// The app's routes as an [`axum::Router`], with fresh state (sessions, health)
/// built from `cfg`.
///
/// A Redis session store connects on first use, so this needs no Redis (nor a
/// runtime). An invalid hand-built [`Sessions::Redis`] URL is logged and makes
/// the session endpoints answer `503`; [`serve`] and [`spawn`] reject it.
pub fn router(cfg: AppConfig) -> axum::Router {
    routes::router(cfg)
}

/// Serves the app on an already-bound `listener` (HTTP/1.1 with keep-alive,
/// WebSocket upgrades) until `shutdown` resolves, then stops accepting, lets
/// in-flight requests finish and returns.
///
/// Fails at once with [`io::ErrorKind::InvalidInput`] if `cfg.sessions` holds a
/// Redis URL that does not parse; an unreachable Redis is no error.
pub async fn serve(
    listener: TcpListener,
    cfg: AppConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    validate(&cfg)?;
    let listener = listener.tap_io(|tcp| {
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::debug!("failed to set TCP_NODELAY: {err}");
        }
    });
    axum::serve(listener, router(cfg))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Binds `addr` (use `127.0.0.1:0` for an ephemeral port) and runs [`serve`] on
/// the current tokio runtime in the background.
///
/// The returned handle knows the bound address. Dropping it starts a graceful
/// shutdown in the background; [`AppHandle::stop`] does the same and waits for
/// it to finish. Fails like [`serve`] on an invalid Redis URL.
pub async fn spawn(addr: SocketAddr, cfg: AppConfig) -> io::Result<AppHandle> {
    validate(&cfg)?;
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let (shutdown, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let name = cfg.name.clone();
        // A send or a dropped sender both end the wait.
        let signal = async {
            let _ = stopped.await;
        };
        if let Err(err) = serve(listener, cfg, signal).await {
            tracing::error!(server = %name, "fulcrum-app failed: {err}");
        }
    });
    Ok(AppHandle {
        addr,
        shutdown,
        task,
    })
}

fn validate(cfg: &AppConfig) -> io::Result<()> {
    cfg.sessions
        .validate()
        .map_err(|err| io::Error::new(io::ErrorKind::InvalidInput, err))
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

//! Active checks: an L4 TCP connect, an L7 HTTP request or a gRPC health check, each bounded by the
//! check's `timeout`, repeated every `interval` with jitter.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::icmp::Pinger;
use super::{unix_ms, CheckResult, Health};
use crate::config::{HealthCheckConfig, HealthCheckKind};

/// The most of an HTTP check's answer that is read.
const MAX_ANSWER: usize = 64 * 1024;

/// What to check, and how.
#[derive(Debug, Clone)]
pub struct CheckSpec {
    /// The pool's name (for logs).
    pub pool: String,
    /// The server's name (for logs).
    pub server: String,
    /// Where to check.
    pub address: SocketAddr,
    /// The pool's `[health_check]`.
    pub cfg: HealthCheckConfig,
    /// ICMP sockets, for `kind = "icmp"`.
    pub pinger: Option<Pinger>,
    /// Spreads the first checks of a pool's servers over the first interval (and picks the ICMP id).
    pub seed: u64,
    /// TLS to the server (the pool's `tls`), for `http` and `grpc` checks.
    pub tls: Option<CheckTls>,
}

/// How a check reaches a server that speaks TLS.
#[derive(Clone)]
pub struct CheckTls {
    /// The pool's client configuration, with the check's ALPN.
    pub connector: tokio_rustls::TlsConnector,
    /// The name sent and verified (`tls.sni`); absent: the server's IP address.
    pub sni: Option<String>,
}

impl std::fmt::Debug for CheckTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckTls").field("sni", &self.sni).finish()
    }
}

/// Starts the check loop of one server on the current runtime; it ends when `stop` fires.
///
/// `target` is anything that leads to the server's [`Health`] (the pool passes its `Arc<Server>`).
pub fn spawn_checks<S>(spec: CheckSpec, target: Arc<S>, stop: CancellationToken)
where
    S: AsRef<Health> + Send + Sync + 'static,
{
    let CheckSpec {
        pool,
        server,
        address,
        cfg,
        pinger,
        seed,
        tls,
    } = spec;
    tokio::spawn(async move {
        let health: &Health = S::as_ref(&target);
        let mut rng = seed | 1;
        let first = cfg.interval.mul_f64(unit(&mut rng));
        if sleep_or_stop(first, &stop).await {
            return;
        }
        let ident = seed as u16;
        let mut seq: u16 = 0;
        loop {
            let started = Instant::now();
            seq = seq.wrapping_add(1);
            let check = async {
                match (&pinger, cfg.kind) {
                    (Some(p), HealthCheckKind::Icmp) => {
                        p.ping(address.ip(), ident, seq, cfg.timeout).await
                    }
                    _ => probe(&cfg, address, tls.as_ref()).await,
                }
            };
            // ICMP enforces `timeout` itself (and says so); the outer bound is only a safety net there.
            let bound = if pinger.is_some() {
                cfg.timeout * 2
            } else {
                cfg.timeout
            };
            let outcome = match tokio::time::timeout(bound, check).await {
                Ok(outcome) => outcome,
                Err(_) => Err(format!("timed out after {:?}", cfg.timeout)),
            };
            let latency_ms = started.elapsed().as_secs_f64() * 1e3;
            let (ok, message) = match outcome {
                Ok(message) => (true, message),
                Err(message) => (false, message),
            };
            let result = CheckResult {
                ok,
                at_unix_ms: unix_ms(),
                latency_ms: (latency_ms * 1000.0).round() / 1000.0,
                message,
            };
            if let Some(up) = health.record_check(result, cfg.rise, cfg.fall) {
                let reason = health.last_change().map(|c| c.reason).unwrap_or_default();
                if up {
                    tracing::info!(pool = %pool, server = %server, %reason, "server is up");
                } else {
                    tracing::warn!(pool = %pool, server = %server, %reason, "server is down");
                }
            }
            // ±10% jitter keeps servers checked at the same moment from staying in step.
            let next = cfg.interval.mul_f64(0.9 + 0.2 * unit(&mut rng));
            if sleep_or_stop(next, &stop).await {
                return;
            }
        }
    });
}

async fn sleep_or_stop(d: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = stop.cancelled() => true,
    }
}

/// A uniform number in [0, 1) from a xorshift state.
fn unit(state: &mut u64) -> f64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    (*state >> 11) as f64 / (1u64 << 53) as f64
}

/// One check: `Ok(what was seen)` or `Err(why it failed)`.
pub(super) async fn probe(
    cfg: &HealthCheckConfig,
    address: SocketAddr,
    tls: Option<&CheckTls>,
) -> Result<String, String> {
    if cfg.kind == HealthCheckKind::Icmp {
        return Err("no ICMP socket".to_owned());
    }
    let stream = TcpStream::connect(address)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    // A check is a few small writes: do not let Nagle hold one back.
    let _ = stream.set_nodelay(true);
    match tls {
        Some(tls) if cfg.kind != HealthCheckKind::Tcp => {
            let name = match &tls.sni {
                Some(n) => rustls::pki_types::ServerName::try_from(n.clone())
                    .map_err(|e| format!("sni: {e}"))?,
                None => rustls::pki_types::ServerName::from(address.ip()),
            };
            let stream = tls
                .connector
                .connect(name, stream)
                .await
                .map_err(|e| format!("TLS handshake: {e}"))?;
            probe_on(cfg, address, stream).await
        }
        _ => probe_on(cfg, address, stream).await,
    }
}

/// The check's exchange on a connected (and, for TLS pools, encrypted) stream.
async fn probe_on<S>(
    cfg: &HealthCheckConfig,
    address: SocketAddr,
    mut stream: S,
) -> Result<String, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    match cfg.kind {
        HealthCheckKind::Tcp => Ok("TCP connect".to_owned()),
        HealthCheckKind::Http => http_probe(cfg, address, &mut stream).await,
        HealthCheckKind::Grpc => {
            super::grpc::grpc_probe(&cfg.service, cfg.timeout, address, stream).await
        }
        // ICMP goes through a `Pinger`; without one, reaching the port is all that can be said.
        HealthCheckKind::Icmp => Err("no ICMP socket".to_owned()),
    }
}

async fn http_probe<S>(
    cfg: &HealthCheckConfig,
    address: SocketAddr,
    stream: &mut S,
) -> Result<String, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let host = cfg.host.clone().unwrap_or_else(|| address.to_string());
    let request = format!(
        "{} {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: fulcrum-health-check\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        cfg.method, cfg.path
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("send: {e}"))?;
    let mut answer = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 || answer.len() >= MAX_ANSWER {
            break;
        }
        answer.extend_from_slice(&chunk[..n.min(MAX_ANSWER - answer.len())]);
        // Without a body to check, the status line is enough.
        if cfg.expect_body.is_none() && answer.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(&answer) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err("incomplete HTTP answer".to_owned()),
        Err(e) => return Err(format!("invalid HTTP answer: {e}")),
    };
    let status = response.code.unwrap_or(0);
    let (low, high) = cfg.expect_status;
    if !(low..=high).contains(&status) {
        return Err(format!("HTTP {status}, expected {low}-{high}"));
    }
    if let Some(want) = &cfg.expect_body {
        let body = &answer[head_len..];
        if !body.windows(want.len()).any(|w| w == want.as_bytes()) {
            return Err(format!("HTTP {status}, body lacks {want:?}"));
        }
    }
    Ok(format!("HTTP {status}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(kind: HealthCheckKind) -> HealthCheckConfig {
        HealthCheckConfig {
            kind,
            path: "/health".into(),
            expect_status: (200, 399),
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
            method: http::Method::GET,
            host: None,
            expect_body: None,
            service: String::new(),
            initial_up: true,
        }
    }

    #[tokio::test]
    async fn http_checks_read_status_and_body() {
        let app = fulcrum_app::spawn(
            "127.0.0.1:0".parse().unwrap(),
            fulcrum_app::AppConfig::new("A"),
        )
        .await
        .unwrap();
        let http = cfg(HealthCheckKind::Http);
        assert_eq!(
            probe(&http, app.addr(), None).await,
            Ok("HTTP 200".to_owned())
        );
        let mut body = cfg(HealthCheckKind::Http);
        body.expect_body = Some("ok".into());
        assert!(probe(&body, app.addr(), None).await.is_ok());
        body.expect_body = Some("nope".into());
        assert!(probe(&body, app.addr(), None)
            .await
            .unwrap_err()
            .contains("body lacks"));
        let mut missing = cfg(HealthCheckKind::Http);
        missing.path = "/nothing-here".into();
        assert!(probe(&missing, app.addr(), None)
            .await
            .unwrap_err()
            .contains("HTTP 404"));
        assert_eq!(
            probe(&cfg(HealthCheckKind::Tcp), app.addr(), None).await,
            Ok("TCP connect".to_owned())
        );
        let addr = app.addr();
        app.stop().await;
        assert!(probe(&cfg(HealthCheckKind::Tcp), addr, None)
            .await
            .unwrap_err()
            .starts_with("connect:"));
    }

    #[tokio::test]
    async fn grpc_checks_ask_the_standard_health_service() {
        use tonic_health::ServingStatus;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (reporter, service) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("echo.Echo", ServingStatus::Serving)
            .await;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(listener),
                    async {
                        let _ = stopped.await;
                    },
                ),
        );
        let mut grpc = cfg(HealthCheckKind::Grpc);
        assert_eq!(
            probe(&grpc, addr, None).await,
            Ok("gRPC SERVING".to_owned())
        );
        reporter
            .set_service_status("", ServingStatus::NotServing)
            .await;
        assert_eq!(
            probe(&grpc, addr, None).await,
            Err("gRPC NOT_SERVING".to_owned())
        );
        grpc.service = "echo.Echo".into();
        assert_eq!(
            probe(&grpc, addr, None).await,
            Ok("gRPC SERVING".to_owned())
        );
        grpc.service = "no.such.Service".into();
        assert_eq!(
            probe(&grpc, addr, None).await,
            Err("grpc-status 5: service not registered".to_owned())
        );
        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
        assert!(probe(&grpc, addr, None)
            .await
            .unwrap_err()
            .starts_with("connect:"));
        // An HTTP server is no gRPC server.
        let app = fulcrum_app::spawn(
            "127.0.0.1:0".parse().unwrap(),
            fulcrum_app::AppConfig::new("A"),
        )
        .await
        .unwrap();
        assert_eq!(
            probe(&cfg(HealthCheckKind::Grpc), app.addr(), None).await,
            Err("HTTP 404".to_owned())
        );
        app.stop().await;
    }

    #[test]
    fn jitter_stays_in_range() {
        let mut s = 42;
        for _ in 0..1000 {
            let u = unit(&mut s);
            assert!((0.0..1.0).contains(&u));
        }
    }
}

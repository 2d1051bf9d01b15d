//! The accept loop: HTTP/1.1 and HTTP/2 over plain TCP (h2c by prior
//! knowledge) or TLS (h2 by ALPN), with graceful shutdown.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::tls::ALPN_H2;

/// Longest a client may take to complete its TLS handshake.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

type Service = TowerToHyperService<axum::Router>;

/// Accepts connections on `listener` and serves `router` on each until
/// `shutdown` resolves; then stops accepting, abandons unfinished TLS
/// handshakes, asks every connection to close once its in-flight requests are
/// answered, and returns when all have closed.
pub(crate) async fn run(
    listener: TcpListener,
    router: axum::Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: impl Future<Output = ()>,
) {
    let service = TowerToHyperService::new(router);
    let acceptor = tls.map(TlsAcceptor::from);
    let graceful = GracefulShutdown::new();
    // Dropped at shutdown: ends the TLS handshakes still under way.
    let (handshakes_tx, handshakes_rx) = watch::channel(());
    let mut shutdown = pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) if is_connection_error(&err) => continue,
            Err(err) => {
                // Most likely out of file descriptors: back off instead of spinning.
                tracing::error!("accept failed: {err}");
                tokio::select! {
                    () = &mut shutdown => break,
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::debug!("failed to set TCP_NODELAY: {err}");
        }
        let watcher = graceful.watcher();
        let service = service.clone();
        match &acceptor {
            None => {
                tokio::spawn(serve_plain(tcp, peer, service, watcher));
            }
            Some(acceptor) => {
                let stop = handshakes_rx.clone();
                tokio::spawn(serve_tls(
                    tcp,
                    peer,
                    acceptor.clone(),
                    service,
                    watcher,
                    stop,
                ));
            }
        }
    }
    drop(listener);
    drop(handshakes_tx);
    graceful.shutdown().await;
}

/// Errors that concern one connection only: accepting simply goes on.
fn is_connection_error(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// The connection builder: HTTP/1.1 or HTTP/2, told apart by the HTTP/2
/// connection preface.
fn builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Extended CONNECT (RFC 8441), as `axum::serve` enables it.
    builder.http2().enable_connect_protocol();
    builder
}

/// Plain TCP: HTTP/1.1 (with upgrades, for `/ws`) or h2c with prior knowledge.
async fn serve_plain(tcp: TcpStream, peer: SocketAddr, service: Service, watcher: Watcher) {
    let builder = builder();
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(tcp), service);
    if let Err(err) = watcher.watch(conn).await {
        tracing::trace!(%peer, "connection error: {err}");
    }
}

/// TLS: the handshake (bounded by [`TLS_HANDSHAKE_TIMEOUT`] and abandoned at
/// shutdown), then HTTP/2 if ALPN chose `h2`, else HTTP/1.1 with upgrades.
async fn serve_tls(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    service: Service,
    watcher: Watcher,
    mut stop: watch::Receiver<()>,
) {
    let handshake = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp));
    let stream = tokio::select! {
        result = handshake => match result {
            Ok(Ok(stream)) => stream,
            Ok(Err(err)) => {
                tracing::debug!(%peer, "TLS handshake failed: {err}");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, "TLS handshake timed out");
                return;
            }
        },
        // Only ever an error: the sender is dropped at shutdown, never used.
        _ = stop.changed() => return,
    };
    let h2 = stream.get_ref().1.alpn_protocol() == Some(ALPN_H2);
    let io = TokioIo::new(stream);
    let builder = builder();
    let result = if h2 {
        let builder = builder.http2_only();
        watcher.watch(builder.serve_connection(io, service)).await
    } else {
        watcher
            .watch(builder.serve_connection_with_upgrades(io, service))
            .await
    };
    if let Err(err) = result {
        tracing::trace!(%peer, "connection error: {err}");
    }
}

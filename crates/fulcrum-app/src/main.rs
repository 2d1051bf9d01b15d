//! `fulcrum-app`: runs one demo web app server instance for the fulcrum load balancer.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use fulcrum_app::{serve, AppConfig, ClusterConfig, Sessions, TlsFiles};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

/// Demo web app server for fulcrum: names itself, echoes requests, keeps login sessions.
#[derive(Debug, Parser)]
#[command(name = "fulcrum-app", version, about)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9001")]
    listen: SocketAddr,

    /// Server name reported in responses [default: the listen address].
    #[arg(long)]
    name: Option<String>,

    /// Session store: `memory` (this instance only), `cluster` (replicated to
    /// --peers), `redis://HOST:PORT[/DB]` or `redis-cluster://HOST:PORT[,HOST:PORT…]`
    /// (shared).
    ///
    /// `memory` keeps sessions in this process. `cluster` keeps them in this
    /// process too and replicates every login, update and logout to the peers
    /// (--peers, --peers-file, --peers-from), so any instance answers for any
    /// session. A Redis URL,
    /// `redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]` (`rediss://` for TLS, add
    /// `#insecure` to skip certificate checks), keeps them in Redis, so every
    /// instance using that Redis shares them;
    /// `redis-cluster://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT…]` keeps them in
    /// a Redis Cluster reached through those seed nodes;
    /// `redis-sentinel://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT…]/MASTER[/DB]`
    /// keeps them in the master those Sentinels name, and follows a failover.
    /// Redis may be down at start or go away later: the session endpoints
    /// answer 503 until it is reachable again (on a cluster or through
    /// Sentinel: until the failed master's replica takes over).
    #[arg(long, default_value = "memory", value_name = "memory|cluster|URL")]
    sessions: Sessions,

    /// Cluster peers, `HOST:PORT,HOST:PORT` (with `--sessions cluster`).
    ///
    /// Listing this instance itself is harmless: it is recognised and skipped.
    #[arg(long, value_delimiter = ',', value_name = "HOST:PORT,…")]
    peers: Vec<String>,

    /// A file of cluster peers (`HOST:PORT` per line or comma separated, `#`
    /// comments), re-read every --peers-refresh.
    #[arg(long, value_name = "PATH")]
    peers_file: Option<PathBuf>,

    /// Take the cluster peers from a fulcrum admin API pool, e.g.
    /// `http://127.0.0.1:9090/api/v1/pools/web`, re-read every --peers-refresh.
    #[arg(long, value_name = "URL")]
    peers_from: Option<String>,

    /// How often --peers-file and --peers-from are read again.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    peers_refresh: Duration,

    /// Shared secret of the cluster: `/_cluster/*` requests must carry
    /// `Authorization: Bearer SECRET`. Set one in production.
    #[arg(long, env = "FULCRUM_APP_CLUSTER_SECRET", hide_env_values = true)]
    cluster_secret: Option<String>,

    /// The `HOST:PORT` peers reach this instance at [default: the listen
    /// address, unless it is 0.0.0.0 or [::]].
    #[arg(long, value_name = "HOST:PORT")]
    cluster_advertise: Option<String>,

    /// Latency added before every response, e.g. `50ms` or `1s`.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    delay: Duration,

    /// Serve TLS with this PEM certificate chain and private key.
    ///
    /// ALPN offers `h2` and `http/1.1`: clients that pick `h2` speak HTTP/2,
    /// others HTTP/1.1 (WebSocket included). Without `--tls` the listener is
    /// plain TCP and takes HTTP/1.1 as well as h2c (HTTP/2 with prior knowledge).
    #[arg(long, value_name = "CERT,KEY")]
    tls: Option<TlsFiles>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let clustered = args.sessions == Sessions::Cluster;
    if !clustered
        && (!args.peers.is_empty()
            || args.peers_file.is_some()
            || args.peers_from.is_some()
            || args.cluster_advertise.is_some())
    {
        anyhow::bail!(
            "--peers, --peers-file, --peers-from and --cluster-advertise need --sessions cluster"
        );
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();

    if let Some(files) = &args.tls {
        // Fail before listening; `serve` reads the files again when it starts.
        files.server_config().context("invalid --tls")?;
    }
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let name = args.name.unwrap_or_else(|| addr.to_string());
    let scheme = if args.tls.is_some() { "https" } else { "http" };

    let mut cfg = AppConfig::new(name.clone())
        .with_sessions(args.sessions)
        .with_delay(args.delay)
        .with_cluster(ClusterConfig {
            peers: args.peers,
            peers_file: args.peers_file,
            peers_from: args.peers_from,
            refresh: args.peers_refresh,
            secret: args.cluster_secret,
            advertise: args.cluster_advertise,
        });
    if clustered {
        cfg.cluster.validate().map_err(anyhow::Error::msg)?;
    }
    if let Some(files) = args.tls {
        cfg = cfg.with_tls(files);
    }
    tracing::info!(
        sessions = %cfg.sessions,
        delay = %humantime::format_duration(cfg.delay),
        "fulcrum-app {name:?} listening on {scheme}://{addr}"
    );
    serve(listener, cfg, shutdown_signal())
        .await
        .context("server failed")?;
    tracing::info!("stopped");
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!("cannot listen for SIGINT: {err}");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut sigterm) => {
                sigterm.recv().await;
            }
            Err(err) => {
                tracing::error!("cannot listen for SIGTERM: {err}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();

    tokio::select! {
        () = interrupt => tracing::info!("SIGINT received, shutting down"),
        () = terminate => tracing::info!("SIGTERM received, shutting down"),
    }
}

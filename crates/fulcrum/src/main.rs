//! The `fulcrum` command: parses the CLI and hands over to the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fulcrum::demo::{self, DemoOptions};
use fulcrum::logging::{self, LogFormat};
use fulcrum::runtime::{self, Running};

/// mimalloc's thread-local free lists suit a proxy's many short-lived, same-sized allocations.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Gives back to the system the pages this thread freed more than mimalloc's `purge_delay` ago.
/// mimalloc purges them only on a later allocation of the thread that freed them; a worker whose
/// connections all wait (parked, allocating nothing) would otherwise keep them. Run at each worker's
/// 500 ms heartbeat; with nothing to purge it costs a walk of the thread's pages.
#[allow(unsafe_code)]
fn return_freed_memory() {
    // SAFETY: `mi_collect` takes no pointer and may be called on any thread at any time; `false`
    // asks only for what is due (no forced purge of memory in use).
    unsafe { libmimalloc_sys::mi_collect(false) }
}

/// A load balancer for HTTP and TCP/UDP.
#[derive(Debug, Parser)]
#[command(name = "fulcrum", version, about)]
struct Cli {
    /// Log line format (logs go to stderr; filter with RUST_LOG).
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the balancer from a configuration file.
    Run {
        /// The configuration file.
        #[arg(long, env = "FULCRUM_CONFIG", default_value = "fulcrum.toml")]
        config: PathBuf,
        /// Binary upgrade without refusing a connection: when a fulcrum offers its listening sockets
        /// at this Unix socket, take them over (it then drains and exits); then offer ours there to
        /// the next one.
        #[arg(long, env = "FULCRUM_TAKEOVER_SOCKET")]
        takeover_socket: Option<PathBuf>,
    },
    /// Validate a configuration file and exit.
    Check {
        /// The configuration file.
        #[arg(long, env = "FULCRUM_CONFIG", default_value = "fulcrum.toml")]
        config: PathBuf,
    },
    /// Run demo servers in-process behind a balancer, with the dashboard.
    Demo {
        /// How many demo servers.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=64))]
        servers: u16,
        /// The balancer's address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        bind: SocketAddr,
        /// The admin API and dashboard's address.
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin: SocketAddr,
        /// Where the demo servers keep login sessions: `memory` (each its own), `cluster` (each
        /// replicates to the others), `redis://HOST:PORT`, `redis-cluster://HOST:PORT[,HOST:PORT…]` or
        /// `redis-sentinel://HOST:PORT[,HOST:PORT…]/MASTER` (shared).
        #[arg(long, default_value = "memory")]
        sessions: fulcrum_app::Sessions,
        /// Keep each client on one server: `cookie`, `app_cookie` or `source_ip`.
        #[arg(long, value_parser = ["cookie", "app_cookie", "source_ip"])]
        sticky: Option<String>,
    },
    /// Compare the balancing algorithms on a pool: replay an access log's arrivals (or a synthetic
    /// workload) through each algorithm's real picker, in virtual time.
    Simulate(fulcrum::simulate::Command),
    /// Run one demo server, as `fulcrum-app` does (for tests and quick experiments).
    #[command(hide = true)]
    App {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:9001")]
        listen: SocketAddr,
        /// The server's name (defaults to the address).
        #[arg(long)]
        name: Option<String>,
        /// Latency added to every response, e.g. "50ms".
        #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
        delay: std::time::Duration,
        /// Serve TLS (ALPN h2 and http/1.1) with this PEM certificate chain and key: `CERT,KEY`.
        #[arg(long, value_name = "CERT,KEY")]
        tls: Option<fulcrum_app::TlsFiles>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    runtime::set_worker_housekeeping(return_freed_memory);
    // Dropping the guard (when main returns) writes out the queued log lines.
    let _log = logging::init(cli.log_format);
    let result = match cli.command {
        Command::Check { config } => match fulcrum::config::load(&config)
            .map_err(|e| e.to_string())
            .and_then(|c| runtime::check_capabilities(&c).map_err(|e| e.to_string()))
        {
            Ok(()) => {
                println!("configuration OK");
                Ok(())
            }
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
        },
        Command::Run {
            config,
            takeover_socket,
        } => run(config, takeover_socket),
        Command::Demo {
            servers,
            bind,
            admin,
            sessions,
            sticky,
        } => demo(DemoOptions {
            servers: usize::from(servers),
            bind,
            admin,
            sessions,
            sticky,
        }),
        Command::Simulate(cmd) => fulcrum::simulate::command(&cmd)
            .map(|out| print!("{out}"))
            .map_err(|e| anyhow::anyhow!(e)),
        Command::App {
            listen,
            name,
            delay,
            tls,
        } => app(listen, name, delay, tls),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fulcrum: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(path: PathBuf, takeover_socket: Option<PathBuf>) -> anyhow::Result<()> {
    let config = fulcrum::config::load(&path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut opts = runtime::StartOptions {
        config_path: Some(path),
        handoff: takeover_socket.clone(),
        ..Default::default()
    };
    let mut ready = None;
    if let Some(socket) = &takeover_socket {
        match fulcrum::takeover::receive(socket, std::time::Duration::from_secs(10)) {
            Ok((inherited, r)) => {
                tracing::info!(sockets = inherited.len(), from = %socket.display(), "taking over the listening sockets of the running fulcrum");
                opts.inherited = Some(inherited);
                ready = Some(r);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                tracing::debug!(socket = %socket.display(), "no running fulcrum to take over from");
            }
            Err(e) => {
                return Err(anyhow::anyhow!(
                    "taking over from {}: {e}",
                    socket.display()
                ))
            }
        }
    }
    let running = runtime::start_with(config, opts)?;
    if let Some(ready) = ready {
        // Serving now: the previous process may drain.
        if let Err(e) = ready.confirm() {
            tracing::warn!(error = %e, "could not tell the previous fulcrum to drain");
        }
    }
    serve_until_signal(running)
}

fn demo(opts: DemoOptions) -> anyhow::Result<()> {
    let apps_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("fulcrum-demo-app")
        .enable_all()
        .build()?;
    let apps = apps_rt
        .block_on(demo::start_servers(opts.servers, &opts.sessions))
        .context("starting the demo servers")?;
    let servers: Vec<(String, SocketAddr)> = apps
        .iter()
        .enumerate()
        .map(|(i, a)| (format!("app-{}", i + 1), a.addr()))
        .collect();
    let config = demo::config(&opts, &servers).map_err(|e| anyhow::anyhow!("{e}"))?;
    let running = runtime::start(config)?;
    let bind = running.listener_addr("web").unwrap_or(opts.bind);
    let admin = running.admin_addr().unwrap_or(opts.admin);
    println!(
        "fulcrum demo: {} servers behind a round-robin pool",
        servers.len()
    );
    println!("  balancer   http://{bind}/");
    println!("  dashboard  http://{admin}/");
    println!("  metrics    http://{admin}/metrics");
    for (name, addr) in &servers {
        println!("  server     {name} at http://{addr}/");
    }
    if opts.sessions == fulcrum_app::Sessions::Cluster {
        if let Some((_, addr)) = servers.first() {
            println!(
                "  cluster    http://{addr}/_cluster/status and http://{addr}/metrics (any server)"
            );
        }
    }
    println!(
        "  sessions   {} on the servers; stickiness: {}",
        opts.sessions,
        opts.sticky.as_deref().unwrap_or("none")
    );
    println!("Try:  for i in 1 2 3 4 5 6; do curl -s http://{bind}/ | head -1; done");
    println!(
        "Log in, then ask who you are (the sessions problem, and its cures with --sticky, \
         --sessions redis://… or --sessions cluster):\n  \
         curl -s -c /tmp/jar -b /tmp/jar -X POST -d '{{\"user\":\"martin\"}}' http://{bind}/login; \
         for i in 1 2 3; do curl -s -b /tmp/jar -c /tmp/jar http://{bind}/me; echo; done"
    );
    println!("Ctrl-C stops the demo.");
    let result = serve_until_signal(running);
    drop(apps);
    drop(apps_rt);
    result
}

fn app(
    listen: SocketAddr,
    name: Option<String>,
    delay: std::time::Duration,
    tls: Option<fulcrum_app::TlsFiles>,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        let bound = listener.local_addr()?;
        let mut cfg = fulcrum_app::AppConfig::new(name.unwrap_or_else(|| bound.to_string()))
            .with_delay(delay);
        if let Some(tls) = tls {
            cfg = cfg.with_tls(tls);
        }
        tracing::info!(listen = %bound, name = %cfg.name, "demo server");
        let shutdown = async {
            use tokio::signal::unix::{signal, SignalKind};
            if let Ok(mut term) = signal(SignalKind::terminate()) {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
        };
        fulcrum_app::serve(listener, cfg, shutdown).await?;
        Ok(())
    })
}

/// Serves until SIGTERM or SIGINT (or a successor took over), then drains; a second signal exits at
/// once. SIGHUP reloads the configuration file; SIGUSR1 reopens the access log's file.
fn serve_until_signal(running: Running) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (mut term, mut int, mut hup, mut usr1) = rt.block_on(async {
        Ok::<_, std::io::Error>((
            signal(SignalKind::terminate())?,
            signal(SignalKind::interrupt())?,
            signal(SignalKind::hangup())?,
            signal(SignalKind::user_defined1())?,
        ))
    })?;
    let stopping = running.shared().stopping();
    let shared = running.shared().clone();
    rt.block_on(async {
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = stopping.cancelled() => break,
                _ = usr1.recv() => {
                    tracing::info!("SIGUSR1: reopening the access log");
                    fulcrum::access_log::reopen_all();
                }
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: reloading the configuration");
                    // The outcome is logged by the control task.
                    let _ = shared
                        .control(|reply| fulcrum::control::Command::Reload { reply })
                        .await;
                }
            }
        }
    });
    running.shutdown();
    std::thread::spawn(move || {
        rt.block_on(async {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        });
        tracing::warn!("second signal: exiting now");
        std::process::exit(1);
    });
    if !running.wait() {
        tracing::warn!("some connections were cut at shutdown_timeout");
    }
    tracing::info!("stopped");
    Ok(())
}

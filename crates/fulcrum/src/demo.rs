//! `fulcrum demo`: the embedded default. Starts N fulcrum-app servers in this process and a balancer in
//! front of them, so a newcomer sees load balancing happen with one command and no file to write.

use std::net::SocketAddr;

use fulcrum_app::{AppConfig, AppHandle};

use crate::config::{self, Config};

/// Where the demo listens.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Number of demo servers.
    pub servers: usize,
    /// The balancer's HTTP listener.
    pub bind: SocketAddr,
    /// The admin API and dashboard.
    pub admin: SocketAddr,
    /// Where the demo servers keep their login sessions.
    pub sessions: fulcrum_app::Sessions,
    /// Session persistence on the balancer: `cookie`, `app_cookie` or `source_ip`; `None` for none.
    pub sticky: Option<String>,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            servers: 3,
            bind: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin: SocketAddr::from(([127, 0, 0, 1], 9090)),
            sessions: fulcrum_app::Sessions::Memory,
            sticky: None,
        }
    }
}

/// The demo's configuration: one HTTP listener, one round-robin pool over `servers`, sticky if asked.
pub fn config(
    opts: &DemoOptions,
    servers: &[(String, SocketAddr)],
) -> Result<Config, config::ConfigError> {
    let list: Vec<String> = servers
        .iter()
        .map(|(name, addr)| format!("  {{ name = \"{name}\", address = \"{addr}\" }},"))
        .collect();
    let text = format!(
        "# fulcrum demo: generated\nshutdown_timeout = \"5s\"\n\n[admin]\nbind = \"{admin}\"\n\n\
         [[listeners]]\nname = \"web\"\nbind = \"{bind}\"\nprotocol = \"http\"\npool = \"demo\"\n\n\
         [[pools]]\nname = \"demo\"\nalgorithm = \"round_robin\"\nservers = [\n{list}\n]\n{sticky}",
        admin = opts.admin,
        bind = opts.bind,
        list = list.join("\n"),
        sticky = match opts.sticky.as_deref() {
            None => String::new(),
            Some("app_cookie") =>
                "\n[pools.sticky]\nkind = \"app_cookie\"\ncookie = \"SESSIONID\"\n".to_owned(),
            Some(kind) => format!("\n[pools.sticky]\nkind = \"{kind}\"\n"),
        },
    );
    config::parse(&text, "<demo>")
}

/// Starts the demo servers ("app-1", "app-2", …) on free loopback ports.
///
/// With [`fulcrum_app::Sessions::Cluster`] each server lists the ones started before it as its
/// peers; the earlier ones learn the later ones when these first contact them, so every server ends
/// up replicating to every other.
pub async fn start_servers(
    n: usize,
    sessions: &fulcrum_app::Sessions,
) -> std::io::Result<Vec<AppHandle>> {
    let mut apps: Vec<AppHandle> = Vec::with_capacity(n);
    for i in 1..=n {
        let name = format!("app-{i}");
        let mut cfg = AppConfig::new(name).with_sessions(sessions.clone());
        if *sessions == fulcrum_app::Sessions::Cluster {
            cfg = cfg.with_cluster(fulcrum_app::ClusterConfig {
                peers: apps.iter().map(|a| a.addr().to_string()).collect(),
                ..fulcrum_app::ClusterConfig::default()
            });
        }
        apps.push(fulcrum_app::spawn(SocketAddr::from(([127, 0, 0, 1], 0)), cfg).await?);
    }
    Ok(apps)
}

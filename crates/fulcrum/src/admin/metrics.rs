//! `GET /metrics`: Prometheus text format, every name prefixed `fulcrum_`.
//!
//! The request path only bumps atomics; this collector turns them into metric families at scrape time,
//! so no label lookup or lock ever runs per request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::listener::ListenerStats;
use crate::pool::{PoolSnapshot, Server, ServerState};
use crate::runtime::Shared;

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

#[derive(Debug)]
struct FulcrumCollector {
    shared: Arc<Shared>,
}

impl Collector for FulcrumCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let shared = &self.shared;
        let state = shared.state();

        let version = [("version", env!("CARGO_PKG_VERSION"))];
        ConstGauge::new(1i64).encode(
            enc.encode_descriptor("build_info", "fulcrum version", None, MetricType::Gauge)?
                .encode_family(&version)?,
        )?;

        let mut m = enc.encode_descriptor(
            "listener_connections_active",
            "Open client connections",
            None,
            MetricType::Gauge,
        )?;
        for l in &state.listeners {
            let labels = [("listener", l.name.as_str())];
            ConstGauge::new(l.stats().active_connections.load(Ordering::Relaxed))
                .encode(m.encode_family(&labels)?)?;
        }
        let mut m = enc.encode_descriptor(
            "listener_connections_parked",
            "Open client connections parked without a task while they wait for a request",
            None,
            MetricType::Gauge,
        )?;
        for l in &state.listeners {
            let labels = [("listener", l.name.as_str())];
            ConstGauge::new(l.stats().parked_connections.load(Ordering::Relaxed))
                .encode(m.encode_family(&labels)?)?;
        }
        let mut m = enc.encode_descriptor(
            "listener_connections",
            "Client connections accepted",
            None,
            MetricType::Counter,
        )?;
        for l in &state.listeners {
            let labels = [("listener", l.name.as_str())];
            ConstCounter::new(l.stats().connections_total.load(Ordering::Relaxed))
                .encode(m.encode_family(&labels)?)?;
        }
        for (name, help, read) in [
            (
                "listener_idle_timeouts",
                "Client connections closed after idle_timeout without a byte",
                (|s: &ListenerStats| s.idle_timeouts.load(Ordering::Relaxed))
                    as fn(&ListenerStats) -> u64,
            ),
            (
                "listener_write_timeouts",
                "Client connections cut after write_timeout without reading their response",
                |s: &ListenerStats| s.write_timeouts.load(Ordering::Relaxed),
            ),
            (
                "listener_spliced_bytes",
                "Response body bytes moved to clients with splice(2), never through user space",
                |s: &ListenerStats| s.spliced_bytes.load(Ordering::Relaxed),
            ),
            (
                "listener_tls_handshakes",
                "TLS handshakes completed (https listeners)",
                |s: &ListenerStats| s.tls_handshakes.load(Ordering::Relaxed),
            ),
            (
                "listener_tls_resumed",
                "TLS handshakes that resumed a session (ticket or session id)",
                |s: &ListenerStats| s.tls_resumed.load(Ordering::Relaxed),
            ),
            (
                "listener_tls_handshake_failures",
                "TLS handshakes that failed or took longer than handshake_timeout",
                |s: &ListenerStats| s.tls_handshake_failures.load(Ordering::Relaxed),
            ),
            (
                "listener_refused_per_ip",
                "Connections refused because their address was at max_connections_per_ip",
                |s: &ListenerStats| s.refused_per_ip.load(Ordering::Relaxed),
            ),
        ] {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for l in &state.listeners {
                let labels = [("listener", l.name.as_str())];
                ConstCounter::new(read(l.stats())).encode(m.encode_family(&labels)?)?;
            }
        }
        let mut m = enc.encode_descriptor(
            "listener_refused",
            "Connections refused at accept, by reason (access: allow/deny lists or a ban; per_ip: max_connections_per_ip)",
            None,
            MetricType::Counter,
        )?;
        for l in &state.listeners {
            let Some(filter) = l.filter().map(|f| f.load()) else {
                continue;
            };
            for (reason, n) in [
                ("access", filter.refused_at_accept.load(Ordering::Relaxed)),
                ("per_ip", l.stats().refused_per_ip.load(Ordering::Relaxed)),
            ] {
                let labels = [("listener", l.name.as_str()), ("reason", reason)];
                ConstCounter::new(n).encode(m.encode_family(&labels)?)?;
            }
        }
        let mut m = enc.encode_descriptor(
            "rate_limited_requests",
            "Requests answered 429 by a rate limit",
            None,
            MetricType::Counter,
        )?;
        for l in &state.listeners {
            let Some(http) = l.http() else { continue };
            let filter = http.filter.load();
            let router = http.router.load();
            let n = filter.filter.rate_limited.load(Ordering::Relaxed)
                + router
                    .routes
                    .iter()
                    .filter_map(|(_, t)| t.filter.as_ref())
                    .map(|f| f.rate_limited.load(Ordering::Relaxed))
                    .sum::<u64>();
            ConstCounter::new(n).encode(m.encode_family(&[("listener", l.name.as_str())])?)?;
        }
        let mut m = enc.encode_descriptor(
            "blocked_requests",
            "Requests answered 403 by a deny rule, by rule",
            None,
            MetricType::Counter,
        )?;
        for l in &state.listeners {
            let Some(http) = l.http() else { continue };
            let filter = http.filter.load();
            let router = http.router.load();
            let route_rules = router
                .routes
                .iter()
                .filter_map(|(_, t)| t.filter.as_deref());
            for rules in std::iter::once(&filter.filter)
                .chain(route_rules)
                .map(|f| &f.rules)
            {
                for (rule, n) in rules.hits() {
                    let labels = [("listener", l.name.as_str()), ("rule", rule)];
                    ConstCounter::new(n).encode(m.encode_family(&labels)?)?;
                }
            }
        }
        let mut m = enc.encode_descriptor(
            "bans_active",
            "Client addresses (IPv6: /64 networks) banned now",
            None,
            MetricType::Gauge,
        )?;
        for l in &state.listeners {
            let Some(filter) = l.filter() else { continue };
            let n = filter.load().bans.list().len();
            ConstGauge::new(n as i64).encode(m.encode_family(&[("listener", l.name.as_str())])?)?;
        }
        // L4 listeners.
        type TcpRead = fn(&crate::l4::tcp::TcpStats) -> u64;
        let tcp: [(&str, &str, TcpRead); 6] = [
            ("tcp_bytes_in", "Bytes from clients to servers (tcp listeners)", |t| {
                t.bytes_in.load(Ordering::Relaxed)
            }),
            ("tcp_bytes_out", "Bytes from servers to clients (tcp listeners)", |t| {
                t.bytes_out.load(Ordering::Relaxed)
            }),
            (
                "tcp_refused_no_server",
                "TCP connections closed at once: no server could take them",
                |t| t.refused_no_server.load(Ordering::Relaxed),
            ),
            (
                "tcp_bad_hello",
                "TCP connections closed: no usable TLS ClientHello for sni routes",
                |t| t.bad_hello.load(Ordering::Relaxed),
            ),
            (
                "tcp_bad_proxy_header",
                "TCP connections closed: a PROXY header missing or malformed from a trusted source, or sent by an untrusted one",
                |t| t.bad_proxy_header.load(Ordering::Relaxed),
            ),
            (
                "tcp_idle_timeouts",
                "TCP sessions closed after idle_timeout without a byte",
                |t| t.idle_timeouts.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, read) in tcp {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for l in &state.listeners {
                if let crate::runtime::Handler::Tcp(t) = &l.handler {
                    ConstCounter::new(read(&t.tcp))
                        .encode(m.encode_family(&[("listener", l.name.as_str())])?)?;
                }
            }
        }
        type UdpRead = fn(&crate::l4::udp::UdpStats) -> u64;
        let udp: [(&str, &str, UdpRead); 8] = [
            ("udp_datagrams_in", "Datagrams from clients", |u| {
                u.datagrams_in.load(Ordering::Relaxed)
            }),
            ("udp_datagrams_out", "Datagrams to clients", |u| {
                u.datagrams_out.load(Ordering::Relaxed)
            }),
            ("udp_bytes_in", "Bytes from clients", |u| {
                u.bytes_in.load(Ordering::Relaxed)
            }),
            ("udp_bytes_out", "Bytes to clients", |u| {
                u.bytes_out.load(Ordering::Relaxed)
            }),
            ("udp_flows", "Client flows started", |u| {
                u.flows_total.load(Ordering::Relaxed)
            }),
            (
                "udp_flows_refused",
                "New flows refused: the flow table was at max_flows",
                |u| u.flows_refused.load(Ordering::Relaxed),
            ),
            ("udp_flows_expired", "Flows ended after idle_timeout", |u| {
                u.flows_expired.load(Ordering::Relaxed)
            }),
            (
                "udp_dropped",
                "Datagrams dropped: no server available",
                |u| u.dropped.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, read) in udp {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for l in &state.listeners {
                if let crate::runtime::Handler::Udp(u, _) = &l.handler {
                    ConstCounter::new(read(&u.stats))
                        .encode(m.encode_family(&[("listener", l.name.as_str())])?)?;
                }
            }
        }
        let mut m = enc.encode_descriptor(
            "udp_flows_active",
            "Client flows open now",
            None,
            MetricType::Gauge,
        )?;
        for l in &state.listeners {
            if let crate::runtime::Handler::Udp(u, _) = &l.handler {
                ConstGauge::new(u.stats.flows_active.load(Ordering::Relaxed))
                    .encode(m.encode_family(&[("listener", l.name.as_str())])?)?;
            }
        }
        let mut m = enc.encode_descriptor(
            "listener_responses",
            "Responses sent to clients, by status class (fulcrum's own 502/503/504 included)",
            None,
            MetricType::Counter,
        )?;
        for l in &state.listeners {
            for (i, class) in CLASSES.iter().enumerate() {
                let labels = [("listener", l.name.as_str()), ("class", class)];
                ConstCounter::new(l.stats().responses[i].load(Ordering::Relaxed))
                    .encode(m.encode_family(&labels)?)?;
            }
        }

        // Shared stick tables (one per sticky pool).
        let tables: Vec<(&str, u64)> = state
            .pools
            .iter()
            .filter_map(|e| {
                let table = e.sticky.as_ref()?.shared()?;
                Some((e.pool.name.as_str(), table.errors()))
            })
            .collect();
        if !tables.is_empty() {
            let mut m = enc.encode_descriptor(
                "store_errors",
                "Redis stick-table commands that failed or timed out (the local table answered instead)",
                None,
                MetricType::Counter,
            )?;
            for (pool, errors) in &tables {
                let labels = [("pool", *pool)];
                ConstCounter::new(*errors).encode(m.encode_family(&labels)?)?;
            }
        }

        // HTTP caches (a pool's own, and routes' own), labelled by pool and scope.
        let caches: Vec<&Arc<crate::cache::Cache>> =
            state.pools.iter().flat_map(|e| e.caches.iter()).collect();
        if !caches.is_empty() {
            for (name, help, read) in [
                (
                    "cache_hits",
                    "Requests answered from the cache (fresh, or revalidated with a 304)",
                    (|c: &crate::cache::Cache| c.stats.hits.load(Ordering::Relaxed))
                        as fn(&crate::cache::Cache) -> u64,
                ),
                (
                    "cache_misses",
                    "Cacheable requests sent to a server",
                    |c: &crate::cache::Cache| c.stats.misses.load(Ordering::Relaxed),
                ),
                (
                    "cache_stale",
                    "Requests answered with a stale entry (stale-while-revalidate, stale-if-error)",
                    |c: &crate::cache::Cache| c.stats.stale.load(Ordering::Relaxed),
                ),
                (
                    "cache_bypass",
                    "Requests that bypassed the cache (methods other than GET and HEAD, upgrades)",
                    |c: &crate::cache::Cache| c.stats.bypass.load(Ordering::Relaxed),
                ),
                (
                    "cache_stores",
                    "Responses stored",
                    |c: &crate::cache::Cache| c.stats.stores.load(Ordering::Relaxed),
                ),
                (
                    "cache_evictions",
                    "Entries evicted to stay within max_size",
                    |c: &crate::cache::Cache| c.evictions(),
                ),
            ] {
                let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
                for c in &caches {
                    let labels = [("pool", c.pool.as_str()), ("scope", c.scope.as_str())];
                    ConstCounter::new(read(c)).encode(m.encode_family(&labels)?)?;
                }
            }
            let mut m = enc.encode_descriptor(
                "cache_bytes",
                "Bytes held by the cache (bodies, headers, keys)",
                None,
                MetricType::Gauge,
            )?;
            for c in &caches {
                let labels = [("pool", c.pool.as_str()), ("scope", c.scope.as_str())];
                ConstGauge::new(c.bytes() as i64).encode(m.encode_family(&labels)?)?;
            }
        }

        let snapshots: Vec<_> = state
            .pools
            .iter()
            .map(|e| (e.pool.name.as_str(), e.pool.snapshot_full()))
            .collect();
        let mut m = enc.encode_descriptor(
            "server_requests",
            "Responses from servers, by status class",
            None,
            MetricType::Counter,
        )?;
        for (pool, snap) in &snapshots {
            for s in &snap.servers {
                for (i, class) in CLASSES.iter().enumerate() {
                    let labels = [
                        ("pool", *pool),
                        ("server", s.name.as_str()),
                        ("class", class),
                    ];
                    ConstCounter::new(s.stats.responses[i].load(Ordering::Relaxed))
                        .encode(m.encode_family(&labels)?)?;
                }
            }
        }
        per_server(
            &mut enc,
            &snapshots,
            "server_failures",
            "Requests that failed at the server (connect, reset, timeout)",
            |s| Value::Counter(s.stats.failures_total()),
        )?;
        per_server(
            &mut enc,
            &snapshots,
            "server_sessions",
            "L4 sessions sent to the server (TCP connections, UDP flows)",
            |s| Value::Counter(s.stats.sessions.load(Ordering::Relaxed)),
        )?;
        for (name, help, counters) in [
            (
                "server_l4_bytes",
                "L4 payload bytes to and from the server (TCP sessions, UDP datagrams)",
                (|s: &Server| &s.stats.l4_bytes) as fn(&Server) -> &[AtomicU64; 2],
            ),
            (
                "server_datagrams",
                "UDP datagrams to and from the server",
                |s: &Server| &s.stats.datagrams,
            ),
        ] {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (pool, snap) in &snapshots {
                for s in &snap.servers {
                    for (i, direction) in ["to_server", "from_server"].into_iter().enumerate() {
                        let labels = [
                            ("pool", *pool),
                            ("server", s.name.as_str()),
                            ("direction", direction),
                        ];
                        ConstCounter::new(counters(s)[i].load(Ordering::Relaxed))
                            .encode(m.encode_family(&labels)?)?;
                    }
                }
            }
        }
        per_server(
            &mut enc,
            &snapshots,
            "server_active_requests",
            "Requests in flight on the server",
            |s| Value::Gauge(s.stats.in_flight()),
        )?;
        let mut m = enc.encode_descriptor(
            "server_state",
            "1 for the server's current state, 0 for the others",
            None,
            MetricType::Gauge,
        )?;
        for (pool, snap) in &snapshots {
            for s in &snap.servers {
                let current = s.effective_state();
                for st in ServerState::ALL {
                    let labels = [
                        ("pool", *pool),
                        ("server", s.name.as_str()),
                        ("state", st.as_str()),
                    ];
                    ConstGauge::new(i64::from(current == st)).encode(m.encode_family(&labels)?)?;
                }
            }
        }
        per_server(
            &mut enc,
            &snapshots,
            "server_transitions",
            "Health changes of the server (up to down and back, passive ejections included)",
            |s| Value::Counter(s.health.transitions()),
        )?;
        per_server(
            &mut enc,
            &snapshots,
            "server_ejections",
            "Passive ejections of the server",
            |s| Value::Counter(s.health.ejections_total()),
        )?;
        for (name, help, n) in [
            (
                "log_lines_dropped",
                "Diagnostic log lines dropped because stderr did not keep up (workers never wait for it)",
                crate::logging::dropped(),
            ),
            (
                "log_lines_suppressed",
                "Diagnostic log lines suppressed by the per-statement rate limit",
                crate::logging::suppressed(),
            ),
        ] {
            let m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(n).encode(m)?;
        }
        if let Some(log) = shared.access_log.load_full() {
            for (name, help, counter) in [
                (
                    "access_log_lines",
                    "Access log lines written",
                    &log.counters.written,
                ),
                (
                    "access_log_dropped",
                    "Access log lines dropped because the writer was behind (requests never wait for it)",
                    &log.counters.dropped,
                ),
                (
                    "access_log_errors",
                    "Access log writes or reopens that failed",
                    &log.counters.errors,
                ),
            ] {
                let m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
                ConstCounter::new(counter.load(Ordering::Relaxed)).encode(m)?;
            }
        }
        let mut m = enc.encode_descriptor(
            "config_reloads",
            "Configuration reloads, by result (error: refused, the running configuration stayed)",
            None,
            MetricType::Counter,
        )?;
        for (result, n) in [
            ("ok", &shared.reloads.ok),
            ("error", &shared.reloads.failed),
        ] {
            ConstCounter::new(n.load(Ordering::Relaxed))
                .encode(m.encode_family(&[("result", result)])?)?;
        }
        if let Some(ha) = &shared.ha {
            let now = ha.state();
            let mut m = enc.encode_descriptor(
                "ha_state",
                "The VRRP role of this instance ([ha]): 1 for the current one",
                None,
                MetricType::Gauge,
            )?;
            for role in ["initialize", "backup", "master", "fault"] {
                ConstGauge::new(i64::from(role == now))
                    .encode(m.encode_family(&[("state", role)])?)?;
            }
            let mut m = enc.encode_descriptor(
                "ha_transitions",
                "Entries into a VRRP role",
                None,
                MetricType::Counter,
            )?;
            for (role, n) in [
                ("backup", &ha.became_backup),
                ("master", &ha.became_master),
                ("fault", &ha.became_fault),
            ] {
                ConstCounter::new(n.load(Ordering::Relaxed))
                    .encode(m.encode_family(&[("to", role)])?)?;
            }
            let mut m = enc.encode_descriptor(
                "ha_adverts",
                "VRRP adverts: sent, received from the group, rejected (malformed, bad TTL or checksum)",
                None,
                MetricType::Counter,
            )?;
            for (kind, n) in [
                ("sent", &ha.adverts_sent),
                ("received", &ha.adverts_received),
                ("rejected", &ha.adverts_rejected),
            ] {
                ConstCounter::new(n.load(Ordering::Relaxed))
                    .encode(m.encode_family(&[("kind", kind)])?)?;
            }
        }
        let mut m = enc.encode_descriptor(
            "pool_servers",
            "Servers in the pool, by effective state",
            None,
            MetricType::Gauge,
        )?;
        for (pool, snap) in &snapshots {
            for st in ServerState::ALL {
                let n = snap
                    .servers
                    .iter()
                    .filter(|s| s.effective_state() == st)
                    .count();
                ConstGauge::new(n as i64)
                    .encode(m.encode_family(&[("pool", *pool), ("state", st.as_str())])?)?;
            }
        }
        let mut m = enc.encode_descriptor(
            "pool_saturation",
            "Requests in flight per available server, against the pool's saturation_target (1 = at target)",
            None,
            MetricType::Gauge,
        )?;
        for ((pool, snap), entry) in snapshots.iter().zip(&state.pools) {
            let sat = snap.saturation(entry.pool.config().saturation_target);
            ConstGauge::new(if sat.is_finite() { sat } else { f64::MAX })
                .encode(m.encode_family(&[("pool", *pool)])?)?;
        }
        let mut m = enc.encode_descriptor(
            "pool_queue_waiting",
            "Requests waiting for a server below max_connections_per_server",
            None,
            MetricType::Gauge,
        )?;
        for (pool, snap) in &snapshots {
            let n = snap.queue().map_or(0, |q| q.waiting());
            ConstGauge::new(n as i64).encode(m.encode_family(&[("pool", *pool)])?)?;
        }
        let mut m = enc.encode_descriptor(
            "pool_queue_refused",
            "Requests answered 503 because the queue was full or they waited queue_timeout",
            None,
            MetricType::Counter,
        )?;
        for (pool, snap) in &snapshots {
            let n = snap
                .queue()
                .map_or(0, |q| q.refused.load(Ordering::Relaxed));
            ConstCounter::new(n).encode(m.encode_family(&[("pool", *pool)])?)?;
        }
        let mut m = enc.encode_descriptor(
            "server_response_seconds",
            "Time from sending a request to receiving the server's response head",
            None,
            MetricType::Histogram,
        )?;
        for (pool, snap) in &snapshots {
            for s in &snap.servers {
                let labels = [("pool", *pool), ("server", s.name.as_str())];
                let (buckets, count, sum) = s.stats.latency_histogram();
                m.encode_family(&labels)?
                    .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                        sum, count, &buckets, None,
                    )?;
            }
        }
        Ok(())
    }
}

/// One sample of a per-server metric.
enum Value {
    Counter(u64),
    Gauge(i64),
}

/// Encodes one family with a `{pool, server}` sample per server.
fn per_server(
    enc: &mut DescriptorEncoder,
    snapshots: &[(&str, Arc<PoolSnapshot>)],
    name: &str,
    help: &str,
    value: impl Fn(&Server) -> Value,
) -> Result<(), std::fmt::Error> {
    let Some(first) = snapshots.iter().flat_map(|(_, s)| s.servers.first()).next() else {
        return Ok(());
    };
    let metric_type = match value(first) {
        Value::Counter(_) => MetricType::Counter,
        Value::Gauge(_) => MetricType::Gauge,
    };
    let mut m = enc.encode_descriptor(name, help, None, metric_type)?;
    for (pool, snap) in snapshots {
        for s in &snap.servers {
            let labels = [("pool", *pool), ("server", s.name.as_str())];
            match value(s) {
                Value::Counter(v) => ConstCounter::new(v).encode(m.encode_family(&labels)?)?,
                Value::Gauge(v) => ConstGauge::new(v).encode(m.encode_family(&labels)?)?,
            }
        }
    }
    Ok(())
}

/// Renders the registry for one scrape.
pub fn render(shared: Arc<Shared>) -> String {
    let mut registry = Registry::with_prefix("fulcrum");
    registry.register_collector(Box::new(FulcrumCollector { shared }));
    let mut out = String::with_capacity(8 * 1024);
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

pub async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    (
        [(
            CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        render(shared),
    )
}

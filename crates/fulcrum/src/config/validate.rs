//! From the raw file to a [`Config`]: defaults applied, names resolved to indices, regexes compiled,
//! addresses resolved, and every rule a type cannot express checked.
//!
//! Every error names the key path it is about; [`ConfigError::at_path`](super::ConfigError) turns the path
//! into a line. Validation stops at the first error, in file order as far as practical.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};
use regex::Regex;

use super::error::KeyPath;
use super::file::{
    RawAccessLog, RawAdmin, RawAutoBan, RawBlockRule, RawCache, RawConfig, RawDuration,
    RawFaultWhen, RawHa, RawHealthCheck, RawInitialState, RawListener, RawLogFormat, RawLogStatus,
    RawPassive, RawPool, RawRateLimit, RawRedirect, RawRoute, RawRouteCache, RawSentinel,
    RawServer, RawSize, RawSticky, RawStore, RawStoreKind, RawTls, RawUpstreamTls,
};
use super::{
    AdminConfig, Algorithm, CacheConfig, CertFiles, ClientAuth, Config, DnsServerConfig, FaultWhen,
    FilterConfig, HaConfig, HashKey, HealthCheckConfig, HealthCheckKind, HostMatch, KeyQuery,
    ListenerConfig, PassiveConfig, PoolConfig, Protocol, RateKey, RateLimitConfig, RedisTarget,
    RouteCache, RouteConfig, RouteMatch, ServerConfig, StickyConfig, StickyKind, StoreConfig,
    TlsConfig, TlsVersion, UpstreamTls,
};

/// A validation error: what is wrong with the key at `path`.
#[derive(Debug)]
pub(crate) struct Invalid {
    pub path: KeyPath,
    pub message: String,
}

impl Invalid {
    fn new(path: KeyPath, message: impl Into<String>) -> Self {
        Invalid {
            path,
            message: message.into(),
        }
    }
}

type Result<T, E = Invalid> = std::result::Result<T, E>;

fn invalid<T>(path: KeyPath, message: impl Into<String>) -> Result<T> {
    Err(Invalid::new(path, message))
}

/// Validates a configuration for the features that are built.
pub(crate) fn validate(raw: RawConfig) -> Result<Config> {
    let mut config = build(raw)?;
    load_files(&mut config)?;
    Ok(config)
}

/// [`validate`] without reading the files the configuration names.
pub(crate) fn validate_without_files(raw: RawConfig) -> Result<Config> {
    build(raw)
}

/// Reads the files the configuration names (TLS certificates and keys), so that a missing or broken
/// file is an error of the configuration, placed at the key naming it.
fn load_files(config: &mut Config) -> Result<()> {
    for (i, listener) in config.listeners.iter_mut().enumerate() {
        if let Some(tls) = &mut listener.tls {
            let server = crate::tls::load(tls).map_err(|e| {
                let mut path = KeyPath::root("listeners").index(i).key("tls");
                for part in e.key.split('.') {
                    path = match part.split_once('[') {
                        Some((key, index)) => path
                            .key(key)
                            .index(index.trim_end_matches(']').parse().unwrap_or(0)),
                        None => path.key(part),
                    };
                }
                Invalid::new(path, e.message)
            })?;
            tls.server = Some(server);
        }
    }
    for (i, pool) in config.pools.iter_mut().enumerate() {
        let http2 = pool.http2;
        if let Some(tls) = &mut pool.tls {
            let client = crate::tls::load_client(tls, http2).map_err(|e| {
                Invalid::new(
                    KeyPath::root("pools").index(i).key("tls").key(&e.key),
                    e.message,
                )
            })?;
            tls.client = Some(client);
        }
    }
    Ok(())
}

/// Validates every feature, built or not.
pub(crate) fn build(raw: RawConfig) -> Result<Config> {
    let shutdown_timeout = duration(
        raw.shutdown_timeout.as_ref(),
        KeyPath::root("shutdown_timeout"),
        Duration::from_secs(30),
        Zero::Allowed,
    )?;
    let admin = raw.admin.map(admin).transpose()?;
    let store = store(raw.store)?;
    let dns_nameservers = match raw.dns {
        None => Vec::new(),
        Some(dns) => dns
            .nameservers
            .iter()
            .enumerate()
            .map(|(i, text)| {
                let path = KeyPath::root("dns").key("nameservers").index(i);
                match bind_address(text, path.clone())? {
                    a if a.port() == 0 => invalid(path, format!("{text:?}: port 0")),
                    a => Ok(a),
                }
            })
            .collect::<Result<Vec<_>>>()?,
    };
    let access_log = raw.access_log.map(access_log).transpose()?;
    let ha = raw.ha.map(ha).transpose()?;
    let pools = pools(raw.pools)?;
    let listeners = listeners(raw.listeners, &pools, admin.as_ref())?;
    if store == StoreConfig::Memory {
        for (i, l) in listeners.iter().enumerate() {
            let at = KeyPath::root("listeners").index(i);
            let shared = |f: &FilterConfig| f.rate_limit.as_ref().is_some_and(|r| r.shared);
            let mut places = vec![(shared(&l.filter), at.key("rate_limit").key("shared"))];
            for (j, r) in l.routes.iter().enumerate() {
                places.push((
                    shared(&r.filter),
                    at.key("routes").index(j).key("rate_limit").key("shared"),
                ));
            }
            if let Some((_, path)) = places.into_iter().find(|(s, _)| *s) {
                return invalid(
                    path,
                    "a shared rate limit needs [store] kind = \"redis\" or \"redis_cluster\" (where the counts are kept)",
                );
            }
        }
    }
    Ok(Config {
        shutdown_timeout,
        admin,
        store,
        dns_nameservers,
        access_log,
        ha,
        listeners,
        pools,
    })
}

fn ha(raw: RawHa) -> Result<HaConfig> {
    let path = KeyPath::root("ha");
    let interface = raw.interface.trim();
    if interface.is_empty() || interface.len() > 15 || interface.contains(['/', ' ']) {
        return invalid(
            path.key("interface"),
            format!(
                "{:?}: expected a network interface name such as \"eth0\"",
                raw.interface
            ),
        );
    }
    let virtual_ip: ipnet::Ipv4Net = raw.virtual_ip.trim().parse().map_err(|_| {
        Invalid::new(
            path.key("virtual_ip"),
            format!(
                "{:?}: expected an IPv4 address with its prefix, e.g. \"192.0.2.100/24\"",
                raw.virtual_ip
            ),
        )
    })?;
    let ip = virtual_ip.addr();
    if ip.is_unspecified() || ip.is_multicast() || ip.is_broadcast() || ip.is_loopback() {
        return invalid(
            path.key("virtual_ip"),
            format!("{ip} cannot be a virtual IP (unspecified, multicast, broadcast or loopback)"),
        );
    }
    let router_id = integer(Some(raw.router_id), path.key("router_id"), 0, 1, 255)? as u8;
    let priority = integer(raw.priority, path.key("priority"), 100, 1, 254)? as u8;
    let advert_interval = duration(
        raw.advert_interval.as_ref(),
        path.key("advert_interval"),
        Duration::from_secs(1),
        Zero::Rejected,
    )?;
    let centis = advert_interval.as_millis() / 10;
    if advert_interval.as_millis() % 10 != 0 || !(1..=4095).contains(&centis) {
        return invalid(
            path.key("advert_interval"),
            "must be 10ms to 40.95s in steps of 10 ms (VRRP v3 counts centiseconds)",
        );
    }
    Ok(HaConfig {
        interface: interface.to_owned(),
        virtual_ip,
        router_id,
        priority,
        advert_interval,
        preempt: raw.preempt.unwrap_or(true),
        fault_when: match raw.fault_when.unwrap_or(RawFaultWhen::EveryPoolDown) {
            RawFaultWhen::EveryPoolDown => FaultWhen::EveryPoolDown,
            RawFaultWhen::AnyPoolDown => FaultWhen::AnyPoolDown,
            RawFaultWhen::Never => FaultWhen::Never,
        },
    })
}

fn access_log(raw: RawAccessLog) -> Result<crate::access_log::Settings> {
    use crate::access_log::{Destination, Format, Settings, StatusMatch};
    let path = KeyPath::root("access_log");
    let destination = match raw.path.as_deref() {
        None | Some("stdout") => Destination::Stdout,
        Some("") => return invalid(path.key("path"), "must be \"stdout\" or a file path"),
        Some(file) => Destination::File(file.into()),
    };
    let sample = raw.sample.unwrap_or(1.0);
    if !(sample > 0.0 && sample <= 1.0) {
        return invalid(
            path.key("sample"),
            format!("must be in (0, 1] (the share of requests logged), got {sample}"),
        );
    }
    let mut status = Vec::new();
    for (i, s) in raw.status.unwrap_or_default().iter().enumerate() {
        let at = path.key("status").index(i);
        let parsed = match s {
            RawLogStatus::Code(c) if (100..=599).contains(c) => StatusMatch::Code(*c as u16),
            RawLogStatus::Text(t) => match t.as_bytes() {
                [c @ b'1'..=b'5', b'x' | b'X', b'x' | b'X'] => {
                    StatusMatch::Class(u16::from(c - b'0'))
                }
                _ => match t.parse::<u16>() {
                    Ok(c) if (100..=599).contains(&c) => StatusMatch::Code(c),
                    _ => {
                        return invalid(
                            at,
                            format!("{t:?}: expected a status (100-599) or a class like \"5xx\""),
                        )
                    }
                },
            },
            RawLogStatus::Code(c) => return invalid(at, format!("{c}: a status is 100-599")),
        };
        status.push(parsed);
    }
    let buffer = integer(raw.buffer, path.key("buffer"), 65_536, 1, 16 << 20)? as usize;
    Ok(Settings {
        format: match raw.format.unwrap_or(RawLogFormat::Json) {
            RawLogFormat::Json => Format::Json,
            RawLogFormat::Combined => Format::Combined,
        },
        destination,
        sample,
        status,
        buffer,
    })
}

fn admin(raw: RawAdmin) -> Result<AdminConfig> {
    let path = KeyPath::root("admin");
    let bind = bind_address(&raw.bind, path.key("bind"))?;
    if let Some(token) = &raw.token {
        if token.is_empty() {
            return invalid(
                path.key("token"),
                "must not be empty (remove the key to disable authentication)",
            );
        }
        if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return invalid(
                path.key("token"),
                "must not contain whitespace or control characters",
            );
        }
    }
    if raw.token.is_none() && !bind.ip().is_loopback() {
        return invalid(
            path.key("bind"),
            format!(
                "{bind} is reachable from other hosts: set admin.token so that only holders of the \
                 token may change the running balancer, or bind to 127.0.0.1"
            ),
        );
    }
    Ok(AdminConfig {
        bind,
        token: raw.token,
    })
}

fn store(raw: Option<RawStore>) -> Result<StoreConfig> {
    let Some(raw) = raw else {
        return Ok(StoreConfig::Memory);
    };
    let path = KeyPath::root("store");
    let kind = raw.kind.unwrap_or(RawStoreKind::Memory);
    if kind == RawStoreKind::Memory {
        let redis_only = [
            ("url", raw.url.is_some()),
            ("sentinel", raw.sentinel.is_some()),
            ("nodes", raw.nodes.is_some()),
            ("key_prefix", raw.key_prefix.is_some()),
        ];
        if let Some((key, _)) = redis_only.iter().find(|(_, set)| *set) {
            return invalid(
                path.key(key),
                "only valid with kind = \"redis\" or \"redis_cluster\"",
            );
        }
        return Ok(StoreConfig::Memory);
    }

    let target = if kind == RawStoreKind::RedisCluster {
        for (key, set) in [
            ("url", raw.url.is_some()),
            ("sentinel", raw.sentinel.is_some()),
        ] {
            if set {
                return invalid(
                    path.key(key),
                    "not valid with kind = \"redis_cluster\": list the cluster's nodes in `nodes`",
                );
            }
        }
        let Some(nodes) = raw.nodes else {
            return invalid(
                path.key("kind"),
                "kind = \"redis_cluster\" needs `nodes`: at least one node of the cluster as HOST:PORT",
            );
        };
        if nodes.is_empty() {
            return invalid(
                path.key("nodes"),
                "needs at least one node of the cluster as HOST:PORT",
            );
        }
        for (i, node) in nodes.iter().enumerate() {
            let address = node
                .strip_prefix("redis://")
                .or_else(|| node.strip_prefix("rediss://"))
                .map(|rest| {
                    rest.rsplit('@')
                        .next()
                        .unwrap_or(rest)
                        .trim_end_matches('/')
                })
                .unwrap_or(node);
            if !matches!(split_host_port(address), Some((_, port)) if port != 0) {
                return invalid(
                    path.key("nodes").index(i),
                    format!(
                        "invalid cluster node {node:?}: expected HOST:PORT or redis://[user:password@]HOST:PORT"
                    ),
                );
            }
        }
        RedisTarget::Cluster { nodes }
    } else {
        if raw.nodes.is_some() {
            return invalid(
                path.key("nodes"),
                "only valid with kind = \"redis_cluster\" (Sentinels go in `sentinel.nodes`)",
            );
        }
        redis_target(&path, raw.url, raw.sentinel)?
    };
    let key_prefix = raw.key_prefix.unwrap_or_else(|| "fulcrum".to_owned());
    if key_prefix.is_empty() {
        return invalid(path.key("key_prefix"), "must not be empty");
    }
    Ok(StoreConfig::Redis { target, key_prefix })
}

/// `store.url` or `store.sentinel` of `kind = "redis"`.
fn redis_target(
    path: &KeyPath,
    url: Option<String>,
    sentinel: Option<RawSentinel>,
) -> Result<RedisTarget> {
    Ok(match (url, sentinel) {
        (Some(_), Some(_)) => {
            return invalid(
                path.key("sentinel"),
                "set either `url` or `sentinel`, not both",
            )
        }
        (None, None) => {
            return invalid(
                path.key("kind"),
                "kind = \"redis\" needs `url` (one node) or `sentinel` (via Sentinel)",
            )
        }
        (Some(url), None) => {
            let rest = url
                .strip_prefix("redis://")
                .or_else(|| url.strip_prefix("rediss://"));
            match rest {
                Some(rest) if !rest.is_empty() && !rest.starts_with('/') => RedisTarget::Url(url),
                Some(_) => return invalid(path.key("url"), format!("{url:?} names no host")),
                None => {
                    return invalid(
                        path.key("url"),
                        format!("must start with redis:// or rediss://, got {url:?}"),
                    )
                }
            }
        }
        (None, Some(sentinel)) => {
            let path = path.key("sentinel");
            if sentinel.master.is_empty() {
                return invalid(path.key("master"), "must not be empty");
            }
            if sentinel.nodes.is_empty() {
                return invalid(path.key("nodes"), "needs at least one Sentinel address");
            }
            for (i, node) in sentinel.nodes.iter().enumerate() {
                if !matches!(split_host_port(node), Some((_, port)) if port != 0) {
                    return invalid(
                        path.key("nodes").index(i),
                        format!("invalid Sentinel address {node:?}: expected HOST:PORT"),
                    );
                }
            }
            RedisTarget::Sentinel {
                master: sentinel.master,
                nodes: sentinel.nodes,
            }
        }
    })
}

fn pools(raw: Vec<RawPool>) -> Result<Vec<PoolConfig>> {
    if raw.is_empty() {
        return invalid(
            KeyPath::root("pools"),
            "at least one [[pools]] table is required",
        );
    }
    let mut pools: Vec<PoolConfig> = Vec::with_capacity(raw.len());
    for (i, raw) in raw.into_iter().enumerate() {
        let path = KeyPath::root("pools").index(i);
        let pool = pool(raw, &path)?;
        if let Some(first) = pools.iter().position(|p| p.name == pool.name) {
            return invalid(
                path.key("name"),
                format!("duplicate pool name `{}` (also pools[{first}])", pool.name),
            );
        }
        pools.push(pool);
    }
    Ok(pools)
}

fn pool(raw: RawPool, path: &KeyPath) -> Result<PoolConfig> {
    let name = name(&raw.name, path.key("name"))?;
    let algorithm = raw.algorithm.unwrap_or(Algorithm::RoundRobin);
    let hash_key = match raw.hash_key {
        None => algorithm.uses_hash_key().then_some(HashKey::SourceIp),
        Some(text) => {
            let path = path.key("hash_key");
            if !algorithm.uses_hash_key() {
                return invalid(
                    path,
                    format!(
                        "only used by the ip_hash, consistent_hash and maglev algorithms, \
                         and this pool uses {}",
                        algorithm.as_str()
                    ),
                );
            }
            let key = hash_key(&text, &path)?;
            if algorithm == Algorithm::IpHash
                && !matches!(key, HashKey::SourceIp | HashKey::SourceIpPort)
            {
                return invalid(
                    path,
                    "ip_hash hashes the client address: use source_ip or source_ip_port, \
                     or consistent_hash / maglev to hash anything else",
                );
            }
            Some(key)
        }
    };

    let hash_balance_factor = match raw.hash_balance_factor {
        None => None,
        Some(_) if algorithm != Algorithm::ConsistentHash => {
            return invalid(
                path.key("hash_balance_factor"),
                format!(
                    "only used by the consistent_hash algorithm, and this pool uses {}",
                    algorithm.as_str()
                ),
            );
        }
        Some(_) => Some(integer(
            raw.hash_balance_factor,
            path.key("hash_balance_factor"),
            0,
            101,
            10_000,
        )? as u32),
    };
    let hash_fallback = match raw.hash_fallback {
        None => Algorithm::RoundRobin,
        Some(_) if !algorithm.uses_hash_key() => {
            return invalid(
                path.key("hash_fallback"),
                format!(
                    "only used by the ip_hash, consistent_hash and maglev algorithms, and this pool uses {}",
                    algorithm.as_str()
                ),
            );
        }
        Some(fallback) if fallback.uses_hash_key() => {
            return invalid(
                path.key("hash_fallback"),
                format!(
                    "the fallback is for requests without a hash key: {} needs one too",
                    fallback.as_str()
                ),
            );
        }
        Some(fallback) => fallback,
    };

    let dns_srv = match raw.dns_srv {
        None => None,
        Some(name) => {
            let trimmed = name.trim_end_matches('.');
            if trimmed.is_empty()
                || !trimmed
                    .split('.')
                    .all(|label| !label.is_empty() && label.len() <= 63)
                || !trimmed
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
            {
                return invalid(
                    path.key("dns_srv"),
                    format!("invalid DNS name {name:?}: expected e.g. \"_http._tcp.app.internal\""),
                );
            }
            Some(name)
        }
    };
    if raw.servers.is_empty() && dns_srv.is_none() {
        return invalid(
            path.key("servers"),
            "a pool needs at least one server (or `dns_srv` to discover them)",
        );
    }
    let mut servers: Vec<ServerConfig> = Vec::with_capacity(raw.servers.len());
    let mut dns_servers: Vec<DnsServerConfig> = Vec::new();
    for (i, raw) in raw.servers.into_iter().enumerate() {
        let path = path.key("servers").index(i);
        // A defaulted name is the address: blame the key that was written.
        let name_key = if raw.name.is_some() {
            "name"
        } else {
            "address"
        };
        let server = match server(raw, &path)? {
            Entry::Static(server) => server,
            Entry::Dns(dns) => {
                let taken = servers.iter().any(|s| s.name == dns.name)
                    || dns_servers.iter().any(|d| d.name == dns.name);
                if taken {
                    return invalid(
                        path.key(name_key),
                        format!("duplicate server name `{}` in this pool", dns.name),
                    );
                }
                dns_servers.push(dns);
                continue;
            }
        };
        if dns_servers.iter().any(|d| d.name == server.name) {
            return invalid(
                path.key(name_key),
                format!("duplicate server name `{}` in this pool", server.name),
            );
        }
        if let Some(first) = servers.iter().position(|s| s.name == server.name) {
            return invalid(
                path.key(name_key),
                format!(
                    "duplicate server name `{}` in this pool (also servers[{first}]; \
                     a server's name defaults to its address)",
                    server.name
                ),
            );
        }
        servers.push(server);
    }

    let slow_start = raw
        .slow_start
        .as_ref()
        .map(|d| {
            duration(
                Some(d),
                path.key("slow_start"),
                Duration::ZERO,
                Zero::Rejected,
            )
        })
        .transpose()?;
    let retries = integer(raw.retries, path.key("retries"), 2, 0, 10)? as u32;
    let connect_timeout = duration(
        raw.connect_timeout.as_ref(),
        path.key("connect_timeout"),
        Duration::from_secs(3),
        Zero::Rejected,
    )?;
    let response_timeout = duration(
        raw.response_timeout.as_ref(),
        path.key("response_timeout"),
        Duration::from_secs(30),
        Zero::Rejected,
    )?;
    let health_check = raw
        .health_check
        .map(|h| health_check(h, &path.key("health_check")))
        .transpose()?;
    let passive = raw
        .passive
        .map(|p| passive(p, &path.key("passive")))
        .transpose()?;
    let sticky = raw
        .sticky
        .map(|s| sticky(s, &path.key("sticky")))
        .transpose()?;
    let resolve_interval = duration(
        raw.resolve_interval.as_ref(),
        path.key("resolve_interval"),
        Duration::from_secs(30),
        Zero::Rejected,
    )?;
    if resolve_interval < Duration::from_millis(100) {
        return invalid(path.key("resolve_interval"), "must be at least 100ms");
    }
    let deregistration_delay = duration(
        raw.deregistration_delay.as_ref(),
        path.key("deregistration_delay"),
        Duration::from_secs(30),
        Zero::Allowed,
    )?;
    let saturation_target = integer(
        raw.saturation_target,
        path.key("saturation_target"),
        50,
        1,
        1_000_000,
    )? as u32;
    let max_connections_per_server = optional_count(
        raw.max_connections_per_server,
        path.key("max_connections_per_server"),
    )?
    .map(|n| n as u32);
    let max_queue = integer(raw.max_queue, path.key("max_queue"), 1000, 0, 10_000_000)? as usize;
    let queue_timeout = duration(
        raw.queue_timeout.as_ref(),
        path.key("queue_timeout"),
        Duration::from_secs(5),
        Zero::Allowed,
    )?;
    let tls = raw
        .tls
        .map(|t| upstream_tls(t, &path.key("tls")))
        .transpose()?;
    let cache = raw
        .cache
        .map(|c| cache(c, &path.key("cache")))
        .transpose()?;
    Ok(PoolConfig {
        cache,
        http2: raw.http2.unwrap_or(false),
        tls,
        name,
        algorithm,
        hash_key,
        hash_balance_factor,
        hash_fallback,
        servers,
        slow_start,
        retries,
        connect_timeout,
        response_timeout,
        health_check,
        passive,
        sticky,
        dns_servers,
        dns_srv,
        resolve_interval,
        deregistration_delay,
        saturation_target,
        max_connections_per_server,
        max_queue,
        queue_timeout,
    })
}

fn hash_key(text: &str, path: &KeyPath) -> Result<HashKey> {
    let key = match text {
        "source_ip" => HashKey::SourceIp,
        "source_ip_port" => HashKey::SourceIpPort,
        "uri" => HashKey::Uri,
        _ => {
            if let Some(name) = text.strip_prefix("header:") {
                let header = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                    Invalid::new(path.clone(), format!("invalid header name {name:?}"))
                })?;
                HashKey::Header(header)
            } else if let Some(name) = text.strip_prefix("cookie:") {
                check_cookie_name(name, path)?;
                HashKey::Cookie(name.to_owned())
            } else {
                return invalid(
                    path.clone(),
                    format!(
                        "unknown hash key {text:?}, expected one of source_ip, source_ip_port, \
                         uri, \"header:NAME\", \"cookie:NAME\""
                    ),
                );
            }
        }
    };
    Ok(key)
}

/// A server entry: a fixed address, or a DNS name to resolve (again and again).
enum Entry {
    Static(ServerConfig),
    Dns(DnsServerConfig),
}

fn server(raw: RawServer, path: &KeyPath) -> Result<Entry> {
    let address = server_address(&raw.address, path.key("address"))?;
    let name = match raw.name {
        Some(n) => name(&n, path.key("name"))?,
        None => raw.address,
    };
    let weight = integer(raw.weight, path.key("weight"), 1, 1, 1_000_000)? as u32;
    Ok(match address {
        Address::Ip(address) => Entry::Static(ServerConfig {
            name,
            address,
            weight,
        }),
        Address::Name(host, port) => Entry::Dns(DnsServerConfig {
            name,
            host,
            port,
            weight,
        }),
    })
}

/// A server address as written.
enum Address {
    Ip(SocketAddr),
    Name(String, u16),
}

fn health_check(raw: RawHealthCheck, path: &KeyPath) -> Result<HealthCheckConfig> {
    if raw.kind != HealthCheckKind::Http {
        let http_only = [
            ("path", raw.path.is_some()),
            ("expect_status", raw.expect_status.is_some()),
            ("method", raw.method.is_some()),
            ("host", raw.host.is_some()),
            ("expect_body", raw.expect_body.is_some()),
        ];
        if let Some((key, _)) = http_only.iter().find(|(_, set)| *set) {
            return invalid(
                path.key(key),
                format!(
                    "only valid with kind = \"http\" (this check is {})",
                    raw.kind.as_str()
                ),
            );
        }
    }
    if raw.kind != HealthCheckKind::Grpc && raw.service.is_some() {
        return invalid(
            path.key("service"),
            format!(
                "only valid with kind = \"grpc\" (this check is {})",
                raw.kind.as_str()
            ),
        );
    }
    let check_path = raw.path.unwrap_or_else(|| "/health".to_owned());
    if !check_path.starts_with('/') {
        return invalid(
            path.key("path"),
            format!("must start with '/', got {check_path:?}"),
        );
    }
    let expect_status = match &raw.expect_status {
        None => (200, 399),
        Some(status) => parse_status_range(&status.0)
            .map_err(|message| Invalid::new(path.key("expect_status"), message))?,
    };
    Ok(HealthCheckConfig {
        kind: raw.kind,
        path: check_path,
        expect_status,
        interval: duration(
            raw.interval.as_ref(),
            path.key("interval"),
            Duration::from_secs(2),
            Zero::Rejected,
        )?,
        timeout: duration(
            raw.timeout.as_ref(),
            path.key("timeout"),
            Duration::from_secs(1),
            Zero::Rejected,
        )?,
        rise: integer(raw.rise, path.key("rise"), 2, 1, u32::MAX.into())? as u32,
        fall: integer(raw.fall, path.key("fall"), 3, 1, u32::MAX.into())? as u32,
        method: match raw.method {
            None => http::Method::GET,
            Some(m) => http::Method::from_bytes(m.as_bytes())
                .ok()
                .filter(|_| m.bytes().all(|b| b.is_ascii_uppercase()))
                .ok_or_else(|| {
                    Invalid::new(
                        path.key("method"),
                        format!("invalid method {m:?} (write it in capitals, e.g. \"HEAD\")"),
                    )
                })?,
        },
        host: match raw.host {
            Some(h) if h.is_empty() || http::HeaderValue::from_str(&h).is_err() => {
                return invalid(path.key("host"), format!("invalid Host header value {h:?}"));
            }
            h => h,
        },
        expect_body: match raw.expect_body {
            Some(b) if b.is_empty() => {
                return invalid(path.key("expect_body"), "must not be empty")
            }
            b => b,
        },
        service: raw.service.unwrap_or_default(),
        initial_up: raw.initial_state != Some(RawInitialState::Down),
    })
}

fn passive(raw: RawPassive, path: &KeyPath) -> Result<PassiveConfig> {
    Ok(PassiveConfig {
        consecutive_failures: integer(
            raw.consecutive_failures,
            path.key("consecutive_failures"),
            5,
            1,
            1000,
        )? as u32,
        base_ejection: duration(
            raw.base_ejection.as_ref(),
            path.key("base_ejection"),
            Duration::from_secs(30),
            Zero::Rejected,
        )?,
        max_ejected_percent: integer(
            raw.max_ejected_percent,
            path.key("max_ejected_percent"),
            50,
            0,
            100,
        )? as u32,
    })
}

/// `"200"` → `(200, 200)`, `"200-399"` → `(200, 399)`; codes are 100 to 599.
pub(crate) fn parse_status_range(text: &str) -> Result<(u16, u16), String> {
    let (low, high) = text.split_once('-').unwrap_or((text, text));
    let code = |s: &str| {
        s.trim()
            .parse::<u16>()
            .ok()
            .filter(|c| (100..=599).contains(c))
    };
    match (code(low), code(high)) {
        (Some(low), Some(high)) if low <= high => Ok((low, high)),
        (Some(low), Some(high)) => Err(format!(
            "range {low}-{high} is empty: {low} is above {high}"
        )),
        _ => Err(format!(
            "invalid status {text:?}: expected a code or an inclusive range of codes \
             from 100 to 599, e.g. \"200\" or \"200-399\""
        )),
    }
}

fn sticky(raw: RawSticky, path: &KeyPath) -> Result<StickyConfig> {
    let cookie = match (raw.kind, raw.cookie) {
        (StickyKind::Cookie, cookie) => cookie.unwrap_or_else(|| "FULCRUM_SRV".to_owned()),
        (StickyKind::AppCookie, Some(cookie)) => cookie,
        (StickyKind::AppCookie, None) => {
            return invalid(
                path.key("cookie"),
                "required with kind = \"app_cookie\": the name of the application's session \
                 cookie, e.g. \"JSESSIONID\"",
            )
        }
        (StickyKind::SourceIp, None) => String::new(),
        (StickyKind::SourceIp, Some(_)) => {
            return invalid(path.key("cookie"), "not used with kind = \"source_ip\"")
        }
    };
    if raw.kind != StickyKind::SourceIp {
        check_cookie_name(&cookie, &path.key("cookie"))?;
    }
    let ttl = duration(
        raw.ttl.as_ref(),
        path.key("ttl"),
        Duration::from_secs(30 * 60),
        Zero::Rejected,
    )?;
    let max_age = match (raw.kind, raw.max_age.as_ref()) {
        (_, None) => None,
        (StickyKind::Cookie, Some(d)) => Some(duration(
            Some(d),
            path.key("max_age"),
            Duration::ZERO,
            Zero::Rejected,
        )?),
        (kind, Some(_)) => {
            return invalid(
                path.key("max_age"),
                format!(
                    "only used with kind = \"cookie\" (this is {})",
                    kind.as_str()
                ),
            )
        }
    };
    let secret = match (raw.kind, raw.secret) {
        (_, None) => None,
        (StickyKind::Cookie, Some(secret)) if secret.chars().count() >= 16 => Some(secret),
        (StickyKind::Cookie, Some(_)) => {
            return invalid(
                path.key("secret"),
                "must be at least 16 characters (the key of the cookie's MAC)",
            )
        }
        (kind, Some(_)) => {
            return invalid(
                path.key("secret"),
                format!(
                    "only used with kind = \"cookie\" (this is {})",
                    kind.as_str()
                ),
            )
        }
    };
    let load_bound_pct = match raw.load_bound {
        None => None,
        Some(bound) if (1.0..=100.0).contains(&bound) => Some((bound * 100.0).round() as u32),
        Some(bound) => {
            return invalid(
                path.key("load_bound"),
                format!(
                "must be between 1.0 and 100.0 (a multiple of the pool's mean load), got {bound}"
            ),
            )
        }
    };
    Ok(StickyConfig {
        kind: raw.kind,
        cookie,
        ttl,
        max_age,
        secret,
        load_bound_pct,
    })
}

fn listeners(
    raw: Vec<RawListener>,
    pools: &[PoolConfig],
    admin: Option<&AdminConfig>,
) -> Result<Vec<ListenerConfig>> {
    if raw.is_empty() {
        return invalid(
            KeyPath::root("listeners"),
            "at least one [[listeners]] table is required",
        );
    }
    // Addresses already taken, with whether they are UDP (UDP and TCP may share a port) and their owner.
    let mut taken: Vec<(SocketAddr, bool, String)> = Vec::new();
    if let Some(admin) = admin {
        taken.push((admin.bind, false, "admin.bind".to_owned()));
    }
    let mut listeners: Vec<ListenerConfig> = Vec::with_capacity(raw.len());
    for (i, raw) in raw.into_iter().enumerate() {
        let path = KeyPath::root("listeners").index(i);
        let listener = listener(raw, &path, pools)?;
        if let Some(first) = listeners.iter().position(|l| l.name == listener.name) {
            return invalid(
                path.key("name"),
                format!(
                    "duplicate listener name `{}` (also listeners[{first}])",
                    listener.name
                ),
            );
        }
        let udp = listener.protocol == Protocol::Udp;
        let conflict = taken
            .iter()
            .find(|(addr, u, _)| *u == udp && binds_conflict(*addr, listener.bind));
        if let Some((_, _, owner)) = conflict {
            return invalid(
                path.key("bind"),
                format!("address {} is already used by {owner}", listener.bind),
            );
        }
        taken.push((listener.bind, udp, path.key("bind").to_string()));
        listeners.push(listener);
    }
    Ok(listeners)
}

/// Whether two sockets could not both be bound: same port, same family, and the same IP or a wildcard.
/// Port 0 asks the kernel for a free port, so it never conflicts.
fn binds_conflict(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

fn listener(raw: RawListener, path: &KeyPath, pools: &[PoolConfig]) -> Result<ListenerConfig> {
    let name = name(&raw.name, path.key("name"))?;
    let bind = bind_address(&raw.bind, path.key("bind"))?;
    let protocol = raw.protocol;
    let pool = pool_ref(&raw.pool, path.key("pool"), pools)?;

    if protocol == Protocol::Udp && !raw.routes.is_empty() {
        return invalid(
            path.key("routes"),
            "routes are only valid on http, https and tcp listeners, this one is udp",
        );
    }
    let routes = raw
        .routes
        .into_iter()
        .enumerate()
        .map(|(i, r)| route(r, &path.key("routes").index(i), pools))
        .collect::<Result<Vec<_>>>()?;
    for (i, r) in routes.iter().enumerate() {
        let at = path.key("routes").index(i);
        let m = &r.matcher;
        if protocol == Protocol::Tcp {
            let http_only = [
                ("path_prefix", m.path_prefix.is_some()),
                ("path_regex", m.path_regex.is_some()),
                ("host", m.host.is_some()),
                ("method", m.method.is_some()),
                ("headers", !m.headers.is_empty()),
                ("cookie", m.cookie.is_some()),
                ("query", !m.query.is_empty()),
                ("max_body_size", r.max_body_size.is_some()),
                (
                    "allow",
                    r.filter.access.allow.is_some() || !r.filter.access.deny.is_empty(),
                ),
                ("rate_limit", r.filter.rate_limit.is_some()),
                ("block", !r.filter.rules.is_empty()),
                ("cache", r.cache != RouteCache::Pool),
            ];
            if let Some((key, _)) = http_only.iter().find(|(_, used)| *used) {
                return invalid(
                    at.key(key),
                    "tcp routes match on `sni` only (the TLS ClientHello's server name); \
                     this key needs an http or https listener",
                );
            }
            if m.sni.is_none() {
                return invalid(at, "a tcp route needs `sni`");
            }
        } else if m.sni.is_some() {
            return invalid(
                at.key("sni"),
                format!(
                    "only valid on tcp listeners (TLS passthrough); this one is {} — use `host`",
                    protocol.as_str()
                ),
            );
        }
    }

    if raw.proxy_protocol.is_some() && protocol != Protocol::Tcp {
        return invalid(
            path.key("proxy_protocol"),
            format!(
                "only valid on tcp listeners, this one is {}",
                protocol.as_str()
            ),
        );
    }
    let tls = match (protocol, raw.tls) {
        (Protocol::Https, Some(tls)) => Some(tls_config(tls, &path.key("tls"))?),
        (Protocol::Https, None) => return invalid(
            path.key("tls"),
            "required with protocol = \"https\": tls = { cert = \"cert.pem\", key = \"key.pem\" }",
        ),
        (_, Some(_)) => {
            return invalid(
                path.key("tls"),
                format!(
                    "only valid on https listeners, this one is {}",
                    protocol.as_str()
                ),
            )
        }
        (_, None) => None,
    };

    let https_redirect = match raw.https_redirect {
        None | Some(RawRedirect::On(false)) => None,
        Some(_) if protocol != Protocol::Http => {
            return invalid(
                path.key("https_redirect"),
                format!(
                    "only valid on http listeners, this one is {}",
                    protocol.as_str()
                ),
            )
        }
        Some(RawRedirect::On(true)) => Some(443),
        Some(RawRedirect::Port(port)) => match u16::try_from(port) {
            Ok(port) if port > 0 => Some(port),
            _ => {
                return invalid(
                    path.key("https_redirect"),
                    format!("must be true, false or a port (1 to 65535), got {port}"),
                )
            }
        },
    };

    if raw.request_header_timeout.is_some() && !protocol.is_http() {
        return invalid(
            path.key("request_header_timeout"),
            format!(
                "only valid on http and https listeners, this one is {}",
                protocol.as_str()
            ),
        );
    }
    let request_header_timeout = duration(
        raw.request_header_timeout.as_ref(),
        path.key("request_header_timeout"),
        Duration::from_secs(10),
        Zero::Rejected,
    )?;
    // L4 listeners: the HTTP keys have no meaning there.
    if !protocol.is_http() {
        let http_only = [
            ("body_timeout", raw.body_timeout.is_some()),
            ("write_timeout", raw.write_timeout.is_some()),
            ("tunnel_timeout", raw.tunnel_timeout.is_some()),
            ("max_header_size", raw.max_header_size.is_some()),
            ("max_headers", raw.max_headers.is_some()),
            (
                "h2_max_concurrent_streams",
                raw.h2_max_concurrent_streams.is_some(),
            ),
            ("max_body_size", raw.max_body_size.is_some()),
            ("rate_limit", raw.rate_limit.is_some()),
            ("block", raw.block.is_some()),
            ("block_rules", raw.block_rules.is_some()),
            ("auto_ban", raw.auto_ban.is_some()),
            ("explain", raw.explain.is_some()),
        ];
        if let Some((key, _)) = http_only.iter().find(|(_, used)| *used) {
            return invalid(
                path.key(key),
                format!(
                    "only valid on http and https listeners, this one is {}",
                    protocol.as_str()
                ),
            );
        }
    }
    let only_on = |key: &str, used: bool, want: Protocol| -> Result<()> {
        if used && protocol != want {
            return invalid(
                path.key(key),
                format!(
                    "only valid on {} listeners, this one is {}",
                    want.as_str(),
                    protocol.as_str()
                ),
            );
        }
        Ok(())
    };
    only_on(
        "accept_proxy_protocol",
        raw.accept_proxy_protocol.is_some(),
        Protocol::Tcp,
    )?;
    only_on("hello_timeout", raw.hello_timeout.is_some(), Protocol::Tcp)?;
    only_on("max_flows", raw.max_flows.is_some(), Protocol::Udp)?;
    only_on("splice", raw.splice.is_some(), Protocol::Tcp)?;
    if protocol == Protocol::Udp {
        only_on(
            "max_connections_per_ip",
            raw.max_connections_per_ip.is_some(),
            Protocol::Tcp,
        )?;
        only_on(
            "max_connections",
            raw.max_connections.is_some(),
            Protocol::Tcp,
        )?;
    }
    let accept_proxy_protocol = raw
        .accept_proxy_protocol
        .map(|list| {
            crate::filter::CidrSet::parse(&list).map_err(|e| match e {
                crate::filter::FilterError::Cidr { index, .. } => Invalid::new(
                    path.key("accept_proxy_protocol").index(index),
                    e.to_string(),
                ),
                other => Invalid::new(path.key("accept_proxy_protocol"), other.to_string()),
            })
        })
        .transpose()?;
    let hello_timeout = duration(
        raw.hello_timeout.as_ref(),
        path.key("hello_timeout"),
        Duration::from_secs(5),
        Zero::Rejected,
    )?;
    let max_flows = integer(raw.max_flows, path.key("max_flows"), 100_000, 1, 10_000_000)? as usize;
    let idle_timeout = duration(
        raw.idle_timeout.as_ref(),
        path.key("idle_timeout"),
        match protocol {
            Protocol::Tcp => Duration::from_secs(3600),
            Protocol::Udp => Duration::from_secs(30),
            _ => Duration::from_secs(60),
        },
        Zero::Rejected,
    )?;
    let max_connections = integer(
        raw.max_connections,
        path.key("max_connections"),
        10_000,
        1,
        u32::MAX.into(),
    )? as usize;
    let max_connections_per_ip = optional_count(
        raw.max_connections_per_ip,
        path.key("max_connections_per_ip"),
    )?
    .map(|n| n as usize);
    let timeout = |raw: &Option<RawDuration>, key: &str, default: Duration| {
        duration(raw.as_ref(), path.key(key), default, Zero::Rejected)
    };
    let body_timeout = timeout(&raw.body_timeout, "body_timeout", Duration::from_secs(30))?;
    let write_timeout = timeout(&raw.write_timeout, "write_timeout", Duration::from_secs(30))?;
    let tunnel_timeout = timeout(
        &raw.tunnel_timeout,
        "tunnel_timeout",
        Duration::from_secs(3600),
    )?;
    let max_header_size = size(
        raw.max_header_size.as_ref(),
        path.key("max_header_size"),
        64 * 1024,
        8 * 1024,
        1024 * 1024,
    )? as usize;
    let max_headers = integer(raw.max_headers, path.key("max_headers"), 100, 1, 1000)? as usize;
    let h2_max_concurrent_streams = integer(
        raw.h2_max_concurrent_streams,
        path.key("h2_max_concurrent_streams"),
        100,
        1,
        10_000,
    )? as u32;
    let max_body_size = body_size(raw.max_body_size.as_ref(), path)?;
    let filter = filter(
        raw.allow,
        raw.deny,
        raw.rate_limit,
        raw.block,
        raw.block_rules,
        path,
    )?;
    let auto_ban = raw
        .auto_ban
        .map(|b| auto_ban(b, &path.key("auto_ban")))
        .transpose()?;

    Ok(ListenerConfig {
        name,
        bind,
        protocol,
        pool,
        routes,
        proxy_protocol: raw.proxy_protocol,
        tls,
        https_redirect,
        accept_proxy_protocol,
        hello_timeout,
        max_flows,
        splice: raw.splice.unwrap_or(true),
        explain: raw.explain.unwrap_or(false),
        request_header_timeout,
        idle_timeout,
        max_connections,
        body_timeout,
        write_timeout,
        tunnel_timeout,
        max_header_size,
        max_headers,
        h2_max_concurrent_streams,
        max_connections_per_ip,
        max_body_size,
        filter,
        auto_ban,
    })
}

/// `allow`, `deny`, `rate_limit`, `block`, `block_rules` of a listener or route.
fn filter(
    allow: Option<Vec<String>>,
    deny: Option<Vec<String>>,
    rate_limit: Option<RawRateLimit>,
    block: Option<Vec<String>>,
    block_rules: Option<Vec<RawBlockRule>>,
    path: &KeyPath,
) -> Result<FilterConfig> {
    use crate::filter::{CidrSet, FilterError, Pattern, RuleSpec, Target};
    let cidrs = |list: &[String], key: &str| {
        CidrSet::parse(list).map_err(|e| match e {
            FilterError::Cidr { index, .. } => {
                Invalid::new(path.key(key).index(index), e.to_string())
            }
            other => Invalid::new(path.key(key), other.to_string()),
        })
    };
    let allow = allow.map(|a| cidrs(&a, "allow")).transpose()?;
    let deny = deny
        .map(|d| cidrs(&d, "deny"))
        .transpose()?
        .unwrap_or_default();
    let access = crate::filter::AccessList::new(allow, deny);

    let rate_limit = match rate_limit {
        None => None,
        Some(r) => {
            let at = path.key("rate_limit");
            let rate = integer(Some(r.rate), at.key("rate"), 0, 1, u32::MAX.into())? as u32;
            let per = duration(
                r.per.as_ref(),
                at.key("per"),
                Duration::from_secs(1),
                Zero::Rejected,
            )?;
            let burst = integer(r.burst, at.key("burst"), rate.into(), 1, u32::MAX.into())? as u32;
            let key = match r.key.as_deref() {
                None | Some("source_ip") => RateKey::SourceIp,
                Some("path") => RateKey::Path,
                Some(text) => match text.split_once(':') {
                    Some(("header", name)) => RateKey::Header(
                        HeaderName::from_bytes(name.trim().as_bytes())
                            .map_err(|_| Invalid::new(at.key("key"), format!("invalid header name in {text:?}")))?,
                    ),
                    Some(("cookie", name)) if !name.trim().is_empty() => RateKey::Cookie(name.trim().to_owned()),
                    _ => {
                        return invalid(
                            at.key("key"),
                            format!("unknown key {text:?}: expected source_ip, path, \"header:NAME\" or \"cookie:NAME\""),
                        )
                    }
                },
            };
            crate::filter::RateLimiter::new(rate, per, burst)
                .map_err(|e| Invalid::new(at.clone(), e.to_string()))?;
            let shared = r.shared.unwrap_or(false);
            Some(RateLimitConfig {
                rate,
                per,
                burst,
                key,
                shared,
            })
        }
    };

    let mut rules = Vec::new();
    for (i, preset) in block.unwrap_or_default().iter().enumerate() {
        rules.extend(
            RuleSpec::preset(preset)
                .map_err(|e| Invalid::new(path.key("block").index(i), e.to_string()))?,
        );
    }
    for (i, r) in block_rules.unwrap_or_default().into_iter().enumerate() {
        let at = path.key("block_rules").index(i);
        let target = match r.target.as_deref() {
            None | Some("path") => Target::Path,
            Some("query") => Target::Query,
            Some("uri") => Target::Uri,
            Some("any") => Target::Any,
            Some(text) => match text.strip_prefix("header:") {
                Some(name) => Target::Header(
                    HeaderName::from_bytes(name.trim().as_bytes())
                        .map_err(|_| Invalid::new(at.key("target"), format!("invalid header name in {text:?}")))?,
                ),
                None => {
                    return invalid(
                        at.key("target"),
                        format!("unknown target {text:?}: expected path, query, uri, any or \"header:NAME\""),
                    )
                }
            },
        };
        let pattern = match (r.regex, r.contains) {
            (Some(re), None) => Pattern::Regex(re),
            (None, Some(lit)) => Pattern::Literal(lit),
            _ => return invalid(at, "needs exactly one of `regex` or `contains`"),
        };
        let rule_name = name(&r.name, at.key("name"))?;
        rules.push(RuleSpec {
            name: rule_name,
            target,
            pattern,
        });
    }
    if !rules.is_empty() {
        crate::filter::DenyRules::new(rules.clone()).map_err(|e| {
            let key = if matches!(e, FilterError::Rule { .. }) {
                "block_rules"
            } else {
                "block"
            };
            Invalid::new(path.key(key), e.to_string())
        })?;
    }
    Ok(FilterConfig {
        access,
        rate_limit,
        rules,
    })
}

/// `auto_ban = { window, max_requests, max_errors, ban }`.
fn auto_ban(raw: RawAutoBan, path: &KeyPath) -> Result<crate::filter::BanPolicy> {
    let window = duration(
        raw.window.as_ref(),
        path.key("window"),
        Duration::from_secs(10),
        Zero::Rejected,
    )?;
    let ban_for = duration(
        raw.ban.as_ref(),
        path.key("ban"),
        Duration::from_secs(600),
        Zero::Rejected,
    )?;
    let max_requests =
        optional_count(raw.max_requests, path.key("max_requests"))?.map(|n| n as u32);
    let max_errors = optional_count(raw.max_errors, path.key("max_errors"))?.map(|n| n as u32);
    if max_requests.is_none() && max_errors.is_none() {
        return invalid(path.clone(), "needs max_requests, max_errors or both");
    }
    let policy = crate::filter::BanPolicy {
        window,
        max_requests,
        max_errors,
        ban_for,
        ..crate::filter::BanPolicy::default()
    };
    crate::filter::BanTable::new(policy.clone())
        .map_err(|e| Invalid::new(path.clone(), e.to_string()))?;
    Ok(policy)
}

/// A size in bytes: an integer, or a string with a unit (B, KB, KiB, MB, MiB, GB, GiB).
fn size(raw: Option<&RawSize>, path: KeyPath, default: u64, min: u64, max: u64) -> Result<u64> {
    let value = match raw {
        None => return Ok(default),
        Some(RawSize::Bytes(n)) if *n >= 0 => *n as u64,
        Some(RawSize::Bytes(n)) => return invalid(path, format!("must not be negative (got {n})")),
        Some(RawSize::Text(text)) => parse_size(text).ok_or_else(|| {
            Invalid::new(
                path.clone(),
                format!(
                    "invalid size {text:?}: expected e.g. \"64KiB\", \"10MB\" or a number of bytes"
                ),
            )
        })?,
    };
    if value < min || value > max {
        return invalid(
            path,
            format!("must be from {min} to {max} bytes (got {value})"),
        );
    }
    Ok(value)
}

/// An optional count of at least 1 (`max_connections_per_ip`, `max_requests`, …).
fn optional_count(raw: Option<i64>, path: KeyPath) -> Result<Option<i64>> {
    raw.map(|_| integer(raw, path, 0, 1, u32::MAX.into()))
        .transpose()
}

/// `max_body_size` of a listener or route.
fn body_size(raw: Option<&RawSize>, path: &KeyPath) -> Result<Option<u64>> {
    raw.map(|s| size(Some(s), path.key("max_body_size"), 0, 0, u64::MAX / 2))
        .transpose()
}

/// `"64KiB"` → 65536.
pub(crate) fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits.parse().ok()?;
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1_000,
        "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "GiB" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(factor)
}

fn tls_config(raw: RawTls, path: &KeyPath) -> Result<TlsConfig> {
    let file = |value: &str, key: KeyPath| -> Result<PathBuf> {
        if value.is_empty() {
            return invalid(key, "must not be empty");
        }
        Ok(PathBuf::from(value))
    };
    let certs = match (raw.cert, raw.key, raw.certs) {
        (Some(cert), Some(key), None) => vec![CertFiles {
            cert: file(&cert, path.key("cert"))?,
            key: file(&key, path.key("key"))?,
        }],
        (None, None, Some(list)) => {
            if list.is_empty() {
                return invalid(path.key("certs"), "must list at least one { cert, key }");
            }
            list.into_iter()
                .enumerate()
                .map(|(i, c)| {
                    let at = path.key("certs").index(i);
                    Ok(CertFiles {
                        cert: file(&c.cert, at.key("cert"))?,
                        key: file(&c.key, at.key("key"))?,
                    })
                })
                .collect::<Result<Vec<_>>>()?
        }
        (Some(_), None, None) => return invalid(path.key("key"), "required with `cert`"),
        (None, Some(_), None) => return invalid(path.key("cert"), "required with `key`"),
        (_, _, Some(_)) => {
            return invalid(
                path.key("certs"),
                "give either `cert` + `key` or `certs = [{ cert, key }, ...]`, not both",
            )
        }
        (None, None, None) => {
            return invalid(
                path.key("cert"),
                "required: `cert` + `key`, or `certs = [{ cert, key }, ...]`",
            )
        }
    };
    let client_ca = raw
        .client_ca
        .map(|ca| file(&ca, path.key("client_ca")))
        .transpose()?;
    if raw.client_auth.is_some() && client_ca.is_none() {
        return invalid(
            path.key("client_auth"),
            "only valid with `client_ca` (the CAs client certificates are checked against)",
        );
    }
    let handshake_timeout = duration(
        raw.handshake_timeout.as_ref(),
        path.key("handshake_timeout"),
        Duration::from_secs(10),
        Zero::Rejected,
    )?;
    let min_version = match raw.min_version.as_deref() {
        None | Some("1.2") => TlsVersion::Tls12,
        Some("1.3") => TlsVersion::Tls13,
        Some(other) => {
            return invalid(
                path.key("min_version"),
                format!("must be \"1.2\" or \"1.3\", got {other:?}"),
            )
        }
    };
    let hsts = raw
        .hsts
        .as_ref()
        .map(|d| duration(Some(d), path.key("hsts"), Duration::ZERO, Zero::Allowed))
        .transpose()?;
    Ok(TlsConfig {
        certs,
        client_ca,
        client_auth: raw.client_auth.unwrap_or(ClientAuth::Required),
        handshake_timeout,
        min_version,
        hsts,
        resumption: raw.resumption.unwrap_or(true),
        server: None,
    })
}

fn upstream_tls(raw: RawUpstreamTls, path: &KeyPath) -> Result<UpstreamTls> {
    let file = |value: String, key: &str| -> Result<PathBuf> {
        if value.is_empty() {
            return invalid(path.key(key), "must not be empty");
        }
        Ok(PathBuf::from(value))
    };
    let sni = match raw.sni {
        Some(name) => {
            if rustls::pki_types::ServerName::try_from(name.as_str()).is_err() {
                return invalid(
                    path.key("sni"),
                    format!("not a DNS name or IP address: {name:?}"),
                );
            }
            Some(name)
        }
        None => None,
    };
    let verify = raw.verify.unwrap_or(true);
    if !verify && raw.ca.is_some() {
        return invalid(
            path.key("ca"),
            "has no use with verify = false (certificates are not checked)",
        );
    }
    let client_cert = match (raw.cert, raw.key) {
        (Some(cert), Some(key)) => Some(CertFiles {
            cert: file(cert, "cert")?,
            key: file(key, "key")?,
        }),
        (None, None) => None,
        (Some(_), None) => return invalid(path.key("key"), "required with `cert`"),
        (None, Some(_)) => return invalid(path.key("cert"), "required with `key`"),
    };
    Ok(UpstreamTls {
        ca: raw.ca.map(|ca| file(ca, "ca")).transpose()?,
        sni,
        verify,
        client_cert,
        client: None,
    })
}

/// The index of the pool `name` refers to.
fn pool_ref(name: &str, path: KeyPath, pools: &[PoolConfig]) -> Result<usize> {
    pools.iter().position(|p| p.name == name).ok_or_else(|| {
        let defined: Vec<String> = pools.iter().map(|p| format!("`{}`", p.name)).collect();
        Invalid::new(
            path,
            format!(
                "no pool named `{name}`; defined pools: {}",
                defined.join(", ")
            ),
        )
    })
}

fn route(raw: RawRoute, path: &KeyPath, pools: &[PoolConfig]) -> Result<RouteConfig> {
    let pool = pool_ref(&raw.pool, path.key("pool"), pools)?;

    let path_prefix = match raw.path_prefix {
        Some(prefix) if !prefix.starts_with('/') => {
            return invalid(
                path.key("path_prefix"),
                format!("must start with '/', got {prefix:?}"),
            )
        }
        prefix => prefix,
    };
    let path_regex = raw
        .path_regex
        .map(|re| {
            Regex::new(&re).map_err(|e| {
                Invalid::new(
                    path.key("path_regex"),
                    format!("invalid regex {re:?}: {}", regex_reason(&e)),
                )
            })
        })
        .transpose()?;
    let host = raw
        .host
        .map(|h| host_match(&h, &path.key("host")))
        .transpose()?;
    let method = raw
        .method
        .map(|m| method(&m, &path.key("method")))
        .transpose()?;

    let mut headers: Vec<(HeaderName, String)> = Vec::new();
    for (name, value) in raw.headers.unwrap_or_default() {
        let path = path.key("headers").key(&name);
        let header = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| Invalid::new(path.clone(), format!("invalid header name {name:?}")))?;
        if headers.iter().any(|(h, _)| *h == header) {
            return invalid(
                path,
                format!("header `{header}` is listed twice (header names are case-insensitive)"),
            );
        }
        if HeaderValue::from_str(&value).is_err() {
            return invalid(
                path,
                format!("invalid header value {value:?}: only visible ASCII characters, spaces and tabs"),
            );
        }
        headers.push((header, value));
    }

    let cookie = match raw.cookie {
        None => None,
        Some(cookie) => {
            let path = path.key("cookie");
            check_cookie_name(&cookie.name, &path.key("name"))?;
            let bad = |c: char| {
                c.is_whitespace() || c.is_control() || matches!(c, ';' | ',' | '"' | '\\')
            };
            if cookie.value.chars().any(bad) {
                return invalid(
                    path.key("value"),
                    "a cookie value cannot contain whitespace, control characters, ';', ',', '\"' or '\\'",
                );
            }
            Some((cookie.name, cookie.value))
        }
    };

    let query: Vec<(String, String)> = raw.query.unwrap_or_default().into_iter().collect();
    if query.iter().any(|(k, _)| k.is_empty()) {
        return invalid(path.key("query"), "query parameter names must not be empty");
    }

    let sni = raw
        .sni
        .map(|h| host_match(&h, &path.key("sni")))
        .transpose()?;
    let matcher = RouteMatch {
        path_prefix,
        path_regex,
        host,
        method,
        headers,
        cookie,
        query,
        sni,
    };
    let matches_nothing = matcher.sni.is_none()
        && matcher.path_prefix.is_none()
        && matcher.path_regex.is_none()
        && matcher.host.is_none()
        && matcher.method.is_none()
        && matcher.headers.is_empty()
        && matcher.cookie.is_none()
        && matcher.query.is_empty();
    if matches_nothing {
        return invalid(
            path.clone(),
            "a route needs at least one match key: path_prefix, path_regex, host, method, \
             headers, cookie or query (tcp listeners: sni)",
        );
    }
    let max_body_size = body_size(raw.max_body_size.as_ref(), path)?;
    let cache = match raw.cache {
        None => RouteCache::Pool,
        Some(RawRouteCache::Enabled(false)) => RouteCache::Off,
        Some(RawRouteCache::Enabled(true)) => {
            if pools[pool].cache.is_none() {
                return invalid(
                    path.key("cache"),
                    format!(
                        "`cache = true` uses the pool's cache, but pool {:?} has no [pools.cache]; \
                         give the route a [listeners.routes.cache] table instead",
                        pools[pool].name
                    ),
                );
            }
            RouteCache::Pool
        }
        Some(RawRouteCache::Table(c)) => RouteCache::Own(cache(c, &path.key("cache"))?),
    };
    let filter = filter(
        raw.allow,
        raw.deny,
        raw.rate_limit,
        raw.block,
        raw.block_rules,
        path,
    )?;
    Ok(RouteConfig {
        matcher,
        pool,
        max_body_size,
        filter,
        cache,
    })
}

/// `[pools.cache]` or `[listeners.routes.cache]`.
fn cache(raw: RawCache, path: &KeyPath) -> Result<CacheConfig> {
    let max_size = size(
        raw.max_size.as_ref(),
        path.key("max_size"),
        256 << 20,
        64 << 10,
        u64::MAX / 2,
    )?;
    let max_object_size = size(
        raw.max_object_size.as_ref(),
        path.key("max_object_size"),
        (8 << 20).min(max_size),
        1,
        u64::MAX / 2,
    )?;
    if max_object_size > max_size {
        return invalid(
            path.key("max_object_size"),
            format!("must not be above max_size ({max_size} bytes)"),
        );
    }
    let default_ttl = raw
        .default_ttl
        .as_ref()
        .map(|d| {
            duration(
                Some(d),
                path.key("default_ttl"),
                Duration::ZERO,
                Zero::Rejected,
            )
        })
        .transpose()?;
    let coalesce_timeout = duration(
        raw.coalesce_timeout.as_ref(),
        path.key("coalesce_timeout"),
        Duration::from_secs(5),
        Zero::Allowed,
    )?;
    let stale_if_error = duration(
        raw.stale_if_error.as_ref(),
        path.key("stale_if_error"),
        Duration::ZERO,
        Zero::Allowed,
    )?;
    let (key_query, key_headers) = match raw.key {
        None => (KeyQuery::Keep, Vec::new()),
        Some(key) => {
            let path = path.key("key");
            let query = match key.query.as_deref() {
                None | Some("keep") => KeyQuery::Keep,
                Some("sort") => KeyQuery::Sort,
                Some("ignore") => KeyQuery::Ignore,
                Some(other) => {
                    return invalid(
                        path.key("query"),
                        format!(
                            "unknown value {other:?}: expected \"keep\", \"sort\" or \"ignore\""
                        ),
                    )
                }
            };
            let mut headers: Vec<HeaderName> = Vec::new();
            for name in key.headers.unwrap_or_default() {
                let header = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                    Invalid::new(path.key("headers"), format!("invalid header name {name:?}"))
                })?;
                if headers.contains(&header) {
                    return invalid(
                        path.key("headers"),
                        format!(
                            "header `{header}` is listed twice (header names are case-insensitive)"
                        ),
                    );
                }
                headers.push(header);
            }
            (query, headers)
        }
    };
    Ok(CacheConfig {
        max_size,
        max_object_size,
        x_cache: raw.x_cache.unwrap_or(true),
        store_set_cookie: raw.store_set_cookie.unwrap_or(false),
        default_ttl,
        coalesce_timeout,
        stale_if_error,
        key_query,
        key_headers,
    })
}

/// The regex crate's syntax errors draw a caret under the pattern over several lines; keep the reason.
fn regex_reason(error: &regex::Error) -> String {
    let text = error.to_string();
    let last = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    last.trim().trim_start_matches("error: ").to_owned()
}

/// `"Example.COM:8080"` → `Exact("example.com")`, `"*.example.com"` → `Suffix(".example.com")`.
pub(crate) fn host_match(text: &str, path: &KeyPath) -> Result<HostMatch> {
    let lower = text.trim().to_ascii_lowercase();
    let bad = |why: &str| invalid(path.clone(), format!("invalid host {text:?}: {why}"));
    // Strip the port: `[v6]:port`, `host:port`.
    let host = if lower.starts_with('[') {
        let Some(end) = lower.find(']') else {
            return bad("unclosed '['");
        };
        let rest = &lower[end + 1..];
        if !(rest.is_empty() || is_port_suffix(rest)) {
            return bad("expected a port after ']'");
        }
        &lower[..=end]
    } else {
        match lower.rsplit_once(':') {
            Some((host, _)) if is_port_suffix(&lower[host.len()..]) => host,
            Some(_) => return bad("expected HOST or HOST:PORT"),
            None => lower.as_str(),
        }
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() {
        return bad("empty host");
    }
    let (wildcard, name) = match host.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, host),
    };
    if name.contains('*') {
        return bad("a wildcard is only allowed as a leading \"*.\", e.g. \"*.example.com\"");
    }
    let valid = if name.starts_with('[') {
        !wildcard
            && name.ends_with(']')
            && name[1..name.len() - 1]
                .parse::<std::net::Ipv6Addr>()
                .is_ok()
    } else {
        !name.is_empty()
            && name.split('.').all(|label| {
                !label.is_empty()
                    && label
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            })
    };
    if !valid {
        return bad("expected a host name such as \"example.com\" or \"*.example.com\"");
    }
    Ok(if wildcard {
        HostMatch::Suffix(format!(".{name}"))
    } else {
        HostMatch::Exact(name.to_owned())
    })
}

/// `":8080"`.
fn is_port_suffix(text: &str) -> bool {
    text.strip_prefix(':')
        .is_some_and(|p| !p.is_empty() && p.parse::<u16>().is_ok())
}

fn method(text: &str, path: &KeyPath) -> Result<Method> {
    const STANDARD: [&str; 9] = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
    ];
    let upper = text.to_ascii_uppercase();
    if upper != text && STANDARD.contains(&upper.as_str()) {
        return invalid(
            path.clone(),
            format!("methods are case-sensitive: write {upper:?}, not {text:?}"),
        );
    }
    Method::from_bytes(text.as_bytes())
        .map_err(|_| Invalid::new(path.clone(), format!("invalid method {text:?}")))
}

/// RFC 6265: a cookie name is an HTTP token.
fn check_cookie_name(name: &str, path: &KeyPath) -> Result<()> {
    let tchar = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if name.is_empty() || !name.chars().all(tchar) {
        return invalid(
            path.clone(),
            format!("invalid cookie name {name:?}: letters, digits and !#$%&'*+-.^_`|~ only"),
        );
    }
    Ok(())
}

/// Names appear in admin API URLs, metrics labels and logs.
fn name(text: &str, path: KeyPath) -> Result<String> {
    if text.is_empty() {
        return invalid(path, "must not be empty");
    }
    if text
        .chars()
        .any(|c| "/\"\\".contains(c) || c.is_whitespace() || c.is_control())
    {
        return invalid(
            path,
            format!(
                "invalid name {text:?}: '/', '\"', '\\', whitespace and control characters are not \
                 allowed (names appear in admin API URLs and metric labels)"
            ),
        );
    }
    Ok(text.to_owned())
}

/// An address to listen on: an IP, not a host name, so that what is bound is what was written.
fn bind_address(text: &str, path: KeyPath) -> Result<SocketAddr> {
    text.parse().map_err(|_| {
        Invalid::new(
            path,
            format!(
                "invalid address {text:?}: expected IP:PORT, e.g. \"127.0.0.1:8080\" or \"[::]:8080\""
            ),
        )
    })
}

/// A server address: `IP:PORT`, or `HOST:PORT`, a name that DNS discovery resolves at run time.
fn server_address(text: &str, path: KeyPath) -> Result<Address> {
    let port_zero = || invalid(path.clone(), format!("invalid address {text:?}: port 0"));
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return if addr.port() == 0 {
            port_zero()
        } else {
            Ok(Address::Ip(addr))
        };
    }
    let Some((host, port)) = split_host_port(text) else {
        return invalid(
            path,
            format!(
                "invalid address {text:?}: expected IP:PORT or HOST:PORT, e.g. \
                 \"127.0.0.1:9001\" or \"localhost:9001\""
            ),
        );
    };
    if port == 0 {
        return port_zero();
    }
    let valid_host = host.trim_end_matches('.').split('.').all(|l| {
        !l.is_empty()
            && l.len() <= 63
            && l.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    });
    if !valid_host {
        return invalid(path, format!("invalid host name in {text:?}"));
    }
    Ok(Address::Name(host.to_owned(), port))
}

/// `host:port` or `[v6]:port` → (host without brackets, port).
fn split_host_port(text: &str) -> Option<(&str, u16)> {
    let (host, port) = match text.strip_prefix('[') {
        Some(rest) => {
            let (host, after) = rest.split_once(']')?;
            (host, after.strip_prefix(':')?)
        }
        None => {
            let (host, port) = text.rsplit_once(':')?;
            if host.contains(':') {
                return None; // an IPv6 address needs brackets
            }
            (host, port)
        }
    };
    if host.is_empty() || port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((host, port.parse().ok()?))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Zero {
    /// `"0s"` is meaningful (e.g. no grace period at shutdown).
    Allowed,
    /// A zero duration would make the feature fail at once or spin.
    Rejected,
}

fn duration(
    raw: Option<&RawDuration>,
    path: KeyPath,
    default: Duration,
    zero: Zero,
) -> Result<Duration> {
    let Some(RawDuration(text)) = raw else {
        return Ok(default);
    };
    let parsed = humantime::parse_duration(text.trim())
        .map_err(|e| Invalid::new(path.clone(), format!("invalid duration {text:?}: {e}")))?;
    if parsed.is_zero() && zero == Zero::Rejected {
        return invalid(path, "must be greater than zero");
    }
    Ok(parsed)
}

/// `raw` (or `default`) checked to be within `min..=max`.
fn integer(raw: Option<i64>, path: KeyPath, default: i64, min: i64, max: i64) -> Result<i64> {
    let value = raw.unwrap_or(default);
    if value < min {
        return invalid(path, format!("must be at least {min}"));
    }
    if value > max {
        return invalid(path, format!("must be at most {max}"));
    }
    Ok(value)
}

//! The configuration file: `fulcrum.toml`.
//!
//! Loading happens in two steps, so that everything the running balancer sees has already been checked:
//!
//! 1. [`file`] — raw serde types that mirror the TOML file one to one (`deny_unknown_fields`, every
//!    optional key an `Option`), so unknown keys and type errors are reported with their position;
//! 2. [`validate`] — turns the raw file into a [`Config`]: defaults applied, names resolved to indices,
//!    regexes compiled, addresses resolved, every cross-key rule checked.
//!
//! Every error is a [`ConfigError`] naming the file, the line and column, and the key path
//! (`pools[1].servers[0].weight`) of the offending setting. The user-facing reference of every key is
//! `docs/configuration.md`; the doc comments below say the same thing from the code's side.

mod error;
mod file;
#[cfg(test)]
mod tests;
mod validate;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

pub use error::ConfigError;

/// Reads and validates the configuration file at `path`.
///
/// # Errors
///
/// A file that cannot be read (named as `path` was written, with the OS error), or any error of [`parse`].
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        origin: origin.clone(),
        key: None,
        line: None,
        column: None,
        message: format!("cannot read configuration file: {e}"),
    })?;
    parse(&text, &origin)
}

/// Parses and validates a configuration from `text`; `origin` (usually the file name) prefixes every
/// error message.
///
/// # Errors
///
/// The first problem found: TOML syntax, an unknown key, a wrong type, a missing key, a rule of
/// `docs/configuration.md`, or a feature that is not supported yet; each placed by line and key path.
pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
    parse_with(text, origin, validate::validate)
}

/// [`parse`] without reading the files the configuration names (TLS certificates and keys are not
/// loaded: `tls.server` and `tls.client` stay `None`, so such a configuration cannot serve TLS). For
/// checking documentation and examples whose files do not exist.
///
/// # Errors
///
/// As [`parse`], except for problems with the named files.
pub fn parse_without_files(text: &str, origin: &str) -> Result<Config, ConfigError> {
    parse_with(text, origin, validate::validate_without_files)
}

/// The common path of [`parse`] and the tests, which also validate features that are not built yet.
fn parse_with(
    text: &str,
    origin: &str,
    validate: fn(file::RawConfig) -> Result<Config, validate::Invalid>,
) -> Result<Config, ConfigError> {
    // The document keeps the spans that turn a key path into a line; serde gives the typed view.
    let doc = toml_edit::ImDocument::parse(text)
        .map_err(|e| ConfigError::syntax(origin, text, e.message(), e.span()))?;
    let raw: file::RawConfig =
        toml::from_str(text).map_err(|e| ConfigError::from_serde(origin, &doc, &e))?;
    validate(raw)
        .map_err(|invalid| ConfigError::at_path(origin, &doc, invalid.path, invalid.message))
}

/// A validated configuration: every name resolved, every default applied.
#[derive(Debug, Clone)]
pub struct Config {
    /// `shutdown_timeout` (default `"30s"`): on SIGTERM/SIGINT, how long in-flight work may take to finish
    /// before fulcrum exits anyway. `"0s"` exits as soon as the listeners are closed.
    pub shutdown_timeout: Duration,
    /// `[admin]` (optional): the REST API, `/metrics` and the dashboard. Absent: no admin endpoint.
    pub admin: Option<AdminConfig>,
    /// `[store]` (default in-memory): where shared state such as stick tables lives.
    pub store: StoreConfig,
    /// `dns.nameservers` (optional, `IP:PORT` each): the DNS servers that resolve server host names and
    /// `dns_srv`. Empty (the default): the system's (`/etc/resolv.conf`, `/etc/hosts`).
    pub dns_nameservers: Vec<SocketAddr>,
    /// `[access_log]` (optional): one line per HTTP request and per L4 session. Absent: no access log.
    pub access_log: Option<crate::access_log::Settings>,
    /// `[ha]` (optional): share a virtual IP with other instances (VRRP v3). Absent: standalone.
    pub ha: Option<HaConfig>,
    /// `[[listeners]]` (at least one): the addresses fulcrum accepts traffic on.
    pub listeners: Vec<ListenerConfig>,
    /// `[[pools]]` (at least one): groups of servers traffic is balanced over. Listeners and routes refer to
    /// pools by their index in this vector.
    pub pools: Vec<PoolConfig>,
}

impl Config {
    /// The index of the pool called `name`, if any.
    pub fn pool_index(&self, name: &str) -> Option<usize> {
        self.pools.iter().position(|p| p.name == name)
    }
}

/// `[ha]`: a virtual IP shared with other balancers of the same VRRP v3 group (RFC 5798, IPv4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HaConfig {
    /// `ha.interface` (required): the network interface that carries the virtual IP and the adverts.
    pub interface: String,
    /// `ha.virtual_ip` (required): the IPv4 address the master holds, with its prefix (`"192.0.2.100/24"`).
    pub virtual_ip: ipnet::Ipv4Net,
    /// `ha.router_id` (required, 1-255): the VRRP group, the same on every instance of it.
    pub router_id: u8,
    /// `ha.priority` (default 100, 1-254): the highest live priority holds the address.
    pub priority: u8,
    /// `ha.advert_interval` (default `"1s"`, 10ms-40.95s in steps of 10 ms): how often the master
    /// announces itself; backups take over after 3 intervals plus a skew without one.
    pub advert_interval: Duration,
    /// `ha.preempt` (default true): a higher priority instance takes the address back from a lower one.
    pub preempt: bool,
    /// `ha.fault_when` (default `"every_pool_down"`): when this instance stops holding or claiming the
    /// address because its listeners cannot serve.
    pub fault_when: FaultWhen,
}

/// `ha.fault_when`: when an instance gives up the virtual IP because it cannot serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultWhen {
    /// Every pool the listeners send traffic to has no available server.
    EveryPoolDown,
    /// Any pool the listeners send traffic to has no available server.
    AnyPoolDown,
    /// Never: only a dead process or a higher priority moves the address.
    Never,
}

/// `[admin]`: the admin API, Prometheus metrics and the dashboard.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// `admin.bind` (required): the `IP:PORT` the admin endpoint listens on, e.g. `"127.0.0.1:9090"`.
    pub bind: SocketAddr,
    /// `admin.token` (optional, non-empty): when set, mutating calls must carry
    /// `Authorization: Bearer <token>`. Absent: the admin API is unauthenticated.
    pub token: Option<String>,
}

/// `[store]`: where shared state (stick tables) lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// `kind = "memory"` (the default): state lives in this process only.
    Memory,
    /// `kind = "redis"` or `kind = "redis_cluster"`: state lives in Redis (one node, through Sentinel, or
    /// a Redis Cluster) and is shared by every fulcrum using the same Redis and prefix.
    Redis {
        /// `store.url` or `store.sentinel` (`kind = "redis"`, exactly one of the two), or `store.nodes`
        /// (`kind = "redis_cluster"`): how to reach Redis.
        target: RedisTarget,
        /// `store.key_prefix` (default `"fulcrum"`): prefix of every Redis key fulcrum writes.
        key_prefix: String,
    },
}

/// How to reach Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// `store.url`: a single node, `redis://[user:password@]host:port[/db]` or `rediss://…` for TLS.
    Url(String),
    /// `store.sentinel = { master = "mymaster", nodes = ["127.0.0.1:26379"] }`: ask Sentinel for the master.
    Sentinel {
        /// `store.sentinel.master`: the name of the monitored master.
        master: String,
        /// `store.sentinel.nodes` (non-empty): the Sentinels, as `host:port`.
        nodes: Vec<String>,
    },
    /// `kind = "redis_cluster"` with `store.nodes = ["127.0.0.1:7000", …]`: some nodes of a Redis Cluster
    /// (`host:port` or `redis://…` / `rediss://…` URLs); the rest of the cluster, its slots, their moves
    /// and failovers are learned from them.
    Cluster {
        /// `store.nodes` (non-empty): the seed nodes.
        nodes: Vec<String>,
    },
}

/// `[[listeners]]`: one address fulcrum accepts traffic on.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// `name` (required, unique): used in logs and metrics.
    pub name: String,
    /// `bind` (required, unique): the `IP:PORT` to listen on, e.g. `"0.0.0.0:80"`. Port 0 picks a free port.
    pub bind: SocketAddr,
    /// `protocol` (required): `http`, `https`, `tcp` or `udp`.
    pub protocol: Protocol,
    /// `pool` (required): the pool that gets the traffic no route matches, as an index into [`Config::pools`].
    pub pool: usize,
    /// `[[listeners.routes]]` (http and https only): checked in order, the first match picks the pool.
    pub routes: Vec<RouteConfig>,
    /// `proxy_protocol` (tcp only): send a PROXY protocol header of this version to the servers.
    pub proxy_protocol: Option<ProxyProtocol>,
    /// `tls = { cert = "cert.pem", key = "key.pem" }`: required for `https`, rejected otherwise.
    pub tls: Option<TlsConfig>,
    /// `https_redirect` (http only, optional): `true` or a port: every request is answered with a
    /// `308` to the same host and path over HTTPS (on that port; `true` is 443).
    pub https_redirect: Option<u16>,
    /// `accept_proxy_protocol` (tcp only, optional): connections from these CIDRs start with a PROXY
    /// protocol header (v1 or v2), whose source address is then the client's; from any other source a
    /// connection is served as it is (a header it sends is not trusted: it is passed on as data).
    pub accept_proxy_protocol: Option<crate::filter::CidrSet>,
    /// `hello_timeout` (tcp listeners with `sni` routes, default `"5s"`): the TLS ClientHello must
    /// arrive within this (and the PROXY header, when one is expected).
    pub hello_timeout: Duration,
    /// `max_flows` (udp only, default 100 000): client flows tracked at once; new clients beyond are
    /// refused (their datagrams dropped) and counted.
    pub max_flows: usize,
    /// `splice` (tcp only, default true): move bytes with `splice(2)` (kernel to kernel, through a
    /// pipe borrowed per burst) instead of through a user-space buffer; `false` copies through a
    /// 16 KiB buffer borrowed per burst.
    pub splice: bool,
    /// `explain` (http/https, default false): a request carrying `X-Fulcrum-Explain` (with the admin
    /// token as its value when `admin.token` is set) gets response headers explaining its routing and
    /// pick.
    pub explain: bool,
    /// `request_header_timeout` (http/https, default `"10s"`, fulcrum extension): a client must send its
    /// whole request head within this, or it gets a 408 and the connection is closed.
    pub request_header_timeout: Duration,
    /// `idle_timeout` (default `"60s"`, fulcrum extension): a client connection with no request in flight
    /// (a keep-alive HTTP/1.1 connection between requests, an HTTP/2 connection without streams, or one
    /// that never sent anything) is closed after this long without a byte from the client.
    pub idle_timeout: Duration,
    /// `body_timeout` (default `"30s"`): a request body that makes no progress for this long is abandoned
    /// with 408 (the client's fault: never counted against the server).
    pub body_timeout: Duration,
    /// `write_timeout` (default `"30s"`): a client that reads nothing of its response for this long is cut.
    pub write_timeout: Duration,
    /// `tunnel_timeout` (default `"1h"`): a WebSocket (upgraded) connection with no traffic either way
    /// for this long is closed.
    pub tunnel_timeout: Duration,
    /// `max_header_size` (default `"64KiB"`, 8 KiB to 1 MiB): the largest request head; larger gets 431.
    pub max_header_size: usize,
    /// `max_headers` (default 100, 1 to 1000): the most request header fields; more gets 431.
    pub max_headers: usize,
    /// `h2_max_concurrent_streams` (default 100, 1 to 10000): HTTP/2 streams a client may have open.
    pub h2_max_concurrent_streams: u32,
    /// `max_connections_per_ip` (optional, at least 1): open connections one client address may hold;
    /// more are refused at accept (closed at once) and counted.
    pub max_connections_per_ip: Option<usize>,
    /// `max_body_size` (optional): the largest request body; a larger one gets 413 (per route too).
    pub max_body_size: Option<u64>,
    /// `allow`, `deny`, `rate_limit`, `block`, `block_rules`: traffic filtering of the whole listener.
    pub filter: FilterConfig,
    /// `auto_ban` (optional): clients over a request or error rate are banned for a while.
    pub auto_ban: Option<crate::filter::BanPolicy>,
    /// `max_connections` (default `10000`, at least 1, fulcrum extension): client connections accepted at
    /// once on this listener; further connections wait in the kernel's accept queue.
    pub max_connections: usize,
}

/// `listeners.protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// Plain HTTP/1.1 (and h2c), with routes.
    Http,
    /// HTTP over TLS, with routes; needs `tls`.
    Https,
    /// TCP, proxied byte for byte.
    Tcp,
    /// UDP datagrams, each client address kept on one server.
    Udp,
}

impl Protocol {
    /// The name used in the configuration file.
    pub fn as_str(&self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Https => "https",
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }

    /// True for the protocols whose listeners understand HTTP (and so may have routes).
    pub fn is_http(&self) -> bool {
        matches!(self, Protocol::Http | Protocol::Https)
    }
}

/// `listeners.proxy_protocol`: the PROXY protocol version sent to servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProxyProtocol {
    /// `"v1"`: the human-readable text header.
    V1,
    /// `"v2"`: the binary header.
    V2,
}

/// `listeners.tls`: the certificates an `https` listener presents and how it talks TLS.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// `tls.cert` + `tls.key`, or `tls.certs = [{ cert, key }, …]`: PEM files (relative paths are
    /// relative to the working directory). Each certificate serves the DNS names of its subject
    /// alternative names (wildcards too); the first one also serves every other name and clients that
    /// send none.
    pub certs: Vec<CertFiles>,
    /// `tls.client_ca` (optional): PEM file of the CAs client certificates must chain to (mTLS).
    pub client_ca: Option<PathBuf>,
    /// `tls.client_auth` (default `"required"`, only with `client_ca`): `"optional"` also admits clients
    /// without a certificate (a certificate that is sent must still verify).
    pub client_auth: ClientAuth,
    /// `tls.handshake_timeout` (default `"10s"`): a handshake that takes longer is abandoned.
    pub handshake_timeout: Duration,
    /// `tls.min_version` (default `"1.2"`): `"1.2"` or `"1.3"`. Older versions are never offered.
    pub min_version: TlsVersion,
    /// `tls.hsts` (optional): answers carry `Strict-Transport-Security: max-age=<seconds>`.
    pub hsts: Option<Duration>,
    /// `tls.resumption` (default true): clients may resume a session (tickets, session ids), skipping
    /// the full handshake. `false`: every connection makes a full handshake.
    pub resumption: bool,
    /// The loaded rustls configuration (certificates read and checked), filled in when the
    /// configuration is loaded from a file; `None` only for configurations validated without files.
    pub server: Option<Arc<rustls::ServerConfig>>,
}

/// A certificate chain and its private key, as PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    /// The certificate chain, the server's own certificate first.
    pub cert: PathBuf,
    /// The private key.
    pub key: PathBuf,
}

/// `tls.client_auth`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// A client without a valid certificate is refused.
    Required,
    /// A client may send no certificate; one that is sent must verify.
    Optional,
}

/// `tls.min_version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsVersion {
    /// TLS 1.2 and 1.3.
    Tls12,
    /// TLS 1.3 only.
    Tls13,
}

/// `[[listeners.routes]]`: send matching requests to another pool.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// The conditions; a request matches when all of them hold.
    pub matcher: RouteMatch,
    /// `pool` (required): the pool matching requests go to, as an index into [`Config::pools`].
    pub pool: usize,
    /// `max_body_size` (optional): the largest request body on this route (else the listener's); a
    /// larger one gets 413.
    pub max_body_size: Option<u64>,
    /// Traffic filtering of this route's requests, after the listener's.
    pub filter: FilterConfig,
    /// `cache` (optional): `false` turns the pool's cache off on this route; a `[listeners.routes.cache]`
    /// table gives the route a cache of its own. Absent: the pool's `[pools.cache]`, if any.
    pub cache: RouteCache,
}

/// A route's choice of HTTP cache.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum RouteCache {
    /// The pool's cache, if it has one.
    #[default]
    Pool,
    /// No cache on this route.
    Off,
    /// A cache of the route's own.
    Own(CacheConfig),
}

/// `[pools.cache]` / `[listeners.routes.cache]`: an in-memory HTTP cache (RFC 9111, shared cache).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheConfig {
    /// `max_size` (default "256MiB"): the bound of the store in bytes (bodies, headers, keys).
    pub max_size: u64,
    /// `max_object_size` (default "8MiB"): a larger response is streamed through and not stored.
    pub max_object_size: u64,
    /// `x_cache` (default true): add `X-Cache: HIT|MISS|STALE|BYPASS` to responses.
    pub x_cache: bool,
    /// `store_set_cookie` (default false): store responses that carry `Set-Cookie`.
    pub store_set_cookie: bool,
    /// `default_ttl` (optional): freshness for a storable response that states none (no `max-age`,
    /// `s-maxage` or `Expires`); absent: only the RFC's heuristic (10% of the `Last-Modified` age).
    pub default_ttl: Option<Duration>,
    /// `coalesce_timeout` (default "5s"): how long a miss waits for the same key's request in flight
    /// before going to a server itself.
    pub coalesce_timeout: Duration,
    /// `stale_if_error` (default "0s"): how stale an entry may be served when every server fails or
    /// answers 5xx (a response's own `stale-if-error` directive is honoured too).
    pub stale_if_error: Duration,
    /// `key.query` (default "keep"): the query string in the key as sent, sorted, or ignored.
    pub key_query: KeyQuery,
    /// `key.headers` (default none): request headers whose values are part of the key.
    pub key_headers: Vec<http::HeaderName>,
}

/// `cache.key.query`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyQuery {
    /// As sent.
    Keep,
    /// Parameters sorted, so their order does not matter.
    Sort,
    /// Not in the key.
    Ignore,
}

/// Traffic filtering of a listener or route.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FilterConfig {
    /// `allow` / `deny`: CIDR lists (`"10.0.0.0/8"`, `"192.0.2.1"`, `"2001:db8::/32"`). With `allow`, only
    /// listed addresses pass; an address in `deny` is refused. Listener lists are checked at accept
    /// (the connection is closed), route lists per request (403).
    pub access: crate::filter::AccessList,
    /// `rate_limit = { rate = 100, per = "1s", burst = 50, key = "source_ip" }`: a token bucket per key;
    /// over it, 429 with `Retry-After`.
    pub rate_limit: Option<RateLimitConfig>,
    /// `block = ["path_traversal", "scanners", "sql_injection"]` and `[[…block_rules]]`: attack patterns;
    /// a match gets 403 and counts in `fulcrum_blocked_requests_total{rule}`.
    pub rules: Vec<crate::filter::RuleSpec>,
}

impl FilterConfig {
    /// True when it filters nothing.
    pub fn is_empty(&self) -> bool {
        self.access.is_open() && self.rate_limit.is_none() && self.rules.is_empty()
    }
}

/// `rate_limit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitConfig {
    /// `rate` (required, at least 1): requests allowed per `per`.
    pub rate: u32,
    /// `per` (default `"1s"`).
    pub per: Duration,
    /// `burst` (default `rate`): requests allowed at once above the steady rate.
    pub burst: u32,
    /// `key` (default `"source_ip"`): what a bucket is kept per.
    pub key: RateKey,
    /// `shared` (default false; needs `[store] kind = "redis"`): one limit for every fulcrum instance
    /// using the store — `rate` requests per fixed window of `per`, counted in Redis (one round trip
    /// per request; `burst` does not apply). While Redis does not answer, each instance limits alone.
    pub shared: bool,
}

/// `rate_limit.key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RateKey {
    /// `"source_ip"`: the client address (IPv6 by /64).
    SourceIp,
    /// `"header:NAME"`: the value of that header (requests without it are keyed by address).
    Header(http::HeaderName),
    /// `"cookie:NAME"`: the value of that cookie (requests without it are keyed by address).
    Cookie(String),
    /// `"path"`: the request path (one bucket per path, shared by every client).
    Path,
}

/// The match keys of a route. Every key present must match; at least one is required.
#[derive(Debug, Clone)]
pub struct RouteMatch {
    /// `path_prefix`: the request path starts with this (byte-wise, case-sensitive). Starts with `/`.
    pub path_prefix: Option<String>,
    /// `path_regex`: the request path (without the query) contains a match of this regex; anchor it with
    /// `^…$` to match the whole path. Compiled once, at load.
    pub path_regex: Option<regex::Regex>,
    /// `host`: the request's host (the `Host` header or the URI authority), port ignored, case-insensitive.
    pub host: Option<HostMatch>,
    /// `method`: the request method, e.g. `"POST"` (methods are case-sensitive).
    pub method: Option<http::Method>,
    /// `headers = { "x-version" = "2" }`: each header is present with exactly this value.
    pub headers: Vec<(http::HeaderName, String)>,
    /// `cookie = { name = "beta", value = "1" }`: the request carries this cookie with this value.
    pub cookie: Option<(String, String)>,
    /// `query = { "v" = "2" }`: each query parameter is present with exactly this value, compared as it
    /// appears in the URL (not percent-decoded).
    pub query: Vec<(String, String)>,
    /// `sni` (tcp listeners only, the only match key there): the server name of the client's TLS
    /// ClientHello, read without terminating TLS; `"*.example.com"` matches any subdomain.
    pub sni: Option<HostMatch>,
}

/// `routes.host`, normalised: lowercase, port and trailing dot removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    /// `"example.com"`: exactly this host.
    Exact(String),
    /// `"*.example.com"` is stored as `Suffix(".example.com")`: any host ending with it, i.e. any subdomain
    /// (at any depth) but not `example.com` itself.
    Suffix(String),
}

impl HostMatch {
    /// Whether `host` (already lowercased, without port) matches.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostMatch::Exact(h) => host == h,
            HostMatch::Suffix(s) => host.len() > s.len() && host.ends_with(s.as_str()),
        }
    }
}

/// `[[pools]]`: servers that share traffic, and how.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// `name` (required, unique): referenced by listeners and routes, and used in the admin API's URLs.
    pub name: String,
    /// `algorithm` (default `round_robin`): how a server is picked.
    pub algorithm: Algorithm,
    /// `hash_key` (hash algorithms only): what is hashed. Always `Some` for `ip_hash`, `consistent_hash`
    /// and `maglev` (default `source_ip`), always `None` for the other algorithms.
    pub hash_key: Option<HashKey>,
    /// `hash_balance_factor` (consistent_hash only, optional, 101–10000): bounded loads, as HAProxy's
    /// `hash-balance-factor`: no server takes more than this percentage of the pool's average in-flight
    /// load; a key whose server is over the bound goes on along the ring. Absent: no bound.
    pub hash_balance_factor: Option<u32>,
    /// `hash_fallback` (hash algorithms only, default `round_robin`): the algorithm for requests that lack
    /// the hash key (no such header or cookie). Any algorithm that needs no key.
    pub hash_fallback: Algorithm,
    /// `servers` (required, non-empty unless `dns_srv` is set): the entries with an `IP:PORT` address.
    pub servers: Vec<ServerConfig>,
    /// The entries of `servers` whose address is a `HOST:PORT` name: each A/AAAA answer is a server,
    /// re-resolved every `resolve_interval`.
    pub dns_servers: Vec<DnsServerConfig>,
    /// `dns_srv` (optional): an SRV name (`"_http._tcp.app.internal"`); each answer is a server with the
    /// record's port and weight, re-resolved every `resolve_interval`.
    pub dns_srv: Option<String>,
    /// `resolve_interval` (default `"30s"`, at least `"100ms"`): how often DNS names are resolved again.
    pub resolve_interval: Duration,
    /// `deregistration_delay` (default `"30s"`): a server removed through the admin API drains until its
    /// requests in flight finish or this much time has passed, then leaves the pool.
    pub deregistration_delay: Duration,
    /// `saturation_target` (default 50, at least 1): requests in flight per available server that count as
    /// a saturation of 1.0 (`fulcrum_pool_saturation`, `/api/v1/pools`), for autoscalers.
    pub saturation_target: u32,
    /// `max_connections_per_server` (optional, at least 1; HAProxy's `maxconn`): requests in flight per
    /// server; a request that finds every server at its limit waits in the pool's queue.
    pub max_connections_per_server: Option<u32>,
    /// `max_queue` (default 1000): requests that may wait for a server at once; more get 503 at once.
    pub max_queue: usize,
    /// `queue_timeout` (default `"5s"`): how long a request waits in the queue before it gets 503.
    pub queue_timeout: Duration,
    /// `slow_start` (optional): a server that comes up (or is added) ramps its share of traffic up linearly
    /// over this time.
    pub slow_start: Option<Duration>,
    /// `retries` (default 2, at most 10): how many other servers a request is tried on when connecting
    /// fails. A request that may have reached a server is never retried unless it is idempotent.
    pub retries: u32,
    /// `connect_timeout` (default `"3s"`, fulcrum extension): connecting to a server fails after this.
    pub connect_timeout: Duration,
    /// `response_timeout` (default `"30s"`, fulcrum extension): a server must answer with its response
    /// headers within this after the request was sent, else the client gets a 504.
    pub response_timeout: Duration,
    /// `[pools.health_check]` (optional): active health checks. Absent: every server is considered up.
    pub health_check: Option<HealthCheckConfig>,
    /// `[pools.passive]` (optional): passive health checking. Absent: off.
    pub passive: Option<PassiveConfig>,
    /// `[pools.sticky]` (optional): session persistence.
    pub sticky: Option<StickyConfig>,
    /// `[pools.cache]` (optional): an HTTP cache in front of the pool (HTTP listeners).
    pub cache: Option<CacheConfig>,
    /// `http2` (default false): speak HTTP/2 to the servers: h2c (prior knowledge) in plain text, h2
    /// (ALPN) over `tls`. Requests are multiplexed over a few connections per server.
    pub http2: bool,
    /// `tls` (optional): connect to the servers over TLS.
    pub tls: Option<UpstreamTls>,
}

/// `pools.tls = { ca = "ca.pem", sni = "app.internal", verify = true }`: TLS to the servers.
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    /// `tls.ca` (optional): PEM file of the CAs the servers' certificates must chain to; absent: the
    /// system's trusted roots.
    pub ca: Option<PathBuf>,
    /// `tls.sni` (optional): the name sent (SNI) and verified; absent: each server's host.
    pub sni: Option<String>,
    /// `tls.verify` (default true): verify the servers' certificates. `false` accepts any certificate
    /// (encryption without authentication; for tests and closed networks only).
    pub verify: bool,
    /// `tls.cert` + `tls.key` (optional): a client certificate for servers that ask for one.
    pub client_cert: Option<CertFiles>,
    /// The loaded rustls client configuration (see [`TlsConfig::server`]).
    pub client: Option<Arc<rustls::ClientConfig>>,
}

/// `pools.algorithm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// Each server in turn.
    RoundRobin,
    /// Each server in turn, `weight` times as often.
    WeightedRoundRobin,
    /// The server with the fewest active connections (weighted).
    LeastConnections,
    /// The server with the lowest latency EWMA × active requests.
    LeastResponseTime,
    /// Hash of the client address: the same client always gets the same server while the set is stable.
    IpHash,
    /// A consistent-hash ring of `hash_key`: few keys move when servers come and go.
    ConsistentHash,
    /// Google's Maglev table of `hash_key`: even spread, minimal disruption.
    Maglev,
    /// A random server (weighted).
    Random,
    /// Power of two choices: the less loaded of two random servers.
    P2c,
}

impl Algorithm {
    /// Every algorithm, in the order of the documentation.
    pub const ALL: [Algorithm; 9] = [
        Algorithm::RoundRobin,
        Algorithm::WeightedRoundRobin,
        Algorithm::LeastConnections,
        Algorithm::LeastResponseTime,
        Algorithm::IpHash,
        Algorithm::ConsistentHash,
        Algorithm::Maglev,
        Algorithm::Random,
        Algorithm::P2c,
    ];

    /// The name used in the configuration file.
    pub fn as_str(&self) -> &'static str {
        match self {
            Algorithm::RoundRobin => "round_robin",
            Algorithm::WeightedRoundRobin => "weighted_round_robin",
            Algorithm::LeastConnections => "least_connections",
            Algorithm::LeastResponseTime => "least_response_time",
            Algorithm::IpHash => "ip_hash",
            Algorithm::ConsistentHash => "consistent_hash",
            Algorithm::Maglev => "maglev",
            Algorithm::Random => "random",
            Algorithm::P2c => "p2c",
        }
    }

    /// True for the algorithms that pick by hashing a [`HashKey`].
    pub fn uses_hash_key(&self) -> bool {
        matches!(
            self,
            Algorithm::IpHash | Algorithm::ConsistentHash | Algorithm::Maglev
        )
    }
}

/// `pools.hash_key`: what a hash algorithm hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    /// `"source_ip"`: the client's IP address.
    SourceIp,
    /// `"source_ip_port"`: the client's IP address and port (spreads one client's connections).
    SourceIpPort,
    /// `"uri"`: the request's path and query (http only).
    Uri,
    /// `"header:NAME"`: the value of that request header (http only).
    Header(http::HeaderName),
    /// `"cookie:NAME"`: the value of that request cookie (http only).
    Cookie(String),
}

/// One entry of `pools.servers`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// `name` (default: `address` as written; unique in the pool): used in the admin API and metrics.
    pub name: String,
    /// `address` (required): `IP:PORT` (a `HOST:PORT` entry becomes a [`DnsServerConfig`]).
    pub address: SocketAddr,
    /// `weight` (default 1, 1 to 1 000 000): relative share of traffic for weight-aware algorithms.
    pub weight: u32,
}

/// An entry of `pools.servers` whose address is a DNS name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsServerConfig {
    /// `name` (default: the address as written): each server found is named `NAME/IP:PORT`.
    pub name: String,
    /// The host name to resolve.
    pub host: String,
    /// The port of every server found.
    pub port: u16,
    /// `weight` of every server found.
    pub weight: u32,
}

/// `[pools.health_check]`: active health checks of every server of the pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheckConfig {
    /// `kind` (required): `icmp` (ping), `tcp` (connect), `http` (request `path`, expect `expect_status`)
    /// or `grpc` (the standard `grpc.health.v1.Health/Check` over plain-text HTTP/2, expect `SERVING`).
    pub kind: HealthCheckKind,
    /// `path` (http only, default `"/health"`): the path requested. Starts with `/`.
    pub path: String,
    /// `expect_status` (http only, default `"200-399"`): the inclusive range of healthy status codes;
    /// `"200"` means exactly 200.
    pub expect_status: (u16, u16),
    /// `interval` (default `"2s"`): time between two checks of a server.
    pub interval: Duration,
    /// `timeout` (default `"1s"`): a check that takes longer has failed.
    pub timeout: Duration,
    /// `rise` (default 2, at least 1): consecutive successes that mark a down server up.
    pub rise: u32,
    /// `fall` (default 3, at least 1): consecutive failures that mark an up server down.
    pub fall: u32,
    /// `method` (http only, default `"GET"`): the request method of the check.
    pub method: http::Method,
    /// `host` (http only, optional): the `Host` header of the check; default: the server's address.
    pub host: Option<String>,
    /// `expect_body` (http only, optional): the response body must contain this text.
    pub expect_body: Option<String>,
    /// `service` (grpc only, default `""`): the service whose health is asked; `""` is the whole server.
    pub service: String,
    /// `initial_state` (default `"up"`): the state of a server before its first checks complete.
    pub initial_up: bool,
}

/// `[pools.passive]`: passive health checking (outlier detection, as Envoy's): a server that fails
/// requests in a row is ejected for a while, without waiting for the active checks.
#[derive(Debug, Clone)]
pub struct PassiveConfig {
    /// `consecutive_failures` (default 5, at least 1): connect failures, resets, timeouts or 5xx answers in
    /// a row that eject a server.
    pub consecutive_failures: u32,
    /// `base_ejection` (default `"30s"`): an ejection lasts this times the number of times the server has
    /// been ejected (reset once it has stayed healthy for a while).
    pub base_ejection: Duration,
    /// `max_ejected_percent` (default 50, 0 to 100): never eject more than this share of the pool's servers
    /// (but always allow one).
    pub max_ejected_percent: u32,
}

/// `health_check.kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthCheckKind {
    /// L3: an ICMP echo request.
    Icmp,
    /// L4: a TCP connect.
    Tcp,
    /// L7: an HTTP `GET path`, checked against `expect_status`.
    Http,
    /// L7: a gRPC `grpc.health.v1.Health/Check` of `service` (h2c), healthy when `SERVING`.
    Grpc,
}

impl HealthCheckKind {
    /// The name used in the configuration file.
    pub fn as_str(&self) -> &'static str {
        match self {
            HealthCheckKind::Icmp => "icmp",
            HealthCheckKind::Tcp => "tcp",
            HealthCheckKind::Http => "http",
            HealthCheckKind::Grpc => "grpc",
        }
    }
}

/// `[pools.sticky]`: keep a client on the server that holds its session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StickyConfig {
    /// `kind` (required): `cookie`, `app_cookie` or `source_ip`.
    pub kind: StickyKind,
    /// `cookie`: for `kind = "cookie"` the name of the cookie fulcrum inserts (default `"FULCRUM_SRV"`);
    /// for `app_cookie` the application's session cookie to learn (required, e.g. `"JSESSIONID"`);
    /// empty for `source_ip`, where the key is rejected.
    pub cookie: String,
    /// `ttl` (default `"30m"`): how long an unused entry stays in the stick table (`app_cookie`,
    /// `source_ip`).
    pub ttl: Duration,
    /// `max_age` (`cookie` only, optional): `Max-Age` of fulcrum's cookie; absent: a session cookie.
    pub max_age: Option<Duration>,
    /// `secret` (`cookie` only, optional, at least 16 characters): the key of the cookie's MAC. Every
    /// fulcrum instance that shares stickiness must have the same. Absent: a random key per process (a
    /// restart or another instance does not recognise the cookies, and clients are re-balanced).
    pub secret: Option<String>,
    /// `load_bound` (optional, 1.0–100.0), kept in hundredths: a new client (one without a valid entry)
    /// is not placed on a server whose requests in flight would pass `load_bound` × the pool's mean
    /// (bounded-load placement); the next candidate takes it. Clients already stuck keep their server.
    pub load_bound_pct: Option<u32>,
}

/// `sticky.kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StickyKind {
    /// fulcrum inserts a cookie naming the server.
    Cookie,
    /// fulcrum learns the application's own session cookie and maps its value to the server.
    AppCookie,
    /// The client IP address is mapped to the server.
    SourceIp,
}

impl StickyKind {
    /// The name used in the configuration file.
    pub fn as_str(&self) -> &'static str {
        match self {
            StickyKind::Cookie => "cookie",
            StickyKind::AppCookie => "app_cookie",
            StickyKind::SourceIp => "source_ip",
        }
    }
}

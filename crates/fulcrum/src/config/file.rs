//! The configuration file as written: serde types that mirror the TOML one to one.
//!
//! Nothing here is checked beyond what serde checks (key names, value types, enum names); every optional
//! key is an `Option` so that [`validate`](super::validate) can tell "absent" from "set to the default"
//! and name the key in its errors. Integers are `i64` so that a negative or oversized value gets a range
//! message from validation rather than a serde type error.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use super::{Algorithm, HealthCheckKind, Protocol, ProxyProtocol, StickyKind};

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    pub shutdown_timeout: Option<RawDuration>,
    pub admin: Option<RawAdmin>,
    pub store: Option<RawStore>,
    pub dns: Option<RawDns>,
    pub access_log: Option<RawAccessLog>,
    pub ha: Option<RawHa>,
    /// Defaulted so that "no listeners" gets the same message as `listeners = []`.
    #[serde(default)]
    pub listeners: Vec<RawListener>,
    #[serde(default)]
    pub pools: Vec<RawPool>,
}

/// `[ha]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHa {
    pub interface: String,
    pub virtual_ip: String,
    pub router_id: i64,
    pub priority: Option<i64>,
    pub advert_interval: Option<RawDuration>,
    pub preempt: Option<bool>,
    pub fault_when: Option<RawFaultWhen>,
}

/// `ha.fault_when`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum RawFaultWhen {
    EveryPoolDown,
    AnyPoolDown,
    Never,
}

/// `[access_log]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAccessLog {
    pub format: Option<RawLogFormat>,
    pub path: Option<String>,
    pub sample: Option<f64>,
    pub status: Option<Vec<RawLogStatus>>,
    pub buffer: Option<i64>,
}

/// `access_log.format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum RawLogFormat {
    Json,
    Combined,
}

/// An entry of `access_log.status`: `404` or `"5xx"` / `"404"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(crate) enum RawLogStatus {
    Code(i64),
    Text(String),
}

/// `[dns]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDns {
    #[serde(default)]
    pub nameservers: Vec<String>,
}

/// `[admin]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAdmin {
    pub bind: String,
    pub token: Option<String>,
}

/// `[store]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawStore {
    pub kind: Option<RawStoreKind>,
    pub url: Option<String>,
    pub sentinel: Option<RawSentinel>,
    pub nodes: Option<Vec<String>>,
    pub key_prefix: Option<String>,
}

/// `store.kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum RawStoreKind {
    Memory,
    Redis,
    RedisCluster,
}

/// `store.sentinel`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSentinel {
    pub master: String,
    pub nodes: Vec<String>,
}

/// `[[listeners]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawListener {
    pub name: String,
    pub bind: String,
    pub protocol: Protocol,
    pub pool: String,
    #[serde(default)]
    pub routes: Vec<RawRoute>,
    pub proxy_protocol: Option<ProxyProtocol>,
    pub tls: Option<RawTls>,
    pub request_header_timeout: Option<RawDuration>,
    pub idle_timeout: Option<RawDuration>,
    pub max_connections: Option<i64>,
    pub max_connections_per_ip: Option<i64>,
    pub body_timeout: Option<RawDuration>,
    pub write_timeout: Option<RawDuration>,
    pub tunnel_timeout: Option<RawDuration>,
    pub max_header_size: Option<RawSize>,
    pub max_headers: Option<i64>,
    pub h2_max_concurrent_streams: Option<i64>,
    pub max_body_size: Option<RawSize>,
    pub allow: Option<Vec<String>>,
    pub deny: Option<Vec<String>>,
    pub rate_limit: Option<RawRateLimit>,
    pub block: Option<Vec<String>>,
    pub block_rules: Option<Vec<RawBlockRule>>,
    pub auto_ban: Option<RawAutoBan>,
    pub https_redirect: Option<RawRedirect>,
    pub accept_proxy_protocol: Option<Vec<String>>,
    pub hello_timeout: Option<RawDuration>,
    pub max_flows: Option<i64>,
    pub splice: Option<bool>,
    pub explain: Option<bool>,
}

/// `listeners.https_redirect`: `true` (port 443) or a port.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum RawRedirect {
    On(bool),
    Port(i64),
}

/// `listeners.tls`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTls {
    pub cert: Option<String>,
    pub key: Option<String>,
    pub certs: Option<Vec<RawCert>>,
    pub client_ca: Option<String>,
    pub client_auth: Option<crate::config::ClientAuth>,
    pub handshake_timeout: Option<RawDuration>,
    pub min_version: Option<String>,
    pub hsts: Option<RawDuration>,
    pub resumption: Option<bool>,
}

/// `listeners.tls.certs[]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCert {
    pub cert: String,
    pub key: String,
}

/// `[[listeners.routes]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRoute {
    pub path_prefix: Option<String>,
    pub path_regex: Option<String>,
    pub host: Option<String>,
    pub method: Option<String>,
    pub headers: Option<BTreeMap<String, String>>,
    pub cookie: Option<RawCookieMatch>,
    pub query: Option<BTreeMap<String, String>>,
    pub sni: Option<String>,
    pub pool: String,
    pub max_body_size: Option<RawSize>,
    pub cache: Option<RawRouteCache>,
    pub allow: Option<Vec<String>>,
    pub deny: Option<Vec<String>>,
    pub rate_limit: Option<RawRateLimit>,
    pub block: Option<Vec<String>>,
    pub block_rules: Option<Vec<RawBlockRule>>,
}

/// `routes.cookie`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCookieMatch {
    pub name: String,
    pub value: String,
}

/// `[[pools]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPool {
    pub name: String,
    pub algorithm: Option<Algorithm>,
    pub hash_key: Option<String>,
    pub hash_balance_factor: Option<i64>,
    pub hash_fallback: Option<Algorithm>,
    /// Defaulted so that a missing `servers` gets the same message as `servers = []`.
    #[serde(default)]
    pub servers: Vec<RawServer>,
    pub slow_start: Option<RawDuration>,
    pub retries: Option<i64>,
    pub connect_timeout: Option<RawDuration>,
    pub response_timeout: Option<RawDuration>,
    pub health_check: Option<RawHealthCheck>,
    pub passive: Option<RawPassive>,
    pub sticky: Option<RawSticky>,
    pub dns_srv: Option<String>,
    pub resolve_interval: Option<RawDuration>,
    pub deregistration_delay: Option<RawDuration>,
    pub saturation_target: Option<i64>,
    pub max_connections_per_server: Option<i64>,
    pub max_queue: Option<i64>,
    pub queue_timeout: Option<RawDuration>,
    pub http2: Option<bool>,
    pub tls: Option<RawUpstreamTls>,
    pub cache: Option<RawCache>,
}

/// `[pools.cache]` and `[listeners.routes.cache]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCache {
    pub max_size: Option<RawSize>,
    pub max_object_size: Option<RawSize>,
    pub x_cache: Option<bool>,
    pub store_set_cookie: Option<bool>,
    pub default_ttl: Option<RawDuration>,
    pub coalesce_timeout: Option<RawDuration>,
    pub stale_if_error: Option<RawDuration>,
    pub key: Option<RawCacheKey>,
}

/// `cache.key`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCacheKey {
    pub query: Option<String>,
    pub headers: Option<Vec<String>>,
}

/// A route's `cache`: `false` (no cache on this route) or a table of its own.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum RawRouteCache {
    Enabled(bool),
    Table(RawCache),
}

/// `pools.tls`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawUpstreamTls {
    pub ca: Option<String>,
    pub sni: Option<String>,
    pub verify: Option<bool>,
    pub cert: Option<String>,
    pub key: Option<String>,
}

/// One entry of `pools.servers`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawServer {
    pub name: Option<String>,
    pub address: String,
    pub weight: Option<i64>,
}

/// `[pools.health_check]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHealthCheck {
    pub kind: HealthCheckKind,
    pub path: Option<String>,
    pub expect_status: Option<RawStatus>,
    pub interval: Option<RawDuration>,
    pub timeout: Option<RawDuration>,
    pub rise: Option<i64>,
    pub fall: Option<i64>,
    pub method: Option<String>,
    pub host: Option<String>,
    pub expect_body: Option<String>,
    pub service: Option<String>,
    pub initial_state: Option<RawInitialState>,
}

/// `health_check.initial_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum RawInitialState {
    Up,
    Down,
}

/// `[pools.passive]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPassive {
    pub consecutive_failures: Option<i64>,
    pub base_ejection: Option<RawDuration>,
    pub max_ejected_percent: Option<i64>,
}

/// `[pools.sticky]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSticky {
    pub kind: StickyKind,
    pub cookie: Option<String>,
    pub ttl: Option<RawDuration>,
    pub max_age: Option<RawDuration>,
    pub secret: Option<String>,
    pub load_bound: Option<f64>,
}

/// `rate_limit = { rate, per, burst, key }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRateLimit {
    pub rate: i64,
    pub per: Option<RawDuration>,
    pub burst: Option<i64>,
    pub key: Option<String>,
    pub shared: Option<bool>,
}

/// `[[listeners.block_rules]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBlockRule {
    pub name: String,
    pub target: Option<String>,
    pub regex: Option<String>,
    pub contains: Option<String>,
}

/// `auto_ban = { window, max_requests, max_errors, ban }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAutoBan {
    pub window: Option<RawDuration>,
    pub max_requests: Option<i64>,
    pub max_errors: Option<i64>,
    pub ban: Option<RawDuration>,
}

/// A size as written: an integer of bytes or a string with a unit (`"64KiB"`, `"10MB"`, `"1GiB"`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub(crate) enum RawSize {
    Bytes(i64),
    Text(String),
}

/// A duration as written (`"500ms"`, `"2s"`, `"1m"`); parsed by validation so that a bad one is reported
/// with its key. Only strings are accepted, so that `interval = 2` is not silently read as two somethings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RawDuration(pub String);

impl<'de> Deserialize<'de> for RawDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = RawDuration;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration string such as \"500ms\", \"2s\" or \"1m\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawDuration, E> {
                Ok(RawDuration(v.to_owned()))
            }
        }
        deserializer.deserialize_str(V)
    }
}

/// `health_check.expect_status` as written: `"200-399"`, `"200"` or `200`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RawStatus(pub String);

impl<'de> Deserialize<'de> for RawStatus {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = RawStatus;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a status code or range such as \"200\" or \"200-399\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawStatus, E> {
                Ok(RawStatus(v.to_owned()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawStatus, E> {
                Ok(RawStatus(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawStatus, E> {
                Ok(RawStatus(v.to_string()))
            }
        }
        deserializer.deserialize_any(V)
    }
}

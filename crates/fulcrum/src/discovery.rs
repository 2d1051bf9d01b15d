//! DNS service discovery: turns a configured server entry into the set of servers DNS currently
//! returns for it.
//!
//! Two kinds of entries are supported ([`DnsTarget`]):
//!
//! * **Host** (`address = "app.internal:8080"`): every A and AAAA answer for the host becomes a
//!   server on the configured port, with the configured weight.
//! * **SRV** (`dns_srv = "_http._tcp.app.internal"`): the SRV records of the lowest priority value
//!   are used (RFC 2782); each record's target is resolved to its A/AAAA answers, and each address
//!   becomes a server with the record's port and weight (weight 0 counts as 1). Targets that do not
//!   exist (NXDOMAIN / no address records) are skipped with a warning; a target whose lookup fails
//!   for any other reason (timeout, SERVFAIL, ...) fails the whole resolution.
//!
//! [`Resolver::resolve`] queries DNS every time it is called: the resolver's response cache is
//! disabled, so the caller decides when to re-resolve (e.g. on an interval, or after the TTL
//! reported by [`Resolver::resolve_with_ttl`]). Answers are sorted by name, so two resolutions of
//! an unchanged DNS state compare equal.
//!
//! # Errors
//!
//! Every failure is a short human-readable string that names the DNS name concerned, e.g.
//! `"app.internal: no records"` or `"_http._tcp.app.internal: timed out"`. An NXDOMAIN or empty
//! answer is an error too, never an empty server list: **on error the caller keeps the server set
//! from the previous successful resolution**, so a DNS outage or a transient misconfiguration never
//! empties a pool. (Removing every server therefore requires removing the config entry.)
//!
//! Queries use a short per-query timeout ([`QUERY_TIMEOUT`], one retry) and a whole resolution is
//! bounded by [`RESOLVE_DEADLINE`].

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use hickory_resolver::config::{
    ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::TokioResolver;
use tokio::task::JoinSet;

/// Timeout of one DNS query (one attempt against one name server).
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

/// Upper bound on one whole [`Resolver::resolve`] call, including SRV target lookups.
pub const RESOLVE_DEADLINE: Duration = Duration::from_secs(10);

/// What one configured server entry asks DNS for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsTarget {
    /// `address = "app.internal:8080"`: every A/AAAA answer for `host` is a server on `port`.
    Host {
        /// The DNS name to resolve (an IP literal resolves to itself).
        host: String,
        /// The port every discovered server listens on.
        port: u16,
        /// The weight every discovered server gets.
        weight: u32,
        /// Prefix of the discovered servers' names (`"{base_name}/{ip}:{port}"`).
        base_name: String,
    },
    /// `dns_srv = "_http._tcp.app.internal"`: every SRV answer (target resolved to its A/AAAA
    /// answers) is a server with the record's port and weight (weight 0 -> 1). Only the records of
    /// the lowest priority value are used (RFC 2782).
    Srv {
        /// The SRV name to query; also the prefix of the discovered servers' names.
        name: String,
    },
}

impl DnsTarget {
    /// The DNS name this target queries (used in error messages).
    pub fn dns_name(&self) -> &str {
        match self {
            DnsTarget::Host { host, .. } => host,
            DnsTarget::Srv { name } => name,
        }
    }
}

/// One server DNS produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovered {
    /// `"{base_name}/{ip}:{port}"` for a Host target, `"{srv name}/{ip}:{port}"` for an SRV
    /// target; IPv6 addresses are written in brackets (`"app/[2001:db8::1]:80"`).
    pub name: String,
    /// Where the server listens.
    pub address: SocketAddr,
    /// The server's weight (never 0 for SRV answers).
    pub weight: u32,
}

/// A DNS resolver: the system's (`/etc/resolv.conf`, plus the hosts file) when `nameservers` is
/// empty, else exactly those servers (UDP, with TCP for truncated answers; no hosts file).
///
/// Cloning is cheap and clones share connections.
#[derive(Debug, Clone)]
pub struct Resolver {
    inner: TokioResolver,
}

impl Resolver {
    /// Builds a resolver. Does not need a Tokio runtime; [`Resolver::resolve`] does.
    ///
    /// Fails when `nameservers` is empty and the system configuration cannot be read.
    pub fn new(nameservers: &[SocketAddr]) -> Result<Self, String> {
        let mut builder = if nameservers.is_empty() {
            TokioResolver::builder_tokio()
                .map_err(|e| format!("cannot read the system DNS configuration: {e}"))?
        } else {
            let servers = nameservers
                .iter()
                .map(|addr| {
                    let connections = [ConnectionConfig::udp(), ConnectionConfig::tcp()]
                        .into_iter()
                        .map(|mut connection| {
                            connection.port = addr.port();
                            connection
                        })
                        .collect();
                    NameServerConfig::new(addr.ip(), true, connections)
                })
                .collect();
            let mut builder = TokioResolver::builder_with_config(
                ResolverConfig::from_parts(None, Vec::new(), servers),
                TokioRuntimeProvider::default(),
            );
            builder.options_mut().use_hosts_file = ResolveHosts::Never;
            builder
        };
        let options = builder.options_mut();
        // Every resolution goes to the wire: the caller owns the refresh schedule, and a cache
        // would hide changes until the TTL ran out. A zero capacity disables hickory's cache
        // completely. (Do not clamp `positive_max_ttl` instead: the clamp also rewrites the TTLs
        // of the answers handed back, which `resolve_with_ttl` reports.)
        options.cache_size = 0;
        options.timeout = QUERY_TIMEOUT;
        options.attempts = 1; // hickory counts retries: one retry, two tries in all.
        options.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        let inner = builder
            .build()
            .map_err(|e| format!("cannot build the DNS resolver: {e}"))?;
        Ok(Self { inner })
    }

    /// Resolves one target now, bypassing any cache; answers sorted by name for stable output.
    ///
    /// An NXDOMAIN or empty answer is an error (see the module documentation).
    pub async fn resolve(&self, target: &DnsTarget) -> Result<Vec<Discovered>, String> {
        self.resolve_with_ttl(target)
            .await
            .map(|(servers, _)| servers)
    }

    /// Like [`Resolver::resolve`], and also returns how long the answer may be used: the smallest
    /// TTL of the records it was built from (useful to schedule the next resolution; clamp it).
    pub async fn resolve_with_ttl(
        &self,
        target: &DnsTarget,
    ) -> Result<(Vec<Discovered>, Duration), String> {
        let dns_name = target.dns_name();
        let result = match tokio::time::timeout(RESOLVE_DEADLINE, self.resolve_inner(target)).await
        {
            Ok(result) => result,
            Err(_) => Err(format!("{dns_name}: timed out")),
        };
        match &result {
            Ok((servers, ttl)) => tracing::debug!(
                name = dns_name,
                servers = servers.len(),
                ttl_secs = ttl.as_secs(),
                "DNS resolution"
            ),
            Err(error) => tracing::debug!(name = dns_name, %error, "DNS resolution failed"),
        }
        result
    }

    async fn resolve_inner(
        &self,
        target: &DnsTarget,
    ) -> Result<(Vec<Discovered>, Duration), String> {
        match target {
            DnsTarget::Host {
                host,
                port,
                weight,
                base_name,
            } => {
                let (ips, valid_until) = lookup_ips(&self.inner, host)
                    .await
                    .map_err(|e| describe(host, &e))?;
                let mut servers = Servers::default();
                for ip in ips {
                    servers.add(base_name, SocketAddr::new(ip, *port), *weight);
                }
                servers.finish(host, valid_until)
            }
            DnsTarget::Srv { name } => self.resolve_srv(name).await,
        }
    }

    async fn resolve_srv(&self, name: &str) -> Result<(Vec<Discovered>, Duration), String> {
        let lookup = self
            .inner
            .srv_lookup(name)
            .await
            .map_err(|e| describe(name, &e))?;
        let mut valid_until = lookup.valid_until();
        let records: Vec<_> = lookup
            .answers()
            .iter()
            .filter_map(|record| match &record.data {
                RData::SRV(srv) => Some(srv.clone()),
                _ => None,
            })
            .collect();
        let Some(lowest) = records.iter().map(|srv| srv.priority).min() else {
            return Err(format!("{name}: no records"));
        };

        // Resolve the targets of the lowest priority concurrently; `index` keeps results ordered.
        let mut lookups = JoinSet::new();
        let chosen: Vec<_> = records
            .into_iter()
            .filter(|srv| srv.priority == lowest)
            // RFC 2782: a target of "." means the service is decidedly not available here.
            .filter(|srv| !srv.target.is_root())
            .collect();
        for (index, srv) in chosen.iter().enumerate() {
            let resolver = self.inner.clone();
            let target = srv.target.to_string();
            lookups.spawn(async move { (index, lookup_ips(&resolver, &target).await) });
        }
        let mut resolved = Vec::with_capacity(chosen.len());
        while let Some(joined) = lookups.join_next().await {
            let (index, result) = joined.map_err(|e| format!("{name}: lookup task failed: {e}"))?;
            resolved.push((index, result));
        }
        resolved.sort_by_key(|(index, _)| *index);

        let mut servers = Servers::default();
        for (index, result) in resolved {
            let srv = &chosen[index];
            let target = srv.target.to_string();
            match result {
                Ok((ips, target_valid_until)) => {
                    valid_until = valid_until.min(target_valid_until);
                    let weight = u32::from(srv.weight.max(1));
                    for ip in ips {
                        servers.add(name, SocketAddr::new(ip, srv.port), weight);
                    }
                }
                Err(e) if e.is_no_records_found() => {
                    tracing::warn!(
                        srv = name,
                        target,
                        "SRV target has no address records, skipped"
                    );
                }
                Err(e) => return Err(describe(&format!("{name}: {target}"), &e)),
            }
        }
        if servers.0.is_empty() {
            return Err(format!(
                "{name}: no records (no SRV target has an address record)"
            ));
        }
        servers.finish(name, valid_until)
    }
}

/// All A/AAAA addresses of `host`, and when the answer expires.
async fn lookup_ips(
    resolver: &TokioResolver,
    host: &str,
) -> Result<(Vec<IpAddr>, Instant), NetError> {
    let lookup = resolver.lookup_ip(host).await?;
    Ok((lookup.iter().collect(), lookup.valid_until()))
}

/// Discovered servers keyed (and so sorted and deduplicated) by name.
#[derive(Default)]
struct Servers(BTreeMap<String, Discovered>);

impl Servers {
    /// Adds a server; the same address twice (e.g. two SRV records) sums the weights.
    fn add(&mut self, prefix: &str, address: SocketAddr, weight: u32) {
        let name = format!("{prefix}/{address}");
        self.0
            .entry(name.clone())
            .and_modify(|server| server.weight = server.weight.saturating_add(weight))
            .or_insert(Discovered {
                name,
                address,
                weight,
            });
    }

    /// The sorted servers and their remaining TTL; no server at all is an error.
    fn finish(
        self,
        dns_name: &str,
        valid_until: Instant,
    ) -> Result<(Vec<Discovered>, Duration), String> {
        if self.0.is_empty() {
            return Err(format!("{dns_name}: no records"));
        }
        let ttl = valid_until.saturating_duration_since(Instant::now());
        Ok((self.0.into_values().collect(), ttl))
    }
}

/// A short description of a failed lookup of `name`.
fn describe(name: &str, error: &NetError) -> String {
    match error {
        NetError::Dns(DnsError::NoRecordsFound(no_records)) => {
            if no_records.response_code == ResponseCode::NXDomain {
                format!("{name}: no records (NXDOMAIN)")
            } else {
                format!("{name}: no records")
            }
        }
        NetError::Dns(DnsError::ResponseCode(code)) => format!("{name}: server answered {code}"),
        NetError::Timeout => format!("{name}: timed out"),
        NetError::Io(io) => format!("{name}: {io}"),
        other => format!("{name}: {other}"),
    }
}

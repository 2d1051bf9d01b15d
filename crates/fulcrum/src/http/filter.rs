//! Traffic filtering on the HTTP request path: the configured lists, rules, rate limits and bans of a
//! listener or route ([`crate::filter`] holds the logic), applied in a fixed order:
//!
//! 1. at accept (listener): the access list and the ban table — a refused client's connection is
//!    closed before a byte is read;
//! 2. per request: a ban that started since the connection opened (403), the route's access list
//!    (403), the deny rules of the listener then the route (403, counted per rule), the rate limits of
//!    the listener then the route (429 with `Retry-After`);
//! 3. after the answer: the status is recorded for automatic bans (a scanner collecting 404s, a client
//!    over its request rate is banned for `auto_ban.ban`).

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use http::{HeaderValue, Request, Response, StatusCode};

use super::body::ProxyBody;
use super::proxy::local_with;
use super::route;
use crate::config::{FilterConfig, RateKey, RateLimitConfig, StoreConfig};
use crate::filter::{AccessList, BanPolicy, BanTable, DenyRules, Key, RateLimiter};
use crate::sticky::RedisTable;

/// The filtering of one listener or route, built from its configuration.
#[derive(Debug)]
pub struct Filter {
    /// `allow` / `deny`.
    pub access: AccessList,
    /// `block` presets and `block_rules`.
    pub rules: DenyRules,
    /// `rate_limit`, with its configuration (kept to tell whether a reload changed it).
    pub rate: Option<(RateLimitConfig, Arc<RateLimiter>)>,
    /// With `rate_limit.shared`: the counts in Redis, shared by every instance.
    pub shared: Option<Arc<RedisTable>>,
    /// Requests answered 429.
    pub rate_limited: AtomicU64,
    /// Requests answered 403 by the access list or a ban.
    pub refused: AtomicU64,
}

impl Filter {
    /// The filter of `cfg`; a rate limiter of `keep` is reused when its configuration is unchanged,
    /// so that a reload does not hand every client a fresh bucket.
    pub fn new(
        cfg: &FilterConfig,
        keep: Option<&Filter>,
        store: &StoreConfig,
        scope: &str,
    ) -> Self {
        let rules = DenyRules::new(cfg.rules.clone()).unwrap_or_default();
        let rate = cfg.rate_limit.as_ref().and_then(|r| {
            let kept = keep
                .and_then(|k| k.rate.as_ref())
                .filter(|(old, _)| old == r)
                .map(|(_, l)| l.clone());
            let limiter = match kept {
                Some(l) => l,
                None => Arc::new(RateLimiter::new(r.rate, r.per, r.burst).ok()?),
            };
            Some((r.clone(), limiter))
        });
        let shared = match (&cfg.rate_limit, store) {
            (Some(r), StoreConfig::Redis { target, key_prefix }) if r.shared => {
                let kept = keep.and_then(|k| k.shared.clone()).filter(|_| {
                    keep.and_then(|k| k.rate.as_ref())
                        .is_some_and(|(old, _)| old == r)
                });
                kept.or_else(|| {
                    RedisTable::new(target, format!("{key_prefix}:rate:{scope}"), r.per)
                        .map(Arc::new)
                        .map_err(
                            |e| tracing::error!(scope, error = %e, "shared rate limit: local only"),
                        )
                        .ok()
                })
            }
            _ => None,
        };
        Filter {
            access: cfg.access.clone(),
            rules,
            rate,
            shared,
            rate_limited: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }

    /// True when it filters nothing.
    pub fn is_empty(&self) -> bool {
        self.access.is_open() && self.rules.is_empty() && self.rate.is_none()
    }

    /// The answer that stops `req` here, if any: 403 for a refused address or a matched rule, 429 over
    /// the rate. `check_access` is false at the listener, whose list was checked at accept.
    pub async fn check<B>(
        &self,
        req: &Request<B>,
        ip: IpAddr,
        check_access: bool,
    ) -> Option<Response<ProxyBody>> {
        if check_access && !self.access.permits(ip) {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return Some(local_with(
                StatusCode::FORBIDDEN,
                "403 Forbidden: this address may not use this path\n",
            ));
        }
        if !self.rules.is_empty() {
            if let Some(rule) = self.rules.check(req.uri(), req.headers()) {
                tracing::debug!(client = %ip, rule, path = %req.uri().path(), "request blocked");
                return Some(local_with(
                    StatusCode::FORBIDDEN,
                    "403 Forbidden: the request matches a blocked pattern\n",
                ));
            }
        }
        if let Some((cfg, limiter)) = &self.rate {
            let key = match &cfg.key {
                RateKey::SourceIp => Key::ip(ip),
                RateKey::Path => Key::text(req.uri().path()),
                RateKey::Header(name) => match req.headers().get(name) {
                    Some(v) => Key::bytes(v.as_bytes()),
                    None => Key::ip(ip),
                },
                RateKey::Cookie(name) => match route::cookie(req.headers(), name) {
                    Some(v) => Key::text(v),
                    None => Key::ip(ip),
                },
            };
            let verdict = match &self.shared {
                // Shared: the fleet's count of this window, in Redis; alone while Redis is away.
                Some(redis) => match redis.incr_window(&key.redis_name(), cfg.per).await {
                    Some((n, _)) if n <= u64::from(cfg.rate) => Ok(()),
                    Some((_, left)) => Err(left),
                    None => limiter.check(&key),
                },
                None => limiter.check(&key),
            };
            if let Err(wait) = verdict {
                self.rate_limited.fetch_add(1, Ordering::Relaxed);
                let mut resp = local_with(
                    StatusCode::TOO_MANY_REQUESTS,
                    "429 Too Many Requests: slow down and retry after the time given\n",
                );
                let secs = crate::filter::rate::retry_after_secs(wait);
                if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                    resp.headers_mut().insert(http::header::RETRY_AFTER, v);
                }
                return Some(resp);
            }
        }
        None
    }

    /// Drops what the rate limiter no longer needs (run about once a second).
    pub fn sweep(&self) {
        if let Some((_, l)) = &self.rate {
            l.sweep();
        }
    }
}

/// A listener's filtering: its [`Filter`] and its ban table (automatic and manual bans).
#[derive(Debug)]
pub struct ListenerFilter {
    /// The listener-wide filter.
    pub filter: Filter,
    /// Bans: automatic with `auto_ban`, manual through the admin API always.
    pub bans: Arc<BanTable>,
    /// The `auto_ban` policy the table was built with.
    pub policy: Option<BanPolicy>,
    /// Connections refused at accept by the access list or a ban.
    pub refused_at_accept: AtomicU64,
}

impl ListenerFilter {
    /// The filtering of a listener; the ban table of `keep` is kept when the policy did not change.
    pub fn new(
        cfg: &FilterConfig,
        policy: Option<&BanPolicy>,
        keep: Option<&ListenerFilter>,
        store: &StoreConfig,
        scope: &str,
    ) -> Self {
        let bans = keep
            .filter(|k| k.policy.as_ref() == policy)
            .map(|k| k.bans.clone())
            .unwrap_or_else(|| {
                let p = policy.cloned().unwrap_or_default();
                Arc::new(BanTable::new(p).unwrap_or_else(|_| {
                    BanTable::new(BanPolicy::default()).expect("the default ban policy is valid")
                }))
            });
        ListenerFilter {
            filter: Filter::new(cfg, keep.map(|k| &k.filter), store, scope),
            bans,
            policy: policy.cloned(),
            refused_at_accept: AtomicU64::new(0),
        }
    }

    /// Whether a connection from `ip` may be served at all.
    #[inline]
    pub fn admit(&self, ip: IpAddr) -> bool {
        let ok = self.filter.access.permits(ip) && self.bans.is_banned(ip).is_none();
        if !ok {
            self.refused_at_accept.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    /// After the answer: counts it for automatic bans.
    #[inline]
    pub fn record(&self, ip: IpAddr, status: u16) {
        if self.policy.is_some() {
            if let Some(reason) = self.bans.record(ip, status) {
                tracing::warn!(client = %ip, ?reason, "client banned");
            }
        }
    }

    /// Periodic upkeep.
    pub fn sweep(&self) {
        self.filter.sweep();
        self.bans.sweep();
    }
}

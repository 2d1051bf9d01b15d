//! Session persistence: keep a client on the server that holds its session.
//!
//! Three ways to recognise a client, per pool (`[pools.sticky]`):
//! - `cookie`: fulcrum inserts its own cookie (`FULCRUM_SRV`) naming the server by an opaque value, a
//!   keyed xxh3 hash of the server's name (never its address). Any fulcrum instance with the same
//!   configuration reads it the same way, with no shared state.
//! - `app_cookie`: fulcrum learns the application's own session cookie (`SESSIONID`, `JSESSIONID`)
//!   from `Set-Cookie` in responses and remembers value → server in the stick table.
//! - `source_ip`: the client's address → server, in the stick table.
//!
//! The algorithm picks only for clients without a (valid) entry. A sticky server that is down, removed
//! or in maintenance is replaced by the algorithm's pick and the entry rewritten — never a 5xx, never a
//! loop; a draining server keeps its sticky clients but gets no new ones.

mod redis;
mod table;

use std::net::IpAddr;

use http::header::{HeaderMap, HeaderValue, SET_COOKIE};

pub use self::redis::RedisTable;
pub use table::MemoryTable;

use std::sync::Arc;

use crate::config::{StickyConfig, StickyKind, StoreConfig};
use crate::http::route::cookie;
use crate::pool::{PoolSnapshot, Server, ServerState};

/// Stick-table capacity per pool (entries).
const TABLE_CAPACITY: usize = 1_000_000;

/// What a request brought that identifies its client.
#[derive(Debug, Default)]
pub struct ClientKey {
    /// The value of our cookie or of the application's cookie, or the client address.
    key: Option<String>,
    /// The server the key sticks to, if it is one of the pool's and may take the client.
    pub server: Option<usize>,
}

/// The stickiness of one pool.
#[derive(Debug)]
pub struct Sticky {
    kind: StickyKind,
    cookie: String,
    /// Keys the opaque `cookie` values: derived from the pool's name, so every instance agrees.
    secret: u64,
    table: MemoryTable,
    /// The shared table, with `[store] kind = "redis"`; the local table then caches it and stands in
    /// for it while Redis does not answer.
    shared: Option<Arc<RedisTable>>,
    /// `; Max-Age=N` for our cookie, if configured.
    max_age: String,
}

/// True when `server` may keep a sticky client: up or draining, and healthy.
pub fn can_stick(server: &Server) -> bool {
    matches!(server.state(), ServerState::Up | ServerState::Draining) && server.health.is_healthy()
}

impl Sticky {
    /// The stickiness of pool `pool` as configured.
    pub fn new(pool: &str, cfg: &StickyConfig, store: &StoreConfig) -> Result<Self, String> {
        let shared = match (store, cfg.kind) {
            // The cookie names its server itself: nothing to share.
            (_, StickyKind::Cookie) | (StoreConfig::Memory, _) => None,
            (StoreConfig::Redis { target, key_prefix }, kind) => {
                let prefix = format!("{key_prefix}:stick:{pool}:{}", kind.as_str());
                Some(Arc::new(RedisTable::new(target, prefix, cfg.ttl)?))
            }
        };
        Ok(Sticky {
            kind: cfg.kind,
            cookie: cfg.cookie.clone(),
            secret: crate::balance::hash_key(format!("fulcrum-sticky/{pool}").as_bytes()),
            table: MemoryTable::new(TABLE_CAPACITY, cfg.ttl),
            shared,
            max_age: cfg
                .max_age
                .map(|d| format!("; Max-Age={}", d.as_secs().max(1)))
                .unwrap_or_default(),
        })
    }

    /// The shared (Redis) table, if configured.
    pub fn shared(&self) -> Option<&Arc<RedisTable>> {
        self.shared.as_ref()
    }

    /// The stick table (for `app_cookie` and `source_ip`).
    pub fn table(&self) -> &MemoryTable {
        &self.table
    }

    /// The opaque value of our cookie for `server`.
    pub fn cookie_value(&self, server: &str) -> String {
        format!(
            "{:016x}",
            xxhash_rust::xxh3::xxh3_64_with_seed(server.as_bytes(), self.secret)
        )
    }

    /// Recognises the client of a request and finds its server, if it has one that may take it.
    pub async fn lookup(
        &self,
        headers: &HeaderMap,
        client_ip: IpAddr,
        snapshot: &PoolSnapshot,
    ) -> ClientKey {
        let key = match self.kind {
            StickyKind::Cookie | StickyKind::AppCookie => {
                cookie(headers, &self.cookie).map(str::to_owned)
            }
            StickyKind::SourceIp => Some(client_ip.to_string()),
        };
        let Some(key) = key else {
            return ClientKey::default();
        };
        let server = match self.kind {
            StickyKind::Cookie => snapshot
                .servers
                .iter()
                .position(|s| self.cookie_value(&s.name) == key),
            StickyKind::AppCookie | StickyKind::SourceIp => self
                .entry(&key)
                .await
                .and_then(|name| snapshot.servers.iter().position(|s| s.name == name)),
        };
        let server = server.filter(|&i| can_stick(&snapshot.servers[i]));
        ClientKey {
            key: Some(key),
            server,
        }
    }

    /// The server `key` sticks to: from Redis when it answers (caching it locally), else locally.
    async fn entry(&self, key: &str) -> Option<String> {
        if let Some(shared) = &self.shared {
            if let Some(answer) = shared.get(key).await {
                if let Some(name) = &answer {
                    self.table.set(key, name);
                }
                return answer;
            }
        }
        self.table.get(key)
    }

    /// Records `key` → `server` locally and, in the background, in Redis.
    fn stick(&self, key: &str, server: &str) {
        self.table.set(key, server);
        if let Some(shared) = &self.shared {
            let (shared, key, server) = (shared.clone(), key.to_owned(), server.to_owned());
            tokio::spawn(async move { shared.set(&key, &server).await });
        }
    }

    /// After `server` answered: remember the client there and, for `cookie`, (re)write our cookie.
    /// `stuck_here` says the client's entry already named this server.
    pub fn remember(
        &self,
        client: &ClientKey,
        server: &Server,
        stuck_here: bool,
        response: &mut HeaderMap,
    ) {
        match self.kind {
            StickyKind::Cookie => {
                let value = self.cookie_value(&server.name);
                if client.key.as_deref() != Some(value.as_str()) || !stuck_here {
                    let header = format!(
                        "{}={value}; Path=/; HttpOnly; SameSite=Lax{}",
                        self.cookie, self.max_age
                    );
                    if let Ok(v) = HeaderValue::from_str(&header) {
                        response.append(SET_COOKIE, v);
                    }
                }
            }
            StickyKind::AppCookie => {
                for set in response.get_all(SET_COOKIE) {
                    let Ok(text) = set.to_str() else { continue };
                    let Some((name, rest)) = text.split_once('=') else {
                        continue;
                    };
                    if name.trim() != self.cookie {
                        continue;
                    }
                    let value = rest
                        .split(';')
                        .next()
                        .unwrap_or("")
                        .trim()
                        .trim_matches('"');
                    if !value.is_empty() {
                        self.stick(value, &server.name);
                    }
                }
                // A client whose session moved (its server went away) now belongs here.
                if let (Some(key), false) = (&client.key, stuck_here) {
                    self.stick(key, &server.name);
                }
            }
            StickyKind::SourceIp => {
                if let (Some(key), false) = (&client.key, stuck_here) {
                    self.stick(key, &server.name);
                }
            }
        }
    }
}

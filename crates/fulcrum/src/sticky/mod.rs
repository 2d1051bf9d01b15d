//! Session persistence: keep a client on the server that holds its session.
//!
//! Three ways to recognise a client, per pool (`[pools.sticky]`):
//! - `cookie`: fulcrum inserts its own cookie (`FULCRUM_SRV`) naming the server by an opaque value: an
//!   HMAC-SHA256 of the pool and server name under `secret` (never the address). Nobody without the
//!   secret can make the cookie of a server, nor learn its name or address from it. Every fulcrum
//!   instance with the same secret reads it the same way, with no shared state; without a configured
//!   secret each process draws a random one (and says so in a warning).
//! - `app_cookie`: fulcrum learns the application's own session cookie (`SESSIONID`, `JSESSIONID`)
//!   from `Set-Cookie` in responses and remembers value → server in the stick table. Only values a
//!   server set are stored: a value a client makes up is never written, so unique cookie values cannot
//!   fill the table (which is bounded in bytes anyway, and keys over [`MAX_KEY_LEN`] are ignored).
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

/// Stick-table budget per pool, in bytes (keys, server names, bookkeeping).
const TABLE_BYTES: u64 = 64 << 20;

/// Cookie values (session ids) longer than this are neither looked up nor stored.
pub const MAX_KEY_LEN: usize = 256;

/// Bytes of the HMAC kept in the cookie (128 bits, hex-encoded).
const MAC_BYTES: usize = 16;

/// What a request brought that identifies its client.
#[derive(Debug, Default)]
pub struct ClientKey {
    /// The value of our cookie or of the application's cookie, or the client address.
    key: Option<String>,
    /// The server the key sticks to, if it is one of the pool's and may take the client.
    pub server: Option<usize>,
    /// The key was known (a valid cookie, or a stick-table entry), whether or not its server may take
    /// the client now: only a known key is moved to another server.
    known: bool,
}

impl ClientKey {
    /// The key was known (a valid cookie or a stick-table entry), whether or not its server may take
    /// the client now.
    pub fn known(&self) -> bool {
        self.known
    }
}

/// The stickiness of one pool.
#[derive(Debug)]
pub struct Sticky {
    kind: StickyKind,
    cookie: String,
    /// The pool's name (part of what the cookie MAC covers).
    pool: String,
    /// Keys the cookie MAC.
    key: ring::hmac::Key,
    table: MemoryTable,
    /// The shared table, with `[store] kind = "redis"`; the local table then caches it and stands in
    /// for it while Redis does not answer.
    shared: Option<Arc<RedisTable>>,
    /// `; Max-Age=N` for our cookie, if configured.
    max_age: String,
    /// `load_bound` in hundredths of the mean, if configured.
    load_bound_pct: Option<u32>,
}

/// Lowercase hex of `bytes`.
fn hex_lower(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 15)] as char);
    }
    out
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
        let secret: Vec<u8> = match &cfg.secret {
            Some(s) => s.as_bytes().to_vec(),
            None => {
                use ring::rand::SecureRandom;
                let mut bytes = vec![0u8; 32];
                ring::rand::SystemRandom::new()
                    .fill(&mut bytes)
                    .map_err(|_| "no system randomness for the sticky cookie key".to_string())?;
                if cfg.kind == StickyKind::Cookie {
                    tracing::warn!(pool = %pool, "sticky cookie: no `secret` configured; a random one is used, so other fulcrum instances and the next restart will not recognise this one's cookies");
                }
                bytes
            }
        };
        Ok(Sticky {
            kind: cfg.kind,
            cookie: cfg.cookie.clone(),
            pool: pool.to_owned(),
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret),
            table: MemoryTable::new(TABLE_BYTES, cfg.ttl),
            shared,
            max_age: cfg
                .max_age
                .map(|d| format!("; Max-Age={}", d.as_secs().max(1)))
                .unwrap_or_default(),
            load_bound_pct: cfg.load_bound_pct,
        })
    }

    /// `load_bound` in hundredths of the pool's mean load, if configured.
    pub fn load_bound_pct(&self) -> Option<u32> {
        self.load_bound_pct
    }

    /// How clients are recognised.
    pub fn kind(&self) -> StickyKind {
        self.kind
    }

    /// The shared (Redis) table, if configured.
    pub fn shared(&self) -> Option<&Arc<RedisTable>> {
        self.shared.as_ref()
    }

    /// The stick table (for `app_cookie` and `source_ip`).
    pub fn table(&self) -> &MemoryTable {
        &self.table
    }

    /// The opaque value of our cookie for `server`: the hex of a truncated HMAC-SHA256 of
    /// `pool/server` under the secret.
    pub fn cookie_value(&self, server: &str) -> String {
        let tag = ring::hmac::sign(&self.key, format!("{}/{server}", self.pool).as_bytes());
        hex_lower(&tag.as_ref()[..MAC_BYTES])
    }

    /// The server whose cookie `value` is, among `snapshot`'s (compared in constant time).
    fn cookie_server(&self, value: &str, snapshot: &PoolSnapshot) -> Option<usize> {
        if value.len() != MAC_BYTES * 2 {
            return None;
        }
        use subtle::ConstantTimeEq;
        snapshot.servers.iter().position(|s| {
            bool::from(
                self.cookie_value(&s.name)
                    .as_bytes()
                    .ct_eq(value.as_bytes()),
            )
        })
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
        let Some(key) = key.filter(|k| k.len() <= MAX_KEY_LEN) else {
            return ClientKey::default();
        };
        let (server, known) = match self.kind {
            StickyKind::Cookie => {
                let s = self.cookie_server(&key, snapshot);
                (s, s.is_some())
            }
            StickyKind::AppCookie | StickyKind::SourceIp => match self.entry(&key).await {
                Some(name) => (snapshot.servers.iter().position(|s| s.name == name), true),
                None => (None, false),
            },
        };
        let server = server.filter(|&i| can_stick(&snapshot.servers[i]));
        ClientKey {
            key: Some(key),
            server,
            known,
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
    /// `stuck_here` says the client's entry already named this server; `secure` (the client came over
    /// TLS) marks an inserted cookie `Secure`.
    pub fn remember(
        &self,
        client: &ClientKey,
        server: &Server,
        stuck_here: bool,
        secure: bool,
        response: &mut HeaderMap,
    ) {
        match self.kind {
            StickyKind::Cookie => {
                let value = self.cookie_value(&server.name);
                if client.key.as_deref() != Some(value.as_str()) || !stuck_here {
                    let header = format!(
                        "{}={value}; Path=/; HttpOnly; SameSite=Lax{}{}",
                        self.cookie,
                        self.max_age,
                        if secure { "; Secure" } else { "" }
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
                    if !value.is_empty() && value.len() <= MAX_KEY_LEN {
                        self.stick(value, &server.name);
                    }
                }
                // A known session whose server went away now belongs here; a value the client made
                // up is never stored.
                if let (Some(key), false, true) = (&client.key, stuck_here, client.known) {
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

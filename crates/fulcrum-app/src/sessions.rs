//! Login session storage and the `SESSIONID` cookie.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::str::FromStr;
use std::sync::{Mutex, PoisonError};

use http::header::COOKIE;
use http::HeaderMap;

/// Name of the cookie that carries the session id.
pub(crate) const COOKIE_NAME: &str = "SESSIONID";

/// How many sessions the in-memory store keeps before evicting the oldest.
const MEMORY_CAPACITY: usize = 100_000;

/// Where the app keeps its login sessions.
///
/// Parsed from the `--sessions` flag with [`FromStr`]: `memory` selects
/// [`Sessions::Memory`]. `redis://…` URLs are recognised but rejected until
/// redis support lands.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Sessions {
    /// Sessions live in this process only: each app instance has its own set,
    /// so a login is only visible to the instance that created it.
    #[default]
    Memory,
}

impl fmt::Display for Sessions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Sessions::Memory => f.write_str("memory"),
        }
    }
}

impl FromStr for Sessions {
    type Err = ParseSessionsError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("memory") {
            Ok(Sessions::Memory)
        } else if s.starts_with("redis://") {
            Err(ParseSessionsError(
                "redis sessions are not supported yet; use `memory`".to_owned(),
            ))
        } else {
            Err(ParseSessionsError(format!(
                "invalid session store {s:?}: expected `memory` or a `redis://host:port` URL"
            )))
        }
    }
}

/// Error returned when a `--sessions` value cannot be parsed into [`Sessions`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseSessionsError(String);

impl fmt::Display for ParseSessionsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ParseSessionsError {}

/// The running session store behind [`Sessions`].
#[derive(Debug)]
pub(crate) enum SessionStore {
    Memory(MemoryStore),
}

impl SessionStore {
    pub(crate) fn new(kind: &Sessions) -> Self {
        match kind {
            Sessions::Memory => SessionStore::Memory(MemoryStore::new(MEMORY_CAPACITY)),
        }
    }

    /// Creates a session for `user` and returns its new id.
    pub(crate) fn create(&self, user: String) -> String {
        let id = new_session_id();
        match self {
            SessionStore::Memory(store) => store.insert(id.clone(), user),
        }
        id
    }

    /// The user logged in under session `id`, if any.
    pub(crate) fn get(&self, id: &str) -> Option<String> {
        match self {
            SessionStore::Memory(store) => store.get(id),
        }
    }

    /// Ends session `id`, returning the user it belonged to.
    pub(crate) fn remove(&self, id: &str) -> Option<String> {
        match self {
            SessionStore::Memory(store) => store.remove(id),
        }
    }
}

/// 128 random bits, hex encoded.
fn new_session_id() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

/// A bounded in-process session map that evicts the oldest session when full.
#[derive(Debug)]
pub(crate) struct MemoryStore {
    capacity: usize,
    inner: Mutex<MemoryInner>,
}

#[derive(Debug, Default)]
struct MemoryInner {
    users: HashMap<String, String>,
    /// Session ids in creation order. May hold ids that were already removed;
    /// those are skipped on eviction and purged when the queue grows too long.
    order: VecDeque<String>,
}

impl MemoryStore {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            inner: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn insert(&self, id: String, user: String) {
        let mut inner = self.lock();
        while inner.users.len() >= self.capacity {
            let Some(oldest) = inner.order.pop_front() else {
                break;
            };
            inner.users.remove(&oldest);
        }
        if inner.order.len() >= 2 * self.capacity {
            let MemoryInner { users, order } = &mut *inner;
            order.retain(|id| users.contains_key(id));
        }
        inner.order.push_back(id.clone());
        inner.users.insert(id, user);
    }

    fn get(&self, id: &str) -> Option<String> {
        self.lock().users.get(id).cloned()
    }

    fn remove(&self, id: &str) -> Option<String> {
        self.lock().users.remove(id)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().users.len()
    }
}

/// The value of the `SESSIONID` cookie, looking through every `Cookie` header
/// and every `name=value` pair in it.
pub(crate) fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.split_once('='))
        .find(|(name, _)| name.trim() == COOKIE_NAME)
        .map(|(_, value)| value.trim().trim_matches('"'))
        .filter(|value| !value.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn parses_session_kinds() {
        assert_eq!("memory".parse::<Sessions>(), Ok(Sessions::Memory));
        assert_eq!(" Memory ".parse::<Sessions>(), Ok(Sessions::Memory));
        let redis = "redis://127.0.0.1:6379".parse::<Sessions>().unwrap_err();
        assert!(redis
            .to_string()
            .contains("redis sessions are not supported yet"));
        let other = "postgres://x".parse::<Sessions>().unwrap_err();
        assert!(other.to_string().contains("`memory`"), "{other}");
        assert!(other.to_string().contains("redis://"), "{other}");
        assert_eq!(Sessions::Memory.to_string(), "memory");
    }

    #[test]
    fn session_ids_are_128_bit_hex() {
        let id = new_session_id();
        assert_eq!(id.len(), 32);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(id, new_session_id());
    }

    #[test]
    fn memory_store_evicts_oldest_when_full() {
        let store = MemoryStore::new(2);
        store.insert("a".into(), "alice".into());
        store.insert("b".into(), "bob".into());
        store.insert("c".into(), "carol".into());
        assert_eq!(store.get("a"), None);
        assert_eq!(store.get("b").as_deref(), Some("bob"));
        assert_eq!(store.get("c").as_deref(), Some("carol"));
        assert_eq!(store.remove("b").as_deref(), Some("bob"));
        assert_eq!(store.len(), 1);
        // Login/logout churn must not grow the order queue without bound.
        for i in 0..100 {
            let id = format!("x{i}");
            store.insert(id.clone(), "x".into());
            store.remove(&id);
        }
        assert!(store.lock().order.len() <= 5);
        assert_eq!(store.get("c").as_deref(), Some("carol"));
    }

    #[test]
    fn finds_session_cookie_among_others() {
        let mut headers = HeaderMap::new();
        assert_eq!(session_cookie(&headers), None);
        headers.append(COOKIE, HeaderValue::from_static("theme=dark"));
        headers.append(
            COOKIE,
            HeaderValue::from_static("a=1;  SESSIONID = abc123 ; b=2"),
        );
        assert_eq!(session_cookie(&headers), Some("abc123"));

        let mut headers = HeaderMap::new();
        headers.insert(
            COOKIE,
            HeaderValue::from_static("XSESSIONID=no; SESSIONID="),
        );
        assert_eq!(session_cookie(&headers), None);
    }
}

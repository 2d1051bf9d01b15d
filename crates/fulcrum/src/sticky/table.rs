//! The in-memory stick table: key → server name, with a sliding TTL and a bound on its size.
//!
//! Sharded by key hash so that concurrent workers rarely meet on a lock. Entries expire lazily: a
//! lookup ignores (and drops) an expired entry, and a shard that reaches its share of the capacity
//! sweeps its expired entries, then drops the entries closest to expiry. No timer, no thread per entry.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use crate::balance::hash_key;
use crate::health::now_ms;

const SHARDS: usize = 16;

#[derive(Debug, Clone)]
struct Entry {
    server: String,
    expires_ms: u64,
}

/// A bounded key → server table with a sliding TTL.
#[derive(Debug)]
pub struct MemoryTable {
    shards: Box<[Mutex<HashMap<String, Entry>>]>,
    per_shard: usize,
    ttl: Duration,
}

impl MemoryTable {
    /// A table of at most about `capacity` entries, each living `ttl` after its last use.
    pub fn new(capacity: usize, ttl: Duration) -> Self {
        MemoryTable {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            per_shard: (capacity / SHARDS).max(1),
            ttl,
        }
    }

    fn shard(&self, key: &str) -> &Mutex<HashMap<String, Entry>> {
        &self.shards[(hash_key(key.as_bytes()) as usize) % SHARDS]
    }

    /// The server `key` sticks to, refreshing its TTL; `None` when absent or expired.
    pub fn get(&self, key: &str) -> Option<String> {
        let now = now_ms();
        let mut shard = self.shard(key).lock().unwrap_or_else(|e| e.into_inner());
        match shard.get_mut(key) {
            Some(e) if e.expires_ms > now => {
                e.expires_ms = now + self.ttl.as_millis() as u64;
                Some(e.server.clone())
            }
            Some(_) => {
                shard.remove(key);
                None
            }
            None => None,
        }
    }

    /// Makes `key` stick to `server` for the TTL.
    pub fn set(&self, key: &str, server: &str) {
        let now = now_ms();
        let expires_ms = now + self.ttl.as_millis() as u64;
        let mut shard = self.shard(key).lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = shard.get_mut(key) {
            e.expires_ms = expires_ms;
            if e.server != server {
                e.server = server.to_owned();
            }
            return;
        }
        if shard.len() >= self.per_shard {
            shard.retain(|_, e| e.expires_ms > now);
            while shard.len() >= self.per_shard {
                let Some(oldest) = shard
                    .iter()
                    .min_by_key(|(_, e)| e.expires_ms)
                    .map(|(k, _)| k.clone())
                else {
                    break;
                };
                shard.remove(&oldest);
            }
        }
        shard.insert(
            key.to_owned(),
            Entry {
                server: server.to_owned(),
                expires_ms,
            },
        );
    }

    /// Entries held now (expired ones not yet swept included).
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }

    /// True when the table holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_stick_slide_and_expire() {
        let t = MemoryTable::new(1000, Duration::from_millis(60));
        t.set("k", "A");
        assert_eq!(t.get("k").as_deref(), Some("A"));
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(t.get("k").as_deref(), Some("A"), "a use slides the TTL");
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(t.get("k").as_deref(), Some("A"));
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(t.get("k"), None, "expired");
        t.set("k", "A");
        t.set("k", "B");
        assert_eq!(t.get("k").as_deref(), Some("B"));
    }

    #[test]
    fn the_table_stays_bounded() {
        let t = MemoryTable::new(160, Duration::from_secs(60));
        for i in 0..10_000 {
            t.set(&format!("client-{i}"), "A");
        }
        assert!(t.len() <= 160, "{}", t.len());
        assert_eq!(
            t.get("client-9999").as_deref(),
            Some("A"),
            "the newest entries are kept"
        );
    }
}

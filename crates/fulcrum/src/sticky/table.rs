//! The in-memory stick table: key → server name, with a sliding TTL and a bound in bytes.
//!
//! Built on `quick_cache` (S3-FIFO admission and eviction, sharded, O(1) per operation): a full table
//! evicts in constant time instead of scanning a shard under its lock, and the bound counts the bytes
//! of keys and names, so a flood of large keys cannot grow it past its budget. Entries expire lazily:
//! a lookup ignores (and drops) an expired entry; a use slides the TTL with one atomic store.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use quick_cache::sync::Cache;
use quick_cache::Weighter;

use crate::health::now_ms;

/// Bytes counted per entry beyond its key and server name (the cache's own bookkeeping, roughly).
const ENTRY_OVERHEAD: u64 = 96;

#[derive(Debug)]
struct Entry {
    server: String,
    expires_ms: AtomicU64,
}

#[derive(Debug, Clone)]
struct Bytes;

impl Weighter<String, Arc<Entry>> for Bytes {
    fn weight(&self, key: &String, entry: &Arc<Entry>) -> u64 {
        key.len() as u64 + entry.server.len() as u64 + ENTRY_OVERHEAD
    }
}

/// A key → server table with a sliding TTL, bounded in bytes.
pub struct MemoryTable {
    cache: Cache<String, Arc<Entry>, Bytes>,
    ttl: Duration,
    max_bytes: u64,
}

impl std::fmt::Debug for MemoryTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryTable")
            .field("entries", &self.cache.len())
            .field("bytes", &self.cache.weight())
            .field("max_bytes", &self.max_bytes)
            .finish()
    }
}

impl MemoryTable {
    /// A table of at most about `max_bytes` (keys, names and bookkeeping), each entry living `ttl`
    /// after its last use.
    pub fn new(max_bytes: u64, ttl: Duration) -> Self {
        let max_bytes = max_bytes.max(4 * 1024);
        let items = (max_bytes / (ENTRY_OVERHEAD + 32)).max(16) as usize;
        MemoryTable {
            cache: Cache::with_weighter(items, max_bytes, Bytes),
            ttl,
            max_bytes,
        }
    }

    /// The server `key` sticks to, refreshing its TTL; `None` when absent or expired.
    pub fn get(&self, key: &str) -> Option<String> {
        let now = now_ms();
        let entry = self.cache.get(key)?;
        if entry.expires_ms.load(Ordering::Relaxed) <= now {
            self.cache.remove(key);
            return None;
        }
        entry
            .expires_ms
            .store(now + self.ttl.as_millis() as u64, Ordering::Relaxed);
        Some(entry.server.clone())
    }

    /// Makes `key` stick to `server` for the TTL.
    pub fn set(&self, key: &str, server: &str) {
        let expires_ms = now_ms() + self.ttl.as_millis() as u64;
        if let Some(e) = self.cache.get(key) {
            if e.server == server {
                e.expires_ms.store(expires_ms, Ordering::Relaxed);
                return;
            }
        }
        self.cache.insert(
            key.to_owned(),
            Arc::new(Entry {
                server: server.to_owned(),
                expires_ms: AtomicU64::new(expires_ms),
            }),
        );
    }

    /// Entries held now (expired ones not yet dropped included).
    pub fn len(&self) -> usize {
        self.cache.len()
    }

    /// Bytes held now, as counted against the bound.
    pub fn bytes(&self) -> u64 {
        self.cache.weight()
    }

    /// True when the table holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn entries_stick_slide_and_expire() {
        let t = MemoryTable::new(1 << 20, Duration::from_secs(60));
        t.set("k", "A");
        assert_eq!(t.get("k").as_deref(), Some("A"));
        tokio::time::advance(Duration::from_secs(40)).await;
        assert_eq!(t.get("k").as_deref(), Some("A"), "a use slides the TTL");
        tokio::time::advance(Duration::from_secs(40)).await;
        assert_eq!(t.get("k").as_deref(), Some("A"));
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(t.get("k"), None, "expired");
        t.set("k", "A");
        t.set("k", "B");
        assert_eq!(t.get("k").as_deref(), Some("B"));
    }

    #[test]
    fn the_table_stays_bounded_in_bytes_whatever_the_keys() {
        let max = 256 * 1024;
        let t = MemoryTable::new(max, Duration::from_secs(60));
        for i in 0..10_000 {
            t.set(&format!("client-{i}"), "A");
        }
        assert!(t.bytes() <= max, "{} bytes", t.bytes());
        // Keys of 60 KB each: the bound holds, in bytes.
        let big = "x".repeat(60_000);
        for i in 0..200 {
            t.set(&format!("{big}{i}"), "A");
        }
        assert!(t.bytes() <= max, "{} bytes", t.bytes());
        t.set("client-new", "B");
        assert_eq!(
            t.get("client-new").as_deref(),
            Some("B"),
            "a fresh entry is kept"
        );
    }
}

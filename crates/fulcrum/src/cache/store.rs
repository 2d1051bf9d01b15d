//! The store: key → stored response, bounded in bytes.
//!
//! Built on `quick_cache` (S3-FIFO: new keys enter a small probationary queue and are admitted to
//! the main one only when asked for again, with ghost entries remembering recent evictions), so a
//! stream of one-off keys cannot flush the hot entries. Every entry weighs its key, headers and body;
//! the store's weight stays under `max_size`. Entries have no TTL of their own: freshness is decided
//! on each lookup from the response's cache policy, and an expired entry stays available for
//! revalidation and stale serving until it is evicted, replaced or purged.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, StatusCode};
use http_cache_semantics::CachePolicy;
use quick_cache::sync::Cache;
use quick_cache::{DefaultHashBuilder, Lifecycle, Weighter};

/// Bytes counted per entry beyond its key, headers and body (bookkeeping, the policy's copies).
const ENTRY_OVERHEAD: u64 = 512;

/// A stored response.
#[derive(Debug)]
pub struct Object {
    /// Its status.
    pub status: StatusCode,
    /// Its headers as sent to clients.
    pub headers: HeaderMap,
    /// Its whole body.
    pub body: Bytes,
    /// The RFC 9111 rules for reusing it.
    pub policy: CachePolicy,
    /// The request path it answers (for purges).
    pub path: String,
    /// When it turns stale.
    pub fresh_until: SystemTime,
}

impl Object {
    fn weight(&self) -> u64 {
        let headers: usize = self
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len())
            .sum();
        // The policy keeps a copy of the request's and the response's headers.
        (headers * 2 + self.body.len() + self.path.len()) as u64 + ENTRY_OVERHEAD
    }
}

/// What a key holds: a response, or (for a response with `Vary`) the list of request headers whose
/// values select its variants.
#[derive(Debug, Clone)]
pub enum Slot {
    /// The headers named by `Vary`.
    Vary(Arc<Vec<HeaderName>>, Arc<str>),
    /// A response.
    Object(Arc<Object>),
}

impl Slot {
    /// The request path the slot belongs to.
    pub fn path(&self) -> &str {
        match self {
            Slot::Vary(_, path) => path,
            Slot::Object(o) => &o.path,
        }
    }
}

#[derive(Debug, Clone)]
struct Weight;

impl Weighter<String, Slot> for Weight {
    fn weight(&self, key: &String, slot: &Slot) -> u64 {
        key.len() as u64
            + match slot {
                Slot::Vary(names, path) => {
                    names.iter().map(|n| n.as_str().len() as u64).sum::<u64>()
                        + path.len() as u64
                        + 64
                }
                Slot::Object(o) => o.weight(),
            }
    }
}

/// Counts the entries pushed out to make room.
#[derive(Debug, Clone)]
struct Evictions(Arc<AtomicU64>);

impl Lifecycle<String, Slot> for Evictions {
    type RequestState = ();

    fn on_evict(&self, _: &mut (), _: String, _: Slot) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// The bounded map of a cache.
pub struct Store {
    map: Cache<String, Slot, Weight, DefaultHashBuilder, Evictions>,
    evictions: Arc<AtomicU64>,
    max_object_size: u64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("entries", &self.map.len())
            .field("bytes", &self.map.weight())
            .finish()
    }
}

impl Store {
    /// A store of at most `max_size` bytes, for objects of at most `max_object_size`.
    pub fn new(max_size: u64, max_object_size: u64) -> Self {
        let evictions = Arc::new(AtomicU64::new(0));
        let items = (max_size / 8192).clamp(64, 1 << 20) as usize;
        Store {
            map: Cache::with(
                items,
                max_size,
                Weight,
                DefaultHashBuilder::default(),
                Evictions(evictions.clone()),
            ),
            evictions,
            max_object_size,
        }
    }

    /// The slot at `key`.
    pub fn get(&self, key: &str) -> Option<Slot> {
        self.map.get(key)
    }

    /// Stores `slot` at `key` (replacing what was there).
    pub fn insert(&self, key: String, slot: Slot) {
        if let Slot::Object(o) = &slot {
            if o.body.len() as u64 > self.max_object_size {
                return;
            }
        }
        self.map.insert(key, slot);
    }

    /// Removes `key`; true when it held a response.
    pub fn remove(&self, key: &str) -> bool {
        matches!(self.map.remove(key), Some((_, Slot::Object(_))))
    }

    /// Removes every slot whose path `matches`; returns how many responses went.
    pub fn remove_where(&self, matches: impl Fn(&str) -> bool) -> usize {
        let keys: Vec<String> = self
            .map
            .iter()
            .filter(|(_, slot)| matches(slot.path()))
            .map(|(k, _)| k)
            .collect();
        keys.iter().filter(|k| self.remove(k)).count()
    }

    /// The bytes held.
    pub fn bytes(&self) -> u64 {
        self.map.weight()
    }

    /// The entries held (responses and `Vary` lists).
    pub fn entries(&self) -> usize {
        self.map.len()
    }

    /// Entries evicted so far.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }
}

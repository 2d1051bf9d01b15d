//! The shared stick table in Redis (single node, through Sentinel, or a Redis Cluster).
//!
//! Redis is the source of truth when it answers: a lookup is one `GETEX key EX ttl` (get and slide the
//! TTL in one round trip), a new entry one `SET key server EX ttl`. Every instance pointed at the same
//! Redis and `key_prefix` therefore shares the table, and a client may land on any of them.
//!
//! Redis slow or down never becomes a client error: each command is bounded (100 ms); a failure drops
//! the connection, counts the error, and opens a one-second breaker during which the local table alone
//! answers; the next attempt reconnects — through Sentinel that means asking the sentinels for the
//! current master, which is how a failover is followed. On a Redis Cluster the client keeps the slot map,
//! follows `MOVED`/`ASK` redirections and learns a failover's new master from the cluster itself; every
//! command touches one key (the rate limit's `INCR` and `PEXPIRE` the same key), so no hash tags are needed
//! and entries spread over every master.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelServerType};
use redis::{Cmd, Pipeline};

use crate::config::RedisTarget;
use crate::health::now_ms;

/// Bound on one Redis command (connecting included).
const COMMAND_TIMEOUT: Duration = Duration::from_millis(100);
/// After a failure, Redis is left alone this long.
const BREAKER_MS: u64 = 1000;

enum Source {
    Node(redis::Client),
    Sentinel(tokio::sync::Mutex<SentinelClient>),
    Cluster(ClusterClient),
}

/// A connection to one node (directly or found through Sentinel) or to a whole cluster.
#[derive(Clone)]
enum Conn {
    Node(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl Conn {
    async fn query<T: redis::FromRedisValue>(self, cmd: &Cmd) -> redis::RedisResult<T> {
        match self {
            Conn::Node(mut c) => cmd.query_async(&mut c).await,
            Conn::Cluster(mut c) => cmd.query_async(&mut c).await,
        }
    }

    async fn query_pipeline<T: redis::FromRedisValue>(
        self,
        pipe: &Pipeline,
    ) -> redis::RedisResult<T> {
        match self {
            Conn::Node(mut c) => pipe.query_async(&mut c).await,
            Conn::Cluster(mut c) => pipe.query_async(&mut c).await,
        }
    }
}

/// A Redis-backed stick table.
pub struct RedisTable {
    source: Source,
    conn: tokio::sync::Mutex<Option<Conn>>,
    prefix: String,
    ttl_secs: u64,
    down_until_ms: AtomicU64,
    errors: AtomicU64,
}

impl std::fmt::Debug for RedisTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTable")
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl RedisTable {
    /// A table under `prefix` whose entries live `ttl` after their last use. Connects lazily.
    pub fn new(target: &RedisTarget, prefix: String, ttl: Duration) -> Result<Self, String> {
        let source = match target {
            RedisTarget::Url(url) => Source::Node(
                redis::Client::open(url.as_str()).map_err(|e| format!("redis url: {e}"))?,
            ),
            RedisTarget::Sentinel { master, nodes } => {
                let urls: Vec<String> = nodes
                    .iter()
                    .map(|n| {
                        if n.contains("://") {
                            n.clone()
                        } else {
                            format!("redis://{n}")
                        }
                    })
                    .collect();
                let client =
                    SentinelClient::build(urls, master.clone(), None, SentinelServerType::Master)
                        .map_err(|e| format!("redis sentinel: {e}"))?;
                Source::Sentinel(tokio::sync::Mutex::new(client))
            }
            RedisTarget::Cluster { nodes } => {
                let urls = nodes.iter().map(|n| {
                    if n.contains("://") {
                        n.clone()
                    } else {
                        format!("redis://{n}")
                    }
                });
                // Slot moves and failovers are retried inside the client, but never for longer than
                // one command's bound: past it the breaker answers from the local table.
                let client = ClusterClient::builder(urls)
                    .connection_timeout(COMMAND_TIMEOUT)
                    .response_timeout(COMMAND_TIMEOUT)
                    .retries(2)
                    .min_retry_wait(10)
                    .max_retry_wait(50)
                    .build()
                    .map_err(|e| format!("redis cluster: {e}"))?;
                Source::Cluster(client)
            }
        };
        Ok(RedisTable {
            source,
            conn: tokio::sync::Mutex::new(None),
            prefix,
            ttl_secs: ttl.as_secs().max(1),
            down_until_ms: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        })
    }

    /// Redis errors so far (timeouts, refused connections, failovers in progress).
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    fn key(&self, key: &str) -> String {
        format!("{}:{key}", self.prefix)
    }

    async fn connection(&self) -> Result<Conn, String> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let conn = match &self.source {
            Source::Node(client) => Conn::Node(
                client
                    .get_multiplexed_async_connection()
                    .await
                    .map_err(|e| e.to_string())?,
            ),
            Source::Sentinel(client) => Conn::Node(
                client
                    .lock()
                    .await
                    .get_async_connection()
                    .await
                    .map_err(|e| e.to_string())?,
            ),
            Source::Cluster(client) => Conn::Cluster(
                client
                    .get_async_connection()
                    .await
                    .map_err(|e| e.to_string())?,
            ),
        };
        *slot = Some(conn.clone());
        Ok(conn)
    }

    async fn run<T: redis::FromRedisValue>(&self, cmd: redis::Cmd) -> Option<T> {
        self.bounded(|conn| async move { conn.query::<T>(&cmd).await.map_err(|e| e.to_string()) })
            .await
    }

    /// Runs `query` on a connection within the command bound, behind the breaker.
    async fn bounded<T, F, Fut>(&self, query: F) -> Option<T>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: std::future::Future<Output = Result<T, String>>,
    {
        if now_ms() < self.down_until_ms.load(Ordering::Relaxed) {
            return None;
        }
        let attempt = async { query(self.connection().await?).await };
        match tokio::time::timeout(COMMAND_TIMEOUT, attempt).await {
            Ok(Ok(v)) => Some(v),
            Ok(Err(e)) => {
                self.fail(&e).await;
                None
            }
            Err(_) => {
                self.fail("timed out").await;
                None
            }
        }
    }

    async fn fail(&self, why: &str) {
        *self.conn.lock().await = None;
        self.down_until_ms
            .store(now_ms() + BREAKER_MS, Ordering::Relaxed);
        let n = self.errors.fetch_add(1, Ordering::Relaxed) + 1;
        // One line per breaker period is enough to see an outage in the logs.
        tracing::warn!(
            error = why,
            errors = n,
            "redis stick table unavailable; using the local table for 1s"
        );
    }

    /// `Some(entry)` when Redis answered (`None` inside: no entry); `None` when it did not.
    pub async fn get(&self, key: &str) -> Option<Option<String>> {
        let mut cmd = redis::cmd("GETEX");
        cmd.arg(self.key(key)).arg("EX").arg(self.ttl_secs);
        self.run::<Option<String>>(cmd).await
    }

    /// Stores `key` → `server` with the TTL; failures are counted, not returned.
    /// Counts one more hit of `key` in the fixed window of `window` that contains now, and returns the
    /// window's count and the time left in it (`None` while Redis does not answer). One round trip:
    /// `INCR` and `PEXPIRE … NX` in a pipeline.
    pub async fn incr_window(&self, key: &str, window: Duration) -> Option<(u64, Duration)> {
        let window_ms = window.as_millis().max(1) as u64;
        let now = crate::health::unix_ms();
        let index = now / window_ms;
        let left = Duration::from_millis(window_ms - now % window_ms);
        let key = self.key(&format!("{key}:{index}"));
        let counted = self
            .bounded(|conn| async move {
                let mut pipe = redis::pipe();
                pipe.cmd("INCR")
                    .arg(&key)
                    .cmd("PEXPIRE")
                    .arg(&key)
                    .arg(window_ms * 2)
                    .arg("NX")
                    .ignore();
                conn.query_pipeline::<(u64,)>(&pipe)
                    .await
                    .map_err(|e| e.to_string())
            })
            .await;
        counted.map(|(n,)| (n, left))
    }

    pub async fn set(&self, key: &str, server: &str) {
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.key(key))
            .arg(server)
            .arg("EX")
            .arg(self.ttl_secs);
        let _ = self.run::<()>(cmd).await;
    }
}

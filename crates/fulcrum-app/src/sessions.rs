//! Login session storage and the `SESSIONID` cookie.
//!
//! Three stores exist: [`MemoryStore`], private to one process,
//! [`RedisStore`], which every app instance pointed at the same Redis (one node
//! or a Redis Cluster) shares, and [`ClusterNode`], memory replicated to peer
//! instances.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use http::header::COOKIE;
use http::HeaderMap;
use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{AsyncConnectionConfig, ConnectionAddr};
use redis::{Cmd, Pipeline, RedisError, RedisFuture, RedisResult, Value};
use serde::{Deserialize, Serialize};

use crate::cluster::{ClusterConfig, ClusterNode};

/// Name of the cookie that carries the session id.
pub(crate) const COOKIE_NAME: &str = "SESSIONID";

/// How many sessions the in-memory store keeps before evicting the oldest.
const MEMORY_CAPACITY: usize = 100_000;

/// Prefix of every session key in Redis; the session id follows it.
pub const REDIS_KEY_PREFIX: &str = "fulcrum-app:session:";

/// How long a Redis session lives without use; `GET /me` starts it afresh.
pub const REDIS_SESSION_TTL: Duration = Duration::from_secs(30 * 60);

/// Longest wait for a connection to Redis (including waiting for another
/// request's connection attempt).
const REDIS_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// Longest wait for the answer to one Redis command (or pipeline).
const REDIS_COMMAND_TIMEOUT: Duration = Duration::from_millis(500);

/// While Redis stays unreachable, repeat the warning at most this often.
const REDIS_WARN_INTERVAL: Duration = Duration::from_secs(10);

/// Where the app keeps its login sessions.
///
/// Parsed from the `--sessions` flag with [`FromStr`]: `memory` selects
/// [`Sessions::Memory`], `cluster` [`Sessions::Cluster`]; a `redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]` URL
/// (`rediss://` for TLS, with a `#insecure` fragment to skip certificate
/// checks) selects [`Sessions::Redis`];
/// `redis-cluster://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT…]` selects
/// [`Sessions::RedisCluster`];
/// `redis-sentinel://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT…]/MASTER[/DB]`
/// selects [`Sessions::RedisSentinel`].
///
/// [`Display`](fmt::Display) and [`Debug`] never show a password from the URL.
#[derive(Clone, Default, PartialEq, Eq)]
pub enum Sessions {
    /// Sessions live in this process only: each app instance has its own set,
    /// so a login is only visible to the instance that created it.
    #[default]
    Memory,
    /// Sessions live in the Redis at this URL, so every app instance that uses
    /// the same Redis (and database) sees every login.
    ///
    /// Keys are `fulcrum-app:session:{id}`, values JSON `{"user": "…"}`, with a
    /// 30 minute TTL that `GET /me` refreshes. The app connects lazily and
    /// reconnects by itself; while Redis is unreachable the session endpoints
    /// answer `503`. Build it with [`FromStr`] to have the URL checked; [`serve`]
    /// and [`spawn`] refuse an invalid one.
    ///
    /// [`serve`]: crate::serve
    /// [`spawn`]: crate::spawn
    Redis(String),
    /// Sessions live in a Redis Cluster reached through these seed nodes
    /// (`redis://[[USER]:PASSWORD@]HOST:PORT` each): the same keys, values and
    /// TTL as [`Sessions::Redis`], spread over the cluster's masters by slot.
    /// The client follows slot moves (`MOVED`/`ASK`) and failovers; while the
    /// master of a session's slot is down and not yet replaced, that session's
    /// requests answer `503`.
    RedisCluster(Vec<String>),
    /// Sessions live in the master that Redis Sentinel names, given as
    /// `redis-sentinel://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT…]/MASTER[/DB]`:
    /// the Sentinels' addresses, the monitored master's name, and the user,
    /// password and database of the master (the Sentinels are asked without
    /// them). The same keys, values and TTL as [`Sessions::Redis`]. After any
    /// error the next request asks the Sentinels again, which is how a failover
    /// is followed; until a replica is promoted, the session endpoints answer `503`.
    RedisSentinel(String),
    /// Sessions live in this process and are replicated to the peers named
    /// by [`AppConfig::cluster`](crate::AppConfig::cluster), so every
    /// instance of the cluster answers for every session and the death of one
    /// loses none. See the `cluster` module documentation for how.
    Cluster,
}

impl Sessions {
    /// Checks that the store can be built: a Redis URL must parse.
    pub(crate) fn validate(&self) -> Result<(), ParseSessionsError> {
        match self {
            Sessions::Memory | Sessions::Cluster => Ok(()),
            Sessions::Redis(url) => redis_client(url).map(drop),
            Sessions::RedisCluster(nodes) => cluster_client(nodes).map(drop),
            Sessions::RedisSentinel(value) => sentinel_client(value).map(drop),
        }
    }
}

impl fmt::Display for Sessions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Sessions::Memory => f.write_str("memory"),
            Sessions::Cluster => f.write_str("cluster"),
            Sessions::Redis(url) => f.write_str(&redact_password(url)),
            Sessions::RedisCluster(nodes) => f.write_str(&cluster_url(nodes)),
            Sessions::RedisSentinel(value) => f.write_str(&redact_password(value)),
        }
    }
}

impl fmt::Debug for Sessions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Sessions::Memory => f.write_str("Memory"),
            Sessions::Cluster => f.write_str("Cluster"),
            Sessions::Redis(url) => f.debug_tuple("Redis").field(&redact_password(url)).finish(),
            Sessions::RedisCluster(nodes) => f
                .debug_tuple("RedisCluster")
                .field(&cluster_url(nodes))
                .finish(),
            Sessions::RedisSentinel(value) => f
                .debug_tuple("RedisSentinel")
                .field(&redact_password(value))
                .finish(),
        }
    }
}

impl FromStr for Sessions {
    type Err = ParseSessionsError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("memory") {
            Ok(Sessions::Memory)
        } else if s.eq_ignore_ascii_case("cluster") {
            Ok(Sessions::Cluster)
        } else if is_redis_url(s) {
            redis_client(s)?;
            Ok(Sessions::Redis(s.to_owned()))
        } else if let Some(rest) = strip_prefix_ignore_case(s, CLUSTER_SCHEME) {
            let nodes = cluster_nodes(rest)?;
            cluster_client(&nodes)?;
            Ok(Sessions::RedisCluster(nodes))
        } else if strip_prefix_ignore_case(s, SENTINEL_SCHEME).is_some() {
            sentinel_client(s)?;
            Ok(Sessions::RedisSentinel(s.to_owned()))
        } else {
            // Not echoed: it might be a mistyped URL with a password in it.
            Err(ParseSessionsError(
                "invalid session store: expected `memory`, `cluster`, a \
                 `redis://host:port[/db]` (or `rediss://`) URL, \
                 `redis-cluster://host:port[,host:port…]` or \
                 `redis-sentinel://host:port[,host:port…]/master[/db]`"
                    .to_owned(),
            ))
        }
    }
}

/// Scheme of a `--sessions` value naming a Redis Cluster.
const CLUSTER_SCHEME: &str = "redis-cluster://";

/// Scheme of a `--sessions` value naming Redis Sentinels and their master.
const SENTINEL_SCHEME: &str = "redis-sentinel://";

/// A Sentinel client for `redis-sentinel://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT…]/MASTER[/DB]`
/// (which does not connect yet), or why the value is bad.
fn sentinel_client(value: &str) -> Result<SentinelClient, ParseSessionsError> {
    let bad = |why: &str| {
        ParseSessionsError(format!(
            "invalid redis sentinel {}: {why}; expected \
             redis-sentinel://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT…]/MASTER[/DB]",
            redact_password(value)
        ))
    };
    let rest = strip_prefix_ignore_case(value, SENTINEL_SCHEME).ok_or_else(|| bad("no scheme"))?;
    let (authority, path) = rest.split_once('/').ok_or_else(|| bad("no master name"))?;
    let (auth, hosts) = match authority.rsplit_once('@') {
        Some((auth, hosts)) => (Some(auth), hosts),
        None => (None, authority),
    };
    let mut sentinels = Vec::new();
    for host in hosts.split(',').map(str::trim) {
        let parsed = host
            .rsplit_once(':')
            .filter(|(h, _)| !h.is_empty())
            .and_then(|(h, p)| Some((h, p.parse::<u16>().ok().filter(|p| *p > 0)?)));
        let Some((h, port)) = parsed else {
            return Err(bad(&format!("{host:?} is not HOST:PORT")));
        };
        sentinels.push(ConnectionAddr::Tcp(h.to_owned(), port));
    }
    let (master, db) = match path.split_once('/') {
        Some((master, db)) => (
            master,
            db.parse::<i64>()
                .map_err(|_| bad(&format!("database {db:?} is not a number")))?,
        ),
        None => (path, 0),
    };
    if master.is_empty() {
        return Err(bad("no master name"));
    }
    let mut builder = SentinelClientBuilder::new(sentinels, master, SentinelServerType::Master)
        .map_err(|e| bad(&e.to_string()))?
        .set_client_to_redis_db(db);
    if let Some(auth) = auth {
        let (user, password) = auth.split_once(':').unwrap_or((auth, ""));
        if !user.is_empty() {
            builder = builder.set_client_to_redis_username(user);
        }
        if !password.is_empty() {
            builder = builder.set_client_to_redis_password(password);
        }
    }
    builder.build().map_err(|e| bad(&e.to_string()))
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    s.get(..prefix.len())
        .filter(|head| head.eq_ignore_ascii_case(prefix))
        .map(|_| &s[prefix.len()..])
}

/// The seed node URLs of `[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT…]`: the user
/// info, when given, applies to every node.
fn cluster_nodes(rest: &str) -> Result<Vec<String>, ParseSessionsError> {
    let (auth, hosts) = match rest.rsplit_once('@') {
        Some((auth, hosts)) => (format!("{auth}@"), hosts),
        None => (String::new(), rest),
    };
    let hosts = hosts.trim_end_matches('/');
    let nodes: Vec<String> = hosts
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(|h| format!("redis://{auth}{h}"))
        .collect();
    let bad = hosts.split(',').map(str::trim).find(|h| {
        !h.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
        })
    });
    if nodes.is_empty() || bad.is_some() {
        return Err(ParseSessionsError(format!(
            "invalid redis cluster {:?}: expected redis-cluster://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT…]",
            bad.unwrap_or(hosts)
        )));
    }
    Ok(nodes)
}

/// `nodes` written back as one `redis-cluster://` value, without the password.
fn cluster_url(nodes: &[String]) -> String {
    let mut auth = None;
    let hosts: Vec<&str> = nodes
        .iter()
        .map(|n| {
            let rest = n.strip_prefix("redis://").unwrap_or(n);
            match rest.rsplit_once('@') {
                Some((user, host)) => {
                    auth = Some(user);
                    host
                }
                None => rest,
            }
        })
        .collect();
    let auth = match auth.map(|a| a.split_once(':')) {
        Some(Some((user, _))) => format!("{user}:***@"),
        Some(None) => format!("{}@", auth.unwrap_or_default()),
        None => String::new(),
    };
    format!("{CLUSTER_SCHEME}{auth}{}", hosts.join(","))
}

/// A cluster client for the seed `nodes` (which does not connect yet).
fn cluster_client(nodes: &[String]) -> Result<ClusterClient, ParseSessionsError> {
    ClusterClient::builder(nodes.iter().map(String::as_str))
        .connection_timeout(REDIS_CONNECT_TIMEOUT)
        .response_timeout(REDIS_COMMAND_TIMEOUT)
        // Redirections and reconnections are retried inside the client, but
        // quickly: the command's own bound ends the wait.
        .retries(3)
        .min_retry_wait(10)
        .max_retry_wait(100)
        .build()
        .map_err(|err| {
            ParseSessionsError(format!(
                "invalid redis cluster {}: {err}",
                cluster_url(nodes)
            ))
        })
}

fn is_redis_url(s: &str) -> bool {
    ["redis://", "rediss://"].iter().any(|scheme| {
        s.get(..scheme.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(scheme))
    })
}

/// A Redis client for `url` (which does not connect yet), or why the URL is bad.
fn redis_client(url: &str) -> Result<redis::Client, ParseSessionsError> {
    if !is_redis_url(url) {
        return Err(ParseSessionsError(
            "invalid redis URL: the scheme must be `redis://` or `rediss://`".to_owned(),
        ));
    }
    redis::Client::open(url).map_err(|err| {
        // Drop the `- InvalidClientConfig` the redis crate puts after its message.
        let kind = format!("{:?}", err.kind());
        let reason = err
            .to_string()
            .replacen(&format!(" - {kind}"), "", 1)
            .replacen(&format!("- {kind}"), "", 1);
        ParseSessionsError(format!(
            "invalid redis URL {}: {reason}; expected redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]",
            redact_password(url)
        ))
    })
}

/// `url` with the password of its user info, if any, replaced by `***`.
fn redact_password(url: &str) -> Cow<'_, str> {
    let Some(scheme_end) = url.find("://") else {
        return Cow::Borrowed(url);
    };
    let authority_start = scheme_end + 3;
    let rest = &url[authority_start..];
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let Some(at) = authority.rfind('@') else {
        return Cow::Borrowed(url);
    };
    let Some(colon) = authority[..at].find(':') else {
        return Cow::Borrowed(url);
    };
    Cow::Owned(format!(
        "{}:***{}",
        &url[..authority_start + colon],
        &url[authority_start + at..]
    ))
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

/// The session store could not answer (Redis down, slow or refusing us); the
/// cause has been logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StoreUnavailable;

/// The running session store behind [`Sessions`].
#[derive(Debug)]
pub(crate) enum SessionStore {
    Memory(MemoryStore),
    Redis(RedisStore),
    Cluster(Arc<ClusterNode>),
}

impl SessionStore {
    /// The store for `kind`; a cluster node starts its replication tasks at
    /// once and advertises `local` to its peers (see [`ClusterConfig`]).
    pub(crate) fn new(kind: &Sessions, cluster: &ClusterConfig, local: Option<SocketAddr>) -> Self {
        match kind {
            Sessions::Memory => SessionStore::Memory(MemoryStore::new(MEMORY_CAPACITY)),
            Sessions::Redis(url) => SessionStore::Redis(RedisStore::new(url)),
            Sessions::RedisCluster(nodes) => SessionStore::Redis(RedisStore::cluster(nodes)),
            Sessions::RedisSentinel(value) => SessionStore::Redis(RedisStore::sentinel(value)),
            Sessions::Cluster => {
                let node = Arc::new(ClusterNode::new(cluster.clone(), local, MEMORY_CAPACITY));
                node.start();
                SessionStore::Cluster(node)
            }
        }
    }

    /// The cluster node behind a [`Sessions::Cluster`] store.
    pub(crate) fn cluster(&self) -> Option<&Arc<ClusterNode>> {
        match self {
            SessionStore::Cluster(node) => Some(node),
            _ => None,
        }
    }

    /// Appends the store's metrics in the Prometheus text format (none for
    /// Redis, whose sessions this instance does not hold).
    pub(crate) fn write_metrics(&self, out: &mut String) {
        match self {
            SessionStore::Memory(store) => {
                use std::fmt::Write as _;
                let _ = writeln!(
                    out,
                    "# HELP fulcrum_app_sessions_held Sessions this instance holds.\n\
                     # TYPE fulcrum_app_sessions_held gauge\n\
                     fulcrum_app_sessions_held {}",
                    store.len()
                );
            }
            SessionStore::Redis(_) => {}
            SessionStore::Cluster(node) => node.write_metrics(out),
        }
    }

    /// Creates a session for `user` and returns its new id.
    pub(crate) async fn create(&self, user: &str) -> Result<String, StoreUnavailable> {
        let id = new_session_id();
        match self {
            SessionStore::Memory(store) => store.insert(id.clone(), user.to_owned()),
            SessionStore::Redis(store) => store.insert(&id, user).await?,
            SessionStore::Cluster(node) => node.write(&id, Some(user.to_owned())),
        }
        Ok(id)
    }

    /// Sets the user of an existing session `id`; tells whether it existed.
    pub(crate) async fn update(&self, id: &str, user: &str) -> Result<bool, StoreUnavailable> {
        if !is_session_id(id) {
            return Ok(false);
        }
        match self {
            SessionStore::Memory(store) => Ok(store.update(id, user)),
            SessionStore::Redis(store) => store.update(id, user).await,
            SessionStore::Cluster(node) => {
                if node.get(id).await.is_none() {
                    return Ok(false);
                }
                node.write(id, Some(user.to_owned()));
                Ok(true)
            }
        }
    }

    /// The user logged in under session `id`, if any. Redis sessions get their
    /// TTL refreshed.
    pub(crate) async fn get(&self, id: &str) -> Result<Option<String>, StoreUnavailable> {
        if !is_session_id(id) {
            return Ok(None);
        }
        match self {
            SessionStore::Memory(store) => Ok(store.get(id)),
            SessionStore::Redis(store) => store.get(id).await,
            SessionStore::Cluster(node) => Ok(node.get(id).await),
        }
    }

    /// Ends session `id`; tells whether it existed.
    pub(crate) async fn remove(&self, id: &str) -> Result<bool, StoreUnavailable> {
        if !is_session_id(id) {
            return Ok(false);
        }
        match self {
            SessionStore::Memory(store) => Ok(store.remove(id).is_some()),
            SessionStore::Redis(store) => store.remove(id).await,
            SessionStore::Cluster(node) => {
                if node.get(id).await.is_none() {
                    return Ok(false);
                }
                node.write(id, None);
                Ok(true)
            }
        }
    }
}

/// 128 random bits, hex encoded.
fn new_session_id() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

/// Whether `id` could have come from [`new_session_id`]; other cookie values
/// are not looked up at all.
fn is_session_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The JSON stored under each Redis session key.
#[derive(Serialize, Deserialize)]
struct RedisSession<'a> {
    #[serde(borrow)]
    user: Cow<'a, str>,
}

/// How [`RedisStore`] reaches Redis.
enum Backend {
    Node(Box<redis::Client>),
    Cluster(Box<ClusterClient>),
    Sentinel(Box<tokio::sync::Mutex<SentinelClient>>),
}

/// A connection to one node (through a [`ConnectionManager`]) or to a cluster.
#[derive(Clone)]
enum Connection {
    Node(ConnectionManager),
    Cluster(ClusterConnection),
    /// To the master the Sentinels named when it was made.
    Sentinel(MultiplexedConnection),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Node(c) => c.req_packed_command(cmd),
            Connection::Cluster(c) => c.req_packed_command(cmd),
            Connection::Sentinel(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Node(c) => c.req_packed_commands(pipeline, offset, count),
            Connection::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
            Connection::Sentinel(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Node(c) => c.get_db(),
            Connection::Cluster(c) => c.get_db(),
            Connection::Sentinel(c) => c.get_db(),
        }
    }
}

/// Sessions in Redis, reached through a [`ConnectionManager`] (or, on a
/// cluster, a cluster connection that keeps the slot map and follows
/// redirections; any error on it makes the next request build a new one from
/// the seed nodes, which reads the slot map afresh after a failover).
///
/// The manager is created lazily, on the first request that needs it, so an app
/// starts even while Redis is unreachable; until a connection succeeds, every
/// request makes one bounded attempt. Once created, the manager replaces a
/// broken connection by itself: a command (or reconnection) failing with a
/// connection error triggers a single new connection attempt in the
/// background, which later requests wait for. After other errors the manager
/// is dropped and the next request creates a new one. Every wait is bounded,
/// so requests fail fast with [`StoreUnavailable`] instead of hanging.
pub(crate) struct RedisStore {
    /// `None` when the URL does not parse (only possible when [`Sessions::Redis`]
    /// was built by hand and the app was started through [`crate::router`]).
    client: Option<Backend>,
    /// The URL without its password, for logs.
    url: String,
    /// Created by the first request that finds it missing; replaced after
    /// errors the manager cannot recover from (see [`RedisStore::forget`]).
    manager: tokio::sync::Mutex<Option<Arc<Connection>>>,
    /// Whether the last operation succeeded (starts `true` so that the first
    /// failure is logged as a warning).
    available: AtomicBool,
    /// When the last "unavailable" warning was logged.
    last_warning: Mutex<Option<Instant>>,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("url", &self.url)
            .field("available", &self.available.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    fn new(url: &str) -> Self {
        let client = match redis_client(url) {
            Ok(client) => Some(client),
            Err(err) => {
                tracing::error!("session store disabled: {err}");
                None
            }
        };
        if client.as_ref().is_some_and(|c| {
            matches!(
                c.get_connection_info().addr(),
                redis::ConnectionAddr::TcpTls { .. }
            )
        }) {
            install_crypto_provider();
        }
        Self {
            client: client.map(|c| Backend::Node(Box::new(c))),
            url: redact_password(url).into_owned(),
            manager: tokio::sync::Mutex::new(None),
            available: AtomicBool::new(true),
            last_warning: Mutex::new(None),
        }
    }

    fn cluster(nodes: &[String]) -> Self {
        let client = match cluster_client(nodes) {
            Ok(client) => Some(Backend::Cluster(Box::new(client))),
            Err(err) => {
                tracing::error!("session store disabled: {err}");
                None
            }
        };
        Self {
            client,
            url: cluster_url(nodes),
            manager: tokio::sync::Mutex::new(None),
            available: AtomicBool::new(true),
            last_warning: Mutex::new(None),
        }
    }

    fn sentinel(value: &str) -> Self {
        let client = match sentinel_client(value) {
            Ok(client) => Some(Backend::Sentinel(Box::new(tokio::sync::Mutex::new(client)))),
            Err(err) => {
                tracing::error!("session store disabled: {err}");
                None
            }
        };
        Self {
            client,
            url: redact_password(value).into_owned(),
            manager: tokio::sync::Mutex::new(None),
            available: AtomicBool::new(true),
            last_warning: Mutex::new(None),
        }
    }

    async fn insert(&self, id: &str, user: &str) -> Result<(), StoreUnavailable> {
        let key = redis_key(id);
        let value = serde_json::to_string(&RedisSession { user: user.into() })
            .expect("a struct with one string field serializes");
        self.run("SET", |mut conn| async move {
            redis::cmd("SET")
                .arg(key)
                .arg(value)
                .arg("EX")
                .arg(REDIS_SESSION_TTL.as_secs())
                .query_async::<()>(&mut conn)
                .await
        })
        .await
    }

    async fn get(&self, id: &str) -> Result<Option<String>, StoreUnavailable> {
        let key = redis_key(id);
        // GET + EXPIRE in one round trip (GETEX would need Redis 6.2).
        let value: Option<String> = self
            .run("GET", |mut conn| async move {
                let (value,): (Option<String>,) = redis::pipe()
                    .cmd("GET")
                    .arg(&key)
                    .cmd("EXPIRE")
                    .arg(&key)
                    .arg(REDIS_SESSION_TTL.as_secs())
                    .ignore()
                    .query_async(&mut conn)
                    .await?;
                Ok(value)
            })
            .await?;
        Ok(
            value.and_then(|json| match serde_json::from_str::<RedisSession>(&json) {
                Ok(session) => Some(session.user.into_owned()),
                Err(err) => {
                    tracing::debug!(
                        store = %self.url,
                        "ignoring session {id}: not a JSON {{\"user\": ...}}: {err}"
                    );
                    None
                }
            }),
        )
    }

    async fn update(&self, id: &str, user: &str) -> Result<bool, StoreUnavailable> {
        let key = redis_key(id);
        let value = serde_json::to_string(&RedisSession { user: user.into() })
            .expect("a struct with one string field serializes");
        let answer: redis::Value = self
            .run("SET", |mut conn| async move {
                redis::cmd("SET")
                    .arg(key)
                    .arg(value)
                    .arg("XX")
                    .arg("EX")
                    .arg(REDIS_SESSION_TTL.as_secs())
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        Ok(!matches!(answer, redis::Value::Nil))
    }

    async fn remove(&self, id: &str) -> Result<bool, StoreUnavailable> {
        let key = redis_key(id);
        let removed: u64 = self
            .run("DEL", |mut conn| async move {
                redis::cmd("DEL").arg(key).query_async(&mut conn).await
            })
            .await?;
        Ok(removed > 0)
    }

    /// Runs `command` on a connection, each step bounded in time, and logs a
    /// failure (or the recovery after one).
    async fn run<T, F, Fut>(&self, name: &str, command: F) -> Result<T, StoreUnavailable>
    where
        F: FnOnce(Connection) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let result = async {
            let manager = tokio::time::timeout(REDIS_CONNECT_TIMEOUT, self.connection())
                .await
                .map_err(|_| timed_out("connecting to redis timed out"))??;
            let result = tokio::time::timeout(REDIS_COMMAND_TIMEOUT, command((*manager).clone()))
                .await
                .unwrap_or_else(|_| Err(timed_out("redis command timed out")));
            if let Err(err) = &result {
                let recovers = matches!(*manager, Connection::Node(_))
                    && err.is_io_error()
                    && err.is_unrecoverable_error();
                if !recovers {
                    self.forget(&manager);
                }
            }
            result
        }
        .await;
        match result {
            Ok(value) => {
                if !self.available.swap(true, Ordering::Relaxed) {
                    tracing::info!(store = %self.url, "session store available again");
                }
                Ok(value)
            }
            Err(err) => {
                self.report_failure(name, &err);
                Err(StoreUnavailable)
            }
        }
    }

    /// The connection manager, created on first use.
    async fn connection(&self) -> RedisResult<Arc<Connection>> {
        let mut slot = self.manager.lock().await;
        if let Some(manager) = slot.as_ref() {
            return Ok(Arc::clone(manager));
        }
        let client = match &self.client {
            Some(Backend::Node(client)) => (**client).clone(),
            Some(Backend::Sentinel(client)) => {
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(REDIS_CONNECT_TIMEOUT))
                    .set_response_timeout(Some(REDIS_COMMAND_TIMEOUT));
                let conn = client
                    .lock()
                    .await
                    .get_async_connection_with_config(&config)
                    .await?;
                tracing::debug!(store = %self.url, "connected to the master named by the sentinels");
                return Ok(Arc::clone(
                    slot.insert(Arc::new(Connection::Sentinel(conn))),
                ));
            }
            Some(Backend::Cluster(client)) => {
                let conn = client.get_async_connection().await?;
                tracing::debug!(store = %self.url, "connected to the redis cluster");
                return Ok(Arc::clone(slot.insert(Arc::new(Connection::Cluster(conn)))));
            }
            None => {
                return Err(RedisError::from((
                    redis::ErrorKind::InvalidClientConfig,
                    "invalid redis URL",
                )))
            }
        };
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(REDIS_CONNECT_TIMEOUT))
            .set_response_timeout(Some(REDIS_COMMAND_TIMEOUT))
            // One attempt per reconnection: requests trigger the next one, so
            // no backoff sleep delays the recovery once Redis is back.
            .set_number_of_retries(0);
        let manager = ConnectionManager::new_with_config(client, config).await?;
        tracing::debug!(store = %self.url, "connected to redis");
        Ok(Arc::clone(slot.insert(Arc::new(Connection::Node(manager)))))
    }

    /// Drops `manager` so that the next request builds a new one.
    ///
    /// The manager replaces its connection by itself only after I/O errors
    /// such as a refused or dropped connection. After anything else (a
    /// timeout on a silent connection, a failed handshake: `LOADING`, `NOAUTH`,
    /// a bad password…) it would keep the broken connection, or its failed
    /// attempt, forever.
    fn forget(&self, manager: &Arc<Connection>) {
        // Skip if busy: whoever holds the lock is connecting anew or will
        // fail on the same manager and forget it then.
        if let Ok(mut slot) = self.manager.try_lock() {
            if slot
                .as_ref()
                .is_some_and(|current| Arc::ptr_eq(current, manager))
            {
                *slot = None;
                tracing::debug!(store = %self.url, "dropping the redis connection");
            }
        }
    }

    fn report_failure(&self, command: &str, err: &RedisError) {
        let was_available = self.available.swap(false, Ordering::Relaxed);
        let now = Instant::now();
        let mut last = self
            .last_warning
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let due = last.is_none_or(|at| now.duration_since(at) >= REDIS_WARN_INTERVAL);
        if was_available || due {
            *last = Some(now);
            tracing::warn!(store = %self.url, "session store unavailable ({command}): {err}");
        } else {
            tracing::debug!(store = %self.url, "session store unavailable ({command}): {err}");
        }
    }
}

fn redis_key(id: &str) -> String {
    format!("{REDIS_KEY_PREFIX}{id}")
}

fn timed_out(what: &'static str) -> RedisError {
    RedisError::from(io::Error::new(io::ErrorKind::TimedOut, what))
}

/// Makes rustls use ring for `rediss://` unless the process already chose a
/// crypto provider (rustls cannot pick one itself when several are compiled in).
fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race against another installer is fine: one is in place.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
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

    fn update(&self, id: &str, user: &str) -> bool {
        match self.lock().users.get_mut(id) {
            Some(held) => {
                user.clone_into(held);
                true
            }
            None => false,
        }
    }

    fn remove(&self, id: &str) -> Option<String> {
        self.lock().users.remove(id)
    }

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
        assert_eq!(Sessions::Memory.to_string(), "memory");
        assert_eq!(format!("{:?}", Sessions::Memory), "Memory");

        for url in [
            "redis://127.0.0.1:6379",
            "redis://127.0.0.1",
            "redis://localhost:6380/2",
            "redis://[::1]:6379/0",
            "REDIS://127.0.0.1:6379",
            "rediss://redis.example.com:6380/1",
            "rediss://127.0.0.1:6380/#insecure",
        ] {
            let parsed = url.parse::<Sessions>();
            assert_eq!(parsed, Ok(Sessions::Redis(url.to_owned())), "{url}");
            assert_eq!(parsed.unwrap().to_string(), url);
        }
        assert_eq!(
            " redis://127.0.0.1:6379 \n".parse::<Sessions>(),
            Ok(Sessions::Redis("redis://127.0.0.1:6379".into()))
        );

        for bad in [
            "",
            "redis",
            "postgres://x",
            "redis+unix:///tmp/redis.sock",
            "http://127.0.0.1:6379",
        ] {
            let err = bad.parse::<Sessions>().unwrap_err().to_string();
            assert!(err.contains("`memory`"), "{bad:?}: {err}");
            assert!(err.contains("redis://"), "{bad:?}: {err}");
        }
        for bad in [
            "redis://",
            "redis://127.0.0.1:99999",
            "redis://127.0.0.1:6379/db",
            "redis://:hunter2@127.0.0.1:6379/x",
            "rediss://127.0.0.1:6380/#nope",
        ] {
            let err = bad.parse::<Sessions>().unwrap_err().to_string();
            assert!(err.starts_with("invalid redis URL"), "{bad:?}: {err}");
            assert!(!err.contains("hunter2"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn parses_redis_sentinel_values() {
        for value in [
            "redis-sentinel://127.0.0.1:26379/mymaster",
            "redis-sentinel://127.0.0.1:26379,127.0.0.1:26380/mymaster/2",
            "redis-sentinel://app:hunter2@10.0.0.1:26379,10.0.0.2:26379/main",
        ] {
            let parsed = value.parse::<Sessions>();
            assert_eq!(
                parsed,
                Ok(Sessions::RedisSentinel(value.to_owned())),
                "{value}"
            );
            let shown = parsed.unwrap().to_string();
            assert!(!shown.contains("hunter2"), "{shown}");
        }
        assert_eq!(
            "redis-sentinel://app:hunter2@10.0.0.1:26379/main"
                .parse::<Sessions>()
                .unwrap()
                .to_string(),
            "redis-sentinel://app:***@10.0.0.1:26379/main"
        );
        for bad in [
            "redis-sentinel://127.0.0.1:26379",
            "redis-sentinel://127.0.0.1:26379/",
            "redis-sentinel://127.0.0.1/mymaster",
            "redis-sentinel://:hunter2@127.0.0.1:26379/mymaster/x",
        ] {
            let err = bad.parse::<Sessions>().unwrap_err().to_string();
            assert!(err.starts_with("invalid redis sentinel"), "{bad:?}: {err}");
            assert!(!err.contains("hunter2"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn parses_redis_cluster_seeds() {
        let parsed = "redis-cluster://127.0.0.1:7000,127.0.0.1:7001"
            .parse::<Sessions>()
            .unwrap();
        assert_eq!(
            parsed,
            Sessions::RedisCluster(vec![
                "redis://127.0.0.1:7000".into(),
                "redis://127.0.0.1:7001".into()
            ])
        );
        assert_eq!(
            parsed.to_string(),
            "redis-cluster://127.0.0.1:7000,127.0.0.1:7001"
        );
        // The user info applies to every node and is never shown.
        let parsed = "redis-cluster://app:hunter2@10.0.0.1:7000,10.0.0.2:7000"
            .parse::<Sessions>()
            .unwrap();
        assert_eq!(
            parsed,
            Sessions::RedisCluster(vec![
                "redis://app:hunter2@10.0.0.1:7000".into(),
                "redis://app:hunter2@10.0.0.2:7000".into()
            ])
        );
        assert_eq!(
            parsed.to_string(),
            "redis-cluster://app:***@10.0.0.1:7000,10.0.0.2:7000"
        );
        assert!(!format!("{parsed:?}").contains("hunter2"));
        for bad in [
            "redis-cluster://",
            "redis-cluster://127.0.0.1",
            "redis-cluster://127.0.0.1:7000,:7001",
            "redis-cluster://127.0.0.1:0",
            "redis-cluster://:hunter2@127.0.0.1:70000",
        ] {
            let err = bad.parse::<Sessions>().unwrap_err().to_string();
            assert!(err.starts_with("invalid redis cluster"), "{bad:?}: {err}");
            assert!(!err.contains("hunter2"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn redis_passwords_are_never_shown() {
        let cases = [
            (
                "redis://:hunter2@127.0.0.1:6379/0",
                "redis://:***@127.0.0.1:6379/0",
            ),
            ("redis://app:hunter2@127.0.0.1", "redis://app:***@127.0.0.1"),
            (
                "rediss://app:p%40ss@h:1#insecure",
                "rediss://app:***@h:1#insecure",
            ),
            ("redis://app@127.0.0.1", "redis://app@127.0.0.1"),
            ("redis://127.0.0.1/0?x=a@b:c", "redis://127.0.0.1/0?x=a@b:c"),
        ];
        for (url, shown) in cases {
            assert_eq!(redact_password(url), shown);
            let sessions: Sessions = url.parse().unwrap();
            assert_eq!(sessions, Sessions::Redis(url.to_owned()));
            assert_eq!(sessions.to_string(), shown);
            assert_eq!(format!("{sessions:?}"), format!("Redis({shown:?})"));
        }
        assert_eq!(redact_password("not a url"), "not a url");
    }

    #[test]
    fn validates_hand_built_urls() {
        assert_eq!(Sessions::Memory.validate(), Ok(()));
        assert_eq!(Sessions::Redis("redis://h:1/2".into()).validate(), Ok(()));
        assert!(Sessions::Redis("memory".into()).validate().is_err());
        assert!(Sessions::Redis("redis://h:1/x".into()).validate().is_err());
    }

    #[test]
    fn only_well_formed_ids_are_looked_up() {
        assert!(is_session_id(&new_session_id()));
        assert!(!is_session_id("0123456789abcdef"));
        assert!(!is_session_id("0123456789abcdef0123456789abcdeg"));
        assert!(!is_session_id("*"));
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

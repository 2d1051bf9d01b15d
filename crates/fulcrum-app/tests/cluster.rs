//! Session clustering: real app instances on 127.0.0.1 replicating to each
//! other over HTTP. Waits poll with wide deadlines, so a loaded machine only
//! makes them slower.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use axum::body::Body;
use fulcrum_app::{serve, AppConfig, ClusterConfig, Sessions};
use http::{header, Method, Request, StatusCode};
use http_body_util::BodyExt as _;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Longest any wait for replication may take in these tests.
const DEADLINE: Duration = Duration::from_secs(20);

/// One running cluster instance.
struct Node {
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Node {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Stops the instance: it stops accepting, closes its connections and
    /// forgets its sessions.
    async fn kill(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(DEADLINE, task)
                .await
                .expect("instance stops")
                .unwrap();
        }
    }
}

async fn bind() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.unwrap()
}

/// Serves a cluster instance named `name` on `listener`.
fn run(listener: TcpListener, name: &str, cluster: ClusterConfig) -> Node {
    let addr = listener.local_addr().unwrap();
    let cfg = AppConfig::new(name)
        .with_sessions(Sessions::Cluster)
        .with_cluster(cluster);
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        serve(listener, cfg, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    Node {
        addr,
        shutdown: Some(tx),
        task: Some(task),
    }
}

fn peers(list: &[&TcpListener]) -> ClusterConfig {
    peers_at(
        &list
            .iter()
            .map(|l| l.local_addr().unwrap())
            .collect::<Vec<_>>(),
    )
}

fn peers_at(list: &[SocketAddr]) -> ClusterConfig {
    ClusterConfig {
        peers: list.iter().map(ToString::to_string).collect(),
        ..ClusterConfig::default()
    }
}

/// Three instances, each with the other two as `--peers`.
async fn three() -> (Node, Node, Node) {
    let (la, lb, lc) = (bind().await, bind().await, bind().await);
    let (ca, cb, cc) = (peers(&[&lb, &lc]), peers(&[&la, &lc]), peers(&[&la, &lb]));
    (run(la, "A", ca), run(lb, "B", cb), run(lc, "C", cc))
}

struct Http(Client<HttpConnector, Body>);

struct Answer {
    status: StatusCode,
    cookie: Option<String>,
    body: Value,
    text: String,
}

impl Http {
    fn new() -> Self {
        Self(Client::builder(TokioExecutor::new()).build_http())
    }

    async fn call(
        &self,
        method: Method,
        url: &str,
        session: Option<&str>,
        auth: Option<&str>,
        body: Option<Value>,
    ) -> Answer {
        let mut request = Request::builder().method(method).uri(url);
        if let Some(id) = session {
            request = request.header(header::COOKIE, format!("SESSIONID={id}"));
        }
        if let Some(auth) = auth {
            request = request.header(header::AUTHORIZATION, auth);
        }
        let request = match body {
            Some(body) => request
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(body.to_string())),
            None => request.body(Body::empty()),
        }
        .unwrap();
        let response = tokio::time::timeout(DEADLINE, self.0.request(request))
            .await
            .expect("answer in time")
            .expect("answer");
        let status = response.status();
        let cookie = response
            .headers()
            .get(header::SET_COOKIE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("SESSIONID="))
            .and_then(|v| v.split(';').next())
            .map(str::to_owned);
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Answer {
            status,
            cookie,
            body,
            text,
        }
    }

    async fn login(&self, node: &Node, user: &str) -> String {
        let answer = self
            .call(
                Method::POST,
                &node.url("/login"),
                None,
                None,
                Some(json!({ "user": user })),
            )
            .await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
        answer.cookie.expect("session cookie")
    }

    /// `GET /me`: the user, or `None` on 401.
    async fn me(&self, node: &Node, id: &str) -> Option<String> {
        let answer = self
            .call(Method::GET, &node.url("/me"), Some(id), None, None)
            .await;
        match answer.status {
            StatusCode::OK => Some(answer.body["user"].as_str().unwrap().to_owned()),
            StatusCode::UNAUTHORIZED => None,
            other => panic!("/me answered {other}: {}", answer.text),
        }
    }

    async fn metrics(&self, node: &Node) -> String {
        let answer = self
            .call(Method::GET, &node.url("/metrics"), None, None, None)
            .await;
        assert_eq!(answer.status, StatusCode::OK);
        answer.text
    }

    async fn metric(&self, node: &Node, name: &str) -> f64 {
        metric(&self.metrics(node).await, name)
    }

    async fn status(&self, node: &Node, auth: Option<&str>) -> Value {
        let answer = self
            .call(Method::GET, &node.url("/_cluster/status"), None, auth, None)
            .await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
        answer.body
    }
}

/// The value of the sample `name` (with its labels, if any) in `text`.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

/// Polls `check` until it holds, failing after [`DEADLINE`].
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return;
        }
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `node` has `n` peers up: it has read its membership.
async fn peers_up(http: &Http, node: &Node, n: usize) {
    eventually("the peers to be up", || async {
        let status = http.status(node, None).await;
        let up = status["peers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["state"] == json!("up"))
            .count();
        up == n
    })
    .await;
}

async fn held(http: &Http, node: &Node) -> f64 {
    http.metric(node, "fulcrum_app_sessions_held").await
}

#[tokio::test]
async fn a_login_is_answered_by_every_server_and_writes_replicate() {
    let (a, b, c) = three().await;
    let http = Http::new();
    for node in [&a, &b, &c] {
        peers_up(&http, node, 2).await;
    }

    let id = http.login(&a, "martin").await;
    // Right after the login, before or after the push: pull on miss covers it.
    assert_eq!(http.me(&b, &id).await.as_deref(), Some("martin"));
    assert_eq!(http.me(&c, &id).await.as_deref(), Some("martin"));
    let started = Instant::now();
    for node in [&a, &b, &c] {
        eventually("the session on every server", || async {
            held(&http, node).await == 1.0
        })
        .await;
    }
    eprintln!("login held everywhere after {:?}", started.elapsed());

    // An update on B reaches A and C.
    let answer = http
        .call(
            Method::PUT,
            &b.url("/me"),
            Some(&id),
            None,
            Some(json!({"user": "ada"})),
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    for node in [&a, &c] {
        eventually("the update everywhere", || async {
            http.me(node, &id).await.as_deref() == Some("ada")
        })
        .await;
    }

    // A logout on C ends the session everywhere, and leaves tombstones.
    let answer = http
        .call(Method::POST, &c.url("/logout"), Some(&id), None, None)
        .await;
    assert_eq!(answer.body["logged_out"], json!(true), "{}", answer.text);
    for node in [&a, &b] {
        eventually("the logout everywhere", || async {
            http.me(node, &id).await.is_none()
        })
        .await;
    }
    for node in [&a, &b, &c] {
        let text = http.metrics(node).await;
        assert_eq!(metric(&text, "fulcrum_app_sessions_held"), 0.0);
        assert_eq!(metric(&text, "fulcrum_app_cluster_tombstones_held"), 1.0);
    }

    // The metrics moved: traffic sent, lag observed, every peer up.
    let text = http.metrics(&a).await;
    assert!(metric(&text, "fulcrum_app_cluster_bytes_sent_total") > 0.0);
    assert!(metric(&text, "fulcrum_app_cluster_messages_sent_total") >= 2.0);
    assert_eq!(metric(&text, "fulcrum_app_cluster_local_writes_total"), 1.0);
    // The login went to both peers.
    assert!(metric(&text, "fulcrum_app_cluster_writes_sent_total") >= 2.0);
    assert_eq!(metric(&text, "fulcrum_app_cluster_peers_up"), 2.0);
    assert_eq!(
        metric(&text, "fulcrum_app_cluster_queue_dropped_total"),
        0.0
    );
    let mut lag_seen = 0.0;
    for node in [&a, &b, &c] {
        let text = http.metrics(node).await;
        lag_seen += metric(&text, "fulcrum_app_cluster_replication_lag_seconds_count");
        assert!(metric(&text, "fulcrum_app_cluster_bytes_received_total") > 0.0);
    }
    // Three writes, each arriving on two servers (or pulled first).
    assert!(lag_seen >= 3.0, "lag observations: {lag_seen}");
    let status = http.status(&b, None).await;
    eprintln!("B status: {status:#}");
    assert_eq!(status["peers"].as_array().unwrap().len(), 2);
    assert!(status["node"].as_str().unwrap().len() == 16);
}

#[tokio::test]
async fn a_dead_server_loses_nothing_and_a_new_one_joins_under_load() {
    let (mut a, b, c) = three().await;
    let http = Http::new();
    for node in [&a, &b, &c] {
        peers_up(&http, node, 2).await;
    }
    let mut ids = Vec::new();
    for i in 0..30 {
        ids.push(http.login(&a, &format!("user{i}")).await);
    }
    for node in [&b, &c] {
        eventually("30 sessions on B and C", || async {
            held(&http, node).await == 30.0
        })
        .await;
    }

    a.kill().await;
    for node in [&b, &c] {
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(
                http.me(node, id).await,
                Some(format!("user{i}")),
                "session {i} on {}",
                node.addr
            );
        }
    }

    // D joins with only B as its peer while logins and reads go on.
    let stop = tokio::sync::watch::channel(false);
    let load = {
        let (b_url, c_url) = (b.url(""), c.url(""));
        let mut done = stop.1.clone();
        let existing = ids.clone();
        tokio::spawn(async move {
            let http = Http::new();
            let mut made = Vec::new();
            let mut round = 0usize;
            while !*done.borrow_and_update() {
                let base = if round.is_multiple_of(2) {
                    &b_url
                } else {
                    &c_url
                };
                let answer = http
                    .call(
                        Method::POST,
                        &format!("{base}/login"),
                        None,
                        None,
                        Some(json!({"user": format!("load{round}")})),
                    )
                    .await;
                assert_eq!(answer.status, StatusCode::OK);
                made.push(answer.cookie.unwrap());
                let id = &existing[round % existing.len()];
                let answer = http
                    .call(Method::GET, &format!("{base}/me"), Some(id), None, None)
                    .await;
                assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
                round += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            made
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let ld = bind().await;
    let d = run(ld, "D", peers_at(&[b.addr]));
    // The snapshot brings the existing sessions without any pull.
    eventually("the snapshot on D", || async {
        held(&http, &d).await >= 30.0
    })
    .await;
    assert_eq!(
        http.metric(&d, "fulcrum_app_cluster_pull_hits_total").await,
        0.0
    );
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(http.me(&d, id).await, Some(format!("user{i}")));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.0.send(true).unwrap();
    let made = tokio::time::timeout(DEADLINE, load)
        .await
        .expect("load ends")
        .unwrap();
    assert!(!made.is_empty());
    // D learned C from B's snapshot, and B and C learned D: every write made
    // during the join reaches everyone.
    let total = 30.0 + made.len() as f64;
    for node in [&b, &c, &d] {
        eventually("every session everywhere", || async {
            held(&http, node).await == total
        })
        .await;
    }
    for id in &made {
        assert!(http.me(&d, id).await.is_some());
    }
    let status = http.status(&d, None).await;
    assert_eq!(status["joined_from"], json!(b.addr.to_string()));
    let status = http.status(&c, None).await;
    eprintln!(
        "{} logins under load; C's replication lag: {}",
        made.len(),
        status["replication_lag_ms"]
    );
    let listed: Vec<&str> = status["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["address"].as_str().unwrap())
        .collect();
    assert!(listed.contains(&d.addr.to_string().as_str()), "{status:#}");
}

fn write_peers(path: &PathBuf, peers: &[SocketAddr]) {
    let text: Vec<String> = peers.iter().map(ToString::to_string).collect();
    // Written whole and renamed, so a reader never sees half a file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("# peers\n{}\n", text.join("\n"))).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test]
async fn a_peers_file_is_reread_and_a_miss_pulls() {
    let dir = tempfile::tempdir().unwrap();
    let (file_a, file_b) = (dir.path().join("a.peers"), dir.path().join("b.peers"));
    let (la, lb) = (bind().await, bind().await);
    let (addr_a, addr_b) = (la.local_addr().unwrap(), lb.local_addr().unwrap());
    write_peers(&file_a, &[]);
    write_peers(&file_b, &[addr_a, addr_b]);
    let file_cfg = |path: &PathBuf| ClusterConfig {
        peers_file: Some(path.clone()),
        refresh: Duration::from_millis(100),
        ..ClusterConfig::default()
    };
    let a = run(la, "A", file_cfg(&file_a));
    let b = run(lb, "B", file_cfg(&file_b));
    let http = Http::new();

    // B reads its file: A is its peer (and B itself is recognised and skipped).
    eventually("B to know A", || async {
        let status = http.status(&b, None).await;
        status["peers"]
            == json!([{
                "address": addr_a.to_string(),
                "state": "up",
                "source": "configured",
                "node": http.status(&a, None).await["node"],
                "queue": 0, "dropped": 0, "resync_pending": false,
                "messages_sent": status["peers"][0]["messages_sent"],
                "bytes_sent": status["peers"][0]["bytes_sent"],
                "last_error": null,
            }])
    })
    .await;
    // A does not know B: its login reaches B only through B's pull on miss.
    let id = http.login(&a, "martin").await;
    assert_eq!(http.me(&b, &id).await.as_deref(), Some("martin"));
    let text = http.metrics(&b).await;
    assert_eq!(metric(&text, "fulcrum_app_cluster_pull_hits_total"), 1.0);
    assert_eq!(metric(&text, "fulcrum_app_sessions_held"), 1.0);
    // An unknown session is a miss, asked of the peers.
    assert_eq!(http.me(&b, &"0".repeat(32)).await, None);
    assert_eq!(
        http.metric(&b, "fulcrum_app_cluster_pull_misses_total")
            .await,
        1.0
    );

    // A's file now names B: A's next login is pushed.
    write_peers(&file_a, &[addr_b]);
    eventually("A to push to B", || async {
        let status = http.status(&a, None).await;
        status["peers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["address"] == json!(addr_b.to_string()) && p["state"] == json!("up"))
    })
    .await;
    let second = http.login(&a, "ada").await;
    eventually("the push to B", || async { held(&http, &b).await == 2.0 }).await;
    assert_eq!(http.me(&b, &second).await.as_deref(), Some("ada"));
    assert_eq!(
        http.metric(&b, "fulcrum_app_cluster_pull_hits_total").await,
        1.0
    );

    // B leaves A's file: A forgets it.
    write_peers(&file_a, &[]);
    eventually("A to forget B", || async {
        http.status(&a, None).await["peers"]
            .as_array()
            .unwrap()
            .is_empty()
    })
    .await;
}

#[tokio::test]
async fn a_cluster_secret_is_required_when_set() {
    let (la, lb, lx) = (bind().await, bind().await, bind().await);
    let secret = |peers: ClusterConfig, secret: &str| ClusterConfig {
        secret: Some(secret.to_owned()),
        ..peers
    };
    let ca = secret(peers(&[&lb, &lx]), "s3cret");
    let cb = secret(peers(&[&la]), "s3cret");
    let cx = secret(peers(&[&la]), "wrong");
    let (a, b, x) = (run(la, "A", ca), run(lb, "B", cb), run(lx, "X", cx));
    let http = Http::new();

    let url = a.url("/_cluster/status");
    let answer = http.call(Method::GET, &url, None, None, None).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{}", answer.text);
    let answer = http
        .call(Method::GET, &url, None, Some("Bearer nope"), None)
        .await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN, "{}", answer.text);
    for path in [
        "/_cluster/snapshot",
        &format!("/_cluster/session/{}", "a".repeat(32)),
    ] {
        let answer = http.call(Method::GET, &a.url(path), None, None, None).await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{path}");
    }
    let answer = http
        .call(
            Method::POST,
            &a.url("/_cluster/replicate"),
            None,
            None,
            Some(json!({"writes": []})),
        )
        .await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);

    // B shares the secret: replication works. X does not: A refuses it.
    let id = http.login(&a, "martin").await;
    eventually("the login on B", || async { held(&http, &b).await == 1.0 }).await;
    assert_eq!(http.me(&x, &id).await, None);
    let status = http.status(&a, Some("Bearer s3cret")).await;
    let peer_x = status["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["address"] == json!(x.addr.to_string()))
        .cloned()
        .unwrap();
    assert_eq!(peer_x["state"], json!("down"), "{status:#}");
    assert!(
        peer_x["last_error"].as_str().unwrap().contains("403"),
        "{peer_x}"
    );
    assert_eq!(held(&http, &x).await, 0.0);
}

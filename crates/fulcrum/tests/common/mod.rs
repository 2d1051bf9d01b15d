//! Test harness: real fulcrum-app servers and a real balancer on 127.0.0.1, plain HTTP clients.
#![allow(dead_code)]

pub mod browser;
pub mod fuzz;
pub mod netns;
pub mod process;
pub mod tls;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use fulcrum::runtime::{self, Running};
use fulcrum_app::{AppConfig, AppHandle};
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

pub const LOCAL: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);

/// Starts one demo server per name.
pub async fn apps(names: &[&str]) -> Vec<AppHandle> {
    apps_with(names.iter().map(|n| AppConfig::new(*n)).collect()).await
}

pub async fn apps_with(configs: Vec<AppConfig>) -> Vec<AppHandle> {
    let mut out = Vec::new();
    for cfg in configs {
        out.push(
            fulcrum_app::spawn(LOCAL, cfg)
                .await
                .expect("start fulcrum-app"),
        );
    }
    out
}

/// A config with one HTTP listener `web` on a free port and one pool `p` over `servers`
/// (name, address, weight); `pool_extra` and `listener_extra` are appended to those tables.
pub fn config(
    algorithm: &str,
    servers: &[(String, SocketAddr, u32)],
    listener_extra: &str,
    pool_extra: &str,
) -> String {
    let list: Vec<String> = servers
        .iter()
        .map(|(n, a, w)| format!("{{ name = \"{n}\", address = \"{a}\", weight = {w} }}"))
        .collect();
    format!(
        "shutdown_timeout = \"5s\"\n[admin]\nbind = \"127.0.0.1:0\"\n\n\
         [[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\npool = \"p\"\n{listener_extra}\n\n\
         [[pools]]\nname = \"p\"\nalgorithm = \"{algorithm}\"\nservers = [{}]\n{pool_extra}\n",
        list.join(", ")
    )
}

/// The (name, address, weight 1) triples of running apps, named A, B, C, …
pub fn servers(apps: &[AppHandle]) -> Vec<(String, SocketAddr, u32)> {
    apps.iter()
        .enumerate()
        .map(|(i, a)| (((b'A' + i as u8) as char).to_string(), a.addr(), 1))
        .collect()
}

/// Starts a balancer (two workers) from config text.
pub fn fulcrum(text: &str) -> Running {
    let cfg =
        fulcrum::config::parse(text, "test.toml").unwrap_or_else(|e| panic!("config: {e}\n{text}"));
    runtime::start_with_workers(cfg, 2).expect("start fulcrum")
}

/// Starts a balancer (two workers) from a configuration file, so that reloads re-read it.
pub fn fulcrum_file(path: &std::path::Path) -> Running {
    let cfg = fulcrum::config::load(path).unwrap_or_else(|e| panic!("config: {e}"));
    runtime::start_with(
        cfg,
        runtime::StartOptions {
            workers: Some(2),
            config_path: Some(path.to_owned()),
            ..runtime::StartOptions::default()
        },
    )
    .expect("start fulcrum")
}

pub fn web(running: &Running) -> SocketAddr {
    running.listener_addr("web").expect("listener web")
}

/// Stops a balancer from async code.
pub async fn stop(running: Running) {
    tokio::task::spawn_blocking(move || running.stop())
        .await
        .unwrap();
}

pub type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn h2c_client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Reply {
    /// The demo server's name from the first line of its `/` answer, or the `x-server` header.
    pub fn server(&self) -> String {
        match self.headers.get("x-server") {
            Some(v) => v.to_str().unwrap().to_string(),
            None => self
                .body
                .lines()
                .next()
                .unwrap_or("")
                .trim_start_matches("server: ")
                .to_string(),
        }
    }
}

pub async fn send(client: &HttpClient, req: Request<Full<Bytes>>) -> Reply {
    let resp = tokio::time::timeout(Duration::from_secs(20), client.request(req))
        .await
        .expect("response within 20s")
        .expect("response");
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// As [`send`], but a failed or late answer is an error rather than a panic.
pub async fn try_send(
    client: &HttpClient,
    req: Request<Full<Bytes>>,
    within: Duration,
) -> Result<Reply, String> {
    let exchange = async {
        let resp = client.request(req).await.map_err(|e| format!("{e:?}"))?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        Ok(Reply {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    };
    tokio::time::timeout(within, exchange)
        .await
        .map_err(|_| format!("no answer within {within:?}"))?
}

pub async fn get(client: &HttpClient, url: &str) -> Reply {
    send(client, Request::get(url).body(Full::default()).unwrap()).await
}

/// The balancer's metrics, as Prometheus scrapes them from its admin listener.
pub async fn metrics(lb: &Running) -> String {
    get(
        &client(),
        &format!("http://{}/metrics", lb.admin_addr().unwrap()),
    )
    .await
    .body
}

/// Sends `request` on a new connection to `addr` and reads until the other end closes (within
/// 10 s): what came back, and how many segments the client's socket received ([`segments_in`]).
pub async fn exchange_counting_segments(addr: SocketAddr, request: &[u8]) -> (Vec<u8>, u64) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        s.read_to_end(&mut answer),
    )
    .await
    .expect("answer and close in time")
    .unwrap();
    let segments = segments_in(s.local_addr().unwrap());
    (answer, segments)
}

/// How many TCP segments the kernel has received on the socket whose local address is `local`
/// (`segs_in` of `ss -ti`, iproute2).
pub fn segments_in(local: SocketAddr) -> u64 {
    let out = std::process::Command::new("ss")
        .args(["-Htin", "src", &local.to_string()])
        .output()
        .expect("run ss (iproute2)");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .find_map(|w| w.strip_prefix("segs_in:"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no segs_in for {local} in: {text}"))
}

/// The first `n` responses' server names for `GET /` through `addr`.
pub async fn pick_sequence(addr: SocketAddr, n: usize) -> Vec<String> {
    let c = client();
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let r = get(&c, &format!("http://{addr}/")).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        out.push(r.server());
    }
    out
}

/// A bare HTTP/1.1 server on 127.0.0.1 that answers every request head with the same bytes.
pub struct RawServer {
    pub addr: SocketAddr,
    /// Connections accepted.
    pub connections: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Request heads answered.
    pub requests: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

/// Starts a [`RawServer`] answering `answer`; with `close_after_each` it closes each connection after
/// answering, without saying so in the answer.
pub async fn raw_server(answer: &'static [u8], close_after_each: bool) -> RawServer {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (connections, requests) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (c, r) = (connections.clone(), requests.clone());
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = l.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            let r = r.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                    buf.drain(..end);
                    r.fetch_add(1, Ordering::SeqCst);
                    if sock.write_all(answer).await.is_err() || close_after_each {
                        return;
                    }
                }
            });
        }
    });
    RawServer {
        addr,
        connections,
        requests,
    }
}

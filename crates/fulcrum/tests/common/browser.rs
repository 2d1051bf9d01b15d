//! A browser-like client for the sessions tests: keeps cookies, logs in, asks who it is.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::{client, HttpClient, Reply};

/// A browser-like client: keeps the cookies it is given and sends them back.
pub struct Browser {
    http: HttpClient,
    jar: HashMap<String, String>,
}

impl Browser {
    pub fn new() -> Self {
        Browser {
            http: client(),
            jar: HashMap::new(),
        }
    }

    pub fn from(ip: Ipv4Addr) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_local_address(Some(IpAddr::V4(ip)));
        Browser {
            http: Client::builder(TokioExecutor::new()).build(connector),
            jar: HashMap::new(),
        }
    }

    pub async fn call(&mut self, method: &str, url: &str, body: &'static str) -> Reply {
        self.try_call(method, url, body, std::time::Duration::from_secs(20))
            .await
            .unwrap_or_else(|e| panic!("{method} {url}: {e}"))
    }

    /// As [`Browser::call`], but a failed or late answer is an error rather than a panic.
    pub async fn try_call(
        &mut self,
        method: &str,
        url: &str,
        body: &'static str,
        within: std::time::Duration,
    ) -> Result<Reply, String> {
        let mut req = Request::builder().method(method).uri(url);
        if !self.jar.is_empty() {
            let cookies: Vec<String> = self.jar.iter().map(|(k, v)| format!("{k}={v}")).collect();
            req = req.header("cookie", cookies.join("; "));
        }
        let req = req
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap();
        let reply = super::try_send(&self.http, req, within).await?;
        for set in reply.headers.get_all("set-cookie") {
            let text = set.to_str().unwrap();
            let (name, rest) = text.split_once('=').unwrap();
            let value = rest.split(';').next().unwrap().to_string();
            if value.is_empty() {
                self.jar.remove(name);
            } else {
                self.jar.insert(name.to_string(), value);
            }
        }
        Ok(reply)
    }

    pub async fn login(&mut self, base: &str) -> String {
        let r = self
            .call("POST", &format!("{base}/login"), r#"{"user":"martin"}"#)
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        r.server()
    }

    pub async fn me(&mut self, base: &str) -> Reply {
        self.call("GET", &format!("{base}/me"), "").await
    }
}

/// One answer of a load loop: when it came (since the loop started), its status and its server.
#[derive(Debug)]
pub struct Sample {
    pub at: std::time::Duration,
    pub status: u16,
    pub server: String,
}

/// A load loop: the users take turns asking `GET {base}/me` (2 ms apart, at most 20,000 requests)
/// until `stop` is set, from `started` on. Gives the answers back with the users.
pub fn me_in_turn(
    mut users: Vec<Browser>,
    base: String,
    started: std::time::Instant,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<(Vec<Sample>, Vec<Browser>)> {
    tokio::spawn(async move {
        let mut samples = Vec::new();
        for i in 0..20_000usize {
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                break;
            }
            let n = users.len();
            let r = users[i % n].me(&base).await;
            samples.push(Sample {
                at: started.elapsed(),
                status: r.status.as_u16(),
                server: r.server(),
            });
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        (samples, users)
    })
}

/// Three apps A, B, C keeping sessions in `sessions`, a balancer in front of them with plain round
/// robin (no stickiness: every server must know every session), and `users` users logged in through
/// it. The apps must live as long as the test.
pub async fn logged_in_behind_round_robin(
    sessions: fulcrum_app::Sessions,
    users: usize,
) -> (
    Vec<fulcrum_app::AppHandle>,
    fulcrum::runtime::Running,
    String,
    Vec<Browser>,
) {
    let configs = ["A", "B", "C"]
        .iter()
        .map(|n| fulcrum_app::AppConfig::new(*n).with_sessions(sessions.clone()))
        .collect();
    let apps = super::apps_with(configs).await;
    let lb = super::fulcrum(&super::config(
        "round_robin",
        &super::servers(&apps),
        "",
        "",
    ));
    let base = format!("http://{}", super::web(&lb));
    let mut logged_in = Vec::new();
    for _ in 0..users {
        let mut b = Browser::new();
        b.login(&base).await;
        logged_in.push(b);
    }
    (apps, lb, base, logged_in)
}

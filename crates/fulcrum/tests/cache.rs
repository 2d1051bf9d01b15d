//! The HTTP cache against a real fulcrum-app: one test per RFC 9111 rule the cache follows, and its
//! coalescing, stale serving, memory bound, streaming, keys, purge and metrics.
//!
//! Every endpoint the tests use counts its calls (`/headers/{tag}`, `/calls/{tag}`), so "served from
//! the cache" is checked as "the server was not asked". Freshness lifetimes are whole seconds: the
//! tests wait out short ones with margins, and never assert an upper bound on a duration.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use fulcrum_app::AppHandle;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};

/// One app and a balancer whose pool `p` has a cache with `cache` keys (plus `x_cache = true`);
/// `routes` is appended to the listener.
struct Site {
    apps: Vec<AppHandle>,
    app: SocketAddr,
    lb: fulcrum::runtime::Running,
    web: SocketAddr,
    client: HttpClient,
}

async fn site(cache: &str, routes: &str) -> Site {
    site_with(cache, routes, "").await
}

/// [`site`] with `top` (top-level tables) added to the configuration.
async fn site_with(cache: &str, routes: &str, top: &str) -> Site {
    let apps = apps(&["A"]).await;
    let app = apps[0].addr();
    let mut text = config(
        "round_robin",
        &servers(&apps),
        routes,
        &format!("[pools.cache]\nx_cache = true\n{cache}\n"),
    );
    text.push_str(top);
    let lb = fulcrum(&text);
    let web = web(&lb);
    Site {
        apps,
        app,
        lb,
        web,
        client: client(),
    }
}

impl Site {
    async fn get(&self, path: &str) -> Reply {
        self.get_with(path, &[]).await
    }

    async fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        self.send(Method::GET, path, headers).await
    }

    async fn send(&self, method: Method, path: &str, headers: &[(&str, &str)]) -> Reply {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.web));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        send(&self.client, req.body(Full::default()).unwrap()).await
    }

    /// How many times the app answered `/headers/{tag}` (asked of the app directly).
    async fn calls(&self, tag: &str) -> u64 {
        let r = get(&self.client, &format!("http://{}/calls/{tag}", self.app)).await;
        r.body.trim().parse().unwrap()
    }

    async fn admin(&self, method: Method, path: &str) -> (StatusCode, serde_json::Value) {
        let admin = self.lb.admin_addr().expect("admin");
        let req = Request::builder()
            .method(method)
            .uri(format!("http://{admin}{path}"))
            .body(Full::default())
            .unwrap();
        let r = send(&self.client, req).await;
        (r.status, serde_json::from_str(&r.body).unwrap_or_default())
    }

    async fn metrics(&self) -> String {
        let admin = self.lb.admin_addr().expect("admin");
        get(&self.client, &format!("http://{admin}/metrics"))
            .await
            .body
    }

    async fn stop(self) {
        stop(self.lb).await;
        drop(self.apps);
    }
}

fn x_cache(r: &Reply) -> &str {
    r.headers
        .get("x-cache")
        .map(|v| v.to_str().unwrap())
        .unwrap_or("")
}

fn age(r: &Reply) -> Option<u64> {
    r.headers.get("age")?.to_str().ok()?.parse().ok()
}

/// The value of a metric line that starts with `prefix`.
fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn max_age_is_served_from_the_cache_with_its_age() {
    let s = site("", "").await;
    let path = "/headers/ma?cache-control=max-age=60";
    let first = s.get(path).await;
    assert_eq!((first.status, x_cache(&first)), (StatusCode::OK, "MISS"));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let second = s.get(path).await;
    assert_eq!(x_cache(&second), "HIT");
    assert_eq!(second.body, first.body);
    assert!(age(&second).is_some_and(|a| a >= 1), "{:?}", second.headers);
    assert_eq!(s.calls("ma").await, 1);
    s.stop().await;
}

#[tokio::test]
async fn s_maxage_overrides_max_age_in_a_shared_cache() {
    let s = site("", "").await;
    let path = "/headers/sm?cache-control=max-age=0,s-maxage=60";
    s.get(path).await;
    assert_eq!(x_cache(&s.get(path).await), "HIT");
    assert_eq!(s.calls("sm").await, 1);
    s.stop().await;
}

#[tokio::test]
async fn no_store_and_private_are_not_stored() {
    let s = site("", "").await;
    for (tag, cc) in [("ns", "no-store,max-age=60"), ("pr", "private,max-age=60")] {
        let path = format!("/headers/{tag}?cache-control={cc}");
        assert_eq!(x_cache(&s.get(&path).await), "MISS");
        assert_eq!(x_cache(&s.get(&path).await), "MISS");
        assert_eq!(s.calls(tag).await, 2, "{cc}");
    }
    s.stop().await;
}

#[tokio::test]
async fn no_cache_is_revalidated_every_time() {
    let s = site("", "").await;
    let path = "/headers/nc?cache-control=no-cache&etag=%22v1%22";
    let first = s.get(path).await;
    assert!(first.body.contains("call 1"), "{}", first.body);
    let second = s.get(path).await;
    // The server was asked (and answered 304); the stored body was sent.
    assert_eq!(s.calls("nc").await, 2);
    assert_eq!(second.status, StatusCode::OK);
    assert_eq!(x_cache(&second), "HIT");
    assert_eq!(second.body, first.body);
    s.stop().await;
}

#[tokio::test]
async fn an_authorized_request_is_stored_only_when_the_response_allows_it() {
    let s = site("", "").await;
    let auth = [("authorization", "Bearer secret")];
    let path = "/headers/au?cache-control=max-age=60";
    s.get_with(path, &auth).await;
    assert_eq!(x_cache(&s.get_with(path, &auth).await), "MISS");
    assert_eq!(s.calls("au").await, 2);
    for (tag, cc) in [("aup", "public,max-age=60"), ("aus", "s-maxage=60")] {
        let path = format!("/headers/{tag}?cache-control={cc}");
        s.get_with(&path, &auth).await;
        assert_eq!(x_cache(&s.get_with(&path, &auth).await), "HIT", "{cc}");
        assert_eq!(s.calls(tag).await, 1);
    }
    s.stop().await;
}

#[tokio::test]
async fn set_cookie_responses_are_stored_only_when_configured() {
    let routes =
        "\n  [[listeners.routes]]\n  path_prefix = \"/headers/cookie-kept\"\n  pool = \"p\"\n  \
                  [listeners.routes.cache]\n  x_cache = true\n  store_set_cookie = true\n";
    let s = site("", routes).await;
    let path = "/headers/cookie?cache-control=public,max-age=60&set-cookie=id%3D1";
    s.get(path).await;
    assert_eq!(x_cache(&s.get(path).await), "MISS");
    assert_eq!(s.calls("cookie").await, 2);
    let path = "/headers/cookie-kept?cache-control=public,max-age=60&set-cookie=id%3D1";
    s.get(path).await;
    let hit = s.get(path).await;
    assert_eq!(x_cache(&hit), "HIT");
    assert_eq!(s.calls("cookie-kept").await, 1);
    s.stop().await;
}

#[tokio::test]
async fn expires_gives_freshness_and_a_past_one_none() {
    let s = site("", "").await;
    s.get("/headers/ex?expires=%2B60").await;
    assert_eq!(x_cache(&s.get("/headers/ex?expires=%2B60").await), "HIT");
    assert_eq!(s.calls("ex").await, 1);
    s.get("/headers/expast?expires=-60").await;
    s.get("/headers/expast?expires=-60").await;
    assert_eq!(s.calls("expast").await, 2);
    s.stop().await;
}

#[tokio::test]
async fn vary_keeps_a_variant_per_request_header_value() {
    let s = site("", "").await;
    let path = "/headers/va?cache-control=max-age=60&vary=accept-language";
    let fr = s.get_with(path, &[("accept-language", "fr")]).await;
    let en = s.get_with(path, &[("accept-language", "en")]).await;
    assert!(fr.body.contains("accept-language: fr"), "{}", fr.body);
    assert!(en.body.contains("accept-language: en"), "{}", en.body);
    let fr2 = s.get_with(path, &[("accept-language", "fr")]).await;
    let en2 = s.get_with(path, &[("accept-language", "en")]).await;
    assert_eq!((x_cache(&fr2), x_cache(&en2)), ("HIT", "HIT"));
    assert_eq!((fr2.body, en2.body), (fr.body, en.body));
    assert_eq!(s.calls("va").await, 2);
    s.stop().await;
}

/// A stale entry with a validator is revalidated; the server's 304 refreshes it.
async fn revalidated_with(tag: &str, validator: &str) {
    let s = site("", "").await;
    let path = format!("/headers/{tag}?cache-control=max-age=3&{validator}");
    let first = s.get(&path).await;
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let second = s.get(&path).await;
    assert_eq!(s.calls(tag).await, 2, "the stale entry was revalidated");
    assert_eq!((second.status, x_cache(&second)), (StatusCode::OK, "HIT"));
    assert_eq!(second.body, first.body, "the 304 kept the stored body");
    // Fresh again for 3 s after the 304.
    let third = s.get(&path).await;
    assert_eq!(x_cache(&third), "HIT");
    assert_eq!(s.calls(tag).await, 2);
    s.stop().await;
}

#[tokio::test]
async fn an_etag_is_revalidated_and_a_304_refreshes_the_entry() {
    revalidated_with("et", "etag=%22abc%22").await;
}

#[tokio::test]
async fn last_modified_is_revalidated_and_a_304_refreshes_the_entry() {
    revalidated_with(
        "lm",
        "last-modified=Sat,%2001%20Jan%202022%2000:00:00%20GMT",
    )
    .await;
}

#[tokio::test]
async fn stale_while_revalidate_serves_stale_and_refreshes_once() {
    let s = site("", "").await;
    let path = "/headers/swr?cache-control=max-age=1,stale-while-revalidate=600";
    let first = s.get(path).await;
    assert!(first.body.contains("call 1"));
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let stale = s.get(path).await;
    assert_eq!(x_cache(&stale), "STALE");
    assert_eq!(stale.body, first.body);
    // One background request refreshes the entry.
    let started = Instant::now();
    loop {
        let r = s.get(path).await;
        if r.body.contains("call 2") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "never refreshed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(s.calls("swr").await, 2);
    s.stop().await;
}

#[tokio::test]
async fn stale_if_error_serves_cached_pages_with_the_only_server_gone() {
    let mut s = site("stale_if_error = \"10m\"", "").await;
    let path = "/headers/sie?cache-control=max-age=1";
    let first = s.get(path).await;
    let directive = "/headers/sie2?cache-control=max-age=1,stale-if-error=600";
    let with_directive = s.get(directive).await;
    s.apps.remove(0).stop().await;
    tokio::time::sleep(Duration::from_millis(2200)).await;
    for _ in 0..3 {
        let r = s.get(path).await;
        assert_eq!((r.status, x_cache(&r)), (StatusCode::OK, "STALE"));
        assert_eq!(r.body, first.body);
        let r = s.get(directive).await;
        assert_eq!((r.status, x_cache(&r)), (StatusCode::OK, "STALE"));
        assert_eq!(r.body, with_directive.body);
    }
    // Nothing stored for it: the error stands.
    let r = s.get("/headers/never?cache-control=max-age=60").await;
    assert!(r.status.is_server_error(), "{}", r.status);
    s.stop().await;
}

#[tokio::test]
async fn stale_if_error_does_not_serve_past_its_limit() {
    let mut s = site("", "").await;
    let path = "/headers/sie3?cache-control=max-age=1,stale-if-error=1";
    s.get(path).await;
    s.apps.remove(0).stop().await;
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert!(s.get(path).await.status.is_server_error());
    s.stop().await;
}

#[tokio::test]
async fn concurrent_misses_for_an_expired_key_reach_the_server_once() {
    let s = site("coalesce_timeout = \"60s\"", "").await;
    // The body takes 500 ms after its first byte: the request stays in flight while the others come.
    // Fresh for 3 s once refreshed: every one of the 100 is answered within that.
    let path = "/headers/co?cache-control=max-age=3&bytes=4000&delay=500";
    s.get(path).await;
    tokio::time::sleep(Duration::from_millis(4200)).await;
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let client = s.client.clone();
        let url = format!("http://{}{path}", s.web);
        tasks.push(tokio::spawn(async move { get(&client, &url).await }));
    }
    let mut outcomes = std::collections::BTreeMap::new();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.body.len(), 4000);
        *outcomes.entry(x_cache(&r).to_owned()).or_insert(0) += 1;
    }
    assert_eq!(s.calls("co").await, 2, "{outcomes:?}");
    assert_eq!(outcomes.get("MISS"), Some(&1), "{outcomes:?}");
    s.stop().await;
}

#[tokio::test]
async fn memory_stays_bounded_under_a_stream_of_unique_keys() {
    let s = site("max_size = \"64KiB\"\nmax_object_size = \"4KiB\"", "").await;
    for i in 0..300 {
        let r = s
            .get(&format!(
                "/headers/mem?cache-control=max-age=600&bytes=2000&n={i}"
            ))
            .await;
        assert_eq!(r.body.len(), 2000);
    }
    let m = s.metrics().await;
    let bytes = metric(&m, "fulcrum_cache_bytes{pool=\"p\",scope=\"p\"}").expect("bytes metric");
    let evictions =
        metric(&m, "fulcrum_cache_evictions_total{pool=\"p\",scope=\"p\"}").expect("evictions");
    let stores = metric(&m, "fulcrum_cache_stores_total{pool=\"p\",scope=\"p\"}").expect("stores");
    assert!(bytes <= 65536.0, "{bytes} bytes held");
    assert!(bytes > 0.0);
    assert_eq!(stores, 300.0);
    assert!(evictions > 0.0, "{m}");
    s.stop().await;
}

#[tokio::test]
async fn an_object_over_the_size_limit_streams_through_uncached() {
    let s = site("max_object_size = \"8KiB\"", "").await;
    let path = "/headers/big?cache-control=max-age=60&bytes=100000";
    for _ in 0..2 {
        let r = s.get(path).await;
        assert_eq!((r.body.len(), x_cache(&r)), (100000, "MISS"));
    }
    assert_eq!(s.calls("big").await, 2);
    // Without a Content-Length the limit is found while streaming, and the copy given up.
    s.stop().await;
}

#[tokio::test]
async fn a_response_streams_to_the_client_while_it_is_stored() {
    let s = site("", "").await;
    let path = "/headers/slow?cache-control=max-age=60&bytes=50000&delay=1500";
    let url = format!("http://{}{path}", s.web);
    let started = Instant::now();
    let resp = s
        .client
        .request(Request::get(&url).body(Full::<Bytes>::default()).unwrap())
        .await
        .unwrap();
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    let first_at = started.elapsed();
    assert!(!first.is_empty());
    let mut total = first.len();
    while let Some(frame) = body.frame().await {
        total += frame.unwrap().into_data().map_or(0, |d| d.len());
    }
    let whole_at = started.elapsed();
    assert_eq!(total, 50000);
    // The first bytes came before the server's pause ended, the rest after it.
    assert!(whole_at >= Duration::from_millis(1500));
    assert!(first_at < whole_at, "{first_at:?} {whole_at:?}");
    let again = s.get(path).await;
    assert_eq!((x_cache(&again), again.body.len()), ("HIT", 50000));
    assert_eq!(s.calls("slow").await, 1);
    s.stop().await;
}

#[tokio::test]
async fn the_query_is_kept_sorted_or_ignored_in_the_key() {
    let routes = "\n  [[listeners.routes]]\n  path_prefix = \"/headers/qs\"\n  pool = \"p\"\n  \
                  [listeners.routes.cache]\n  key = { query = \"sort\" }\n\n  \
                  [[listeners.routes]]\n  path_prefix = \"/headers/qi\"\n  pool = \"p\"\n  \
                  [listeners.routes.cache]\n  key = { query = \"ignore\" }\n";
    let s = site("", routes).await;
    for tag in ["qk", "qs", "qi"] {
        s.get(&format!("/headers/{tag}?cache-control=max-age=60&a=1&b=2"))
            .await;
        s.get(&format!("/headers/{tag}?b=2&a=1&cache-control=max-age=60"))
            .await;
        s.get(&format!("/headers/{tag}?cache-control=max-age=60&a=9"))
            .await;
    }
    assert_eq!(s.calls("qk").await, 3, "keep: every order is its own key");
    assert_eq!(s.calls("qs").await, 2, "sort: one key for both orders");
    assert_eq!(s.calls("qi").await, 1, "ignore: one key for every query");
    s.stop().await;
}

#[tokio::test]
async fn a_configured_header_is_part_of_the_key() {
    let s = site("key = { headers = [\"x-tenant\"] }", "").await;
    let path = "/headers/kh?cache-control=max-age=60";
    for tenant in ["a", "b", "a", "b"] {
        s.get_with(path, &[("x-tenant", tenant)]).await;
    }
    assert_eq!(s.calls("kh").await, 2);
    s.stop().await;
}

#[tokio::test]
async fn purge_by_url_prefix_or_everything() {
    let s = site("", "").await;
    let paths = [
        "/headers/pu1?cache-control=max-age=60",
        "/headers/pu2?cache-control=max-age=60",
        "/headers/pv?cache-control=max-age=60",
    ];
    for p in paths {
        s.get(p).await;
        assert_eq!(x_cache(&s.get(p).await), "HIT");
    }
    let (status, body) = s
        .admin(Method::DELETE, "/api/v1/pools/p/cache?path=/headers/pu1")
        .await;
    assert_eq!((status, body["purged"].as_u64()), (StatusCode::OK, Some(1)));
    assert_eq!(x_cache(&s.get(paths[0]).await), "MISS");
    assert_eq!(x_cache(&s.get(paths[1]).await), "HIT");
    let (_, body) = s
        .admin(Method::DELETE, "/api/v1/pools/p/cache?prefix=/headers/pu")
        .await;
    assert_eq!(body["purged"].as_u64(), Some(2));
    assert_eq!(x_cache(&s.get(paths[2]).await), "HIT");
    let (_, body) = s.admin(Method::DELETE, "/api/v1/pools/p/cache").await;
    assert!(body["purged"].as_u64().unwrap() >= 1);
    assert_eq!(x_cache(&s.get(paths[2]).await), "MISS");
    let (status, body) = s
        .admin(Method::DELETE, "/api/v1/pools/p/cache?path=relative")
        .await;
    assert_eq!(
        (status, body["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("path"))
    );
    let (status, _) = s.admin(Method::DELETE, "/api/v1/pools/nope/cache").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    s.stop().await;
}

#[tokio::test]
async fn post_bypasses_and_invalidates_the_url() {
    let s = site("", "").await;
    let path = "/headers/inv?cache-control=max-age=60";
    s.get(path).await;
    assert_eq!(x_cache(&s.get(path).await), "HIT");
    let post = s.send(Method::POST, path, &[]).await;
    assert_eq!(x_cache(&post), "BYPASS");
    assert_eq!(x_cache(&s.get(path).await), "MISS");
    assert_eq!(s.calls("inv").await, 3);
    s.stop().await;
}

#[tokio::test]
async fn a_route_may_turn_the_pool_cache_off() {
    let routes =
        "\n  [[listeners.routes]]\n  path_prefix = \"/headers/off\"\n  pool = \"p\"\n  cache = false\n";
    let s = site("", routes).await;
    let path = "/headers/off?cache-control=max-age=60";
    s.get(path).await;
    let r = s.get(path).await;
    assert_eq!(x_cache(&r), "");
    assert_eq!(s.calls("off").await, 2);
    s.stop().await;
}

#[tokio::test]
async fn metrics_and_the_pool_view_count_hits_misses_and_stores() {
    let s = site("", "").await;
    let path = "/cache/60";
    let first = s.get(path).await;
    assert_eq!(first.headers["cache-control"], "public, max-age=60");
    for _ in 0..3 {
        assert_eq!(x_cache(&s.get(path).await), "HIT");
    }
    s.send(Method::POST, "/echo", &[]).await;
    let m = s.metrics().await;
    let labels = "{pool=\"p\",scope=\"p\"}";
    assert_eq!(
        metric(&m, &format!("fulcrum_cache_hits_total{labels}")),
        Some(3.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, &format!("fulcrum_cache_misses_total{labels}")),
        Some(1.0)
    );
    assert_eq!(
        metric(&m, &format!("fulcrum_cache_stores_total{labels}")),
        Some(1.0)
    );
    assert_eq!(
        metric(&m, &format!("fulcrum_cache_bypass_total{labels}")),
        Some(1.0)
    );
    assert!(metric(&m, &format!("fulcrum_cache_bytes{labels}")).unwrap() > 0.0);
    let (_, pool) = s.admin(Method::GET, "/api/v1/pools/p").await;
    assert_eq!(pool["cache"]["hits"], 3);
    assert_eq!(pool["cache"]["hit_ratio"], 0.75);
    let app = get(&s.client, &format!("http://{}/calls/cache-60", s.app)).await;
    assert_eq!(app.body.trim(), "1");
    s.stop().await;
}

#[tokio::test]
async fn the_access_log_says_what_the_cache_did() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let top = format!(
        "\n[access_log]\nformat = \"json\"\npath = \"{}\"\n",
        log.display()
    );
    let s = site_with("", "", &top).await;
    s.get("/cache/60").await;
    s.get("/cache/60").await;
    s.send(Method::POST, "/echo", &[]).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let records: Vec<serde_json::Value> = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.lines().count() >= 3 {
            break text
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
        }
        assert!(Instant::now() < deadline, "3 lines in time: {text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let caches: Vec<&str> = records
        .iter()
        .map(|r| r["cache"].as_str().unwrap())
        .collect();
    assert_eq!(caches, ["MISS", "HIT", "BYPASS"]);
    assert_eq!(records[1]["server"], serde_json::Value::Null);
    assert_eq!(records[1]["termination"], "ok");
    assert_eq!(records[0]["server"], "A");
    s.stop().await;
}

#[tokio::test]
async fn default_ttl_gives_freshness_to_a_response_that_states_none() {
    let routes = "\n  [[listeners.routes]]\n  path_prefix = \"/headers/dt-on\"\n  pool = \"p\"\n  \
                  [listeners.routes.cache]\n  x_cache = true\n  default_ttl = \"1h\"\n";
    let s = site("", routes).await;
    // No Cache-Control, Expires or Last-Modified: never fresh without default_ttl (and not stored).
    s.get("/headers/dt-off").await;
    assert_eq!(x_cache(&s.get("/headers/dt-off").await), "MISS");
    assert_eq!(s.calls("dt-off").await, 2);
    s.get("/headers/dt-on").await;
    assert_eq!(x_cache(&s.get("/headers/dt-on").await), "HIT");
    assert_eq!(s.calls("dt-on").await, 1);
    // An explicit lifetime is kept: max-age=0 stays stale.
    s.get("/headers/dt-on-zero?cache-control=max-age=0").await;
    s.get("/headers/dt-on-zero?cache-control=max-age=0").await;
    assert_eq!(s.calls("dt-on-zero").await, 2);
    s.stop().await;
}

#[tokio::test]
async fn a_reload_keeps_an_unchanged_cache_and_empties_a_changed_one() {
    let apps = apps(&["A"]).await;
    let dir = tempfile::tempdir().unwrap();
    let text = |cache: &str, retries: u32| {
        config(
            "round_robin",
            &servers(&apps),
            "",
            &format!("retries = {retries}\n[pools.cache]\nx_cache = true\n{cache}\n"),
        )
    };
    let path = common::process::write_config(&dir, &text("", 2));
    let lb = fulcrum_file(&path);
    let (web, admin) = (web(&lb), lb.admin_addr().unwrap());
    let c = client();
    let url = format!("http://{web}/cache/60");
    get(&c, &url).await;
    let reload = || async {
        let req = Request::post(format!("http://{admin}/api/v1/reload"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap();
        let r = send(&c, req).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    };
    // Another pool key changed, the cache did not: its entries stay.
    std::fs::write(&path, text("", 1)).unwrap();
    reload().await;
    assert_eq!(x_cache(&get(&c, &url).await), "HIT");
    // The cache's settings changed: a new, empty cache.
    std::fs::write(&path, text("max_size = \"1MiB\"", 1)).unwrap();
    reload().await;
    assert_eq!(x_cache(&get(&c, &url).await), "MISS");
    stop(lb).await;
}

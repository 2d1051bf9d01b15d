//! Fuzzing on stable for the inputs an operator or a client controls that `fuzz_parsers.rs` does not
//! cover: the configuration file (TOML and validation) and the route matchers and traffic filters (the
//! request's path, query, host, headers and cookies). Property tests over mutated byte streams and
//! generated requests, bounded and deterministic (fixed seed) so that they run in the test command; a
//! longer hunt: `FUZZ_CASES=100000 cargo test -p fulcrum --release --test fuzz_inputs`.
//!
//! Properties: never a panic; a configuration is either accepted or refused with an error that names a
//! line (when the text has one); filters and routes answer for any request hyper could hand them.

use fulcrum::config;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};

fn runner(default_cases: u32) -> Config {
    let cases = std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_cases);
    Config {
        cases,
        rng_seed: RngSeed::Fixed(0xf01c_5eed),
        failure_persistence: None,
        ..Config::default()
    }
}

/// A valid configuration exercising most keys, mutated by the tests.
const SEED: &str = r#"shutdown_timeout = "5s"
[admin]
bind = "127.0.0.1:9090"
[[listeners]]
name = "web"
bind = "127.0.0.1:8080"
protocol = "http"
pool = "app"
max_body_size = "1MiB"
deny = ["192.0.2.0/24"]
rate_limit = { rate = 10, per = "1s", burst = 5, key = "header:x-user" }
block = ["path_traversal"]
auto_ban = { window = "10s", max_errors = 5, ban = "1m" }
  [[listeners.routes]]
  path_regex = "^/api/v[0-9]+/"
  host = "*.example.com"
  pool = "api"
  allow = ["10.0.0.0/8"]
  [[listeners.block_rules]]
  name = "no-debug"
  target = "query"
  contains = "debug=1"
[[pools]]
name = "app"
algorithm = "maglev"
hash_key = "cookie:sid"
servers = [{ address = "127.0.0.1:9001", weight = 2 }, { address = "app.internal:9002" }]
max_connections_per_server = 10
  [pools.health_check]
  kind = "http"
  path = "/health"
  expect_status = "200-299"
  [pools.sticky]
  kind = "cookie"
  secret = "0123456789abcdef"
[[pools]]
name = "api"
dns_srv = "_http._tcp.api.internal"
"#;

/// Parses `text` and checks the outcome is an answer, not a panic, and that errors name their place.
fn check(text: &str) {
    match config::parse(text, "fuzz.toml") {
        Ok(_) => {}
        Err(e) => {
            let shown = e.to_string();
            assert!(shown.starts_with("fuzz.toml"), "{shown}");
            assert!(!e.message.is_empty(), "{shown}");
        }
    }
}

#[test]
fn the_seed_configuration_is_valid() {
    config::parse(SEED, "fuzz.toml").unwrap_or_else(|e| panic!("{e}"));
}

proptest! {
    #![proptest_config(runner(400))]

    /// Bytes of the seed flipped, deleted or duplicated.
    #[test]
    fn mutated_configurations_never_panic(
        edits in prop::collection::vec((0usize..SEED.len(), 0u8..3, any::<u8>()), 1..6)
    ) {
        let mut bytes = SEED.as_bytes().to_vec();
        for (at, kind, b) in edits {
            let at = at.min(bytes.len().saturating_sub(1));
            match kind {
                0 => bytes[at] = b,
                1 => { bytes.remove(at); }
                _ => bytes.insert(at, b),
            }
        }
        check(&String::from_utf8_lossy(&bytes));
    }

    /// Values of the seed replaced by arbitrary strings and numbers.
    #[test]
    fn arbitrary_values_never_panic(
        line in 0usize..60,
        value in prop_oneof![
            "\\PC{0,40}".prop_map(|s| format!("{s:?}")),
            any::<i64>().prop_map(|n| n.to_string()),
            Just("[]".to_string()),
            Just("{}".to_string()),
            "[0-9]{1,3}(ms|s|m|h|KiB|MB|x)".prop_map(|s| format!("{s:?}")),
        ]
    ) {
        let lines: Vec<&str> = SEED.lines().collect();
        let at = line % lines.len();
        let mut out = String::new();
        for (i, l) in lines.iter().enumerate() {
            match (i == at, l.split_once(" = ")) {
                (true, Some((key, _))) => out.push_str(&format!("{key} = {value}")),
                _ => out.push_str(l),
            }
            out.push('\n');
        }
        check(&out);
    }

    /// Whole random documents.
    #[test]
    fn random_text_never_panics(text in "\\PC{0,300}") {
        check(&text);
    }
}

/// Requests built from arbitrary parts, as hyper could hand them to the route matchers and filters.
fn request(
    path: &str,
    query: &str,
    host: &str,
    header: &str,
    cookie: &str,
) -> Option<http::Request<()>> {
    let uri = if query.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{query}")
    };
    let uri: http::Uri = uri.parse().ok()?;
    let mut b = http::Request::get(uri);
    if let Ok(v) = http::HeaderValue::from_str(host) {
        b = b.header("host", v);
    }
    if let Ok(v) = http::HeaderValue::from_str(header) {
        b = b.header("x-user", v.clone()).header("user-agent", v);
    }
    if let Ok(v) = http::HeaderValue::from_str(cookie) {
        b = b.header("cookie", v);
    }
    b.body(()).ok()
}

proptest! {
    #![proptest_config(runner(2000))]

    #[test]
    fn routes_and_filters_answer_any_request(
        path in "/[\\x21-\\x7e]{0,80}",
        query in "[\\x21-\\x7e]{0,60}",
        host in "\\PC{0,40}",
        header in "\\PC{0,60}",
        cookie in "[\\x20-\\x7e]{0,80}",
    ) {
        let cfg = config::parse(SEED, "fuzz.toml").unwrap();
        let Some(req) = request(&path, &query, &host, &header, &cookie) else { return Ok(()); };
        for r in &cfg.listeners[0].routes {
            let _ = fulcrum::http::route::matches(&r.matcher, &req);
        }
        let filter = fulcrum::http::filter::Filter::new(
            &cfg.listeners[0].filter,
            None,
            &cfg.store,
            "fuzz",
        );
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let ip = std::net::IpAddr::from([10, 0, 0, 1]);
        let _ = rt.block_on(filter.check(&req, ip, true));
        let _ = fulcrum::http::route::cookie(req.headers(), "sid");
    }
}

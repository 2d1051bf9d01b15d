//! Tests of the whole pipeline: text → [`Config`] or a positioned [`ConfigError`].

use std::net::SocketAddr;
use std::time::Duration;

use super::*;

const ORIGIN: &str = "fulcrum.toml";

fn ok(text: &str) -> Config {
    parse(text, ORIGIN).unwrap_or_else(|e| panic!("{e}"))
}

fn err(text: &str) -> ConfigError {
    match parse(text, ORIGIN) {
        Ok(config) => panic!("expected an error, got {config:#?}"),
        Err(e) => e,
    }
}

/// Parses with every feature enabled, built or not.
fn ok_all(text: &str) -> Config {
    parse_with(text, ORIGIN, validate::build).unwrap_or_else(|e| panic!("{e}"))
}

fn err_all(text: &str) -> ConfigError {
    match parse_with(text, ORIGIN, validate::build) {
        Ok(config) => panic!("expected an error, got {config:#?}"),
        Err(e) => e,
    }
}

/// The 1-based line of the first occurrence of `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    let at = text
        .find(needle)
        .unwrap_or_else(|| panic!("{needle:?} not in text"));
    text[..at].matches('\n').count() + 1
}

/// Asserts that the displayed error is `fulcrum.toml:LINE:…: KEY: …FRAGMENT…`.
#[track_caller]
fn assert_error(error: &ConfigError, key: &str, line: usize, fragment: &str) {
    let shown = error.to_string();
    assert!(
        shown.starts_with(&format!("{ORIGIN}:{line}:")),
        "expected line {line}: {shown}"
    );
    assert!(
        shown.contains(&format!(": {key}: ")),
        "expected key {key}: {shown}"
    );
    assert!(shown.contains(fragment), "expected {fragment:?}: {shown}");
    assert_eq!(error.key.as_deref(), Some(key));
    assert_eq!(error.line, Some(line));
}

/// `BASE` with `from` replaced by `to` (which must be there).
fn variant(from: &str, to: &str) -> String {
    assert!(BASE.contains(from), "{from:?} not in BASE");
    BASE.replacen(from, to, 1)
}

/// A small valid configuration with marker comments where tests insert keys.
const BASE: &str = r#"[admin]
bind = "127.0.0.1:9090"

[store]
kind = "memory"

[[listeners]]
name = "web"
bind = "127.0.0.1:8080"
protocol = "http"
pool = "app"
# LISTENER

  [[listeners.routes]]
  path_prefix = "/api/"
  pool = "api"
  # ROUTE

[[pools]]
name = "app"
servers = [
  { address = "127.0.0.1:9001" },
  { address = "127.0.0.1:9002", weight = 2 },
]
# POOL

[[pools]]
name = "api"
servers = [{ address = "127.0.0.1:9101" }]
"#;

/// SPEC's example without the keys whose feature is not built yet.
const SUPPORTED_EXAMPLE: &str = r#"shutdown_timeout = "30s"

[admin]                              # optional: REST API, /metrics, dashboard
bind = "127.0.0.1:9090"
token = "secret"

[store]
kind = "memory"

[[listeners]]
name = "web"
bind = "127.0.0.1:8080"
protocol = "http"
pool = "app"

  [[listeners.routes]]
  path_prefix = "/api/"
  pool = "api"

  [[listeners.routes]]
  host = "*.Example.com:8080"
  method = "POST"
  headers = { "X-Version" = "2" }
  cookie = { name = "beta", value = "1" }
  query = { "v" = "2" }
  path_regex = "^/v[0-9]+/"
  pool = "app"

[[pools]]
name = "app"
algorithm = "round_robin"
servers = [
  { address = "127.0.0.1:9001", weight = 1 },
  { address = "127.0.0.1:9002", weight = 2 },
]
retries = 2

[[pools]]
name = "api"
algorithm = "weighted_round_robin"
servers = [{ name = "api-1", address = "127.0.0.1:9101", weight = 3 }]
connect_timeout = "500ms"
response_timeout = "1m"
"#;

/// SPEC's example in full, plus the keys of every feature.
const FULL_EXAMPLE: &str = r#"shutdown_timeout = "30s"

[admin]
bind = "127.0.0.1:9090"

[store]
kind = "redis"
sentinel = { master = "mymaster", nodes = ["127.0.0.1:26379"] }

[[listeners]]
name = "web"
bind = "127.0.0.1:8080"
protocol = "http"
pool = "app"

  [[listeners.routes]]
  path_prefix = "/api/"
  pool = "api"

[[listeners]]
name = "secure"
bind = "127.0.0.1:8443"
protocol = "https"
pool = "app"
tls = { cert = "cert.pem", key = "key.pem" }

[[listeners]]
name = "db"
bind = "127.0.0.1:5432"
protocol = "tcp"
pool = "api"
proxy_protocol = "v2"

[[listeners]]
name = "dns"
bind = "127.0.0.1:5432"
protocol = "udp"
pool = "api"

[[pools]]
name = "app"
algorithm = "round_robin"
servers = [
  { address = "127.0.0.1:9001", weight = 1 },
  { address = "127.0.0.1:9002", weight = 2 },
]
slow_start = "30s"
retries = 2

  [pools.health_check]
  kind = "http"
  path = "/health"
  expect_status = "200-399"
  interval = "2s"
  timeout = "1s"
  rise = 2
  fall = 3

  [pools.sticky]
  kind = "cookie"
  cookie = "FULCRUM_SRV"
  ttl = "30m"

  [pools.cache]
  max_size = "256MiB"

[[pools]]
name = "api"
algorithm = "maglev"
hash_key = "header:X-User"
servers = [{ address = "127.0.0.1:9101" }]

  [pools.health_check]
  kind = "tcp"

  [pools.sticky]
  kind = "app_cookie"
  cookie = "JSESSIONID"
"#;

fn addr(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

// ---- valid configurations ----

#[test]
fn supported_example_parses_with_defaults() {
    let config = ok(SUPPORTED_EXAMPLE);
    assert_eq!(config.shutdown_timeout, Duration::from_secs(30));
    let admin = config.admin.as_ref().unwrap();
    assert_eq!(admin.bind, addr("127.0.0.1:9090"));
    assert_eq!(admin.token.as_deref(), Some("secret"));
    assert!(matches!(config.store, StoreConfig::Memory));

    assert_eq!(config.listeners.len(), 1);
    let web = &config.listeners[0];
    assert_eq!(web.name, "web");
    assert_eq!(web.bind, addr("127.0.0.1:8080"));
    assert_eq!(web.protocol, Protocol::Http);
    assert_eq!(web.pool, 0);
    assert!(web.proxy_protocol.is_none() && web.tls.is_none());
    assert_eq!(web.request_header_timeout, Duration::from_secs(10));
    assert_eq!(web.idle_timeout, Duration::from_secs(60));
    assert_eq!(web.write_timeout, Duration::from_secs(30));
    assert_eq!(web.body_timeout, Duration::from_secs(30));
    assert_eq!(web.tunnel_timeout, Duration::from_secs(3600));
    assert_eq!((web.max_header_size, web.max_headers), (64 * 1024, 100));
    assert_eq!(web.h2_max_concurrent_streams, 100);
    assert_eq!(
        (web.max_connections_per_ip, web.max_body_size),
        (None, None)
    );
    assert_eq!(web.max_connections, 10_000);

    assert_eq!(web.routes.len(), 2);
    let api_route = &web.routes[0].matcher;
    assert_eq!(api_route.path_prefix.as_deref(), Some("/api/"));
    assert!(api_route.path_regex.is_none() && api_route.host.is_none());
    let all = &web.routes[1].matcher;
    assert_eq!(all.host, Some(HostMatch::Suffix(".example.com".into())));
    assert_eq!(all.method, Some(http::Method::POST));
    assert_eq!(
        all.headers,
        vec![(http::HeaderName::from_static("x-version"), "2".into())]
    );
    assert_eq!(all.cookie, Some(("beta".into(), "1".into())));
    assert_eq!(all.query, vec![("v".into(), "2".into())]);
    let regex = all.path_regex.as_ref().unwrap();
    assert!(regex.is_match("/v2/users") && !regex.is_match("/api/v2/"));

    let app = &config.pools[0];
    assert_eq!(app.name, "app");
    assert_eq!(app.algorithm, Algorithm::RoundRobin);
    assert_eq!(app.hash_key, None);
    assert_eq!(app.servers.len(), 2);
    assert_eq!(app.servers[0].name, "127.0.0.1:9001");
    assert_eq!(app.servers[0].address, addr("127.0.0.1:9001"));
    assert_eq!(app.servers[0].weight, 1);
    assert_eq!(app.servers[1].weight, 2);
    assert_eq!(app.slow_start, None);
    assert_eq!(app.retries, 2);
    assert_eq!(app.connect_timeout, Duration::from_secs(3));
    assert_eq!(app.response_timeout, Duration::from_secs(30));
    assert!(app.health_check.is_none() && app.sticky.is_none());

    let api = &config.pools[1];
    assert_eq!(api.algorithm, Algorithm::WeightedRoundRobin);
    assert_eq!(api.servers[0].name, "api-1");
    assert_eq!(api.servers[0].weight, 3);
    assert_eq!(api.connect_timeout, Duration::from_millis(500));
    assert_eq!(api.response_timeout, Duration::from_secs(60));
    assert_eq!(config.pool_index("api"), Some(1));
}

#[test]
fn minimal_config_gets_every_default() {
    let config = ok(r#"
[[listeners]]
name = "web"
bind = "0.0.0.0:0"
protocol = "http"
pool = "app"

[[pools]]
name = "app"
servers = [{ address = "127.0.0.1:9001" }]
"#);
    assert_eq!(config.shutdown_timeout, Duration::from_secs(30));
    assert!(config.admin.is_none());
    assert!(matches!(config.store, StoreConfig::Memory));
    assert!(config.listeners[0].routes.is_empty());
    assert_eq!(config.pools[0].algorithm, Algorithm::RoundRobin);
    assert_eq!(config.pools[0].retries, 2);
}

#[test]
fn full_example_parses_when_every_feature_is_enabled() {
    let config = ok_all(FULL_EXAMPLE);
    match &config.store {
        StoreConfig::Redis {
            target: RedisTarget::Sentinel { master, nodes },
            key_prefix,
        } => {
            assert_eq!(master, "mymaster");
            assert_eq!(nodes, &["127.0.0.1:26379".to_owned()]);
            assert_eq!(key_prefix, "fulcrum");
        }
        other => panic!("{other:?}"),
    }
    let secure = &config.listeners[1];
    assert_eq!(secure.protocol, Protocol::Https);
    let tls = secure.tls.as_ref().unwrap();
    assert_eq!(tls.certs[0].cert, std::path::PathBuf::from("cert.pem"));
    assert_eq!(tls.certs[0].key, std::path::PathBuf::from("key.pem"));
    assert!(tls.server.is_none(), "validated without reading files");
    assert_eq!(config.listeners[2].proxy_protocol, Some(ProxyProtocol::V2));
    // TCP and UDP may share a port.
    assert_eq!(config.listeners[3].protocol, Protocol::Udp);

    let app = &config.pools[0];
    assert_eq!(app.slow_start, Some(Duration::from_secs(30)));
    let check = app.health_check.as_ref().unwrap();
    assert_eq!(check.kind, HealthCheckKind::Http);
    assert_eq!(check.path, "/health");
    assert_eq!(check.expect_status, (200, 399));
    assert_eq!(check.interval, Duration::from_secs(2));
    assert_eq!(check.timeout, Duration::from_secs(1));
    assert_eq!((check.rise, check.fall), (2, 3));
    let sticky = app.sticky.as_ref().unwrap();
    assert_eq!(sticky.kind, StickyKind::Cookie);
    assert_eq!(sticky.cookie, "FULCRUM_SRV");
    assert_eq!(sticky.ttl, Duration::from_secs(30 * 60));

    let api = &config.pools[1];
    assert_eq!(api.algorithm, Algorithm::Maglev);
    assert_eq!(
        api.hash_key,
        Some(HashKey::Header(http::HeaderName::from_static("x-user")))
    );
    let check = api.health_check.as_ref().unwrap();
    assert_eq!(check.kind, HealthCheckKind::Tcp);
    assert_eq!(check.path, "/health");
    assert_eq!(check.expect_status, (200, 399));
    let sticky = api.sticky.as_ref().unwrap();
    assert_eq!(sticky.kind, StickyKind::AppCookie);
    assert_eq!(sticky.cookie, "JSESSIONID");
}

#[test]
fn feature_defaults_when_every_feature_is_enabled() {
    let text = variant(
        "# POOL",
        "algorithm = \"consistent_hash\"\n[pools.sticky]\nkind = \"source_ip\"\n\
         [pools.health_check]\nkind = \"http\"\nexpect_status = 204",
    )
    .replace(
        "kind = \"memory\"",
        "kind = \"redis\"\nurl = \"rediss://cache:6380/2\"",
    );
    let config = ok_all(&text);
    let app = &config.pools[0];
    assert_eq!(app.hash_key, Some(HashKey::SourceIp));
    let sticky = app.sticky.as_ref().unwrap();
    assert_eq!(
        (sticky.kind, sticky.cookie.as_str()),
        (StickyKind::SourceIp, "")
    );
    assert_eq!(app.health_check.as_ref().unwrap().expect_status, (204, 204));
    assert!(matches!(
        &config.store,
        StoreConfig::Redis { target: RedisTarget::Url(url), key_prefix } if url == "rediss://cache:6380/2" && key_prefix == "fulcrum"
    ));
    // A sticky cookie defaults to FULCRUM_SRV.
    let text = variant("# POOL", "[pools.sticky]\nkind = \"cookie\"");
    let sticky = ok_all(&text).pools[0].sticky.clone().unwrap();
    assert_eq!(sticky.cookie, "FULCRUM_SRV");
}

#[test]
fn routes_resolve_pool_indices() {
    let text = variant(
        "# ROUTE",
        "\n  [[listeners.routes]]\n  host = \"example.com\"\n  pool = \"app\"",
    );
    let config = ok(&text);
    let web = &config.listeners[0];
    assert_eq!(web.pool, 0);
    assert_eq!(web.routes[0].pool, 1);
    assert_eq!(web.routes[1].pool, 0);
    assert_eq!(config.pools[web.routes[0].pool].name, "api");
}

#[test]
fn host_match_normalises_and_handles_wildcards() {
    let path = error::KeyPath::root("host");
    let host = |text: &str| validate::host_match(text, &path).map_err(|e| e.message);
    assert_eq!(
        host("Example.COM"),
        Ok(HostMatch::Exact("example.com".into()))
    );
    assert_eq!(
        host("example.com:8080"),
        Ok(HostMatch::Exact("example.com".into()))
    );
    assert_eq!(
        host("example.com."),
        Ok(HostMatch::Exact("example.com".into()))
    );
    assert_eq!(
        host("*.Example.com"),
        Ok(HostMatch::Suffix(".example.com".into()))
    );
    assert_eq!(
        host("*.example.com:443"),
        Ok(HostMatch::Suffix(".example.com".into()))
    );
    assert_eq!(host("[::1]:8080"), Ok(HostMatch::Exact("[::1]".into())));
    assert_eq!(host("10.0.0.1"), Ok(HostMatch::Exact("10.0.0.1".into())));
    for bad in [
        "",
        "*",
        "a.*.com",
        "*example.com",
        "exa mple.com",
        "example.com:http",
        "[::1",
    ] {
        assert!(host(bad).is_err(), "{bad:?} accepted");
    }
    let suffix = HostMatch::Suffix(".example.com".into());
    assert!(suffix.matches("a.example.com") && suffix.matches("a.b.example.com"));
    assert!(!suffix.matches("example.com") && !suffix.matches("badexample.com"));
    assert!(HostMatch::Exact("example.com".into()).matches("example.com"));
}

#[test]
fn host_wildcard_in_a_route() {
    let text = variant("# ROUTE", "host = \"*.API.example.com\"");
    let config = ok(&text);
    assert_eq!(
        config.listeners[0].routes[0].matcher.host,
        Some(HostMatch::Suffix(".api.example.com".into()))
    );
    let text = variant("# ROUTE", "host = \"api.*.com\"");
    assert_error(
        &err(&text),
        "listeners[0].routes[0].host",
        line_of(&text, "host ="),
        "wildcard",
    );
}

#[test]
fn expect_status_parsing() {
    let parse = validate::parse_status_range;
    assert_eq!(parse("200"), Ok((200, 200)));
    assert_eq!(parse("200-399"), Ok((200, 399)));
    assert_eq!(parse(" 200 - 204 "), Ok((200, 204)));
    assert_eq!(parse("100-599"), Ok((100, 599)));
    for bad in [
        "",
        "2xx",
        "99",
        "600",
        "200-600",
        "-",
        "200-",
        "abc",
        "200-300-400",
    ] {
        assert!(parse(bad).is_err(), "{bad:?} accepted");
    }
    assert!(parse("399-200").unwrap_err().contains("empty"));

    let text = variant(
        "# POOL",
        "[pools.health_check]\nkind = \"http\"\nexpect_status = \"200-700\"",
    );
    assert_error(
        &err_all(&text),
        "pools[0].health_check.expect_status",
        line_of(&text, "expect_status"),
        "from 100 to 599",
    );
}

#[test]
fn a_host_name_address_is_discovered_through_dns() {
    let text = BASE.replace("127.0.0.1:9001", "localhost:9001");
    let pool = &ok(&text).pools[0];
    assert!(pool.servers.iter().all(|s| s.name != "localhost:9001"));
    let dns = &pool.dns_servers[0];
    assert_eq!(
        (dns.name.as_str(), dns.host.as_str(), dns.port, dns.weight),
        ("localhost:9001", "localhost", 9001, 1)
    );
    assert_eq!(pool.resolve_interval, Duration::from_secs(30));
    let text = BASE.replace("127.0.0.1:9001", "[::1]:9001");
    assert_eq!(ok(&text).pools[0].servers[0].address, addr("[::1]:9001"));
    let text = BASE.replace("127.0.0.1:9001", "bad_host!:9001");
    assert_error(
        &err_all(&text),
        "pools[0].servers[0].address",
        line_of(&text, "bad_host!"),
        "invalid host name",
    );
}

#[test]
fn a_pool_may_discover_all_its_servers_through_srv() {
    let text =
        "[[listeners]]\nname = \"l\"\nbind = \"127.0.0.1:1\"\nprotocol = \"http\"\npool = \"p\"\n\
         [dns]\nnameservers = [\"127.0.0.1:5353\"]\n\
         [[pools]]\nname = \"p\"\ndns_srv = \"_http._tcp.app.test\"\nresolve_interval = \"1s\"\n\
         deregistration_delay = \"5s\"\nsaturation_target = 8\n"
            .to_string();
    let cfg = ok(&text);
    assert_eq!(cfg.dns_nameservers, vec![addr("127.0.0.1:5353")]);
    let pool = &cfg.pools[0];
    assert_eq!(pool.dns_srv.as_deref(), Some("_http._tcp.app.test"));
    assert!(pool.servers.is_empty());
    assert_eq!(pool.resolve_interval, Duration::from_secs(1));
    assert_eq!(pool.deregistration_delay, Duration::from_secs(5));
    assert_eq!(pool.saturation_target, 8);
    let bad = text.replace("\"1s\"", "\"10ms\"");
    assert_error(
        &err_all(&bad),
        "pools[0].resolve_interval",
        line_of(&bad, "resolve_interval"),
        "at least 100ms",
    );
}

#[test]
fn limits_take_sizes_with_units_and_name_the_key_when_wrong() {
    let text = variant(
        "# LISTENER",
        "max_header_size = \"16KiB\"\nmax_body_size = \"10MB\"\nmax_connections_per_ip = 8",
    );
    let web = &ok(&text).listeners[0];
    assert_eq!(web.max_header_size, 16 * 1024);
    assert_eq!(web.max_body_size, Some(10_000_000));
    assert_eq!(web.max_connections_per_ip, Some(8));
    for (value, fragment) in [
        ("\"12 parsecs\"", "invalid size"),
        ("\"2KiB\"", "must be from"),
    ] {
        let text = variant("# LISTENER", &format!("max_header_size = {value}"));
        assert_error(
            &err_all(&text),
            "listeners[0].max_header_size",
            line_of(&text, "max_header_size"),
            fragment,
        );
    }
    let text = variant("# ROUTE", "max_body_size = -1");
    assert_error(
        &err_all(&text),
        "listeners[0].routes[0].max_body_size",
        line_of(&text, "max_body_size"),
        "negative",
    );
}

#[test]
fn the_sticky_cookie_secret_must_be_long_enough() {
    let text = variant(
        "# POOL",
        "[pools.sticky]\nkind = \"cookie\"\nsecret = \"short\"",
    );
    assert_error(
        &err_all(&text),
        "pools[0].sticky.secret",
        line_of(&text, "secret"),
        "at least 16",
    );
    let text = variant(
        "# POOL",
        "[pools.sticky]\nkind = \"cookie\"\nsecret = \"sixteen-chars-ok\"",
    );
    let sticky = ok(&text).pools[0].sticky.clone().unwrap();
    assert_eq!(sticky.secret.as_deref(), Some("sixteen-chars-ok"));
}

#[test]
fn an_admin_reachable_from_other_hosts_needs_a_token() {
    let text = variant("bind = \"127.0.0.1:9090\"", "bind = \"0.0.0.0:9090\"");
    assert_error(
        &err_all(&text),
        "admin.bind",
        line_of(&text, "0.0.0.0:9090"),
        "set admin.token",
    );
    let text = variant(
        "bind = \"127.0.0.1:9090\"",
        "bind = \"0.0.0.0:9090\"\ntoken = \"s3cret\"",
    );
    assert_eq!(ok(&text).admin.unwrap().token.as_deref(), Some("s3cret"));
}

#[test]
fn shutdown_timeout_may_be_zero() {
    let text = format!("shutdown_timeout = \"0s\"\n{BASE}");
    assert_eq!(ok(&text).shutdown_timeout, Duration::ZERO);
}

// ---- errors: syntax, unknown keys, types ----

#[test]
fn syntax_error_has_line_and_column() {
    let text = "[admin]\nbind = \"127.0.0.1:9090\"\ntoken = \n";
    let e = err(text);
    assert_eq!((e.line, e.column), (Some(3), Some(9)));
    assert_eq!(e.key, None);
    assert!(e.to_string().starts_with("fulcrum.toml:3:9: "), "{e}");
    assert!(!e.message.contains('\n'), "{e}");
}

#[test]
fn unknown_key_is_named_with_its_line() {
    let text = variant("# LISTENER", "pools = \"app\"");
    let e = err(&text);
    assert_error(
        &e,
        "listeners[0].pools",
        line_of(&text, "pools = "),
        "unknown key `pools`, expected one of",
    );
    assert!(e.message.contains("`pool`"), "{e}");
    // In an inline table inside an array.
    let text = BASE.replace("weight = 2", "wieght = 2");
    assert_error(
        &err(&text),
        "pools[0].servers[1].wieght",
        23,
        "unknown key `wieght`",
    );
    // At the top level.
    let text = format!("listeners_extra = 1\n{BASE}");
    assert_error(
        &err(&text),
        "listeners_extra",
        line_of(&text, "listeners_extra"),
        "unknown key",
    );
    // In a sub-table.
    let text = variant(
        "# POOL",
        "[pools.health_check]\nkind = \"tcp\"\nintervall = \"2s\"",
    );
    assert_error(
        &err(&text),
        "pools[0].health_check.intervall",
        line_of(&text, "intervall"),
        "unknown key",
    );
}

#[test]
fn type_error_names_key_and_line() {
    let text = BASE.replace("weight = 2", "weight = \"2\"");
    assert_error(
        &err(&text),
        "pools[0].servers[1].weight",
        23,
        "expected an integer",
    );
    let text = variant("# LISTENER", "idle_timeout = 60");
    assert_error(
        &err(&text),
        "listeners[0].idle_timeout",
        line_of(&text, "idle_timeout"),
        "expected a duration string",
    );
    let text = BASE.replace(
        "servers = [{ address = \"127.0.0.1:9101\" }]",
        "servers = \"127.0.0.1:9101\"",
    );
    assert_error(
        &err(&text),
        "pools[1].servers",
        line_of(&text, "servers = \"127"),
        "expected an array",
    );
}

#[test]
fn unknown_value_lists_the_allowed_ones() {
    let text = BASE.replace("protocol = \"http\"", "protocol = \"htp\"");
    assert_error(
        &err(&text),
        "listeners[0].protocol",
        10,
        "unknown value `htp`, expected one of `http`, `https`, `tcp`, `udp`",
    );
    let text = variant("# POOL", "algorithm = \"fastest\"");
    assert_error(
        &err(&text),
        "pools[0].algorithm",
        line_of(&text, "algorithm"),
        "`weighted_round_robin`",
    );
}

#[test]
fn missing_required_key_names_its_table() {
    let text = BASE.replace("bind = \"127.0.0.1:8080\"\n", "");
    assert_error(
        &err(&text),
        "listeners[0]",
        7,
        "missing required key `bind`",
    );
    let text = BASE.replace("  { address = \"127.0.0.1:9001\" },", "  { weight = 1 },");
    assert_error(
        &err(&text),
        "pools[0].servers[0]",
        22,
        "missing required key `address`",
    );
}

#[test]
fn listeners_and_pools_are_required() {
    let e = err("[[pools]]\nname = \"app\"\nservers = [{ address = \"127.0.0.1:9001\" }]\n");
    assert_eq!(
        e.to_string(),
        "fulcrum.toml: listeners: at least one [[listeners]] table is required"
    );
    let e = err("listeners = []\npools = []\n");
    assert_eq!(e.key.as_deref(), Some("pools"));
    assert_eq!(e.line, Some(2));
}

// ---- errors: semantics ----

#[test]
fn weight_out_of_range() {
    let text = BASE.replace("weight = 2", "weight = 0");
    let e = err(&text);
    assert_eq!(e.line, Some(23));
    assert!(
        e.to_string()
            .starts_with("fulcrum.toml:23:33: pools[0].servers[1].weight: must be at least 1"),
        "{e}"
    );
    let text = BASE.replace("weight = 2", "weight = 1000001");
    assert_error(
        &err(&text),
        "pools[0].servers[1].weight",
        23,
        "must be at most 1000000",
    );
}

#[test]
fn duplicate_names_are_rejected() {
    let text = BASE.replace("name = \"api\"", "name = \"app\"");
    assert_error(
        &err(&text),
        "pools[1].name",
        line_of(&text, "name = \"app\"\nservers = [{"),
        "duplicate pool name `app`",
    );

    let text = BASE.replace("127.0.0.1:9002", "127.0.0.1:9001");
    assert_error(
        &err(&text),
        "pools[0].servers[1].address",
        23,
        "duplicate server name `127.0.0.1:9001`",
    );
    let text = BASE.replace(
        "{ address = \"127.0.0.1:9002\"",
        "{ name = \"127.0.0.1:9001\", address = \"127.0.0.1:9002\"",
    );
    assert_error(
        &err(&text),
        "pools[0].servers[1].name",
        23,
        "duplicate server name",
    );

    let text = format!(
        "{BASE}\n[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:8081\"\nprotocol = \"http\"\npool = \"app\"\n"
    );
    assert_error(
        &err(&text),
        "listeners[1].name",
        line_of(&text, "name = \"web\"\nbind = \"127.0.0.1:8081"),
        "duplicate listener name `web`",
    );
}

/// `BASE` plus a second listener `two` on `bind` with `protocol`.
fn second_listener(bind: &str, protocol: &str) -> String {
    format!("{BASE}\n[[listeners]]\nname = \"two\"\nbind = \"{bind}\"\nprotocol = \"{protocol}\"\npool = \"app\"\n")
}

#[test]
fn duplicate_bind_addresses_are_rejected() {
    let line = |text: &str| line_of(text, "name = \"two\"") + 1;
    let text = second_listener("127.0.0.1:8080", "http");
    assert_error(
        &err(&text),
        "listeners[1].bind",
        line(&text),
        "already used by listeners[0].bind",
    );
    let text = second_listener("0.0.0.0:8080", "http");
    assert_error(
        &err(&text),
        "listeners[1].bind",
        line(&text),
        "already used by listeners[0].bind",
    );
    let text = second_listener("127.0.0.1:9090", "http");
    assert_error(
        &err(&text),
        "listeners[1].bind",
        line(&text),
        "already used by admin.bind",
    );
    // Different IPs, port 0 (any free port), or UDP next to TCP do not conflict.
    ok(&second_listener("127.0.0.2:8080", "http"));
    ok(&BASE.replace("127.0.0.1:8080", "127.0.0.1:0").replace(
        "[admin]\nbind = \"127.0.0.1:9090\"",
        "[admin]\nbind = \"127.0.0.1:0\"",
    ));
    ok_all(&second_listener("127.0.0.1:8080", "udp"));
    err_all(&second_listener("127.0.0.1:8080", "tcp"));
}

#[test]
fn unknown_pool_reference_lists_defined_pools() {
    let text = BASE.replace("pool = \"app\"", "pool = \"ap\"");
    assert_error(
        &err(&text),
        "listeners[0].pool",
        11,
        "no pool named `ap`; defined pools: `app`, `api`",
    );
    let text = BASE.replace("pool = \"api\"", "pool = \"apii\"");
    assert_error(
        &err(&text),
        "listeners[0].routes[0].pool",
        16,
        "no pool named `apii`",
    );
}

#[test]
fn empty_servers_are_rejected() {
    let text = BASE.replace(
        "servers = [{ address = \"127.0.0.1:9101\" }]",
        "servers = []",
    );
    assert_error(
        &err(&text),
        "pools[1].servers",
        line_of(&text, "servers = []"),
        "at least one server",
    );
    // A missing `servers` is placed at its pool.
    let text = BASE.replace("servers = [{ address = \"127.0.0.1:9101\" }]", "");
    assert_error(&err(&text), "pools[1].servers", 27, "at least one server");
}

#[test]
fn bad_socket_addresses_are_rejected() {
    let text = BASE.replace("127.0.0.1:8080", "localhost:8080");
    assert_error(&err(&text), "listeners[0].bind", 9, "expected IP:PORT");
    let text = BASE.replace("127.0.0.1:9090", "127.0.0.1");
    assert_error(
        &err(&text),
        "admin.bind",
        2,
        "invalid address \"127.0.0.1\"",
    );
    for bad in ["nonsense", "127.0.0.1:0", "::1:9001", "127.0.0.1:99999"] {
        let text = BASE.replace("127.0.0.1:9101", bad);
        assert_error(&err(&text), "pools[1].servers[0].address", 29, bad);
    }
}

#[test]
fn durations_are_checked() {
    let text = variant("# LISTENER", "request_header_timeout = \"10 parsecs\"");
    assert_error(
        &err(&text),
        "listeners[0].request_header_timeout",
        12,
        "invalid duration \"10 parsecs\"",
    );
    let text = variant("# LISTENER", "request_header_timeout = \"0s\"");
    assert_error(
        &err(&text),
        "listeners[0].request_header_timeout",
        12,
        "must be greater than zero",
    );
    let text = variant("# POOL", "connect_timeout = \"0ms\"");
    assert_error(
        &err(&text),
        "pools[0].connect_timeout",
        25,
        "must be greater than zero",
    );
    let text = variant("# POOL", "response_timeout = \"5\"");
    assert_error(
        &err(&text),
        "pools[0].response_timeout",
        25,
        "invalid duration",
    );
    let text = format!("shutdown_timeout = \"soon\"\n{BASE}");
    assert_error(&err(&text), "shutdown_timeout", 1, "invalid duration");
    let text = variant(
        "# POOL",
        "[pools.health_check]\nkind = \"tcp\"\ninterval = \"0s\"",
    );
    assert_error(
        &err_all(&text),
        "pools[0].health_check.interval",
        27,
        "must be greater than zero",
    );
    let text = variant(
        "# POOL",
        "[pools.sticky]\nkind = \"source_ip\"\nttl = \"0s\"",
    );
    assert_error(
        &err_all(&text),
        "pools[0].sticky.ttl",
        27,
        "must be greater than zero",
    );
    let text = variant("# POOL", "slow_start = \"0s\"");
    assert_error(
        &err_all(&text),
        "pools[0].slow_start",
        25,
        "must be greater than zero",
    );
}

#[test]
fn integer_ranges_are_checked() {
    let text = variant("# POOL", "retries = 11");
    assert_error(&err(&text), "pools[0].retries", 25, "must be at most 10");
    let text = variant("# POOL", "retries = -1");
    assert_error(&err(&text), "pools[0].retries", 25, "must be at least 0");
    let text = variant("# LISTENER", "max_connections = 0");
    assert_error(
        &err(&text),
        "listeners[0].max_connections",
        12,
        "must be at least 1",
    );
    let text = variant("# POOL", "[pools.health_check]\nkind = \"tcp\"\nrise = 0");
    assert_error(
        &err_all(&text),
        "pools[0].health_check.rise",
        27,
        "must be at least 1",
    );
    let text = variant("# POOL", "[pools.health_check]\nkind = \"tcp\"\nfall = 0");
    assert_error(
        &err_all(&text),
        "pools[0].health_check.fall",
        27,
        "must be at least 1",
    );
    // A timeout longer than the interval is allowed.
    ok_all(&variant(
        "# POOL",
        "[pools.health_check]\nkind = \"tcp\"\ninterval = \"1s\"\ntimeout = \"5s\"",
    ));
}

#[test]
fn health_check_rules() {
    let text = variant(
        "# POOL",
        "[pools.health_check]\nkind = \"http\"\npath = \"health\"",
    );
    assert_error(
        &err_all(&text),
        "pools[0].health_check.path",
        27,
        "must start with '/'",
    );
    let text = variant(
        "# POOL",
        "[pools.health_check]\nkind = \"tcp\"\npath = \"/health\"",
    );
    assert_error(
        &err_all(&text),
        "pools[0].health_check.path",
        27,
        "only valid with kind = \"http\"",
    );
    let text = variant(
        "# POOL",
        "[pools.health_check]\nkind = \"icmp\"\nexpect_status = \"200\"",
    );
    assert_error(
        &err_all(&text),
        "pools[0].health_check.expect_status",
        27,
        "only valid with kind = \"http\"",
    );
    let text = variant(
        "# POOL",
        "[pools.health_check]\nkind = \"http\"\nservice = \"app\"",
    );
    assert_error(
        &err_all(&text),
        "pools[0].health_check.service",
        27,
        "only valid with kind = \"grpc\" (this check is http)",
    );
    let text = variant(
        "# POOL",
        "[pools.health_check]\nkind = \"grpc\"\npath = \"/health\"",
    );
    assert_error(
        &err_all(&text),
        "pools[0].health_check.path",
        27,
        "only valid with kind = \"http\" (this check is grpc)",
    );
    let config = ok_all(&variant(
        "# POOL",
        "[pools.health_check]\nkind = \"grpc\"\nservice = \"echo.Echo\"",
    ));
    let check = config.pools[0].health_check.as_ref().unwrap();
    assert_eq!(check.kind, HealthCheckKind::Grpc);
    assert_eq!(check.service, "echo.Echo");
    let config = ok_all(&variant("# POOL", "[pools.health_check]\nkind = \"grpc\""));
    assert_eq!(config.pools[0].health_check.as_ref().unwrap().service, "");
    let text = variant("# POOL", "[pools.health_check]\nkind = \"ping\"");
    assert_error(
        &err_all(&text),
        "pools[0].health_check.kind",
        26,
        "unknown value `ping`",
    );
    let text = variant("# POOL", "[pools.health_check]\ninterval = \"2s\"");
    assert_error(
        &err_all(&text),
        "pools[0].health_check",
        25,
        "missing required key `kind`",
    );
}

#[test]
fn hash_key_rules() {
    let text = variant("# POOL", "hash_key = \"source_ip\"");
    assert_error(
        &err_all(&text),
        "pools[0].hash_key",
        25,
        "only used by the ip_hash, consistent_hash and maglev algorithms",
    );
    let text = variant(
        "# POOL",
        "algorithm = \"consistent_hash\"\nhash_key = \"body\"",
    );
    assert_error(
        &err_all(&text),
        "pools[0].hash_key",
        26,
        "unknown hash key \"body\"",
    );
    let text = variant(
        "# POOL",
        "algorithm = \"maglev\"\nhash_key = \"header:bad header\"",
    );
    assert_error(
        &err_all(&text),
        "pools[0].hash_key",
        26,
        "invalid header name",
    );
    let text = variant("# POOL", "algorithm = \"maglev\"\nhash_key = \"cookie:\"");
    assert_error(
        &err_all(&text),
        "pools[0].hash_key",
        26,
        "invalid cookie name",
    );
    let text = variant("# POOL", "algorithm = \"ip_hash\"\nhash_key = \"uri\"");
    assert_error(
        &err_all(&text),
        "pools[0].hash_key",
        26,
        "ip_hash hashes the client address",
    );
    let hash_key = |key: &str| {
        let text = variant(
            "# POOL",
            &format!("algorithm = \"consistent_hash\"\nhash_key = \"{key}\""),
        );
        ok_all(&text).pools[0].hash_key.clone().unwrap()
    };
    assert_eq!(hash_key("source_ip_port"), HashKey::SourceIpPort);
    assert_eq!(hash_key("uri"), HashKey::Uri);
    assert_eq!(
        hash_key("cookie:SESSIONID"),
        HashKey::Cookie("SESSIONID".into())
    );
    let text = variant("# POOL", "algorithm = \"ip_hash\"");
    assert_eq!(ok_all(&text).pools[0].hash_key, Some(HashKey::SourceIp));
}

#[test]
fn sticky_rules() {
    let text = variant("# POOL", "[pools.sticky]\nkind = \"app_cookie\"");
    assert_error(
        &err_all(&text),
        "pools[0].sticky.cookie",
        25,
        "required with kind = \"app_cookie\"",
    );
    let text = variant(
        "# POOL",
        "[pools.sticky]\nkind = \"source_ip\"\ncookie = \"X\"",
    );
    assert_error(
        &err_all(&text),
        "pools[0].sticky.cookie",
        27,
        "not used with kind = \"source_ip\"",
    );
    let text = variant(
        "# POOL",
        "[pools.sticky]\nkind = \"cookie\"\ncookie = \"a b\"",
    );
    assert_error(
        &err_all(&text),
        "pools[0].sticky.cookie",
        27,
        "invalid cookie name",
    );
    let text = variant(
        "# POOL",
        "[pools.sticky]\nkind = \"cookie\"\nload_bound = 0.5",
    );
    assert_error(
        &err_all(&text),
        "pools[0].sticky.load_bound",
        27,
        "must be between 1.0 and 100.0",
    );
    let text = variant(
        "# POOL",
        "[pools.sticky]\nkind = \"cookie\"\nload_bound = 1.25",
    );
    let cfg = ok_all(&text);
    assert_eq!(
        cfg.pools[0].sticky.as_ref().unwrap().load_bound_pct,
        Some(125)
    );
}

#[test]
fn route_rules() {
    let text = variant("  path_prefix = \"/api/\"\n", "");
    assert_error(
        &err(&text),
        "listeners[0].routes[0]",
        14,
        "a route needs at least one match key",
    );
    let text = variant("  path_prefix = \"/api/\"\n", "  headers = {}\n");
    assert_error(
        &err(&text),
        "listeners[0].routes[0]",
        14,
        "at least one match key",
    );
    let text = variant("\"/api/\"", "\"api/\"");
    assert_error(
        &err(&text),
        "listeners[0].routes[0].path_prefix",
        15,
        "must start with '/'",
    );
    let text = variant("# ROUTE", "path_regex = \"^/(api\"");
    assert_error(
        &err(&text),
        "listeners[0].routes[0].path_regex",
        17,
        "invalid regex \"^/(api\": unclosed group",
    );
    let text = variant("# ROUTE", "method = \"get\"");
    assert_error(
        &err(&text),
        "listeners[0].routes[0].method",
        17,
        "write \"GET\"",
    );
    let text = variant("# ROUTE", "method = \"PURGE\"");
    assert_eq!(
        ok(&text).listeners[0].routes[0]
            .matcher
            .method
            .as_ref()
            .map(|m| m.as_str()),
        Some("PURGE")
    );
    let text = variant("# ROUTE", "headers = { \"x version\" = \"2\" }");
    assert_error(
        &err(&text),
        "listeners[0].routes[0].headers.\"x version\"",
        17,
        "invalid header name",
    );
    let text = variant("# ROUTE", "headers = { \"X-A\" = \"1\", \"x-a\" = \"2\" }");
    assert_error(
        &err(&text),
        "listeners[0].routes[0].headers.x-a",
        17,
        "listed twice",
    );
    let text = variant("# ROUTE", "cookie = { name = \"beta\", value = \"a;b\" }");
    assert_error(
        &err(&text),
        "listeners[0].routes[0].cookie.value",
        17,
        "cannot contain",
    );
    let text = variant("# ROUTE", "cookie = { name = \"beta\" }");
    assert_error(
        &err(&text),
        "listeners[0].routes[0].cookie",
        17,
        "missing required key `value`",
    );
}

#[test]
fn protocol_specific_keys() {
    // Routes: HTTP match keys on http/https listeners, `sni` on tcp ones, none on udp.
    let text = BASE.replace("protocol = \"http\"", "protocol = \"tcp\"");
    assert_error(
        &err_all(&text),
        "listeners[0].routes[0].path_prefix",
        15,
        "tcp routes match on `sni` only",
    );
    let text = BASE.replace("protocol = \"http\"", "protocol = \"udp\"");
    assert_error(
        &err_all(&text),
        "listeners[0].routes",
        14,
        "only valid on http, https and tcp listeners",
    );
    let text = BASE.replace("path_prefix = \"/api/\"", "sni = \"*.example.com\"");
    assert_error(
        &err_all(&text),
        "listeners[0].routes[0].sni",
        15,
        "only valid on tcp listeners",
    );
    let text = BASE
        .replace("protocol = \"http\"", "protocol = \"tcp\"")
        .replace("path_prefix = \"/api/\"", "sni = \"*.example.com\"");
    let tcp = ok_all(&text);
    assert_eq!(
        tcp.listeners[0].routes[0].matcher.sni,
        Some(HostMatch::Suffix(".example.com".into()))
    );
    assert_eq!(tcp.listeners[0].idle_timeout, Duration::from_secs(3600));
    assert_eq!(tcp.listeners[0].hello_timeout, Duration::from_secs(5));
    let without_routes = |protocol: &str, extra: &str| {
        let start = BASE.find("\n  [[listeners.routes]]").unwrap();
        let end = BASE.find("# ROUTE\n").unwrap() + "# ROUTE\n".len();
        let text = format!("{}{}", &BASE[..start], &BASE[end..]);
        text.replace("protocol = \"http\"", &format!("protocol = \"{protocol}\""))
            .replace("# LISTENER", extra)
    };
    // tls is required iff https.
    let text = without_routes("https", "");
    assert_error(
        &err_all(&text),
        "listeners[0].tls",
        7,
        "required with protocol = \"https\"",
    );
    let text = without_routes("http", "tls = { cert = \"c.pem\", key = \"k.pem\" }");
    assert_error(
        &err_all(&text),
        "listeners[0].tls",
        12,
        "only valid on https listeners",
    );
    let text = without_routes("https", "tls = { cert = \"c.pem\" }");
    assert_error(
        &err_all(&text),
        "listeners[0].tls.key",
        12,
        "required with `cert`",
    );
    for (tls, key, message) in [
        ("tls = { }", "listeners[0].tls.cert", "required"),
        (
            "tls = { cert = \"a\", key = \"b\", certs = [] }",
            "listeners[0].tls.certs",
            "not both",
        ),
        (
            "tls = { certs = [] }",
            "listeners[0].tls.certs",
            "at least one",
        ),
        (
            "tls = { certs = [{ cert = \"a\", key = \"\" }] }",
            "listeners[0].tls.certs[0].key",
            "must not be empty",
        ),
        (
            "tls = { cert = \"a\", key = \"b\", client_auth = \"optional\" }",
            "listeners[0].tls.client_auth",
            "only valid with `client_ca`",
        ),
        (
            "tls = { cert = \"a\", key = \"b\", min_version = \"1.1\" }",
            "listeners[0].tls.min_version",
            "must be \"1.2\" or \"1.3\"",
        ),
        (
            "tls = { cert = \"a\", key = \"b\", handshake_timeout = \"0s\" }",
            "listeners[0].tls.handshake_timeout",
            "",
        ),
    ] {
        assert_error(&err_all(&without_routes("https", tls)), key, 12, message);
    }
    let tls = ok_all(&without_routes(
        "https",
        "tls = { certs = [{ cert = \"a\", key = \"b\" }, { cert = \"c\", key = \"d\" }], \
         client_ca = \"ca\", client_auth = \"optional\", min_version = \"1.3\", hsts = \"365d\", \
         resumption = false, handshake_timeout = \"3s\" }",
    ))
    .listeners[0]
        .tls
        .clone()
        .unwrap();
    assert_eq!(tls.certs.len(), 2);
    assert_eq!(tls.client_auth, ClientAuth::Optional);
    assert_eq!(tls.min_version, TlsVersion::Tls13);
    assert_eq!(tls.hsts, Some(Duration::from_secs(365 * 86400)));
    assert!(!tls.resumption);
    assert_eq!(tls.handshake_timeout, Duration::from_secs(3));
    // https_redirect only on http.
    let text = without_routes("tcp", "https_redirect = true");
    assert_error(
        &err_all(&text),
        "listeners[0].https_redirect",
        12,
        "only valid on http listeners",
    );
    let text = without_routes("http", "https_redirect = 70000");
    assert_error(&err_all(&text), "listeners[0].https_redirect", 12, "a port");
    assert_eq!(
        ok_all(&without_routes("http", "https_redirect = true")).listeners[0].https_redirect,
        Some(443)
    );
    assert_eq!(
        ok_all(&without_routes("http", "https_redirect = 8443")).listeners[0].https_redirect,
        Some(8443)
    );
    // proxy_protocol only on tcp.
    let text = without_routes("udp", "proxy_protocol = \"v1\"");
    assert_error(
        &err_all(&text),
        "listeners[0].proxy_protocol",
        12,
        "only valid on tcp listeners",
    );
    let text = without_routes("tcp", "proxy_protocol = \"v3\"");
    assert_error(
        &err_all(&text),
        "listeners[0].proxy_protocol",
        12,
        "unknown value `v3`",
    );
    let text = without_routes("tcp", "proxy_protocol = \"v1\"");
    assert_eq!(
        ok_all(&text).listeners[0].proxy_protocol,
        Some(ProxyProtocol::V1)
    );
    // request_header_timeout is about HTTP.
    let text = without_routes("tcp", "request_header_timeout = \"5s\"");
    assert_error(
        &err_all(&text),
        "listeners[0].request_header_timeout",
        12,
        "only valid on http and https",
    );
}

#[test]
fn store_rules() {
    let store = |keys: &str| variant("kind = \"memory\"", keys);
    let text = store("kind = \"memory\"\nurl = \"redis://127.0.0.1\"");
    assert_error(
        &err(&text),
        "store.url",
        6,
        "only valid with kind = \"redis\"",
    );
    let text = store("url = \"redis://127.0.0.1\"");
    assert_error(
        &err(&text),
        "store.url",
        5,
        "only valid with kind = \"redis\"",
    );
    let text = store("kind = \"redis\"");
    assert_error(
        &err_all(&text),
        "store.kind",
        5,
        "needs `url` (one node) or `sentinel`",
    );
    let text = store(
        "kind = \"redis\"\nurl = \"redis://a\"\nsentinel = { master = \"m\", nodes = [\"a:1\"] }",
    );
    assert_error(
        &err_all(&text),
        "store.sentinel",
        7,
        "either `url` or `sentinel`, not both",
    );
    let text = store("kind = \"redis\"\nurl = \"http://127.0.0.1:6379\"");
    assert_error(
        &err_all(&text),
        "store.url",
        6,
        "must start with redis:// or rediss://",
    );
    let text = store("kind = \"redis\"\nsentinel = { master = \"m\", nodes = [] }");
    assert_error(
        &err_all(&text),
        "store.sentinel.nodes",
        6,
        "at least one Sentinel",
    );
    let text = store("kind = \"redis\"\nsentinel = { master = \"m\", nodes = [\"a:1\", \"b\"] }");
    assert_error(
        &err_all(&text),
        "store.sentinel.nodes[1]",
        6,
        "expected HOST:PORT",
    );
    let text = store("kind = \"redis\"\nurl = \"redis://a\"\nkey_prefix = \"\"");
    assert_error(&err_all(&text), "store.key_prefix", 7, "must not be empty");
    let text = store("kind = \"redis\"\nurl = \"redis://a\"\nkey_prefix = \"lb1\"");
    assert!(
        matches!(ok_all(&text).store, StoreConfig::Redis { key_prefix, .. } if key_prefix == "lb1")
    );

    // A Redis Cluster: seed nodes as HOST:PORT or URLs, nothing of the one-node keys.
    let text = store(
        "kind = \"redis_cluster\"\nnodes = [\"127.0.0.1:7000\", \"redis://:pw@10.0.0.2:7001\"]",
    );
    assert!(matches!(
        ok_all(&text).store,
        StoreConfig::Redis { target: RedisTarget::Cluster { nodes }, key_prefix }
            if nodes.len() == 2 && key_prefix == "fulcrum"
    ));
    let text = store("kind = \"redis_cluster\"");
    assert_error(
        &err_all(&text),
        "store.kind",
        5,
        "needs `nodes`: at least one node of the cluster",
    );
    let text = store("kind = \"redis_cluster\"\nnodes = [\"127.0.0.1:7000\", \"b\"]");
    assert_error(
        &err_all(&text),
        "store.nodes[1]",
        6,
        "invalid cluster node \"b\"",
    );
    let text = store("kind = \"redis_cluster\"\nnodes = [\"a:1\"]\nurl = \"redis://a\"");
    assert_error(
        &err_all(&text),
        "store.url",
        7,
        "not valid with kind = \"redis_cluster\"",
    );
    let text = store("kind = \"redis\"\nurl = \"redis://a\"\nnodes = [\"a:1\"]");
    assert_error(
        &err_all(&text),
        "store.nodes",
        7,
        "only valid with kind = \"redis_cluster\"",
    );
    let text = store("kind = \"redis_cluster\"\nnodes = []");
    assert_error(&err_all(&text), "store.nodes", 6, "at least one node");
    let text = store("nodes = [\"a:1\"]");
    assert_error(&err(&text), "store.nodes", 5, "only valid with kind");
}

#[test]
fn admin_token_must_not_be_empty() {
    let text = variant(
        "bind = \"127.0.0.1:9090\"",
        "bind = \"127.0.0.1:9090\"\ntoken = \"\"",
    );
    assert_error(&err(&text), "admin.token", 3, "must not be empty");
}

#[test]
fn names_are_checked() {
    let text = BASE.replace("name = \"api\"", "name = \"a/b\"");
    assert_error(&err(&text), "pools[1].name", 28, "'/'");
    let text = BASE.replace("name = \"web\"", "name = \"\"");
    assert_error(&err(&text), "listeners[0].name", 8, "must not be empty");
}

// ---- every feature of the schema is built ----

#[test]
fn every_feature_is_accepted() {
    // What is built is accepted.
    ok(&variant("# POOL", "[pools.sticky]\nkind = \"source_ip\""));
    ok(&variant(
        "kind = \"memory\"",
        "kind = \"redis\"\nurl = \"redis://127.0.0.1:6379\"",
    ));
    for kind in ["icmp", "tcp", "http", "grpc"] {
        ok(&variant(
            "# POOL",
            &format!("slow_start = \"30s\"\n[pools.health_check]\nkind = \"{kind}\""),
        ));
    }
    for algorithm in Algorithm::ALL {
        ok(&variant(
            "# POOL",
            &format!("algorithm = \"{}\"", algorithm.as_str()),
        ));
    }
    ok(&variant(
        "# POOL",
        "algorithm = \"maglev\"\nhash_key = \"uri\"",
    ));
}

// ---- loading and display ----

#[test]
fn load_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.toml");
    let e = load(&missing).unwrap_err();
    assert_eq!(e.origin, missing.display().to_string());
    assert!(
        e.to_string()
            .starts_with(&format!("{}: cannot read", missing.display())),
        "{e}"
    );

    let path = dir.path().join("fulcrum.toml");
    std::fs::write(&path, BASE.replace("weight = 2", "weight = 0")).unwrap();
    let e = load(&path).unwrap_err();
    assert!(
        e.to_string()
            .starts_with(&format!("{}:23:", path.display())),
        "{e}"
    );
    std::fs::write(&path, BASE).unwrap();
    assert_eq!(load(&path).unwrap().pools.len(), 2);
}

#[test]
fn display_leaves_out_unknown_parts() {
    let mut e = ConfigError {
        origin: "f.toml".into(),
        key: Some("pools[0].name".into()),
        line: Some(3),
        column: Some(1),
        message: "bad".into(),
    };
    assert_eq!(e.to_string(), "f.toml:3:1: pools[0].name: bad");
    e.column = None;
    assert_eq!(e.to_string(), "f.toml:3: pools[0].name: bad");
    e.line = None;
    e.key = None;
    assert_eq!(e.to_string(), "f.toml: bad");
}

#[test]
fn algorithm_names_round_trip() {
    for algorithm in Algorithm::ALL {
        let text = variant("# POOL", &format!("algorithm = \"{}\"", algorithm.as_str()));
        assert_eq!(ok_all(&text).pools[0].algorithm, algorithm);
    }
}

#[test]
fn hash_balance_factor_and_fallback_rules() {
    let cfg = ok(&variant(
        "# POOL",
        "algorithm = \"consistent_hash\"\nhash_key = \"cookie:uid\"\nhash_balance_factor = 150\nhash_fallback = \"least_connections\"",
    ));
    let pool = &cfg.pools[0];
    assert_eq!(pool.hash_balance_factor, Some(150));
    assert_eq!(pool.hash_fallback, Algorithm::LeastConnections);
    let plain = ok(&variant("# POOL", "algorithm = \"maglev\""));
    assert_eq!(plain.pools[0].hash_fallback, Algorithm::RoundRobin);
    assert_eq!(plain.pools[0].hash_balance_factor, None);

    let text = variant(
        "# POOL",
        "algorithm = \"maglev\"\nhash_balance_factor = 150",
    );
    assert_error(
        &err(&text),
        "pools[0].hash_balance_factor",
        line_of(&text, "hash_balance_factor"),
        "only used by the consistent_hash algorithm",
    );
    let text = variant(
        "# POOL",
        "algorithm = \"consistent_hash\"\nhash_balance_factor = 100",
    );
    assert_error(
        &err(&text),
        "pools[0].hash_balance_factor",
        line_of(&text, "hash_balance_factor"),
        "must be at least 101",
    );
    let text = variant("# POOL", "hash_fallback = \"random\"");
    assert_error(
        &err(&text),
        "pools[0].hash_fallback",
        line_of(&text, "hash_fallback"),
        "only used by the ip_hash",
    );
    let text = variant(
        "# POOL",
        "algorithm = \"ip_hash\"\nhash_fallback = \"maglev\"",
    );
    assert_error(
        &err(&text),
        "pools[0].hash_fallback",
        line_of(&text, "hash_fallback"),
        "needs one too",
    );
}

#[test]
fn tls_files_are_read_at_load_and_a_bad_one_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let write = |stem: &str| {
        let ck = rcgen::generate_simple_self_signed(vec![format!("{stem}.test")]).unwrap();
        let cert = dir.path().join(format!("{stem}.pem"));
        let key = dir.path().join(format!("{stem}.key"));
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
        (cert.display().to_string(), key.display().to_string())
    };
    let (a_cert, a_key) = write("a");
    let (b_cert, b_key) = write("b");
    let text = |tls: &str| {
        format!(
            "[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nprotocol = \"https\"\n\
             pool = \"p\"\n{tls}\n\n[[pools]]\nname = \"p\"\nservers = [{{ address = \"127.0.0.1:1\" }}]\n"
        )
    };
    let config = parse(
        &text(&format!(
            "tls = {{ cert = \"{a_cert}\", key = \"{a_key}\" }}"
        )),
        ORIGIN,
    )
    .unwrap();
    assert!(config.listeners[0].tls.as_ref().unwrap().server.is_some());
    let error = parse(
        &text(&format!(
            "tls = {{ cert = \"{a_cert}\", key = \"{b_key}\" }}"
        )),
        ORIGIN,
    )
    .unwrap_err();
    assert_error(&error, "listeners[0].tls.key", 6, "does not belong");
    let error = parse(
        &text(&format!(
            "tls = {{ certs = [{{ cert = \"{a_cert}\", key = \"{a_key}\" }}, \
             {{ cert = \"{b_cert}.missing\", key = \"{b_key}\" }}] }}"
        )),
        ORIGIN,
    )
    .unwrap_err();
    assert_error(&error, "listeners[0].tls.certs[1].cert", 6, "cannot read");
    let error = parse(
        &text(&format!(
            "tls = {{ cert = \"{a_cert}\", key = \"{a_key}\", client_ca = \"{a_key}\" }}"
        )),
        ORIGIN,
    )
    .unwrap_err();
    assert_error(&error, "listeners[0].tls.client_ca", 6, "no certificate");
}

#[test]
fn a_pool_cache_takes_its_defaults_and_a_route_may_override_it() {
    let text = variant("# POOL", "[pools.cache]\nstore_set_cookie = false");
    let config = ok(&text);
    let cache = config.pools[0].cache.as_ref().expect("cache");
    assert_eq!(cache.max_size, 256 << 20);
    assert_eq!(cache.max_object_size, 8 << 20);
    assert!(cache.x_cache && !cache.store_set_cookie);
    assert_eq!(cache.default_ttl, None);
    assert_eq!(cache.coalesce_timeout, Duration::from_secs(5));
    assert_eq!(cache.key_query, KeyQuery::Keep);
    assert_eq!(config.listeners[0].routes[0].cache, RouteCache::Pool);

    let text = variant(
        "# ROUTE",
        "[listeners.routes.cache]\nmax_size = \"1MiB\"\nstale_if_error = \"1h\"\n\
         key = { query = \"sort\", headers = [\"X-Tenant\"] }",
    );
    let RouteCache::Own(own) = &ok(&text).listeners[0].routes[0].cache else {
        panic!("expected the route's own cache");
    };
    assert_eq!(own.max_size, 1 << 20);
    assert_eq!(own.max_object_size, 1 << 20);
    assert_eq!(own.stale_if_error, Duration::from_secs(3600));
    assert_eq!(own.key_query, KeyQuery::Sort);
    assert_eq!(own.key_headers[0].as_str(), "x-tenant");

    let text = variant("# ROUTE", "cache = false");
    assert_eq!(ok(&text).listeners[0].routes[0].cache, RouteCache::Off);
}

#[test]
fn bad_cache_keys_are_named_with_their_line() {
    let text = variant("# POOL", "[pools.cache]\nkey = { query = \"shuffle\" }");
    assert_error(
        &err(&text),
        "pools[0].cache.key.query",
        line_of(&text, "shuffle"),
        "\"keep\", \"sort\" or \"ignore\"",
    );
    let text = variant(
        "# POOL",
        "[pools.cache]\nmax_size = \"1MiB\"\nmax_object_size = \"2MiB\"",
    );
    assert_error(
        &err(&text),
        "pools[0].cache.max_object_size",
        line_of(&text, "max_object_size"),
        "must not be above max_size",
    );
    let text = variant("# POOL", "[pools.cache]\nmax_size = \"lots\"");
    assert_error(
        &err(&text),
        "pools[0].cache.max_size",
        line_of(&text, "lots"),
        "invalid size",
    );
    let text = variant("# ROUTE", "cache = true");
    assert_error(
        &err(&text),
        "listeners[0].routes[0].cache",
        line_of(&text, "cache = true"),
        "has no [pools.cache]",
    );
}

#[test]
fn a_tcp_route_has_no_cache() {
    let text = r#"
[[listeners]]
name = "l4"
bind = "127.0.0.1:8443"
protocol = "tcp"
pool = "p"

  [[listeners.routes]]
  sni = "a.example.com"
  pool = "p"
  cache = false

[[pools]]
name = "p"
servers = [{ address = "127.0.0.1:9001" }]
"#;
    assert_error(
        &err(text),
        "listeners[0].routes[0].cache",
        line_of(text, "cache = false"),
        "needs an http or https listener",
    );
}

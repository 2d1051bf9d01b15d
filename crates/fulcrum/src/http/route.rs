//! Routing: the first route whose every condition matches names the pool; otherwise the listener's
//! default pool. Conditions are compiled when the configuration is loaded (regexes included), so a
//! request only compares bytes.

use http::{header, HeaderMap, Request};

use crate::config::{HostMatch, RouteMatch};

/// True when every condition of `m` holds for `req`.
pub fn matches<B>(m: &RouteMatch, req: &Request<B>) -> bool {
    let uri = req.uri();
    if let Some(prefix) = &m.path_prefix {
        if !uri.path().starts_with(prefix.as_str()) {
            return false;
        }
    }
    if let Some(re) = &m.path_regex {
        if !re.is_match(uri.path()) {
            return false;
        }
    }
    if let Some(method) = &m.method {
        if req.method() != method {
            return false;
        }
    }
    if let Some(host) = &m.host {
        let Some(h) = request_host(req) else {
            return false;
        };
        if !host_matches(host, h) {
            return false;
        }
    }
    for (name, value) in &m.headers {
        if !req
            .headers()
            .get_all(name)
            .iter()
            .any(|v| v.as_bytes() == value.as_bytes())
        {
            return false;
        }
    }
    if let Some((name, value)) = &m.cookie {
        if cookie(req.headers(), name) != Some(value.as_str()) {
            return false;
        }
    }
    if !m.query.is_empty() {
        let q = uri.query().unwrap_or("");
        for (k, v) in &m.query {
            if !query_pairs(q).any(|(qk, qv)| qk == k && qv == v) {
                return false;
            }
        }
    }
    true
}

/// The host a request is for: the HTTP/2 `:authority` or the `Host` header, without the port.
pub fn request_host<B>(req: &Request<B>) -> Option<&str> {
    let raw = match req.uri().host() {
        Some(h) => h,
        None => req.headers().get(header::HOST)?.to_str().ok()?,
    };
    Some(strip_port(raw))
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // [v6]:port
        return host
            .split_once(']')
            .map(|(h, _)| &host[..h.len() + 1])
            .unwrap_or(host);
    }
    host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host)
}

fn host_matches(m: &HostMatch, host: &str) -> bool {
    match m {
        HostMatch::Exact(want) => host.eq_ignore_ascii_case(want),
        HostMatch::Suffix(suffix) => {
            host.len() > suffix.len()
                && host.as_bytes()[host.len() - suffix.len()..]
                    .eq_ignore_ascii_case(suffix.as_bytes())
        }
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim_matches('"'))
}

fn query_pairs(q: &str) -> impl Iterator<Item = (&str, &str)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderName, Method};

    fn empty() -> RouteMatch {
        RouteMatch {
            path_prefix: None,
            path_regex: None,
            host: None,
            method: None,
            headers: vec![],
            cookie: None,
            query: vec![],
            sni: None,
        }
    }

    fn req(uri: &str) -> http::request::Builder {
        Request::builder().uri(uri)
    }

    #[test]
    fn path_prefix_and_regex() {
        let m = RouteMatch {
            path_prefix: Some("/api/".into()),
            ..empty()
        };
        assert!(matches(&m, &req("/api/x").body(()).unwrap()));
        assert!(!matches(&m, &req("/apix").body(()).unwrap()));
        let m = RouteMatch {
            path_regex: Some(regex::Regex::new(r"^/v[0-9]+/").unwrap()),
            ..empty()
        };
        assert!(matches(&m, &req("/v2/users").body(()).unwrap()));
        assert!(!matches(&m, &req("/vx/users").body(()).unwrap()));
    }

    #[test]
    fn host_exact_and_wildcard_ignore_port_and_case() {
        let m = RouteMatch {
            host: Some(HostMatch::Exact("example.com".into())),
            ..empty()
        };
        assert!(matches(
            &m,
            &req("/")
                .header("host", "Example.com:8080")
                .body(())
                .unwrap()
        ));
        assert!(!matches(
            &m,
            &req("/").header("host", "a.example.com").body(()).unwrap()
        ));
        assert!(!matches(&m, &req("/").body(()).unwrap()));
        let m = RouteMatch {
            host: Some(HostMatch::Suffix(".example.com".into())),
            ..empty()
        };
        assert!(matches(
            &m,
            &req("/").header("host", "a.b.example.com").body(()).unwrap()
        ));
        assert!(!matches(
            &m,
            &req("/").header("host", "example.com").body(()).unwrap()
        ));
        assert_eq!(strip_port("[::1]:80"), "[::1]");
    }

    #[test]
    fn method_headers_cookie_query_all_must_match() {
        let m = RouteMatch {
            method: Some(Method::POST),
            headers: vec![(HeaderName::from_static("x-version"), "2".into())],
            cookie: Some(("beta".into(), "1".into())),
            query: vec![("v".into(), "2".into())],
            ..empty()
        };
        let ok = req("/p?a=1&v=2")
            .method("POST")
            .header("x-version", "2")
            .header("cookie", "a=b; beta=1")
            .body(())
            .unwrap();
        assert!(matches(&m, &ok));
        let wrong_cookie = req("/p?v=2")
            .method("POST")
            .header("x-version", "2")
            .header("cookie", "beta=0")
            .body(())
            .unwrap();
        assert!(!matches(&m, &wrong_cookie));
        let wrong_query = req("/p?v=3")
            .method("POST")
            .header("x-version", "2")
            .header("cookie", "beta=1")
            .body(())
            .unwrap();
        assert!(!matches(&m, &wrong_query));
        let wrong_method = req("/p?v=2")
            .header("x-version", "2")
            .header("cookie", "beta=1")
            .body(())
            .unwrap();
        assert!(!matches(&m, &wrong_method));
    }
}

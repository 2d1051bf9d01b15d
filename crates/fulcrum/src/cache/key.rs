//! Cache keys: method, host, path and query (kept, sorted or ignored), and the values of the
//! configured request headers; a response's `Vary` adds the values of the headers it names.

use http::{HeaderMap, HeaderName, Request};

use crate::config::{CacheConfig, KeyQuery};

/// The key of a request before any `Vary`: `"GET example.com/a?b=1"`, then `"\n{header}: {value}"`
/// per configured header.
pub fn base<B>(config: &CacheConfig, req: &Request<B>) -> String {
    let host = req
        .uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| req.headers().get(http::header::HOST)?.to_str().ok())
        .unwrap_or("");
    let path = req.uri().path();
    let mut key = String::with_capacity(req.method().as_str().len() + host.len() + path.len() + 32);
    key.push_str(req.method().as_str());
    key.push(' ');
    for c in host.chars() {
        key.push(c.to_ascii_lowercase());
    }
    key.push_str(path);
    if let Some(query) = req.uri().query() {
        match config.key_query {
            KeyQuery::Keep => {
                key.push('?');
                key.push_str(query);
            }
            KeyQuery::Sort => {
                let mut pairs: Vec<&str> = query.split('&').filter(|p| !p.is_empty()).collect();
                pairs.sort_unstable();
                key.push('?');
                key.push_str(&pairs.join("&"));
            }
            KeyQuery::Ignore => {}
        }
    }
    for name in &config.key_headers {
        append_header(&mut key, req.headers(), name);
    }
    key
}

/// The key of one variant: `base` and the values of the headers the response's `Vary` names.
pub fn variant(base: &str, headers: &HeaderMap, vary: &[HeaderName]) -> String {
    let mut key = String::with_capacity(base.len() + 32);
    key.push_str(base);
    key.push('\0');
    for name in vary {
        append_header(&mut key, headers, name);
    }
    key
}

fn append_header(key: &mut String, headers: &HeaderMap, name: &HeaderName) {
    key.push('\n');
    key.push_str(name.as_str());
    key.push(':');
    for (i, v) in headers.get_all(name).iter().enumerate() {
        if i > 0 {
            key.push(',');
        }
        key.push_str(&String::from_utf8_lossy(v.as_bytes()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(query: KeyQuery, headers: &[&str]) -> CacheConfig {
        CacheConfig {
            max_size: 1 << 20,
            max_object_size: 1 << 16,
            x_cache: false,
            store_set_cookie: false,
            default_ttl: None,
            coalesce_timeout: std::time::Duration::from_secs(1),
            stale_if_error: std::time::Duration::ZERO,
            key_query: query,
            key_headers: headers
                .iter()
                .map(|h| HeaderName::from_bytes(h.as_bytes()).unwrap())
                .collect(),
        }
    }

    fn req(uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::get(uri).header("host", "Example.com");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn query_kept_sorted_or_ignored() {
        let r1 = req("/a?b=2&a=1", &[]);
        let r2 = req("/a?a=1&b=2", &[]);
        let keep = config(KeyQuery::Keep, &[]);
        assert_ne!(base(&keep, &r1), base(&keep, &r2));
        let sort = config(KeyQuery::Sort, &[]);
        assert_eq!(base(&sort, &r1), base(&sort, &r2));
        let ignore = config(KeyQuery::Ignore, &[]);
        assert_eq!(base(&ignore, &r1), "GET example.com/a");
    }

    #[test]
    fn headers_are_part_of_the_key() {
        let c = config(KeyQuery::Keep, &["x-tenant"]);
        let a = base(&c, &req("/", &[("x-tenant", "a")]));
        let b = base(&c, &req("/", &[("x-tenant", "b")]));
        assert_ne!(a, b);
        let vary = [HeaderName::from_static("accept-language")];
        let mut h = HeaderMap::new();
        h.insert("accept-language", "fr".parse().unwrap());
        assert_ne!(
            variant(&a, &h, &vary),
            variant(&a, &HeaderMap::new(), &vary)
        );
    }
}

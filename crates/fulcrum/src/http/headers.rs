//! Header rewriting between client and server: hop-by-hop headers are removed (RFC 9110 §7.6.1),
//! `X-Forwarded-For` is appended, `X-Forwarded-Proto` and `X-Forwarded-Host` are set, and a WebSocket
//! upgrade is the one upgrade passed through (an `Upgrade: h2c` is dropped like any hop-by-hop header).

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Uri, Version};

/// `X-Forwarded-Proto`.
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `X-Forwarded-Host`.
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// `X-Forwarded-For`.
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
static UPGRADE_VALUE: HeaderValue = HeaderValue::from_static("upgrade");
static WEBSOCKET: HeaderValue = HeaderValue::from_static("websocket");

/// Headers that describe one connection and never cross a proxy.
fn remove_fixed_hop_by_hop(headers: &mut HeaderMap) {
    headers.remove(header::CONNECTION);
    headers.remove(&KEEP_ALIVE);
    headers.remove(&PROXY_CONNECTION);
    headers.remove(header::TE);
    headers.remove(header::TRAILER);
    headers.remove(header::TRANSFER_ENCODING);
    headers.remove(header::UPGRADE);
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TE
        || name == header::TRAILER
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name == KEEP_ALIVE
        || name == PROXY_CONNECTION
}

/// Removes the headers that `Connection` names as hop-by-hop, then the fixed hop-by-hop set.
///
/// Most requests carry none: one pass over the (few) names avoids seven hash lookups.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    if headers.contains_key(header::CONNECTION) {
        // Collected first: the names borrow `headers`, which is about to change.
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    remove_fixed_hop_by_hop(headers);
}

/// True when a comma-separated header (`Connection`, `Upgrade`, …) lists `token`, in any case.
pub(crate) fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// True for an HTTP/1.1 WebSocket handshake (`GET`, `Connection: upgrade`, `Upgrade: websocket`).
pub fn is_websocket_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.method() == Method::GET
        && has_token(req.headers(), header::CONNECTION, "upgrade")
        && has_token(req.headers(), header::UPGRADE, "websocket")
}

/// Rewrites a client request for an HTTP/1.1 server.
///
/// `client_ip` is the peer's address, preformatted once per connection. `websocket` keeps the upgrade
/// headers. The URI becomes origin-form; an HTTP/2 `:authority` becomes the `Host` header.
/// RFC 9112 §3.2: an HTTP/1.1 request names its host exactly once (in `Host`, or in an absolute-form
/// target); none, two, or an empty one is a bad request. HTTP/2 names it in `:authority`.
pub fn check_host<B>(req: &Request<B>) -> Result<(), &'static str> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let first = hosts.next();
    if hosts.next().is_some() {
        return Err("400 Bad Request: more than one Host header\n");
    }
    match (req.version(), first) {
        (Version::HTTP_11, None) if req.uri().authority().is_none() => {
            Err("400 Bad Request: an HTTP/1.1 request needs a Host header\n")
        }
        (_, Some(h))
            if h.is_empty()
                && req.uri().authority().is_none()
                && req.version() == Version::HTTP_11 =>
        {
            Err("400 Bad Request: empty Host header\n")
        }
        _ => Ok(()),
    }
}

pub fn rewrite_request<B>(
    req: &mut Request<B>,
    client_ip: &HeaderValue,
    proto: &'static str,
    websocket: bool,
) {
    let uri_authority = req.uri().authority().cloned();
    let parts_version = req.version();
    let headers = req.headers_mut();
    strip_hop_by_hop(headers);
    // fulcrum streams the body to the server at once, and hyper answers the client's
    // `Expect: 100-continue` itself when the body is first read.
    headers.remove(header::EXPECT);
    if websocket {
        headers.insert(header::CONNECTION, UPGRADE_VALUE.clone());
        headers.insert(header::UPGRADE, WEBSOCKET.clone());
    }

    // Host: an HTTP/2 request (or an absolute-form HTTP/1.1 one) names it in the URI.
    if let Some(authority) = &uri_authority {
        if parts_version == Version::HTTP_2 || !headers.contains_key(header::HOST) {
            if let Ok(v) = HeaderValue::from_str(authority.as_str()) {
                headers.insert(header::HOST, v);
            }
        }
    }
    match headers.get(header::HOST).cloned() {
        Some(host) => {
            headers.insert(X_FORWARDED_HOST.clone(), host);
        }
        // Never pass on a client's own claim of the original host.
        None => {
            headers.remove(&X_FORWARDED_HOST);
        }
    }
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
    append_forwarded_for(headers, client_ip);

    *req.version_mut() = Version::HTTP_11;
    if uri_authority.is_some() {
        let origin = req
            .uri()
            .path_and_query()
            .map(|pq| pq.as_str())
            .unwrap_or("/");
        if let Ok(uri) = origin.parse::<Uri>() {
            *req.uri_mut() = uri;
        }
    }
}

fn append_forwarded_for(headers: &mut HeaderMap, client_ip: &HeaderValue) {
    match headers.get(&X_FORWARDED_FOR) {
        None => {
            headers.insert(X_FORWARDED_FOR.clone(), client_ip.clone());
        }
        Some(prev) => {
            let mut joined = Vec::with_capacity(prev.len() + 2 + client_ip.len());
            joined.extend_from_slice(prev.as_bytes());
            joined.extend_from_slice(b", ");
            joined.extend_from_slice(client_ip.as_bytes());
            if let Ok(v) = HeaderValue::from_bytes(&joined) {
                headers.insert(X_FORWARDED_FOR.clone(), v);
            }
        }
    }
}

/// Rewrites a server's response head for the client: hop-by-hop headers go, except on a `101` upgrade.
#[inline]
pub fn rewrite_response(headers: &mut HeaderMap, upgrade: bool) {
    if !upgrade {
        strip_hop_by_hop(headers);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip() -> HeaderValue {
        HeaderValue::from_static("127.0.0.7")
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_removed() {
        let mut req = Request::builder()
            .uri("/x")
            .header("connection", "keep-alive, x-secret")
            .header("keep-alive", "timeout=5")
            .header("x-secret", "1")
            .header("te", "trailers")
            .header("upgrade", "h2c")
            .header("x-kept", "yes")
            .header("host", "example.com")
            .body(())
            .unwrap();
        rewrite_request(&mut req, &ip(), "http", false);
        let h = req.headers();
        for gone in ["connection", "keep-alive", "x-secret", "te", "upgrade"] {
            assert!(!h.contains_key(gone), "{gone} must be stripped");
        }
        assert_eq!(h["x-kept"], "yes");
        assert_eq!(h["x-forwarded-for"], "127.0.0.7");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "example.com");
    }

    #[test]
    fn forwarded_for_is_appended() {
        let mut req = Request::builder()
            .uri("/")
            .header("x-forwarded-for", "10.0.0.1")
            .body(())
            .unwrap();
        rewrite_request(&mut req, &ip(), "http", false);
        assert_eq!(req.headers()["x-forwarded-for"], "10.0.0.1, 127.0.0.7");
    }

    #[test]
    fn websocket_upgrade_is_kept_and_h2c_is_not() {
        let mut ws = Request::builder()
            .uri("/ws")
            .header("connection", "Upgrade")
            .header("upgrade", "websocket")
            .body(())
            .unwrap();
        assert!(is_websocket_upgrade(&ws));
        rewrite_request(&mut ws, &ip(), "http", true);
        assert_eq!(ws.headers()["upgrade"], "websocket");
        assert_eq!(ws.headers()["connection"], "upgrade");

        let h2c = Request::builder()
            .uri("/")
            .header("connection", "upgrade")
            .header("upgrade", "h2c")
            .body(())
            .unwrap();
        assert!(!is_websocket_upgrade(&h2c));
    }

    #[test]
    fn http2_authority_becomes_host_and_uri_origin_form() {
        let mut req = Request::builder()
            .version(Version::HTTP_2)
            .uri("http://example.com:8080/a/b?c=d")
            .body(())
            .unwrap();
        rewrite_request(&mut req, &ip(), "http", false);
        assert_eq!(req.uri(), "/a/b?c=d");
        assert_eq!(req.version(), Version::HTTP_11);
        assert_eq!(req.headers()["host"], "example.com:8080");
    }

    #[test]
    fn response_hop_by_hop_removed_unless_upgrading() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close"));
        h.insert("x-app", HeaderValue::from_static("1"));
        let mut up = h.clone();
        rewrite_response(&mut h, false);
        assert!(!h.contains_key("connection"));
        assert!(h.contains_key("x-app"));
        rewrite_response(&mut up, true);
        assert!(up.contains_key("connection"));
    }
}

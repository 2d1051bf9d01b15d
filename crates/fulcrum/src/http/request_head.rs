//! Strict parser for the head of an HTTP/1.0 or HTTP/1.1 request (RFC 9112 §2–§6), for fulcrum's own
//! HTTP/1 server connection driver.
//!
//! [`parse`] reads the head off the front of a read buffer with `httparse` and decides everything the
//! driver needs before it reads a body: how the body is delimited ([`BodyFraming`]), whether the
//! connection may carry another request, and whether the client waits for `100 Continue` or asks for
//! an upgrade. It copies the head once into shared bytes; the URI and header values are zero-copy
//! slices of that copy.
//!
//! The rules mirror hyper 1.x's server (`proto/h1/role.rs`, `Server::parse`), so that clients see
//! the same answers as before, with one addition: the request-target form must suit the method.
//! - Only `HTTP/1.0` and `HTTP/1.1` (else [`HeadError::Version`], 505). Empty lines before the
//!   request line are skipped; lines may end in a bare LF (httparse accepts both, as hyper does). A
//!   bare CR, obs-fold (a line starting with whitespace) and whitespace between a field name and its
//!   colon are refused.
//! - The target is origin-form (`/x`) or absolute-form (`http://h/x`) for any method,
//!   authority-form (`h:443`) for `CONNECT` only, asterisk-form (`*`) for `OPTIONS` only.
//! - `Transfer-Encoding` is refused in HTTP/1.0 and must end in `chunked` (the last element of the
//!   last field); it overrides `Content-Length`, whose fields are dropped, and such a request closes
//!   the connection once answered (a likely smuggling attempt).
//! - `Content-Length` is digits only (no sign, no list); repeated fields must agree and are passed
//!   on once; `0` means no body.
//! - `Connection: close` in any field closes; HTTP/1.0 keeps the connection only with
//!   `keep-alive`.
//!
//! A head is judged on its first `max_header_size` bytes only, so the answer is the same whether the
//! bytes arrive in one read or byte by byte.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Uri, Version};

/// Header slots kept on the stack; more than this many allowed fields use a heap array.
const STACK_HEADERS: usize = 128;

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: Method,
    pub uri: Uri,
    /// `HTTP_10` or `HTTP_11` only.
    pub version: Version,
    /// Every field in order, except the `Content-Length` fields dropped (repeats, or all of them
    /// beside `Transfer-Encoding`).
    pub headers: HeaderMap,
    pub framing: BodyFraming,
    /// The connection may carry another request after this one.
    pub keep_alive: bool,
    /// `Expect: 100-continue` (case-insensitive, the whole value of the last `Expect` field) in an
    /// HTTP/1.1 request.
    pub expect_continue: bool,
    /// An `Upgrade` field in an HTTP/1.1 request.
    pub wants_upgrade: bool,
}

/// How the request body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// No body.
    Empty,
    /// Exactly this many bytes (never 0).
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// The longest request target `http::Uri` holds (its limit: one less than `u16::MAX`); a longer one
/// is answered 414, as hyper does.
pub const MAX_URI: usize = u16::MAX as usize - 1;

/// Why a request head was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("request head larger than {0} bytes")]
    TooLarge(usize),
    #[error("more than {0} header fields")]
    TooManyHeaders(usize),
    #[error("request target longer than {MAX_URI} bytes")]
    UriTooLong,
    #[error("unsupported HTTP version")]
    Version,
    #[error("malformed request: {0}")]
    Bad(&'static str),
}

impl HeadError {
    /// The status to answer with before closing the connection.
    pub fn status(&self) -> StatusCode {
        match self {
            HeadError::TooLarge(_) | HeadError::TooManyHeaders(_) => {
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
            }
            HeadError::UriTooLong => StatusCode::URI_TOO_LONG,
            HeadError::Version => StatusCode::HTTP_VERSION_NOT_SUPPORTED,
            HeadError::Bad(_) => StatusCode::BAD_REQUEST,
        }
    }
}

/// Parses the head at the start of `buf`. `Ok(None)`: incomplete, read more (but if `buf.len() >
/// max_header_size` already, that is `Err(TooLarge)`). `Ok(Some((head, len)))`: `len` bytes of `buf`
/// were the head (the body or the next pipelined request follows). Never panics, whatever the bytes.
pub fn parse(
    buf: &[u8],
    max_header_size: usize,
    max_headers: usize,
) -> Result<Option<(RequestHead, usize)>, HeadError> {
    // Only the first `max_header_size` bytes count: a head that does not end within them is too
    // large, whatever follows.
    let window = &buf[..buf.len().min(max_header_size)];
    let mut stack;
    let mut heap;
    let slots: &mut [httparse::Header<'_>] = if max_headers <= STACK_HEADERS {
        stack = [httparse::EMPTY_HEADER; STACK_HEADERS];
        &mut stack[..max_headers]
    } else {
        heap = vec![httparse::EMPTY_HEADER; max_headers];
        &mut heap
    };
    let mut req = httparse::Request::new(slots);
    let len = match req.parse(window) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > max_header_size => {
            return Err(HeadError::TooLarge(max_header_size))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(parse_error(e, &req, max_headers)),
    };
    let (Some(method), Some(path), Some(minor)) = (req.method, req.path, req.version) else {
        return Err(HeadError::Bad("request line"));
    };
    let version = match minor {
        0 => Version::HTTP_10,
        1 => Version::HTTP_11,
        _ => return Err(HeadError::Version),
    };
    let is_11 = minor == 1;

    // One copy of the head; the URI and values are slices of it.
    let head = Bytes::copy_from_slice(&buf[..len]);
    let slice_of = |part: &[u8]| -> Result<Bytes, HeadError> {
        let start = (part.as_ptr() as usize).wrapping_sub(buf.as_ptr() as usize);
        match start.checked_add(part.len()) {
            _ if part.is_empty() => Ok(Bytes::new()),
            Some(end) if end <= len => Ok(head.slice(start..end)),
            _ => Err(HeadError::Bad("request line")),
        }
    };

    let method = Method::from_bytes(method.as_bytes()).map_err(|_| HeadError::Bad("method"))?;
    if path.len() > MAX_URI {
        return Err(HeadError::UriTooLong);
    }
    let uri =
        Uri::from_maybe_shared(slice_of(path.as_bytes())?).map_err(|_| HeadError::Bad("uri"))?;
    check_target(&method, path, &uri)?;

    let mut headers = HeaderMap::with_capacity(req.headers.len());
    let mut keep_alive = is_11;
    let mut saw_close = false;
    let mut content_length: Option<u64> = None;
    let mut is_cl = false;
    let mut is_te = false;
    let mut is_te_chunked = false;
    let mut expect_continue = false;
    let mut wants_upgrade = false;
    for h in req.headers.iter() {
        let name =
            HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| HeadError::Bad("header"))?;
        let value = HeaderValue::from_maybe_shared(slice_of(h.value)?)
            .map_err(|_| HeadError::Bad("header"))?;
        match name {
            header::TRANSFER_ENCODING => {
                if !is_11 {
                    return Err(HeadError::Bad("transfer-encoding in HTTP/1.0"));
                }
                is_te = true;
                if content_length.take().is_some() {
                    headers.remove(header::CONTENT_LENGTH);
                }
                is_te_chunked = ends_in_chunked(&value);
            }
            header::CONTENT_LENGTH => {
                is_cl = true;
                if is_te {
                    // Transfer-Encoding wins; the length is neither read nor passed on.
                    continue;
                }
                let n = content_length_value(value.as_bytes())
                    .ok_or(HeadError::Bad("content-length"))?;
                match content_length {
                    Some(prev) if prev != n => return Err(HeadError::Bad("content-length")),
                    Some(_) => continue,
                    None => content_length = Some(n),
                }
            }
            header::CONNECTION => {
                if saw_close || has_token(&value, "close") {
                    saw_close = true;
                    keep_alive = false;
                } else if !keep_alive {
                    keep_alive = has_token(&value, "keep-alive");
                }
            }
            header::EXPECT => {
                expect_continue = value.as_bytes().eq_ignore_ascii_case(b"100-continue");
            }
            header::UPGRADE => wants_upgrade = is_11,
            _ => {}
        }
        headers.append(name, value);
    }
    if is_te && !is_te_chunked {
        return Err(HeadError::Bad("transfer-encoding not chunked"));
    }
    if is_te && is_cl {
        keep_alive = false;
    }
    let framing = if is_te {
        BodyFraming::Chunked
    } else {
        match content_length {
            None | Some(0) => BodyFraming::Empty,
            Some(n) => BodyFraming::Length(n),
        }
    };
    Ok(Some((
        RequestHead {
            method,
            uri,
            version,
            headers,
            framing,
            keep_alive,
            expect_continue: expect_continue && is_11,
            wants_upgrade,
        },
        len,
    )))
}

/// The error for what httparse refused.
fn parse_error(e: httparse::Error, req: &httparse::Request<'_, '_>, max: usize) -> HeadError {
    match e {
        httparse::Error::TooManyHeaders => HeadError::TooManyHeaders(max),
        httparse::Error::Version => HeadError::Version,
        httparse::Error::Token if req.method.is_none() => HeadError::Bad("method"),
        httparse::Error::Token => HeadError::Bad("uri"),
        httparse::Error::HeaderName | httparse::Error::HeaderValue => HeadError::Bad("header"),
        httparse::Error::NewLine => HeadError::Bad("line ending"),
        httparse::Error::Status => HeadError::Bad("request line"),
    }
}

/// RFC 9112 §3.2: the request-target form must suit the method.
fn check_target(method: &Method, path: &str, uri: &Uri) -> Result<(), HeadError> {
    let ok = if path == "*" {
        method == Method::OPTIONS
    } else if path.starts_with('/') {
        true
    } else if let Some(scheme) = uri.scheme_str() {
        // absolute-form. RFC 3986 §3.1: `scheme = ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )`
        // (http::Uri lets a scheme start with any of these).
        scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
    } else {
        // authority-form: host and port only.
        method == Method::CONNECT
            && uri.authority().is_some()
            && uri.path_and_query().is_none_or(|p| p.as_str().is_empty())
    };
    if ok {
        Ok(())
    } else {
        Err(HeadError::Bad("target"))
    }
}

/// A `Content-Length` value: decimal digits only, spaces and tabs around them ignored (as hyper's
/// `content_length_parse`: no sign, no comma list).
fn content_length_value(v: &[u8]) -> Option<u64> {
    let ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = v.iter().position(|b| !ows(b))?;
    let end = v.iter().rposition(|b| !ows(b))? + 1;
    v[start..end].iter().try_fold(0u64, |n, &b| {
        if b.is_ascii_digit() {
            n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        } else {
            None
        }
    })
}

/// hyper's `is_chunked_`: the last comma-separated element of the value, trimmed, is `chunked`.
fn ends_in_chunked(value: &HeaderValue) -> bool {
    value
        .to_str()
        .ok()
        .and_then(|s| s.rsplit(',').next())
        .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"))
}

/// A comma-separated token list holds `token` (case-insensitive).
fn has_token(value: &HeaderValue, token: &str) -> bool {
    value
        .to_str()
        .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 8192;

    fn ok(input: &str) -> (RequestHead, usize) {
        match parse(input.as_bytes(), MAX, 100) {
            Ok(Some(parsed)) => parsed,
            other => panic!("{input:?}: {other:?}"),
        }
    }

    fn head(input: &str) -> RequestHead {
        ok(input).0
    }

    fn err(input: &str) -> HeadError {
        match parse(input.as_bytes(), MAX, 100) {
            Err(e) => e,
            other => panic!("{input:?} accepted: {other:?}"),
        }
    }

    fn bad(input: &str) -> &'static str {
        match err(input) {
            HeadError::Bad(why) => why,
            e => panic!("{input:?}: {e:?}"),
        }
    }

    fn values(head: &RequestHead, name: &str) -> Vec<String> {
        head.headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect()
    }

    #[test]
    fn simple_get() {
        let input = "GET /a?b=c HTTP/1.1\r\nHost: h\r\nX-A: 1\r\nx-a: 2\r\n\r\n";
        let (h, len) = ok(input);
        assert_eq!(len, input.len());
        assert_eq!(h.method, Method::GET);
        assert_eq!(h.uri, "/a?b=c");
        assert_eq!(h.version, Version::HTTP_11);
        assert_eq!(values(&h, "host"), ["h"]);
        assert_eq!(values(&h, "x-a"), ["1", "2"]);
        assert_eq!(h.framing, BodyFraming::Empty);
        assert!(h.keep_alive);
        assert!(!h.expect_continue);
        assert!(!h.wants_upgrade);
    }

    #[test]
    fn every_strict_prefix_is_incomplete() {
        let input = b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\n";
        for n in 0..input.len() {
            assert_eq!(parse(&input[..n], MAX, 100), Ok(None), "prefix of {n}");
        }
        assert!(parse(input, MAX, 100).unwrap().is_some());
    }

    #[test]
    fn only_http_1_0_and_1_1() {
        assert_eq!(head("GET / HTTP/1.0\r\n\r\n").version, Version::HTTP_10);
        for line in [
            "GET / HTTP/1.2",
            "GET / HTTP/2.0",
            "GET / HTTP/0.9",
            "GET / HTTP/2",
            "GET / http/1.1",
            "PRI * HTTP/2.0",
            "GET / FOO/1.1",
        ] {
            let e = err(&format!("{line}\r\n\r\n"));
            assert_eq!(e, HeadError::Version, "{line}");
            assert_eq!(e.status(), StatusCode::HTTP_VERSION_NOT_SUPPORTED);
        }
        // HTTP/0.9 (no version at all) is not HTTP/1.x either.
        assert!(parse(b"GET /\r\n\r\n", MAX, 100).is_err());
    }

    #[test]
    fn leading_empty_lines_are_skipped() {
        let input = "\r\n\r\n\nGET / HTTP/1.1\r\n\r\n";
        let (h, len) = ok(input);
        assert_eq!(len, input.len());
        assert_eq!(h.method, Method::GET);
        // Only empty lines so far: wait for the request line.
        assert_eq!(parse(b"\r\n\r\n", MAX, 100), Ok(None));
    }

    #[test]
    fn methods() {
        assert_eq!(head("PURGE / HTTP/1.1\r\n\r\n").method.as_str(), "PURGE");
        assert_eq!(bad("G(T / HTTP/1.1\r\n\r\n"), "method");
        assert_eq!(bad("G\x00T / HTTP/1.1\r\n\r\n"), "method");
        // Method names are case-sensitive: `get` is another (extension) method.
        assert_eq!(head("get / HTTP/1.1\r\n\r\n").method.as_str(), "get");
    }

    #[test]
    fn uris() {
        assert_eq!(bad("GET /\x7f HTTP/1.1\r\n\r\n"), "uri");
        // Bytes above 0x7f pass httparse and http::Uri (and so hyper) alike.
        assert_eq!(
            head("GET /caf\u{e9} HTTP/1.1\r\n\r\n").uri.path(),
            "/caf\u{e9}"
        );
        // httparse takes any visible bytes; http::Uri wants a URI.
        assert_eq!(bad("GET http:// HTTP/1.1\r\n\r\n"), "uri");
        assert_eq!(bad("GET http://[::1/ HTTP/1.1\r\n\r\n"), "uri");
        // Extra spaces in the request line are refused (httparse's default, as in hyper).
        assert_eq!(err("GET  / HTTP/1.1\r\n\r\n"), HeadError::Bad("uri"));
        assert_eq!(
            err("GET / HTTP/1.1 \r\n\r\n"),
            HeadError::Bad("line ending")
        );
    }

    #[test]
    fn request_target_forms() {
        // origin-form and absolute-form, any method.
        assert_eq!(head("GET /x HTTP/1.1\r\n\r\n").uri.path(), "/x");
        let h = head("GET http://h:8080/x?y HTTP/1.1\r\n\r\n");
        assert_eq!(h.uri.host(), Some("h"));
        assert_eq!(h.uri.path(), "/x");
        head("POST https://h HTTP/1.1\r\n\r\n");
        // authority-form: CONNECT only.
        let h = head("CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n");
        assert_eq!(h.uri.authority().map(|a| a.as_str()), Some("h:443"));
        assert_eq!(bad("GET h:443 HTTP/1.1\r\n\r\n"), "target");
        assert_eq!(bad("GET h HTTP/1.1\r\n\r\n"), "target");
        // asterisk-form: OPTIONS only.
        assert_eq!(head("OPTIONS * HTTP/1.1\r\n\r\n").uri, "*");
        assert_eq!(bad("GET * HTTP/1.1\r\n\r\n"), "target");
        assert_eq!(bad("CONNECT * HTTP/1.1\r\n\r\n"), "target");
        // A scheme starts with a letter (http::Uri alone would take this one).
        assert_eq!(bad("GET -ttp://h/x HTTP/1.1\r\n\r\n"), "target");
        head("GET svn+ssh.1-x://h/x HTTP/1.1\r\n\r\n");
    }

    #[test]
    fn header_names_and_values() {
        assert_eq!(bad("GET / HTTP/1.1\r\nX-Nul: a\x00b\r\n\r\n"), "header");
        assert_eq!(bad("GET / HTTP/1.1\r\nX-Del: a\x7fb\r\n\r\n"), "header");
        assert_eq!(bad("GET / HTTP/1.1\r\nBad Name: 1\r\n\r\n"), "header");
        assert_eq!(bad("GET / HTTP/1.1\r\n: empty\r\n\r\n"), "header");
        // Whitespace between a name and its colon (RFC 9112 §5.1: must be refused).
        assert_eq!(
            bad("GET / HTTP/1.1\r\nContent-Length : 2\r\n\r\n"),
            "header"
        );
        assert_eq!(bad("GET / HTTP/1.1\r\nHost\t: h\r\n\r\n"), "header");
        // obs-fold (§5.2: a server refuses it or replaces it; fulcrum, as hyper, refuses).
        assert_eq!(bad("GET / HTTP/1.1\r\nX-A: a\r\n b\r\n\r\n"), "header");
        assert_eq!(bad("GET / HTTP/1.1\r\nX-A: a\r\n\tb\r\n\r\n"), "header");
        // A first line starting with whitespace is no header either.
        assert_eq!(bad("GET / HTTP/1.1\r\n Host: h\r\n\r\n"), "header");
        // Whitespace around a value is not part of it; inner whitespace and obs-text are.
        let h = head("GET / HTTP/1.1\r\nX-A: \t a b \t\r\nX-B:\r\nX-C: caf\u{e9}\r\n\r\n");
        assert_eq!(values(&h, "x-a"), ["a b"]);
        assert_eq!(values(&h, "x-b"), [""]);
        assert_eq!(h.headers["x-c"].as_bytes(), "caf\u{e9}".as_bytes());
    }

    #[test]
    fn bare_lf_line_endings_are_accepted_bare_cr_is_not() {
        // httparse (and so hyper) accepts LF alone as a line ending (RFC 9112 §2.2 allows it).
        let input = "POST / HTTP/1.1\nHost: h\nContent-Length: 2\n\nab";
        let (h, len) = ok(input);
        assert_eq!(len, input.len() - 2);
        assert_eq!(h.framing, BodyFraming::Length(2));
        let (_, len) = ok("GET / HTTP/1.1\r\nHost: h\n\r\n");
        assert_eq!(len, 26);
        // A CR not followed by LF is refused.
        assert!(parse(b"GET / HTTP/1.1\rHost: h\r\n\r\n", MAX, 100).is_err());
        assert!(parse(b"GET / HTTP/1.1\r\nHost: h\rX: y\r\n\r\n", MAX, 100).is_err());
        assert!(parse(b"GET / HTTP/1.1\r\nHost: h\r\n\r\r\n", MAX, 100).is_err());
    }

    #[test]
    fn content_length() {
        assert_eq!(
            head("POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n").framing,
            BodyFraming::Length(5)
        );
        assert_eq!(
            head("POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n").framing,
            BodyFraming::Empty
        );
        assert_eq!(
            head("POST / HTTP/1.1\r\nContent-Length:\t7 \r\n\r\n").framing,
            BodyFraming::Length(7)
        );
        // Leading zeros are digits (hyper accepts them too); the value is passed on as sent.
        let h = head("POST / HTTP/1.1\r\nContent-Length: 007\r\n\r\n");
        assert_eq!(h.framing, BodyFraming::Length(7));
        assert_eq!(values(&h, "content-length"), ["007"]);
        let max = format!("POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", u64::MAX);
        assert_eq!(head(&max).framing, BodyFraming::Length(u64::MAX));
        for v in [
            "+5",
            "-5",
            "5, 5",
            "5,5",
            "5 5",
            "",
            "0x5",
            "5.0",
            "1e3",
            "18446744073709551616",
            "99999999999999999999999",
            "\u{663}",
        ] {
            let input = format!("POST / HTTP/1.1\r\nContent-Length: {v}\r\n\r\n");
            assert_eq!(bad(&input), "content-length", "{v:?}");
        }
    }

    #[test]
    fn repeated_content_length() {
        let h = head("POST / HTTP/1.1\r\nContent-Length: 5\r\nX: 1\r\ncontent-length: 5\r\n\r\n");
        assert_eq!(h.framing, BodyFraming::Length(5));
        assert_eq!(values(&h, "content-length"), ["5"]);
        assert!(h.keep_alive);
        assert_eq!(values(&h, "x"), ["1"]);
        // Same number, different spelling: one length, the first field kept.
        let h = head("POST / HTTP/1.1\r\nContent-Length: 05\r\nContent-Length: 5\r\n\r\n");
        assert_eq!(values(&h, "content-length"), ["05"]);
        assert_eq!(
            bad("POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"),
            "content-length"
        );
        assert_eq!(
            bad("POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: +5\r\n\r\n"),
            "content-length"
        );
    }

    #[test]
    fn transfer_encoding() {
        let h = head("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(h.framing, BodyFraming::Chunked);
        assert!(h.keep_alive);
        assert_eq!(values(&h, "transfer-encoding"), ["chunked"]);
        for v in [
            "Chunked",
            "CHUNKED",
            "gzip, chunked",
            "gzip,chunked",
            ",chunked",
        ] {
            let input = format!("POST / HTTP/1.1\r\nTransfer-Encoding: {v}\r\n\r\n");
            assert_eq!(head(&input).framing, BodyFraming::Chunked, "{v:?}");
        }
        for v in [
            "gzip",
            "chunked, gzip",
            "chunked,",
            "identity",
            "",
            "xchunked",
            "chunked;q=1",
        ] {
            let input = format!("POST / HTTP/1.1\r\nTransfer-Encoding: {v}\r\n\r\n");
            assert_eq!(bad(&input), "transfer-encoding not chunked", "{v:?}");
        }
        // Several fields: the last one decides (their list ends with its last element).
        let h = head(
            "POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        assert_eq!(h.framing, BodyFraming::Chunked);
        assert_eq!(values(&h, "transfer-encoding"), ["gzip", "chunked"]);
        assert_eq!(
            bad("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n"),
            "transfer-encoding not chunked"
        );
    }

    #[test]
    fn transfer_encoding_in_http_1_0_is_refused() {
        for v in ["chunked", "gzip"] {
            let input = format!("POST / HTTP/1.0\r\nTransfer-Encoding: {v}\r\n\r\n");
            assert_eq!(bad(&input), "transfer-encoding in HTTP/1.0");
        }
        assert_eq!(
            err("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n").status(),
            400
        );
    }

    #[test]
    fn content_length_and_transfer_encoding() {
        // Either order: chunked, every Content-Length dropped, the connection closed afterwards.
        for input in [
            "POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\nX: 1\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\nX: 1\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\nContent-Length: 6\r\nX: 1\r\n\r\n",
        ] {
            let h = head(input);
            assert_eq!(h.framing, BodyFraming::Chunked, "{input:?}");
            assert!(!h.headers.contains_key(header::CONTENT_LENGTH), "{input:?}");
            assert!(!h.keep_alive, "{input:?}");
            assert_eq!(values(&h, "x"), ["1"]);
        }
        // A Content-Length after Transfer-Encoding is not even read (as hyper); one before it is.
        let h = head("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: +5\r\n\r\n");
        assert_eq!(h.framing, BodyFraming::Chunked);
        assert_eq!(
            bad("POST / HTTP/1.1\r\nContent-Length: +5\r\nTransfer-Encoding: chunked\r\n\r\n"),
            "content-length"
        );
        // Transfer-Encoding not ending in chunked is refused even beside a Content-Length.
        assert_eq!(
            bad("POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: gzip\r\n\r\n"),
            "transfer-encoding not chunked"
        );
        // In HTTP/1.0 the pair is refused.
        assert_eq!(
            bad("POST / HTTP/1.0\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"),
            "transfer-encoding in HTTP/1.0"
        );
    }

    #[test]
    fn connection() {
        let ka = |input: &str| head(input).keep_alive;
        assert!(ka("GET / HTTP/1.1\r\n\r\n"));
        assert!(!ka("GET / HTTP/1.1\r\nConnection: close\r\n\r\n"));
        assert!(!ka("GET / HTTP/1.1\r\nConnection: foo, CLOSE \r\n\r\n"));
        assert!(!ka(
            "GET / HTTP/1.1\r\nConnection: close\r\nConnection: keep-alive\r\n\r\n"
        ));
        assert!(!ka(
            "GET / HTTP/1.1\r\nConnection: keep-alive\r\nConnection: close\r\n\r\n"
        ));
        assert!(ka("GET / HTTP/1.1\r\nConnection: closed, upgrade\r\n\r\n"));
        assert!(!ka("GET / HTTP/1.0\r\n\r\n"));
        assert!(ka("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"));
        assert!(ka("GET / HTTP/1.0\r\nConnection: x, Keep-Alive\r\n\r\n"));
        assert!(ka(
            "GET / HTTP/1.0\r\nConnection: x\r\nConnection: keep-alive\r\n\r\n"
        ));
        assert!(!ka(
            "GET / HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n"
        ));
        assert!(!ka(
            "GET / HTTP/1.0\r\nConnection: keep-alive\r\nConnection: close\r\n\r\n"
        ));
        assert!(!ka(
            "GET / HTTP/1.0\r\nConnection: close\r\nConnection: keep-alive\r\n\r\n"
        ));
        assert!(!ka("GET / HTTP/1.0\r\nConnection: keepalive\r\n\r\n"));
    }

    #[test]
    fn expect_continue() {
        let ec = |input: &str| head(input).expect_continue;
        assert!(ec(
            "POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n"
        ));
        assert!(ec("POST / HTTP/1.1\r\nExpect: 100-Continue\r\n\r\n"));
        assert!(!ec("POST / HTTP/1.0\r\nExpect: 100-continue\r\n\r\n"));
        assert!(!ec("POST / HTTP/1.1\r\nExpect: 100-continue, x\r\n\r\n"));
        assert!(!ec("POST / HTTP/1.1\r\nExpect: 200-ok\r\n\r\n"));
        // The last Expect field decides (as hyper).
        assert!(!ec(
            "POST / HTTP/1.1\r\nExpect: 100-continue\r\nExpect: x\r\n\r\n"
        ));
        assert!(ec(
            "POST / HTTP/1.1\r\nExpect: x\r\nExpect: 100-continue\r\n\r\n"
        ));
    }

    #[test]
    fn upgrade() {
        let up = |input: &str| head(input).wants_upgrade;
        assert!(up(
            "GET / HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
        ));
        assert!(up("GET / HTTP/1.1\r\nUpgrade: h2c\r\n\r\n"));
        assert!(!up("GET / HTTP/1.0\r\nUpgrade: websocket\r\n\r\n"));
        assert!(!up("GET / HTTP/1.1\r\nConnection: upgrade\r\n\r\n"));
        // CONNECT alone is no Upgrade field (hyper flags it as an upgrade; the driver checks the method).
        assert!(!up("CONNECT h:443 HTTP/1.1\r\n\r\n"));
    }

    #[test]
    fn body_and_pipelined_requests_follow_the_head() {
        let first = "POST /a HTTP/1.1\r\nContent-Length: 3\r\n\r\n";
        let second = "GET /b HTTP/1.1\r\n\r\n";
        let input = format!("{first}abc{second}GET /c HT");
        let (h, len) = ok(&input);
        assert_eq!(len, first.len());
        assert_eq!(h.framing, BodyFraming::Length(3));
        assert_eq!(&input[len..len + 3], "abc");
        let rest = &input.as_bytes()[len + 3..];
        let (h, len2) = parse(rest, MAX, 100).unwrap().unwrap();
        assert_eq!(h.uri, "/b");
        assert_eq!(len2, second.len());
        assert_eq!(parse(&rest[len2..], MAX, 100), Ok(None));
        // Two heads back to back: the first one only.
        let input = format!("{second}{second}");
        assert_eq!(ok(&input).1, second.len());
    }

    #[test]
    fn size_limit() {
        let input = b"GET / HTTP/1.1\r\nHost: example\r\n\r\n";
        let n = input.len();
        // Exactly at the limit, with or without bytes after it.
        assert_eq!(parse(input, n, 100).unwrap().unwrap().1, n);
        let mut more = input.to_vec();
        more.extend_from_slice(b"GET / HTTP/1.1\r\n");
        assert_eq!(parse(&more, n, 100).unwrap().unwrap().1, n);
        // One byte over: too large, complete or not.
        assert_eq!(parse(input, n - 1, 100), Err(HeadError::TooLarge(n - 1)));
        assert_eq!(parse(&more, n - 1, 100), Err(HeadError::TooLarge(n - 1)));
        // A prefix up to the limit waits for more; past it, it is too large.
        assert_eq!(parse(&input[..n - 1], n - 1, 100), Ok(None));
        assert_eq!(
            parse(&input[..n - 1], n - 2, 100),
            Err(HeadError::TooLarge(n - 2))
        );
        assert_eq!(HeadError::TooLarge(1).status(), 431);
        // Garbage past the limit is not looked at.
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\n\x00", 16, 100),
            Err(HeadError::TooLarge(16))
        );
        assert_eq!(parse(b"", 0, 100), Ok(None));
        assert_eq!(parse(b"G", 0, 100), Err(HeadError::TooLarge(0)));
    }

    #[test]
    fn a_target_longer_than_a_uri_holds_is_414() {
        let request =
            |len: usize| format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(len - 1));
        // The longest target `http::Uri` takes parses; one byte more is 414, not 400.
        let at = parse(request(MAX_URI).as_bytes(), 1 << 20, 100)
            .unwrap()
            .unwrap()
            .0;
        assert_eq!(at.uri.path().len(), MAX_URI);
        let over = parse(request(MAX_URI + 1).as_bytes(), 1 << 20, 100).unwrap_err();
        assert_eq!(over, HeadError::UriTooLong);
        assert_eq!(over.status(), StatusCode::URI_TOO_LONG);
    }

    #[test]
    fn header_count_limit() {
        let input = "GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n";
        assert_eq!(head(input).headers.len(), 3);
        assert_eq!(
            parse(input.as_bytes(), MAX, 3)
                .unwrap()
                .unwrap()
                .0
                .headers
                .len(),
            3
        );
        let e = parse(input.as_bytes(), MAX, 2).unwrap_err();
        assert_eq!(e, HeadError::TooManyHeaders(2));
        assert_eq!(e.status(), 431);
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\n\r\n", MAX, 0)
                .unwrap()
                .unwrap()
                .0
                .headers
                .len(),
            0
        );
        // More slots than the stack array holds.
        let mut many = String::from("GET / HTTP/1.1\r\n");
        for i in 0..150 {
            many.push_str(&format!("X-{i}: {i}\r\n"));
        }
        many.push_str("\r\n");
        let h = parse(many.as_bytes(), MAX, 200).unwrap().unwrap().0;
        assert_eq!(h.headers.len(), 150);
        assert_eq!(
            parse(many.as_bytes(), MAX, 149),
            Err(HeadError::TooManyHeaders(149))
        );
        assert_eq!(
            parse(many.as_bytes(), MAX, 129),
            Err(HeadError::TooManyHeaders(129))
        );
    }

    #[test]
    fn statuses() {
        assert_eq!(
            HeadError::TooLarge(1).status(),
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );
        assert_eq!(
            HeadError::TooManyHeaders(1).status(),
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );
        assert_eq!(
            HeadError::Version.status(),
            StatusCode::HTTP_VERSION_NOT_SUPPORTED
        );
        assert_eq!(HeadError::Bad("x").status(), StatusCode::BAD_REQUEST);
    }
}

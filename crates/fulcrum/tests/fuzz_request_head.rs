//! Fuzzing on stable: property tests over byte streams for the request head parser of fulcrum's own
//! HTTP/1 server connection driver (`http::request_head::parse`), in the style of `fuzz_parsers.rs`.
//!
//! The parser is checked against a small independent reference written from RFC 9112 §3 and
//! §6.1–6.3 here (with hyper 1.x's choices where the RFC leaves one, noted in [`reference`]), so
//! "accepted" means "the RFC accepts it" and not merely "did not crash", and against itself: the
//! parser keeps no state between calls, so the bytes arriving split at any point are the same as
//! every prefix of them; each strict prefix of a head must ask for more, and every longer one must
//! give the same answer as the whole input.
//!
//! The runs are short and deterministic (a fixed seed) so that they belong in the test command. For a
//! longer hunt: `FUZZ_CASES=200000 FUZZ_SEED=$RANDOM cargo test -p fulcrum --release --test
//! fuzz_request_head`.

mod common;

use common::fuzz::{byte_of, config, edits_of, length_value, mutate, Edits};
use fulcrum::http::request_head::{parse, BodyFraming, HeadError, RequestHead};
use http::header::{HeaderName, HeaderValue};
use http::{Method, Uri, Version};
use proptest::prelude::*;

/// Bytes that matter to HTTP parsers, mixed into random input.
const ALPHABET: &[u8] =
    b"\r\n\r\n :;,=\"-+*/?#@[]0123456789aAfFxX\t\x00\x0b\x7f\x80\xffHTP/.chunkedgzipclose";

fn byte() -> impl Strategy<Value = u8> {
    byte_of(ALPHABET)
}

fn edits() -> impl Strategy<Value = Edits> {
    edits_of(ALPHABET)
}

// ---------------------------------------------------------------------------------------------------
// The reference
// ---------------------------------------------------------------------------------------------------

/// What the reference says of some bytes.
#[derive(Debug, PartialEq, Eq)]
enum Expect {
    /// Not a complete head yet: read more.
    Partial,
    /// The head does not end within the size limit.
    TooLarge,
    /// More fields than allowed.
    TooManyHeaders,
    /// Not HTTP/1.0 or HTTP/1.1.
    Version,
    /// Any other refusal (400).
    Refuse(&'static str),
    /// A head of `len` bytes.
    Head(Box<Want>),
}

/// What an accepted head must come to.
#[derive(Debug, PartialEq, Eq)]
struct Want {
    len: usize,
    method: Method,
    uri: Uri,
    version: Version,
    /// The fields passed on, in order (per name).
    fields: Vec<(HeaderName, Vec<u8>)>,
    framing: BodyFraming,
    keep_alive: bool,
    expect_continue: bool,
    wants_upgrade: bool,
}

fn is_ows(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

fn trim_ows(mut v: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = v {
        if !is_ows(*first) {
            break;
        }
        v = rest;
    }
    while let [rest @ .., last] = v {
        if !is_ows(*last) {
            break;
        }
        v = rest;
    }
    v
}

/// The elements of a list field value (RFC 9110 §5.6.1), empty ones included, OWS trimmed. A value
/// with obs-text (bytes above 0x7f) is read as no list at all (hyper reads these fields as text).
fn elements(value: &[u8]) -> Option<Vec<&[u8]>> {
    if value.iter().any(|&b| b >= 0x80) {
        return None;
    }
    Some(value.split(|&b| b == b',').map(trim_ows).collect())
}

fn has_token(value: &[u8], token: &str) -> bool {
    elements(value).is_some_and(|es| es.iter().any(|e| e.eq_ignore_ascii_case(token.as_bytes())))
}

/// RFC 9110 §8.6: `Content-Length = 1*DIGIT`.
fn decimal(value: &[u8]) -> Option<u64> {
    let v = trim_ows(value);
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// RFC 3986 §3.1: `scheme = ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )`.
fn is_scheme(s: &str) -> bool {
    let mut bytes = s.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphabetic())
        && bytes.all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
}

/// RFC 9112 §3.2: the form of the request-target, checked against the method.
fn target_suits(method: &[u8], target: &str) -> bool {
    if target == "*" {
        // §3.2.4: asterisk-form, for a server-wide OPTIONS.
        return method == b"OPTIONS";
    }
    if target.starts_with('/') {
        // §3.2.1: origin-form.
        return true;
    }
    if let Some((scheme, _)) = target.split_once("://") {
        if is_scheme(scheme) {
            // §3.2.2: absolute-form.
            return true;
        }
    }
    // §3.2.3: authority-form, for CONNECT only: a host and port, no path, query or fragment.
    method == b"CONNECT" && !target.contains(['/', '?', '#'])
}

/// What RFC 9112 says of `input` as a request head, decided independently of fulcrum's parser, with
/// hyper's choices where the RFC leaves one:
/// - `Content-Length` lists (`5, 5`) are refused (§8.6 allows either); repeated fields compare as
///   numbers (`05` and `5` agree).
/// - Beside `Transfer-Encoding` (which overrides it, §6.3), a `Content-Length` field is still checked
///   when it comes before the first `Transfer-Encoding` field, not after it.
/// - The final transfer coding is the last element of the last `Transfer-Encoding` field, empty
///   elements included (`chunked,` ends in an empty one and is refused).
/// - `Expect` is read from its last field.
fn reference(input: &[u8], max_size: usize, max_headers: usize) -> Expect {
    // Syntax and the field count limit: httparse, as the parser; it is not what is under test. Only
    // the first `max_size` bytes count, and the field past `max_headers` is refused as soon as it
    // starts, before the head ends.
    let window = &input[..input.len().min(max_size)];
    let mut slots = vec![httparse::EMPTY_HEADER; max_headers];
    let mut req = httparse::Request::new(&mut slots);
    let len = match req.parse(window) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if input.len() > max_size => return Expect::TooLarge,
        Ok(httparse::Status::Partial) => return Expect::Partial,
        Err(httparse::Error::Version) => return Expect::Version,
        Err(httparse::Error::TooManyHeaders) => return Expect::TooManyHeaders,
        Err(_) => return Expect::Refuse("syntax"),
    };
    let (method, target, minor) = (req.method.unwrap(), req.path.unwrap(), req.version.unwrap());
    let version = match minor {
        0 => Version::HTTP_10,
        1 => Version::HTTP_11,
        _ => return Expect::Version,
    };
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Expect::Refuse("method");
    };
    let Ok(uri) = Uri::try_from(target) else {
        return Expect::Refuse("uri");
    };
    if !target_suits(method.as_str().as_bytes(), target) {
        return Expect::Refuse("target");
    }
    let mut fields = Vec::new();
    for h in req.headers.iter() {
        let (Ok(name), Ok(_)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(h.value),
        ) else {
            return Expect::Refuse("header");
        };
        fields.push((name, h.value.to_vec()));
    }
    let is = |f: &(HeaderName, Vec<u8>), name: &str| f.0.as_str() == name;
    let te_at = fields.iter().position(|f| is(f, "transfer-encoding"));
    let has_cl = fields.iter().any(|f| is(f, "content-length"));

    // §6.1: Transfer-Encoding in HTTP/1.0 means the framing is faulty.
    if te_at.is_some() && version == Version::HTTP_10 {
        return Expect::Refuse("transfer-encoding in HTTP/1.0");
    }
    // §6.3 (5): every Content-Length that counts is a number, and they agree.
    let mut length = None;
    for f in &fields[..te_at.unwrap_or(fields.len())] {
        if is(f, "content-length") {
            let Some(n) = decimal(&f.1) else {
                return Expect::Refuse("content-length");
            };
            if length.is_some_and(|l| l != n) {
                return Expect::Refuse("content-length conflict");
            }
            length = Some(n);
        }
    }
    // §6.3 (4): chunked must be the final coding.
    let framing = if te_at.is_some() {
        let last_te = &fields
            .iter()
            .rev()
            .find(|f| is(f, "transfer-encoding"))
            .unwrap()
            .1;
        let last = elements(last_te).and_then(|es| es.last().copied());
        if !last.is_some_and(|c| c.eq_ignore_ascii_case(b"chunked")) {
            return Expect::Refuse("transfer coding");
        }
        BodyFraming::Chunked
    } else {
        match length {
            None | Some(0) => BodyFraming::Empty,
            Some(n) => BodyFraming::Length(n),
        }
    };
    // §9.3: persistence. §6.3 (3): a request with both framings closes the connection.
    let connection: Vec<_> = fields.iter().filter(|f| is(f, "connection")).collect();
    let both_framings = te_at.is_some() && has_cl;
    let keep_alive = !both_framings
        && !connection.iter().any(|f| has_token(&f.1, "close"))
        && (version == Version::HTTP_11
            || connection.iter().any(|f| has_token(&f.1, "keep-alive")));
    let expect_continue = version == Version::HTTP_11
        && fields
            .iter()
            .rev()
            .find(|f| is(f, "expect"))
            .is_some_and(|f| f.1.eq_ignore_ascii_case(b"100-continue"));
    let wants_upgrade = version == Version::HTTP_11 && fields.iter().any(|f| is(f, "upgrade"));
    // Passed on: every field but Content-Length, which is passed on once, and not beside
    // Transfer-Encoding.
    let mut passed = Vec::new();
    let mut cl_seen = false;
    for f in fields {
        if is(&f, "content-length") {
            if te_at.is_some() || cl_seen {
                continue;
            }
            cl_seen = true;
        }
        passed.push(f);
    }
    Expect::Head(Box::new(Want {
        len,
        method,
        uri,
        version,
        fields: passed,
        framing,
        keep_alive,
        expect_continue,
        wants_upgrade,
    }))
}

// ---------------------------------------------------------------------------------------------------
// The checks
// ---------------------------------------------------------------------------------------------------

type Answer = Result<Option<(RequestHead, usize)>, HeadError>;

/// The parser's answer against the reference's.
fn agrees(answer: &Answer, expect: &Expect, max_size: usize) -> Result<(), TestCaseError> {
    match (expect, answer) {
        (Expect::Partial, Ok(None)) => {}
        (Expect::TooLarge, Err(HeadError::TooLarge(n))) => prop_assert_eq!(*n, max_size),
        (Expect::TooManyHeaders, Err(HeadError::TooManyHeaders(_)))
        | (Expect::Version, Err(HeadError::Version)) => {}
        (Expect::Refuse(_), Err(HeadError::Bad(_))) => {}
        (Expect::Head(want), Ok(Some((head, len)))) => {
            prop_assert_eq!(*len, want.len);
            prop_assert!(*len <= max_size);
            prop_assert_eq!(&head.method, &want.method);
            prop_assert_eq!(&head.uri, &want.uri);
            prop_assert_eq!(head.version, want.version);
            prop_assert_eq!(head.framing, want.framing);
            prop_assert_eq!(head.keep_alive, want.keep_alive, "keep-alive");
            prop_assert_eq!(
                head.expect_continue,
                want.expect_continue,
                "expect-continue"
            );
            prop_assert_eq!(head.wants_upgrade, want.wants_upgrade, "upgrade");
            // The fields passed on: the same values, in order, for each name.
            prop_assert_eq!(head.headers.len(), want.fields.len());
            for (name, _) in &want.fields {
                let got: Vec<&[u8]> = head
                    .headers
                    .get_all(name)
                    .iter()
                    .map(|v| v.as_bytes())
                    .collect();
                let wanted: Vec<&[u8]> = want
                    .fields
                    .iter()
                    .filter(|f| f.0 == *name)
                    .map(|f| f.1.as_slice())
                    .collect();
                prop_assert_eq!(got, wanted, "{}", name);
            }
            if let BodyFraming::Length(n) = head.framing {
                prop_assert!(n > 0);
                let cl = head.headers.get_all("content-length").iter().count();
                prop_assert_eq!(cl, 1);
            }
            if head.framing == BodyFraming::Chunked {
                prop_assert!(!head.headers.contains_key("content-length"));
            }
        }
        (e, a) => prop_assert!(false, "reference {:?}, parsed {:?}", e, a),
    }
    if let Err(e) = answer {
        let code = e.status().as_u16();
        prop_assert!(code == 400 || code == 431 || code == 505, "{}", code);
    }
    Ok(())
}

/// Every property of parsing `input`: it agrees with the reference, and the answer does not depend
/// on how the bytes arrive. Parsing keeps no state between calls, so a split at `k` is the prefix of
/// `k` bytes read first: every prefix before the first answer is incomplete, and every prefix from
/// there on gives that same answer.
fn check(input: &[u8], max_size: usize, max_headers: usize) -> Result<(), TestCaseError> {
    let whole = parse(input, max_size, max_headers);
    agrees(&whole, &reference(input, max_size, max_headers), max_size)?;
    let mut answered = false;
    for k in 0..input.len() {
        let prefix = parse(&input[..k], max_size, max_headers);
        if !answered && prefix == Ok(None) {
            continue;
        }
        answered = true;
        prop_assert_eq!(
            &prefix,
            &whole,
            "the first {} bytes disagree with all of them",
            k
        );
    }
    if let Ok(Some((_, len))) = &whole {
        // The head ends where the answer says it does: one byte less is incomplete.
        prop_assert_eq!(parse(&input[..len - 1], max_size, max_headers), Ok(None));
        prop_assert_eq!(&parse(&input[..*len], max_size, max_headers), &whole);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------
// Generated heads
// ---------------------------------------------------------------------------------------------------

fn request_line() -> impl Strategy<Value = String> {
    let method = prop_oneof![
        6 => prop::sample::select(vec!["GET", "POST", "PUT", "HEAD"]),
        1 => prop::sample::select(vec!["OPTIONS", "CONNECT"]),
        1 => prop::sample::select(vec!["PURGE", "get", "G(T", "M\u{e9}", ""]),
    ];
    let target = prop_oneof![
        8 => prop::sample::select(vec!["/", "/a?b=c", "/x/y%20z", "//x"]),
        2 => prop::sample::select(vec![
            "http://h/x", "https://h:8443", "http://[::1]:80/a", "foo+bar://h/",
        ]),
        2 => prop::sample::select(vec!["*", "h:443", "h", "127.0.0.1:80", "[::1]:443", "u@h:1"]),
        1 => prop::sample::select(vec![
            "http://", "h:443/x", "h:443?q", "h#f", "/a#f", "http:/x", "/caf\u{e9}", "%", "h:x",
        ]),
    ];
    // The forms that only suit one method, with it.
    let special = prop::sample::select(vec![
        ("OPTIONS", "*"),
        ("CONNECT", "h:443"),
        ("CONNECT", "[::1]:443"),
        ("CONNECT", "h"),
        ("CONNECT", "/x"),
        ("CONNECT", "h:443/x"),
    ]);
    let method_target = prop_oneof![
        4 => (method, target),
        1 => special.prop_map(|(m, t)| (m, t)),
    ];
    let version = prop_oneof![
        6 => Just("HTTP/1.1"),
        3 => Just("HTTP/1.0"),
        1 => prop::sample::select(vec!["HTTP/1.2", "HTTP/2.0", "http/1.1", "HTTP/1.10", "HTTP/1", ""]),
    ];
    (method_target, version).prop_map(|((m, t), v)| format!("{m} {t} {v}"))
}

fn coding_value() -> impl Strategy<Value = String> {
    let fine = prop::sample::select(vec!["chunked", "Chunked", "gzip, chunked"]);
    let any = prop::sample::select(vec![
        "chunked",
        "Chunked",
        "CHUNKED",
        " chunked ",
        "chunked,",
        ",chunked",
        "gzip",
        "gzip, chunked",
        "chunked, gzip",
        "chunked, chunked",
        "identity",
        "",
        "xchunked",
        "chunked;q=1",
        "chunked\t",
        "chunk",
        "chunked\x0b",
        "gzip\u{e9}, chunked",
    ]);
    prop_oneof![2 => fine, 1 => any].prop_map(str::to_owned)
}

fn header_line() -> impl Strategy<Value = String> {
    let token = "[A-Za-z0-9!#$%&'*+.^_`|~-]{1,12}";
    let text = "[ -~\t]{0,20}";
    prop_oneof![
        4 => length_value(10).prop_map(|v| format!("Content-Length: {v}")),
        4 => coding_value().prop_map(|v| format!("Transfer-Encoding: {v}")),
        2 => prop::sample::select(vec![
            "close", "keep-alive", "Keep-Alive", "Close, x", "x,close ", "", "upgrade", "keepalive",
            "closed", "caf\u{e9}, close",
        ])
        .prop_map(|v| format!("Connection: {v}")),
        1 => prop::sample::select(vec!["100-continue", "100-Continue", "100-continue, x", "x", ""])
            .prop_map(|v| format!("Expect: {v}")),
        1 => prop::sample::select(vec!["websocket", "h2c", ""]).prop_map(|v| format!("Upgrade: {v}")),
        1 => Just("Host: example.com".to_owned()),
        2 => (token, text).prop_map(|(n, v)| format!("{n}: {v}")),
        1 => prop::sample::select(vec![
            "Content-Length : 2", " Content-Length: 2", "Transfer-Encoding:\tchunked",
            "Content-Length:2", "X-Folded: a\r\n b", "X-Folded: a\r\n\tb", "Bad Name: 1", ": empty",
            "X-Nul: a\u{0}b", "X-Del: a\u{7f}", "X-Obs: caf\u{e9}", "No-Colon",
        ]).prop_map(str::to_owned),
    ]
}

/// A request head built from parts (lines ending in CRLF or LF, sometimes after empty lines), then
/// a body or the next request, then mutated.
fn structured_head() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::option::weighted(0.1, prop::sample::select(vec!["\r\n", "\n", "\r\n\r\n"])),
        request_line(),
        prop::collection::vec(header_line(), 0..6),
        prop::bool::weighted(0.9),
        prop_oneof![
            prop::collection::vec(byte(), 0..24),
            Just(b"GET /next HTTP/1.1\r\n\r\n".to_vec()),
        ],
        prop::option::weighted(0.5, edits()),
    )
        .prop_map(|(lead, line, headers, crlf, body, edits)| {
            let eol = if crlf { "\r\n" } else { "\n" };
            let mut out = lead.unwrap_or("").as_bytes().to_vec();
            out.extend_from_slice(line.as_bytes());
            out.extend_from_slice(eol.as_bytes());
            for h in headers {
                out.extend_from_slice(h.as_bytes());
                out.extend_from_slice(eol.as_bytes());
            }
            out.extend_from_slice(eol.as_bytes());
            out.extend_from_slice(&body);
            match edits {
                Some(edits) => mutate(out, &edits),
                None => out,
            }
        })
}

/// Limits: mostly roomy, sometimes about the size of a generated head.
fn max_size() -> impl Strategy<Value = usize> {
    prop_oneof![8 => Just(8192usize), 2 => 0usize..200, 1 => Just(0usize)]
}

fn max_headers() -> impl Strategy<Value = usize> {
    prop_oneof![8 => Just(100usize), 2 => 0usize..8, 1 => Just(200usize)]
}

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn request_heads_follow_rfc_9112(
        input in structured_head(),
        max_size in max_size(),
        max_headers in max_headers(),
    ) {
        check(&input, max_size, max_headers)?;
    }

    #[test]
    fn random_bytes_as_a_request_head(
        input in prop_oneof![
            prop::collection::vec(byte(), 0..200),
            prop::collection::vec(byte(), 0..64).prop_map(|mut v| {
                let mut out = b"POST / HTTP/1.1\r\n".to_vec();
                out.append(&mut v);
                out
            }),
        ],
        max_size in max_size(),
        max_headers in max_headers(),
    ) {
        check(&input, max_size, max_headers)?;
    }
}

/// Request smuggling shapes, each with what RFC 9112 (and hyper) make of it.
#[test]
fn smuggling_shapes() {
    let cases: &[(&str, Option<BodyFraming>)] = &[
        (
            "Content-Length: 5\r\nTransfer-Encoding: chunked",
            Some(BodyFraming::Chunked),
        ),
        (
            "Transfer-Encoding: chunked\r\nContent-Length: 5",
            Some(BodyFraming::Chunked),
        ),
        ("Content-Length: 5\r\nContent-Length: 6", None),
        (
            "Content-Length: 5\r\nContent-Length: 5",
            Some(BodyFraming::Length(5)),
        ),
        ("Content-Length: +5", None),
        ("Content-Length: 5, 5", None),
        ("Content-Length: 5\r\nContent-Length: 5, 5", None),
        ("Transfer-Encoding: gzip", None),
        ("Transfer-Encoding: chunked, gzip", None),
        (
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip",
            None,
        ),
        (
            "Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked",
            Some(BodyFraming::Chunked),
        ),
        ("Transfer-Encoding : chunked", None),
        ("Transfer-Encoding: chunked\r\n Content-Length: 5", None),
        ("Transfer-Encoding:\x0bchunked", None),
        ("Transfer-Encoding: xchunked", None),
    ];
    for (fields, framing) in cases {
        let input = format!("POST / HTTP/1.1\r\nHost: h\r\n{fields}\r\n\r\n");
        check(input.as_bytes(), 8192, 100).unwrap_or_else(|e| panic!("{fields:?}: {e}"));
        let got = parse(input.as_bytes(), 8192, 100);
        match framing {
            Some(f) => assert_eq!(got.unwrap().unwrap().0.framing, *f, "{fields:?}"),
            None => assert!(matches!(got, Err(HeadError::Bad(_))), "{fields:?}: {got:?}"),
        }
        // HTTP/1.0: any Transfer-Encoding is refused.
        let input = input.replacen("HTTP/1.1", "HTTP/1.0", 1);
        check(input.as_bytes(), 8192, 100).unwrap_or_else(|e| panic!("{fields:?}: {e}"));
        if fields.contains("Transfer-Encoding") {
            assert!(parse(input.as_bytes(), 8192, 100).is_err(), "{fields:?}");
        }
    }
}

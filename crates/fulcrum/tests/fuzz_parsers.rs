//! Fuzzing on stable: property tests over byte streams for the parsers that read bytes from outside —
//! the server's response head (`http::upstream::parse_head`), the chunked body decoder
//! (`http::chunked`) and the cookie a sticky pool reads (`http::route::cookie`, `sticky::Sticky`).
//!
//! Each parser is checked against a small independent reference written from RFC 9112 / 9110 here, so
//! "accepted" means "the RFC accepts it" and not merely "did not crash", and against itself: the same
//! bytes split into reads of any size give the same answer as in one piece, and the decoder always
//! makes progress (no endless loop). The committed corpus (`tests/corpus/`) is replayed on every run:
//! files named `accept-*` must parse, `reject-*` must be refused, `partial-*` must ask for more.
//!
//! The runs are short and deterministic (a fixed seed) so that they belong in the test command. For a
//! longer hunt: `FUZZ_CASES=200000 FUZZ_SEED=$RANDOM cargo test -p fulcrum --release --test
//! fuzz_parsers`; add what it finds to the corpus.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use bytes::BytesMut;
use common::fuzz::{byte_of, config, edits_of, length_value, mutate, Edits};
use fulcrum::http::chunked::{encode_size_line, ChunkedDecoder, Step};
use fulcrum::http::upstream::{parse_head, Framing, ResponseHead};
use http::header::{HeaderMap, HeaderValue, COOKIE};
use http::Method;
use proptest::prelude::*;

/// Bytes that matter to HTTP parsers, mixed into random input.
const ALPHABET: &[u8] = b"\r\n\r\n :;,=\"-+0123456789aAfFxX\t\x00\x0b\x7f\x80\xffHTP/.chunkedgzip";

fn byte() -> impl Strategy<Value = u8> {
    byte_of(ALPHABET)
}

fn edits() -> impl Strategy<Value = Edits> {
    edits_of(ALPHABET)
}

fn corpus(dir: &str) -> Vec<(String, Vec<u8>)> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus")
        .join(dir);
    let mut out: Vec<_> = std::fs::read_dir(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    out.sort();
    assert!(out.len() >= 10, "the {dir} corpus is there");
    out
}

// ---------------------------------------------------------------------------------------------------
// Response heads
// ---------------------------------------------------------------------------------------------------

/// What a parse came to, comparable.
#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    Partial,
    Error(String),
    Head { summary: String, rest: Vec<u8> },
}

fn summary(head: &ResponseHead) -> String {
    format!(
        "{} {:?} {:?} keep-alive={}",
        head.status, head.headers, head.framing, head.keep_alive
    )
}

fn parse_whole(input: &[u8], method: &Method) -> (Parsed, Option<ResponseHead>) {
    let mut buf = BytesMut::from(input);
    match parse_head(&mut buf, method) {
        Ok(None) => (Parsed::Partial, None),
        Err(e) => (Parsed::Error(e.to_string()), None),
        Ok(Some(head)) => (
            Parsed::Head {
                summary: summary(&head),
                rest: buf.to_vec(),
            },
            Some(head),
        ),
    }
}

/// Parses `input` as it would arrive in reads of `piece` bytes, as `UpstreamConn::read_head` does.
fn parse_in_pieces(input: &[u8], piece: usize, method: &Method) -> Parsed {
    let mut buf = BytesMut::new();
    let mut fed = 0;
    for part in input.chunks(piece.max(1)) {
        buf.extend_from_slice(part);
        fed += part.len();
        match parse_head(&mut buf, method) {
            Ok(None) => continue,
            Err(e) => return Parsed::Error(e.to_string()),
            Ok(Some(head)) => {
                // What follows the head: the rest of this read, then what had not arrived yet.
                let mut rest = buf.to_vec();
                rest.extend_from_slice(&input[fed..]);
                return Parsed::Head {
                    summary: summary(&head),
                    rest,
                };
            }
        }
    }
    Parsed::Partial
}

/// The transfer codings listed (RFC 9110 §5.6.1 lists: empty elements ignored, OWS trimmed).
fn list(values: &[&[u8]]) -> Vec<Vec<u8>> {
    values
        .iter()
        .flat_map(|v| v.split(|&b| b == b','))
        .map(|e| {
            let s = String::from_utf8_lossy(e);
            s.trim_matches([' ', '\t']).as_bytes().to_vec()
        })
        .filter(|e| !e.is_empty())
        .collect()
}

/// What RFC 9112 says of a response head, decided independently of fulcrum's parser: `Err` when
/// it must be refused, else the framing fulcrum must choose (`None` when httparse wants more bytes).
#[derive(Debug, PartialEq, Eq)]
enum Expect {
    Refuse(&'static str),
    Empty,
    Length(u64),
    Chunked,
    Close,
}

fn reference(input: &[u8], method: &Method) -> Option<Expect> {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(input) {
        Ok(httparse::Status::Partial) => return None,
        Err(_) => return Some(Expect::Refuse("not HTTP/1.x")),
        Ok(httparse::Status::Complete(_)) => {}
    }
    let code = resp.code.unwrap();
    let minor = resp.version.unwrap();
    if !(100..=599).contains(&code) {
        return Some(Expect::Refuse("status outside 100..=599"));
    }
    let values = |name: &str| -> Vec<&[u8]> {
        resp.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
            .collect()
    };
    // Content-Length: every element digits only, all the same (RFC 9110 §8.6), even without a body.
    let cl_values = values("content-length");
    let mut length: Option<u64> = None;
    for v in &cl_values {
        for e in v.split(|&b| b == b',') {
            let s = std::str::from_utf8(e)
                .unwrap_or("x")
                .trim_matches([' ', '\t']);
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Some(Expect::Refuse("content-length"));
            }
            let Ok(n) = s.parse::<u64>() else {
                return Some(Expect::Refuse("content-length overflow"));
            };
            if length.is_some_and(|l| l != n) {
                return Some(Expect::Refuse("content-length conflict"));
            }
            length = Some(n);
        }
    }
    // Names and values the http crate would refuse.
    for h in resp.headers.iter() {
        if http::HeaderName::from_bytes(h.name.as_bytes()).is_err()
            || HeaderValue::from_bytes(h.value).is_err()
        {
            return Some(Expect::Refuse("header"));
        }
    }
    if *method == Method::HEAD || (100..200).contains(&code) || code == 204 || code == 304 {
        return Some(Expect::Empty);
    }
    let te = values("transfer-encoding");
    if !te.is_empty() {
        if minor == 0 {
            return Some(Expect::Refuse("transfer-encoding in HTTP/1.0"));
        }
        let codings = list(&te);
        if codings.len() != 1 || !codings[0].eq_ignore_ascii_case(b"chunked") {
            return Some(Expect::Refuse("transfer coding"));
        }
        return Some(Expect::Chunked);
    }
    Some(match length {
        Some(0) => Expect::Empty,
        Some(n) => Expect::Length(n),
        None => Expect::Close,
    })
}

/// Every property of a response head parse of `input`.
fn check_head(input: &[u8], method: &Method, pieces: &[usize]) -> Result<(), TestCaseError> {
    let (whole, head) = parse_whole(input, method);
    for &piece in pieces {
        let split = parse_in_pieces(input, piece, method);
        prop_assert_eq!(&split, &whole, "reads of {} bytes disagree", piece);
    }
    let expect = reference(input, method);
    match (&expect, &whole, head) {
        (None, Parsed::Partial, _) => {}
        (Some(Expect::Refuse(why)), parsed, _) => {
            prop_assert!(
                matches!(parsed, Parsed::Error(_)),
                "must refuse ({}): {:?}",
                why,
                parsed
            );
        }
        (Some(framing), Parsed::Head { .. }, Some(head)) => {
            let cl: Vec<_> = head.headers.get_all("content-length").iter().collect();
            match (framing, &head.framing) {
                (Expect::Empty, Framing::Empty) | (Expect::Close, Framing::Close) => {}
                (Expect::Length(n), Framing::Length(m)) => {
                    prop_assert_eq!(n, m);
                    // One field, its canonical value, is passed on.
                    prop_assert_eq!(cl.len(), 1);
                    let canonical = n.to_string();
                    prop_assert_eq!(cl[0].as_bytes(), canonical.as_bytes());
                }
                (Expect::Chunked, Framing::Chunked(_)) => {
                    prop_assert!(cl.is_empty(), "Content-Length passed on beside chunked");
                }
                (e, f) => prop_assert!(false, "framing {:?} where RFC 9112 says {:?}", f, e),
            }
            prop_assert!((100..=599).contains(&head.status.as_u16()));
            if matches!(head.framing, Framing::Close) {
                prop_assert!(!head.keep_alive);
            }
            for v in head.headers.values() {
                prop_assert!(!v
                    .as_bytes()
                    .iter()
                    .any(|&b| b == b'\r' || b == b'\n' || b == 0));
            }
        }
        (e, p, _) => prop_assert!(false, "reference {:?}, parsed {:?}", e, p),
    }
    Ok(())
}

fn method() -> impl Strategy<Value = Method> {
    prop_oneof![
        4 => Just(Method::GET),
        1 => Just(Method::HEAD),
        1 => Just(Method::POST)
    ]
}

fn status_line() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec![
            "HTTP/1.1 200 OK", "HTTP/1.0 200 OK", "HTTP/1.1 204 No Content", "HTTP/1.1 304 Not Modified",
            "HTTP/1.1 100 Continue", "HTTP/1.1 101 Switching Protocols", "HTTP/1.1 404 ", "HTTP/1.1 200",
            "HTTP/1.1 599 X", "HTTP/1.1 600 X", "HTTP/1.1 999 X", "HTTP/1.1 099 X", "HTTP/2 200 OK",
            "HTTP/1.1 2000 OK", "HTTP/1.1  200 OK", "http/1.1 200 OK", "HTTP/1.2 200 OK",
        ]).prop_map(str::to_owned),
        1 => (0u16..1000).prop_map(|c| format!("HTTP/1.1 {c:03} R")),
    ]
}

fn coding_value() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
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
    ])
    .prop_map(str::to_owned)
}

fn header_line() -> impl Strategy<Value = String> {
    let token = "[A-Za-z0-9!#$%&'*+.^_`|~-]{1,12}";
    let text = "[ -~\t]{0,20}";
    prop_oneof![
        3 => length_value(3).prop_map(|v| format!("Content-Length: {v}")),
        3 => coding_value().prop_map(|v| format!("Transfer-Encoding: {v}")),
        1 => prop::sample::select(vec!["close", "keep-alive", "Close, x", "", "upgrade"])
            .prop_map(|v| format!("Connection: {v}")),
        2 => (token, text).prop_map(|(n, v)| format!("{n}: {v}")),
        1 => prop::sample::select(vec![
            "Content-Length : 2", " Content-Length: 2", "Transfer-Encoding:\tchunked",
            "Content-Length:2", "X-Folded: a\r\n b", "Bad Name: 1", ": empty", "X-Nul: a\x00b",
        ]).prop_map(str::to_owned),
    ]
}

/// A response head built from parts (lines ending in CRLF or LF), then a body, then mutated.
fn structured_head() -> impl Strategy<Value = Vec<u8>> {
    (
        status_line(),
        prop::collection::vec(header_line(), 0..6),
        prop::bool::weighted(0.9),
        prop::collection::vec(byte(), 0..24),
        edits(),
    )
        .prop_map(|(status, headers, crlf, body, edits)| {
            let eol = if crlf { "\r\n" } else { "\n" };
            let mut out = status.into_bytes();
            out.extend_from_slice(eol.as_bytes());
            for h in headers {
                out.extend_from_slice(h.as_bytes());
                out.extend_from_slice(eol.as_bytes());
            }
            out.extend_from_slice(eol.as_bytes());
            out.extend_from_slice(&body);
            mutate(out, &edits)
        })
}

proptest! {
    #![proptest_config(config(2048))]

    #[test]
    fn response_heads_follow_rfc_9112(
        input in structured_head(),
        method in method(),
        pieces in prop::collection::vec(1usize..16, 1..3),
    ) {
        check_head(&input, &method, &pieces)?;
    }

    #[test]
    fn random_bytes_as_a_response_head(
        input in prop_oneof![
            prop::collection::vec(byte(), 0..200),
            prop::collection::vec(byte(), 0..64).prop_map(|mut v| {
                let mut out = b"HTTP/1.1 200 OK\r\n".to_vec();
                out.append(&mut v);
                out
            }),
        ],
        method in method(),
        piece in 1usize..8,
    ) {
        check_head(&input, &method, &[piece])?;
    }
}

#[test]
fn response_head_corpus() {
    for (name, input) in corpus("response_heads") {
        for method in [Method::GET, Method::HEAD] {
            check_head(&input, &method, &[1, 3, 7]).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        let (parsed, _) = parse_whole(&input, &Method::GET);
        match name.split('-').next().unwrap() {
            "accept" => assert!(matches!(parsed, Parsed::Head { .. }), "{name}: {parsed:?}"),
            "reject" => assert!(matches!(parsed, Parsed::Error(_)), "{name}: {parsed:?}"),
            "partial" => assert_eq!(parsed, Parsed::Partial, "{name}"),
            _ => panic!("{name}: corpus files are named accept-, reject- or partial-"),
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Chunked bodies
// ---------------------------------------------------------------------------------------------------

/// What decoding came to: the data, and how it ended (`Ok(rest)` complete with the bytes after it,
/// `Err(None)` needs more, `Err(Some(_))` malformed).
type Decoded = (Vec<u8>, Result<Vec<u8>, Option<String>>);

/// Decodes `input` as it arrives in reads of `piece` bytes, checking the decoder's contract at each
/// step: data is never empty, `NeedMore` means the buffer was used up, and every call makes progress.
fn decode(input: &[u8], piece: usize) -> Result<Decoded, TestCaseError> {
    let mut d = ChunkedDecoder::default();
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut calls = 0usize;
    let mut fed = 0;
    for part in input.chunks(piece.max(1)) {
        buf.extend_from_slice(part);
        fed += part.len();
        loop {
            calls += 1;
            prop_assert!(calls <= 2 * input.len() + 2, "no progress");
            match d.step(&mut buf) {
                Ok(Step::Data(b)) => {
                    prop_assert!(!b.is_empty());
                    out.extend_from_slice(&b);
                }
                Ok(Step::NeedMore) => {
                    prop_assert!(buf.is_empty(), "NeedMore with bytes left");
                    prop_assert!(!d.is_done());
                    break;
                }
                Ok(Step::Done) => {
                    prop_assert!(d.is_done());
                    // Done again, and nothing more consumed.
                    let left = buf.len();
                    prop_assert_eq!(d.step(&mut buf), Ok(Step::Done));
                    prop_assert_eq!(buf.len(), left);
                    let mut rest = buf.to_vec();
                    rest.extend_from_slice(&input[fed..]);
                    return Ok((out, Ok(rest)));
                }
                Err(e) => return Ok((out, Err(Some(e.to_string())))),
            }
        }
    }
    Ok((out, Err(None)))
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_text(b: u8) -> bool {
    b == b'\t' || (b >= 0x20 && b != 0x7f)
}

/// An independent, whole-input reading of RFC 9112 §7.1 (with one tolerance: whitespace after the
/// chunk size): `Some((data, consumed))` for a complete body, `None` for a prefix of one, `Err` for
/// bytes no chunked body starts with.
fn reference_chunked(input: &[u8]) -> Result<Option<(Vec<u8>, usize)>, &'static str> {
    let mut i = 0;
    let mut data = Vec::new();
    // A line: the bytes up to CRLF (`None`: not there yet), checked by `ok`.
    let line =
        |i: usize, ok: &dyn Fn(&[u8]) -> bool| -> Result<Option<(usize, usize)>, &'static str> {
            let mut j = i;
            while j < input.len() {
                match input[j] {
                    b'\r' => {
                        if !ok(&input[i..j]) {
                            return Err("bad line");
                        }
                        return match input.get(j + 1) {
                            None => Ok(None),
                            Some(b'\n') => Ok(Some((j, j + 2))),
                            Some(_) => Err("CR without LF"),
                        };
                    }
                    b'\n' => return Err("bare LF"),
                    _ => j += 1,
                }
            }
            // Incomplete: the prefix must be able to become a valid line.
            if ok_prefix(&input[i..], ok) {
                Ok(None)
            } else {
                Err("bad line")
            }
        };
    loop {
        let size_ok = |l: &[u8]| size_line(l).is_some();
        let Some((end, next)) = line(i, &size_ok)? else {
            return Ok(None);
        };
        let size = size_line(&input[i..end]).ok_or("size")?;
        i = next;
        if size == 0 {
            break;
        }
        let size = usize::try_from(size).map_err(|_| "size")?;
        if input.len() - i < size {
            return Ok(None);
        }
        data.extend_from_slice(&input[i..i + size]);
        i += size;
        match input.get(i..i + 2) {
            Some(b"\r\n") => i += 2,
            Some(_) => return Err("no CRLF after data"),
            None if input[i..].iter().all(|&b| b == b'\r') && input.len() - i < 2 => {
                return Ok(None)
            }
            None => return Err("no CRLF after data"),
        }
    }
    loop {
        let trailer_ok = |l: &[u8]| {
            l.is_empty() || {
                let colon = l.iter().position(|&b| b == b':');
                colon.is_some_and(|c| {
                    c > 0
                        && l[..c].iter().all(|&b| is_tchar(b))
                        && l[c + 1..].iter().all(|&b| is_text(b))
                })
            }
        };
        let Some((end, next)) = line(i, &trailer_ok)? else {
            return Ok(None);
        };
        let empty = end == i;
        i = next;
        if empty {
            return Ok(Some((data, i)));
        }
    }
}

/// Can `partial` (no CR or LF in it) still become a line `ok` accepts? Checked by trying plausible
/// completions, which is enough for the shapes these lines have.
fn ok_prefix(partial: &[u8], ok: &dyn Fn(&[u8]) -> bool) -> bool {
    [&b""[..], b"0", b":", b"0;", b"a:"]
        .iter()
        .any(|tail| ok(&[partial, tail].concat()))
}

/// A chunk-size line (without CRLF): `1*HEXDIG *(SP/HTAB) [";" ext]`, ext any text.
fn size_line(l: &[u8]) -> Option<u64> {
    let digits = l.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return None;
    }
    let mut n: u64 = 0;
    for &b in &l[..digits] {
        n = n
            .checked_mul(16)?
            .checked_add(u64::from((b as char).to_digit(16)?))?;
    }
    let rest = &l[digits..];
    let ws = rest
        .iter()
        .take_while(|&&b| b == b' ' || b == b'\t')
        .count();
    match rest.get(ws) {
        None => Some(n),
        Some(b';') if rest[ws + 1..].iter().all(|&b| is_text(b)) => Some(n),
        _ => None,
    }
}

/// Every property of decoding `input`.
fn check_chunked(input: &[u8], pieces: &[usize]) -> Result<Decoded, TestCaseError> {
    let whole = decode(input, input.len().max(1))?;
    for &piece in pieces {
        let split = decode(input, piece)?;
        prop_assert_eq!(&split, &whole, "reads of {} bytes disagree", piece);
    }
    // `check` agrees with decoding: it refuses exactly what decoding finds malformed.
    prop_assert_eq!(
        ChunkedDecoder::default().check(input).is_err(),
        matches!(whole.1, Err(Some(_)))
    );
    // And the decoder agrees with the reference reading of the RFC.
    match (reference_chunked(input), &whole) {
        (Ok(Some((data, consumed))), (out, Ok(rest))) => {
            prop_assert_eq!(&data, out);
            prop_assert_eq!(&input[consumed..], &rest[..]);
        }
        (Ok(None), (_, Err(None))) | (Err(_), (_, Err(Some(_)))) => {}
        (r, d) => prop_assert!(false, "reference {:?}, decoder {:?}", r, d),
    }
    Ok(whole)
}

/// A valid chunked encoding of `chunks` (with extensions and trailers), then `after`.
fn encode(
    chunks: &[Vec<u8>],
    exts: &[String],
    trailers: &[(String, String)],
    after: &[u8],
) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, chunk) in chunks.iter().enumerate().filter(|(_, c)| !c.is_empty()) {
        encode_size_line(chunk.len(), &mut out);
        if let Some(ext) = exts.get(i).filter(|e| !e.is_empty()) {
            // Extensions go before the CRLF of the size line.
            out.truncate(out.len() - 2);
            out.extend_from_slice(format!(";{ext}\r\n").as_bytes());
        }
        out.extend_from_slice(chunk);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n");
    for (name, value) in trailers {
        out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(after);
    out
}

/// A chunked body to encode: chunks, their extensions, trailers, and the bytes after the body.
type ChunkedParts = (Vec<Vec<u8>>, Vec<String>, Vec<(String, String)>, Vec<u8>);

fn chunked_body() -> impl Strategy<Value = ChunkedParts> {
    (
        prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 0..6),
        prop::collection::vec("([a-z]{1,5}(=[a-z0-9]{1,5}|=\"[ a-z]{0,5}\")?)?", 0..6),
        prop::collection::vec(("[A-Za-z][A-Za-z0-9-]{0,8}", "[ -~]{0,12}"), 0..3),
        prop::collection::vec(any::<u8>(), 0..20),
    )
}

proptest! {
    #![proptest_config(config(1024))]

    #[test]
    fn chunked_round_trip(body in chunked_body(), pieces in prop::collection::vec(1usize..64, 1..3)) {
        let (chunks, exts, trailers, after) = body;
        let input = encode(&chunks, &exts, &trailers, &after);
        let (data, end) = check_chunked(&input, &pieces)?;
        prop_assert_eq!(data, chunks.concat());
        prop_assert_eq!(end, Ok(after));
    }

    #[test]
    fn mutated_chunked_bodies_follow_rfc_9112(
        body in chunked_body(),
        edits in edits(),
        insert in prop::option::of((any::<prop::sample::Index>(), prop::collection::vec(byte(), 1..4))),
        pieces in prop::collection::vec(1usize..16, 1..3),
    ) {
        let (chunks, exts, trailers, after) = body;
        let mut input = encode(&chunks, &exts, &trailers, &after);
        if let Some((at, bytes)) = insert {
            let at = at.index(input.len() + 1);
            input.splice(at..at, bytes);
        }
        let input = mutate(input, &edits);
        let _ = check_chunked(&input, &pieces)?;
    }

    #[test]
    fn random_bytes_as_a_chunked_body(
        input in prop::collection::vec(byte(), 0..120),
        piece in 1usize..8,
    ) {
        let _ = check_chunked(&input, &[piece])?;
    }
}

#[test]
fn chunked_corpus() {
    for (name, input) in corpus("chunked") {
        let (_, end) = check_chunked(&input, &[1, 2, 5]).unwrap_or_else(|e| panic!("{name}: {e}"));
        match name.split('-').next().unwrap() {
            "accept" => assert!(end.is_ok(), "{name}: {end:?}"),
            "reject" => assert!(matches!(end, Err(Some(_))), "{name}: {end:?}"),
            "partial" => assert_eq!(end, Err(None), "{name}"),
            _ => panic!("{name}: corpus files are named accept-, reject- or partial-"),
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// The sticky cookie
// ---------------------------------------------------------------------------------------------------

fn cookie_header() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(
            prop::sample::select(&b"FULCRUM_SRV=; \"\t,abcdef0123456789xyz\x80\xff"[..]),
            0..120
        ),
        prop::collection::vec(any::<u8>(), 0..60),
    ]
}

struct StickyPool {
    sticky: fulcrum::sticky::Sticky,
    pool: fulcrum::pool::Pool,
    rt: tokio::runtime::Runtime,
}

/// A pool of two servers with a sticky cookie (built once).
fn sticky_pool() -> &'static StickyPool {
    static POOL: std::sync::OnceLock<StickyPool> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        let text = "[admin]\nbind = \"127.0.0.1:0\"\n\
            [[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\npool = \"p\"\n\
            [[pools]]\nname = \"p\"\nservers = [{ name = \"a\", address = \"127.0.0.1:1\" }, { name = \"b\", address = \"127.0.0.1:2\" }]\n\
            [pools.sticky]\nkind = \"cookie\"\nsecret = \"a secret of sixteen or more\"\n";
        let cfg = fulcrum::config::parse(text, "fuzz.toml").unwrap();
        let p = &cfg.pools[0];
        StickyPool {
            sticky: fulcrum::sticky::Sticky::new(&p.name, p.sticky.as_ref().unwrap(), &cfg.store)
                .unwrap(),
            pool: fulcrum::pool::Pool::new(p),
            rt: tokio::runtime::Builder::new_current_thread().build().unwrap(),
        }
    })
}

impl StickyPool {
    fn lookup(&self, cookie: &[u8]) -> Option<usize> {
        let mut headers = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_bytes(cookie) {
            headers.insert(COOKIE, v);
        }
        let snapshot = self.pool.snapshot_full();
        self.rt
            .block_on(
                self.sticky
                    .lookup(&headers, IpAddr::V4(Ipv4Addr::LOCALHOST), &snapshot),
            )
            .server
    }
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn cookie_values_are_read_without_surprises(header in cookie_header(), name in "[A-Z_]{1,12}") {
        let mut headers = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_bytes(&header) {
            headers.insert(COOKIE, v);
        }
        if let Some(value) = fulcrum::http::route::cookie(&headers, &name) {
            prop_assert!(!value.contains(';'));
            let text = String::from_utf8_lossy(&header);
            let pair = format!("{name}=");
            prop_assert!(text.contains(&pair));
            prop_assert!(text.contains(value));
        }
    }

    #[test]
    fn only_a_servers_own_cookie_sticks_to_it(
        header in cookie_header(),
        before in "([a-z]{1,4}=[a-z0-9]{0,4}; ){0,2}",
        after in "(; [a-z]{1,4}=[a-z0-9]{0,4}){0,2}",
        which in 0usize..2,
    ) {
        let p = sticky_pool();
        // Made-up values never stick, whatever their shape.
        let server = p.lookup(&header);
        let real = ["a", "b"].map(|s| p.sticky.cookie_value(s));
        if let Some(i) = server {
            prop_assert!(String::from_utf8_lossy(&header).contains(&real[i]));
        }
        // The real value sticks, among other cookies.
        let value = &real[which];
        let cookie = format!("{before}FULCRUM_SRV={value}{after}");
        prop_assert_eq!(p.lookup(cookie.as_bytes()), Some(which));
        // One character changed, it does not.
        let mut forged = value.clone().into_bytes();
        forged[which * 7] ^= 1;
        let forged = format!("FULCRUM_SRV={}", String::from_utf8_lossy(&forged));
        prop_assert_eq!(p.lookup(forged.as_bytes()), None);
    }
}

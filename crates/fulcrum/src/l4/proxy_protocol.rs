//! The PROXY protocol (HAProxy's `proxy-protocol.txt`, versions 1 and 2): the header a TCP listener
//! sends a server ahead of the client's bytes so the server learns the client's address, and the
//! header it reads from a trusted load balancer in front of it for the same reason.
//!
//! Encoding and parsing are the `proxy-header` crate's; this module adds what a listener needs around
//! them:
//! - [`encode`] always produces a header the spec allows, whatever the mix of address families.
//! - [`read`] is bounded: it reads at most 107 bytes of a version 1 header (the spec's longest line) and
//!   at most [`MAX_V2`] bytes of a version 2 one, the whole header within a timeout, and refuses bytes
//!   that cannot begin a PROXY header as soon as it sees them. It reads a version 2 header exactly
//!   (its length is in its first 16 bytes); a version 1 line has no length, so the bytes read past its
//!   CRLF are handed back ([`Received::leftover`]) for the caller to forward first.
//!
//! Which peers may send a header is the caller's decision (a header from anyone else would let them
//! claim any address): [`read`] trusts what it parses.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use proxy_header::{ParseConfig, ProxiedAddress, ProxyHeader};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::config::ProxyProtocol;

/// The longest version 1 header, CRLF included (the spec's worst case, `PROXY UNKNOWN` with two
/// full-length IPv6 addresses and ports).
pub const MAX_V1: usize = 107;
/// The longest version 2 header [`read`] accepts, TLVs included. The spec allows 16 + 65535 bytes; a
/// header with addresses is at most 16 + 216 (AF_UNIX) bytes before TLVs, and real senders' TLVs (ALPN,
/// authority, SSL details, unique ID up to 128 bytes) fit well within this.
pub const MAX_V2: usize = 4096;

/// The version 1 signature: `PROXY` and one space.
const V1_SIGNATURE: &[u8] = b"PROXY ";
/// The version 2 signature (12 bytes, a NUL among them).
const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
/// A version 2 header's fixed part: the signature, version and command, family and protocol, length.
const V2_FIXED: usize = 16;

/// The header for a server: the PROXY protocol `version` header of a TCP connection from `client`
/// that fulcrum accepted on `local`, to be written before any of the client's bytes.
///
/// The spec requires both addresses of a header to be of one family (version 1: the destination
/// "matches the same family"; version 2: one address family byte for both). So:
/// - An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, what a dual-stack socket reports for an IPv4
///   peer) is first taken as the IPv4 address it is; a dual-stack listener's IPv4 clients are thus
///   announced as `TCP4` / AF_INET, as if the listener had been IPv4 only.
/// - If the families still differ, the IPv4 address is written as its IPv4-mapped IPv6 form and the
///   header is `TCP6` / AF_INET6. `UNKNOWN` (version 1) or AF_UNSPEC (version 2) would also be allowed,
///   but they carry no address at all, and the spec says a sender should use them only "when it is not
///   possible to correctly fill the PROXY line", which is not the case: an IPv4-mapped address is a
///   valid 128-bit IPv6 address that denotes the same IPv4 host. In version 1 it is written
///   `::ffff:a.b.c.d` (RFC 5952's text form), which `inet_pton`-based receivers accept.
///
/// The header carries no TLVs. IPv6 scope IDs and flow labels are not part of the protocol and are
/// dropped.
pub fn encode(version: ProxyProtocol, client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let (source, destination) = one_family(client, local);
    let header = ProxyHeader::with_address(ProxiedAddress::stream(source, destination));
    let mut out = Vec::with_capacity(MAX_V1);
    let encoded = match version {
        ProxyProtocol::V1 => header.encode_v1(&mut out),
        ProxyProtocol::V2 => header.encode_v2(&mut out),
    };
    // The encoder fails only for mixed families, TLVs in version 1, a non-TCP protocol in version 1
    // or more than 64 KiB of TLVs; none of these can happen here.
    encoded.expect("a TCP header with one address family and no TLVs always encodes");
    out
}

/// `client` and `local` in one address family: IPv4-mapped addresses unmapped, then an IPv4 address
/// mapped to IPv6 if the other one is IPv6.
fn one_family(client: SocketAddr, local: SocketAddr) -> (SocketAddr, SocketAddr) {
    let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let (client, local) = (canonical(client), canonical(local));
    let mapped = |a: SocketAddr| match a.ip() {
        IpAddr::V4(ip) => SocketAddr::new(IpAddr::V6(ip.to_ipv6_mapped()), a.port()),
        IpAddr::V6(_) => a,
    };
    if client.is_ipv4() == local.is_ipv4() {
        (client, local)
    } else {
        (mapped(client), mapped(local))
    }
}

/// A PROXY header read from a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// The client's address as the header gives it; `None` when the header gives none (a version 2
    /// `LOCAL` command, e.g. the sender's health check; version 1 `UNKNOWN`; version 2 AF_UNSPEC or
    /// AF_UNIX): then the connection's own peer address stands. A version 2 header of a datagram
    /// protocol gives its source too.
    pub source: Option<SocketAddr>,
    /// The client's bytes read past the header (only ever after a version 1 line, at most
    /// [`MAX_V1`] − 15 bytes): to be forwarded before the rest of the stream.
    pub leftover: Vec<u8>,
}

/// Why no PROXY header could be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    /// The whole header did not arrive within the timeout.
    #[error("the PROXY header did not arrive in time")]
    Timeout,
    /// The connection ended (or reading it failed, e.g. reset) before the header was complete.
    #[error("the connection closed before the PROXY header was complete")]
    Closed,
    /// The bytes are not a valid PROXY header; this includes bytes that are no PROXY header at all
    /// (a client that sends none).
    #[error("malformed PROXY header: {0}")]
    Malformed(String),
    /// A version 1 line without CRLF within [`MAX_V1`] bytes, or a version 2 header longer than
    /// [`MAX_V2`].
    #[error("PROXY header too long")]
    TooLong,
}

/// Reads a PROXY header (version 1 or 2, whichever arrives) from the start of `stream`, all of it
/// within `timeout`.
///
/// It reads into a buffer (never peeks), never more than the longest header allowed: a version 2
/// header is read exactly, a version 1 line may come with up to [`MAX_V1`] − 15 bytes of what follows
/// it, returned in [`Received::leftover`]. TLVs are skipped. Bytes that cannot begin either signature
/// are refused at once, without waiting for more.
pub async fn read<S: AsyncRead + Unpin>(
    stream: &mut S,
    timeout: Duration,
) -> Result<Received, ProxyError> {
    tokio::time::timeout(timeout, read_header(stream))
        .await
        .unwrap_or(Err(ProxyError::Timeout))
}

async fn read_header<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Received, ProxyError> {
    let mut buf = Vec::with_capacity(MAX_V1);
    loop {
        let want = next_read(&buf)?;
        let start = buf.len();
        buf.resize(start + want, 0);
        let n = match stream.read(&mut buf[start..]).await {
            Ok(0) | Err(_) => return Err(ProxyError::Closed),
            Ok(n) => n,
        };
        buf.truncate(start + n);
        if let Some(received) = parse(&buf)? {
            return Ok(received);
        }
    }
}

/// The most bytes to read next, given what has been read so far (an incomplete header): enough to
/// finish a version 2 header exactly, at most what a version 1 line may still take.
fn next_read(buf: &[u8]) -> Result<usize, ProxyError> {
    match buf.first() {
        // Both headers are at least 15 bytes: read a version 2 header's fixed part.
        None => Ok(V2_FIXED),
        Some(b'P') => Ok(MAX_V1 - buf.len()),
        Some(_) if buf.len() < V2_FIXED => Ok(V2_FIXED - buf.len()),
        Some(_) => Ok(v2_len(buf)? - buf.len()),
    }
}

/// The whole length of a version 2 header whose fixed part is in `buf`.
fn v2_len(buf: &[u8]) -> Result<usize, ProxyError> {
    let len = V2_FIXED + usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if len > MAX_V2 {
        return Err(ProxyError::TooLong);
    }
    Ok(len)
}

/// The header in `buf` if it is complete, `None` if more bytes are needed.
fn parse(buf: &[u8]) -> Result<Option<Received>, ProxyError> {
    let signature = if buf[0] == b'P' {
        V1_SIGNATURE
    } else {
        V2_SIGNATURE
    };
    let n = buf.len().min(signature.len());
    if buf[..n] != signature[..n] {
        return Err(ProxyError::Malformed(
            "not a PROXY protocol signature".into(),
        ));
    }
    // What the parser is given: for version 1, the line up to its first LF once there is one (so it
    // never looks into the client's bytes, and decides at once); for version 2, everything (never
    // more than the header, see `next_read`).
    let mut header = buf;
    let mut complete = false;
    if signature == V1_SIGNATURE {
        match buf.iter().position(|&b| b == b'\n') {
            Some(lf) if lf == 0 || buf[lf - 1] != b'\r' => {
                return Err(ProxyError::Malformed("line not ended by CRLF".into()));
            }
            Some(lf) => {
                header = &buf[..=lf];
                complete = true;
            }
            None if buf.len() >= MAX_V1 => return Err(ProxyError::TooLong),
            None => {}
        }
    } else if buf.len() >= V2_FIXED {
        // Refuse a header that is too long before reading its body.
        v2_len(buf)?;
    }
    let config = ParseConfig {
        include_tlvs: false,
        allow_v1: true,
        allow_v2: true,
    };
    match ProxyHeader::parse(header, config) {
        Ok((parsed, consumed)) => Ok(Some(Received {
            source: parsed.proxied_address().map(|a| a.source),
            leftover: buf[consumed..].to_vec(),
        })),
        Err(proxy_header::Error::BufferTooShort) if complete => {
            Err(ProxyError::Malformed("incomplete version 1 line".into()))
        }
        Err(proxy_header::Error::BufferTooShort) => Ok(None),
        Err(e) => Err(ProxyError::Malformed(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};
    use tokio::io::{AsyncWriteExt, DuplexStream};

    const TIMEOUT: Duration = Duration::from_secs(5);

    fn v4() -> (SocketAddr, SocketAddr) {
        (
            "192.0.2.10:40001".parse().unwrap(),
            "198.51.100.2:443".parse().unwrap(),
        )
    }

    fn v6() -> (SocketAddr, SocketAddr) {
        (
            "[2001:db8::10]:40001".parse().unwrap(),
            "[2001:db8:1::2]:443".parse().unwrap(),
        )
    }

    /// A stream that yields `bytes` and then stays open (the writer is returned to keep it so).
    async fn open_with(bytes: &[u8]) -> (DuplexStream, DuplexStream) {
        let (mut w, r) = tokio::io::duplex(64 * 1024);
        w.write_all(bytes).await.unwrap();
        (w, r)
    }

    /// A stream that yields `bytes` and then ends.
    async fn closed_with(bytes: &[u8]) -> DuplexStream {
        let (w, r) = open_with(bytes).await;
        drop(w);
        r
    }

    async fn rest(mut r: DuplexStream) -> Vec<u8> {
        let mut out = Vec::new();
        r.read_to_end(&mut out).await.unwrap();
        out
    }

    #[test]
    fn encodes_the_spec_s_v1_lines() {
        let (c, l) = v4();
        assert_eq!(
            encode(ProxyProtocol::V1, c, l),
            b"PROXY TCP4 192.0.2.10 198.51.100.2 40001 443\r\n"
        );
        let (c, l) = v6();
        assert_eq!(
            encode(ProxyProtocol::V1, c, l),
            b"PROXY TCP6 2001:db8::10 2001:db8:1::2 40001 443\r\n"
        );
    }

    #[test]
    fn encodes_v2_binary_proxy_commands() {
        let (c, l) = v4();
        let h = encode(ProxyProtocol::V2, c, l);
        let mut want = V2_SIGNATURE.to_vec();
        want.extend_from_slice(&[0x21, 0x11, 0, 12, 192, 0, 2, 10, 198, 51, 100, 2]);
        want.extend_from_slice(&40001u16.to_be_bytes());
        want.extend_from_slice(&443u16.to_be_bytes());
        assert_eq!(h, want);
        let (c, l) = v6();
        let h = encode(ProxyProtocol::V2, c, l);
        assert_eq!(&h[..16], &[V2_SIGNATURE, &[0x21, 0x21, 0, 36]].concat()[..]);
        assert_eq!(h.len(), 16 + 36);
    }

    #[tokio::test]
    async fn every_encoded_header_reads_back() {
        for version in [ProxyProtocol::V1, ProxyProtocol::V2] {
            for (c, l) in [v4(), v6()] {
                let mut r = closed_with(&encode(version, c, l)).await;
                let got = read(&mut r, TIMEOUT).await.unwrap();
                assert_eq!(got.source, Some(c), "{version:?} {c}");
                assert!(got.leftover.is_empty());
                assert!(rest(r).await.is_empty());
            }
        }
    }

    #[tokio::test]
    async fn mixed_families_become_ipv6_with_the_ipv4_address_mapped() {
        let c4: SocketAddr = "192.0.2.10:40001".parse().unwrap();
        let l6: SocketAddr = "[2001:db8:1::2]:443".parse().unwrap();
        assert_eq!(
            encode(ProxyProtocol::V1, c4, l6),
            b"PROXY TCP6 ::ffff:192.0.2.10 2001:db8:1::2 40001 443\r\n"
        );
        let mapped = SocketAddr::new(
            IpAddr::V6(Ipv4Addr::new(192, 0, 2, 10).to_ipv6_mapped()),
            40001,
        );
        for version in [ProxyProtocol::V1, ProxyProtocol::V2] {
            let mut r = closed_with(&encode(version, c4, l6)).await;
            assert_eq!(read(&mut r, TIMEOUT).await.unwrap().source, Some(mapped));
            // The other way round: the local IPv4 address is the mapped one.
            let c6: SocketAddr = "[2001:db8::10]:40001".parse().unwrap();
            let l4: SocketAddr = "198.51.100.2:443".parse().unwrap();
            let h = encode(version, c6, l4);
            let (parsed, _) = ProxyHeader::parse(&h, ParseConfig::default()).unwrap();
            let a = parsed.proxied_address().unwrap();
            assert_eq!(a.source, c6);
            assert_eq!(
                a.destination.ip(),
                IpAddr::V6(Ipv4Addr::new(198, 51, 100, 2).to_ipv6_mapped())
            );
        }
    }

    #[test]
    fn a_dual_stack_socket_s_ipv4_peer_is_announced_as_ipv4() {
        let c = SocketAddr::new(
            IpAddr::V6(Ipv4Addr::new(192, 0, 2, 10).to_ipv6_mapped()),
            40001,
        );
        let l = SocketAddr::new(
            IpAddr::V6(Ipv4Addr::new(198, 51, 100, 2).to_ipv6_mapped()),
            443,
        );
        assert_eq!(
            encode(ProxyProtocol::V1, c, l),
            b"PROXY TCP4 192.0.2.10 198.51.100.2 40001 443\r\n"
        );
        assert_eq!(encode(ProxyProtocol::V2, c, l)[13], 0x11);
        // Only a mapped address is unmapped: an IPv6 peer of such a socket stays IPv6 (and the
        // local address is mapped back).
        let c6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 40001);
        assert_eq!(
            encode(ProxyProtocol::V1, c6, l),
            b"PROXY TCP6 ::1 ::ffff:198.51.100.2 40001 443\r\n"
        );
    }

    #[tokio::test]
    async fn the_client_s_bytes_after_the_header_are_kept_exactly() {
        let payload = b"GET / HTTP/1.1\r\nHost: a.example.com\r\n\r\n\0\xff\r\n".to_vec();
        for version in [ProxyProtocol::V1, ProxyProtocol::V2] {
            for (c, l) in [v4(), v6()] {
                let mut wire = encode(version, c, l);
                wire.extend_from_slice(&payload);
                let mut r = closed_with(&wire).await;
                let got = read(&mut r, TIMEOUT).await.unwrap();
                assert_eq!(got.source, Some(c));
                if version == ProxyProtocol::V2 {
                    assert!(got.leftover.is_empty(), "v2 is read exactly");
                }
                assert!(got.leftover.len() <= MAX_V1 - 15);
                let mut forwarded = got.leftover;
                forwarded.extend(rest(r).await);
                assert_eq!(forwarded, payload, "{version:?} {c}");
            }
        }
    }

    #[tokio::test]
    async fn reading_stops_within_the_longest_v1_line() {
        // Lots of payload after a short line: what is read past it is bounded.
        let (c, l) = v4();
        let mut wire = encode(ProxyProtocol::V1, c, l);
        let payload = vec![b'x'; 10_000];
        wire.extend_from_slice(&payload);
        let mut r = closed_with(&wire).await;
        let got = read(&mut r, TIMEOUT).await.unwrap();
        assert_eq!(
            got.leftover.len() + encode(ProxyProtocol::V1, c, l).len(),
            MAX_V1
        );
        let mut forwarded = got.leftover;
        forwarded.extend(rest(r).await);
        assert_eq!(forwarded, payload);
    }

    #[tokio::test]
    async fn a_header_split_into_single_bytes_is_read() {
        let payload = b"SSH-2.0-client\r\n";
        for version in [ProxyProtocol::V1, ProxyProtocol::V2] {
            for (c, l) in [v4(), v6()] {
                let mut wire = encode(version, c, l);
                wire.extend_from_slice(payload);
                // A one-byte pipe: every read sees at most one byte.
                let (mut w, mut r) = tokio::io::duplex(1);
                let writer = tokio::spawn(async move {
                    for b in wire {
                        w.write_all(&[b]).await.unwrap();
                        tokio::task::yield_now().await;
                    }
                });
                let got = read(&mut r, TIMEOUT).await.unwrap();
                assert_eq!(got.source, Some(c));
                let mut forwarded = got.leftover;
                forwarded.extend(rest(r).await);
                assert_eq!(forwarded, payload);
                writer.await.unwrap();
            }
        }
    }

    #[tokio::test]
    async fn over_a_real_tcp_connection() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (c, l) = v6();
            let mut wire = encode(ProxyProtocol::V2, c, l);
            wire.extend_from_slice(b"hello");
            s.write_all(&wire).await.unwrap();
            s.shutdown().await.unwrap();
        });
        let (mut s, _) = listener.accept().await.unwrap();
        let got = read(&mut s, TIMEOUT).await.unwrap();
        assert_eq!(got.source, Some(v6().0));
        assert!(got.leftover.is_empty());
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"hello");
        client.await.unwrap();
    }

    #[tokio::test]
    async fn local_and_unknown_give_no_source() {
        let mut local = Vec::new();
        ProxyHeader::with_local().encode_v2(&mut local).unwrap();
        local.extend_from_slice(b"after");
        let mut r = closed_with(&local).await;
        let got = read(&mut r, TIMEOUT).await.unwrap();
        assert_eq!(got.source, None);
        assert!(got.leftover.is_empty());
        assert_eq!(rest(r).await, b"after");

        // A LOCAL command with addresses (allowed; they are ignored).
        let (c, l) = v4();
        let mut h = encode(ProxyProtocol::V2, c, l);
        h[12] = 0x20;
        let mut r = closed_with(&h).await;
        assert_eq!(read(&mut r, TIMEOUT).await.unwrap().source, None);

        let mut r = closed_with(b"PROXY UNKNOWN\r\nafter").await;
        let got = read(&mut r, TIMEOUT).await.unwrap();
        assert_eq!(got.source, None);
        let mut forwarded = got.leftover;
        forwarded.extend(rest(r).await);
        assert_eq!(forwarded, b"after");
    }

    #[tokio::test]
    async fn tlvs_are_skipped() {
        let (c, l) = v4();
        let header = ProxyHeader::with_tlvs(
            Some(ProxiedAddress::stream(c, l)),
            [
                proxy_header::Tlv::Authority("a.example.com".into()),
                proxy_header::Tlv::UniqueId(vec![7u8; 128].into()),
            ],
        );
        let mut wire = Vec::new();
        header.encode_v2(&mut wire).unwrap();
        wire.extend_from_slice(b"data");
        let mut r = closed_with(&wire).await;
        let got = read(&mut r, TIMEOUT).await.unwrap();
        assert_eq!(got.source, Some(c));
        assert_eq!(rest(r).await, b"data");
    }

    #[tokio::test]
    async fn bytes_that_are_not_a_header_are_malformed_at_once() {
        for garbage in [
            &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
            b"G",
            b"PROXX",
            b"\r\n\r\n\0\r\nQUIX",
            b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r",
            b"PROXY TCP4 1.2.3.4 2001:db8::1 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n",
        ] {
            // The stream stays open: a refusal must not wait for more bytes (or the timeout).
            let (_w, mut r) = open_with(garbage).await;
            match read(&mut r, TIMEOUT).await {
                Err(ProxyError::Malformed(_)) => {}
                other => panic!("{:?}: {other:?}", String::from_utf8_lossy(garbage)),
            }
        }
        // A version 2 header with an unknown version or command, family or protocol.
        let (c, l) = v4();
        for (at, value) in [(12, 0x11), (12, 0x22), (13, 0x41), (13, 0x13)] {
            let mut h = encode(ProxyProtocol::V2, c, l);
            h[at] = value;
            let (_w, mut r) = open_with(&h).await;
            assert!(
                matches!(read(&mut r, TIMEOUT).await, Err(ProxyError::Malformed(_))),
                "byte {at} = {value:#x}"
            );
        }
    }

    #[tokio::test]
    async fn a_v1_line_without_crlf_within_107_bytes_is_too_long() {
        for start in [&b"PROXY UNKNOWN "[..], b"PROXY TCP4 "] {
            let mut line = start.to_vec();
            line.resize(300, b'a');
            line.extend_from_slice(b"\r\n");
            let (_w, mut r) = open_with(&line).await;
            assert_eq!(read(&mut r, TIMEOUT).await, Err(ProxyError::TooLong));
            // No more than 107 bytes were read.
            drop(_w);
            assert_eq!(rest(r).await.len(), line.len() - MAX_V1);
        }
    }

    #[tokio::test]
    async fn a_v2_header_longer_than_the_cap_is_refused_before_its_body() {
        let mut h = V2_SIGNATURE.to_vec();
        h.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        // The stream stays open with no body: the refusal must not wait for it.
        let (_w, mut r) = open_with(&h).await;
        assert_eq!(read(&mut r, TIMEOUT).await, Err(ProxyError::TooLong));
        // Just at the cap is fine.
        let (c, l) = v4();
        let header = ProxyHeader::with_tlvs(
            Some(ProxiedAddress::stream(c, l)),
            [proxy_header::Tlv::Noop(MAX_V2 - V2_FIXED - 12 - 3)],
        );
        let mut wire = Vec::new();
        header.encode_v2(&mut wire).unwrap();
        assert_eq!(wire.len(), MAX_V2);
        let mut r = closed_with(&wire).await;
        assert_eq!(read(&mut r, TIMEOUT).await.unwrap().source, Some(c));
    }

    #[tokio::test(start_paused = true)]
    async fn half_a_header_then_silence_times_out() {
        for version in [ProxyProtocol::V1, ProxyProtocol::V2] {
            let (c, l) = v4();
            let h = encode(version, c, l);
            let (_w, mut r) = open_with(&h[..h.len() / 2]).await;
            let started = tokio::time::Instant::now();
            assert_eq!(read(&mut r, TIMEOUT).await, Err(ProxyError::Timeout));
            let waited = started.elapsed();
            assert!(waited >= TIMEOUT && waited < TIMEOUT + Duration::from_millis(10));
        }
        // Nothing at all.
        let (_w, mut r) = tokio::io::duplex(64);
        assert_eq!(read(&mut r, TIMEOUT).await, Err(ProxyError::Timeout));
    }

    #[tokio::test]
    async fn a_peer_that_closes_mid_header_is_closed() {
        for version in [ProxyProtocol::V1, ProxyProtocol::V2] {
            let (c, l) = v6();
            let h = encode(version, c, l);
            for cut in [0, 1, 10, 16, h.len() - 1] {
                let mut r = closed_with(&h[..cut]).await;
                assert_eq!(
                    read(&mut r, TIMEOUT).await,
                    Err(ProxyError::Closed),
                    "{version:?} cut at {cut}"
                );
            }
        }
    }

    #[test]
    fn errors_read_well() {
        assert_eq!(
            ProxyError::Malformed("invalid PROXY header".into()).to_string(),
            "malformed PROXY header: invalid PROXY header"
        );
        assert_eq!(
            ProxyError::Timeout.to_string(),
            "the PROXY header did not arrive in time"
        );
    }
}

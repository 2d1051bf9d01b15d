//! VRRP version 3 advertisements for IPv4 (RFC 5798 §5): encoding, decoding and the checks a receiver
//! makes before it believes one.
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! |Version| Type  | Virtual Rtr ID|   Priority    |Count IPvX Addr|
//! |(rsvd) |     Max Adver Int     |          Checksum             |
//! |                       IPv4 Address(es)                        |
//! ```
//!
//! The checksum covers the message and the IPv4 pseudo-header (source, destination, protocol 112,
//! length), as §5.2.8 asks and keepalived does.

use std::net::Ipv4Addr;
use std::time::Duration;

/// The IP protocol number of VRRP.
pub const PROTOCOL: u8 = 112;
/// The multicast group adverts go to.
pub const GROUP: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 18);
/// The TTL every advert carries; a receiver drops any other (it crossed a router).
pub const TTL: u8 = 255;
/// Version 3, type 1 (ADVERTISEMENT).
const VERSION_TYPE: u8 = 0x31;
/// The most addresses one advert carries here (a group has one virtual IP; peers may list more).
const MAX_ADDRESSES: usize = 64;

/// One advertisement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advert {
    /// The group (`router_id`).
    pub router_id: u8,
    /// The sender's priority; 0 means "I am leaving: take over now".
    pub priority: u8,
    /// The sender's advertisement interval (VRRP v3 counts it in centiseconds, 12 bits).
    pub interval: Duration,
    /// The virtual addresses the sender holds or would hold.
    pub addresses: Vec<Ipv4Addr>,
}

/// Why a received packet is not a usable advert for us.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reject {
    #[error("truncated packet ({0} bytes)")]
    Truncated(usize),
    #[error("not IPv4 / protocol 112")]
    NotVrrp,
    #[error("TTL {0} is not 255 (the advert crossed a router)")]
    Ttl(u8),
    #[error("version/type byte {0:#04x} is not VRRP v3 ADVERTISEMENT")]
    Version(u8),
    #[error("bad checksum")]
    Checksum,
    #[error("address count {count} does not fit {len} bytes")]
    Count { count: u8, len: usize },
    #[error("advertisement interval of 0")]
    ZeroInterval,
}

/// A decoded advert with what the IP header says about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// The sender's primary address (the IP source).
    pub from: Ipv4Addr,
    /// The advert.
    pub advert: Advert,
}

impl Advert {
    /// The advert as sent by `source` (whose address goes into the checksum's pseudo-header).
    pub fn encode(&self, source: Ipv4Addr) -> Vec<u8> {
        let count = self.addresses.len().min(MAX_ADDRESSES);
        let centis = (self.interval.as_millis() / 10).clamp(1, 0x0fff) as u16;
        let mut out = Vec::with_capacity(8 + 4 * count);
        out.extend_from_slice(&[VERSION_TYPE, self.router_id, self.priority, count as u8]);
        out.extend_from_slice(&centis.to_be_bytes());
        out.extend_from_slice(&[0, 0]);
        for a in &self.addresses[..count] {
            out.extend_from_slice(&a.octets());
        }
        let sum = checksum(source, GROUP, &out);
        out[6..8].copy_from_slice(&sum.to_be_bytes());
        out
    }
}

/// Decodes what a raw IPv4 socket for protocol 112 reads: the IP header, then the advert.
pub fn decode(packet: &[u8]) -> Result<Received, Reject> {
    if packet.len() < 20 {
        return Err(Reject::Truncated(packet.len()));
    }
    if packet[0] >> 4 != 4 || packet[9] != PROTOCOL {
        return Err(Reject::NotVrrp);
    }
    let header = usize::from(packet[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
    if header < 20 || packet.len() < header + 8 {
        return Err(Reject::Truncated(packet.len()));
    }
    // The IP total length bounds the payload (a raw socket may hand over trailing padding).
    let end = if total >= header + 8 && total <= packet.len() {
        total
    } else {
        packet.len()
    };
    let ttl = packet[8];
    let from = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
    let to = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
    if ttl != TTL {
        return Err(Reject::Ttl(ttl));
    }
    let body = &packet[header..end];
    if body[0] != VERSION_TYPE {
        return Err(Reject::Version(body[0]));
    }
    let count = body[3];
    if body.len() < 8 + 4 * usize::from(count) {
        return Err(Reject::Count {
            count,
            len: body.len(),
        });
    }
    if checksum(from, to, body) != 0 {
        return Err(Reject::Checksum);
    }
    let centis = u16::from_be_bytes([body[4], body[5]]) & 0x0fff;
    if centis == 0 {
        return Err(Reject::ZeroInterval);
    }
    let addresses = body[8..8 + 4 * usize::from(count)]
        .chunks_exact(4)
        .map(|c| Ipv4Addr::new(c[0], c[1], c[2], c[3]))
        .collect();
    Ok(Received {
        from,
        advert: Advert {
            router_id: body[1],
            priority: body[2],
            interval: Duration::from_millis(u64::from(centis) * 10),
            addresses,
        },
    })
}

/// The Internet checksum of `body` with the IPv4 pseudo-header in front (0 over a correct message).
fn checksum(source: Ipv4Addr, destination: Ipv4Addr, body: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut add = |bytes: &[u8]| {
        for pair in bytes.chunks(2) {
            let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
            sum += u32::from(word);
        }
    };
    add(&source.octets());
    add(&destination.octets());
    add(&[0, PROTOCOL]);
    add(&(body.len() as u16).to_be_bytes());
    add(body);
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A gratuitous ARP for `ip` from `mac`: an ARP request to broadcast whose sender and target are both
/// `ip`, so every neighbour that knows `ip` points it at `mac` (what keepalived sends).
pub fn gratuitous_arp(mac: [u8; 6], ip: Ipv4Addr) -> [u8; 42] {
    let mut f = [0u8; 42];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&0x0806u16.to_be_bytes()); // ARP
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&1u16.to_be_bytes()); // request
    f[22..28].copy_from_slice(&mac);
    f[28..32].copy_from_slice(&ip.octets());
    f[32..38].copy_from_slice(&[0xff; 6]);
    f[38..42].copy_from_slice(&ip.octets());
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A raw-socket read: a 20-byte IPv4 header (TTL 255, protocol 112) and `body`.
    fn ip_packet(from: Ipv4Addr, ttl: u8, body: &[u8]) -> Vec<u8> {
        let mut p = vec![0x45, 0xc0];
        p.extend_from_slice(&((20 + body.len()) as u16).to_be_bytes());
        p.extend_from_slice(&[0, 0, 0, 0, ttl, PROTOCOL, 0, 0]);
        p.extend_from_slice(&from.octets());
        p.extend_from_slice(&GROUP.octets());
        p.extend_from_slice(body);
        p
    }

    fn advert() -> Advert {
        Advert {
            router_id: 51,
            priority: 150,
            interval: Duration::from_millis(200),
            addresses: vec![Ipv4Addr::new(10, 99, 0, 100)],
        }
    }

    #[test]
    fn an_advert_round_trips() {
        let from = Ipv4Addr::new(10, 99, 0, 11);
        let body = advert().encode(from);
        assert_eq!(body.len(), 12);
        assert_eq!(&body[..6], &[0x31, 51, 150, 1, 0, 20]);
        let got = decode(&ip_packet(from, 255, &body)).unwrap();
        assert_eq!(got.from, from);
        assert_eq!(got.advert, advert());
    }

    #[test]
    fn the_checksum_covers_the_pseudo_header() {
        // The same bytes from another source no longer add up: the source is in the checksum.
        let body = advert().encode(Ipv4Addr::new(10, 99, 0, 11));
        let err = decode(&ip_packet(Ipv4Addr::new(10, 99, 0, 12), 255, &body)).unwrap_err();
        assert_eq!(err, Reject::Checksum);
    }

    #[test]
    fn the_checksum_is_the_ones_complement_sum_worked_by_hand() {
        let from = Ipv4Addr::new(10, 99, 0, 11);
        let body = advert().encode(from);
        let checksum = u16::from_be_bytes([body[6], body[7]]);
        // One's complement sum over pseudo-header and message, worked by hand for these values.
        let words: u32 = 0x0a63 + 0x000b + 0xe000 + 0x0012 + 0x0070 + 12 // pseudo-header
            + 0x3133 + 0x9601 + 0x0014 + 0x0a63 + 0x0064; // message, checksum field zero
        let folded = (words & 0xffff) + (words >> 16);
        assert_eq!(checksum, !(folded as u16));
    }

    /// An advert keepalived 2.2.7 sent (`vrrp_version 3`, router 51, priority 150, `advert_int 0.2`,
    /// one address), as captured on the wire from 10.99.0.11: it decodes, and our encoder makes the
    /// same VRRP bytes, checksum included.
    #[test]
    fn a_captured_keepalived_advert_decodes_and_encodes_the_same() {
        let wire = hex_bytes(
            "45c0 0020 001d 0000 ff70 d010 0a63 000b e000 0012 3133 9601 0014 42f3 0a63 0064",
        );
        let got = decode(&wire).unwrap();
        assert_eq!(got.from, Ipv4Addr::new(10, 99, 0, 11));
        assert_eq!(got.advert, advert());
        assert_eq!(advert().encode(got.from), wire[20..]);
        // Its priority 0 advert on SIGTERM.
        let leaving = Advert {
            priority: 0,
            ..advert()
        };
        assert_eq!(
            leaving.encode(got.from),
            hex_bytes("3133 0001 0014 d8f3 0a63 0064")
        );
    }

    fn hex_bytes(text: &str) -> Vec<u8> {
        let digits: Vec<u8> = text.bytes().filter(u8::is_ascii_hexdigit).collect();
        digits
            .chunks(2)
            .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
            .collect()
    }

    #[test]
    fn what_a_receiver_must_drop() {
        let from = Ipv4Addr::new(10, 99, 0, 11);
        let body = advert().encode(from);
        assert_eq!(decode(&ip_packet(from, 254, &body)), Err(Reject::Ttl(254)));
        let mut v2 = body.clone();
        v2[0] = 0x21;
        assert_eq!(
            decode(&ip_packet(from, 255, &v2)),
            Err(Reject::Version(0x21))
        );
        let mut short = body.clone();
        short[3] = 3;
        assert!(matches!(
            decode(&ip_packet(from, 255, &short)),
            Err(Reject::Count { count: 3, .. })
        ));
        assert!(matches!(
            decode(&ip_packet(from, 255, &body[..6])),
            Err(Reject::Truncated(_))
        ));
        assert_eq!(decode(&[0u8; 10]), Err(Reject::Truncated(10)));
        let mut flipped = body.clone();
        flipped[2] ^= 1;
        assert_eq!(
            decode(&ip_packet(from, 255, &flipped)),
            Err(Reject::Checksum)
        );
    }

    #[test]
    fn decode_never_panics_on_any_bytes() {
        let from = Ipv4Addr::new(10, 99, 0, 11);
        let good = ip_packet(from, 255, &advert().encode(from));
        // Every truncation and every single-byte change of a valid packet.
        for n in 0..good.len() {
            let _ = decode(&good[..n]);
            for v in [0u8, 1, 0x0f, 0x45, 0xff] {
                let mut p = good.clone();
                p[n] = v;
                let _ = decode(&p);
            }
        }
    }

    #[test]
    fn a_gratuitous_arp_names_the_address_twice() {
        let f = gratuitous_arp([2, 0, 0, 0, 0, 1], Ipv4Addr::new(10, 99, 0, 100));
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        assert_eq!(&f[20..22], &[0, 1]);
        assert_eq!(&f[28..32], &[10, 99, 0, 100]);
        assert_eq!(&f[38..42], &[10, 99, 0, 100]);
    }
}

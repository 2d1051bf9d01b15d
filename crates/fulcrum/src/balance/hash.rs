//! The fixed hash functions of the hash algorithms.
//!
//! Every hash here is xxh3 (64-bit) with a fixed seed, or the SplitMix64 finalizer, and depends only on
//! the bytes hashed — a server's identity (its name), never its position in the list, the process or the
//! time. So every fulcrum instance, and every restart, maps a key to the same server. The seeds are part
//! of that contract: changing one remaps every key (the stability tests in `props.rs` pin them).

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Seed of [`hash_key`]: the ASCII bytes of "fulcrum" followed by a zero byte.
pub const KEY_SEED: u64 = 0x6675_6c63_7275_6d00;
/// Seed of a server's identity hash for rendezvous hashing (`ip_hash`).
pub(super) const RENDEZVOUS_SEED: u64 = 0x7265_6e64_657a_766f; // "rendezvo"
/// Seed of the points of the consistent-hash ring.
pub(super) const RING_SEED: u64 = 0x6b65_7461_6d61_7269; // "ketamari"
/// Seed of the Maglev permutation offset.
pub(super) const MAGLEV_OFFSET_SEED: u64 = 0x6d61_676c_6576_6f66; // "maglevof"
/// Seed of the Maglev permutation skip.
pub(super) const MAGLEV_SKIP_SEED: u64 = 0x6d61_676c_6576_736b; // "maglevsk"

/// Hashes a request's key material (source address, URI, header or cookie value) into the `u64` key that
/// the hash algorithms take: xxh3-64 with [`KEY_SEED`].
#[inline]
pub fn hash_key(bytes: &[u8]) -> u64 {
    xxh3_64_with_seed(bytes, KEY_SEED)
}

/// The hash key of a client address, for `hash_key = "source_ip"` (the IP's octets) or, `with_port`,
/// `"source_ip_port"` (then the port, big-endian): the same for HTTP, TCP, UDP and the explain API.
pub fn address_key(addr: std::net::SocketAddr, with_port: bool) -> u64 {
    let mut bytes = [0u8; 18];
    let n = match addr.ip() {
        std::net::IpAddr::V4(ip) => {
            bytes[..4].copy_from_slice(&ip.octets());
            4
        }
        std::net::IpAddr::V6(ip) => {
            bytes[..16].copy_from_slice(&ip.octets());
            16
        }
    };
    if with_port {
        bytes[n..n + 2].copy_from_slice(&addr.port().to_be_bytes());
        hash_key(&bytes[..n + 2])
    } else {
        hash_key(&bytes[..n])
    }
}

/// The hash of a server's identity under `seed`.
pub(super) fn id_hash(id: &str, seed: u64) -> u64 {
    xxh3_64_with_seed(id.as_bytes(), seed)
}

/// The SplitMix64 finalizer (Steele, Lea & Flood, "Fast splittable pseudorandom number generators",
/// OOPSLA 2014): a bijection of `u64` with full avalanche.
///
/// The hash algorithms pass the caller's key through it first, so keys that are not already uniform
/// (small integers, addresses) still spread over the ring and the Maglev table.
#[inline]
pub(super) fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A uniform value in the open interval (0, 1) from the top 52 bits of `h` (52, not 53: the largest value,
/// `1 − 2^-53`, must stay representable below 1).
#[inline]
pub(super) fn unit_open(h: u64) -> f64 {
    ((h >> 12) as f64 + 0.5) * (1.0 / (1u64 << 52) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_hash_is_xxh3_with_the_fixed_seed() {
        // Pinned: a change here remaps every client of every hash pool.
        assert_eq!(hash_key(b""), xxh3_64_with_seed(b"", 0x6675_6c63_7275_6d00));
        assert_eq!(hash_key(b"10.0.0.1"), hash_key(b"10.0.0.1"));
        assert_ne!(hash_key(b"10.0.0.1"), hash_key(b"10.0.0.2"));
    }

    #[test]
    fn unit_is_strictly_inside_zero_one() {
        for h in [0, 1, u64::MAX, u64::MAX >> 1, 1 << 63] {
            let u = unit_open(h);
            assert!(u > 0.0 && u < 1.0, "{h} → {u}");
        }
    }
}

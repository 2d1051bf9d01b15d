//! Allow and deny lists of networks.
//!
//! A [`CidrSet`] answers "is this address in any of these networks?". Entries are networks
//! (`10.0.0.0/8`, `2001:db8::/32`) or single addresses (`192.0.2.1`, `2001:db8::1`). They are
//! turned into sorted, merged, non-overlapping address ranges, one list for IPv4 and one for IPv6,
//! so a lookup is one binary search over a flat array: O(log n), no allocation, no lock. Only
//! membership is asked (deny wins, see [`AccessList`]), so a longest-prefix trie (`prefix-trie`)
//! would buy nothing over this and cost a dependency.
//!
//! IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`), as a dual-stack socket reports IPv4 peers, are
//! looked up as the IPv4 address, and entries written that way (`::ffff:10.0.0.0/104`) are stored
//! as the IPv4 network (`10.0.0.0/8`). An entry with host bits set (`10.0.0.1/8`) is refused: it
//! is almost always a typo, for `/32` or for `10.0.0.0/8`.

use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net};

use super::FilterError;

/// A set of IPv4 and IPv6 networks with an O(log n) membership test. See the module doc.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CidrSet {
    /// The entries, normalised, in the order given.
    entries: Vec<IpNet>,
    /// Sorted, merged, inclusive ranges.
    v4: Vec<(u32, u32)>,
    v6: Vec<(u128, u128)>,
}

impl CidrSet {
    /// Parses a list of networks and addresses. The error names the first bad entry and its
    /// position.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, FilterError> {
        let nets = entries
            .iter()
            .enumerate()
            .map(|(index, entry)| {
                parse_entry(entry.as_ref()).map_err(|reason| FilterError::Cidr {
                    index,
                    entry: entry.as_ref().to_owned(),
                    reason,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::from_nets(nets))
    }

    /// A set of networks already parsed (host bits are ignored; IPv4-mapped networks become
    /// IPv4).
    pub fn from_nets(nets: impl IntoIterator<Item = IpNet>) -> Self {
        let entries: Vec<IpNet> = nets.into_iter().map(|n| unmap(n.trunc())).collect();
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for net in &entries {
            match net {
                IpNet::V4(n) => v4.push((u32::from(n.network()), u32::from(n.broadcast()))),
                IpNet::V6(n) => v6.push((u128::from(n.network()), u128::from(n.broadcast()))),
            }
        }
        CidrSet {
            entries,
            v4: merge(v4),
            v6: merge(v6),
        }
    }

    /// Whether `ip` is in one of the networks. No allocation.
    #[inline]
    pub fn contains(&self, ip: IpAddr) -> bool {
        match ip.to_canonical() {
            IpAddr::V4(a) => in_ranges(&self.v4, u32::from(a)),
            IpAddr::V6(a) => in_ranges(&self.v6, u128::from(a)),
        }
    }

    /// The entries, normalised (`192.0.2.1` → `192.0.2.1/32`, mapped → IPv4), in the order given:
    /// for the admin API to show and edit.
    pub fn entries(&self) -> &[IpNet] {
        &self.entries
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the set has no entry (and so contains nothing).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Why an address is refused by an [`AccessList`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The address is in the deny list.
    Denied,
    /// There is an allow list and the address is not in it.
    NotAllowed,
}

/// An allow list and a deny list.
///
/// An address in `deny` is refused, whatever `allow` says (so `deny` can carve holes out of an
/// allowed range). With an `allow` list, only the addresses in it pass; without one (`None`), every
/// address not denied passes. `Some` of an empty set lets nothing through — the config layer
/// decides whether an empty list means that or "no allow list". IPv4-mapped IPv6 addresses are
/// treated as IPv4.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccessList {
    /// When set, only these networks pass.
    pub allow: Option<CidrSet>,
    /// These networks never pass.
    pub deny: CidrSet,
}

impl AccessList {
    /// An access list from its two sets.
    pub fn new(allow: Option<CidrSet>, deny: CidrSet) -> Self {
        AccessList { allow, deny }
    }

    /// Parses both lists; errors name the list, the entry and its position.
    pub fn parse<S: AsRef<str>>(allow: Option<&[S]>, deny: &[S]) -> Result<Self, FilterError> {
        let allow = allow.map(CidrSet::parse).transpose()?;
        Ok(AccessList {
            allow,
            deny: CidrSet::parse(deny)?,
        })
    }

    /// Whether this list lets every address through (so a caller may skip it).
    pub fn is_open(&self) -> bool {
        self.allow.is_none() && self.deny.is_empty()
    }

    /// Whether `ip` may pass, and if not, why.
    #[inline]
    pub fn check(&self, ip: IpAddr) -> Result<(), Refusal> {
        let ip = ip.to_canonical();
        if self.deny.contains(ip) {
            return Err(Refusal::Denied);
        }
        match &self.allow {
            Some(allow) if !allow.contains(ip) => Err(Refusal::NotAllowed),
            _ => Ok(()),
        }
    }

    /// Whether `ip` may pass.
    #[inline]
    pub fn permits(&self, ip: IpAddr) -> bool {
        self.check(ip).is_ok()
    }
}

fn parse_entry(entry: &str) -> Result<IpNet, String> {
    let s = entry.trim();
    if s.is_empty() {
        return Err("empty entry".into());
    }
    let net = if s.contains('/') {
        s.parse::<IpNet>()
            .map_err(|_| "not a network (expected like 10.0.0.0/8 or 2001:db8::/32)".to_owned())?
    } else {
        IpNet::from(
            s.parse::<IpAddr>()
                .map_err(|_| "not an IP address or network".to_owned())?,
        )
    };
    if net.trunc() != net {
        return Err(format!(
            "host bits set after the prefix: write {} for the network or {} for the address",
            net.trunc(),
            IpNet::from(net.addr())
        ));
    }
    Ok(unmap(net))
}

/// `::ffff:a.b.c.d/n` with n ≥ 96 → `a.b.c.d/(n − 96)`.
fn unmap(net: IpNet) -> IpNet {
    if let IpNet::V6(n) = net {
        if let (Some(v4), true) = (n.network().to_ipv4_mapped(), n.prefix_len() >= 96) {
            return IpNet::V4(Ipv4Net::new(v4, n.prefix_len() - 96).expect("prefix ≤ 32"));
        }
    }
    net
}

/// Sorts inclusive ranges and merges those that overlap or touch.
fn merge<T: Ord + Copy + Bound>(mut ranges: Vec<(T, T)>) -> Vec<(T, T)> {
    ranges.sort_unstable();
    let mut out: Vec<(T, T)> = Vec::with_capacity(ranges.len());
    for (start, end) in ranges {
        match out.last_mut() {
            Some(last) if last.1 == T::MAX || start <= last.1.next() => last.1 = last.1.max(end),
            _ => out.push((start, end)),
        }
    }
    out.shrink_to_fit();
    out
}

#[inline]
fn in_ranges<T: Ord + Copy>(ranges: &[(T, T)], x: T) -> bool {
    let i = ranges.partition_point(|&(start, _)| start <= x);
    i > 0 && ranges[i - 1].1 >= x
}

/// The integer types of addresses.
trait Bound {
    const MAX: Self;
    /// `self + 1` (never called on `MAX`).
    fn next(self) -> Self;
}

impl Bound for u32 {
    const MAX: Self = u32::MAX;
    fn next(self) -> Self {
        self + 1
    }
}

impl Bound for u128 {
    const MAX: Self = u128::MAX;
    fn next(self) -> Self {
        self + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn networks_and_addresses_of_both_families() {
        let set = CidrSet::parse(&["10.0.0.0/8", "192.0.2.1", " 2001:db8::/32 ", "::1"]).unwrap();
        assert_eq!(set.len(), 4);
        for yes in [
            "10.0.0.0",
            "10.255.255.255",
            "10.1.2.3",
            "192.0.2.1",
            "2001:db8::",
            "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff",
            "::1",
        ] {
            assert!(set.contains(ip(yes)), "{yes}");
        }
        for no in [
            "9.255.255.255",
            "11.0.0.0",
            "192.0.2.0",
            "192.0.2.2",
            "2001:db9::",
            "2001:db7:ffff::",
            "::2",
            "0.0.0.0",
            "255.255.255.255",
        ] {
            assert!(!set.contains(ip(no)), "{no}");
        }
        assert_eq!(
            set.entries()
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>(),
            ["10.0.0.0/8", "192.0.2.1/32", "2001:db8::/32", "::1/128"]
        );
    }

    #[test]
    fn errors_name_the_entry_and_its_index() {
        let err = CidrSet::parse(&["10.0.0.0/8", "10.0.0.0/33"]).unwrap_err();
        assert!(
            matches!(&err, FilterError::Cidr { index: 1, entry, .. } if entry == "10.0.0.0/33")
        );
        assert!(err.to_string().contains("entry 1"), "{err}");
        assert!(err.to_string().contains("10.0.0.0/33"), "{err}");

        for bad in [
            "",
            "  ",
            "example.com",
            "10.0.0",
            "1.2.3.4/",
            "/8",
            "2001:db8::/129",
        ] {
            let err = CidrSet::parse(&["192.0.2.0/24", bad]).unwrap_err();
            assert!(
                matches!(err, FilterError::Cidr { index: 1, .. }),
                "{bad}: {err}"
            );
        }

        let err = CidrSet::parse(&["10.0.0.1/8"]).unwrap_err().to_string();
        assert!(
            err.contains("10.0.0.0/8") && err.contains("10.0.0.1/32"),
            "{err}"
        );
    }

    #[test]
    fn ipv4_mapped_addresses_and_entries_are_ipv4() {
        let set = CidrSet::parse(&["10.0.0.0/8", "::ffff:192.0.2.0/120"]).unwrap();
        assert!(set.contains(ip("::ffff:10.9.8.7")));
        assert!(set.contains(ip("192.0.2.200")));
        assert!(set.contains(ip("::ffff:192.0.2.200")));
        assert!(!set.contains(ip("::ffff:11.0.0.1")));
        assert_eq!(set.entries()[1].to_string(), "192.0.2.0/24");
        // Not mapped: IPv4-compatible (deprecated) stays IPv6.
        assert!(!set.contains(ip("::10.0.0.1")));
    }

    #[test]
    fn overlapping_and_adjacent_entries_merge() {
        let set = CidrSet::parse(&[
            "10.0.0.0/24",
            "10.0.1.0/24",
            "10.0.0.128/25",
            "10.0.0.0/16",
            "10.2.0.0/16",
            "0.0.0.0/1",
            "128.0.0.0/1",
        ])
        .unwrap();
        assert_eq!(set.v4, vec![(0, u32::MAX)]);
        assert_eq!(set.len(), 7);

        let set = CidrSet::parse(&["10.0.0.0/24", "10.0.1.0/24", "10.0.3.0/24"]).unwrap();
        assert_eq!(set.v4.len(), 2);
        assert!(set.contains(ip("10.0.1.255")));
        assert!(!set.contains(ip("10.0.2.0")));
        assert!(set.contains(ip("10.0.3.0")));

        let all6 = CidrSet::parse(&["::/0", "2001:db8::/32"]).unwrap();
        assert_eq!(all6.v6, vec![(0, u128::MAX)]);
        assert!(all6.contains(ip("ffff::1")));
        assert!(!all6.contains(ip("1.2.3.4")), "::/0 is IPv6 only");
    }

    #[test]
    fn an_empty_set_contains_nothing() {
        let set = CidrSet::parse::<&str>(&[]).unwrap();
        assert!(set.is_empty());
        assert!(!set.contains(ip("10.0.0.1")));
        assert!(!set.contains(ip("::1")));
    }

    #[test]
    fn lookups_agree_with_a_linear_scan() {
        // Deterministic pseudo-random networks and probes.
        let mut x = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            x = super::super::mix64(x.wrapping_add(0x9e37_79b9_7f4a_7c15));
            x
        };
        let nets: Vec<IpNet> = (0..200)
            .map(|_| {
                let r = next();
                let len = 8 + (r % 25) as u8;
                IpNet::V4(Ipv4Net::new(Ipv4Addr::from((r >> 32) as u32), len).unwrap()).trunc()
            })
            .collect();
        let set = CidrSet::from_nets(nets.clone());
        for _ in 0..20_000 {
            let a = IpAddr::V4(Ipv4Addr::from((next() >> 16) as u32));
            let linear = nets.iter().any(|n| n.contains(&a));
            assert_eq!(set.contains(a), linear, "{a}");
        }
    }

    #[test]
    fn deny_wins_over_allow() {
        let acl = AccessList::parse(Some(&["10.0.0.0/8"]), &["10.6.6.0/24"]).unwrap();
        assert_eq!(acl.check(ip("10.1.1.1")), Ok(()));
        assert_eq!(acl.check(ip("10.6.6.6")), Err(Refusal::Denied));
        assert_eq!(acl.check(ip("192.0.2.1")), Err(Refusal::NotAllowed));
        assert!(acl.permits(ip("::ffff:10.1.1.1")));
        assert!(!acl.permits(ip("::ffff:10.6.6.6")));
        assert!(!acl.is_open());
    }

    #[test]
    fn without_an_allow_list_everything_not_denied_passes() {
        let acl = AccessList::parse(None, &["203.0.113.0/24", "2001:db8:bad::/48"]).unwrap();
        assert!(acl.permits(ip("192.0.2.1")));
        assert!(acl.permits(ip("2001:db8::1")));
        assert!(!acl.permits(ip("203.0.113.77")));
        assert!(!acl.permits(ip("2001:db8:bad:1::1")));

        assert!(AccessList::default().is_open());
        assert!(AccessList::default().permits(ip("1.2.3.4")));
        let closed = AccessList::new(Some(CidrSet::default()), CidrSet::default());
        assert!(
            !closed.permits(ip("1.2.3.4")),
            "an empty allow list lets nothing through"
        );
    }

    #[test]
    fn access_list_errors_name_the_bad_entry() {
        let err = AccessList::parse(Some(&["10.0.0.0/8", "nope"]), &[]).unwrap_err();
        assert!(matches!(err, FilterError::Cidr { index: 1, .. }));
        let err = AccessList::parse(None, &["bad"]).unwrap_err();
        assert!(matches!(err, FilterError::Cidr { index: 0, .. }));
    }
}

//! A DNS server on 127.0.0.1 for tests, whose answers can be changed mid-test.
//!
//! [`TestDns`] serves the zone `test.` over UDP and TCP on one ephemeral port, from a
//! `hickory-server` [`Catalog`] holding an [`InMemoryZoneHandler`]. Every record it serves has a
//! TTL of 1 second, and names without records answer NXDOMAIN.
//!
//! The server runs on its own thread with its own single-threaded Tokio runtime, so the setters
//! can be plain synchronous calls that return only once the change is live, from any test
//! (`#[tokio::test]` of either flavor, or a plain `#[test]`). Dropping the `TestDns` stops the
//! server.
//!
//! ```ignore
//! let dns = TestDns::start().await;
//! dns.set_a("app.test.", &[Ipv4Addr::new(127, 0, 0, 2)]);
//! let resolver = Resolver::new(&[dns.addr])?;
//! ```
// Each test binary uses a different part of the harness.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use hickory_server::proto::rr::rdata::{A, AAAA, SOA, SRV};
use hickory_server::proto::rr::{LowerName, Name, RData, Record, RecordSet, RecordType, RrKey};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneHandler, ZoneType};
use hickory_server::Server;

/// The zone the server is authoritative for; every name set must be inside it.
pub const ZONE: &str = "test.";

/// TTL of every record served, in seconds.
const TTL: u32 = 1;

/// A running test DNS server (see the module documentation).
pub struct TestDns {
    /// Where the server listens, UDP and TCP (127.0.0.1, ephemeral port).
    pub addr: SocketAddr,
    updates: tokio::sync::mpsc::UnboundedSender<Update>,
}

/// Replace the `record_type` records of `name` by `rdatas` (none: remove them).
struct Update {
    name: Name,
    record_type: RecordType,
    rdatas: Vec<RData>,
    done: mpsc::SyncSender<()>,
}

impl TestDns {
    /// Starts a server for the zone `test.` (holding only its SOA record) on 127.0.0.1.
    pub async fn start() -> TestDns {
        let (udp, tcp) = bind_pair();
        let addr = udp.local_addr().expect("UDP local address");
        let (updates, mut receiver) = tokio::sync::mpsc::unbounded_channel::<Update>();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("test DNS runtime");
        std::thread::Builder::new()
            .name("test-dns".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let zone = Arc::new(zone());
                    let mut catalog = Catalog::new();
                    let handler: Arc<dyn ZoneHandler> = zone.clone();
                    catalog.upsert(LowerName::from(origin()), vec![handler]);
                    let mut server = Server::new(catalog);
                    server.register_socket(
                        tokio::net::UdpSocket::from_std(udp).expect("register UDP socket"),
                    );
                    server.register_listener(
                        tokio::net::TcpListener::from_std(tcp).expect("register TCP listener"),
                        Duration::from_secs(5),
                        32,
                    );
                    // Serve until the `TestDns` (the only sender) is dropped; dropping the
                    // runtime then aborts the server's tasks.
                    while let Some(update) = receiver.recv().await {
                        let key = RrKey::new(LowerName::from(&update.name), update.record_type);
                        let mut records = zone.records_mut().await;
                        if update.rdatas.is_empty() {
                            records.remove(&key);
                        } else {
                            let mut set = RecordSet::with_ttl(update.name, update.record_type, TTL);
                            for rdata in update.rdatas {
                                set.add_rdata(rdata);
                            }
                            records.insert(key, Arc::new(set));
                        }
                        drop(records);
                        let _ = update.done.send(());
                    }
                });
            })
            .expect("spawn the test DNS thread");
        TestDns { addr, updates }
    }

    /// Replaces the A records of `name` (TTL 1 s); an empty list removes them.
    pub fn set_a(&self, name: &str, ips: &[Ipv4Addr]) {
        let rdatas = ips.iter().map(|ip| RData::A(A(*ip))).collect();
        self.update(name, RecordType::A, rdatas);
    }

    /// Replaces the AAAA records of `name` (TTL 1 s); an empty list removes them.
    pub fn set_aaaa(&self, name: &str, ips: &[Ipv6Addr]) {
        let rdatas = ips.iter().map(|ip| RData::AAAA(AAAA(*ip))).collect();
        self.update(name, RecordType::AAAA, rdatas);
    }

    /// Replaces the SRV records of `name` (TTL 1 s) by `(priority, weight, port, target)` records;
    /// an empty list removes them. Targets are absolute names (a missing final dot is implied).
    pub fn set_srv(&self, name: &str, records: &[(u16, u16, u16, &str)]) {
        let rdatas = records
            .iter()
            .map(|&(priority, weight, port, target)| {
                RData::SRV(SRV::new(priority, weight, port, fqdn(target)))
            })
            .collect();
        self.update(name, RecordType::SRV, rdatas);
    }

    /// Sends one update to the server thread and waits until it is live.
    fn update(&self, name: &str, record_type: RecordType, rdatas: Vec<RData>) {
        let name = fqdn(name);
        assert!(
            origin().zone_of(&name),
            "{name} is outside the test zone {ZONE}"
        );
        let (done, applied) = mpsc::sync_channel(1);
        self.updates
            .send(Update {
                name,
                record_type,
                rdatas,
                done,
            })
            .expect("the test DNS server has stopped");
        applied.recv().expect("the test DNS server has stopped");
    }
}

/// Binds a UDP socket and a TCP listener on the same ephemeral 127.0.0.1 port (non-blocking, as
/// Tokio requires).
fn bind_pair() -> (UdpSocket, TcpListener) {
    for _ in 0..20 {
        let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind UDP on 127.0.0.1");
        let Ok(tcp) = TcpListener::bind(udp.local_addr().expect("UDP local address")) else {
            continue; // the port is taken for TCP: try another one
        };
        udp.set_nonblocking(true).expect("non-blocking UDP");
        tcp.set_nonblocking(true).expect("non-blocking TCP");
        return (udp, tcp);
    }
    panic!("no port free for both UDP and TCP on 127.0.0.1");
}

/// The zone with just its SOA record (negative answers cacheable for 1 s at most).
fn zone() -> InMemoryZoneHandler {
    let soa = SOA::new(
        fqdn("ns.test."),
        fqdn("hostmaster.test."),
        1,
        60,
        60,
        60,
        TTL,
    );
    let mut soa_set = RecordSet::with_ttl(origin(), RecordType::SOA, TTL);
    soa_set.insert(Record::from_rdata(origin(), TTL, RData::SOA(soa)), 1);
    let records = BTreeMap::from([(RrKey::new(origin().into(), RecordType::SOA), soa_set)]);
    InMemoryZoneHandler::new(origin(), records, ZoneType::Primary, AxfrPolicy::Deny)
        .expect("the test zone")
}

fn origin() -> Name {
    fqdn(ZONE)
}

/// Parses `name` as an absolute domain name.
fn fqdn(name: &str) -> Name {
    let mut name = Name::from_ascii(name).unwrap_or_else(|e| panic!("bad DNS name {name:?}: {e}"));
    name.set_fqdn(true);
    name
}

//! DNS discovery against a real DNS server on loopback whose answers change mid-test: the resolver
//! alone (A, SRV, missing names, an unresponsive server), then pools that follow A and SRV answers
//! while traffic flows through fulcrum.

mod common;
#[path = "common/dns.rs"]
mod dns;

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use common::*;
use dns::TestDns;
use fulcrum::discovery::{Discovered, DnsTarget, Resolver};
use fulcrum_app::AppConfig;

fn found(name: &str, address: &str, weight: u32) -> Discovered {
    Discovered {
        name: name.to_string(),
        address: address.parse::<SocketAddr>().unwrap(),
        weight,
    }
}

fn host_target() -> DnsTarget {
    DnsTarget::Host {
        host: "app.test.".into(),
        port: 8080,
        weight: 2,
        base_name: "app".into(),
    }
}

#[tokio::test]
async fn a_host_target_follows_a_record_changes() {
    let dns = TestDns::start().await;
    let resolver = Resolver::new(&[dns.addr]).unwrap();
    dns.set_a(
        "app.test.",
        &[Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::new(127, 0, 0, 3)],
    );
    assert_eq!(
        resolver.resolve(&host_target()).await.unwrap(),
        vec![
            found("app/127.0.0.2:8080", "127.0.0.2:8080", 2),
            found("app/127.0.0.3:8080", "127.0.0.3:8080", 2),
        ]
    );
    // No stale cache: the very next resolution sees the change.
    dns.set_a("app.test.", &[Ipv4Addr::new(127, 0, 0, 4)]);
    assert_eq!(
        resolver.resolve(&host_target()).await.unwrap(),
        vec![found("app/127.0.0.4:8080", "127.0.0.4:8080", 2)]
    );
}

#[tokio::test]
async fn an_srv_target_uses_the_lowest_priority_records() {
    let dns = TestDns::start().await;
    let resolver = Resolver::new(&[dns.addr]).unwrap();
    dns.set_a("a.test.", &[Ipv4Addr::new(127, 0, 0, 5)]);
    dns.set_a("b.test.", &[Ipv4Addr::new(127, 0, 0, 6)]);
    dns.set_a("backup.test.", &[Ipv4Addr::new(127, 0, 0, 7)]);
    dns.set_srv(
        "_http._tcp.app.test.",
        &[
            (10, 1, 9001, "a.test."),
            (10, 3, 9002, "b.test."),
            (20, 5, 9003, "backup.test."),
        ],
    );
    let target = DnsTarget::Srv {
        name: "_http._tcp.app.test.".into(),
    };
    assert_eq!(
        resolver.resolve(&target).await.unwrap(),
        vec![
            found("_http._tcp.app.test./127.0.0.5:9001", "127.0.0.5:9001", 1),
            found("_http._tcp.app.test./127.0.0.6:9002", "127.0.0.6:9002", 3),
        ]
    );
}

#[tokio::test]
async fn names_without_records_are_errors_not_empty_sets() {
    let dns = TestDns::start().await;
    let resolver = Resolver::new(&[dns.addr]).unwrap();
    let missing = DnsTarget::Host {
        host: "missing.test.".into(),
        port: 80,
        weight: 1,
        base_name: "missing".into(),
    };
    let error = resolver.resolve(&missing).await.unwrap_err();
    assert!(error.starts_with("missing.test.: no records"), "{error}");
    let srv = DnsTarget::Srv {
        name: "_http._tcp.missing.test.".into(),
    };
    let error = resolver.resolve(&srv).await.unwrap_err();
    assert!(
        error.starts_with("_http._tcp.missing.test.: no records"),
        "{error}"
    );
    dns.set_a("gone.test.", &[Ipv4Addr::new(127, 0, 0, 8)]);
    let gone = DnsTarget::Host {
        host: "gone.test.".into(),
        port: 80,
        weight: 1,
        base_name: "gone".into(),
    };
    assert_eq!(resolver.resolve(&gone).await.unwrap().len(), 1);
    dns.set_a("gone.test.", &[]);
    let error = resolver.resolve(&gone).await.unwrap_err();
    assert!(error.starts_with("gone.test.: no records"), "{error}");
}

#[tokio::test]
async fn an_unresponsive_dns_server_times_out() {
    // A bound UDP socket that never answers: every query times out (2 tries of 2 s).
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let resolver = Resolver::new(&[silent.local_addr().unwrap()]).unwrap();
    let error = resolver.resolve(&host_target()).await.unwrap_err();
    assert_eq!(error, "app.test.: timed out");
}

/// Which servers answered `n` requests through `addr` (a 503, no server yet, counts as `-`).
async fn answering(addr: SocketAddr, n: usize) -> BTreeSet<String> {
    let c = client();
    let mut seen = BTreeSet::new();
    for _ in 0..n {
        let r = get(&c, &format!("http://{addr}/")).await;
        seen.insert(match r.status.as_u16() {
            200 => r.server(),
            503 => "-".to_string(),
            other => panic!("unexpected {other}: {}", r.body),
        });
    }
    seen
}

/// Sends requests until the set of servers answering the last 12 is `want` (20 s at most).
async fn until_serving(addr: SocketAddr, want: &[&str]) {
    let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
    let started = Instant::now();
    loop {
        let seen = answering(addr, 12).await;
        if seen == want {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "still served by {seen:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Starts demo servers named `names` on 127.0.0.2, 127.0.0.3, … all on one port.
async fn apps_on_one_port(names: &[&str]) -> (Vec<fulcrum_app::AppHandle>, u16) {
    'retry: for _ in 0..20 {
        let first = fulcrum_app::spawn("127.0.0.2:0".parse().unwrap(), AppConfig::new(names[0]))
            .await
            .unwrap();
        let port = first.addr().port();
        let mut apps = vec![first];
        for (i, name) in names.iter().enumerate().skip(1) {
            let addr = SocketAddr::new(Ipv4Addr::new(127, 0, 0, 2 + i as u8).into(), port);
            match fulcrum_app::spawn(addr, AppConfig::new(*name)).await {
                Ok(app) => apps.push(app),
                Err(_) => continue 'retry, // the port is taken on that address: try another
            }
        }
        return (apps, port);
    }
    panic!("no port free on every address");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_follows_the_answers_for_its_host_name() {
    let (_apps, port) = apps_on_one_port(&["A", "B"]).await;
    let dns = TestDns::start().await;
    dns.set_a("app.test.", &[Ipv4Addr::new(127, 0, 0, 2)]);
    let text = format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n[dns]\nnameservers = [\"{}\"]\n\
         [[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\npool = \"p\"\n\
         [[pools]]\nname = \"p\"\nresolve_interval = \"200ms\"\n\
         servers = [{{ name = \"app\", address = \"app.test:{port}\" }}]\n",
        dns.addr
    );
    let lb = fulcrum(&text);
    let web = web(&lb);
    until_serving(web, &["A"]).await;
    let a = lb
        .shared()
        .pool("p")
        .unwrap()
        .server(&format!("app/127.0.0.2:{port}"))
        .unwrap();
    assert_eq!(a.source, fulcrum::pool::Source::Dns("app".into()));

    dns.set_a(
        "app.test.",
        &[Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::new(127, 0, 0, 3)],
    );
    until_serving(web, &["A", "B"]).await;
    let a_again = lb
        .shared()
        .pool("p")
        .unwrap()
        .server(&format!("app/127.0.0.2:{port}"))
        .unwrap();
    assert!(std::sync::Arc::ptr_eq(&a, &a_again), "A kept its identity");

    dns.set_a("app.test.", &[Ipv4Addr::new(127, 0, 0, 3)]);
    until_serving(web, &["B"]).await;
    // DNS failing keeps the last answer.
    dns.set_a("app.test.", &[]);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(answering(web, 6).await, BTreeSet::from(["B".to_string()]));
    stop(lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_follows_srv_answers_with_their_ports_and_weights() {
    let apps = apps(&["A", "B", "C"]).await;
    let dns = TestDns::start().await;
    dns.set_a("local.test.", &[Ipv4Addr::LOCALHOST]);
    let port = |i: usize| apps[i].addr().port();
    dns.set_srv(
        "_http._tcp.app.test.",
        &[
            (10, 1, port(0), "local.test."),
            (10, 3, port(1), "local.test."),
        ],
    );
    let text = format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n[dns]\nnameservers = [\"{}\"]\n\
         [[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\npool = \"p\"\n\
         [[pools]]\nname = \"p\"\nalgorithm = \"weighted_round_robin\"\nresolve_interval = \"200ms\"\n\
         dns_srv = \"_http._tcp.app.test\"\n",
        dns.addr
    );
    let lb = fulcrum(&text);
    let web = web(&lb);
    until_serving(web, &["A", "B"]).await;
    let seq = pick_sequence(web, 40).await;
    let b = seq.iter().filter(|s| *s == "B").count();
    assert_eq!(b, 30, "SRV weights 1:3 over 40 requests: {seq:?}");

    dns.set_srv(
        "_http._tcp.app.test.",
        &[
            (10, 1, port(1), "local.test."),
            (10, 1, port(2), "local.test."),
        ],
    );
    until_serving(web, &["B", "C"]).await;
    stop(lb).await;
}

//! Tests of the event loop and the comparison.

use std::net::SocketAddr;

use super::*;

const MS: u64 = 1_000_000;

fn pool(algorithm: &str, servers: usize, extra: &str) -> PoolConfig {
    let list: Vec<String> = (0..servers)
        .map(|i| {
            format!(
                "{{ name = \"s{i}\", address = \"127.0.0.1:{}\" }}",
                9000 + i
            )
        })
        .collect();
    let text = format!(
        "[[listeners]]\nname=\"l\"\nbind=\"127.0.0.1:1\"\nprotocol=\"http\"\npool=\"p\"\n\
         [[pools]]\nname=\"p\"\nalgorithm=\"{algorithm}\"\nservers=[{}]\n{extra}\n",
        list.join(", ")
    );
    crate::config::parse(&text, "test.toml")
        .expect("valid config")
        .pools
        .remove(0)
}

fn arrivals(times_ms: &[u64]) -> Vec<Arrival> {
    times_ms
        .iter()
        .enumerate()
        .map(|(i, &t)| Arrival {
            at_ns: t * MS,
            client: SocketAddr::from(([10, 0, 0, (i % 250) as u8], 1000)),
            path: "/".to_owned(),
        })
        .collect()
}

fn fixed(ms: u64) -> ServerModel {
    ServerModel::new(Latency::Fixed(ms * MS))
}

fn run_on(cfg: &PoolConfig, models: &[ServerModel], arrivals: &[Arrival], sticky: bool) -> Run {
    let key = cfg.hash_key.clone().unwrap_or(HashKey::SourceIp);
    let keys: Vec<u64> = arrivals.iter().map(|a| request_key(&key, a)).collect();
    let ids: Vec<usize> = (0..models.len()).collect();
    run(&Setup {
        pool: cfg,
        models,
        arrivals,
        keys: &keys,
        seed: 1,
        draw_ids: &ids,
        sticky,
        leave: None,
    })
}

#[test]
fn an_answer_frees_its_server_before_an_arrival_at_the_same_instant() {
    let cfg = pool("round_robin", 1, "");
    let mut m = fixed(10);
    m.workers = Some(1);
    // The second request arrives exactly when the first is answered: no wait.
    let r = run_on(&cfg, &[m.clone()], &arrivals(&[0, 10]), false);
    assert_eq!(r.latencies, vec![10 * MS, 10 * MS]);
    // Three at once on one worker: a FIFO queue at the server.
    let r = run_on(&cfg, &[m], &arrivals(&[0, 0, 0]), false);
    assert_eq!(r.latencies, vec![10 * MS, 20 * MS, 30 * MS]);
}

#[test]
fn in_flight_counts_are_the_pools_and_least_connections_reads_them() {
    // Server 0 takes 100 ms, server 1 takes 1 ms; a request every 10 ms. Least connections sees the
    // slow server busy and sends nearly everything to the fast one.
    let cfg = pool("least_connections", 2, "");
    let times: Vec<u64> = (0..1_000).map(|i| i * 10).collect();
    let r = run_on(&cfg, &[fixed(100), fixed(1)], &arrivals(&times), false);
    assert_eq!(r.per_server.iter().sum::<u64>(), 1_000);
    assert!(r.per_server[0] < 150, "{:?}", r.per_server);
    // Round robin alternates whatever the load.
    let cfg = pool("round_robin", 2, "");
    let r = run_on(&cfg, &[fixed(100), fixed(1)], &arrivals(&times), false);
    assert_eq!(r.per_server, vec![500, 500]);
}

#[test]
fn latency_is_fed_back_in_virtual_time() {
    // Least response time learns the slow server's latency from its answers and avoids it: after the
    // first few probes it gets next to nothing, although it is idle most of the time.
    let cfg = pool("least_response_time", 3, "");
    let times: Vec<u64> = (0..3_000).map(|i| i * 5).collect();
    let r = run_on(
        &cfg,
        &[fixed(5), fixed(5), fixed(100)],
        &arrivals(&times),
        false,
    );
    assert!(r.per_server[2] < 30, "{:?}", r.per_server);
}

#[test]
fn the_pools_queue_holds_requests_while_every_server_is_at_its_limit() {
    let cfg = pool(
        "round_robin",
        2,
        "max_connections_per_server = 1\nmax_queue = 1\n",
    );
    // Four at once: two served, one queued, one refused (the queue holds one).
    let r = run_on(
        &cfg,
        &[fixed(10), fixed(10)],
        &arrivals(&[0, 0, 0, 0]),
        false,
    );
    assert_eq!(r.latencies, vec![10 * MS, 10 * MS, 20 * MS]);
    assert_eq!(r.errors, 1);
}

#[test]
fn sticky_clients_return_to_their_server() {
    let cfg = pool("random", 3, "");
    // 50 clients, 20 requests each, spread in time.
    let times: Vec<u64> = (0..1_000).map(|i| i * 20).collect();
    let r = run_on(
        &cfg,
        &[fixed(1), fixed(1), fixed(1)],
        &arrivals(&times)
            .into_iter()
            .enumerate()
            .map(|(i, mut a)| {
                a.client = SocketAddr::from(([10, 0, 1, (i % 50) as u8], 1000));
                a
            })
            .collect::<Vec<_>>(),
        true,
    );
    assert_eq!(r.sticky_lookups, 950);
    assert_eq!(r.sticky_hits, 950);
}

#[test]
fn a_server_out_of_service_loses_its_sticky_clients_to_the_others() {
    let cfg = pool("round_robin", 2, "");
    // 10 clients, 10 rounds of one request each, 10 ms apart; server 1 leaves after round 5.
    let times: Vec<u64> = (0..100).map(|i| i * 10).collect();
    let arrivals: Vec<Arrival> = arrivals(&times)
        .into_iter()
        .enumerate()
        .map(|(i, mut a)| {
            a.client = SocketAddr::from(([10, 0, 2, (i % 10) as u8], 1000));
            a
        })
        .collect();
    let key = HashKey::SourceIp;
    let keys: Vec<u64> = arrivals.iter().map(|a| request_key(&key, a)).collect();
    let models = [fixed(1), fixed(1)];
    let r = run(&Setup {
        pool: &cfg,
        models: &models,
        arrivals: &arrivals,
        keys: &keys,
        seed: 1,
        draw_ids: &[0, 1],
        sticky: true,
        leave: Some((1, 495 * MS)),
    });
    // Round robin placed five clients on each; the five of server 1 miss once, then stick to 0.
    assert_eq!(r.sticky_lookups, 90);
    assert_eq!(r.sticky_hits, 85);
    assert_eq!(r.per_server, vec![75, 25]);
}

#[test]
fn runs_are_deterministic_and_compare_reports_every_algorithm() {
    let cfg = pool("round_robin", 4, "");
    let w = Synthetic {
        rate: 2_000.0,
        requests: 4_000,
        keys: 500,
        zipf: 0.0,
    }
    .generate(7);
    let mut models = vec![ServerModel::new(Latency::LogNormal(5 * MS, 0.5)); 4];
    models[1].slow = 20.0;
    let options = Options {
        algorithms: Algorithm::ALL.to_vec(),
        seed: 7,
        leaving: None,
    };
    let a = compare(&cfg, &models, &w, &options).unwrap();
    let b = compare(&cfg, &models, &w, &options).unwrap();
    assert_eq!(
        serde_json::to_string(&a).unwrap(),
        serde_json::to_string(&b).unwrap(),
        "deterministic"
    );
    assert_eq!(a.results.len(), 9);
    assert_eq!(a.leaving, "s3");
    let get = |x: Algorithm| a.result(x).unwrap();
    // Hash algorithms move about a quarter of the keys (those of the leaving server); round robin
    // moves most.
    for h in [
        Algorithm::IpHash,
        Algorithm::ConsistentHash,
        Algorithm::Maglev,
    ] {
        assert!(get(h).keys_moved < 0.35, "{h:?}: {}", get(h).keys_moved);
    }
    assert!(get(Algorithm::RoundRobin).keys_moved > 0.6);
    // The slow server hurts round robin's tail and not least response time's.
    assert!(
        get(Algorithm::LeastResponseTime).p99_ms * 3.0 < get(Algorithm::RoundRobin).p99_ms,
        "{}",
        a.table()
    );
    assert!(a.table().contains("least_response_time"));
    // Sticky clients go back to their server, except those of the server taken out halfway, once.
    let hits = get(Algorithm::P2c).sticky_hits;
    assert!((0.9..1.0).contains(&hits), "{hits}");
}

#[test]
fn models_come_from_options_over_the_log() {
    let cfg = pool("round_robin", 2, "");
    let mut w = Workload::default();
    w.observed
        .insert("s0".to_owned(), Arc::new(vec![(3 * MS, false)]));
    let cmd = Command {
        slow: vec!["s1=4".to_owned()],
        fail: vec!["s0=0.5".to_owned()],
        workers: vec!["8".to_owned()],
        ..Command::default()
    };
    let m = models(&cfg, &w, &cmd).unwrap();
    assert_eq!(
        m[0].latency,
        Latency::Observed(Arc::new(vec![(3 * MS, false)]))
    );
    assert_eq!(m[0].fail, 0.5);
    assert_eq!(m[1].latency, Latency::parse(DEFAULT_LATENCY).unwrap());
    assert_eq!(m[1].slow, 4.0);
    assert_eq!((m[0].workers, m[1].workers), (Some(8), Some(8)));
    let bad = Command {
        slow: vec!["nope=2".to_owned()],
        ..Command::default()
    };
    assert!(models(&cfg, &w, &bad)
        .unwrap_err()
        .contains("no server `nope`"));
}

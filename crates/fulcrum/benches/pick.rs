//! `cargo bench -p fulcrum --bench pick`: one pick of every algorithm over 3, 100 and 10 000 servers.
//!
//! Loads are plain vectors, so this measures the algorithms, not the pool's atomics (a real pick reads
//! each server's counters behind an `Arc`: every server a pick reads may cost a cache miss on a cold
//! pool). The pool-wide total in flight is a precomputed number, as the pool's counter is. Weights cycle
//! 1–4, in-flight counts vary, every server is available, keys change on every pick. Results:
//! `docs/balancing.md`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use fulcrum::balance::{Loads, Selector, SelectorOptions, ServerSpec};
use fulcrum::config::Algorithm;

struct Flat {
    in_flight: Vec<u64>,
    total_in_flight: u64,
    latency_ns: Vec<u64>,
    available: Vec<bool>,
}

impl Loads for Flat {
    #[inline]
    fn len(&self) -> usize {
        self.available.len()
    }
    #[inline]
    fn in_flight(&self, i: usize) -> u64 {
        self.in_flight[i]
    }
    #[inline]
    fn latency_ns(&self, i: usize) -> u64 {
        self.latency_ns[i]
    }
    #[inline]
    fn available(&self, i: usize) -> bool {
        self.available[i]
    }
    #[inline]
    fn total_in_flight(&self) -> u64 {
        self.total_in_flight
    }
}

fn pick(c: &mut Criterion) {
    let mut group = c.benchmark_group("pick");
    for n in [3usize, 100, 10_000] {
        let names: Vec<String> = (0..n)
            .map(|i| format!("10.{}.{}.{}:8080", i >> 16, (i >> 8) & 255, i & 255))
            .collect();
        let servers: Vec<ServerSpec<'_>> = names
            .iter()
            .enumerate()
            .map(|(i, id)| ServerSpec {
                id,
                weight: 1 + (i % 4) as u32,
            })
            .collect();
        let in_flight: Vec<u64> = (0..n as u64).map(|i| (i * 7919) % 13).collect();
        let loads = Flat {
            total_in_flight: in_flight.iter().sum(),
            in_flight,
            latency_ns: (0..n as u64)
                .map(|i| 1_000_000 + (i * 104_729) % 500_000)
                .collect(),
            available: vec![true; n],
        };
        let bounded = SelectorOptions {
            hash_balance_factor: Some(125),
            ..SelectorOptions::default()
        };
        let mut cases: Vec<(String, Selector)> = Algorithm::ALL
            .iter()
            .map(|&a| {
                let s = Selector::new(a, &servers, &SelectorOptions::default());
                (a.as_str().to_string(), s)
            })
            .collect();
        cases.push((
            "consistent_hash_bounded".into(),
            Selector::new(Algorithm::ConsistentHash, &servers, &bounded),
        ));
        for (name, selector) in &cases {
            group.bench_with_input(BenchmarkId::new(name.as_str(), n), &n, |b, _| {
                let mut key = 0u64;
                b.iter(|| {
                    key = key.wrapping_add(0x9e37_79b9_7f4a_7c15);
                    black_box(selector.pick(Some(black_box(key)), &loads).next())
                });
            });
        }
    }
    group.finish();
}

criterion_group!(benches, pick);
criterion_main!(benches);

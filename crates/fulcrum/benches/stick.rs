//! Cost of a stick-table lookup per request: the in-memory table, and Redis (a real `redis-server`
//! on a free loopback port, one `GETEX` round trip per lookup).
//!
//! `cargo bench -p fulcrum --bench stick`

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use fulcrum::config::RedisTarget;
use fulcrum::sticky::{MemoryTable, RedisTable};

fn keys(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255))
        .collect()
}

fn memory(c: &mut Criterion) {
    let table = MemoryTable::new(256 << 20, Duration::from_secs(1800));
    let keys = keys(100_000);
    for k in &keys {
        table.set(k, "app-1");
    }
    let mut i = 0;
    c.bench_function("stick/memory/get (hit, 100k entries)", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            table.get(&keys[i])
        })
    });
    c.bench_function("stick/memory/get (miss)", |b| {
        b.iter(|| table.get("192.0.2.1"))
    });
    let mut j = 0;
    c.bench_function("stick/memory/set (existing key)", |b| {
        b.iter(|| {
            j = (j + 1) % keys.len();
            table.set(&keys[j], "app-2")
        })
    });
}

fn redis(c: &mut Criterion) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let Ok(mut server) = std::process::Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
    else {
        eprintln!("redis-server not found: skipping the Redis stick-table benchmark");
        return;
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let target = RedisTarget::Url(format!("redis://127.0.0.1:{port}"));
    let table = RedisTable::new(&target, "bench".into(), Duration::from_secs(1800)).unwrap();
    rt.block_on(table.set("198.51.100.7", "app-1"));
    c.bench_function("stick/redis/get (GETEX, loopback)", |b| {
        b.iter(|| rt.block_on(table.get("198.51.100.7")))
    });
    assert_eq!(table.errors(), 0, "redis answered every lookup");
    let _ = server.kill();
    let _ = server.wait();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = memory, redis
}
criterion_main!(benches);

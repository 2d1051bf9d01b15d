//! Tests of the `fulcrum` binary itself: `check`, `demo`, signals, and memory under a large body.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use common::process::*;
use common::*;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sha2::{Digest, Sha256};

#[test]
fn check_accepts_a_good_file_and_names_key_and_line_of_a_bad_one() {
    let dir = tempfile::tempdir().unwrap();
    let good = write_config(
        &dir,
        "[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:8080\"\nprotocol = \"http\"\npool = \"p\"\n\n\
         [[pools]]\nname = \"p\"\nservers = [{ address = \"127.0.0.1:9001\" }]\n",
    );
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "configuration OK"
    );

    // Also through $FULCRUM_CONFIG.
    let out = Command::new(BIN)
        .arg("check")
        .env("FULCRUM_CONFIG", &good)
        .output()
        .unwrap();
    assert!(out.status.success());

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:8080\"\nprotocol = \"http\"\npool = \"p\"\n\n\
         [[pools]]\nname = \"p\"\nservers = [\n  { address = \"127.0.0.1:9001\", weight = 0 },\n]\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("pools[0].servers[0].weight"), "{err}");
    assert!(err.contains(":10:"), "line 10 named: {err}");

    let missing = Command::new(BIN)
        .args(["check", "--config", "/nonexistent/fulcrum.toml"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/fulcrum.toml"));
}

#[test]
fn check_reads_the_tls_files_and_names_a_key_that_does_not_match() {
    let dir = tempfile::tempdir().unwrap();
    let ca = common::tls::Ca::new("check CA");
    let (cert, key) = ca.leaf(&["a.test"]).write(dir.path(), "a");
    let (_, other_key) = ca.leaf(&["b.test"]).write(dir.path(), "b");
    let text = |key: &std::path::Path| {
        format!(
            "[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:8443\"\nprotocol = \"https\"\npool = \"p\"\n\
             tls = {{ cert = {cert:?}, key = {key:?} }}\n\n\
             [[pools]]\nname = \"p\"\nservers = [{{ address = \"127.0.0.1:9001\" }}]\n"
        )
    };
    let good = dir.path().join("good.toml");
    std::fs::write(&good, text(&key)).unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, text(&other_key)).unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(":6:") && err.contains("listeners[0].tls.key"),
        "{err}"
    );
    assert!(err.contains("does not belong to the certificate"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_an_in_flight_request_then_exits_zero() {
    let apps = apps(&["A"]).await;
    let (text, web, admin) = fixed_ports(&config("round_robin", &servers(&apps), "", ""));
    let dir = tempfile::tempdir().unwrap();
    let mut child = spawn_fulcrum(&write_config(&dir, &text));
    wait_listening(web).await;

    let c = client();
    let slow = tokio::spawn({
        let c = c.clone();
        async move { get(&c, &format!("http://{web}/delay/1500")).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(&child, "-TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Draining: readiness fails, new connections are refused, the slow request still finishes.
    let ready = get(&client(), &format!("http://{admin}/readyz")).await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        tokio::net::TcpStream::connect(web).await.is_err(),
        "listener closed while draining"
    );
    let r = slow.await.unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.body.contains("delayed 1500ms"));
    let status =
        tokio::task::spawn_blocking(move || wait_exit(&mut child, Duration::from_secs(10)))
            .await
            .unwrap();
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_file_and_a_bad_file_keeps_the_running_configuration() {
    let apps = apps(&["A", "B"]).await;
    let all = servers(&apps);
    let (text, web, admin) = fixed_ports(&config("round_robin", &all[..1], "", ""));
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(&dir, &text);
    let mut child = spawn_fulcrum(&path);
    wait_listening(web).await;
    assert_eq!(pick_sequence(web, 4).await, vec!["A"; 4]);

    // B added to the file; SIGHUP: both serve.
    let with_b = text.replace(
        &format!("{{ name = \"A\", address = \"{}\", weight = 1 }}", all[0].1),
        &format!(
            "{{ name = \"A\", address = \"{}\", weight = 1 }}, {{ name = \"B\", address = \"{}\" }}",
            all[0].1, all[1].1
        ),
    );
    assert_ne!(with_b, text);
    std::fs::write(&path, &with_b).unwrap();
    signal(&child, "-HUP");
    let started = std::time::Instant::now();
    while pick_sequence(web, 4).await.iter().all(|s| s == "A") {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "SIGHUP did not add B"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A broken file: SIGHUP changes nothing, and the refusal is counted.
    std::fs::write(&path, with_b.replace("[[pools]]", "[[pools]\n")).unwrap();
    signal(&child, "-HUP");
    let started = std::time::Instant::now();
    loop {
        let m = get(&client(), &format!("http://{admin}/metrics"))
            .await
            .body;
        if m.contains("fulcrum_config_reloads_total{result=\"error\"} 1") {
            assert!(
                m.contains("fulcrum_config_reloads_total{result=\"ok\"} 1"),
                "{m}"
            );
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen = pick_sequence(web, 4).await;
    assert!(
        seen.contains(&"A".to_string()) && seen.contains(&"B".to_string()),
        "{seen:?}"
    );
    signal(&child, "-TERM");
    let status =
        tokio::task::spawn_blocking(move || wait_exit(&mut child, Duration::from_secs(10)))
            .await
            .unwrap();
    assert!(status.success(), "exit status {status:?}");
}

fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_megabyte_bodies_stream_both_ways_intact_in_flat_memory() {
    const SIZE: usize = 100 * 1024 * 1024;
    const CHUNK: usize = 64 * 1024;
    let apps = apps(&["A"]).await;
    let (text, web, _admin) = fixed_ports(&config(
        "round_robin",
        &servers(&apps),
        "",
        "response_timeout = \"120s\"",
    ));
    let dir = tempfile::tempdir().unwrap();
    let mut child = spawn_fulcrum(&write_config(&dir, &text));
    wait_listening(web).await;
    let baseline = vm_hwm_kib(child.id());

    // Upload: a streamed body of pseudo-random chunks; the server hashes what arrives.
    let mut expected = Sha256::new();
    let mut chunks = Vec::new();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut block = vec![0u8; CHUNK];
    for _ in 0..SIZE / CHUNK {
        for b in block.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        expected.update(&block);
        chunks.push(Bytes::copy_from_slice(&block));
    }
    let expected = hex::encode(expected.finalize());
    let stream = futures_util::stream::iter(
        chunks
            .into_iter()
            .map(|c| Ok::<_, std::convert::Infallible>(http_body::Frame::data(c))),
    );
    let c: Client<_, StreamBody<_>> = Client::builder(TokioExecutor::new()).build_http();
    let req = Request::post(format!("http://{web}/sha256"))
        .body(StreamBody::new(stream))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(120), c.request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["bytes"], SIZE as u64);
    assert_eq!(v["sha256"], expected.as_str());

    // Download: hash 100 MiB as it streams in.
    let c = client();
    let resp = c
        .get(format!("http://{web}/bytes/{SIZE}").parse().unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut got = Sha256::new();
    let mut n = 0usize;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            n += data.len();
            got.update(&data);
        }
    }
    assert_eq!(n, SIZE);
    let mut want = Sha256::new();
    let pattern: Vec<u8> = (0..SIZE)
        .map(|i| b'a' + (i % 26) as u8)
        .take(26 * 4096)
        .collect();
    let mut left = SIZE;
    while left > 0 {
        let k = left.min(pattern.len());
        want.update(&pattern[..k]);
        left -= k;
    }
    assert_eq!(hex::encode(got.finalize()), hex::encode(want.finalize()));

    let peak = vm_hwm_kib(child.id());
    assert!(
        peak < baseline + 32 * 1024,
        "fulcrum's peak memory grew from {baseline} KiB to {peak} KiB moving 200 MiB"
    );
    signal(&child, "-TERM");
    let status =
        tokio::task::spawn_blocking(move || wait_exit(&mut child, Duration::from_secs(10)))
            .await
            .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_prints_its_urls_and_balances() {
    let mut child = Command::new(BIN)
        .args([
            "demo",
            "--servers",
            "2",
            "--bind",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    // Read every line (the demo keeps printing after its URLs), and hand the URLs over once known.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut balancer = None;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let line = line.trim().to_string();
            if let Some(u) = line.strip_prefix("balancer") {
                balancer = Some(u.trim().to_string());
            }
            if let Some(u) = line.strip_prefix("dashboard") {
                let _ = tx.send((
                    balancer.clone().expect("balancer line first"),
                    u.trim().to_string(),
                ));
            }
        }
    });
    let (balancer, dashboard) =
        tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(20)))
            .await
            .unwrap()
            .expect("demo printed its URLs");
    let c = client();
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(get(&c, &balancer).await.server());
    }
    assert_eq!(seen, vec!["app-1", "app-2", "app-1", "app-2"]);
    let dash = get(&c, &dashboard).await;
    assert_eq!(dash.status, StatusCode::OK);
    signal(&child, "-INT");
    let status =
        tokio::task::spawn_blocking(move || wait_exit(&mut child, Duration::from_secs(10)))
            .await
            .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_fulcrum_on_the_same_ports_is_refused_not_sharing() {
    let apps = apps(&["A"]).await;
    // No admin: the listener's own port is what must be refused.
    let (text, web, _admin) = fixed_ports(&config("round_robin", &servers(&apps), "", ""));
    let text = text
        .replace("[admin]\n", "")
        .replacen(&format!("bind = \"{_admin}\"\n"), "", 1);
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(&dir, &text);
    let mut first = spawn_fulcrum(&path);
    wait_listening(web).await;
    let out = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&path)
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a second fulcrum started on a taken port"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot bind") && err.contains("in use"),
        "{err}"
    );
    signal(&first, "-TERM");
    tokio::task::spawn_blocking(move || wait_exit(&mut first, Duration::from_secs(10)))
        .await
        .unwrap();
}

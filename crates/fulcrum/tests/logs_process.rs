//! Logs of the `fulcrum` binary as a separate process: the access log's file reopened on SIGUSR1,
//! and a stalled stderr that must not stop the traffic.

mod common;

use std::io::Read;
use std::os::fd::AsFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::process::*;
use common::*;
use http::StatusCode;

/// Kills the child when the test ends, also when it fails (a leftover process would keep the
/// caller's inherited file descriptors open).
struct Reap(std::process::Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr1_reopens_the_access_log_file() {
    let apps = apps(&["A"]).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let mut text = config("round_robin", &servers(&apps), "", "");
    text.push_str(&format!("\n[access_log]\npath = \"{}\"\n", log.display()));
    let (text, web, _admin) = fixed_ports(&text);
    let mut child = Reap(spawn_fulcrum(&write_config(&dir, &text)));
    wait_listening(web).await;
    let c = client();
    let r = get(&c, &format!("http://{web}/")).await;
    assert_eq!(r.status, StatusCode::OK);
    let count = |p: &std::path::Path| {
        std::fs::read_to_string(p)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while count(&log) < 1 {
        assert!(Instant::now() < deadline, "first line written");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // logrotate: rename, then signal. Lines go on into the renamed file until the signal is seen.
    let rotated = dir.path().join("access.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    signal(&child.0, "-USR1");
    let mut sent = 1;
    let deadline = Instant::now() + Duration::from_secs(20);
    while count(&log) < 1 {
        assert!(Instant::now() < deadline, "a new file after SIGUSR1");
        let r = get(&c, &format!("http://{web}/")).await;
        assert_eq!(r.status, StatusCode::OK);
        sent += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Every request has its line, in one file or the other.
    let deadline = Instant::now() + Duration::from_secs(10);
    while count(&log) + count(&rotated) < sent {
        assert!(Instant::now() < deadline, "{sent} lines in all");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(count(&rotated) >= 1);
    signal(&child.0, "-TERM");
    assert!(wait_exit(&mut child.0, Duration::from_secs(20)).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_stderr_does_not_stop_traffic() {
    // A server whose every answer is broken (two different Content-Lengths): each request is a 502 and
    // a warning.
    let broken = raw_server(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        false,
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let text = config(
        "round_robin",
        &[("broken".to_owned(), broken.addr, 1)],
        "",
        "",
    );
    let (text, web, admin) = fixed_ports(&text);
    let path = write_config(&dir, &text);
    // stderr is a pipe nobody reads, shrunk to one page: it is full after a few dozen lines.
    let mut child = Reap(
        Command::new(BIN)
            .args(["run", "--config"])
            .arg(&path)
            .env("RUST_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn fulcrum"),
    );
    let stderr = child.0.stderr.take().unwrap();
    rustix::pipe::fcntl_setpipe_size(stderr.as_fd(), 4096).expect("shrink the pipe");
    wait_listening(web).await;
    let c = client();
    let started = Instant::now();
    // At least 3 s of warnings (20 a second get through the rate limit: several KiB), bounded.
    for i in 0..20_000 {
        if i >= 1500 && started.elapsed() > Duration::from_secs(3) {
            break;
        }
        let r = tokio::time::timeout(Duration::from_secs(10), get(&c, &format!("http://{web}/")))
            .await
            .unwrap_or_else(|_| panic!("request {i} answered while stderr is full"));
        assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.body);
    }
    assert!(
        started.elapsed() < Duration::from_secs(120),
        "{:?}",
        started.elapsed()
    );
    let metrics = get(&c, &format!("http://{admin}/metrics")).await.body;
    let value = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} in {metrics}"))
            .parse()
            .unwrap()
    };
    // The warnings beyond 20 a second were suppressed; what was written waits in the writer's queue
    // (or was dropped, once it is full): none of it held up a request.
    assert!(value("fulcrum_log_lines_suppressed_total") > 0, "{metrics}");
    let _ = value("fulcrum_log_lines_dropped_total");
    // Now drain the pipe: fulcrum still answers and exits cleanly.
    let reader = std::thread::spawn(move || {
        let mut stderr = stderr;
        let mut all = Vec::new();
        let _ = stderr.read_to_end(&mut all);
        all
    });
    signal(&child.0, "-TERM");
    assert!(wait_exit(&mut child.0, Duration::from_secs(20)).success());
    let written = reader.join().unwrap();
    assert!(!written.is_empty());
}

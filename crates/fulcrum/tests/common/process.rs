//! Running the `fulcrum` binary as a separate process: config files, fixed ports, signals.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_fulcrum");

pub fn write_config(dir: &tempfile::TempDir, text: &str) -> std::path::PathBuf {
    let path = dir.path().join("fulcrum.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A free port on 127.0.0.1 (bound then released; the test binds it right after).
pub fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

pub fn spawn_fulcrum(config: &std::path::Path) -> Child {
    spawn_fulcrum_with(config, &[])
}

/// `fulcrum run --config CONFIG ARGS…`, logging warnings to the test's stderr.
pub fn spawn_fulcrum_with(config: &std::path::Path, args: &[&std::ffi::OsStr]) -> Child {
    Command::new(BIN)
        .args(["run", "--config"])
        .arg(config)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn fulcrum")
}

pub async fn wait_listening(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "fulcrum did not listen on {addr}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig}");
}

pub fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("fulcrum did not exit within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `config` with the listener and admin on fixed free ports, for a separate process.
pub fn fixed_ports(text: &str) -> (String, SocketAddr, SocketAddr) {
    let web = free_port();
    let admin = free_port();
    let text = text
        .replacen("bind = \"127.0.0.1:0\"", &format!("bind = \"{admin}\""), 1)
        .replacen("bind = \"127.0.0.1:0\"", &format!("bind = \"{web}\""), 1);
    (text, web, admin)
}

//! A small network made of namespaces: a switch (a Linux bridge in its own namespace) and hosts, each
//! in its own namespace with `eth0` on the bridge. Processes run in a host with `ip netns exec`; test
//! code runs in a host on a thread moved into its namespace. Everything is removed on drop. Needs
//! root (CAP_SYS_ADMIN and CAP_NET_ADMIN), as CI has.

use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

static LABS: AtomicUsize = AtomicUsize::new(0);

/// The network: `{prefix}-sw` holds the bridge, `{prefix}-{host}` each host.
pub struct Lab {
    prefix: String,
    hosts: Vec<String>,
    children: Vec<(String, Child)>,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Lab {
    /// A new switch. Namespace names carry the process id and a counter, so parallel tests and
    /// parallel runs never share one.
    pub fn new() -> Lab {
        let n = LABS.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("fl{}x{n}", std::process::id());
        let sw = format!("{prefix}-sw");
        ip(&["netns", "add", &sw]);
        let lab = Lab {
            prefix,
            hosts: Vec::new(),
            children: Vec::new(),
        };
        ip(&["-n", &sw, "link", "set", "lo", "up"]);
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &sw, "link", "set", "br0", "up"]);
        lab
    }

    /// The namespace of `host`.
    pub fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    /// A host on the switch with `addresses` (`"10.77.0.11/24"`) on its `eth0`.
    pub fn host(&mut self, host: &str, addresses: &[&str]) {
        let ns = self.ns(host);
        let sw = self.ns("sw");
        ip(&["netns", "add", &ns]);
        self.hosts.push(ns.clone());
        let port = format!("p-{host}");
        ip(&[
            "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        ip(&["-n", &sw, "link", "set", &port, "master", "br0"]);
        ip(&["-n", &sw, "link", "set", &port, "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        for a in addresses {
            ip(&["-n", &ns, "addr", "add", a, "dev", "eth0"]);
        }
    }

    /// Runs `ip ARGS` inside `host` (`ip -n NS ARGS`).
    pub fn ip(&self, host: &str, args: &[&str]) {
        let ns = self.ns(host);
        let mut all = vec!["-n", ns.as_str()];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// Runs a shell command inside `host` and returns its output (must succeed).
    pub fn sh(&self, host: &str, command: &str) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns(host), "sh", "-c", command])
            .output()
            .expect("run sh");
        assert!(
            out.status.success(),
            "{command}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Whether `host` has `address` on any interface.
    pub fn has_address(&self, host: &str, address: Ipv4Addr) -> bool {
        self.sh(host, "ip -4 -o addr show")
            .split_whitespace()
            .any(|w| w.split('/').next() == Some(&address.to_string()))
    }

    /// Starts `program ARGS` in `host`; `name` finds it again. stdout is dropped, stderr inherited.
    pub fn spawn(&mut self, host: &str, name: &str, program: &str, args: &[&str]) {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns(host), program])
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
        self.children.push((name.to_owned(), child));
    }

    /// Sends `signal` (`"-KILL"`, `"-TERM"`) to the process `name` and waits for it to exit.
    pub fn kill(&mut self, name: &str, signal: &str) {
        let i = self
            .children
            .iter()
            .position(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no process {name}"));
        let (_, mut child) = self.children.remove(i);
        // `ip netns exec` execs the program: the child's pid is the program's.
        let ok = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {signal} {name}");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if child.try_wait().unwrap().is_some() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{name} did not exit after {signal}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the process `name` to exit by itself.
    pub fn wait_exit(&mut self, name: &str, within: Duration) {
        let i = self
            .children
            .iter()
            .position(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no process {name}"));
        let deadline = Instant::now() + within;
        while self.children[i].1.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "{name} still runs after {within:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.children.remove(i);
    }

    /// Runs `f` on a thread inside `host`'s network namespace: the sockets it opens live there.
    pub fn run_in<R: Send + 'static>(
        &self,
        host: &str,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> std::thread::JoinHandle<R> {
        let path = format!("/run/netns/{}", self.ns(host));
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            rustix::thread::move_into_link_name_space(
                ns.as_fd(),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .expect("setns");
            f()
        })
    }

    /// Runs the async `f` to completion on a current-thread runtime inside `host`.
    pub fn block_in<R, F>(&self, host: &str, f: impl FnOnce() -> F + Send + 'static) -> R
    where
        R: Send + 'static,
        F: std::future::Future<Output = R>,
    {
        self.run_in(host, move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(f())
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // TERM first (keepalived stops its children on it), then KILL what is left.
        for (_, child) in &self.children {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for (_, child) in &mut self.children {
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in self
            .hosts
            .iter()
            .chain(std::iter::once(&format!("{}-sw", self.prefix)))
        {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

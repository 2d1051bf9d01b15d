//! What one proxied keep-alive request allocates: a counting global allocator watches 2,000 requests
//! through a balancer in this process (one worker) to a demo server in another process, sent by a
//! client that itself allocates nothing per request.
//!
//! A test binary of its own, because it replaces the global allocator.

// A `GlobalAlloc` impl is unsafe by definition; it only forwards to the system allocator.
#![allow(unsafe_code)]

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
/// Bytes allocated and not freed.
static LIVE_BYTES: AtomicI64 = AtomicI64::new(0);
/// Live allocations by size class (log2 of the size).
static LIVE_BY_CLASS: [AtomicI64; 40] = [const { AtomicI64::new(0) }; 40];
/// Live bytes by size class.
static LIVE_BYTES_BY_CLASS: [AtomicI64; 40] = [const { AtomicI64::new(0) }; 40];

/// Bytes allocated and not freed by fulcrum's worker threads.
static WORKER_LIVE_BYTES: AtomicI64 = AtomicI64::new(0);

thread_local! {
    /// Whether this thread is a fulcrum worker: 0 not known yet, 1 finding out, 2 yes, 3 no.
    static WORKER: std::cell::Cell<u8> = const { std::cell::Cell::new(0) };
}

/// Whether the calling thread is one of fulcrum's workers (its name says so). Finding out may
/// allocate; what it allocates is not attributed.
fn on_worker() -> bool {
    WORKER.with(|w| match w.get() {
        2 => true,
        1 | 3 => false,
        _ => {
            w.set(1);
            let yes = std::thread::current()
                .name()
                .is_some_and(|n| n.starts_with("fulcrum-worker"));
            w.set(if yes { 2 } else { 3 });
            yes
        }
    })
}

fn class(size: usize) -> usize {
    (usize::BITS - size.max(1).leading_zeros()) as usize % 40
}

// SAFETY: every call is forwarded unchanged to `System`; the counter is a static atomic, so counting
// never allocates or re-enters the allocator.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        LIVE_BYTES.fetch_add(layout.size() as i64, Ordering::Relaxed);
        LIVE_BY_CLASS[class(layout.size())].fetch_add(1, Ordering::Relaxed);
        LIVE_BYTES_BY_CLASS[class(layout.size())]
            .fetch_add(layout.size() as i64, Ordering::Relaxed);
        if on_worker() {
            WORKER_LIVE_BYTES.fetch_add(layout.size() as i64, Ordering::Relaxed);
        }
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        LIVE_BY_CLASS[class(layout.size())].fetch_sub(1, Ordering::Relaxed);
        LIVE_BYTES_BY_CLASS[class(layout.size())]
            .fetch_sub(layout.size() as i64, Ordering::Relaxed);
        if on_worker() {
            WORKER_LIVE_BYTES.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        }
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        LIVE_BYTES.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        LIVE_BY_CLASS[class(layout.size())].fetch_sub(1, Ordering::Relaxed);
        LIVE_BY_CLASS[class(new_size)].fetch_add(1, Ordering::Relaxed);
        LIVE_BYTES_BY_CLASS[class(layout.size())]
            .fetch_sub(layout.size() as i64, Ordering::Relaxed);
        LIVE_BYTES_BY_CLASS[class(new_size)].fetch_add(new_size as i64, Ordering::Relaxed);
        if on_worker() {
            WORKER_LIVE_BYTES.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        }
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The counters are the whole process's: the tests of this file run one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The most allocations one proxied keep-alive `GET` may make (the whole process: the worker, the
/// control thread, the client).
const BUDGET: u64 = 16;

/// A demo server in its own process and a one-worker balancer in this one in front of it; both stop
/// on drop.
struct Site {
    app: std::process::Child,
    running: Option<fulcrum::runtime::Running>,
    web: std::net::SocketAddr,
}

impl Site {
    fn start() -> Site {
        let app_addr = common::process::free_port();
        let app = std::process::Command::new(common::process::BIN)
            .args(["app", "--listen", &app_addr.to_string(), "--name", "A"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let config = format!(
            "[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\npool = \"p\"\n\
             [[pools]]\nname = \"p\"\nservers = [{{ address = \"{app_addr}\" }}]\n"
        );
        let running = fulcrum::runtime::start_with_workers(
            fulcrum::config::parse(&config, "test").unwrap(),
            1,
        )
        .unwrap();
        let web = running.listener_addr("web").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(app_addr).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "the demo server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Site {
            app,
            running: Some(running),
            web,
        }
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            r.stop();
        }
        let _ = self.app.kill();
        let _ = self.app.wait();
    }
}

/// Sends `GET /` on `conn` and reads the whole answer into `buf` (no allocation).
fn round_trip(conn: &mut TcpStream, buf: &mut [u8; 4096]) {
    conn.write_all(b"GET / HTTP/1.1\r\nhost: a\r\nuser-agent: alloc-test\r\n\r\n")
        .unwrap();
    let mut have = 0;
    loop {
        let n = conn.read(&mut buf[have..]).unwrap();
        assert!(n > 0, "the balancer closed the connection");
        have += n;
        let text = &buf[..have];
        if let Some(end) = text.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = &text[..end];
            let length = head
                .split(|&b| b == b'\n')
                .find_map(|line| {
                    let line = std::str::from_utf8(line).ok()?.trim();
                    let (name, value) = line.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().ok())?
                })
                .expect("a content-length");
            assert!(
                head.starts_with(b"HTTP/1.1 200"),
                "{}",
                String::from_utf8_lossy(head)
            );
            if have >= end + 4 + length {
                return;
            }
        }
    }
}

#[test]
fn a_proxied_keep_alive_request_makes_a_small_fixed_number_of_allocations() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let site = Site::start();
    let web = site.web;
    let mut conn = TcpStream::connect(web).unwrap();
    conn.set_nodelay(true).unwrap();
    let mut buf = [0u8; 4096];
    // Warm up: pooled connections, buffers and caches in place.
    for _ in 0..200 {
        round_trip(&mut conn, &mut buf);
    }
    const N: u64 = 2_000;
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    for _ in 0..N {
        round_trip(&mut conn, &mut buf);
    }
    let per_request = (ALLOCATIONS.load(Ordering::Relaxed) - before) as f64 / N as f64;
    eprintln!("{per_request:.2} allocations per proxied keep-alive request");
    drop(site);
    assert!(
        per_request <= BUDGET as f64,
        "{per_request:.2} allocations per request, over the budget of {BUDGET}"
    );
}

/// The most heap an idle keep-alive client connection may hold in the balancer, in bytes, once it has
/// parked (100 ms after its last answer): no task and no buffer, only tokio's registration of its
/// socket (256 B), its context (under 256 B), its parked entry (under 128 B) and a few small pieces
/// (its socket's `Arc`, its connection slot, its address as a header value). About 700 B measured
/// (release build); a connection still waiting in its task holds about 1.5 KB, an 8 KiB buffer
/// would be far over.
const IDLE_BUDGET: i64 = 1024;

#[test]
fn an_idle_keep_alive_connection_parks_holding_no_task_and_no_buffer() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let site = Site::start();
    let web = site.web;
    let mut buf = [0u8; 4096];
    // Warm up: the worker's buffer pool, the server connections.
    let mut warm = TcpStream::connect(web).unwrap();
    for _ in 0..50 {
        round_trip(&mut warm, &mut buf);
    }
    const N: usize = 500;
    let mut conns = Vec::with_capacity(N);
    std::thread::sleep(Duration::from_millis(200));
    let before = LIVE_BYTES.load(Ordering::Relaxed);
    let classes_before: Vec<i64> = LIVE_BY_CLASS
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .collect();
    let class_bytes_before: Vec<i64> = LIVE_BYTES_BY_CLASS
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .collect();
    for _ in 0..N {
        let mut c = TcpStream::connect(web).unwrap();
        round_trip(&mut c, &mut buf);
        conns.push(c);
    }
    // Past the time a waiting connection parks (100 ms), with a wide margin.
    std::thread::sleep(Duration::from_millis(2500));
    let per_conn = (LIVE_BYTES.load(Ordering::Relaxed) - before) / N as i64;
    let held: Vec<String> = LIVE_BY_CLASS
        .iter()
        .zip(&classes_before)
        .enumerate()
        .filter_map(|(i, (c, b))| {
            let n = c.load(Ordering::Relaxed) - b;
            let bytes = LIVE_BYTES_BY_CLASS[i].load(Ordering::Relaxed) - class_bytes_before[i];
            (n >= N as i64 / 2)
                .then(|| format!("{n} of <{} ({} B each)", 1u64 << i, bytes / n.max(1)))
        })
        .collect();
    eprintln!("an idle keep-alive connection holds {per_conn} bytes of heap; allocations held by size: {held:?}");
    // The clients go: once the balancer has closed every connection, the heap is back where it was
    // before they came (a few bytes per connection at most, for tables that keep their capacity).
    drop(conns);
    let state = site.running.as_ref().unwrap().shared().state();
    let stats = state.listeners[0].stats();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while stats.active_connections.load(Ordering::Relaxed) > 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the closed connections were not let go"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    let left = (LIVE_BYTES.load(Ordering::Relaxed) - before) / N as i64;
    eprintln!("after the connections closed, {left} bytes per connection are still held");
    drop(state);
    drop(site);
    assert!(
        per_conn <= IDLE_BUDGET,
        "{per_conn} bytes per idle connection, over {IDLE_BUDGET}: {held:?}"
    );
    assert!(
        left <= LEFT_BUDGET,
        "{left} bytes per connection still held after they closed, over {LEFT_BUDGET}"
    );
}

/// What may stay allocated per connection after the connections closed: the parked set's slab keeps
/// its capacity (one slot per connection that was parked at once).
const LEFT_BUDGET: i64 = 64;

/// h2c clients stay with hyper: what one idle h2c connection holds in the worker (40-56 KB:
/// hyper's and h2's buffers and state), measured so that docs/benchmarks.md can quote it, and bounded
/// loosely so that a regression shows.
#[test]
fn an_idle_h2c_connection_is_measured() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let site = Site::start();
    let web = site.web;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    const N: i64 = 200;
    let per_conn = rt.block_on(async {
        let url = format!("http://{web}/");
        let warm = common::h2c_client();
        assert_eq!(common::get(&warm, &url).await.status, 200);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let before = WORKER_LIVE_BYTES.load(Ordering::Relaxed);
        let mut clients = Vec::new();
        for _ in 0..N {
            let c = common::h2c_client();
            assert_eq!(common::get(&c, &url).await.status, 200);
            clients.push(c);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let per_conn = (WORKER_LIVE_BYTES.load(Ordering::Relaxed) - before) / N;
        drop(clients);
        per_conn
    });
    eprintln!("an idle h2c connection holds {per_conn} bytes of heap in the worker (hyper)");
    drop(site);
    assert!(per_conn > 0 && per_conn < 256 * 1024, "{per_conn}");
}

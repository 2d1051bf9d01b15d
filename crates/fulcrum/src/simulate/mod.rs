//! `fulcrum simulate`: replays request arrivals through each balancing algorithm, in virtual time, to
//! choose an algorithm from data.
//!
//! **Real pickers.** Each algorithm runs as the proxy runs it: a real [`Pool`] is built from the
//! pool's configuration (with its `algorithm` replaced), and every request is placed with the pool's
//! own [`PoolSnapshot::pick_with`] and [`PoolSnapshot::next_available`]. In-flight counts are the
//! servers' real counters, held by real [`InFlight`] guards from the pick to the answer; latency is
//! fed to the servers' real peak EWMA ([`ServerStats`](crate::pool::ServerStats)) and read back
//! decayed, both at the virtual time of the event. Nothing of the balancing is re-implemented here,
//! only the servers and the clients.
//!
//! **A discrete-event simulation.** Arrivals come from an access log (`time` field) or a synthetic
//! Poisson process; each server draws its answer time from a model (fixed, exponential, lognormal,
//! or the answers the log observed from it), times a `slow` factor, and fails a fraction `fail` of its
//! requests fast (503 within 1 ms). A server serves any number of requests at once, or `workers` of
//! them with a FIFO queue behind. Events are processed in time order, answers before arrivals at the
//! same instant, so an answer frees its server before the next pick. `max_connections_per_server`
//! queues requests in the pool's queue as the proxy does (`max_queue`, `queue_timeout`). Nothing
//! sleeps: a run of 100 000 requests takes well under a second of real time (release build). Each
//! request's answer time on each server is a pure function of `(seed, request, server)`, so every
//! algorithm meets the same draws and a run is deterministic for its seed.
//!
//! **What is not simulated**: health checks (active and passive), slow start, retries (a failing
//! server *answers* with an error, which the proxy does not retry), and the network. The stick table
//! has no TTL or size limit.
//!
//! **Measures**, per algorithm: the requests per server and the busiest server's share against the
//! mean (weights taken into account); the client-side latency percentiles (arrival to answer,
//! including any wait in a queue); errors; the fraction of keys whose server changes when one
//! server leaves (two runs, with and without it: the server of each key's first request); and, in a
//! third run with stickiness by client address, the share of returning clients' requests that went to
//! their sticky server, and the latency and spread under stickiness.

mod workload;

use std::cmp::Ordering as CmpOrdering;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Arc;

use serde::Serialize;

pub use workload::{
    parse_rfc3339_ns, read_log, Arrival, Latency, PerServer, Sample, ServerModel, Synthetic,
    Workload, FAIL_NS,
};

use crate::balance::{hash_key, Loads};
use crate::config::{Algorithm, HashKey, PoolConfig};
use crate::pool::{InFlight, Pool, PoolSnapshot, ServerState};

/// What to compare.
#[derive(Debug, Clone)]
pub struct Options {
    /// The algorithms, in the order of the report.
    pub algorithms: Vec<Algorithm>,
    /// Seed of the answer times (and of synthetic arrivals, drawn by the caller).
    pub seed: u64,
    /// The server that leaves for "keys moved" (default: the pool's last server).
    pub leaving: Option<String>,
}

/// The outcome of one algorithm.
#[derive(Debug, Clone, Serialize)]
pub struct AlgorithmResult {
    /// The algorithm's configuration name.
    pub algorithm: &'static str,
    /// Requests sent to each server, in the pool's order.
    pub requests: Vec<u64>,
    /// The busiest server's requests per unit of weight over the pool's mean (1.0: even).
    pub max_over_mean: f64,
    /// Client-side latency (arrival to answer) percentiles and mean, in milliseconds.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Mean.
    pub mean_ms: f64,
    /// Requests answered with an error or refused (no server, queue full or timed out).
    pub errors: u64,
    /// Distinct keys whose server (of their first request) changes when `leaving` leaves the pool.
    pub keys_moved: f64,
    /// With stickiness by client, and the leaving server taken out halfway: the share of returning
    /// clients' requests sent to their sticky server.
    pub sticky_hits: f64,
    /// With stickiness by client (leaving server out halfway): the 99th percentile latency, in ms.
    pub sticky_p99_ms: f64,
    /// With stickiness by client (leaving server out halfway): the busiest server's share over the mean.
    pub sticky_max_over_mean: f64,
}

/// One server as the report shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ServerReport {
    /// Its name.
    pub name: String,
    /// Its weight.
    pub weight: u32,
    /// Its model, described.
    pub model: String,
}

/// The comparison.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The pool's name.
    pub pool: String,
    /// The algorithm the configuration file sets.
    pub configured: &'static str,
    /// The keys hashed, and compared for "keys moved".
    pub hash_key: String,
    /// Where the arrivals came from.
    pub workload: String,
    /// How many requests.
    pub requests: usize,
    /// Virtual time from the first arrival to the last, in seconds.
    pub duration_s: f64,
    /// The servers, in the pool's order.
    pub servers: Vec<ServerReport>,
    /// The server that leaves for "keys moved".
    pub leaving: String,
    /// The seed.
    pub seed: u64,
    /// One result per algorithm.
    pub results: Vec<AlgorithmResult>,
}

impl Report {
    /// The result of `algorithm`, if it was simulated.
    pub fn result(&self, algorithm: Algorithm) -> Option<&AlgorithmResult> {
        self.results
            .iter()
            .find(|r| r.algorithm == algorithm.as_str())
    }
}

/// The pool configuration that runs `algorithm` over the servers of `cfg`, as the proxy would (a hash
/// algorithm keeps `cfg`'s `hash_key`, else hashes the source address), without what is not
/// simulated: health checks (every server starts up), passive health, slow start, TLS and DNS.
pub fn with_algorithm(cfg: &PoolConfig, algorithm: Algorithm) -> PoolConfig {
    let mut c = cfg.clone();
    c.algorithm = algorithm;
    c.hash_key = algorithm
        .uses_hash_key()
        .then(|| cfg.hash_key.clone().unwrap_or(HashKey::SourceIp));
    if algorithm != Algorithm::ConsistentHash {
        c.hash_balance_factor = None;
    }
    c.health_check = None;
    c.passive = None;
    c.slow_start = None;
    c.tls = None;
    c.dns_servers.clear();
    c.dns_srv = None;
    c
}

/// The hash key of `arrival` as the proxy computes it for `key` (`balance::hash_key` of the same
/// bytes). The log has no headers or cookies: `header:` and `cookie:` keys hash the path instead.
pub fn request_key(key: &HashKey, arrival: &Arrival) -> u64 {
    let ip = |bytes: &mut [u8; 18]| match arrival.client.ip() {
        IpAddr::V4(ip) => {
            bytes[..4].copy_from_slice(&ip.octets());
            4
        }
        IpAddr::V6(ip) => {
            bytes[..16].copy_from_slice(&ip.octets());
            16
        }
    };
    let mut bytes = [0u8; 18];
    match key {
        HashKey::SourceIp => {
            let n = ip(&mut bytes);
            hash_key(&bytes[..n])
        }
        HashKey::SourceIpPort => {
            let n = ip(&mut bytes);
            bytes[n..n + 2].copy_from_slice(&arrival.client.port().to_be_bytes());
            hash_key(&bytes[..n + 2])
        }
        HashKey::Uri | HashKey::Header(_) | HashKey::Cookie(_) => hash_key(arrival.path.as_bytes()),
    }
}

/// What one run measured.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Run {
    /// Requests sent to each server (index of the run's pool).
    pub per_server: Vec<u64>,
    /// Client-side latency of each answered request, ns, in order of answer.
    pub latencies: Vec<u64>,
    /// Requests answered with an error, or refused.
    pub errors: u64,
    /// Per key (the comparison key), the server of its first request.
    pub first: HashMap<u64, usize>,
    /// Requests of clients that had a sticky server.
    pub sticky_lookups: u64,
    /// Of those, requests that went to it.
    pub sticky_hits: u64,
}

/// The simulation's inputs for one run.
pub struct Setup<'a> {
    /// The pool (its `algorithm` is the one that runs).
    pub pool: &'a PoolConfig,
    /// One model per server of `pool`, in order.
    pub models: &'a [ServerModel],
    /// The requests.
    pub arrivals: &'a [Arrival],
    /// Per request, its key for the hash algorithms and for "keys moved".
    pub keys: &'a [u64],
    /// Seed of the answer times.
    pub seed: u64,
    /// Per server of `pool`, the index under which it draws its answer times (its index in the full
    /// pool, so that a run without one server draws the same times on the others).
    pub draw_ids: &'a [usize],
    /// Stickiness by client address.
    pub sticky: bool,
    /// A server (index in `pool`) taken out of service (state `maint`) at a virtual time, ns.
    pub leave: Option<(usize, u64)>,
}

/// A request being served (or waiting in its server's queue), counted in flight by its guard.
struct Job {
    req: usize,
    server: usize,
    sent: u64,
    service: u64,
    error: bool,
    _in_flight: InFlight,
}

/// An answer due at `at`.
struct Answer {
    at: u64,
    seq: u64,
    job: Job,
}

impl PartialEq for Answer {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Answer {}
impl PartialOrd for Answer {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl Ord for Answer {
    /// Reversed: the earliest answer is the greatest, for the max-heap.
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

/// The pool's live load as the pickers read it, with latency estimates read at virtual time `now`.
struct AtTime<'a> {
    snapshot: &'a PoolSnapshot,
    now: u64,
}

impl Loads for AtTime<'_> {
    fn len(&self) -> usize {
        self.snapshot.len()
    }

    fn in_flight(&self, i: usize) -> u64 {
        self.snapshot.in_flight(i)
    }

    fn latency_ns(&self, i: usize) -> u64 {
        self.snapshot.servers[i]
            .stats
            .latency_estimate_at(self.now + 1)
    }

    fn available(&self, i: usize) -> bool {
        self.snapshot.available(i)
    }

    fn admits(&self, i: usize) -> bool {
        self.snapshot.admits(i)
    }

    fn total_in_flight(&self) -> u64 {
        self.snapshot.total_in_flight()
    }
}

/// Where a request went.
enum Placed {
    Server,
    /// No server can take it now, but one will: it waits in the pool's queue.
    Wait,
    Refused,
}

struct Engine<'a> {
    s: &'a Setup<'a>,
    snapshot: Arc<PoolSnapshot>,
    /// Key for the picker: present for hash algorithms.
    hashes: bool,
    now: u64,
    seq: u64,
    answers: BinaryHeap<Answer>,
    busy: Vec<u32>,
    waiting: Vec<VecDeque<Job>>,
    queue: VecDeque<usize>,
    stuck: HashMap<IpAddr, usize>,
    out: Run,
}

/// Runs the requests of `setup` through its pool in virtual time.
pub fn run(setup: &Setup<'_>) -> Run {
    let pool = Pool::new(setup.pool);
    let snapshot = pool.snapshot_full();
    let n = snapshot.servers.len();
    let mut e = Engine {
        s: setup,
        hashes: snapshot.settings.hash_key.is_some(),
        snapshot,
        now: 0,
        seq: 0,
        answers: BinaryHeap::new(),
        busy: vec![0; n],
        waiting: (0..n).map(|_| VecDeque::new()).collect(),
        queue: VecDeque::new(),
        stuck: HashMap::new(),
        out: Run {
            per_server: vec![0; n],
            latencies: Vec::with_capacity(setup.arrivals.len()),
            ..Run::default()
        },
    };
    let mut next = 0;
    let mut leave = setup.leave;
    loop {
        let arrival = setup.arrivals.get(next).map(|a| a.at_ns);
        let answer = e.answers.peek().map(|a| a.at);
        if let Some((server, at)) = leave {
            if arrival
                .into_iter()
                .chain(answer)
                .min()
                .is_some_and(|t| t >= at)
            {
                e.snapshot.servers[server].set_state(ServerState::Maint);
                leave = None;
            }
        }
        match (arrival, answer) {
            (None, None) => break,
            // Answers first at the same instant: they free their servers before the next pick.
            (Some(a), Some(d)) if d <= a => e.answer(),
            (None, Some(_)) => e.answer(),
            (Some(a), _) => {
                e.now = e.now.max(a);
                if let Placed::Wait = e.place(next) {
                    if e.queue.len() < e.snapshot.settings.max_queue {
                        e.queue.push_back(next);
                    } else {
                        e.out.errors += 1;
                    }
                }
                next += 1;
            }
        }
    }
    // Nothing left to free a server: whoever still waits is refused.
    e.out.errors += e.queue.len() as u64;
    e.out
}

impl Engine<'_> {
    /// Sends request `req` to a server: its sticky one, else the algorithm's pick.
    fn place(&mut self, req: usize) -> Placed {
        let snapshot = self.snapshot.clone();
        let client = self.s.arrivals[req].client.ip();
        let mut sticky_server = None;
        if self.s.sticky {
            if let Some(&i) = self.stuck.get(&client) {
                self.out.sticky_lookups += 1;
                if crate::sticky::can_stick(&snapshot.servers[i]) {
                    self.out.sticky_hits += 1;
                    sticky_server = Some(i);
                }
            }
        }
        let chosen = sticky_server.or_else(|| {
            let key = self.hashes.then(|| self.s.keys[req]);
            let loads = AtTime {
                snapshot: &snapshot,
                now: self.now,
            };
            let mut candidates = snapshot.pick_with(key, &loads);
            let server = snapshot.next_available(&mut candidates)?;
            snapshot.servers.iter().position(|s| Arc::ptr_eq(s, server))
        });
        let Some(server) = chosen else {
            return if snapshot.saturated() {
                Placed::Wait
            } else {
                self.out.errors += 1;
                Placed::Refused
            };
        };
        self.out.per_server[server] += 1;
        let (service, error) =
            self.s.models[server].draw(self.s.seed, req, self.s.draw_ids[server]);
        let job = Job {
            req,
            server,
            sent: self.now,
            service,
            error,
            _in_flight: InFlight::start(snapshot.servers[server].clone()),
        };
        match self.s.models[server].workers {
            Some(w) if self.busy[server] >= w => self.waiting[server].push_back(job),
            _ => self.serve(job),
        }
        Placed::Server
    }

    /// The server starts on `job` now.
    fn serve(&mut self, job: Job) {
        self.busy[job.server] += 1;
        self.seq += 1;
        self.answers.push(Answer {
            at: self.now + job.service,
            seq: self.seq,
            job,
        });
    }

    /// The earliest answer arrives.
    fn answer(&mut self) {
        let Some(Answer { at, job, .. }) = self.answers.pop() else {
            return;
        };
        self.now = at;
        let server = &self.snapshot.servers[job.server];
        // The proxy's `record_response`: the time from sending to the answer feeds the peak EWMA.
        server.stats.observe_latency((at - job.sent).max(1), at + 1);
        let arrival = &self.s.arrivals[job.req];
        self.out.latencies.push(at - arrival.at_ns);
        self.out.errors += u64::from(job.error);
        self.out
            .first
            .entry(self.s.keys[job.req])
            .or_insert(job.server);
        if self.s.sticky {
            self.stuck.insert(arrival.client.ip(), job.server);
        }
        let s = job.server;
        drop(job); // out of flight
        self.busy[s] -= 1;
        if let Some(next) = self.waiting[s].pop_front() {
            self.serve(next);
        }
        // A freed slot goes to the pool's queue, oldest first.
        let timeout = self.snapshot.settings.queue_timeout.as_nanos() as u64;
        while let Some(&req) = self.queue.front() {
            if self.now - self.s.arrivals[req].at_ns > timeout {
                self.queue.pop_front();
                self.out.errors += 1;
                continue;
            }
            match self.place(req) {
                Placed::Wait => break,
                Placed::Server | Placed::Refused => {
                    self.queue.pop_front();
                }
            }
        }
    }
}

/// The value at quantile `q` of sorted `v` (nearest rank), in ms.
fn quantile_ms(v: &[u64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1] as f64 / 1e6
}

/// The busiest server's requests per unit of weight over the mean.
fn max_over_mean(per_server: &[u64], weights: &[u32]) -> f64 {
    let total: u64 = per_server.iter().sum();
    let weight: u64 = weights.iter().map(|&w| u64::from(w.max(1))).sum();
    if total == 0 || weight == 0 {
        return 0.0;
    }
    let mean = total as f64 / weight as f64;
    per_server
        .iter()
        .zip(weights)
        .map(|(&n, &w)| n as f64 / f64::from(w.max(1)))
        .fold(0.0, f64::max)
        / mean
}

/// Compares `options.algorithms` on `workload` over the servers of `pool`, each behaving as its model
/// (`models[i]` for `pool.servers[i]`).
pub fn compare(
    pool: &PoolConfig,
    models: &[ServerModel],
    workload: &Workload,
    options: &Options,
) -> Result<Report, String> {
    if pool.servers.is_empty() {
        return Err(format!(
            "pool `{}` has no server with an IP:PORT address (DNS servers are not simulated)",
            pool.name
        ));
    }
    if models.len() != pool.servers.len() {
        return Err("one model per server is needed".to_owned());
    }
    let leaving = match &options.leaving {
        Some(name) => pool
            .servers
            .iter()
            .position(|s| &s.name == name)
            .ok_or_else(|| format!("pool `{}` has no server `{name}`", pool.name))?,
        None => pool.servers.len() - 1,
    };
    let key_kind = pool.hash_key.clone().unwrap_or(HashKey::SourceIp);
    let keys: Vec<u64> = workload
        .arrivals
        .iter()
        .map(|a| request_key(&key_kind, a))
        .collect();
    let weights: Vec<u32> = pool.servers.iter().map(|s| s.weight).collect();
    let all_ids: Vec<usize> = (0..pool.servers.len()).collect();
    let mut results = Vec::new();
    for &algorithm in &options.algorithms {
        let cfg = with_algorithm(pool, algorithm);
        let setup = |cfg, models, ids, sticky| Setup {
            pool: cfg,
            models,
            arrivals: &workload.arrivals,
            keys: &keys,
            seed: options.seed,
            draw_ids: ids,
            sticky,
            leave: None,
        };
        let mut main = run(&setup(&cfg, models, &all_ids, false));
        main.latencies.sort_unstable();
        // Without the leaving server: which keys changed server?
        let mut smaller = cfg.clone();
        smaller.servers.remove(leaving);
        let kept_ids: Vec<usize> = all_ids.iter().copied().filter(|&i| i != leaving).collect();
        let kept_models: Vec<ServerModel> = kept_ids.iter().map(|&i| models[i].clone()).collect();
        let keys_moved = if smaller.servers.is_empty() {
            1.0
        } else {
            let without = run(&setup(&smaller, &kept_models, &kept_ids, false));
            let moved = main
                .first
                .iter()
                .filter(|(k, &s)| without.first.get(k).map(|&t| kept_ids[t]) != Some(s))
                .count();
            moved as f64 / main.first.len().max(1) as f64
        };
        // Sticky, with the leaving server taken out halfway: its clients are dispatched again.
        let halfway = workload.arrivals.last().map_or(0, |a| a.at_ns / 2);
        let mut sticky = run(&Setup {
            leave: Some((leaving, halfway)),
            ..setup(&cfg, models, &all_ids, true)
        });
        sticky.latencies.sort_unstable();
        let mean = if main.latencies.is_empty() {
            0.0
        } else {
            main.latencies.iter().map(|&l| l as f64).sum::<f64>()
                / main.latencies.len() as f64
                / 1e6
        };
        results.push(AlgorithmResult {
            algorithm: algorithm.as_str(),
            max_over_mean: max_over_mean(&main.per_server, &weights),
            p50_ms: quantile_ms(&main.latencies, 0.5),
            p99_ms: quantile_ms(&main.latencies, 0.99),
            p999_ms: quantile_ms(&main.latencies, 0.999),
            mean_ms: mean,
            errors: main.errors,
            keys_moved,
            sticky_hits: sticky.sticky_hits as f64 / sticky.sticky_lookups.max(1) as f64,
            sticky_p99_ms: quantile_ms(&sticky.latencies, 0.99),
            sticky_max_over_mean: max_over_mean(&sticky.per_server, &weights),
            requests: main.per_server,
        });
    }
    let duration_s = workload
        .arrivals
        .last()
        .map_or(0.0, |a| a.at_ns as f64 / 1e9);
    Ok(Report {
        pool: pool.name.clone(),
        configured: pool.algorithm.as_str(),
        hash_key: key_name(&key_kind),
        workload: workload.source.clone(),
        requests: workload.arrivals.len(),
        duration_s,
        servers: pool
            .servers
            .iter()
            .zip(models)
            .map(|(s, m)| ServerReport {
                name: s.name.clone(),
                weight: s.weight,
                model: m.describe(),
            })
            .collect(),
        leaving: pool.servers[leaving].name.clone(),
        seed: options.seed,
        results,
    })
}

fn key_name(key: &HashKey) -> String {
    match key {
        HashKey::SourceIp => "source_ip".to_owned(),
        HashKey::SourceIpPort => "source_ip_port".to_owned(),
        HashKey::Uri => "uri".to_owned(),
        HashKey::Header(h) => format!("header:{h} (the path: the log has no headers)"),
        HashKey::Cookie(c) => format!("cookie:{c} (the path: the log has no cookies)"),
    }
}

impl Report {
    /// The report as a table.
    pub fn table(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "pool `{}` ({} in the configuration), {} servers; seed {}",
            self.pool,
            self.configured,
            self.servers.len(),
            self.seed
        );
        let _ = writeln!(
            o,
            "workload: {} ({:.1} s of virtual time)",
            self.workload, self.duration_s
        );
        let width = self.servers.iter().map(|s| s.name.len()).max().unwrap_or(0);
        for s in &self.servers {
            let _ = writeln!(
                o,
                "  server {:<width$}  weight {:<3} {}",
                s.name, s.weight, s.model
            );
        }
        let _ = writeln!(
            o,
            "moved: keys ({}) whose server changes when `{}` leaves\n\
             sticky: returning clients' requests to their sticky server, stickiness by client address and \
             `{}` out of service halfway (st.: with that stickiness)\n",
            self.hash_key, self.leaving, self.leaving
        );
        let show_shares = self.servers.len() <= 8;
        let shares_w = if show_shares {
            (6 * self.servers.len()).max(17)
        } else {
            0
        };
        let _ = write!(o, "{:<21}", "algorithm");
        if show_shares {
            let _ = write!(o, " {:<shares_w$}", "share per server");
        }
        let _ = writeln!(
            o,
            " {:>8} {:>7} {:>7} {:>7} {:>8} {:>7} {:>6} {:>7} {:>7} {:>8}",
            "max/mean",
            "mean ms",
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
            "errors",
            "moved",
            "sticky",
            "st. p99",
            "st. max"
        );
        for r in &self.results {
            let total: u64 = r.requests.iter().sum::<u64>().max(1);
            let _ = write!(o, "{:<21}", r.algorithm);
            if show_shares {
                let shares: Vec<String> = r
                    .requests
                    .iter()
                    .map(|&n| format!("{:.0}%", n as f64 * 100.0 / total as f64))
                    .collect();
                let _ = write!(o, " {:<shares_w$}", shares.join(" "));
            }
            let _ = writeln!(
                o,
                " {:>8.2} {:>7.1} {:>7.1} {:>7.1} {:>8.1} {:>6.2}% {:>5.0}% {:>6.1}% {:>7.1} {:>8.2}",
                r.max_over_mean,
                r.mean_ms,
                r.p50_ms,
                r.p99_ms,
                r.p999_ms,
                r.errors as f64 * 100.0 / self.requests.max(1) as f64,
                r.keys_moved * 100.0,
                r.sticky_hits * 100.0,
                r.sticky_p99_ms,
                r.sticky_max_over_mean
            );
        }
        o
    }
}

/// Parses an algorithm's configuration name.
pub fn parse_algorithm(name: &str) -> Result<Algorithm, String> {
    Algorithm::ALL
        .iter()
        .copied()
        .find(|a| a.as_str() == name.trim())
        .ok_or_else(|| {
            format!(
                "unknown algorithm `{name}` (one of: {})",
                Algorithm::ALL.map(|a| a.as_str()).join(", ")
            )
        })
}

/// `fulcrum simulate`'s arguments.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Command {
    /// The configuration file (its pool's servers, weights and settings are simulated).
    #[arg(long, env = "FULCRUM_CONFIG", default_value = "fulcrum.toml")]
    pub config: std::path::PathBuf,
    /// The pool, when the file has several.
    #[arg(long)]
    pub pool: Option<String>,
    /// An access log (JSON lines) whose HTTP requests of the pool are replayed; without it, a
    /// synthetic workload (--rate, --requests, --keys, --zipf).
    #[arg(long)]
    pub log: Option<std::path::PathBuf>,
    /// The algorithms to compare, comma-separated (default: all).
    #[arg(long, value_delimiter = ',')]
    pub algorithms: Vec<String>,
    /// Synthetic workload: requests per second (Poisson arrivals).
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Synthetic workload: how many requests.
    #[arg(long, default_value_t = 20_000)]
    pub requests: usize,
    /// Synthetic workload: distinct clients (each its own address).
    #[arg(long, default_value_t = 1000)]
    pub keys: usize,
    /// Synthetic workload: Zipf exponent of the clients' popularity (0: uniform).
    #[arg(long, default_value_t = 0.0)]
    pub zipf: f64,
    /// Answer time, for every server or `NAME=DIST`: `10ms`, `exp:10ms` (mean) or
    /// `lognormal:10ms:0.5` (median, sigma). Default: what the log observed, else
    /// lognormal:10ms:0.5. Repeatable.
    #[arg(long, value_name = "[NAME=]DIST")]
    pub latency: Vec<String>,
    /// A slow server: its answer times multiplied by FACTOR. Repeatable.
    #[arg(long, value_name = "NAME=FACTOR")]
    pub slow: Vec<String>,
    /// A failing server: this fraction of its requests answered 503 within 1 ms. Repeatable.
    #[arg(long, value_name = "NAME=RATE")]
    pub fail: Vec<String>,
    /// Requests a server serves at once (more wait in its queue); default unbounded. Repeatable.
    #[arg(long, value_name = "[NAME=]N")]
    pub workers: Vec<String>,
    /// The server that leaves for the "moved" column (default: the pool's last).
    #[arg(long, value_name = "NAME")]
    pub leaving: Option<String>,
    /// Seed of the synthetic arrivals and of the answer times.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// The default answer time of a server that neither the options nor the log describe.
pub const DEFAULT_LATENCY: &str = "lognormal:10ms:0.5";

/// The server models of `pool` from `--latency`, `--slow`, `--fail` and `--workers`, over the log's
/// observations (when replaying a log) or [`DEFAULT_LATENCY`].
pub fn models(
    pool: &PoolConfig,
    workload: &Workload,
    cmd: &Command,
) -> Result<Vec<ServerModel>, String> {
    let names: Vec<&str> = pool.servers.iter().map(|s| s.name.as_str()).collect();
    let parse_all = |opts: &[String], what: &str| -> Result<Vec<PerServer>, String> {
        let v: Vec<PerServer> = opts.iter().map(|o| PerServer::parse(o)).collect();
        for p in &v {
            if let Some(name) = &p.server {
                if !names.contains(&name.as_str()) {
                    return Err(format!(
                        "--{what} {name}=…: pool `{}` has no server `{name}` (it has: {})",
                        pool.name,
                        names.join(", ")
                    ));
                }
            }
        }
        Ok(v)
    };
    let latency = parse_all(&cmd.latency, "latency")?;
    let slow = parse_all(&cmd.slow, "slow")?;
    let fail = parse_all(&cmd.fail, "fail")?;
    let workers = parse_all(&cmd.workers, "workers")?;
    // The last option that names the server wins over one for every server.
    let pick = |opts: &[PerServer], name: &str| -> Option<String> {
        opts.iter()
            .rev()
            .find(|p| p.server.as_deref() == Some(name))
            .or_else(|| opts.iter().rev().find(|p| p.server.is_none()))
            .map(|p| p.value.clone())
    };
    let default = Latency::parse(DEFAULT_LATENCY)?;
    names
        .iter()
        .map(|&name| {
            let latency = match pick(&latency, name) {
                Some(text) => Latency::parse(&text)?,
                None => match (workload.observed.get(name), &workload.observed_all) {
                    (Some(seen), _) => Latency::Observed(seen.clone()),
                    (None, Some(all)) => Latency::Observed(all.clone()),
                    (None, None) => default.clone(),
                },
            };
            let mut m = ServerModel::new(latency);
            if let Some(f) = pick(&slow, name) {
                m.slow = f
                    .parse::<f64>()
                    .ok()
                    .filter(|f| f.is_finite() && *f > 0.0)
                    .ok_or_else(|| format!("--slow {name}={f}: a factor > 0"))?;
            }
            if let Some(r) = pick(&fail, name) {
                m.fail = r
                    .parse::<f64>()
                    .ok()
                    .filter(|r| (0.0..=1.0).contains(r))
                    .ok_or_else(|| format!("--fail {name}={r}: a rate from 0 to 1"))?;
            }
            if let Some(w) = pick(&workers, name) {
                m.workers = Some(
                    w.parse::<u32>()
                        .ok()
                        .filter(|w| *w > 0)
                        .ok_or_else(|| format!("--workers {name}={w}: a count ≥ 1"))?,
                );
            }
            Ok(m)
        })
        .collect()
}

/// Runs `fulcrum simulate`: the report, as a table or JSON.
pub fn command(cmd: &Command) -> Result<String, String> {
    let config = crate::config::load(&cmd.config).map_err(|e| e.to_string())?;
    let pool = match &cmd.pool {
        Some(name) => config
            .pools
            .iter()
            .find(|p| &p.name == name)
            .ok_or_else(|| format!("{}: no pool `{name}`", cmd.config.display()))?,
        None if config.pools.len() == 1 => &config.pools[0],
        None => {
            return Err(format!(
                "{} has {} pools: choose one with --pool ({})",
                cmd.config.display(),
                config.pools.len(),
                config
                    .pools
                    .iter()
                    .map(|p| p.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        }
    };
    let workload = match &cmd.log {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("reading {}: {e}", path.display()))?;
            read_log(&text, &pool.name, &path.display().to_string())?
        }
        None => {
            if !(cmd.rate > 0.0 && cmd.rate.is_finite()) || cmd.requests == 0 || cmd.keys == 0 {
                return Err("--rate, --requests and --keys must be positive".to_owned());
            }
            Synthetic {
                rate: cmd.rate,
                requests: cmd.requests,
                keys: cmd.keys,
                zipf: cmd.zipf,
            }
            .generate(cmd.seed)
        }
    };
    let algorithms = if cmd.algorithms.is_empty() {
        Algorithm::ALL.to_vec()
    } else {
        cmd.algorithms
            .iter()
            .map(|a| parse_algorithm(a))
            .collect::<Result<_, _>>()?
    };
    let models = models(pool, &workload, cmd)?;
    let report = compare(
        pool,
        &models,
        &workload,
        &Options {
            algorithms,
            seed: cmd.seed,
            leaving: cmd.leaving.clone(),
        },
    )?;
    Ok(if cmd.json {
        serde_json::to_string_pretty(&report).map_err(|e| e.to_string())? + "\n"
    } else {
        report.table()
    })
}

#[cfg(test)]
mod tests;

//! What the simulator replays: request arrivals (from an access log or a synthetic Poisson process)
//! and a latency model per server.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use serde::Serialize;

/// One request: when it arrives, from whom, for what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arrival {
    /// Virtual time of arrival, ns from the first request.
    pub at_ns: u64,
    /// The client's address (what `source_ip` keys and stickiness read).
    pub client: SocketAddr,
    /// The request's path and query (what `uri` keys read; header and cookie keys too, see `key`).
    pub path: String,
}

/// The requests to replay, in order of arrival, and what the access log says of each server.
#[derive(Debug, Clone, Default)]
pub struct Workload {
    /// The requests, sorted by `at_ns`.
    pub arrivals: Vec<Arrival>,
    /// Per server name, the `(server_time, error)` pairs of the log's answers from that server: the
    /// default latency model of a server that the log knows.
    pub observed: HashMap<String, Arc<Vec<Sample>>>,
    /// Every answer of the log, whatever its server: the model of a server the log does not name.
    pub observed_all: Option<Arc<Vec<Sample>>>,
    /// Lines skipped: not HTTP (`kind` tcp or udp), another pool, or unreadable.
    pub skipped: usize,
    /// Where the workload came from, for the report.
    pub source: String,
}

/// One observed answer: its server time and whether it was an error (status ≥ 500).
pub type Sample = (u64, bool);

/// A SplitMix64 step, as a pure function: the simulator's only source of randomness, so that a run
/// depends on its seed alone.
#[inline]
pub(crate) fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A uniform number in (0, 1) from `h`.
#[inline]
pub(crate) fn unit(h: u64) -> f64 {
    ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64
}

/// A deterministic stream of uniform numbers.
#[derive(Debug, Clone)]
pub(crate) struct Stream(u64);

impl Stream {
    pub(crate) fn new(seed: u64) -> Self {
        Stream(mix(seed))
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }

    pub(crate) fn unit(&mut self) -> f64 {
        unit(self.next_u64())
    }
}

/// A synthetic workload: Poisson arrivals at `rate` per second from `keys` clients, each request's
/// client drawn from a Zipf distribution of exponent `zipf` (0: uniform).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Synthetic {
    /// Requests per second (mean of the Poisson process).
    pub rate: f64,
    /// How many requests.
    pub requests: usize,
    /// Distinct clients (each its own address and path `/k/N`).
    pub keys: usize,
    /// Zipf exponent of the clients' popularity (0: every client equally likely).
    pub zipf: f64,
}

impl Synthetic {
    /// The arrivals, deterministic for a seed.
    pub fn generate(&self, seed: u64) -> Workload {
        let mut rng = Stream::new(seed ^ 0x6172_7269_7661_6c73); // "arrivals"
        let keys = self.keys.max(1);
        // Cumulative weights 1/k^s of the clients, for inverse-transform sampling.
        let mut cdf = Vec::with_capacity(keys);
        let mut total = 0.0;
        for k in 1..=keys {
            total += (k as f64).powf(-self.zipf.max(0.0));
            cdf.push(total);
        }
        let rate = self.rate.max(1e-9);
        let mut t = 0.0f64;
        let mut arrivals = Vec::with_capacity(self.requests);
        for n in 0..self.requests {
            if n > 0 {
                t += -rng.unit().ln() / rate;
            }
            let u = rng.unit() * total;
            let k = cdf.partition_point(|&c| c < u).min(keys - 1);
            let port = 1024 + (rng.next_u64() % 60_000) as u16;
            arrivals.push(Arrival {
                at_ns: (t * 1e9) as u64,
                client: SocketAddr::new(client_ip(k), port),
                path: format!("/k/{k}"),
            });
        }
        Workload {
            arrivals,
            source: format!(
                "synthetic: {} requests, Poisson at {}/s, {} clients{}",
                self.requests,
                self.rate,
                keys,
                if self.zipf > 0.0 {
                    format!(" (Zipf s = {})", self.zipf)
                } else {
                    " (uniform)".to_owned()
                }
            ),
            ..Workload::default()
        }
    }
}

/// The address of synthetic client `k`: 10.x.y.z.
fn client_ip(k: usize) -> IpAddr {
    let k = k as u32 & 0x00ff_ffff;
    IpAddr::V4(Ipv4Addr::new(10, (k >> 16) as u8, (k >> 8) as u8, k as u8))
}

/// Reads an access log (JSON lines, as fulcrum's `access_log` with `format = "json"` writes them) for
/// `pool`: the HTTP lines of that pool (lines without a `pool` field count as the pool's) become
/// arrivals at their `time`, relative to the first; TCP and UDP lines, and other pools' lines, are
/// skipped. The answers' `server_time_ms` (else `request_time_ms`) and status, per `server`, become the
/// default latency model of each server.
pub fn read_log(text: &str, pool: &str, origin: &str) -> Result<Workload, String> {
    let mut arrivals = Vec::new();
    let mut observed: HashMap<String, Vec<Sample>> = HashMap::new();
    let mut all = Vec::new();
    let mut skipped = 0;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let v: serde_json::Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) => return Err(format!("{origin}:{}: not JSON: {e}", n + 1)),
        };
        let kind = v.get("kind").and_then(|k| k.as_str()).unwrap_or("http");
        let this_pool = v.get("pool").and_then(|p| p.as_str());
        if kind != "http" || this_pool.is_some_and(|p| p != pool) {
            skipped += 1;
            continue;
        }
        let Some(time) = v.get("time").and_then(|t| t.as_str()) else {
            return Err(format!("{origin}:{}: no `time`", n + 1));
        };
        let at = parse_rfc3339_ns(time)
            .ok_or_else(|| format!("{origin}:{}: `time` {time:?} is not RFC 3339", n + 1))?;
        let client = v
            .get("client")
            .and_then(|c| c.as_str())
            .and_then(|c| c.parse::<SocketAddr>().ok())
            .unwrap_or(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0));
        let path = v
            .get("path")
            .and_then(|p| p.as_str())
            .unwrap_or("/")
            .to_owned();
        arrivals.push((at, client, path));
        let ms = v
            .get("server_time_ms")
            .and_then(|t| t.as_f64())
            .or_else(|| v.get("request_time_ms").and_then(|t| t.as_f64()));
        let status = v.get("status").and_then(|s| s.as_u64()).unwrap_or(200);
        if let (Some(ms), Some(server)) = (ms, v.get("server").and_then(|s| s.as_str())) {
            let sample = ((ms.max(0.0) * 1e6) as u64, status >= 500);
            observed.entry(server.to_owned()).or_default().push(sample);
            all.push(sample);
        }
    }
    if arrivals.is_empty() {
        return Err(format!(
            "{origin}: no HTTP request of pool `{pool}` ({skipped} lines skipped)"
        ));
    }
    arrivals.sort_by_key(|a| a.0);
    let first = arrivals[0].0;
    let span = arrivals[arrivals.len() - 1].0 - first;
    let count = arrivals.len();
    Ok(Workload {
        arrivals: arrivals
            .into_iter()
            .map(|(at, client, path)| Arrival {
                at_ns: (at - first) as u64,
                client,
                path,
            })
            .collect(),
        observed: observed
            .into_iter()
            .map(|(k, v)| (k, Arc::new(v)))
            .collect(),
        observed_all: (!all.is_empty()).then(|| Arc::new(all)),
        skipped,
        source: format!("{origin}: {count} requests over {:.1} s", span as f64 / 1e9),
    })
}

/// Nanoseconds since 1970 of an RFC 3339 time (`2026-12-02T15:04:05.123Z`, any fraction, `Z` or an
/// offset).
pub fn parse_rfc3339_ns(s: &str) -> Option<i128> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse().ok())?
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if b[13] != b':' || b[16] != b':' || !(1..=12).contains(&mo) || !(1..=31).contains(&d) {
        return None;
    }
    let mut i = 19;
    let mut frac_ns: i64 = 0;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        let digits = &s[start..i];
        if digits.is_empty() {
            return None;
        }
        let mut ns = 0i64;
        for (k, c) in digits.bytes().take(9).enumerate() {
            ns += i64::from(c - b'0') * 10i64.pow(8 - k as u32);
        }
        frac_ns = ns;
    }
    let offset_s = match s.get(i..)? {
        "Z" | "z" => 0,
        o if o.len() == 6 && (o.starts_with('+') || o.starts_with('-')) && &o[3..4] == ":" => {
            let v = num(i + 1..i + 3)? * 3600 + num(i + 4..i + 6)? * 60;
            if o.starts_with('-') {
                -v
            } else {
                v
            }
        }
        _ => return None,
    };
    // Days from civil (H. Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec - offset_s;
    Some(i128::from(secs) * 1_000_000_000 + i128::from(frac_ns))
}

/// How long a server takes to answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Latency {
    /// Always this long.
    Fixed(u64),
    /// Exponentially distributed with this mean (ns).
    Exponential(u64),
    /// Lognormal with this median (ns) and shape σ (the spread of `ln`).
    LogNormal(u64, f64),
    /// Drawn from observed answers (the access log's), with their errors.
    Observed(Arc<Vec<Sample>>),
}

impl Latency {
    /// Parses `10ms` (fixed), `exp:10ms` (exponential, mean), `lognormal:10ms` or
    /// `lognormal:10ms:0.5` (median, σ; default σ 0.5).
    pub fn parse(text: &str) -> Result<Self, String> {
        let dur = |t: &str| -> Result<u64, String> {
            humantime::parse_duration(t.trim())
                .map(|d| d.as_nanos() as u64)
                .map_err(|e| format!("latency `{text}`: {e}"))
        };
        let mut parts = text.split(':');
        let first = parts.next().unwrap_or("");
        let model = match first {
            "exp" | "exponential" => Latency::Exponential(dur(parts.next().unwrap_or(""))?),
            "lognormal" => {
                let median = dur(parts.next().unwrap_or(""))?;
                let sigma = match parts.next() {
                    Some(s) => s
                        .trim()
                        .parse::<f64>()
                        .ok()
                        .filter(|s| s.is_finite() && *s >= 0.0)
                        .ok_or_else(|| format!("latency `{text}`: σ must be a number ≥ 0"))?,
                    None => 0.5,
                };
                Latency::LogNormal(median, sigma)
            }
            "fixed" => Latency::Fixed(dur(parts.next().unwrap_or(""))?),
            _ => Latency::Fixed(dur(first)?),
        };
        if parts.next().is_some() {
            return Err(format!(
                "latency `{text}`: expected DURATION, exp:MEAN or lognormal:MEDIAN[:SIGMA]"
            ));
        }
        Ok(model)
    }

    /// A draw from two uniform numbers in (0, 1): the latency and whether the log's answer was an error.
    pub fn draw(&self, u: f64, v: f64) -> (u64, bool) {
        match self {
            Latency::Fixed(ns) => (*ns, false),
            Latency::Exponential(mean) => ((-u.ln() * *mean as f64) as u64, false),
            Latency::LogNormal(median, sigma) => {
                // Box–Muller.
                let z = (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos();
                ((*median as f64 * (sigma * z).exp()) as u64, false)
            }
            Latency::Observed(samples) => {
                let i = ((u * samples.len() as f64) as usize).min(samples.len() - 1);
                samples[i]
            }
        }
    }
}

impl fmt::Display for Latency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = |ns: u64| format!("{}ms", ns as f64 / 1e6);
        match self {
            Latency::Fixed(ns) => write!(f, "{}", ms(*ns)),
            Latency::Exponential(ns) => write!(f, "exp:{}", ms(*ns)),
            Latency::LogNormal(ns, s) => write!(f, "lognormal:{}:{s}", ms(*ns)),
            Latency::Observed(v) => write!(f, "observed ({} answers)", v.len()),
        }
    }
}

/// How one server behaves.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerModel {
    /// Its answer time, before `slow`.
    pub latency: Latency,
    /// Factor on every answer time (a slow server: 20 = twenty times slower).
    pub slow: f64,
    /// Fraction of requests answered with an error (503) within [`FAIL_NS`], as a server whose
    /// dependency is down fails fast.
    pub fail: f64,
    /// Requests it serves at once; more wait in its own queue (FIFO). `None`: unbounded.
    pub workers: Option<u32>,
}

/// How long a failing server takes to answer a request it fails: 1 ms.
pub const FAIL_NS: u64 = 1_000_000;

impl ServerModel {
    /// The default model: lognormal, median 10 ms, σ 0.5; unbounded concurrency.
    pub fn new(latency: Latency) -> Self {
        ServerModel {
            latency,
            slow: 1.0,
            fail: 0.0,
            workers: None,
        }
    }

    /// The service time and error of request `req` on this server, a pure function of `(seed, req,
    /// server)`: every algorithm sees the same draw for the same request on the same server (common
    /// random numbers, so that the algorithms' differences are not noise).
    pub fn draw(&self, seed: u64, req: usize, server: usize) -> (u64, bool) {
        let base = mix(seed ^ mix((req as u64) << 16 | server as u64 & 0xffff));
        let (u, v, w) = (unit(mix(base)), unit(mix(base ^ 1)), unit(mix(base ^ 2)));
        if w < self.fail {
            return (FAIL_NS, true);
        }
        let (ns, observed_error) = self.latency.draw(u, v);
        (((ns as f64) * self.slow).max(0.0) as u64, observed_error)
    }

    /// A short description for the report.
    pub fn describe(&self) -> String {
        let mut s = self.latency.to_string();
        if self.slow != 1.0 {
            s += &format!(", ×{} slow", self.slow);
        }
        if self.fail > 0.0 {
            s += &format!(", {}% fail", self.fail * 100.0);
        }
        if let Some(w) = self.workers {
            s += &format!(", {w} workers");
        }
        s
    }
}

/// A per-server option: `VALUE` for every server, or `NAME=VALUE` for one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PerServer {
    /// The server's name; `None`: every server.
    pub server: Option<String>,
    /// The value as written.
    pub value: String,
}

impl PerServer {
    /// Parses `VALUE` or `NAME=VALUE`.
    pub fn parse(text: &str) -> Self {
        match text.split_once('=') {
            Some((name, value)) => PerServer {
                server: Some(name.trim().to_owned()),
                value: value.trim().to_owned(),
            },
            None => PerServer {
                server: None,
                value: text.trim().to_owned(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_times_parse_to_nanoseconds() {
        let a = parse_rfc3339_ns("2026-12-02T15:04:05.123Z").unwrap();
        let b = parse_rfc3339_ns("2026-12-02T15:04:06Z").unwrap();
        assert_eq!(b - a, 877_000_000);
        assert_eq!(parse_rfc3339_ns("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339_ns("1970-01-01T01:00:00+01:00"),
            Some(0),
            "offsets apply"
        );
        assert_eq!(
            parse_rfc3339_ns("2000-03-01T00:00:00Z"),
            Some(951_868_800 * 1_000_000_000)
        );
        assert!(parse_rfc3339_ns("2026-12-02 nonsense").is_none());
        assert!(parse_rfc3339_ns("2026-13-02T15:04:05Z").is_none());
    }

    #[test]
    fn latency_models_parse_and_draw() {
        assert_eq!(Latency::parse("10ms").unwrap(), Latency::Fixed(10_000_000));
        assert_eq!(
            Latency::parse("exp:2ms").unwrap(),
            Latency::Exponential(2_000_000)
        );
        assert_eq!(
            Latency::parse("lognormal:10ms").unwrap(),
            Latency::LogNormal(10_000_000, 0.5)
        );
        assert!(Latency::parse("lognormal:10ms:x").is_err());
        assert!(Latency::parse("fast").is_err());
        // The mean of many exponential draws is near the mean.
        let m = Latency::Exponential(1_000_000);
        let mut s = Stream::new(3);
        let mean = (0..20_000)
            .map(|_| m.draw(s.unit(), s.unit()).0 as f64)
            .sum::<f64>()
            / 20_000.0;
        assert!((mean / 1e6 - 1.0).abs() < 0.05, "{mean}");
        // A lognormal's median is its median.
        let m = Latency::LogNormal(10_000_000, 0.5);
        let mut v: Vec<u64> = (0..20_001).map(|_| m.draw(s.unit(), s.unit()).0).collect();
        v.sort_unstable();
        assert!((v[10_000] as f64 / 1e7 - 1.0).abs() < 0.05, "{}", v[10_000]);
    }

    #[test]
    fn a_server_model_is_slow_and_fails_as_told_and_draws_the_same_for_every_algorithm() {
        let mut m = ServerModel::new(Latency::Fixed(10_000_000));
        m.slow = 20.0;
        m.fail = 0.25;
        assert_eq!(m.draw(1, 7, 2), m.draw(1, 7, 2), "a pure function");
        let draws: Vec<_> = (0..10_000).map(|r| m.draw(1, r, 0)).collect();
        let errors = draws.iter().filter(|d| d.1).count();
        assert!((2_300..2_700).contains(&errors), "{errors}");
        assert!(draws
            .iter()
            .all(|&(ns, e)| if e { ns == FAIL_NS } else { ns == 200_000_000 }));
    }

    #[test]
    fn synthetic_arrivals_are_poisson_at_the_rate_and_follow_zipf() {
        let w = Synthetic {
            rate: 1_000.0,
            requests: 20_000,
            keys: 100,
            zipf: 1.0,
        }
        .generate(5);
        let span = w.arrivals.last().unwrap().at_ns as f64 / 1e9;
        assert!((span / 20.0 - 1.0).abs() < 0.05, "{span}");
        assert!(w.arrivals.windows(2).all(|p| p[0].at_ns <= p[1].at_ns));
        let top = w
            .arrivals
            .iter()
            .filter(|a| a.client.ip() == client_ip(0))
            .count();
        // Zipf s = 1 over 100 keys: the first has 1/H(100) ≈ 19 %.
        assert!((3_400..4_400).contains(&top), "{top}");
        assert_eq!(
            w.arrivals,
            Synthetic {
                rate: 1_000.0,
                requests: 20_000,
                keys: 100,
                zipf: 1.0
            }
            .generate(5)
            .arrivals,
            "deterministic"
        );
    }

    #[test]
    fn an_access_log_gives_arrivals_and_observed_latency() {
        let log = r#"{"time":"2026-12-02T15:04:05.500Z","kind":"http","client":"10.0.0.2:4000","listener":"web","route":null,"pool":"p","server":"b","method":"GET","path":"/x","status":503,"bytes_in":0,"bytes_out":10,"request_time_ms":3.0,"server_time_ms":2.0,"retries":0,"sticky":"none","termination":"ok"}
{"time":"2026-12-02T15:04:05.123Z","kind":"http","client":"10.0.0.1:4000","listener":"web","route":"0","pool":"p","server":"a","method":"GET","path":"/","status":200,"bytes_in":0,"bytes_out":10,"request_time_ms":12.5,"server_time_ms":12.0,"retries":0,"sticky":"none","termination":"ok"}
{"time":"2026-12-02T15:04:05.600Z","kind":"tcp","client":"10.0.0.1:4001","listener":"db","route":null,"pool":"p","server":"a","bytes_in":0,"bytes_out":0,"request_time_ms":100.0,"server_time_ms":1.0,"retries":0,"sticky":"none","termination":"ok"}
{"time":"2026-12-02T15:04:05.700Z","kind":"http","client":"10.0.0.3:4000","listener":"web","route":null,"pool":"other","server":"z","method":"GET","path":"/","status":200,"bytes_in":0,"bytes_out":10,"request_time_ms":1.0,"server_time_ms":1.0,"retries":0,"sticky":"none","termination":"ok"}
"#;
        let w = read_log(log, "p", "access.json").unwrap();
        assert_eq!(w.arrivals.len(), 2);
        assert_eq!(w.skipped, 2);
        assert_eq!(w.arrivals[0].at_ns, 0);
        assert_eq!(w.arrivals[0].path, "/");
        assert_eq!(w.arrivals[1].at_ns, 377_000_000);
        assert_eq!(*w.observed["a"], vec![(12_000_000, false)]);
        assert_eq!(*w.observed["b"], vec![(2_000_000, true)]);
        assert!(read_log("{", "p", "x").is_err());
        assert!(read_log("", "p", "x").is_err());
    }
}

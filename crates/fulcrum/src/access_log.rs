//! The access log: one line per HTTP request and per TCP session / UDP flow, as JSON or in the
//! Apache/nginx `combined` format, to stdout or a file.
//!
//! Written off the request path: a request hands a small [`Record`] to a bounded channel with
//! `try_send` and goes on; a writer thread formats records into a buffered writer and flushes it
//! whenever the channel runs empty. When the channel is full (the disk or the reader of stdout cannot
//! keep up) the record is dropped and counted (`fulcrum_access_log_dropped_total`): a request never
//! waits for the log. SIGUSR1 makes every writer reopen its file before its next line (for
//! logrotate: rename the file, then signal).
//!
//! Sampling (`sample`) and a status filter (`status`) are decided on the request path, before a record
//! is built, so that a filtered-out request costs nothing more.

use std::fmt::Write as _;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{HeaderValue, Method, Version};

/// `access_log.format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One JSON object per line.
    Json,
    /// Apache/nginx "combined": `client - - [time] "request" status bytes "referer" "user-agent"`.
    Combined,
}

/// `access_log.path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// The process's standard output.
    Stdout,
    /// A file, appended to (created when missing) and reopened on SIGUSR1.
    File(PathBuf),
}

/// Which statuses are logged (`access_log.status`): classes like `"5xx"` or single codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusMatch {
    /// `"5xx"`: every status of the class (1–5).
    Class(u16),
    /// `404`: this status.
    Code(u16),
}

impl StatusMatch {
    fn matches(self, status: u16) -> bool {
        match self {
            StatusMatch::Class(c) => status / 100 == c,
            StatusMatch::Code(c) => status == c,
        }
    }
}

/// `[access_log]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// The line format.
    pub format: Format,
    /// Where lines go.
    pub destination: Destination,
    /// The share of requests logged, in (0, 1] (1: every one).
    pub sample: f64,
    /// Only these statuses (empty: every status). L4 sessions have no status: they are logged when the
    /// filter is empty.
    pub status: Vec<StatusMatch>,
    /// Records waiting for the writer at most; beyond, new ones are dropped and counted.
    pub buffer: usize,
}

/// What kind of traffic a line describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An HTTP request.
    Http,
    /// A TCP session.
    Tcp,
    /// A UDP flow.
    Udp,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Http => "http",
            Kind::Tcp => "tcp",
            Kind::Udp => "udp",
        }
    }
}

/// What the stick table did for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StickyOutcome {
    /// The pool is not sticky.
    #[default]
    None,
    /// The client had a server and went to it.
    Hit,
    /// The client had no server yet.
    Miss,
    /// The client's server could not take it: it went to another one.
    Redispatch,
}

impl StickyOutcome {
    /// The name used in logs and explain headers.
    pub fn as_str(self) -> &'static str {
        match self {
            StickyOutcome::None => "none",
            StickyOutcome::Hit => "hit",
            StickyOutcome::Miss => "miss",
            StickyOutcome::Redispatch => "redispatch",
        }
    }
}

/// How a request or session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Termination {
    /// Completely answered (a session: both sides closed).
    #[default]
    Ok,
    /// Answered by fulcrum itself (no server involved: a redirect, a refusal by a filter, a bad request).
    Local,
    /// The client went away before the response was complete.
    ClientAbort,
    /// The server failed inside the response (closed early, broken framing) or at connect.
    ServerAbort,
    /// A server did not answer in time (504).
    Timeout,
    /// No server could take the request (503).
    NoServer,
    /// A TCP session or UDP flow ended after its idle timeout.
    Idle,
    /// Cut by a drain deadline (reload, shutdown).
    Cut,
    /// The connection was refused before it reached a server (bad PROXY header or ClientHello).
    Refused,
}

impl Termination {
    /// The name used in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Termination::Ok => "ok",
            Termination::Local => "local",
            Termination::ClientAbort => "client_abort",
            Termination::ServerAbort => "server_abort",
            Termination::Timeout => "timeout",
            Termination::NoServer => "no_server",
            Termination::Idle => "idle_timeout",
            Termination::Cut => "cut",
            Termination::Refused => "refused",
        }
    }
}

/// One line of the log.
#[derive(Debug, Clone)]
pub struct Record {
    /// When the request (or session) started.
    pub time: SystemTime,
    /// HTTP request, TCP session or UDP flow.
    pub kind: Kind,
    /// The client's address.
    pub client: SocketAddr,
    /// The listener's name.
    pub listener: Arc<str>,
    /// The index of the route that matched (`None`: the listener's pool).
    pub route: Option<usize>,
    /// The pool's name (none when the request never reached routing).
    pub pool: Option<Arc<str>>,
    /// The server that answered (or carried the session).
    pub server: Option<Arc<str>>,
    /// The request method (HTTP).
    pub method: Option<Method>,
    /// The request target, path and query (HTTP).
    pub path: Option<String>,
    /// The request's HTTP version.
    pub version: Option<Version>,
    /// The `Host` header (HTTP).
    pub host: Option<HeaderValue>,
    /// The `Referer` header (HTTP).
    pub referer: Option<HeaderValue>,
    /// The `User-Agent` header (HTTP).
    pub user_agent: Option<HeaderValue>,
    /// The status sent to the client (0 for L4).
    pub status: u16,
    /// Body bytes from the client (HTTP: as declared by `Content-Length`, else 0; L4: every byte).
    pub bytes_in: u64,
    /// Body bytes sent to the client (L4: every byte).
    pub bytes_out: u64,
    /// From the request's arrival to the end of its response (L4: the session's life).
    pub request_time: Duration,
    /// From sending the request to the server's response head (L4: the connect time).
    pub server_time: Option<Duration>,
    /// Servers tried before the one that answered.
    pub retries: u32,
    /// What stickiness did.
    pub sticky: StickyOutcome,
    /// What the route's cache did (`HIT`, `MISS`, `STALE`, `BYPASS`); `None` without a cache.
    pub cache: Option<&'static str>,
    /// How it ended.
    pub termination: Termination,
}

impl Record {
    /// An empty record of `kind` for `client` on `listener`, starting now.
    pub fn new(kind: Kind, client: SocketAddr, listener: Arc<str>) -> Self {
        Record {
            time: SystemTime::now(),
            kind,
            client,
            listener,
            route: None,
            pool: None,
            server: None,
            method: None,
            path: None,
            version: None,
            host: None,
            referer: None,
            user_agent: None,
            status: 0,
            bytes_in: 0,
            bytes_out: 0,
            request_time: Duration::ZERO,
            server_time: None,
            retries: 0,
            sticky: StickyOutcome::None,
            cache: None,
            termination: Termination::Ok,
        }
    }

    /// Formats the record as one JSON object (no newline).
    pub fn write_json(&self, out: &mut String) {
        out.push_str("{\"time\":\"");
        write_rfc3339(out, self.time);
        out.push_str("\",\"kind\":\"");
        out.push_str(self.kind.as_str());
        let _ = write!(out, "\",\"client\":\"{}\",\"listener\":", self.client);
        json_str(out, &self.listener);
        out.push_str(",\"route\":");
        match self.route {
            Some(r) => {
                let _ = write!(out, "{r}");
            }
            None => out.push_str("null"),
        }
        out.push_str(",\"pool\":");
        json_opt(out, self.pool.as_deref());
        out.push_str(",\"server\":");
        json_opt(out, self.server.as_deref());
        if self.kind == Kind::Http {
            out.push_str(",\"method\":");
            json_opt(out, self.method.as_ref().map(Method::as_str));
            out.push_str(",\"path\":");
            json_opt(out, self.path.as_deref());
            out.push_str(",\"protocol\":");
            json_opt(out, self.version.map(version_str));
            out.push_str(",\"host\":");
            json_opt(out, self.host.as_ref().and_then(|h| h.to_str().ok()));
            out.push_str(",\"referer\":");
            json_opt(out, self.referer.as_ref().and_then(|h| h.to_str().ok()));
            out.push_str(",\"user_agent\":");
            json_opt(out, self.user_agent.as_ref().and_then(|h| h.to_str().ok()));
            let _ = write!(out, ",\"status\":{}", self.status);
            out.push_str(",\"cache\":");
            json_opt(out, self.cache);
        }
        let _ = write!(
            out,
            ",\"bytes_in\":{},\"bytes_out\":{},\"request_time_ms\":{:.3},\"server_time_ms\":",
            self.bytes_in,
            self.bytes_out,
            self.request_time.as_secs_f64() * 1e3
        );
        match self.server_time {
            Some(t) => {
                let _ = write!(out, "{:.3}", t.as_secs_f64() * 1e3);
            }
            None => out.push_str("null"),
        }
        let _ = write!(
            out,
            ",\"retries\":{},\"sticky\":\"{}\",\"termination\":\"{}\"}}",
            self.retries,
            self.sticky.as_str(),
            self.termination.as_str()
        );
    }

    /// Formats the record in the combined format (no newline). L4 lines use the method `TCP`/`UDP`
    /// and the listener's name as the request, status `-`.
    pub fn write_combined(&self, out: &mut String) {
        let _ = write!(out, "{} - - [", self.client.ip());
        write_clf_time(out, self.time);
        out.push_str("] \"");
        match self.kind {
            Kind::Http => {
                out.push_str(self.method.as_ref().map_or("-", Method::as_str));
                out.push(' ');
                clf_escape(out, self.path.as_deref().unwrap_or("-"));
                out.push(' ');
                out.push_str(self.version.map_or("-", version_str));
            }
            Kind::Tcp | Kind::Udp => {
                out.push_str(if self.kind == Kind::Tcp {
                    "TCP "
                } else {
                    "UDP "
                });
                clf_escape(out, &self.listener);
            }
        }
        out.push_str("\" ");
        if self.kind == Kind::Http {
            let _ = write!(out, "{}", self.status);
        } else {
            out.push('-');
        }
        if self.bytes_out == 0 {
            out.push_str(" -");
        } else {
            let _ = write!(out, " {}", self.bytes_out);
        }
        for header in [&self.referer, &self.user_agent] {
            out.push_str(" \"");
            match header.as_ref().and_then(|h| h.to_str().ok()) {
                Some(v) => clf_escape(out, v),
                None => out.push('-'),
            }
            out.push('"');
        }
    }
}

fn version_str(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/?",
    }
}

fn json_opt(out: &mut String, s: Option<&str>) {
    match s {
        Some(s) => json_str(out, s),
        None => out.push_str("null"),
    }
}

/// A JSON string literal, escaped.
fn json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Escapes `"` and `\` and control bytes as nginx does in its combined log (`\xHH`).
fn clf_escape(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                let _ = write!(out, "\\x{:02X}", c as u32);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                let _ = write!(out, "\\x{:02X}", c as u32);
            }
            c => out.push(c),
        }
    }
}

/// Days since 1970-01-01 to (year, month, day) (Howard Hinnant's civil-from-days).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn split_time(t: SystemTime) -> (i64, u32, u32, u64, u32) {
    let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (y, m, d) = civil((secs / 86_400) as i64);
    (y, m, d, secs % 86_400, since.subsec_millis())
}

/// `2026-12-02T15:04:05.123Z`.
fn write_rfc3339(out: &mut String, t: SystemTime) {
    let (y, m, d, s, ms) = split_time(t);
    let _ = write!(
        out,
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        s / 3600,
        s / 60 % 60,
        s % 60
    );
}

/// `02/Dec/2026:15:04:05 +0000`.
fn write_clf_time(out: &mut String, t: SystemTime) {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let (y, m, d, s, _) = split_time(t);
    let _ = write!(
        out,
        "{d:02}/{}/{y:04}:{:02}:{:02}:{:02} +0000",
        MONTHS[(m - 1) as usize],
        s / 3600,
        s / 60 % 60,
        s % 60
    );
}

/// Where the running access log is found: every listener holds a clone, a reload swaps the log.
pub type Slot = Arc<arc_swap::ArcSwapOption<AccessLog>>;

/// How long the writer lets records gather before it writes them (a line waits at most this much
/// longer to reach the file).
const GATHER: Duration = Duration::from_millis(20);

/// Counts SIGUSR1s: a writer that sees a new value reopens its file.
static REOPEN: AtomicU64 = AtomicU64::new(0);

/// Makes every access log reopen its file before its next line (SIGUSR1).
pub fn reopen_all() {
    REOPEN.fetch_add(1, Ordering::Relaxed);
}

/// Counters of an access log.
#[derive(Debug, Default)]
pub struct Counters {
    /// Lines written.
    pub written: AtomicU64,
    /// Records dropped because the writer was behind (the channel was full).
    pub dropped: AtomicU64,
    /// Write or reopen errors (the line is lost).
    pub errors: AtomicU64,
}

/// A running access log: the request side of the channel and the settings that filter records.
#[derive(Debug)]
pub struct AccessLog {
    settings: Settings,
    sender: SyncSender<Record>,
    /// Counters, shared with the writer thread.
    pub counters: Arc<Counters>,
}

impl AccessLog {
    /// Opens the destination and starts the writer thread. The thread ends once every clone of the
    /// log is gone (after writing what was queued).
    pub fn start(settings: Settings) -> io::Result<Arc<Self>> {
        let out = open(&settings.destination)?;
        let (sender, receiver) = mpsc::sync_channel(settings.buffer.max(1));
        let counters = Arc::new(Counters::default());
        let writer = Writer {
            format: settings.format,
            destination: settings.destination.clone(),
            out,
            generation: REOPEN.load(Ordering::Relaxed),
            counters: counters.clone(),
        };
        std::thread::Builder::new()
            .name("fulcrum-access-log".into())
            .spawn(move || writer.run(receiver))?;
        Ok(Arc::new(AccessLog {
            settings,
            sender,
            counters,
        }))
    }

    /// The settings it runs with.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Whether a request is sampled in (decided before its record is built).
    #[inline]
    pub fn sampled(&self) -> bool {
        self.settings.sample >= 1.0 || crate::pool::chance(self.settings.sample)
    }

    /// Whether a response with `status` is logged.
    #[inline]
    pub fn wants_status(&self, status: u16) -> bool {
        self.settings.status.is_empty() || self.settings.status.iter().any(|m| m.matches(status))
    }

    /// Hands a record to the writer without waiting; a full queue drops it (counted).
    pub fn log(&self, record: Record) {
        if record.kind == Kind::Http && !self.wants_status(record.status) {
            return;
        }
        if record.kind != Kind::Http && !self.settings.status.is_empty() {
            return;
        }
        match self.sender.try_send(record) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn open(destination: &Destination) -> io::Result<Box<dyn Write + Send>> {
    Ok(match destination {
        Destination::Stdout => Box::new(io::stdout()),
        Destination::File(path) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?,
        ),
    })
}

/// The writer thread's state.
struct Writer {
    format: Format,
    destination: Destination,
    out: Box<dyn Write + Send>,
    generation: u64,
    counters: Arc<Counters>,
}

impl Writer {
    fn run(mut self, receiver: Receiver<Record>) {
        let mut batch: Vec<u8> = Vec::with_capacity(64 * 1024);
        let mut line = String::with_capacity(512);
        loop {
            let first = match receiver.recv_timeout(Duration::from_secs(1)) {
                Ok(r) => Some(r),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            self.maybe_reopen();
            let Some(first) = first else { continue };
            // Let a burst gather before writing: while the writer sleeps, requests hand over records
            // without waking it (a wake per record would cost the request path a futex call and a
            // context switch), and the lines go out in one write.
            std::thread::sleep(GATHER);
            let mut next = Some(first);
            let mut n = 0u64;
            while let Some(record) = next {
                line.clear();
                match self.format {
                    Format::Json => record.write_json(&mut line),
                    Format::Combined => record.write_combined(&mut line),
                }
                line.push('\n');
                batch.extend_from_slice(line.as_bytes());
                n += 1;
                next = receiver.try_recv().ok();
            }
            if self
                .out
                .write_all(&batch)
                .and_then(|_| self.out.flush())
                .is_err()
            {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
            } else {
                self.counters.written.fetch_add(n, Ordering::Relaxed);
            }
            batch.clear();
        }
    }

    fn maybe_reopen(&mut self) {
        let generation = REOPEN.load(Ordering::Relaxed);
        if generation == self.generation {
            return;
        }
        self.generation = generation;
        if let Destination::File(path) = &self.destination {
            match open(&self.destination) {
                Ok(out) => self.out = out,
                Err(e) => {
                    self.counters.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(path = %path.display(), error = %e, "access log: reopen failed; writing to the old file");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Record {
        let mut r = Record::new(
            Kind::Http,
            "192.0.2.7:5000".parse().unwrap(),
            Arc::from("web"),
        );
        r.time = SystemTime::UNIX_EPOCH + Duration::from_millis(1_796_223_845_123);
        r.route = Some(1);
        r.pool = Some(Arc::from("app"));
        r.server = Some(Arc::from("app-1"));
        r.method = Some(Method::GET);
        r.path = Some("/a \"b\"?q=1".into());
        r.version = Some(Version::HTTP_11);
        r.user_agent = Some(HeaderValue::from_static("curl/8"));
        r.status = 200;
        r.bytes_out = 1234;
        r.request_time = Duration::from_micros(2500);
        r.server_time = Some(Duration::from_micros(2000));
        r.sticky = StickyOutcome::Hit;
        r
    }

    #[test]
    fn json_lines_parse_and_carry_every_field() {
        let mut line = String::new();
        sample().write_json(&mut line);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["time"], "2026-12-02T15:04:05.123Z");
        assert_eq!(v["client"], "192.0.2.7:5000");
        assert_eq!(v["route"], 1);
        assert_eq!(v["path"], "/a \"b\"?q=1");
        assert_eq!(v["status"], 200);
        assert_eq!(v["bytes_out"], 1234);
        assert_eq!(v["request_time_ms"], 2.5);
        assert_eq!(v["server_time_ms"], 2.0);
        assert_eq!(v["sticky"], "hit");
        assert_eq!(v["referer"], serde_json::Value::Null);
        assert_eq!(v["termination"], "ok");
    }

    #[test]
    fn combined_lines_follow_the_apache_format() {
        let mut line = String::new();
        sample().write_combined(&mut line);
        assert_eq!(
            line,
            "192.0.2.7 - - [02/Dec/2026:15:04:05 +0000] \"GET /a \\x22b\\x22?q=1 HTTP/1.1\" 200 1234 \"-\" \"curl/8\""
        );
    }

    #[test]
    fn dates_are_civil_dates() {
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(11_016), (2000, 2, 29));
        assert_eq!(civil(20_789), (2026, 12, 2));
    }

    #[test]
    fn status_filters_match_classes_and_codes() {
        assert!(StatusMatch::Class(5).matches(503));
        assert!(!StatusMatch::Class(5).matches(404));
        assert!(StatusMatch::Code(404).matches(404));
    }
}

//! Diagnostic logs: to stderr through `tracing`, filtered by `RUST_LOG` (default `info`), as text or
//! JSON lines.
//!
//! Never in the way of traffic:
//! - Lines are handed to a writer thread through a bounded queue (`tracing-appender`'s non-blocking
//!   writer, lossy): when stderr stalls (a full pipe, a slow log collector) lines are dropped and
//!   counted (`fulcrum_log_lines_dropped_total`) instead of blocking a worker in `write(2)`.
//! - Each log statement may write at most [`BURST`] lines per second; beyond, its lines are
//!   suppressed and counted (`fulcrum_log_lines_suppressed_total`), so a server sending broken answers
//!   cannot turn every request into a warning line.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use tracing::Metadata;
use tracing_subscriber::layer::{Context, Filter, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// The log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Lines one log statement may write per second.
pub const BURST: u32 = 20;

/// Lines the writer queue holds; beyond, lines are dropped.
const QUEUE: usize = 16_384;

static SUPPRESSED: AtomicU64 = AtomicU64::new(0);
static DROPPED: OnceLock<tracing_appender::non_blocking::ErrorCounter> = OnceLock::new();

/// Lines suppressed by the per-statement rate limit so far.
pub fn suppressed() -> u64 {
    SUPPRESSED.load(Ordering::Relaxed)
}

/// Lines dropped because stderr did not keep up (0 before [`init`]).
pub fn dropped() -> u64 {
    DROPPED.get().map_or(0, |c| c.dropped_lines() as u64)
}

/// Installs the global subscriber; a second call is a no-op. Keep the guard alive for as long as
/// lines should be written (dropping it flushes what is queued).
pub fn init(format: LogFormat) -> Option<tracing_appender::non_blocking::WorkerGuard> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUE)
        .thread_name("fulcrum-log")
        .finish(std::io::stderr());
    let counter = writer.error_counter();
    let fmt = tracing_subscriber::fmt::layer().with_writer(writer);
    let layer = match format {
        LogFormat::Text => fmt.with_filter(RateLimit::default()).boxed(),
        LogFormat::Json => fmt.json().with_filter(RateLimit::default()).boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(layer)
        .try_init()
        .ok()?;
    let _ = DROPPED.set(counter);
    Some(guard)
}

/// At most [`BURST`] events per second from each log statement (callsite).
#[derive(Debug)]
pub struct RateLimit {
    start: Instant,
    /// Per callsite: (the second the count is for, events in it).
    seen: Mutex<HashMap<usize, (u64, u32)>>,
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit {
            start: Instant::now(),
            seen: Mutex::new(HashMap::new()),
        }
    }
}

impl RateLimit {
    /// Whether one more event of `callsite` may be written now, `second` seconds after start.
    fn admit(&self, callsite: usize, second: u64) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let entry = seen.entry(callsite).or_insert((second, 0));
        if entry.0 != second {
            *entry = (second, 0);
        }
        entry.1 += 1;
        if entry.1 > BURST {
            SUPPRESSED.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        true
    }
}

impl<S> Filter<S> for RateLimit {
    fn enabled(&self, meta: &Metadata<'_>, _cx: &Context<'_, S>) -> bool {
        if !meta.is_event() {
            return true;
        }
        // A callsite's metadata is a static: its address names it.
        let callsite = meta as *const Metadata<'_> as usize;
        self.admit(callsite, self.start.elapsed().as_secs())
    }

    fn callsite_enabled(&self, _meta: &'static Metadata<'static>) -> tracing::subscriber::Interest {
        // Asked per event, not once per callsite: the answer changes with time.
        tracing::subscriber::Interest::sometimes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_callsite_gets_its_burst_per_second() {
        let limit = RateLimit::default();
        let admitted = (0..100).filter(|_| limit.admit(1, 0)).count();
        assert_eq!(admitted, BURST as usize);
        assert!(limit.admit(2, 0), "another callsite has its own budget");
        assert!(limit.admit(1, 1), "the next second starts afresh");
    }
}

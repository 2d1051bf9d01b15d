//! Server health: active checks (L3 ICMP echo, L4 TCP connect, L7 HTTP request or gRPC health check)
//! with rise/fall thresholds, passive detection of failing servers (outlier ejection, as Envoy's), and
//! slow start.
//!
//! Each server carries a [`Health`]: the verdict of its active checks, its passive-ejection deadline,
//! and when it last became available. The request path reads two atomics per candidate
//! ([`Health::is_healthy`]); everything else (check results, the reason of the last change) sits behind
//! a mutex that only the checkers and the admin API take.
//!
//! Model (defaults as HAProxy's): a server starts `up` (unless `initial_state = "down"`); `fall`
//! consecutive failed checks mark it down, `rise` consecutive successes mark it up again. Checks run
//! every `interval` (±10% jitter, the first one at a random point of the first interval, so a thousand
//! servers are not probed in the same millisecond), each bounded by `timeout`.
//!
//! Each server keeps its last [`HISTORY_LEN`] check results (time, verdict, a short reason) for the
//! admin API and the dashboard: a bounded ring, written only by its checker.

mod check;
mod grpc;
pub mod icmp;
mod passive;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

pub use check::{spawn_checks, CheckSpec, CheckTls};
pub use passive::observe;

pub use crate::clock::now_ms;

/// Wall-clock milliseconds since the Unix epoch (for timestamps other instances read too).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The outcome of one active check.
#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    /// The check passed.
    pub ok: bool,
    /// When it completed (Unix time, ms).
    pub at_unix_ms: u64,
    /// How long it took, in ms.
    pub latency_ms: f64,
    /// What was seen: `HTTP 200`, `connection refused`, `timed out after 1s`, …
    pub message: String,
}

/// Check results kept per server (the oldest is dropped first).
pub const HISTORY_LEN: usize = 20;

/// Characters of a check's message kept in the history (the last check keeps it whole).
const HISTORY_MESSAGE_CHARS: usize = 80;

/// One entry of a server's check history.
#[derive(Debug, Clone, Serialize)]
pub struct CheckMark {
    /// The check passed.
    pub ok: bool,
    /// When it completed (Unix time, ms).
    pub at_unix_ms: u64,
    /// How long it took, in ms.
    pub latency_ms: f64,
    /// What was seen, cut to 80 characters.
    pub message: String,
}

impl From<&CheckResult> for CheckMark {
    fn from(r: &CheckResult) -> Self {
        let message = match r.message.char_indices().nth(HISTORY_MESSAGE_CHARS) {
            Some((cut, _)) => format!("{}…", &r.message[..cut]),
            None => r.message.clone(),
        };
        CheckMark {
            ok: r.ok,
            at_unix_ms: r.at_unix_ms,
            latency_ms: r.latency_ms,
            message,
        }
    }
}

/// The last change of a server's health.
#[derive(Debug, Clone, Serialize)]
pub struct StateChange {
    /// When (Unix time, ms).
    pub at_unix_ms: u64,
    /// `up` or `down`.
    pub state: &'static str,
    /// Why: the check results or the passive failures that caused it.
    pub reason: String,
}

#[derive(Debug, Default)]
struct Record {
    last_check: Option<CheckResult>,
    /// The last [`HISTORY_LEN`] check results, oldest first.
    history: VecDeque<CheckMark>,
    last_change: Option<StateChange>,
    ok_streak: u32,
    fail_streak: u32,
}

/// Health of one server.
#[derive(Debug)]
pub struct Health {
    /// The active checks' verdict (always true without checks).
    checked_up: AtomicBool,
    /// Passive ejection: unavailable until this `now_ms()`; 0 when not ejected.
    ejected_until_ms: AtomicU64,
    /// Passive: failures in a row.
    pub(crate) consecutive_failures: AtomicU32,
    /// Passive: how many times ejected (the multiplier of the next ejection).
    pub(crate) ejections: AtomicU32,
    /// When the server last became available (`now_ms()`), for slow start.
    up_since_ms: AtomicU64,
    /// Up/down transitions so far.
    transitions: AtomicU64,
    /// Passive ejections so far.
    ejections_total: AtomicU64,
    record: Mutex<Record>,
}

impl Health {
    /// A server that is up (or down, awaiting `rise` good checks).
    pub fn new(initially_up: bool) -> Self {
        Health {
            checked_up: AtomicBool::new(initially_up),
            ejected_until_ms: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            up_since_ms: AtomicU64::new(0),
            transitions: AtomicU64::new(0),
            ejections_total: AtomicU64::new(0),
            record: Mutex::new(Record::default()),
        }
    }

    /// True when neither the active checks nor passive ejection hold the server out.
    #[inline]
    pub fn is_healthy(&self) -> bool {
        if !self.checked_up.load(Ordering::Relaxed) {
            return false;
        }
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        until == 0 || now_ms() >= until
    }

    /// True while passively ejected.
    pub fn is_ejected(&self) -> bool {
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        until != 0 && now_ms() < until
    }

    /// The share of full weight a server in slow start gets now: 1.0 when `window` has passed since it
    /// became available (or it has never been down).
    #[inline]
    pub fn slow_start_factor(&self, window: Duration) -> f64 {
        let since = self.up_since_ms.load(Ordering::Relaxed);
        if since == 0 {
            return 1.0;
        }
        let elapsed = now_ms().saturating_sub(since) as f64;
        let window = window.as_millis().max(1) as f64;
        if elapsed >= window {
            1.0
        } else {
            // Never quite 0: a recovering server gets a trickle from the first moment.
            (elapsed / window).max(0.01)
        }
    }

    /// Forgets the active checks' verdict (the pool no longer has checks): the server counts as up
    /// again unless passive detection holds it out.
    pub fn clear_checks(&self) {
        if !self.checked_up.swap(true, Ordering::Relaxed) {
            self.start_ramp();
            self.transitions.fetch_add(1, Ordering::Relaxed);
            self.lock().last_change = Some(StateChange {
                at_unix_ms: unix_ms(),
                state: "up",
                reason: "health checks removed from the configuration".into(),
            });
        }
        let mut r = self.lock();
        r.last_check = None;
        r.history.clear();
        r.ok_streak = 0;
        r.fail_streak = 0;
    }

    /// Marks the start of a slow-start ramp (the server just became available, or was added).
    pub fn start_ramp(&self) {
        self.up_since_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// Up/down transitions so far.
    pub fn transitions(&self) -> u64 {
        self.transitions.load(Ordering::Relaxed)
    }

    /// Passive ejections so far.
    pub fn ejections_total(&self) -> u64 {
        self.ejections_total.load(Ordering::Relaxed)
    }

    /// The last check's result.
    pub fn last_check(&self) -> Option<CheckResult> {
        self.lock().last_check.clone()
    }

    /// The last [`HISTORY_LEN`] check results, oldest first.
    pub fn check_history(&self) -> Vec<CheckMark> {
        self.lock().history.iter().cloned().collect()
    }

    /// The last state change and its reason.
    pub fn last_change(&self) -> Option<StateChange> {
        self.lock().last_change.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Record> {
        self.record.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a check result; returns the new state when it changed (`Some(true)` = came up).
    fn record_check(&self, result: CheckResult, rise: u32, fall: u32) -> Option<bool> {
        let mut r = self.lock();
        if result.ok {
            r.ok_streak += 1;
            r.fail_streak = 0;
        } else {
            r.fail_streak += 1;
            r.ok_streak = 0;
        }
        let up = self.checked_up.load(Ordering::Relaxed);
        let change = if up && r.fail_streak >= fall {
            Some((
                false,
                format!(
                    "{} failed check(s) in a row, last: {}",
                    r.fail_streak, result.message
                ),
            ))
        } else if !up && r.ok_streak >= rise {
            Some((
                true,
                format!(
                    "{} good check(s) in a row, last: {}",
                    r.ok_streak, result.message
                ),
            ))
        } else {
            None
        };
        if r.history.len() == HISTORY_LEN {
            r.history.pop_front();
        }
        r.history.push_back(CheckMark::from(&result));
        r.last_check = Some(result);
        let (now_up, reason) = change?;
        self.checked_up.store(now_up, Ordering::Relaxed);
        if now_up {
            self.start_ramp();
        }
        self.transitions.fetch_add(1, Ordering::Relaxed);
        r.last_change = Some(StateChange {
            at_unix_ms: unix_ms(),
            state: if now_up { "up" } else { "down" },
            reason,
        });
        Some(now_up)
    }

    /// Ejects the server until `now + duration` (passive detection).
    fn eject(&self, duration: Duration, reason: String) {
        self.ejected_until_ms
            .store(now_ms() + duration.as_millis() as u64, Ordering::Relaxed);
        self.ejections_total.fetch_add(1, Ordering::Relaxed);
        self.transitions.fetch_add(1, Ordering::Relaxed);
        self.lock().last_change = Some(StateChange {
            at_unix_ms: unix_ms(),
            state: "down",
            reason,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(ok: bool) -> CheckResult {
        CheckResult {
            ok,
            at_unix_ms: 0,
            latency_ms: 0.1,
            message: if ok {
                "HTTP 200".into()
            } else {
                "refused".into()
            },
        }
    }

    #[test]
    fn fall_failures_mark_down_and_rise_successes_mark_up() {
        let h = Health::new(true);
        assert_eq!(h.record_check(result(false), 2, 3), None);
        assert_eq!(h.record_check(result(false), 2, 3), None);
        assert!(h.is_healthy());
        assert_eq!(h.record_check(result(false), 2, 3), Some(false));
        assert!(!h.is_healthy());
        assert_eq!(h.record_check(result(true), 2, 3), None);
        assert_eq!(
            h.record_check(result(false), 2, 3),
            None,
            "a failure resets the rise count"
        );
        assert_eq!(h.record_check(result(true), 2, 3), None);
        assert_eq!(h.record_check(result(true), 2, 3), Some(true));
        assert!(h.is_healthy());
        assert_eq!(h.transitions(), 2);
        let change = h.last_change().unwrap();
        assert_eq!(change.state, "up");
        assert!(
            change.reason.contains("2 good check(s)"),
            "{}",
            change.reason
        );
    }

    #[test]
    fn the_history_keeps_the_last_results_in_order_with_short_messages() {
        let h = Health::new(true);
        assert!(h.check_history().is_empty());
        for i in 0..(HISTORY_LEN as u64 + 5) {
            let mut r = result(i % 3 != 0);
            r.at_unix_ms = i;
            h.record_check(r, 2, 3);
        }
        let history = h.check_history();
        assert_eq!(history.len(), HISTORY_LEN);
        let times: Vec<u64> = history.iter().map(|m| m.at_unix_ms).collect();
        assert_eq!(times, (5..HISTORY_LEN as u64 + 5).collect::<Vec<_>>());
        assert!(history.iter().all(|m| m.ok == (m.at_unix_ms % 3 != 0)));

        let mut long = result(false);
        long.message = "é".repeat(200);
        h.record_check(long, 2, 3);
        let last = h.check_history().pop().unwrap();
        assert_eq!(last.message.chars().count(), HISTORY_MESSAGE_CHARS + 1);
        assert!(last.message.ends_with('…'));
        assert_eq!(h.last_check().unwrap().message.chars().count(), 200);

        h.clear_checks();
        assert!(h.check_history().is_empty(), "no checks, no history");
    }

    #[test]
    fn a_server_may_start_down() {
        let h = Health::new(false);
        assert!(!h.is_healthy());
        assert_eq!(h.record_check(result(true), 1, 3), Some(true));
    }

    #[tokio::test(start_paused = true)]
    async fn ejection_expires() {
        let h = Health::new(true);
        h.eject(Duration::from_secs(30), "test".into());
        assert!(!h.is_healthy() && h.is_ejected());
        tokio::time::advance(Duration::from_millis(29_990)).await;
        assert!(h.is_ejected(), "still ejected 10 ms before the end");
        tokio::time::advance(Duration::from_millis(20)).await;
        assert!(h.is_healthy() && !h.is_ejected());
    }

    #[tokio::test(start_paused = true)]
    async fn slow_start_ramps_from_a_trickle_to_full() {
        let h = Health::new(true);
        let window = Duration::from_secs(10);
        assert_eq!(h.slow_start_factor(window), 1.0, "never down: full share");
        h.start_ramp();
        assert_eq!(h.slow_start_factor(window), 0.01, "a trickle at first");
        for (at_s, share) in [(2.5, 0.25), (5.0, 0.5), (7.5, 0.75)] {
            tokio::time::advance(Duration::from_millis(2_500)).await;
            assert_eq!(h.slow_start_factor(window), share, "at {at_s} s");
        }
        tokio::time::advance(Duration::from_millis(2_500)).await;
        assert_eq!(h.slow_start_factor(window), 1.0);
    }
}

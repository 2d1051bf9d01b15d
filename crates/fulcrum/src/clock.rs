//! The one clock of the balancer: tokio's, so that a test can pause and advance it
//! (`#[tokio::test(start_paused = true)]`, `tokio::time::advance`) instead of sleeping through TTLs,
//! ramps and ejections on a loaded machine. Outside a paused test it is the monotonic system clock.
//!
//! Health (rise/fall timing, ejections, slow start), stick-table TTLs, the Redis breaker, latency
//! decay, drains and DNS re-resolution all read time here or through `tokio::time`.

use std::sync::OnceLock;

use tokio::time::Instant;

/// The process's time origin.
static ORIGIN: OnceLock<Instant> = OnceLock::new();

/// Now.
#[inline]
pub fn now() -> Instant {
    Instant::now()
}

fn origin() -> Instant {
    *ORIGIN.get_or_init(Instant::now)
}

/// Milliseconds since the process's clock origin, plus one (so that 0 can mean "never").
#[inline]
pub fn now_ms() -> u64 {
    now().saturating_duration_since(origin()).as_millis() as u64 + 1
}

/// Nanoseconds since the process's clock origin, plus one (so that 0 can mean "never").
#[inline]
pub fn now_ns() -> u64 {
    now().saturating_duration_since(origin()).as_nanos() as u64 + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_paused_clock_moves_only_when_advanced() {
        let t0 = now_ms();
        tokio::time::advance(Duration::from_secs(90)).await;
        assert_eq!(now_ms() - t0, 90_000);
    }
}

//! Passive health checking (outlier detection, as Envoy's): the request path reports each exchange's
//! outcome; `consecutive_failures` failures in a row (connect errors, resets, timeouts, 5xx answers)
//! eject the server for `base_ejection` × the number of times it has been ejected, unless that would
//! eject more than `max_ejected_percent` of the pool (one server may always be ejected). The multiplier
//! is forgotten once the server has served well for a `base_ejection` after its last ejection.

use std::sync::atomic::Ordering;

use super::{now_ms, Health};
use crate::config::PassiveConfig;

/// Reports one exchange with the server whose health is `health`; `peers` are the health of every
/// server of its pool (itself included), read only when deciding an ejection.
#[inline]
pub fn observe<'a>(
    health: &Health,
    ok: bool,
    cfg: &PassiveConfig,
    server: &str,
    peers: impl Iterator<Item = &'a Health>,
) {
    if ok {
        if health.consecutive_failures.load(Ordering::Relaxed) != 0 {
            health.consecutive_failures.store(0, Ordering::Relaxed);
        }
        let ejections = health.ejections.load(Ordering::Relaxed);
        if ejections != 0 {
            let until = health.ejected_until_ms.load(Ordering::Relaxed);
            if now_ms() > until + cfg.base_ejection.as_millis() as u64 {
                health.ejections.store(0, Ordering::Relaxed);
            }
        }
        return;
    }
    let failures = health.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
    if failures < cfg.consecutive_failures || health.is_ejected() {
        return;
    }
    let (mut total, mut ejected) = (0usize, 0usize);
    for peer in peers {
        total += 1;
        if peer.is_ejected() {
            ejected += 1;
        }
    }
    let allowed = (total * cfg.max_ejected_percent as usize / 100).max(1);
    if ejected >= allowed {
        tracing::warn!(
            server,
            failures,
            ejected,
            allowed,
            "not ejecting: too many servers of the pool are ejected already"
        );
        return;
    }
    health.consecutive_failures.store(0, Ordering::Relaxed);
    let times = health.ejections.fetch_add(1, Ordering::Relaxed) + 1;
    let duration = cfg.base_ejection * times;
    let reason = format!(
        "passive: {failures} failures in a row; ejected for {duration:?} (ejection #{times})"
    );
    tracing::warn!(server, ?duration, failures, "server ejected");
    health.eject(duration, reason);
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn cfg(n: u32, pct: u32) -> PassiveConfig {
        PassiveConfig {
            consecutive_failures: n,
            base_ejection: Duration::from_millis(40),
            max_ejected_percent: pct,
        }
    }

    #[test]
    fn consecutive_failures_eject_and_success_resets_the_count() {
        let pool: Vec<Health> = (0..4).map(|_| Health::new(true)).collect();
        let c = cfg(3, 50);
        observe(&pool[0], false, &c, "a", pool.iter());
        observe(&pool[0], false, &c, "a", pool.iter());
        observe(&pool[0], true, &c, "a", pool.iter());
        observe(&pool[0], false, &c, "a", pool.iter());
        observe(&pool[0], false, &c, "a", pool.iter());
        assert!(
            pool[0].is_healthy(),
            "the success in between reset the count"
        );
        observe(&pool[0], false, &c, "a", pool.iter());
        assert!(pool[0].is_ejected());
        assert_eq!(pool[0].ejections_total(), 1);
        assert!(pool[0]
            .last_change()
            .unwrap()
            .reason
            .contains("3 failures in a row"));
    }

    #[test]
    fn ejection_time_grows_with_each_ejection() {
        let pool: Vec<Health> = (0..2).map(|_| Health::new(true)).collect();
        let c = cfg(1, 50);
        observe(&pool[0], false, &c, "a", pool.iter());
        std::thread::sleep(Duration::from_millis(50));
        assert!(!pool[0].is_ejected(), "first ejection: 40 ms");
        observe(&pool[0], false, &c, "a", pool.iter());
        std::thread::sleep(Duration::from_millis(50));
        assert!(pool[0].is_ejected(), "second ejection: 80 ms");
    }

    #[test]
    fn never_more_than_the_allowed_share_but_always_one() {
        let pool: Vec<Health> = (0..4).map(|_| Health::new(true)).collect();
        let c = cfg(1, 25);
        for h in &pool {
            observe(h, false, &c, "x", pool.iter());
        }
        assert_eq!(
            pool.iter().filter(|h| h.is_ejected()).count(),
            1,
            "25% of 4"
        );
        let pair: Vec<Health> = (0..2).map(|_| Health::new(true)).collect();
        let c = cfg(1, 0);
        for h in &pair {
            observe(h, false, &c, "x", pair.iter());
        }
        assert_eq!(
            pair.iter().filter(|h| h.is_ejected()).count(),
            1,
            "0% still allows one"
        );
    }
}

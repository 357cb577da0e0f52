//! Close waves: many tunnels told to close at once (a drained backend's, or all of
//! them at shutdown), each at its own moment, spread evenly with jitter over a
//! window so that their clients do not all reconnect in the same second.
//!
//! A wave hands out slots in the order its tunnels wake: slot `i` of `n` closes at
//! `i·spread/n` plus a random part of one slot's width. So a window of `s` seconds
//! never holds more than `⌈n/s⌉ + 1` closes in any one second.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Why a wave closes its tunnels: the code and the label they are counted under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// wsgate is shutting down: 1001.
    Shutdown,
    /// The backend is draining: 1012, "reconnect, you will land elsewhere".
    Drain,
}

/// One wave: started once; its tunnels watch its token.
#[derive(Debug)]
pub struct Wave {
    reason: Reason,
    token: CancellationToken,
    /// The wave that also ends this one (the shutdown wave, for a drain wave).
    parent: Option<Arc<Wave>>,
    next_slot: AtomicU64,
    total: AtomicU64,
    spread_ms: AtomicU64,
}

impl Wave {
    /// The shutdown wave: the root of every other.
    pub fn root() -> Arc<Wave> {
        Arc::new(Wave {
            reason: Reason::Shutdown,
            token: CancellationToken::new(),
            parent: None,
            next_slot: AtomicU64::new(0),
            total: AtomicU64::new(0),
            spread_ms: AtomicU64::new(0),
        })
    }

    /// A drain wave, also ended by `parent` (shutdown) starting.
    pub fn drain(parent: &Arc<Wave>) -> Arc<Wave> {
        Arc::new(Wave {
            reason: Reason::Drain,
            token: parent.token.child_token(),
            parent: Some(parent.clone()),
            next_slot: AtomicU64::new(0),
            total: AtomicU64::new(0),
            spread_ms: AtomicU64::new(0),
        })
    }

    /// Tells its tunnels to close: `total` of them, over `spread`.
    pub fn start(&self, total: u64, spread: Duration) {
        self.total.store(total.max(1), Ordering::Relaxed);
        self.spread_ms
            .store(spread.as_millis() as u64, Ordering::Relaxed);
        self.next_slot.store(0, Ordering::Relaxed);
        self.token.cancel();
    }

    pub fn is_started(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Cancelled when this wave (or its parent) starts.
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// For one tunnel woken by the token: why it closes and after how long.
    pub fn plan(&self) -> (Reason, Duration) {
        match &self.parent {
            Some(parent) if parent.is_started() => parent.plan(),
            _ => (self.reason, self.next_delay()),
        }
    }

    fn next_delay(&self) -> Duration {
        let slot = self.next_slot.fetch_add(1, Ordering::Relaxed);
        let total = self.total.load(Ordering::Relaxed);
        let spread = Duration::from_millis(self.spread_ms.load(Ordering::Relaxed));
        slot_delay(slot, total, spread, fastrand::f64())
    }
}

/// Slot `slot` of `total` over `spread`, `jitter` (0..1) of the way into the slot.
/// Slots past the total (tunnels the count missed) close at the end.
pub fn slot_delay(slot: u64, total: u64, spread: Duration, jitter: f64) -> Duration {
    let total = total.max(1);
    let width = spread.as_secs_f64() / total as f64;
    let at = width * (slot.min(total - 1) as f64 + jitter.clamp(0.0, 1.0));
    Duration::from_secs_f64(at.min(spread.as_secs_f64()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_second_holds_more_than_its_share_plus_one() {
        for (total, secs) in [(100u64, 5u64), (500, 3), (7, 3), (1000, 30)] {
            let spread = Duration::from_secs(secs);
            let mut per_second = vec![0u64; secs as usize + 1];
            for slot in 0..total {
                let at = slot_delay(slot, total, spread, fastrand::f64());
                assert!(at <= spread);
                per_second[at.as_secs() as usize] += 1;
            }
            let bound = total.div_ceil(secs) + 1;
            assert!(
                per_second.iter().all(|n| *n <= bound),
                "{total} over {secs}s: {per_second:?}"
            );
        }
    }

    #[test]
    fn a_drain_wave_follows_the_shutdown_wave() {
        let root = Wave::root();
        let drain = Wave::drain(&root);
        assert!(!drain.token().is_cancelled());
        drain.start(2, Duration::from_secs(2));
        assert_eq!(drain.plan().0, Reason::Drain);
        let other = Wave::drain(&root);
        root.start(10, Duration::ZERO);
        assert!(other.token().is_cancelled());
        assert_eq!(other.plan(), (Reason::Shutdown, Duration::ZERO));
    }
}

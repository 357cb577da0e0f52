//! Close waves: many tunnels told to close at once (a drained backend's, or all of
//! them at shutdown), each at its own moment, spread evenly with jitter over a
//! window so that their clients do not all reconnect in the same second.
//!
//! A wave hands out slots in the order its tunnels wake: slot `i` of `n` closes at
//! `i·spread/n` plus a random part of one slot's width. So a window of `s` seconds
//! never holds more than `⌈n/s⌉ + 1` closes in any one second.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::sync::futures::Notified;

/// Why a tunnel is told to close: the code and the label it is counted under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// wsgate is shutting down: 1001.
    Shutdown,
    /// The backend is draining: 1012, "reconnect, you will land elsewhere".
    Drain,
    /// The backend holds more than its share: 1012, one tunnel at a time.
    Rebalance,
}

/// What a woken tunnel is to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Close with `Reason`'s code after this delay (its slot in the wave).
    Close(Reason, Duration),
    /// Close now (rebalance), if the tunnel is at least this old.
    CloseIfOlder(Duration),
}

/// The tunnels of one backend (or, for the root, of all): each waits on it while
/// it relays. Started once, a wave tells all its tunnels to close, each in its
/// slot; before that, a nudge tells the one that has waited longest (the oldest
/// tunnel) to close now.
#[derive(Debug)]
pub struct Wave {
    reason: Reason,
    notify: Notify,
    started: AtomicBool,
    /// The wave that also ends this one (the shutdown wave, for a drain wave).
    parent: Option<Arc<Wave>>,
    /// The root's drain waves, to wake when it starts.
    children: Mutex<Vec<Weak<Wave>>>,
    next_slot: AtomicU64,
    total: AtomicU64,
    spread_ms: AtomicU64,
    /// The age a nudged tunnel must have to close (rebalance `min_age`).
    min_age_ms: AtomicU64,
    /// Counts the starts and nudges that reached this wave's waiters: a tunnel
    /// looks at its wait (which takes the waiters' lock, shared by every tunnel
    /// of the backend) only when this moved since it last looked.
    signals: AtomicU64,
}

impl Wave {
    fn new(reason: Reason, parent: Option<Arc<Wave>>) -> Wave {
        Wave {
            reason,
            notify: Notify::new(),
            started: AtomicBool::new(false),
            parent,
            children: Mutex::default(),
            next_slot: AtomicU64::new(0),
            total: AtomicU64::new(0),
            spread_ms: AtomicU64::new(0),
            min_age_ms: AtomicU64::new(0),
            signals: AtomicU64::new(0),
        }
    }

    /// The shutdown wave: the parent of every other.
    pub fn root() -> Arc<Wave> {
        Arc::new(Wave::new(Reason::Shutdown, None))
    }

    /// A drain wave, also started by `parent` (shutdown).
    pub fn drain(parent: &Arc<Wave>) -> Arc<Wave> {
        let wave = Arc::new(Wave::new(Reason::Drain, Some(parent.clone())));
        let mut children = parent.children.lock().unwrap_or_else(|e| e.into_inner());
        if children.len() >= 64 && children.len().is_power_of_two() {
            children.retain(|c| c.strong_count() > 0);
        }
        children.push(Arc::downgrade(&wave));
        wave
    }

    /// Tells its tunnels to close: `total` of them, over `spread`.
    pub fn start(&self, total: u64, spread: Duration) {
        self.total.store(total.max(1), Ordering::Relaxed);
        self.spread_ms
            .store(spread.as_millis() as u64, Ordering::Relaxed);
        self.next_slot.store(0, Ordering::Relaxed);
        self.started.store(true, Ordering::Release);
        self.signal();
        let children = self.children.lock().unwrap_or_else(|e| e.into_inner());
        for child in children.iter().filter_map(Weak::upgrade) {
            child.signal();
        }
    }

    /// Wakes every waiter, counted first (see [`Wave::signals`]).
    fn signal(&self) {
        self.signals.fetch_add(1, Ordering::AcqRel);
        self.notify.notify_waiters();
    }

    /// How many starts and nudges have reached this wave's waiters. Counted before
    /// the waiters are woken: a tunnel woken by one finds the count moved, and
    /// one that finds it where it last looked has missed nothing.
    pub fn signals(&self) -> u64 {
        self.signals.load(Ordering::Acquire)
    }

    /// Started, itself or through its parent.
    pub fn is_started(&self) -> bool {
        self.started.load(Ordering::Acquire) || self.parent.as_ref().is_some_and(|p| p.is_started())
    }

    /// Tells the tunnel that has waited longest to close now, if it is at least
    /// `min_age` old.
    pub fn nudge(&self, min_age: Duration) {
        self.min_age_ms
            .store(min_age.as_millis() as u64, Ordering::Relaxed);
        self.signals.fetch_add(1, Ordering::AcqRel);
        self.notify.notify_one();
    }

    /// What a tunnel waits on: created before the tunnel relays, so no start is
    /// missed (`notify_waiters` reaches futures not yet polled).
    pub fn wait(&self) -> Notified<'_> {
        self.notify.notified()
    }

    /// For a woken tunnel: what to do.
    pub fn order(&self) -> Order {
        match &self.parent {
            Some(parent) if parent.is_started() => parent.order(),
            _ if self.started.load(Ordering::Acquire) => {
                Order::Close(self.reason, self.next_delay())
            }
            _ => Order::CloseIfOlder(Duration::from_millis(
                self.min_age_ms.load(Ordering::Relaxed),
            )),
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

    #[tokio::test]
    async fn a_drain_wave_follows_the_shutdown_wave() {
        let root = Wave::root();
        let drain = Wave::drain(&root);
        assert!(!drain.is_started());
        drain.start(2, Duration::from_secs(2));
        assert!(matches!(drain.order(), Order::Close(Reason::Drain, _)));
        let other = Wave::drain(&root);
        let waiting = other.wait();
        root.start(10, Duration::ZERO);
        tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("the shutdown wakes every drain wave's tunnels");
        assert!(other.is_started());
        assert_eq!(
            other.order(),
            Order::Close(Reason::Shutdown, Duration::ZERO)
        );
    }

    #[tokio::test]
    async fn a_nudge_wakes_the_longest_waiting_tunnel_only() {
        let wave = Wave::drain(&Wave::root());
        use std::future::Future;
        use std::task::{Context, Waker};
        let mut cx = Context::from_waker(Waker::noop());
        let first = wave.wait();
        let second = wave.wait();
        tokio::pin!(first, second);
        // Registered in this order (as tunnels are, when they start relaying).
        assert!(first.as_mut().poll(&mut cx).is_pending());
        assert!(second.as_mut().poll(&mut cx).is_pending());
        wave.nudge(Duration::from_secs(60));
        assert!(first.as_mut().poll(&mut cx).is_ready());
        assert!(second.as_mut().poll(&mut cx).is_pending());
        assert_eq!(wave.order(), Order::CloseIfOlder(Duration::from_secs(60)));
    }
}

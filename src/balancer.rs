//! Backends, their connection counts and the least-connections pick.
//!
//! A backend's count covers every connection this instance has assigned to it, from
//! the moment it was picked (handshake in flight) to the end of the tunnel. The count
//! only changes through [`ConnGuard`]: one increment at the pick, one decrement in
//! `Drop`, whatever ended the connection.
//!
//! A backend that leaves (removed from the file, `drain = true`, drained through the
//! admin API) stays in its pool as draining until its last tunnel ends: it keeps
//! its count, gets no new connections, and its tunnels are closed by a drain wave
//! (see `closing`) after the pool's `drain_timeout`.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::sync::futures::Notified;
use tokio::time::Instant;

use crate::closing::Wave;
use crate::config::{BackendAddr, BackendConfig, HealthConfig, PoolConfig};

/// What every backend of a gateway shares: the shutdown wave (the parent of
/// their drain waves), the signal that a count changed and the one that a drain
/// started.
#[derive(Debug, Clone)]
pub struct Env {
    pub root: Arc<Wave>,
    pub changed: Arc<CountsChanged>,
    /// Wakes the drain task, which sleeps while nothing drains or rebalances.
    pub drains: Arc<Notify>,
    /// The other instances, as the cluster task sees them.
    pub peers: Arc<Peers>,
}

/// What the balancer knows of the other instances: how many are live (as of the
/// last heartbeat) and, for each, when it sent the last count announcement that
/// reached this instance (its counts are known up to then) and how many picks it
/// had made in the [`BURST_LEAD_MS`] before (how far into a burst it was).
#[derive(Debug, Default)]
pub struct Peers {
    others: AtomicU64,
    /// Instance → its latest announcement that reached here.
    heard: Mutex<std::collections::HashMap<String, Heard>>,
    /// Those send times, one per live other instance (0: not heard from yet; the
    /// first [`PEER_SLOTS`] of them, the last slot standing for the rest by their
    /// oldest): picks of this instance since then may be mirrored by a burst that
    /// instance has not announced yet.
    known_until: [AtomicU64; PEER_SLOTS],
    /// Beside each send time, that instance's picks in the [`BURST_LEAD_MS`]
    /// before (`u64::MAX`: not said, as by an instance of a version that did
    /// not say it).
    known_recent: [AtomicU64; PEER_SLOTS],
    /// This instance's picks (of every pool) in the last [`BURST_MEMORY_MS`].
    picks: PickBuckets,
    /// Upgrades this instance is handling now: a pick counts as part of a burst
    /// only while others are in flight beside it.
    in_flight: AtomicU64,
}

/// One upgrade in flight on this instance, from request to answer.
#[derive(Debug)]
pub struct InFlight(Arc<Peers>);

impl InFlight {
    pub fn new(peers: &Arc<Peers>) -> InFlight {
        peers.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(peers.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An instance's latest announcement, as far as the burst rule needs it.
#[derive(Debug, Clone, Copy)]
struct Heard {
    /// Its send time, ms since the epoch.
    sent: u64,
    /// Its picks in the [`BURST_LEAD_MS`] before `sent`, if it said.
    recent: Option<u64>,
}

/// Picks of the last [`BURST_MEMORY_MS`] in buckets of [`BURST_BUCKET_MS`]: per
/// bucket, its number (epoch ms / bucket) and the picks in it.
#[derive(Debug)]
struct PickBuckets {
    bucket: [AtomicU64; BURST_BUCKETS],
    picks: [AtomicU32; BURST_BUCKETS],
}

impl Default for PickBuckets {
    fn default() -> PickBuckets {
        PickBuckets {
            bucket: std::array::from_fn(|_| AtomicU64::new(0)),
            picks: std::array::from_fn(|_| AtomicU32::new(0)),
        }
    }
}

impl PickBuckets {
    /// One pick at `now` (ms since the epoch).
    fn note(&self, now: u64) {
        let bucket = now / BURST_BUCKET_MS;
        let slot = (bucket % BURST_BUCKETS as u64) as usize;
        if self.bucket[slot].swap(bucket, Ordering::Relaxed) != bucket {
            self.picks[slot].store(0, Ordering::Relaxed);
        }
        self.picks[slot].fetch_add(1, Ordering::Relaxed);
    }

    /// The picks after `since` (ms since the epoch; see [`picks_since`]).
    fn since(&self, since: u64) -> u64 {
        picks_since(
            since,
            self.bucket
                .iter()
                .zip(&self.picks)
                .map(|(b, n)| (b.load(Ordering::Relaxed), n.load(Ordering::Relaxed))),
        )
    }
}

/// Other instances accounted one by one; beyond, the last slot counts for all.
const PEER_SLOTS: usize = 8;

impl Peers {
    /// The live other instances, at a heartbeat.
    pub fn set_live(&self, others: &[String]) {
        let mut heard = self.heard.lock().unwrap_or_else(|e| e.into_inner());
        heard.retain(|id, _| others.contains(id));
        self.others.store(others.len() as u64, Ordering::Relaxed);
        self.update(&heard);
    }

    /// An announcement of `instance`, sent at `sent` (ms since the epoch) when it
    /// had made `recent` picks in the [`BURST_LEAD_MS`] before. An instance
    /// heard from is live, even before this one's next heartbeat lists it (it may
    /// have started since the last): its picks are accounted from now.
    pub fn heard(&self, instance: &str, sent: u64, recent: Option<u64>) {
        let mut heard = self.heard.lock().unwrap_or_else(|e| e.into_inner());
        heard.insert(instance.to_string(), Heard { sent, recent });
        self.others.fetch_max(heard.len() as u64, Ordering::Relaxed);
        self.update(&heard);
    }

    fn update(&self, heard: &std::collections::HashMap<String, Heard>) {
        let others = self.others.load(Ordering::Relaxed) as usize;
        let mut known: Vec<Heard> = heard.values().copied().collect();
        // An instance not heard from at all: nothing is known of its picks.
        let unknown = Heard {
            sent: 0,
            recent: None,
        };
        known.resize(others.max(known.len()), unknown);
        known.sort_unstable_by_key(|h| std::cmp::Reverse(h.sent));
        let slots = self.known_until.iter().zip(&self.known_recent);
        for (slot, (until, recent)) in slots.enumerate() {
            let value = if slot + 1 < PEER_SLOTS {
                known.get(slot).copied()
            } else {
                known[slot.min(known.len())..]
                    .iter()
                    .copied()
                    .min_by_key(|h| h.sent)
            };
            let (sent, picks) = value.map_or((u64::MAX, u64::MAX), |h| {
                (h.sent, h.recent.unwrap_or(u64::MAX))
            });
            recent.store(picks, Ordering::Relaxed);
            until.store(sent, Ordering::Relaxed);
        }
    }

    /// This instance's picks in the last [`BURST_LEAD_MS`], for its
    /// announcements.
    pub fn recent_picks(&self) -> u64 {
        self.picks.since(epoch_ms().saturating_sub(BURST_LEAD_MS))
    }
}

impl Default for Env {
    fn default() -> Env {
        Env {
            root: Wave::root(),
            changed: Arc::default(),
            drains: Arc::default(),
            peers: Arc::default(),
        }
    }
}

/// A pick of this instance is assumed mirrored by each other instance (a burst
/// reaches them too) until an announcement sent after it says what they really
/// did, and for this long at the most; an instance that had made more picks of
/// its own in the [`BURST_LEAD_MS`] before it last spoke than this one has made
/// since the same moment is not assumed to mirror the picks by which this one
/// is behind it (a burst is shared by the instances: one that is ahead of this
/// one has taken its share already, as far as can be told).
pub const BURST_MEMORY_MS: u64 = 100;
/// How far back the instances compare their picks in a burst: short, so that
/// the picks before a burst do not count.
pub const BURST_LEAD_MS: u64 = 20;
/// The picks are remembered in buckets of this many ms.
const BURST_BUCKET_MS: u64 = 5;
const BURST_BUCKETS: usize = (BURST_MEMORY_MS / BURST_BUCKET_MS) as usize;

/// Of `buckets` (bucket number, picks in it), the picks made after `since` (ms):
/// every bucket after the one `since` falls in, and of that one the part after
/// `since` (its picks taken as spread evenly), so that picks a peer's
/// announcement already answered are not mirrored again. Rounded to nearest.
fn picks_since(since: u64, buckets: impl Iterator<Item = (u64, u32)>) -> u64 {
    let first = since / BURST_BUCKET_MS;
    let part = (first + 1) * BURST_BUCKET_MS - since;
    let scaled: u64 = buckets
        .map(|(bucket, picks)| {
            let picks = u64::from(picks);
            match bucket.cmp(&first) {
                std::cmp::Ordering::Greater => picks * BURST_BUCKET_MS,
                std::cmp::Ordering::Equal => picks * part,
                std::cmp::Ordering::Less => 0,
            }
        })
        .sum();
    (scaled + BURST_BUCKET_MS / 2) / BURST_BUCKET_MS
}

/// Milliseconds since the Unix epoch (comparable with other instances' clocks).
fn epoch_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Tells the cluster task that a connection count changed, so it can publish at
/// once: an atomic flag, and a wake-up only when the flag was clear (at most one
/// per look the task takes), so the upgrade path pays one atomic operation.
#[derive(Debug, Default)]
pub struct CountsChanged {
    dirty: AtomicBool,
    notify: Notify,
}

impl CountsChanged {
    /// Marks a change and wakes the task (once until it looks).
    pub fn touch(&self) {
        if !self.dirty.swap(true, Ordering::AcqRel) {
            self.notify.notify_waiters();
        }
    }

    /// Completes at the next change after it was created.
    pub fn notified(&self) -> Notified<'_> {
        self.notify.notified()
    }

    /// Whether anything changed since the last call.
    pub fn take(&self) -> bool {
        self.dirty.swap(false, Ordering::AcqRel)
    }
}

/// One backend of one pool. Shared by every snapshot that still lists it, so a
/// reload keeps its count.
#[derive(Debug)]
pub struct Backend {
    pub addr: BackendAddr,
    /// A stable hash of the address: sticky tokens and rendezvous hashing use it,
    /// so every instance agrees.
    pub id: u64,
    /// Changed in place by a reload, which keeps the count.
    weight: AtomicU32,
    /// Connections assigned by this instance, handshakes in flight included.
    active: AtomicU64,
    /// Plain HTTP requests in flight through this instance (`http = "proxy"`),
    /// balanced apart from the WebSocket connections.
    http_active: AtomicU64,
    /// Connections the other live instances of the cluster hold, as they last
    /// published them; written by the cluster task, read by the pick, never awaited.
    remote: AtomicU64,
    /// Any of the drain reasons holds: keeps its tunnels, gets no new ones.
    draining: AtomicBool,
    drain: Mutex<Drain>,
    /// Cleared by health checks (see `health`); always set without them.
    healthy: AtomicBool,
    /// Consecutive check results: > 0 successes, < 0 failures.
    streak: AtomicI32,
    /// Without active checks: consecutive failed connects or handshakes.
    fails: AtomicU32,
    /// Without active checks: ejected until this time (ms on [`clock_ms`]); 0 = not.
    ejected_until: AtomicU64,
    /// Connections it may hold across the cluster (`max_connections`); 0 = any.
    max_connections: AtomicU64,
    /// When its slow start began (ms on [`clock_ms`]); 0 = not in slow start.
    slow_since: AtomicU64,
    /// Slow start's share of the picks it wins, accumulated in thousandths: a pick
    /// goes to it each time this reaches a thousand.
    slow_credit: AtomicU32,
    changed: Arc<CountsChanged>,
    /// This instance's picks of it in the last [`BURST_MEMORY_MS`].
    recent: PickBuckets,
    peers: Arc<Peers>,
}

/// The smallest share of its picks a backend in slow start takes.
pub const SLOW_START_MIN: f64 = 0.1;

/// Why a backend drains, and the wave its tunnels watch.
#[derive(Debug)]
struct Drain {
    /// No longer in the config; kept while it has tunnels.
    removed: bool,
    /// `drain = true` in its entry.
    configured: bool,
    /// Drained through the admin API: holds across reloads until `ready` or removal.
    admin: bool,
    /// When it started draining.
    since: Option<Instant>,
    /// The wave a new tunnel watches; replaced by a fresh one once started.
    wave: Arc<Wave>,
    /// When the current drain wave was started.
    started: Option<Instant>,
    /// The shutdown wave, parent of every drain wave.
    root: Arc<Wave>,
    /// Told when a drain starts ([`Env::drains`]).
    wake: Arc<Notify>,
}

/// Milliseconds on a process-wide clock (tokio's, so tests can pause it).
fn clock_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    Instant::now().saturating_duration_since(start).as_millis() as u64 + 1
}

impl Backend {
    /// A backend whose tunnels also close when the shutdown wave starts.
    pub fn new(config: &BackendConfig, env: &Env) -> Backend {
        let root = &env.root;
        let backend = Backend {
            id: fnv1a(config.addr.to_string().as_bytes()),
            addr: config.addr.clone(),
            http_active: AtomicU64::new(0),
            weight: AtomicU32::new(config.weight.get()),
            active: AtomicU64::new(0),
            remote: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            drain: Mutex::new(Drain {
                removed: false,
                configured: false,
                admin: false,
                since: None,
                wave: Wave::drain(root),
                started: None,
                root: root.clone(),
                wake: env.drains.clone(),
            }),
            healthy: AtomicBool::new(true),
            streak: AtomicI32::new(0),
            fails: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            max_connections: AtomicU64::new(config.max_connections.unwrap_or(0)),
            slow_since: AtomicU64::new(0),
            slow_credit: AtomicU32::new(0),
            changed: env.changed.clone(),
            recent: PickBuckets::default(),
            peers: env.peers.clone(),
        };
        backend.set_drain(|d| d.configured = config.drain);
        backend
    }

    /// Healthy by its checks and not passively ejected.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed) && !self.is_ejected()
    }

    /// Passively ejected now (pools without active checks).
    pub fn is_ejected(&self) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        until != 0 && clock_ms() < until
    }

    pub(crate) fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::Relaxed);
    }

    /// Sets health; true when this call changed it (so exactly one caller logs).
    /// Coming back healthy starts a slow start (where the pool has one).
    fn flip_healthy(&self, healthy: bool) -> bool {
        let flipped = self.healthy.swap(healthy, Ordering::Relaxed) != healthy;
        if flipped && healthy {
            self.start_slow();
        }
        flipped
    }

    /// Ends a slow start at once (a DNS name's first addresses are not new).
    pub fn end_slow(&self) {
        self.slow_since.store(0, Ordering::Relaxed);
    }

    /// Begins a slow start: the pool's `slow_start` window counts from now.
    pub fn start_slow(&self) {
        self.slow_credit.store(0, Ordering::Relaxed);
        self.slow_since.store(clock_ms(), Ordering::Relaxed);
    }

    /// The share of its picks it takes now: `None` outside a slow start, else
    /// `max(SLOW_START_MIN, elapsed / window)`.
    pub fn slow_share(&self, window: Duration) -> Option<f64> {
        let since = self.slow_since.load(Ordering::Relaxed);
        if since == 0 {
            return None;
        }
        let elapsed = clock_ms().saturating_sub(since);
        let window_ms = window.as_millis().max(1) as u64;
        if elapsed >= window_ms {
            self.slow_since.store(0, Ordering::Relaxed);
            return None;
        }
        Some((elapsed as f64 / window_ms as f64).max(SLOW_START_MIN))
    }

    /// Adds `share` of a pick to its credit; true when a whole pick is due.
    fn take_slow_pick(&self, share: f64) -> bool {
        let add = (share * 1000.0) as u32;
        let mut due = false;
        let _ = self
            .slow_credit
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
                let c = c.saturating_add(add);
                due = c >= 1000;
                Some(if due { c - 1000 } else { c })
            });
        due
    }

    /// Records the result of one active check and flips health when the streak is
    /// long enough (see `health`). Each flip is logged once.
    pub fn record_check(&self, pool: &str, ok: bool, config: &HealthConfig) {
        let step = |s: i32| {
            if ok {
                s.max(0).saturating_add(1)
            } else {
                s.min(0).saturating_sub(1)
            }
        };
        let streak = self
            .streak
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| Some(step(s)))
            .map_or(0, step);
        let length = streak.unsigned_abs();
        // The flip itself is a swap: of two threads ending the same streak, one logs.
        if !ok && length >= config.unhealthy_after && self.flip_healthy(false) {
            tracing::warn!(pool, backend = %self.addr, failures = length, "backend ejected: unhealthy");
        } else if ok && length >= config.healthy_after && self.flip_healthy(true) {
            tracing::info!(pool, backend = %self.addr, successes = length, "backend healthy again");
        }
    }

    /// The result of one attempt on the upgrade path (a connect and handshake).
    /// With active checks, a failure counts like a failed check and only a passing
    /// check re-admits (a connect says nothing about an HTTP check). Without them,
    /// `max_fails` failures in a row eject it for `fail_timeout`; after that it is
    /// tried again, and a success brings it back.
    pub fn record_attempt(&self, pool: &str, ok: bool, settings: &PoolConfig) {
        if let Some(health) = &settings.health {
            if !ok {
                self.record_check(pool, false, health);
            }
            return;
        }
        if ok {
            self.fails.store(0, Ordering::Relaxed);
            if self.ejected_until.swap(0, Ordering::Relaxed) != 0 {
                tracing::info!(pool, backend = %self.addr, "backend healthy again");
                self.start_slow();
            }
            return;
        }
        let fails = self.fails.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        if fails >= settings.max_fails {
            let until = clock_ms() + settings.fail_timeout.as_millis() as u64;
            if self.ejected_until.swap(until, Ordering::Relaxed) == 0 {
                tracing::warn!(pool, backend = %self.addr, failures = fails, pause = ?settings.fail_timeout, "backend ejected: failed attempts");
            }
        }
    }

    fn drain_state(&self) -> MutexGuard<'_, Drain> {
        // Each change under this lock is a few assignments: never half done.
        self.drain.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes a drain reason and keeps `draining` and the drain's start in step.
    fn set_drain(&self, change: impl FnOnce(&mut Drain)) {
        let mut drain = self.drain_state();
        change(&mut drain);
        let draining = drain.removed || drain.configured || drain.admin;
        if draining && drain.since.is_none() {
            drain.since = Some(Instant::now());
            drain.wake.notify_one();
        } else if !draining {
            drain.since = None;
            if drain.started.take().is_some() {
                // Tunnels opened from now on must not be closed by that wave.
                drain.wave = Wave::drain(&drain.root);
            }
        }
        self.draining.store(draining, Ordering::Relaxed);
    }

    /// Removed from (or back in) the config. Removal also ends an admin drain.
    pub fn set_removed(&self, removed: bool) {
        self.set_drain(|d| {
            d.removed = removed;
            if removed {
                d.admin = false;
            }
        });
    }

    pub fn is_removed(&self) -> bool {
        self.drain_state().removed
    }

    /// Drained (true) or made ready again (false) through the admin API.
    pub fn set_admin_drain(&self, drain: bool) {
        self.set_drain(|d| d.admin = drain);
    }

    /// The wave a tunnel opened now watches.
    pub fn wave(&self) -> Arc<Wave> {
        self.drain_state().wave.clone()
    }

    /// Starts closing this backend's tunnels once it has drained for
    /// `drain_timeout` (again, one spread later, for any the wave missed). Returns
    /// how many it told to close.
    pub fn drain_tick(&self, now: Instant, timeout: Duration, spread: Duration) -> Option<u64> {
        let mut drain = self.drain_state();
        let since = drain.since?;
        let active = self.active();
        if active == 0 || now < since + timeout {
            return None;
        }
        if let Some(started) = drain.started
            && now < started + spread + Duration::from_secs(1)
        {
            return None;
        }
        let fresh = Wave::drain(&drain.root);
        let wave = std::mem::replace(&mut drain.wave, fresh);
        wave.start(active, spread);
        drain.started = Some(now);
        Some(active)
    }

    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }

    pub fn remote(&self) -> u64 {
        self.remote.load(Ordering::Relaxed)
    }

    pub fn set_remote(&self, connections: u64) {
        self.remote.store(connections, Ordering::Relaxed);
    }

    /// Cluster-wide connections: this instance's exact count plus the others'.
    pub fn load(&self) -> u64 {
        self.active().saturating_add(self.remote())
    }

    /// What a pick weighs: the load, plus the picks of this instance that each
    /// other instance is assumed to have mirrored (a burst reaches them too)
    /// since its last announcement that reached here, as far as this instance
    /// was not behind it in the burst then.
    fn pick_load(&self) -> u64 {
        self.pick_load_at(epoch_ms())
    }

    /// [`Backend::pick_load`] at `now` (ms since the epoch).
    fn pick_load_at(&self, now: u64) -> u64 {
        let peers = &self.peers;
        let others = peers.others.load(Ordering::Relaxed);
        if others == 0 {
            return self.load();
        }
        let oldest = now.saturating_sub(BURST_MEMORY_MS);
        let mut mirrored = 0u64;
        let slots = peers.known_until.iter().zip(&peers.known_recent);
        for (slot, (until, theirs)) in slots.enumerate() {
            let until = until.load(Ordering::Relaxed);
            if until == u64::MAX {
                continue;
            }
            let since = until.max(oldest);
            let mut recent = self.recent.since(since);
            let theirs = theirs.load(Ordering::Relaxed);
            if recent > 0 && theirs != u64::MAX && until >= oldest + BURST_LEAD_MS {
                // Of this instance's picks since then, the share by which it has
                // gone beyond that instance, counting picks from BURST_LEAD_MS
                // before it spoke: its up to then, this one's up to now.
                let mine = peers.picks.since(until - BURST_LEAD_MS);
                let after = peers.picks.since(since).max(1);
                let owed = mine.saturating_sub(theirs).min(after);
                recent = (recent * owed + after / 2) / after;
            }
            // The last slot stands for every instance beyond the others.
            let times = if slot + 1 == PEER_SLOTS {
                others.saturating_sub(PEER_SLOTS as u64 - 1).max(1)
            } else {
                1
            };
            mirrored = mirrored.saturating_add(recent.saturating_mul(times));
        }
        self.load().saturating_add(mirrored)
    }

    /// Remembers a pick made in a burst (other upgrades in flight beside it), when
    /// there are other instances to mirror it.
    fn note_pick(&self) {
        self.note_pick_at(epoch_ms());
    }

    fn note_pick_at(&self, now: u64) {
        if self.peers.others.load(Ordering::Relaxed) == 0
            || self.peers.in_flight.load(Ordering::Relaxed) < 2
        {
            return;
        }
        self.recent.note(now);
        self.peers.picks.note(now);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Not draining and not full.
    fn available(&self) -> bool {
        !self.is_draining() && !self.is_full()
    }

    /// Holds its `max_connections` (cluster-wide) already.
    pub fn is_full(&self) -> bool {
        let max = self.max_connections.load(Ordering::Relaxed);
        max != 0 && self.load() >= max
    }

    /// Can take new connections by preference: healthy, not ejected, not draining.
    pub fn ready(&self) -> bool {
        self.available() && self.is_healthy()
    }
}

/// FNV-1a, 64 bits: small, stable across versions and processes.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// What a pick is for: each is balanced on its own count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Traffic {
    /// A WebSocket upgrade and its tunnel.
    Tunnel,
    /// One proxied plain HTTP request.
    Http,
}

/// Holds one unit of a backend's count; dropping it gives the unit back.
#[derive(Debug)]
pub struct ConnGuard {
    backend: Arc<Backend>,
    traffic: Traffic,
}

impl ConnGuard {
    fn new(backend: Arc<Backend>, traffic: Traffic) -> ConnGuard {
        match traffic {
            Traffic::Tunnel => {
                backend.active.fetch_add(1, Ordering::Relaxed);
                backend.changed.touch();
            }
            Traffic::Http => {
                backend.http_active.fetch_add(1, Ordering::Relaxed);
            }
        }
        ConnGuard { backend, traffic }
    }

    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        match self.traffic {
            Traffic::Tunnel => {
                self.backend.active.fetch_sub(1, Ordering::Relaxed);
                self.backend.changed.touch();
            }
            Traffic::Http => {
                self.backend.http_active.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

/// A named set of backends with the settings its tunnels use.
#[derive(Debug)]
pub struct Pool {
    pub name: String,
    pub backends: Vec<Arc<Backend>>,
    pub settings: PoolConfig,
    /// This instance's share of `max_upgrade_rate`, when the pool has one.
    pub admission: Option<Admission>,
    /// The rustls client config of `[pool.NAME.tls]` (built once, with the pool).
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// A token bucket holding this instance's share of a pool's `max_upgrade_rate`:
/// the rate divided by the live instances (as of the last heartbeat), with a
/// burst of [`defaults::UPGRADE_BURST`] of it. Never a Redis call.
///
/// [`defaults::UPGRADE_BURST`]: crate::config::defaults::UPGRADE_BURST
#[derive(Debug)]
pub struct Admission {
    rate: u32,
    /// Tokens, and when they were last counted.
    bucket: Mutex<(f64, Instant)>,
}

impl Admission {
    pub fn new(rate: u32) -> Admission {
        Admission {
            rate,
            bucket: Mutex::new((1.0, Instant::now())),
        }
    }

    /// Takes one upgrade's token; false when there is none left now.
    pub fn admit(&self, instances: usize) -> bool {
        let share = f64::from(self.rate) / instances.max(1) as f64;
        let burst = (share * crate::config::defaults::UPGRADE_BURST.as_secs_f64()).max(1.0);
        let mut bucket = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let (tokens, last) = *bucket;
        let tokens = (tokens + share * (now - last).as_secs_f64()).min(burst);
        let (left, admitted) = if tokens >= 1.0 {
            (tokens - 1.0, true)
        } else {
            (tokens, false)
        };
        *bucket = (left, now);
        admitted
    }
}

impl Pool {
    /// Builds a pool, taking over the backends (and so their counts) that `previous`
    /// already had at the same address, with the new weight. Backends `previous`
    /// had that the config no longer lists stay, draining, while they have tunnels.
    pub fn new(name: &str, settings: &PoolConfig, previous: Option<&Pool>, env: &Env) -> Pool {
        let mut backends: Vec<Arc<Backend>> = settings
            .backends
            .iter()
            .map(|config| {
                let Some(b) = previous.and_then(|p| p.backend(&config.addr)) else {
                    let added = Backend::new(config, env);
                    if previous.is_some() {
                        // Added by a reload: it starts slowly (where the pool says so).
                        added.start_slow();
                    }
                    return Arc::new(added);
                };
                b.weight.store(config.weight.get(), Ordering::Relaxed);
                b.max_connections
                    .store(config.max_connections.unwrap_or(0), Ordering::Relaxed);
                b.set_drain(|d| {
                    d.removed = false;
                    d.configured = config.drain;
                });
                if settings.health.is_none() {
                    // Nothing checks it any more: it counts as healthy.
                    b.set_healthy(true);
                    b.streak.store(0, Ordering::Relaxed);
                }
                b.clone()
            })
            .collect();
        if let Some(previous) = previous {
            let leaving: Vec<Arc<Backend>> = previous
                .backends
                .iter()
                .filter(|b| !settings.backends.iter().any(|c| c.addr == b.addr))
                .filter(|b| {
                    b.set_removed(true);
                    b.active() > 0
                })
                .cloned()
                .collect();
            backends.extend(leaving);
        }
        Pool {
            name: name.to_string(),
            backends,
            settings: settings.clone(),
            admission: settings.max_upgrade_rate.map(Admission::new),
            tls: settings.tls.as_ref().and_then(|t| match crate::tls::client_config(t) {
                Ok(config) => Some(config),
                Err(e) => {
                    // Validation loaded it already; it changed on disk since.
                    tracing::error!(pool = name, error = %crate::Chain(&e), "backend TLS unusable");
                    None
                }
            }),
        }
    }

    /// What is left of a pool the config no longer has: its backends that still
    /// have tunnels, draining; `None` once there are none.
    pub fn remnant(previous: &Pool) -> Option<Pool> {
        let backends: Vec<Arc<Backend>> = previous
            .backends
            .iter()
            .filter(|b| {
                b.set_removed(true);
                b.active() > 0
            })
            .cloned()
            .collect();
        (!backends.is_empty()).then(|| Pool {
            name: previous.name.clone(),
            backends,
            settings: previous.settings.clone(),
            admission: None,
            tls: previous.tls.clone(),
        })
    }

    /// The backend at `addr`, configured or leaving.
    pub fn backend(&self, addr: &BackendAddr) -> Option<&Arc<Backend>> {
        self.backends.iter().find(|b| b.addr == *addr)
    }

    /// Whether a leaving backend has no tunnel left, so the pool can be rebuilt
    /// without it.
    pub fn has_finished_leavers(&self) -> bool {
        self.backends
            .iter()
            .any(|b| b.active() == 0 && b.is_removed())
    }

    /// Picks the available backend with the fewest cluster-wide connections (this
    /// instance's exact count plus the others' published ones) per unit of weight,
    /// skipping those in `tried`; a uniformly random one among ties. Healthy
    /// backends first; only when none is healthy are ejected ones tried (health
    /// may be stale, a refused connect costs less than a certain 503). The returned
    /// guard already counts the new connection, so concurrent picks see it.
    pub fn pick(&self, tried: &[usize], rng: &mut fastrand::Rng) -> Option<(usize, ConnGuard)> {
        let i = self
            .choose(tried, rng, Backend::ready, Traffic::Tunnel)
            .or_else(|| self.choose(tried, rng, Backend::available, Traffic::Tunnel))?;
        self.backends[i].note_pick();
        Some((i, ConnGuard::new(self.backends[i].clone(), Traffic::Tunnel)))
    }

    /// The same for one plain HTTP request, balanced over HTTP requests in flight
    /// plus the connections each backend holds (not counted as a connection).
    pub fn pick_http(
        &self,
        tried: &[usize],
        rng: &mut fastrand::Rng,
    ) -> Option<(usize, ConnGuard)> {
        let i = self
            .choose(tried, rng, Backend::ready, Traffic::Http)
            .or_else(|| self.choose(tried, rng, Backend::available, Traffic::Http))?;
        Some((i, ConnGuard::new(self.backends[i].clone(), Traffic::Http)))
    }

    /// Takes backend `i` (a sticky placement) when it can take a connection now.
    pub fn take(&self, i: usize, traffic: Traffic) -> Option<ConnGuard> {
        let backend = self.backends.get(i)?;
        (backend.ready()).then(|| {
            if traffic == Traffic::Tunnel {
                backend.note_pick();
            }
            ConnGuard::new(backend.clone(), traffic)
        })
    }

    /// The least loaded eligible backend; one in slow start takes only its share
    /// of the picks it wins, and the next least loaded gets the others.
    fn choose(
        &self,
        tried: &[usize],
        rng: &mut fastrand::Rng,
        eligible: fn(&Backend) -> bool,
        traffic: Traffic,
    ) -> Option<usize> {
        let best = self.least_loaded(tried, rng, eligible, traffic)?;
        let backend = &self.backends[best];
        if let Some(window) = self.settings.slow_start
            && let Some(share) = backend.slow_share(window)
            && !backend.take_slow_pick(share)
        {
            let mut skip = tried.to_vec();
            skip.push(best);
            // Diverted only to a backend that is not starting slowly itself.
            if let Some(other) = self.least_loaded(&skip, rng, eligible, traffic)
                && self.backends[other].slow_share(window).is_none()
            {
                return Some(other);
            }
        }
        Some(best)
    }

    fn least_loaded(
        &self,
        tried: &[usize],
        rng: &mut fastrand::Rng,
        eligible: fn(&Backend) -> bool,
        traffic: Traffic,
    ) -> Option<usize> {
        let mut best: Option<usize> = None;
        let mut ties = 0u32;
        for (i, backend) in self.backends.iter().enumerate() {
            if !eligible(backend) || tried.contains(&i) {
                continue;
            }
            let Some(current) = best else {
                best = Some(i);
                ties = 1;
                continue;
            };
            match compare_load(backend, &self.backends[current], traffic) {
                std::cmp::Ordering::Less => {
                    best = Some(i);
                    ties = 1;
                }
                std::cmp::Ordering::Equal => {
                    // Reservoir sampling: each of the k tied backends ends up chosen
                    // with probability 1/k.
                    ties += 1;
                    if rng.u32(0..ties) == 0 {
                        best = Some(i);
                    }
                }
                std::cmp::Ordering::Greater => {}
            }
        }
        best
    }
}

/// Compares load/weight of two backends without division: a/wa < b/wb ⇔ a·wb < b·wa.
fn compare_load(a: &Backend, b: &Backend, traffic: Traffic) -> std::cmp::Ordering {
    let load = |x: &Backend| match traffic {
        Traffic::Tunnel => x.pick_load(),
        // A plain request often opens a session (Socket.IO polling, then its
        // WebSocket): weigh the connections held as well as requests in flight.
        Traffic::Http => x.http_active.load(Ordering::Relaxed) + x.active(),
    };
    let left = u128::from(load(a)) * u128::from(b.weight());
    let right = u128::from(load(b)) * u128::from(a.weight());
    left.cmp(&right)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;

    fn pool(weights: &[u32]) -> Pool {
        let backends = weights
            .iter()
            .enumerate()
            .map(|(i, w)| BackendConfig {
                addr: BackendAddr::parse(&format!("127.0.0.1:{}", 9000 + i)).unwrap(),
                weight: NonZeroU32::new(*w).unwrap(),
                drain: false,
                max_connections: None,
            })
            .collect();
        let settings = PoolConfig::with_backends(backends);
        Pool::new("p", &settings, None, &Env::default())
    }

    #[test]
    fn weighted_least_connections_is_exact() {
        let pool = pool(&[1, 2, 3]);
        let mut rng = fastrand::Rng::with_seed(7);
        let guards: Vec<_> = (0..600)
            .map(|_| pool.pick(&[], &mut rng).unwrap().1)
            .collect();
        let counts: Vec<u64> = pool.backends.iter().map(|b| b.active()).collect();
        assert_eq!(counts, vec![100, 200, 300]);
        drop(guards);
        assert!(pool.backends.iter().all(|b| b.active() == 0));
    }

    #[test]
    fn ties_are_broken_at_random() {
        let pool = pool(&[1, 1, 1]);
        let mut firsts = [0u32; 3];
        for seed in 0..300 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let (i, _guard) = pool.pick(&[], &mut rng).unwrap();
            firsts[i] += 1;
        }
        assert!(firsts.iter().all(|n| *n > 60), "{firsts:?}");
    }

    #[test]
    fn skips_tried_and_draining_backends() {
        let pool = pool(&[1, 1, 1]);
        let mut rng = fastrand::Rng::with_seed(1);
        pool.backends[1].set_admin_drain(true);
        let (i, _g) = pool.pick(&[0], &mut rng).unwrap();
        assert_eq!(i, 2);
        assert!(pool.pick(&[0, 2], &mut rng).is_none());
        assert!(self::pool(&[]).pick(&[], &mut rng).is_none());
    }

    #[test]
    fn unhealthy_backends_are_tried_only_when_none_is_healthy() {
        let pool = pool(&[1, 1]);
        let mut rng = fastrand::Rng::with_seed(2);
        pool.backends[0].set_healthy(false);
        for _ in 0..5 {
            assert_eq!(pool.pick(&[], &mut rng).unwrap().0, 1);
        }
        pool.backends[1].set_healthy(false);
        assert!(pool.pick(&[], &mut rng).is_some());
    }

    #[test]
    fn remote_counts_join_the_score() {
        // Another instance holds 50 on backend 0: the next 100 go 0/50/50.
        let pool = pool(&[1, 1, 1]);
        pool.backends[0].set_remote(50);
        let mut rng = fastrand::Rng::with_seed(11);
        let _guards: Vec<_> = (0..100)
            .map(|_| pool.pick(&[], &mut rng).unwrap().1)
            .collect();
        let local: Vec<u64> = pool.backends.iter().map(|b| b.active()).collect();
        assert_eq!(local, vec![0, 50, 50]);
    }

    #[test]
    fn remote_counts_are_divided_by_weight() {
        // Loads 30/1, 50/2, 90/3 = 30, 25, 30: backend 1 is least loaded.
        let pool = pool(&[1, 2, 3]);
        for (b, remote) in pool.backends.iter().zip([30, 50, 90]) {
            b.set_remote(remote);
        }
        let mut rng = fastrand::Rng::with_seed(5);
        assert_eq!(pool.pick(&[], &mut rng).unwrap().0, 1);
        // 60 more: loads converge to equal per weight, 30+n0 = (50+n1)/2 = (90+n2)/3.
        let _guards: Vec<_> = (0..60)
            .map(|_| pool.pick(&[], &mut rng).unwrap().1)
            .collect();
        let loads: Vec<u64> = pool.backends.iter().map(|b| b.load()).collect();
        assert_eq!(loads.iter().sum::<u64>(), 230);
        assert!(
            loads[0].abs_diff(38) <= 1 && loads[1].abs_diff(77) <= 1 && loads[2].abs_diff(115) <= 1,
            "{loads:?}"
        );
    }

    #[test]
    fn only_picks_after_an_announcement_are_mirrored() {
        // Buckets 200 (10 picks, ms 1000-1004), 201 (4), 199 (7, before).
        let buckets = [(199, 7), (200, 10), (201, 4)];
        // Heard at ms 1003: 2 of bucket 200's 5 ms are after it.
        assert_eq!(picks_since(1003, buckets.into_iter()), 4 + 4);
        assert_eq!(picks_since(1000, buckets.into_iter()), 10 + 4);
        assert_eq!(picks_since(1004, buckets.into_iter()), 2 + 4);
        assert_eq!(picks_since(1005, buckets.into_iter()), 4);
        assert_eq!(picks_since(1010, buckets.into_iter()), 0);
        assert_eq!(picks_since(990, buckets.into_iter()), 21);
    }

    /// The burst rule, at set times: a peer heard from (no heartbeat needed) is
    /// assumed to mirror this instance's picks made after it spoke, except those
    /// by which this instance is behind it in the burst.
    #[test]
    fn a_peer_ahead_in_a_burst_is_not_assumed_to_mirror_the_picks_that_catch_up() {
        let t = 1_000_000;
        let pool = pool(&[1]);
        let backend = &pool.backends[0];
        let peers = &backend.peers;
        // Upgrades in flight beside each other: a burst.
        let _in_flight = [InFlight::new(peers), InFlight::new(peers)];
        // Before anyone is heard from, a pick is this instance's alone (and not
        // remembered for the rule).
        backend.note_pick_at(t);
        assert_eq!(backend.pick_load_at(t + 1), 0);
        // The peer spoke at t + 10 having made 30 picks in the 20 ms before; this
        // instance then made 10, at t + 15 (a bucket after the one it spoke in).
        peers.heard("b", t + 10, Some(30));
        for _ in 0..10 {
            backend.note_pick_at(t + 15);
        }
        // 10 picks since t - 10 against its 30: behind, so none is mirrored.
        assert_eq!(backend.pick_load_at(t + 16), 0);
        // 40 more: 50 against 30, the 20 beyond it are.
        for _ in 0..40 {
            backend.note_pick_at(t + 20);
        }
        assert_eq!(backend.pick_load_at(t + 21), 20);
        // A peer that had made none: every pick after it spoke is mirrored.
        peers.heard("b", t + 10, Some(0));
        assert_eq!(backend.pick_load_at(t + 21), 50);
        // An instance of a version that does not say: the same.
        peers.heard("b", t + 10, None);
        assert_eq!(backend.pick_load_at(t + 21), 50);
        // Once it speaks after the picks, they are known, not assumed.
        peers.heard("b", t + 25, Some(0));
        assert_eq!(backend.pick_load_at(t + 26), 0);
        // Long after, nothing of the burst is assumed any more.
        peers.heard("b", t + 10, Some(0));
        assert_eq!(backend.pick_load_at(t + 25 + BURST_MEMORY_MS), 0);
    }

    #[test]
    fn the_emptied_backend_takes_the_next_connections() {
        let pool = pool(&[1, 1, 1]);
        let mut rng = fastrand::Rng::with_seed(3);
        let mut guards: Vec<_> = (0..30).map(|_| pool.pick(&[], &mut rng).unwrap()).collect();
        guards.retain(|(i, _)| *i != 1);
        for _ in 0..10 {
            let (i, g) = pool.pick(&[], &mut rng).unwrap();
            assert_eq!(i, 1);
            guards.push((i, g));
        }
    }
}

//! Drains and rebalancing: the task that closes a draining backend's tunnels once
//! the pool's `drain_timeout` has passed (1012, spread over `drain_spread`, see
//! `closing`), drops leaving backends and pools from the snapshot once their last
//! tunnel has ended, and moves tunnels off backends that hold more than their
//! share (`[pool.NAME.rebalance]`).
//!
//! Rebalancing, per pool and tick: with `mean` the pool's connections per unit of
//! weight across the cluster, a backend over `threshold × mean` starts shedding
//! and sheds until it is back within [`SHED_TO`] of the mean (hysteresis, so the
//! imbalance does not hover at the threshold). Each shed is one nudge to its
//! longest-waiting (oldest) tunnel, which closes with 1012 if it is at least
//! `min_age` old; its client reconnects and least-connections places it on a
//! lighter backend. The pool's `rate` is shared by the instances in proportion
//! to their own tunnels on the shedding backends, so the cluster as a whole stays
//! within it without asking Redis anything.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::balancer::{Backend, Pool};
use crate::config::RebalanceConfig;
use crate::state::{Snapshot, State};

/// A shedding backend sheds until its connections per weight are at most this
/// much over the mean.
pub const SHED_TO: f64 = 1.05;

/// How often drains and rebalancing are looked at: the precision of
/// `drain_timeout`, and the spacing of rebalance closes (a budget spent every
/// 20 ms keeps any one-second window within the rate plus one).
const TICK: Duration = Duration::from_millis(20);

/// Runs until `stop`. Ticks only while a backend drains with tunnels left, a
/// leaver waits to be dropped or a pool rebalances; otherwise it sleeps until a
/// drain starts or a new snapshot is stored, so an idle gateway is not woken.
pub async fn run(state: Arc<State>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut rebalancing: HashMap<String, Rebalancing> = HashMap::new();
    loop {
        if !has_work(&state.load()) {
            // A rebalancing resumed later starts with no budget saved up.
            rebalancing.clear();
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = state.drains().notified() => {}
            }
            tick.reset_immediately();
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = Instant::now();
        step(&state, now);
        let snapshot = state.load();
        rebalancing.retain(|name, _| snapshot.pools.contains_key(name));
        for pool in snapshot.pools.values() {
            let Some(config) = rebalance(pool) else {
                rebalancing.remove(&pool.name);
                continue;
            };
            rebalancing
                .entry(pool.name.clone())
                .or_insert_with(|| Rebalancing::new(now))
                .tick(pool, config, now);
        }
    }
}

/// Whether anything needs the drain task's ticks: a draining backend that still
/// has tunnels (its wave is yet to start, or to be repeated), a leaver with none
/// left (to be dropped), a pool that rebalances.
fn has_work(snapshot: &Snapshot) -> bool {
    snapshot.pools.values().any(|pool| {
        rebalance(pool).is_some()
            || pool.has_finished_leavers()
            || pool
                .backends
                .iter()
                .any(|b| b.is_draining() && b.active() > 0)
    })
}

/// The pool's rebalancing, if it has one that applies: sticky pools place by key
/// or cookie, so moving their tunnels would only bring them back.
fn rebalance(pool: &Pool) -> Option<&RebalanceConfig> {
    pool.settings
        .rebalance
        .as_ref()
        .filter(|_| pool.settings.sticky.is_none())
}

/// One pool's rebalancing between ticks.
#[derive(Debug)]
pub struct Rebalancing {
    /// Closes this instance may still make (fractions carry over).
    budget: f64,
    /// Backends (by address) shedding until they are back near the mean.
    shedding: HashSet<String>,
    last: Instant,
}

impl Rebalancing {
    pub fn new(now: Instant) -> Rebalancing {
        Rebalancing {
            budget: 0.0,
            shedding: HashSet::new(),
            last: now,
        }
    }

    /// Nudges as many tunnels off overloaded backends as this instance's share
    /// of the rate allows now; returns how many.
    pub fn tick(&mut self, pool: &Pool, config: &RebalanceConfig, now: Instant) -> u32 {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        let serving: Vec<&Arc<Backend>> =
            pool.backends.iter().filter(|b| !b.is_draining()).collect();
        let load: u64 = serving.iter().map(|b| b.load()).sum();
        let weight: u64 = serving.iter().map(|b| u64::from(b.weight())).sum();
        if load == 0 || weight == 0 || serving.len() < 2 {
            self.shedding.clear();
            self.budget = 0.0;
            return 0;
        }
        let mean = load as f64 / weight as f64;
        let per_weight = |b: &Backend| b.load() as f64 / f64::from(b.weight().max(1));
        for b in &serving {
            let key = b.addr.to_string();
            if per_weight(b) > config.threshold * mean {
                self.shedding.insert(key);
            } else if per_weight(b) <= SHED_TO * mean {
                self.shedding.remove(&key);
            }
        }
        let shedding: Vec<&&Arc<Backend>> = serving
            .iter()
            .filter(|b| self.shedding.contains(&b.addr.to_string()))
            .collect();
        let cluster: u64 = shedding.iter().map(|b| b.load()).sum();
        let local: u64 = shedding.iter().map(|b| b.active()).sum();
        if cluster == 0 || local == 0 {
            self.budget = 0.0;
            return 0;
        }
        // This instance's share of the pool's rate, by its share of the tunnels
        // to move. Less than one close is carried over, so no second sees more
        // than its share plus one.
        // 95% of it: the rate is a ceiling, and timing jitter between instances
        // and ticks must not push a second over it.
        let share = 0.95 * f64::from(config.rate) * local as f64 / cluster as f64;
        self.budget += share * elapsed;
        let mut nudged = 0;
        while self.budget >= 1.0 {
            let Some(most) = shedding
                .iter()
                .filter(|b| b.active() > 0)
                .max_by(|a, b| per_weight(a).total_cmp(&per_weight(b)))
            else {
                break;
            };
            most.wave().nudge(config.min_age);
            self.budget -= 1.0;
            nudged += 1;
        }
        self.budget = self.budget.min(1.0);
        nudged
    }
}

/// Starts the waves that are due, then prunes what has finished leaving.
pub fn step(state: &State, now: Instant) {
    let snapshot = state.load();
    for pool in snapshot.pools.values() {
        let settings = &pool.settings;
        for backend in &pool.backends {
            if let Some(tunnels) =
                backend.drain_tick(now, settings.drain_timeout, settings.drain_spread)
            {
                tracing::info!(
                    pool = %pool.name,
                    backend = %backend.addr,
                    tunnels,
                    spread = ?settings.drain_spread,
                    "drain: closing the backend's tunnels with 1012"
                );
            }
        }
    }
    state.prune();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn state() -> Arc<State> {
        let text = r#"
[server]
listen = ["127.0.0.1:0"]
[[route]]
path = "/"
pool = "p"
[pool.p]
backends = [{ addr = "127.0.0.1:1" }, { addr = "127.0.0.1:2" }]
drain_timeout = "5s"
"#;
        Arc::new(State::new(&Config::parse(text, "t.toml").expect("valid")))
    }

    /// Lets the spawned task run what is due now (bounded).
    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_started_while_the_task_sleeps_closes_at_its_timeout() {
        let state = state();
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(state.clone(), stop.clone()));
        // Nothing drains or rebalances: the task sleeps through this.
        tokio::time::advance(Duration::from_secs(60)).await;
        settle().await;
        let pool = state.load().pools["p"].clone();
        let mut rng = fastrand::Rng::with_seed(1);
        let (index, _tunnel) = pool.pick(&[], &mut rng).expect("a backend");
        let backend = pool.backends[index].clone();
        let wave = backend.wave();
        backend.set_admin_drain(true);
        tokio::time::advance(Duration::from_millis(4900)).await;
        settle().await;
        assert!(!wave.is_started(), "closed before drain_timeout");
        tokio::time::advance(Duration::from_millis(200)).await;
        settle().await;
        assert!(wave.is_started(), "not closed at drain_timeout");
        stop.cancel();
        task.await.expect("drain task");
    }

    #[test]
    fn only_drains_with_tunnels_leavers_and_rebalancing_need_ticks() {
        let state = state();
        assert!(!has_work(&state.load()), "nothing to do");
        let pool = state.load().pools["p"].clone();
        pool.backends[0].set_admin_drain(true);
        assert!(
            !has_work(&state.load()),
            "a drained backend without tunnels"
        );
        let mut rng = fastrand::Rng::with_seed(1);
        let tunnel = pool.pick(&[], &mut rng).expect("a backend");
        pool.backends[1].set_admin_drain(true);
        assert!(has_work(&state.load()), "a drained backend with a tunnel");
        drop(tunnel);
        assert!(!has_work(&state.load()), "its tunnel ended");
        let text = "[server]\nlisten = [\"127.0.0.1:0\"]\n[[route]]\npath = \"/\"\npool = \"p\"\n\
                    [pool.p]\nbackends = [{ addr = \"127.0.0.1:1\" }, { addr = \"127.0.0.1:2\" }]\n\
                    [pool.p.rebalance]\n";
        state.reload(&Config::parse(text, "t.toml").expect("valid"));
        assert!(has_work(&state.load()), "a rebalancing pool");
    }
}

//! Drains: the task that closes a draining backend's tunnels once the pool's
//! `drain_timeout` has passed (1012, spread over `drain_spread`, see `closing`),
//! and drops leaving backends and pools from the snapshot once their last tunnel
//! has ended.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::state::State;

/// How often drains are looked at: the precision of `drain_timeout`.
const TICK: Duration = Duration::from_millis(100);

/// Runs until `stop`.
pub async fn run(state: Arc<State>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        step(&state, Instant::now());
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

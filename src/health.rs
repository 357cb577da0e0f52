//! Backend health: active checks (a TCP connect, or `GET path` answering 2xx) and
//! passive results (connects that fail on the upgrade path), with hysteresis: a
//! backend is ejected after `unhealthy_after` consecutive failures and returns
//! after `healthy_after` consecutive successful checks. Each flip is logged once.
//! Pools without `[pool.NAME.health]` are not checked: their backends count as
//! healthy.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;

use crate::balancer::Backend;
use crate::config::{BackendAddr, HealthConfig};
use crate::state::State;

/// Records one result for `backend` and flips its health when the streak is long
/// enough.
pub fn record(pool: &str, backend: &Backend, ok: bool, config: &HealthConfig) {
    let previous = backend
        .streak
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
            Some(if ok {
                s.max(0).saturating_add(1)
            } else {
                s.min(0).saturating_sub(1)
            })
        })
        .unwrap_or(0);
    let streak = if ok {
        previous.max(0).saturating_add(1)
    } else {
        previous.min(0).saturating_sub(1)
    };
    let healthy = backend.is_healthy();
    if healthy && !ok && streak.unsigned_abs() >= config.unhealthy_after {
        backend.set_healthy(false);
        tracing::warn!(pool, backend = %backend.addr, failures = streak.unsigned_abs(), "backend ejected: unhealthy");
    } else if !healthy && ok && streak.unsigned_abs() >= config.healthy_after {
        backend.set_healthy(true);
        tracing::info!(pool, backend = %backend.addr, successes = streak, "backend healthy again");
    }
}

/// One check of one backend.
async fn check(addr: &BackendAddr, config: &HealthConfig) -> bool {
    let attempt = async {
        let mut stream = match addr {
            BackendAddr::Ip(a) => TcpStream::connect(*a).await?,
            BackendAddr::Name { host, port } => TcpStream::connect((host.as_str(), *port)).await?,
        };
        let Some(path) = &config.path else {
            return Ok::<bool, std::io::Error>(true);
        };
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: wsgate-health\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await?;
        // "HTTP/1.1 2xx"
        Ok(head.starts_with(b"HTTP/1.") && head[9] == b'2')
    };
    matches!(timeout(config.timeout, attempt).await, Ok(Ok(true)))
}

/// Checks every pool that has health checks, each at its own interval, until
/// `stop`. Follows reloads: each round reads the current snapshot.
pub async fn run(state: Arc<State>, stop: CancellationToken) {
    let mut due: HashMap<String, Instant> = HashMap::new();
    loop {
        let now = Instant::now();
        let snapshot = state.load();
        let mut next = now + Duration::from_secs(1);
        let mut round = tokio::task::JoinSet::new();
        for pool in snapshot.pools.values() {
            let Some(config) = pool.settings.health.clone() else {
                continue;
            };
            let at = *due.entry(pool.name.clone()).or_insert(now);
            if at <= now {
                due.insert(pool.name.clone(), now + config.interval);
                next = next.min(now + config.interval);
                for backend in &pool.backends {
                    let (backend, config, name) =
                        (backend.clone(), config.clone(), pool.name.clone());
                    round.spawn(async move {
                        let ok = check(&backend.addr, &config).await;
                        record(&name, &backend, ok, &config);
                    });
                }
            } else {
                next = next.min(at);
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = async { while round.join_next().await.is_some() {} } => {}
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep_until(next) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BackendConfig;
    use std::num::NonZeroU32;

    #[test]
    fn flips_only_after_the_streak() {
        let backend = Backend::new(&BackendConfig {
            addr: BackendAddr::parse("127.0.0.1:1").unwrap(),
            weight: NonZeroU32::MIN,
        });
        let config = HealthConfig {
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            path: None,
            unhealthy_after: 3,
            healthy_after: 2,
        };
        for ok in [false, false, true, false, false] {
            record("p", &backend, ok, &config);
        }
        assert!(backend.is_healthy(), "a success broke the streak");
        record("p", &backend, false, &config);
        assert!(!backend.is_healthy());
        record("p", &backend, true, &config);
        assert!(!backend.is_healthy());
        record("p", &backend, true, &config);
        assert!(backend.is_healthy());
    }
}

//! Backend health: active checks (a TCP connect, or `GET path` answering 2xx) and
//! passive results (connects that fail on the upgrade path), with hysteresis: a
//! backend is ejected after `unhealthy_after` consecutive failures and returns
//! after `healthy_after` consecutive successful checks. Only a passing check
//! re-admits: a backend that accepts TCP but fails its HTTP check stays out.
//! Each flip is logged once. Pools without `[pool.NAME.health]` are not checked:
//! their backends count as healthy.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;

use crate::config::{BackendAddr, HealthConfig};
use crate::state::State;

/// One check of one backend.
async fn check(addr: &BackendAddr, config: &HealthConfig) -> bool {
    let attempt = async {
        let stream = crate::upstream::connect(addr).await.ok()?;
        let Some(path) = &config.path else {
            return Some(true);
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .ok()?;
        let request = http::Request::get(path.as_str())
            .header(http::header::HOST, addr.to_string())
            .header(http::header::USER_AGENT, "wsgate-health")
            .body(Empty::<Bytes>::new())
            .ok()?;
        let send = sender.send_request(request);
        tokio::pin!(conn);
        // The connection is driven here; it ending before the answer is a failure.
        let response = tokio::select! {
            response = send => response.ok()?,
            _ = &mut conn => return Some(false),
        };
        Some(response.status().is_success())
    };
    matches!(timeout(config.timeout, attempt).await, Ok(Some(true)))
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
                        backend.record_check(&name, ok, &config);
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
    use crate::balancer::Backend;
    use crate::config::BackendConfig;
    use std::num::NonZeroU32;

    #[test]
    fn passive_successes_do_not_readmit() {
        let backend = Backend::new(&BackendConfig {
            addr: BackendAddr::parse("127.0.0.1:1").unwrap(),
            weight: NonZeroU32::MIN,
        });
        let config = HealthConfig {
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            path: Some("/health".into()),
            unhealthy_after: 1,
            healthy_after: 1,
        };
        backend.record_check("p", false, &config);
        assert!(!backend.is_healthy());
        backend.record_failure("p", &config);
        assert!(!backend.is_healthy());
        backend.record_check("p", true, &config);
        assert!(backend.is_healthy());
    }

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
            backend.record_check("p", ok, &config);
        }
        assert!(backend.is_healthy(), "a success broke the streak");
        backend.record_check("p", false, &config);
        assert!(!backend.is_healthy());
        backend.record_check("p", true, &config);
        assert!(!backend.is_healthy());
        backend.record_check("p", true, &config);
        assert!(backend.is_healthy());
    }
}

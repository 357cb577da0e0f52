//! Backend health: active checks (a TCP connect, `GET path` answering 2xx, or a
//! WebSocket upgrade to `path` whose 101 and `Sec-WebSocket-Accept` are right) and
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
use tokio::io::AsyncWriteExt;
use tokio::time::{Instant, timeout_at};
use tokio_util::sync::CancellationToken;

use crate::config::{BackendAddr, CheckKind, HealthConfig, ProxyVersion};
use crate::state::State;

/// One check of one backend: `None` when wsgate itself is out of file descriptors,
/// which says nothing about the backend.
async fn check(
    addr: &BackendAddr,
    config: &HealthConfig,
    proxy: Option<ProxyVersion>,
) -> Option<bool> {
    let deadline = Instant::now() + config.timeout;
    let mut stream = match timeout_at(deadline, crate::upstream::connect(addr)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) if crate::descriptors::exhausted(&e) => {
            crate::descriptors::note("check", &e);
            return None;
        }
        _ => return Some(false),
    };
    let attempt = async {
        if let Some(version) = proxy {
            // A backend behind the PROXY protocol expects it first, on checks
            // too: v1 UNKNOWN, v2 LOCAL (the connection is wsgate's own).
            let header = crate::clients::proxy_header(version, None);
            stream.write_all(&header).await.ok()?;
        }
        let (path, websocket) = match &config.kind {
            CheckKind::Tcp => return Some(true),
            CheckKind::Http { path } => (path, false),
            CheckKind::WebSocket { path } => (path, true),
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .ok()?;
        let key = tokio_tungstenite::tungstenite::handshake::client::generate_key();
        let mut request = http::Request::get(path.as_str())
            .header(http::header::HOST, addr.to_string())
            .header(http::header::USER_AGENT, "wsgate-health");
        if websocket {
            request = request
                .header(http::header::CONNECTION, "Upgrade")
                .header(http::header::UPGRADE, "websocket")
                .header(http::header::SEC_WEBSOCKET_VERSION, "13")
                .header(http::header::SEC_WEBSOCKET_KEY, &key);
        }
        let request = request.body(Empty::<Bytes>::new()).ok()?;
        let send = sender.send_request(request);
        let mut send = std::pin::pin!(send);
        // The connection is driven here. After a 101 it may finish (handing the
        // socket over) in the same poll that delivers the answer: its result is
        // kept, not taken as a failure.
        let mut conn = std::pin::pin!(conn.with_upgrades());
        let mut conn_ended = None;
        let mut response = loop {
            tokio::select! {
                response = &mut send => break response.ok()?,
                ended = &mut conn, if conn_ended.is_none() => conn_ended = Some(ended),
            }
        };
        if !websocket {
            return Some(response.status().is_success());
        }
        let expected = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        let accepted = response.status() == http::StatusCode::SWITCHING_PROTOCOLS
            && response
                .headers()
                .get(http::header::SEC_WEBSOCKET_ACCEPT)
                .is_some_and(|v| v.as_bytes() == expected.as_bytes());
        if !accepted {
            return Some(false);
        }
        // A clean goodbye: close 1000, then FIN.
        let on_upgrade = hyper::upgrade::on(&mut response);
        match conn_ended {
            Some(ended) => ended.ok()?,
            None => conn.await.ok()?,
        }
        let mut upgraded = TokioIo::new(on_upgrade.await.ok()?);
        let (frame, len) = crate::frame::close_frame(1000, Some(fastrand::u32(..).to_be_bytes()));
        upgraded.write_all(&frame[..len]).await.ok()?;
        upgraded.shutdown().await.ok()?;
        Some(true)
    };
    Some(matches!(
        timeout_at(deadline, attempt).await,
        Ok(Some(true))
    ))
}

/// Checks every pool that has health checks, each at its own interval, until
/// `stop`. Follows reloads: each round reads the current snapshot. While no pool
/// has checks it sleeps until a new snapshot.
pub async fn run(state: Arc<State>, stop: CancellationToken) {
    let mut due: HashMap<String, Instant> = HashMap::new();
    let mut stored = state.stored();
    loop {
        let now = Instant::now();
        // Seen before the look, so a snapshot stored after it wakes the wait below.
        stored.borrow_and_update();
        let snapshot = state.load();
        if snapshot.pools.values().all(|p| p.settings.health.is_none()) {
            // No pool has checks: nothing to do until the configuration changes.
            due.clear();
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = stored.changed() => continue,
            }
        }
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
                    let proxy = pool.settings.proxy_protocol;
                    round.spawn(async move {
                        if let Some(ok) = check(&backend.addr, &config, proxy).await {
                            backend.record_check(&name, ok, &config);
                        }
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

    fn backend() -> Backend {
        Backend::new(
            &BackendConfig {
                addr: BackendAddr::parse("127.0.0.1:1").unwrap(),
                weight: NonZeroU32::MIN,
                drain: false,
                max_connections: None,
            },
            &crate::balancer::Env::default(),
        )
    }
    use crate::config::BackendConfig;
    use std::num::NonZeroU32;

    #[test]
    fn passive_successes_do_not_readmit() {
        let backend = backend();
        let config = HealthConfig {
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            kind: CheckKind::Http {
                path: "/health".into(),
            },
            unhealthy_after: 1,
            healthy_after: 1,
        };
        backend.record_check("p", false, &config);
        assert!(!backend.is_healthy());
        let mut pool = crate::config::PoolConfig::with_backends(Vec::new());
        pool.health = Some(config.clone());
        backend.record_attempt("p", false, &pool);
        assert!(!backend.is_healthy());
        // A connect that works says nothing about the HTTP check.
        backend.record_attempt("p", true, &pool);
        assert!(!backend.is_healthy());
        backend.record_check("p", true, &config);
        assert!(backend.is_healthy());
    }

    #[tokio::test(start_paused = true)]
    async fn without_checks_failures_eject_for_fail_timeout() {
        let backend = backend();
        let mut pool = crate::config::PoolConfig::with_backends(Vec::new());
        pool.max_fails = 3;
        pool.fail_timeout = Duration::from_secs(10);
        for _ in 0..2 {
            backend.record_attempt("p", false, &pool);
        }
        assert!(backend.is_healthy(), "two failures are not yet max_fails");
        backend.record_attempt("p", false, &pool);
        assert!(!backend.is_healthy() && !backend.ready());
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(!backend.is_healthy());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(backend.is_healthy(), "tried again after fail_timeout");
        backend.record_attempt("p", false, &pool);
        assert!(!backend.is_healthy(), "the retry failed: out again");
        tokio::time::advance(Duration::from_secs(11)).await;
        backend.record_attempt("p", true, &pool);
        backend.record_attempt("p", false, &pool);
        assert!(backend.is_healthy(), "a success reset the count");
    }

    #[test]
    fn flips_only_after_the_streak() {
        let backend = backend();
        let config = HealthConfig {
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            kind: CheckKind::Tcp,
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

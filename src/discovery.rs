//! Backends from DNS: a pool's `{ dns = "name:port" }` entry stands for every
//! A/AAAA record of the name, each a backend of its own (known by its address,
//! so instances that resolve a moment apart agree on keys). Each name is
//! resolved again every pool's `dns_refresh`, sooner when its records' TTL is
//! shorter. New addresses join; vanished ones drain like a backend removed from
//! the file. A failed resolution keeps the last known set; it is logged once per
//! outage and counted (`wsgate_dns_failures_total`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::defaults;
use crate::metrics as m;
use crate::state::State;

/// How often the task looks for names that are due.
const TICK: Duration = Duration::from_millis(100);
/// Longest wait for one resolution.
const LOOKUP_TIME: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("cannot set up the DNS resolver")]
    Resolver(#[source] hickory_resolver::net::NetError),
}

/// A resolver: the system's configuration, or `[resolver] nameservers`.
pub fn resolver(nameservers: &[SocketAddr]) -> Result<TokioResolver, DiscoveryError> {
    let mut builder = if nameservers.is_empty() {
        TokioResolver::builder_tokio().map_err(DiscoveryError::Resolver)?
    } else {
        let servers = nameservers
            .iter()
            .map(|addr| {
                let mut server = NameServerConfig::udp_and_tcp(addr.ip());
                for connection in &mut server.connections {
                    connection.port = addr.port();
                }
                server
            })
            .collect();
        TokioResolver::builder_with_config(
            ResolverConfig::from_name_servers(servers),
            TokioRuntimeProvider::default(),
        )
    };
    let options = builder.options_mut();
    options.timeout = Duration::from_secs(1);
    options.attempts = 2;
    builder.build().map_err(DiscoveryError::Resolver)
}

/// One name's resolution state.
struct Name {
    due: Instant,
    /// In an outage: logged already.
    failing: bool,
}

/// Resolves every pool's DNS names as they fall due, until `stop`. Follows
/// reloads: names and nameservers are read from the current snapshot. While no
/// pool has a name it sleeps until a new snapshot.
pub async fn run(state: Arc<State>, stop: CancellationToken) {
    let mut names: HashMap<(String, String), Name> = HashMap::new();
    let mut servers: Option<(Vec<SocketAddr>, TokioResolver)> = None;
    let mut stored = state.stored();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        // Seen before the look, so a snapshot stored after it wakes the wait below.
        stored.borrow_and_update();
        let snapshot = state.load();
        let config = &snapshot.config;
        let wanted: Vec<(String, String, u16, Duration)> = config
            .pools
            .iter()
            .flat_map(|(pool, p)| {
                p.dns
                    .iter()
                    .map(move |d| (pool.clone(), d.host.clone(), d.port, p.dns_refresh))
            })
            .collect();
        if wanted.is_empty() {
            // No names to resolve: nothing to do until the configuration changes.
            names.clear();
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = stored.changed() => {}
            }
            tick.reset_immediately();
            continue;
        }
        if servers.as_ref().map(|(n, _)| n) != Some(&config.nameservers) {
            match resolver(&config.nameservers) {
                Ok(r) => servers = Some((config.nameservers.clone(), r)),
                Err(e) => {
                    tracing::error!(error = %crate::Chain(&e), "DNS backends cannot be resolved");
                    continue;
                }
            }
        }
        let Some((_, resolver)) = &servers else {
            continue;
        };
        names.retain(|(pool, name), _| {
            wanted
                .iter()
                .any(|(p, h, port, _)| p == pool && format!("{h}:{port}") == *name)
        });
        let now = Instant::now();
        for (pool, host, port, refresh) in wanted {
            let key = (pool.clone(), format!("{host}:{port}"));
            let entry = names.entry(key.clone()).or_insert(Name {
                due: now,
                failing: false,
            });
            if entry.due > now {
                continue;
            }
            let lookup = tokio::time::timeout(LOOKUP_TIME, resolver.lookup_ip(host.as_str())).await;
            match lookup {
                Ok(Ok(found)) => {
                    let ttl = found
                        .valid_until()
                        .saturating_duration_since(std::time::Instant::now());
                    entry.due = now + refresh.min(ttl).max(defaults::MIN_DNS_REFRESH);
                    if entry.failing {
                        tracing::info!(pool, name = %key.1, "DNS resolves again");
                        entry.failing = false;
                    }
                    let addrs: Vec<SocketAddr> =
                        found.iter().map(|ip| SocketAddr::new(ip, port)).collect();
                    if addrs.is_empty() {
                        failed(&pool, &key.1, entry, refresh, "no address");
                    } else if state.set_resolved(&pool, &key.1, addrs.clone()) {
                        tracing::info!(pool, name = %key.1, ?addrs, "DNS backends changed");
                    }
                }
                Ok(Err(e)) => failed(&pool, &key.1, entry, refresh, &crate::Chain(&e).to_string()),
                Err(_) => failed(&pool, &key.1, entry, refresh, "timed out"),
            }
        }
    }
}

/// A resolution failed: the last known set stays; logged once per outage.
fn failed(pool: &str, name: &str, entry: &mut Name, refresh: Duration, why: &str) {
    entry.due = Instant::now() + refresh;
    metrics::counter!(m::DNS_FAILURES, "pool" => pool.to_string(), "name" => name.to_string())
        .increment(1);
    if !entry.failing {
        tracing::warn!(
            pool,
            name,
            error = why,
            "DNS resolution failed: keeping the last known backends"
        );
        entry.failing = true;
    }
}

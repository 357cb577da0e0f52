//! The run-time view of the configuration: one [`Snapshot`] behind an `ArcSwap`.
//!
//! A reload builds a new snapshot beside the current one, taking over the backends
//! (and their counts) that are still configured, and swaps it in. Connections keep
//! the `Arc` of the snapshot they started with; backends that left the config are
//! marked draining, so they get no new connections while their tunnels finish.

use std::collections::BTreeMap;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::balancer::Pool;
use crate::config::{Config, HostPattern, IdentitySource, ServerConfig};
use crate::metrics::PoolMetrics;

/// One consistent view of routes and pools.
#[derive(Debug)]
pub struct Snapshot {
    pub server: ServerConfig,
    pub routes: Vec<Route>,
    pub pools: BTreeMap<String, Arc<Pool>>,
}

#[derive(Debug)]
pub struct Route {
    pub host: HostPattern,
    pub path: String,
    pub pool: Arc<Pool>,
    /// The pool's metric handles, built with it.
    pub metrics: Arc<PoolMetrics>,
    pub identity: Option<IdentitySource>,
}

impl Route {
    fn matches(&self, host: Option<&str>, path: &str) -> bool {
        let host_ok = match &self.host {
            HostPattern::Any => true,
            HostPattern::Exact(name) => host.is_some_and(|h| h.eq_ignore_ascii_case(name)),
            HostPattern::Suffix(suffix) => host.is_some_and(|h| {
                h.len() > suffix.len()
                    && h.as_bytes()[h.len() - suffix.len()..]
                        .eq_ignore_ascii_case(suffix.as_bytes())
            }),
        };
        host_ok && path_matches(&self.path, path)
    }
}

/// Prefix match on segment boundaries: `/ws` matches `/ws` and `/ws/x`, not `/wsx`.
fn path_matches(prefix: &str, path: &str) -> bool {
    prefix == "/"
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

impl Snapshot {
    pub fn build(config: &Config, previous: Option<&Snapshot>) -> Snapshot {
        let pools: BTreeMap<String, Arc<Pool>> = config
            .pools
            .iter()
            .map(|(name, settings)| {
                let old = previous.and_then(|p| p.pools.get(name)).map(Arc::as_ref);
                (name.clone(), Arc::new(Pool::new(name, settings, old)))
            })
            .collect();
        let metrics: BTreeMap<&str, Arc<PoolMetrics>> = pools
            .iter()
            .map(|(name, pool)| (name.as_str(), Arc::new(PoolMetrics::new(pool))))
            .collect();
        let routes = config
            .routes
            .iter()
            .filter_map(|r| {
                Some(Route {
                    host: r.host.clone(),
                    path: r.path.clone(),
                    pool: pools.get(&r.pool)?.clone(),
                    metrics: metrics.get(r.pool.as_str())?.clone(),
                    identity: r.identity.clone(),
                })
            })
            .collect();
        Snapshot {
            server: config.server.clone(),
            routes,
            pools,
        }
    }

    /// The first route that matches; `host` without its port.
    pub fn route(&self, host: Option<&str>, path: &str) -> Option<&Route> {
        self.routes.iter().find(|r| r.matches(host, path))
    }
}

/// The current snapshot, swapped whole on reload.
#[derive(Debug)]
pub struct State {
    current: ArcSwap<Snapshot>,
}

impl State {
    pub fn new(config: &Config) -> State {
        State {
            current: ArcSwap::from_pointee(Snapshot::build(config, None)),
        }
    }

    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Swaps in `config`. Backends no longer configured keep their tunnels and get
    /// no new ones.
    pub fn reload(&self, config: &Config) {
        let old = self.current.load_full();
        let new = Snapshot::build(config, Some(&old));
        for pool in old.pools.values() {
            for backend in &pool.backends {
                let kept = new
                    .pools
                    .get(&pool.name)
                    .is_some_and(|p| p.backends.iter().any(|b| Arc::ptr_eq(b, backend)));
                backend.set_draining(!kept);
            }
        }
        self.current.store(Arc::new(new));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra_backend: bool) -> Config {
        let backends = if extra_backend {
            r#"[{ addr = "127.0.0.1:1" }, { addr = "127.0.0.1:2" }]"#
        } else {
            r#"[{ addr = "127.0.0.1:1" }]"#
        };
        let text = format!(
            r#"
[server]
listen = ["127.0.0.1:0"]
[[route]]
host = "*.example.com"
path = "/ws"
pool = "a"
[[route]]
path = "/"
pool = "b"
[pool.a]
backends = {backends}
[pool.b]
"#
        );
        Config::parse(&text, "t.toml").expect("valid")
    }

    #[test]
    fn routes_by_host_and_path_prefix() {
        let s = Snapshot::build(&config(false), None);
        let pool = |h, p| s.route(h, p).map(|r| r.pool.name.as_str());
        assert_eq!(pool(Some("chat.example.com"), "/ws"), Some("a"));
        assert_eq!(pool(Some("CHAT.Example.com"), "/ws/room"), Some("a"));
        assert_eq!(pool(Some("chat.example.com"), "/wsx"), Some("b"));
        assert_eq!(pool(Some("example.com"), "/ws"), Some("b"));
        assert_eq!(pool(None, "/anything"), Some("b"));
    }

    #[test]
    fn reload_keeps_counts_and_drains_removed_backends() {
        let state = State::new(&config(true));
        let before = state.load();
        let mut rng = fastrand::Rng::with_seed(1);
        let (_, guard) = before.pools["a"].pick(&[1], &mut rng).expect("backend");
        state.reload(&config(false));
        let after = state.load();
        assert_eq!(after.pools["a"].backends.len(), 1);
        assert_eq!(after.pools["a"].backends[0].active(), 1);
        assert!(before.pools["a"].backends[1].is_draining());
        assert!(!after.pools["a"].backends[0].is_draining());
        drop(guard);
        assert_eq!(after.pools["a"].backends[0].active(), 0);
    }
}

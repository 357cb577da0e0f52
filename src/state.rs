//! The run-time view of the configuration: one [`Snapshot`] behind an `ArcSwap`.
//!
//! A reload builds a new snapshot beside the current one, taking over the backends
//! (and their counts) that are still configured, and swaps it in. Connections keep
//! the `Arc` of the snapshot they started with. Backends and pools that left the
//! config stay in the snapshot, draining, until their last tunnel ends; then
//! [`State::prune`] builds the snapshot again without them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tokio::sync::Notify;

use crate::balancer::{CountsChanged, Env, Pool};
use crate::closing::Wave;
use crate::config::{BackendAddr, BackendConfig, Config, HostPattern, IdentitySource, PoolConfig};
use crate::metrics::PoolMetrics;

/// One consistent view of routes and pools, and the config they came from.
#[derive(Debug)]
pub struct Snapshot {
    pub config: Config,
    pub routes: Vec<Route>,
    /// Every configured pool, and what is left of removed ones while they have
    /// tunnels.
    pub pools: BTreeMap<String, Arc<Pool>>,
    /// Some pool sends backends the PROXY protocol, which names the address a
    /// client connected to: only then is it read for each connection.
    pub names_local_address: bool,
}

#[derive(Debug)]
pub struct Route {
    pub host: HostPattern,
    pub path: String,
    pub pool: Arc<Pool>,
    /// The pool's metric handles, built with it.
    pub metrics: Arc<PoolMetrics>,
    pub identity: Option<IdentitySource>,
    /// Plain HTTP requests are proxied to the pool (`http = "proxy"`).
    pub http_proxy: bool,
    /// Allowed browser origins (`None`: any).
    pub origins: Option<Vec<String>>,
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

/// (pool, `name:port`) → the addresses the name resolved to last.
pub type Resolved = HashMap<(String, String), Vec<SocketAddr>>;

/// A pool's settings with each DNS entry replaced by a backend per address it
/// resolved to (same weight and cap); addresses listed by `addr` win.
fn expand(name: &str, settings: &PoolConfig, resolved: &Resolved) -> PoolConfig {
    let mut expanded = settings.clone();
    for entry in &settings.dns {
        let key = (name.to_string(), entry.name());
        for addr in resolved.get(&key).into_iter().flatten() {
            let addr = BackendAddr::Ip(*addr);
            if !expanded.backends.iter().any(|b| b.addr == addr) {
                expanded.backends.push(BackendConfig {
                    addr,
                    weight: entry.weight,
                    drain: false,
                    max_connections: entry.max_connections,
                });
            }
        }
    }
    expanded
}

impl Snapshot {
    pub fn build(
        config: &Config,
        previous: Option<&Snapshot>,
        env: &Env,
        resolved: &Resolved,
    ) -> Snapshot {
        let mut pools: BTreeMap<String, Arc<Pool>> = config
            .pools
            .iter()
            .map(|(name, settings)| {
                let old = previous.and_then(|p| p.pools.get(name)).map(Arc::as_ref);
                let settings = expand(name, settings, resolved);
                (name.clone(), Arc::new(Pool::new(name, &settings, old, env)))
            })
            .collect();
        for (name, pool) in previous.map(|p| &p.pools).into_iter().flatten() {
            if !config.pools.contains_key(name)
                && let Some(remnant) = Pool::remnant(pool)
            {
                pools.insert(name.clone(), Arc::new(remnant));
            }
        }
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
                    http_proxy: r.http_proxy,
                    origins: r.origins.clone(),
                })
            })
            .collect();
        Snapshot {
            config: config.clone(),
            routes,
            names_local_address: config.pools.values().any(|p| p.proxy_protocol.is_some()),
            pools,
        }
    }

    /// The first route that matches; `host` without its port.
    pub fn route(&self, host: Option<&str>, path: &str) -> Option<&Route> {
        self.routes.iter().find(|r| r.matches(host, path))
    }

    /// Every (pool, backend) the config lists.
    fn configured(&self) -> BTreeSet<(String, String)> {
        self.config
            .pools
            .iter()
            .flat_map(|(name, p)| {
                p.backends
                    .iter()
                    .map(move |b| (name.clone(), b.addr.to_string()))
            })
            .collect()
    }
}

/// What a reload changed in pools and backends, for its log line.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PoolChanges {
    pub pools_added: usize,
    pub pools_removed: usize,
    pub backends_added: usize,
    pub backends_removed: usize,
    /// Backends now draining that were not (removed ones with tunnels included).
    pub draining: usize,
}

/// The current snapshot, swapped whole on reload.
#[derive(Debug)]
pub struct State {
    current: ArcSwap<Snapshot>,
    /// What every backend shares: the shutdown wave, the counts signal.
    env: Env,
    /// DNS names' addresses; one build at a time (a reload, a prune and a new
    /// resolution must not lose each other's work).
    building: Mutex<Resolved>,
    /// See [`State::stored`].
    stored: tokio::sync::watch::Sender<()>,
}

impl State {
    pub fn new(config: &Config) -> State {
        let env = Env::default();
        State {
            current: ArcSwap::from_pointee(Snapshot::build(config, None, &env, &Resolved::new())),
            env,
            building: Mutex::new(Resolved::new()),
            stored: tokio::sync::watch::Sender::new(()),
        }
    }

    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// The shutdown wave.
    pub fn root(&self) -> &Arc<Wave> {
        &self.env.root
    }

    /// What the balancer knows of the other instances.
    pub fn peers(&self) -> &Arc<crate::balancer::Peers> {
        &self.env.peers
    }

    /// Signalled whenever a backend's count changes.
    pub fn counts_changed(&self) -> &Arc<CountsChanged> {
        &self.env.changed
    }

    /// Signalled when a backend starts draining and when a snapshot is stored
    /// (one waiter: the drain task).
    pub fn drains(&self) -> &Notify {
        &self.env.drains
    }

    /// Marks every snapshot stored from now on (the tasks that sleep until the
    /// configuration changes).
    pub fn stored(&self) -> tokio::sync::watch::Receiver<()> {
        self.stored.subscribe()
    }

    /// Makes `new` the current snapshot and wakes the tasks that follow it.
    fn store(&self, new: Snapshot) {
        self.current.store(Arc::new(new));
        self.env.drains.notify_one();
        self.stored.send_replace(());
    }

    /// Swaps in `config`. Backends no longer configured keep their tunnels and get
    /// no new ones.
    pub fn reload(&self, config: &Config) -> PoolChanges {
        let mut resolved = self.building.lock().unwrap_or_else(|e| e.into_inner());
        // Names no longer in the file are forgotten.
        resolved.retain(|(pool, name), _| {
            config
                .pools
                .get(pool)
                .is_some_and(|p| p.dns.iter().any(|d| d.name() == *name))
        });
        let old = self.current.load_full();
        let draining_before: BTreeSet<(String, String)> = draining(&old);
        let new = Snapshot::build(config, Some(&old), &self.env, &resolved);
        let (before, after) = (old.configured(), new.configured());
        let pools_before: BTreeSet<&String> = old.config.pools.keys().collect();
        let pools_after: BTreeSet<&String> = config.pools.keys().collect();
        let changes = PoolChanges {
            pools_added: pools_after.difference(&pools_before).count(),
            pools_removed: pools_before.difference(&pools_after).count(),
            backends_added: after.difference(&before).count(),
            backends_removed: before.difference(&after).count(),
            draining: draining(&new).difference(&draining_before).count(),
        };
        self.store(new);
        changes
    }

    /// Builds the snapshot again without the leaving backends and pools whose last
    /// tunnel has ended. Cheap to call when there are none.
    pub fn prune(&self) {
        let resolved = self.building.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.current.load_full();
        if old.pools.values().any(|p| p.has_finished_leavers()) {
            let new = Snapshot::build(&old.config, Some(&old), &self.env, &resolved);
            self.store(new);
        }
    }

    /// A DNS name of `pool` now resolves to `addrs`: new addresses join (with slow
    /// start, where set), vanished ones drain like a backend removed from the file.
    /// Returns whether anything changed.
    pub fn set_resolved(&self, pool: &str, name: &str, mut addrs: Vec<SocketAddr>) -> bool {
        addrs.sort();
        addrs.dedup();
        let mut resolved = self.building.lock().unwrap_or_else(|e| e.into_inner());
        let key = (pool.to_string(), name.to_string());
        if resolved.get(&key) == Some(&addrs) {
            return false;
        }
        let first = resolved.insert(key, addrs.clone()).is_none();
        let old = self.current.load_full();
        let new = Snapshot::build(&old.config, Some(&old), &self.env, &resolved);
        if first && let Some(pool) = new.pools.get(pool) {
            // The name's first addresses are the pool's start, not newcomers.
            for addr in &addrs {
                if let Some(b) = pool.backend(&BackendAddr::Ip(*addr)) {
                    b.end_slow();
                }
            }
        }
        self.store(new);
        true
    }
}

fn draining(snapshot: &Snapshot) -> BTreeSet<(String, String)> {
    snapshot
        .pools
        .values()
        .flat_map(|p| {
            p.backends
                .iter()
                .filter(|b| b.is_draining())
                .map(|b| (p.name.clone(), b.addr.to_string()))
        })
        .collect()
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
        let s = Snapshot::build(&config(false), None, &Env::default(), &Resolved::new());
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
        // A tunnel on the backend the reload removes (127.0.0.1:2, index 1).
        let (_, guard) = before.pools["a"].pick(&[0], &mut rng).expect("backend");
        let changes = state.reload(&config(false));
        assert_eq!(changes.backends_removed, 1);
        assert_eq!(changes.draining, 1);
        let after = state.load();
        let kept = &after.pools["a"].backends[0];
        // It stays, draining, with its count, until its tunnel ends.
        assert_eq!(after.pools["a"].backends.len(), 2);
        let leaving = &after.pools["a"].backends[1];
        assert!(leaving.is_draining() && leaving.active() == 1);
        // Re-added while draining: the same backend, count and all.
        state.reload(&config(true));
        let again = state.load();
        assert_eq!(again.pools["a"].backends[1].active(), 1);
        assert!(!again.pools["a"].backends[1].is_draining());
        state.reload(&config(false));
        assert!(!kept.is_draining());
        drop(guard);
        state.prune();
        let pruned = state.load();
        assert_eq!(pruned.pools["a"].backends.len(), 1);
        assert!(pruned.pools["a"].backends.iter().all(|b| b.active() == 0));
    }
}

//! wsgate: a load-balancing reverse proxy made for WebSockets.
//!
//! | module | owns |
//! |---|---|
//! | [`config`] | `proxy.toml`: raw serde types → validated [`Config`] |
//! | [`state`] | the current [`state::Snapshot`] of routes and pools, swapped on reload |
//! | [`server`] | listeners, the accept loop, HTTP/1.1 serving |
//! | [`handler`] | the per-request path: route, validate, identity, backend, tunnel |
//! | [`handshake`] | RFC 6455 validation, forwarded headers, rejections |
//! | [`balancer`] | backends, their counts ([`balancer::ConnGuard`]), least-connections |
//! | [`upstream`] | connect and handshake to a backend, retrying the next candidate |
//! | [`relay`] | the tunnel after the upgrade |
//! | [`frame`] | the frame walker the tunnel runs in each direction |
//! | [`cluster`] | state shared with other instances: Redis or in memory |
//! | [`presence`] | identities, presence records and join/leave events |
//! | [`closing`] | close waves: drains and shutdown spread their closes |
//! | [`discovery`] | backends from DNS |
//! | [`tls`] | rustls: certificates by SNI, reloaded live; wss to backends |
//! | [`forward`] | plain HTTP on WebSocket routes (`http = "proxy"`) |
//! | [`sticky`] | sticky placement: cookies, rendezvous hashing of a key |
//! | [`drain`] | the task that starts drain waves and drops what finished leaving |
//! | [`reload`] | what a reload changed (its log line), the config file watch |
//! | [`health`] | active checks and passive ejection, with hysteresis |
//! | [`admin`] | the admin listener: metrics, health, backends, presence |
//! | [`metrics`] | metric names, descriptions, the Prometheus recorder |
//! | [`backend`] | the reference relay backend, its pub/sub brokers and the demo |
//! | [`backoff`] | exponential backoff for every retry loop |

pub mod access;
pub mod admin;
pub mod backend;
pub mod backoff;
pub mod balancer;
pub mod clients;
pub mod closing;
pub mod cluster;
pub mod config;
pub mod descriptors;
pub mod direct;
pub mod discovery;
pub mod drain;
pub mod forward;
pub mod frame;
pub mod handler;
pub mod handshake;
pub mod health;
pub mod metrics;
pub mod presence;
pub mod relay;
pub mod reload;
pub mod server;
pub mod state;
pub mod sticky;
pub mod timing;
pub mod tls;
pub mod upstream;
pub mod workers;

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use cluster::{Cluster, ClusterError};
pub use config::{Config, ConfigError};
use state::State;

/// Shows an error with its causes, each once: `message: cause: cause`. For logs;
/// errors here keep their cause as `source()`, not in their message.
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(e) = cause {
            write!(f, ": {e}")?;
            cause = e.source();
        }
        Ok(())
    }
}

/// The sockets wsgate serves on, bound by the caller (port 0 in tests).
pub struct Listeners {
    /// One per `[server] listen` address, in the same order.
    pub server: Vec<TcpListener>,
    /// The admin listener, when `[admin] listen` is set.
    pub admin: Option<TcpListener>,
    /// One per `[tls] listen` address, in the same order.
    pub tls: Vec<TcpListener>,
}

impl Listeners {
    /// Binds every `[server] listen` address of `config`, and `[admin] listen`.
    pub async fn bind(config: &Config) -> io::Result<Listeners> {
        let mut server = Vec::new();
        for addr in &config.server.listen {
            server.push(server::bind(*addr, config.server.backlog)?);
        }
        let admin = match config.admin.listen {
            Some(addr) => Some(server::bind(addr, config.server.backlog)?),
            None => None,
        };
        let mut tls = Vec::new();
        for addr in config.tls.iter().flat_map(|t| &t.listen) {
            tls.push(server::bind(*addr, config.server.backlog)?);
        }
        Ok(Listeners { server, admin, tls })
    }
}

/// Why a reload was refused; the running configuration is unchanged.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("the TLS certificates")]
    Tls(#[from] tls::TlsError),
    #[error("cannot listen on {addr}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// A proxy built from a config: its state can be inspected (and reloaded) while
/// [`Gateway::run`] serves.
pub struct Gateway {
    state: Arc<State>,
    cluster: Arc<Cluster>,
    /// Served to a plain `GET /` (the demo's chat page).
    page: Option<&'static str>,
    /// What `run` started, for reloads to change.
    running: Mutex<Option<Running>>,
    /// The certificates of the TLS listeners and the rustls config built from
    /// them, swapped by a reload.
    tls: Option<TlsState>,
}

/// The TLS listeners' certificates and server config.
#[derive(Clone)]
struct TlsState {
    certificates: Arc<tls::Certificates>,
    config: Arc<arc_swap::ArcSwap<rustls::ServerConfig>>,
}

impl TlsState {
    /// Loads the certificate files again; a broken one keeps the running set.
    fn reload(&self, state: &State) {
        let Some(tls) = &state.load().config.tls else {
            return;
        };
        let loaded = self
            .certificates
            .reload(tls)
            .and_then(|()| tls::server_config(tls, self.certificates.clone()));
        match loaded {
            Ok(config) => {
                self.config.store(config);
                tracing::info!("TLS certificates reloaded");
            }
            Err(e) => tracing::error!(
                "TLS certificates not reloaded, keeping the running ones: {}",
                Chain(&e)
            ),
        }
    }
}

/// The listeners `run` serves and the connection limit, as a reload finds them.
struct Running {
    shared: handler::Shared,
    /// Configured address → the stop of its accept loop.
    listeners: BTreeMap<std::net::SocketAddr, CancellationToken>,
    /// The same for the TLS listeners.
    tls_listeners: BTreeMap<std::net::SocketAddr, CancellationToken>,
    tls_config: Option<Arc<arc_swap::ArcSwap<rustls::ServerConfig>>>,
    /// The admin listener's configured address and the stop of its loop.
    admin_listener: Option<(std::net::SocketAddr, CancellationToken)>,
    admin: Arc<admin::Admin>,
    /// Parent of the admin listener's stop: cancelled at the very end.
    admin_root: CancellationToken,
    /// Accept loops (proxy and admin).
    loops: TaskTracker,
    max_connections: usize,
}

impl Running {
    fn start_listener(&mut self, addr: std::net::SocketAddr, listener: TcpListener) {
        let stop = self.shared.stopping.child_token();
        self.listeners.insert(addr, stop.clone());
        self.loops
            .spawn(server::serve_until(listener, stop, self.shared.clone()));
    }

    fn start_tls_listener(&mut self, addr: std::net::SocketAddr, listener: TcpListener) {
        let Some(config) = self.tls_config.clone() else {
            return;
        };
        let stop = self.shared.stopping.child_token();
        self.tls_listeners.insert(addr, stop.clone());
        self.loops.spawn(server::serve_tls(
            listener,
            stop,
            self.shared.clone(),
            config,
        ));
    }

    fn start_admin(
        &mut self,
        addr: std::net::SocketAddr,
        listener: TcpListener,
        stop: &CancellationToken,
    ) {
        let stop = stop.child_token();
        self.admin_listener = Some((addr, stop.clone()));
        self.loops
            .spawn(admin::serve(listener, self.admin.clone(), stop));
    }

    /// Grows or shrinks the connection limit; connections over a lowered limit
    /// keep going, and new ones wait until enough have ended.
    fn resize(&mut self, max_connections: usize) {
        let permits = &self.shared.permits;
        if max_connections > self.max_connections {
            permits.add_permits(max_connections - self.max_connections);
        } else if max_connections < self.max_connections {
            let excess = self.max_connections - max_connections;
            let forgotten = permits.forget_permits(excess);
            if forgotten < excess {
                let permits = permits.clone();
                let owed = (excess - forgotten) as u32;
                tokio::spawn(async move {
                    if let Ok(p) = permits.acquire_many_owned(owed).await {
                        p.forget();
                    }
                });
            }
        }
        self.max_connections = max_connections;
    }
}

impl Gateway {
    pub fn new(config: &Config) -> Result<Gateway, StartError> {
        metrics::handle();
        let tls = match &config.tls {
            Some(t) => {
                let certificates = tls::Certificates::new(tls::load_all(t)?);
                let server = tls::server_config(t, certificates.clone())?;
                Some(TlsState {
                    certificates,
                    config: Arc::new(arc_swap::ArcSwap::new(server)),
                })
            }
            None => None,
        };
        Ok(Gateway {
            state: Arc::new(State::new(config)),
            cluster: Cluster::new(&config.cluster)?,
            page: None,
            running: Mutex::new(None),
            tls,
        })
    }

    /// Applies `config` as a difference from the running one: listeners added are
    /// bound (all of them first: if one cannot be, nothing changes), removed ones
    /// stop accepting (their tunnels go on), the admin listener moves, the
    /// connection limit changes, routes and pools are swapped (backends that left
    /// drain), `[cluster] heartbeat` applies; a key that needs a restart is
    /// warned about by name. Returns the one line that says what changed.
    pub fn reload(&self, config: &Config) -> Result<String, ReloadError> {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.state.load();
        // Everything that can fail, first.
        let mut bound = Vec::new();
        let mut tls_bound = Vec::new();
        let mut admin_bound = None;
        if let Some(running) = running.as_ref() {
            let bind_new =
                |addrs: &mut dyn Iterator<Item = &std::net::SocketAddr>,
                 running: &BTreeMap<std::net::SocketAddr, CancellationToken>| {
                    addrs
                        .filter(|addr| !running.contains_key(*addr))
                        .map(|&addr| {
                            server::bind(addr, config.server.backlog)
                                .map(|listener| (addr, listener))
                                .map_err(|source| ReloadError::Bind { addr, source })
                        })
                        .collect::<Result<Vec<_>, _>>()
                };
            bound = bind_new(&mut config.server.listen.iter(), &running.listeners)?;
            tls_bound = bind_new(
                &mut config.tls.iter().flat_map(|t| &t.listen),
                &running.tls_listeners,
            )?;
            let admin_at = running.admin_listener.as_ref().map(|(a, _)| *a);
            if let Some(addr) = config.admin.listen
                && admin_at != Some(addr)
            {
                let listener = server::bind(addr, config.server.backlog)
                    .map_err(|source| ReloadError::Bind { addr, source })?;
                admin_bound = Some((addr, listener));
            }
        }
        // New certificates (and versions, ALPN) for new TLS handshakes; a broken
        // file refuses the reload and keeps the running ones.
        if let (Some(state), Some(t)) = (&self.tls, &config.tls) {
            state.certificates.reload(t)?;
            state
                .config
                .store(tls::server_config(t, state.certificates.clone())?);
        }
        let changes = self.state.reload(config);
        let mut summary = reload::Summary::new(&old.config, config, &changes);
        if let Some(running) = running.as_mut() {
            let removed: Vec<_> = running
                .listeners
                .keys()
                .filter(|a| !config.server.listen.contains(a))
                .copied()
                .collect();
            for addr in removed {
                if let Some(stop) = running.listeners.remove(&addr) {
                    stop.cancel();
                }
            }
            for (addr, listener) in bound {
                running.start_listener(addr, listener);
            }
            let tls_wanted: Vec<std::net::SocketAddr> =
                config.tls.iter().flat_map(|t| t.listen.clone()).collect();
            let gone: Vec<_> = running
                .tls_listeners
                .keys()
                .filter(|a| !tls_wanted.contains(a))
                .copied()
                .collect();
            for addr in gone {
                if let Some(stop) = running.tls_listeners.remove(&addr) {
                    stop.cancel();
                }
            }
            for (addr, listener) in tls_bound {
                running.start_tls_listener(addr, listener);
            }
            if running.admin_listener.as_ref().map(|(a, _)| *a) != config.admin.listen {
                if let Some((_, stop)) = running.admin_listener.take() {
                    stop.cancel();
                }
                if let Some((addr, listener)) = admin_bound {
                    let root = running.admin_root.clone();
                    running.start_admin(addr, listener, &root);
                }
            }
            running.resize(config.server.max_connections);
        }
        // How the worker threads run is set when the runtime starts.
        let (was, now) = (&old.config.server, &config.server);
        for (key, changed) in [
            ("server.pin_workers", was.pin_workers != now.pin_workers),
            (
                "server.yield_when_busy",
                was.yield_when_busy != now.yield_when_busy,
            ),
        ] {
            if changed {
                tracing::warn!(key, "{key} changed: it takes effect at the next start");
                summary.restart(key);
            }
        }
        if old.config.server.backlog != config.server.backlog {
            // The queue length is fixed when a socket starts listening.
            tracing::warn!(
                key = "server.backlog",
                "server.backlog changed: listeners bound from now on use it, running ones keep theirs until the next start"
            );
            summary.restart("server.backlog");
        }
        crate::access::configure(&config.log.access);
        for key in self.cluster.apply(&config.cluster) {
            tracing::warn!(key, "{key} changed: it takes effect at the next start");
            summary.restart(key);
        }
        ::metrics::counter!(metrics::CONFIG_RELOADS, "result" => "ok").increment(1);
        Ok(summary.to_string())
    }

    /// Reads, validates and applies `path`; an invalid file (or an address that
    /// cannot be bound) keeps the running configuration and is counted as an error.
    pub fn reload_from(&self, path: &std::path::Path) -> Result<String, ReloadError> {
        let applied = Config::load(path)
            .map_err(ReloadError::from)
            .and_then(|config| self.reload(&config));
        if applied.is_err() {
            ::metrics::counter!(metrics::CONFIG_RELOADS, "result" => "error").increment(1);
        }
        applied
    }

    /// Serves `html` to a plain `GET /` (not an upgrade) before routing.
    pub fn with_page(mut self, html: &'static str) -> Gateway {
        self.page = Some(html);
        self
    }

    /// Loads the TLS certificates again (their files changed on disk): new
    /// handshakes get them, open connections go on; a broken file keeps the
    /// running ones and says why.
    pub fn reload_certificates(&self) {
        if let Some(tls) = &self.tls {
            tls.reload(&self.state);
        }
    }

    /// Whether [`Gateway::run`] has started serving (and not yet returned).
    pub fn is_serving(&self) -> bool {
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    pub fn state(&self) -> &Arc<State> {
        &self.state
    }

    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }

    /// Serves until `shutdown` is cancelled, then shuts down gracefully: `/readyz`
    /// answers 503 at once, the listeners keep accepting for `shutdown_delay`,
    /// then stop, and open tunnels are closed (1001) spread over
    /// `shutdown_spread`. Returns once the last tunnel has ended, or at
    /// `shutdown_timeout` after the signal.
    pub async fn run(&self, listeners: Listeners, shutdown: CancellationToken) {
        let config = self.state.load().config.clone();
        let tracker = TaskTracker::new();
        let stop_cluster = CancellationToken::new();
        let cluster_task = tokio::spawn(
            self.cluster
                .clone()
                .run(self.state.clone(), stop_cluster.clone()),
        );
        let stop_background = CancellationToken::new();
        let background = TaskTracker::new();
        background.spawn(health::run(self.state.clone(), stop_background.clone()));
        background.spawn(drain::run(self.state.clone(), stop_background.clone()));
        background.spawn(discovery::run(self.state.clone(), stop_background.clone()));
        background.spawn(metrics::upkeep(stop_background.clone()));
        // Certificate files replaced on disk are served to new handshakes.
        let certificate_files: Vec<std::path::PathBuf> = config
            .tls
            .iter()
            .flat_map(tls::Certificates::files)
            .collect();
        if let Some(tls) = self.tls.clone()
            && !certificate_files.is_empty()
        {
            let state = self.state.clone();
            if let Err(e) =
                reload::watch_files(certificate_files, stop_background.clone(), move || {
                    tls.reload(&state)
                })
            {
                tracing::warn!(error = %e, "cannot watch the certificate files: reload to change them");
            }
        }
        background.close();
        let shared = Arc::new(handler::Services {
            state: self.state.clone(),
            cluster: self.cluster.clone(),
            page: self.page,
            tracker: tracker.clone(),
            stopping: CancellationToken::new(),
            permits: Arc::new(Semaphore::new(config.server.max_connections)),
            http: forward::client(),
            per_ip: Arc::default(),
        });
        let admin = Arc::new(admin::Admin {
            state: self.state.clone(),
            cluster: self.cluster.clone(),
            draining: shutdown.clone(),
            redis: config.cluster.redis.is_some(),
            certificates: self.tls.as_ref().map(|t| t.certificates.clone()),
        });
        let loops = TaskTracker::new();
        let mut running = Running {
            shared: shared.clone(),
            listeners: BTreeMap::new(),
            tls_listeners: BTreeMap::new(),
            tls_config: self.tls.as_ref().map(|t| t.config.clone()),
            admin_listener: None,
            admin_root: stop_background.clone(),
            admin,
            loops: loops.clone(),
            max_connections: config.server.max_connections,
        };
        for (addr, listener) in config.server.listen.iter().zip(listeners.server) {
            running.start_listener(*addr, listener);
        }
        let tls_addrs: Vec<std::net::SocketAddr> =
            config.tls.iter().flat_map(|t| t.listen.clone()).collect();
        for (addr, listener) in tls_addrs.into_iter().zip(listeners.tls) {
            running.start_tls_listener(addr, listener);
        }
        if let (Some(addr), Some(listener)) = (config.admin.listen, listeners.admin) {
            running.start_admin(addr, listener, &stop_background);
        }
        *self.running.lock().unwrap_or_else(|e| e.into_inner()) = Some(running);

        shutdown.cancelled().await;
        let signalled = tokio::time::Instant::now();
        let server = self.state.load().config.server.clone();
        tracing::info!(delay = ?server.shutdown_delay, spread = ?server.shutdown_spread, timeout = ?server.shutdown_timeout, "shutting down: /readyz answers 503");
        tokio::time::sleep(server.shutdown_delay).await;
        shared.stopping.cancel();
        let open: u64 = self
            .state
            .load()
            .pools
            .values()
            .flat_map(|p| p.backends.iter())
            .map(|b| b.active())
            .sum();
        tracing::info!(
            tunnels = open,
            "listeners stopped: closing tunnels with 1001"
        );
        self.state.root().start(open, server.shutdown_spread);
        tracker.close();
        let deadline = signalled + server.shutdown_timeout;
        if tokio::time::timeout_at(deadline, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                tunnels = tracker.len(),
                "shutdown_timeout reached: exiting with tunnels still open"
            );
        }
        // Every tunnel is closed: publish the last leaves, then leave the cluster.
        stop_cluster.cancel();
        if let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(5), cluster_task).await {
            tracing::error!(error = %e, "cluster task failed");
        }
        stop_background.cancel();
        loops.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            loops.wait().await;
            background.wait().await;
        })
        .await;
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }
}

/// Why a gateway could not be made.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("the TLS certificates")]
    Tls(#[from] tls::TlsError),
}

/// Serves `config` on `listeners` until `shutdown` is cancelled.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), StartError> {
    Gateway::new(&config)?.run(listeners, shutdown).await;
    Ok(())
}

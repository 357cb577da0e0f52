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
//! | [`health`] | active checks and passive ejection, with hysteresis |
//! | [`admin`] | the admin listener: metrics, health, backends, presence |
//! | [`metrics`] | metric names, descriptions, the Prometheus recorder |
//! | [`backend`] | the reference relay backend, its pub/sub brokers and the demo |
//! | [`backoff`] | exponential backoff for every retry loop |

pub mod admin;
pub mod backend;
pub mod backoff;
pub mod balancer;
pub mod cluster;
pub mod config;
pub mod frame;
pub mod handler;
pub mod handshake;
pub mod health;
pub mod metrics;
pub mod presence;
pub mod relay;
pub mod server;
pub mod state;
pub mod upstream;

use std::io;
use std::sync::Arc;

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
    pub server: Vec<TcpListener>,
    /// The admin listener, when `[admin] listen` is set.
    pub admin: Option<TcpListener>,
}

impl Listeners {
    /// Binds every `[server] listen` address of `config`.
    pub async fn bind(config: &Config) -> io::Result<Listeners> {
        let mut server = Vec::new();
        for addr in &config.server.listen {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
            server.push(listener);
        }
        let admin = match config.admin.listen {
            Some(addr) => Some(TcpListener::bind(addr).await.map_err(|e| {
                io::Error::new(e.kind(), format!("cannot listen on {addr} (admin): {e}"))
            })?),
            None => None,
        };
        Ok(Listeners { server, admin })
    }
}

/// A proxy built from a config: its state can be inspected (and reloaded) while
/// [`Gateway::run`] serves.
pub struct Gateway {
    state: Arc<State>,
    cluster: Arc<Cluster>,
    /// Served to a plain `GET /` (the demo's chat page).
    page: Option<&'static str>,
    admin: config::AdminConfig,
    /// Whether `[cluster] redis` is set (read at start only).
    redis: bool,
}

impl Gateway {
    pub fn new(config: &Config) -> Result<Gateway, ClusterError> {
        metrics::handle();
        Ok(Gateway {
            state: Arc::new(State::new(config)),
            cluster: Cluster::new(&config.cluster)?,
            page: None,
            admin: config.admin.clone(),
            redis: config.cluster.redis.is_some(),
        })
    }

    /// Swaps in a new configuration: routes, pools, backends and their settings,
    /// and `[server] handshake_timeout` and `max_header_bytes` (read per new client
    /// connection). Live tunnels keep the settings they started with. `[server]
    /// listen` and `max_connections`, `[admin]` and `[cluster]` are read at start.
    pub fn reload(&self, config: &Config) {
        self.state.reload(config);
        ::metrics::counter!(metrics::CONFIG_RELOADS, "result" => "ok").increment(1);
    }

    /// Reads, validates and swaps in `path`; an invalid file keeps the running
    /// configuration and is counted as an error.
    pub fn reload_from(&self, path: &std::path::Path) -> Result<(), ConfigError> {
        match Config::load(path) {
            Ok(config) => {
                self.reload(&config);
                Ok(())
            }
            Err(e) => {
                ::metrics::counter!(metrics::CONFIG_RELOADS, "result" => "error").increment(1);
                Err(e)
            }
        }
    }

    /// Serves `html` to a plain `GET /` (not an upgrade) before routing.
    pub fn with_page(mut self, html: &'static str) -> Gateway {
        self.page = Some(html);
        self
    }

    pub fn state(&self) -> &Arc<State> {
        &self.state
    }

    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }

    /// Serves until `shutdown` is cancelled, then closes every tunnel (1001) and
    /// returns once all connection tasks have ended.
    pub async fn run(&self, listeners: Listeners, shutdown: CancellationToken) {
        let tracker = TaskTracker::new();
        let max_connections = self.state.load().server.max_connections;
        let stop_cluster = CancellationToken::new();
        let cluster_task = tokio::spawn(
            self.cluster
                .clone()
                .run(self.state.clone(), stop_cluster.clone()),
        );
        let stop_admin = CancellationToken::new();
        let background = TaskTracker::new();
        background.spawn(health::run(self.state.clone(), stop_admin.clone()));
        if let Some(listener) = listeners.admin {
            let admin = Arc::new(admin::Admin {
                state: self.state.clone(),
                cluster: self.cluster.clone(),
                draining: shutdown.clone(),
                token: self.admin.token.clone(),
                redis: self.redis,
            });
            background.spawn(admin::serve(listener, admin, stop_admin.clone()));
        }
        background.close();
        let shared = handler::Shared {
            state: self.state.clone(),
            cluster: self.cluster.clone(),
            page: self.page,
            message_metrics: self.admin.message_metrics,
            tracker: tracker.clone(),
            shutdown: shutdown.clone(),
            permits: Arc::new(Semaphore::new(max_connections)),
        };
        let accept_loops = TaskTracker::new();
        for listener in listeners.server {
            accept_loops.spawn(server::serve(listener, shared.clone()));
        }
        accept_loops.close();
        accept_loops.wait().await;
        tracker.close();
        tracker.wait().await;
        // Every tunnel is closed: publish the last leaves, then leave the cluster.
        stop_cluster.cancel();
        if let Err(e) = cluster_task.await {
            tracing::error!(error = %e, "cluster task failed");
        }
        stop_admin.cancel();
        background.wait().await;
    }
}

/// Serves `config` on `listeners` until `shutdown` is cancelled.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), ClusterError> {
    Gateway::new(&config)?.run(listeners, shutdown).await;
    Ok(())
}

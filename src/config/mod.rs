//! `proxy.toml`: the validated [`Config`] and its public types. Nothing past this
//! module sees a string that still needs parsing.
//!
//! | file | job |
//! |---|---|
//! | `mod.rs` | the public types, [`Config::load`] and [`ConfigError`] |
//! | `raw.rs` | serde structs that mirror the file, positions kept |
//! | `validate.rs` | raw → typed, each problem with its key and fix |
//! | `diagnostics.rs` | positions: file:line:col of keys and values |
//! | `defaults.rs` | every default and range |
//!
//! Every problem in a file is reported at once, each with `file:line:col`, the key and
//! the fix, so `wsgate check` is one edit-and-rerun loop rather than one per mistake.
//! Unknown keys are collected with `serde_ignored` instead of failing on the first one
//! with `deny_unknown_fields`: the file is still rejected, but with every error listed.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::Path;
use std::time::Duration;

mod diagnostics;
mod raw;
mod validate;

pub mod defaults;

use diagnostics::Report;
pub use diagnostics::line_col;

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    /// In file order: the first matching route wins.
    pub routes: Vec<RouteConfig>,
    pub pools: BTreeMap<String, PoolConfig>,
    pub cluster: ClusterConfig,
    pub admin: AdminConfig,
    /// `[resolver] nameservers`: where DNS backends are resolved; empty = the
    /// system's configuration (`/etc/resolv.conf`).
    pub nameservers: Vec<SocketAddr>,
    /// `[tls]`: TLS listeners and their certificates.
    pub tls: Option<TlsConfig>,
    /// `[log]`.
    pub log: LogConfig,
}

/// `[log]`: where the access log goes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LogConfig {
    pub access: AccessLog,
}

/// `[log] access`: one JSON line per tunnel and per refused upgrade.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum AccessLog {
    #[default]
    Stderr,
    Off,
    /// Appended to; reopened on SIGUSR1.
    File(std::path::PathBuf),
}

/// `[tls]`: listeners that speak TLS (and HTTP/2 by ALPN).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    pub listen: Vec<SocketAddr>,
    /// Offer `h2` by ALPN (WebSockets over HTTP/2, RFC 8441).
    pub http2: bool,
    pub min_version: TlsVersion,
    /// In order: the first is the default for unknown or missing SNI.
    pub certs: Vec<CertPaths>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsVersion {
    V1_2,
    V1_3,
}

/// One `[[tls.cert]]`: a PEM chain and its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertPaths {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
}

/// `[pool.NAME.tls]`: the pool's backends speak TLS (`wss`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendTls {
    /// A PEM bundle of the CAs to trust; `None`: the system's roots.
    pub ca: Option<std::path::PathBuf>,
    /// The name the backends' certificates must carry; `None`: each backend's host.
    pub server_name: Option<String>,
    /// A client certificate and key, when the backends ask for one.
    pub cert: Option<std::path::PathBuf>,
    pub key: Option<std::path::PathBuf>,
}

/// The admin listener: `/metrics`, `/healthz`, `/readyz`, `/backends`, `/presence`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    /// `None`: no admin listener.
    pub listen: Option<SocketAddr>,
    /// When set, every admin request needs `Authorization: Bearer TOKEN`.
    pub token: Option<String>,
    /// Count messages and bytes per direction (cheap: tallied per connection and
    /// added to the shared counters at most once a second and at close).
    pub message_metrics: bool,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: None,
            token: None,
            message_metrics: defaults::MESSAGE_METRICS,
        }
    }
}

/// Active health checks of a pool's backends, with hysteresis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthConfig {
    pub interval: Duration,
    pub timeout: Duration,
    pub kind: CheckKind,
    /// Consecutive failures (checks or connects) that eject a backend.
    pub unhealthy_after: u32,
    /// Consecutive successful checks that bring it back.
    pub healthy_after: u32,
}

/// What one active check does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckKind {
    /// `kind = "tcp"` (the default without `path`): a TCP connect.
    Tcp,
    /// `kind = "http"` (the default with `path`): `GET path` answers 2xx.
    Http { path: String },
    /// `kind = "websocket"`: a full upgrade to `path`, the 101 and its
    /// `Sec-WebSocket-Accept` verified, then a close 1000.
    WebSocket { path: String },
}

/// How this instance shares its state: through Redis with `redis` set, else in
/// memory (a single instance). Read at start; a reload does not change it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// `redis://` or `rediss://` URL; `None` keeps all state in memory.
    pub redis: Option<String>,
    /// Key prefix: instances with the same name balance together.
    pub name: String,
    /// How often this instance refreshes its keys and reads the others'. Its keys
    /// live for three heartbeats, so a dead instance's share vanishes by then.
    pub heartbeat: Duration,
    /// This instance's name in Redis and in presence records; `None`: one is
    /// made at start ([`ClusterConfig::generated_instance_id`]).
    pub instance_id: Option<String>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            redis: None,
            name: defaults::CLUSTER_NAME.to_string(),
            heartbeat: defaults::HEARTBEAT,
            instance_id: None,
        }
    }
}

impl ClusterConfig {
    /// `HOSTNAME-xxxxxx`: readable in redis-cli, unique across restarts.
    pub fn generated_instance_id() -> String {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| validate::valid_name(h))
            .unwrap_or_else(|| "wsgate".to_string());
        format!("{host}-{:06x}", fastrand::u32(..0x100_0000))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    pub listen: Vec<SocketAddr>,
    /// Connections (handshaking or proxied) held at once; the accept loop waits for a
    /// free slot before accepting, so overload queues in the kernel's backlog.
    pub max_connections: usize,
    /// Connections the kernel queues for each listener until wsgate accepts them.
    pub backlog: u32,
    /// How long a client has to send its whole upgrade request.
    pub handshake_timeout: Duration,
    /// Largest request head (request line + headers) accepted; larger gets 431.
    pub max_header_bytes: usize,
    /// Reload when the config file changes on disk (as well as on SIGHUP).
    pub watch_config: bool,
    /// Check every frame against RFC 6455 (masking, opcodes, RSV bits, fragments,
    /// close frames); off, only control frames over 125 bytes are refused.
    pub strict_frames: bool,
    /// Keep each worker thread on a CPU of its own, when there are as many workers
    /// as CPUs the process may run on (read at start; a reload waits for a restart).
    pub pin_workers: bool,
    /// A worker that ran [`crate::workers::BUSY_BEFORE_YIELD`] or longer since it
    /// last woke yields its CPU once before it waits for events (read at start).
    pub yield_when_busy: bool,
    /// Connections one client address (IPv6: its /64) may hold; over it, 429.
    /// `None`: no limit.
    pub max_connections_per_ip: Option<u32>,
    /// Upgrades per second one client address may make (bursts up to the same
    /// number); over it, 429 with `Retry-After`. `None`: no limit.
    pub max_upgrades_per_ip: Option<u32>,
    /// Peers that may say who the client is: by the PROXY protocol, or by an
    /// X-Forwarded-For that is kept and appended to (anyone else's is replaced).
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Connections from `trusted_proxies` start with a PROXY protocol header (v1
    /// or v2), which names the client.
    pub proxy_protocol: bool,
    /// After SIGTERM, how long the listeners keep accepting (while `/readyz`
    /// already answers 503), so a load balancer in front stops sending first.
    pub shutdown_delay: Duration,
    /// Then open tunnels are closed (1001), spread evenly over this window.
    pub shutdown_spread: Duration,
    /// From the signal, the longest wait for the last tunnel before exiting.
    pub shutdown_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConfig {
    pub host: HostPattern,
    /// Path prefix, matched on segment boundaries: `/ws` matches `/ws` and `/ws/a`,
    /// not `/wsx`.
    pub path: String,
    pub pool: String,
    /// Where a connection's user id comes from, for presence.
    pub identity: Option<IdentitySource>,
    /// `http = "proxy"`: plain HTTP requests are proxied to the pool too (Socket.IO
    /// polling, SignalR negotiation); `"reject"` (the default): 426.
    pub http_proxy: bool,
    /// Browser origins allowed to open WebSockets here, lower-cased
    /// (`https://app.example.com`); others get 403. `None`: any.
    pub origins: Option<Vec<String>>,
}

/// How a pool keeps a client on one backend (`[pool.NAME.sticky]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sticky {
    /// `cookie = "NAME"`: the first response sets a cookie naming the backend by
    /// an opaque token; later requests with it go back there.
    Cookie(String),
    /// `key = "..."`: weighted rendezvous hashing of a request key.
    Key(StickyKey),
}

/// Where a sticky key is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StickyKey {
    Query(String),
    Header(http::HeaderName),
    Cookie(String),
    /// The request path (without the query).
    Path,
}

/// Where the presence identity of a connection is read from in its upgrade request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentitySource {
    /// `query:NAME`: the query parameter NAME.
    Query(String),
    /// `header:NAME`: the request header NAME.
    Header(http::HeaderName),
    /// `cookie:NAME`: the cookie NAME.
    Cookie(String),
}

impl IdentitySource {
    pub fn parse(text: &str) -> Option<IdentitySource> {
        let (kind, name) = text.split_once(':')?;
        let name = name.trim();
        if name.is_empty() {
            return None;
        }
        match kind.trim() {
            "query" => Some(IdentitySource::Query(name.to_string())),
            "header" => http::HeaderName::from_bytes(name.as_bytes())
                .ok()
                .map(IdentitySource::Header),
            "cookie" => Some(IdentitySource::Cookie(name.to_string())),
            _ => None,
        }
    }
}

/// Which `Host` a route answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// `*` or no `host` key.
    Any,
    /// `chat.example.com`, compared without case and without the port.
    Exact(String),
    /// `*.example.com`: any name ending in `.example.com` (not `example.com` itself).
    Suffix(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    pub backends: Vec<BackendConfig>,
    /// TCP connect to one backend.
    pub connect_timeout: Duration,
    /// From the request sent to the backend to its whole response head.
    pub handshake_timeout: Duration,
    /// A tunnel with no traffic either way for this long is closed (1001).
    pub idle_timeout: Duration,
    /// Largest WebSocket message, summed over its fragments, in either direction;
    /// larger closes the connection with 1009.
    pub max_message_size: u64,
    /// After the chosen backend refuses or times out, how many others to try.
    pub retries: usize,
    /// How long a draining backend's tunnels keep running before they are closed.
    pub drain_timeout: Duration,
    /// Those closes (1012) are spread evenly over this window.
    pub drain_spread: Duration,
    /// Once one side has sent a close frame, how long the other has to answer and
    /// close before both sockets are closed.
    pub close_timeout: Duration,
    /// Without active checks: consecutive failed connects or handshakes that eject
    /// a backend for `fail_timeout`.
    pub max_fails: u32,
    pub fail_timeout: Duration,
    /// Upgrades per second this pool admits, across the cluster; over it, 503
    /// with `Retry-After`. `None`: no limit.
    pub max_upgrade_rate: Option<u32>,
    /// A backend just added, re-admitted or appeared in DNS takes, of the new
    /// connections least-connections would give it, the fraction
    /// `max(0.1, t / slow_start)` until `t` reaches it. `None`: off.
    pub slow_start: Option<Duration>,
    /// Active checks; without them every backend counts as healthy.
    pub health: Option<HealthConfig>,
    /// `[pool.NAME.rebalance]`: moves tunnels off overloaded backends.
    pub rebalance: Option<RebalanceConfig>,
    /// Entries `{ dns = "name:port" }`: every A/AAAA record of the name is a
    /// backend of its own.
    pub dns: Vec<DnsBackend>,
    /// How often DNS names are resolved again (sooner when the records' TTL is
    /// shorter).
    pub dns_refresh: Duration,
    /// A proxied HTTP request's time for the backend's response head.
    pub request_timeout: Duration,
    pub sticky: Option<Sticky>,
    /// `[pool.NAME.tls]`: connect to the backends over TLS.
    pub tls: Option<BackendTls>,
    /// Send each backend connection a PROXY protocol header first.
    pub proxy_protocol: Option<ProxyVersion>,
}

/// Which PROXY protocol header a pool sends its backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyVersion {
    V1,
    V2,
}

/// A backend entry that stands for every address of a DNS name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsBackend {
    /// Lower-cased, without the port.
    pub host: String,
    pub port: u16,
    pub weight: NonZeroU32,
    pub max_connections: Option<u64>,
}

impl DnsBackend {
    /// `host:port`, as written.
    pub fn name(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// Rebalancing: a backend holding more than `threshold` × the pool's mean
/// connections per unit of weight (cluster-wide) sheds tunnels (1012), oldest
/// first and at least `min_age` old, until it is back at the mean; at most `rate`
/// closes per second for the pool across the cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct RebalanceConfig {
    pub threshold: f64,
    pub rate: u32,
    pub min_age: Duration,
}

impl Eq for RebalanceConfig {}

impl PoolConfig {
    /// A pool of `backends` with every other setting at its default.
    pub fn with_backends(backends: Vec<BackendConfig>) -> PoolConfig {
        PoolConfig {
            backends,
            connect_timeout: defaults::CONNECT_TIMEOUT,
            handshake_timeout: defaults::BACKEND_HANDSHAKE_TIMEOUT,
            idle_timeout: defaults::IDLE_TIMEOUT,
            max_message_size: defaults::MAX_MESSAGE_SIZE,
            retries: defaults::RETRIES,
            drain_timeout: defaults::DRAIN_TIMEOUT,
            drain_spread: defaults::DRAIN_SPREAD,
            close_timeout: defaults::CLOSE_TIMEOUT,
            max_fails: defaults::MAX_FAILS,
            fail_timeout: defaults::FAIL_TIMEOUT,
            max_upgrade_rate: None,
            slow_start: None,
            health: None,
            rebalance: None,
            dns: Vec::new(),
            dns_refresh: defaults::DNS_REFRESH,
            request_timeout: defaults::REQUEST_TIMEOUT,
            sticky: None,
            tls: None,
            proxy_protocol: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    pub addr: BackendAddr,
    pub weight: NonZeroU32,
    /// `drain = true`: no new connections; its tunnels are closed after the pool's
    /// `drain_timeout`.
    pub drain: bool,
    /// Connections it may hold across the cluster; a full backend is not picked.
    pub max_connections: Option<u64>,
}

/// Where a backend listens: an IP literal is parsed once here, a name is resolved
/// on every connect so DNS changes are followed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum BackendAddr {
    Ip(SocketAddr),
    Name { host: String, port: u16 },
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendAddr::Ip(addr) => addr.fmt(f),
            BackendAddr::Name { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

impl BackendAddr {
    pub fn parse(text: &str) -> Option<BackendAddr> {
        if let Ok(addr) = text.parse::<SocketAddr>() {
            return Some(BackendAddr::Ip(addr));
        }
        let (host, port) = text.rsplit_once(':')?;
        let port = port.parse::<u16>().ok().filter(|p| *p != 0)?;
        let valid_name = !host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && !label.starts_with('-')
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        valid_name.then(|| BackendAddr::Name {
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

/// Why a configuration was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", render_problems(.path, .problems))]
    Invalid {
        path: String,
        problems: Vec<Problem>,
    },
}

impl ConfigError {
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Read { .. } => &[],
            ConfigError::Invalid { problems, .. } => problems,
        }
    }
}

/// One mistake in a file, where it is and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub line: usize,
    pub column: usize,
    /// Dotted key, like `pool.chat.backends[1].addr`.
    pub key: String,
    pub message: String,
    pub fix: String,
}

fn render_problems(path: &str, problems: &[Problem]) -> String {
    let mut out = String::new();
    for (i, p) in problems.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&format!(
            "{path}:{}:{}: {}: {}\n  fix: {}",
            p.line, p.column, p.key, p.message, p.fix
        ));
    }
    out
}

impl Config {
    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::parse(&text, &path.display().to_string())
    }

    /// Validates TOML text; `path` only names the file in errors.
    pub fn parse(text: &str, path: &str) -> Result<Config, ConfigError> {
        let base = Path::new(path)
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let mut report = Report::new(text, base);
        let raw = report.deserialize(text);
        let config = raw.map(|raw| report.validate(raw));
        match config {
            Some(config) if report.problems.is_empty() => Ok(config),
            _ => {
                let mut problems = report.problems;
                problems.sort_by_key(|p| (p.line, p.column));
                Err(ConfigError::Invalid {
                    path: path.to_string(),
                    problems,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::raw::parse_size;
    use super::*;

    const GOOD: &str = r#"
[server]
listen = ["127.0.0.1:8080"]

[[route]]
host = "*.example.com"
path = "/ws/"
pool = "chat"

[pool.chat]
backends = [{ addr = "127.0.0.1:9000" }, { addr = "chat-2.internal:9000", weight = 2 }]
max_message_size = "1MiB"
idle_timeout = "30s"
"#;

    #[test]
    fn parses_a_good_file() {
        let config = Config::parse(GOOD, "proxy.toml").expect("valid");
        assert_eq!(
            config.server.listen,
            vec!["127.0.0.1:8080".parse().unwrap()]
        );
        assert_eq!(
            config.routes[0].host,
            HostPattern::Suffix(".example.com".into())
        );
        assert_eq!(config.routes[0].path, "/ws");
        let pool = &config.pools["chat"];
        assert_eq!(pool.max_message_size, 1024 * 1024);
        assert_eq!(pool.idle_timeout, Duration::from_secs(30));
        assert_eq!(pool.backends[1].weight.get(), 2);
        assert_eq!(
            pool.backends[1].addr,
            BackendAddr::Name {
                host: "chat-2.internal".into(),
                port: 9000
            }
        );
    }

    #[test]
    fn reports_every_problem_with_its_position() {
        let text = "[server]\nlisten = [\"nowhere\"]\nlisten_backlog = 5\n\n[[route]]\npath = \"/ws\"\npool = \"missing\"\n\n[pool.chat]\nbackends = [{ addr = \"10.0.0.1\", weight = 0, colour = \"red\" }]\n";
        let err = Config::parse(text, "x.toml").expect_err("invalid");
        let found: Vec<(usize, usize, &str)> = err
            .problems()
            .iter()
            .map(|p| (p.line, p.column, p.key.as_str()))
            .collect();
        assert_eq!(
            found,
            vec![
                (2, 11, "server.listen[0]"),
                (3, 1, "server.listen_backlog"),
                (7, 8, "route[0].pool"),
                (10, 22, "pool.chat.backends[0].addr"),
                (10, 43, "pool.chat.backends[0].weight"),
                (10, 46, "pool.chat.backends[0].colour"),
            ]
        );
        let shown = err.to_string();
        assert!(
            shown.contains("x.toml:7:8: route[0].pool: no pool named `missing`"),
            "{shown}"
        );
        assert!(
            shown.contains("fix: define [pool.missing], or name one of: chat"),
            "{shown}"
        );
    }

    #[test]
    fn client_trust_and_limits_are_checked() {
        let text = "[server]\nlisten = [\"127.0.0.1:1\"]\nproxy_protocol = true\nmax_upgrades_per_ip = 0\n\n[[route]]\npath = \"/ws\"\npool = \"chat\"\norigins = [\"app.example.com\", \"https://ok.example.com:443\"]\nhttp = \"proxy\"\n\n[pool.chat]\nbackends = [{ addr = \"10.0.0.1:80\" }]\nproxy_protocol = \"v3\"\n";
        let err = Config::parse(text, "x.toml").expect_err("invalid");
        let found: Vec<&str> = err.problems().iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            found,
            vec![
                "server.proxy_protocol",
                "server.max_upgrades_per_ip",
                "route[0].origins[0]",
                "pool.chat.proxy_protocol",
            ],
            "{err}"
        );
        let text = "[server]\nlisten = [\"127.0.0.1:1\"]\ntrusted_proxies = [\"10.0.0.0/8\", \"fd00::1\", \"nonsense\"]\n";
        let err = Config::parse(text, "x.toml").expect_err("invalid");
        assert_eq!(err.problems()[0].key, "server.trusted_proxies[2]", "{err}");
        let good = "[server]\nlisten = [\"127.0.0.1:1\"]\ntrusted_proxies = [\"10.1.2.3/8\", \"fd00::1\"]\nproxy_protocol = true\n\n[[route]]\npath = \"/ws\"\npool = \"chat\"\norigins = [\"HTTPS://App.Example.com:443\", \"http://localhost:8080\"]\n\n[pool.chat]\nbackends = [{ addr = \"10.0.0.1:80\" }]\nproxy_protocol = \"v2\"\n";
        let config = Config::parse(good, "x.toml").expect("valid");
        assert_eq!(
            config.server.trusted_proxies,
            vec![
                "10.0.0.0/8".parse::<ipnet::IpNet>().unwrap(),
                "fd00::1/128".parse().unwrap()
            ]
        );
        assert_eq!(
            config.routes[0].origins,
            Some(vec![
                "https://app.example.com".into(),
                "http://localhost:8080".into()
            ])
        );
        assert_eq!(config.pools["chat"].proxy_protocol, Some(ProxyVersion::V2));
        assert!(config.server.strict_frames);
    }

    #[test]
    fn a_type_error_has_a_position() {
        let err =
            Config::parse("[server]\nlisten = \"0.0.0.0:1\"\n", "x.toml").expect_err("invalid");
        let p = &err.problems()[0];
        assert_eq!((p.line, p.column), (2, 10), "{err}");
    }

    #[test]
    fn sizes_and_addresses() {
        assert_eq!(parse_size("64KiB"), Some(65536));
        assert_eq!(parse_size("3"), Some(3));
        assert_eq!(parse_size("3 parsecs"), None);
        assert!(BackendAddr::parse("[::1]:80").is_some());
        assert!(BackendAddr::parse("host:0").is_none());
        assert!(BackendAddr::parse("bad host:80").is_none());
        assert!(BackendAddr::parse("10.0.0.1").is_none());
    }
}

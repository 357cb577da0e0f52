//! `proxy.toml`: the raw serde mirror of the file and the validated [`Config`] built
//! from it. Nothing past this module sees a string that still needs parsing.
//!
//! Every problem in a file is reported at once, each with `file:line:col`, the key and
//! the fix, so `wsgate check` is one edit-and-rerun loop rather than one per mistake.
//! Unknown keys are collected with `serde_ignored` instead of failing on the first one
//! with `deny_unknown_fields`: the file is still rejected, but with every error listed.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    /// In file order: the first matching route wins.
    pub routes: Vec<RouteConfig>,
    pub pools: BTreeMap<String, PoolConfig>,
    pub cluster: ClusterConfig,
    pub admin: AdminConfig,
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
            message_metrics: true,
        }
    }
}

/// Active health checks of a pool's backends, with hysteresis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthConfig {
    pub interval: Duration,
    pub timeout: Duration,
    /// `GET path` must answer 2xx; without it, a TCP connect is the check.
    pub path: Option<String>,
    /// Consecutive failures (checks or connects) that eject a backend.
    pub unhealthy_after: u32,
    /// Consecutive successful checks that bring it back.
    pub healthy_after: u32,
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
    /// This instance's name in Redis and in presence records.
    pub instance_id: String,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            redis: None,
            name: "wsgate".to_string(),
            heartbeat: defaults::HEARTBEAT,
            instance_id: generated_instance_id(),
        }
    }
}

/// `HOSTNAME-xxxxxx`: readable in redis-cli, unique across restarts.
fn generated_instance_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| valid_name(h))
        .unwrap_or_else(|| "wsgate".to_string());
    format!("{host}-{:06x}", fastrand::u32(..0x100_0000))
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: Vec<SocketAddr>,
    /// Connections (handshaking or proxied) held at once; the accept loop waits for a
    /// free slot before accepting, so overload queues in the kernel's backlog.
    pub max_connections: usize,
    /// How long a client has to send its whole upgrade request.
    pub handshake_timeout: Duration,
    /// Largest request head (request line + headers) accepted; larger gets 431.
    pub max_header_bytes: usize,
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub host: HostPattern,
    /// Path prefix, matched on segment boundaries: `/ws` matches `/ws` and `/ws/a`,
    /// not `/wsx`.
    pub path: String,
    pub pool: String,
    /// Where a connection's user id comes from, for presence.
    pub identity: Option<IdentitySource>,
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

#[derive(Debug, Clone)]
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
    /// Active checks; without them every backend counts as healthy.
    pub health: Option<HealthConfig>,
}

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
            health: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    pub addr: BackendAddr,
    pub weight: NonZeroU32,
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

pub mod defaults {
    use std::time::Duration;
    pub const MAX_CONNECTIONS: usize = 50_000;
    pub const CLIENT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
    pub const MAX_HEADER_BYTES: usize = 16 * 1024;
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
    pub const BACKEND_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
    pub const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
    pub const MAX_MESSAGE_SIZE: u64 = 16 * 1024 * 1024;
    pub const RETRIES: usize = 2;
    pub const HEARTBEAT: Duration = Duration::from_secs(1);
}

/// hyper will not read request heads into a buffer smaller than this.
const MIN_HEADER_BYTES: u64 = 8192;
const MAX_HEADER_BYTES_LIMIT: u64 = 1024 * 1024;
const MAX_RETRIES: u64 = 16;

/// Why a configuration was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
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
        let mut report = Report::new(text);
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

// ---- raw layer: mirrors proxy.toml ----

#[derive(Deserialize)]
struct RawConfig {
    server: RawServer,
    #[serde(default)]
    route: Vec<Spanned<RawRoute>>,
    #[serde(default)]
    pool: BTreeMap<String, RawPool>,
    cluster: Option<RawCluster>,
    admin: Option<RawAdmin>,
}

#[derive(Deserialize)]
struct RawAdmin {
    listen: Option<Spanned<String>>,
    token: Option<Spanned<String>>,
    message_metrics: Option<bool>,
}

#[derive(Deserialize)]
struct RawHealth {
    interval: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    path: Option<Spanned<String>>,
    unhealthy_after: Option<Spanned<i64>>,
    healthy_after: Option<Spanned<i64>>,
}
#[derive(Deserialize)]
struct RawCluster {
    redis: Option<Spanned<String>>,
    name: Option<Spanned<String>>,
    heartbeat: Option<Spanned<String>>,
    instance_id: Option<Spanned<String>>,
}

#[derive(Deserialize)]
struct RawServer {
    listen: Spanned<Vec<Spanned<String>>>,
    max_connections: Option<Spanned<i64>>,
    handshake_timeout: Option<Spanned<String>>,
    max_header_bytes: Option<Spanned<RawSize>>,
}

#[derive(Deserialize)]
struct RawRoute {
    host: Option<Spanned<String>>,
    path: Spanned<String>,
    pool: Spanned<String>,
    identity: Option<Spanned<String>>,
}

#[derive(Deserialize)]
struct RawPool {
    #[serde(default)]
    backends: Vec<Spanned<RawBackend>>,
    connect_timeout: Option<Spanned<String>>,
    handshake_timeout: Option<Spanned<String>>,
    idle_timeout: Option<Spanned<String>>,
    max_message_size: Option<Spanned<RawSize>>,
    retries: Option<Spanned<i64>>,
    health: Option<RawHealth>,
}

#[derive(Deserialize)]
struct RawBackend {
    addr: Spanned<String>,
    weight: Option<Spanned<i64>>,
}

/// A size: a byte count, or a string with a unit (`"64KiB"`, `"16MiB"`).
#[derive(Deserialize)]
#[serde(untagged)]
enum RawSize {
    Bytes(i64),
    Text(String),
}

impl RawSize {
    fn bytes(&self) -> Option<u64> {
        match self {
            RawSize::Bytes(n) => u64::try_from(*n).ok(),
            RawSize::Text(text) => parse_size(text),
        }
    }
}

fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" | "KB" | "k" => 1024,
        "MiB" | "M" | "MB" => 1024 * 1024,
        "GiB" | "G" | "GB" => 1024 * 1024 * 1024,
        _ => return None,
    };
    number.checked_mul(scale)
}

// ---- validation ----

/// Collects problems while the raw layer is turned into typed config.
struct Report<'a> {
    text: &'a str,
    /// The same text parsed without types: where keys are, for errors.
    table: Option<Spanned<DeTable<'a>>>,
    problems: Vec<Problem>,
}

impl<'a> Report<'a> {
    fn new(text: &'a str) -> Self {
        Report {
            text,
            table: DeTable::parse(text).ok(),
            problems: Vec::new(),
        }
    }

    fn push(&mut self, span: Range<usize>, key: impl Into<String>, message: String, fix: &str) {
        let (line, column) = line_col(self.text, span.start);
        self.problems.push(Problem {
            line,
            column,
            key: key.into(),
            message,
            fix: fix.to_string(),
        });
    }

    fn deserialize(&mut self, text: &str) -> Option<RawConfig> {
        let deserializer = match toml::de::Deserializer::parse(text) {
            Ok(d) => d,
            Err(e) => {
                self.push_toml_error(&e);
                return None;
            }
        };
        let mut unknown = Vec::new();
        let raw: Result<RawConfig, _> =
            serde_ignored::deserialize(deserializer, |path| unknown.push(segments(&path)));
        for path in unknown {
            let span = self.span_of(&path);
            self.push(
                span,
                dotted(&path),
                "unknown key".to_string(),
                "remove it, or check its spelling against the keys documented in proxy.toml",
            );
        }
        match raw {
            Ok(raw) => Some(raw),
            Err(e) => {
                self.push_toml_error(&e);
                None
            }
        }
    }

    fn span_of(&self, path: &[Segment]) -> Range<usize> {
        self.table
            .as_ref()
            .and_then(|t| key_span(t.get_ref(), path))
            .unwrap_or(0..0)
    }

    fn push_toml_error(&mut self, e: &toml::de::Error) {
        let span = e.span().unwrap_or(0..0);
        self.push(
            span,
            "(file)",
            e.message().trim().to_string(),
            "correct the TOML at this position; proxy.toml documents every key and its type",
        );
    }

    fn validate(&mut self, raw: RawConfig) -> Config {
        let server = self.server(raw.server);
        let mut pools = BTreeMap::new();
        for (name, pool) in raw.pool {
            let key = format!("pool.{name}");
            if !valid_name(&name) {
                let span = self.span_of(&[Segment::Key("pool".into()), Segment::Key(name.clone())]);
                self.push(
                    span,
                    key.clone(),
                    format!("pool name `{name}` is not allowed"),
                    "use letters, digits, `-` and `_` only",
                );
            }
            let pool = self.pool(&key, pool);
            pools.insert(name, pool);
        }
        let mut routes = Vec::new();
        for (i, route) in raw.route.into_iter().enumerate() {
            if let Some(route) = self.route(i, route, &pools) {
                routes.push(route);
            }
        }
        let cluster = self.cluster(raw.cluster);
        let admin = self.admin(raw.admin, &server);
        Config {
            server,
            routes,
            pools,
            cluster,
            admin,
        }
    }

    fn admin(&mut self, raw: Option<RawAdmin>, server: &ServerConfig) -> AdminConfig {
        let mut admin = AdminConfig::default();
        let Some(raw) = raw else { return admin };
        if let Some(listen) = raw.listen {
            match listen.get_ref().parse::<SocketAddr>() {
                Ok(a) if server.listen.contains(&a) && a.port() != 0 => self.push(
                    listen.span(),
                    "admin.listen",
                    format!("{a} is also a [server] listen address"),
                    "give the admin listener an address of its own, like \"127.0.0.1:9090\"",
                ),
                Ok(a) => admin.listen = Some(a),
                Err(_) => self.push(
                    listen.span(),
                    "admin.listen",
                    format!("`{}` is not an IP address with a port", listen.get_ref()),
                    "write an IP address and port, like \"127.0.0.1:9090\"",
                ),
            }
        }
        if let Some(token) = raw.token {
            if token.get_ref().len() >= 16 && token.get_ref().bytes().all(|b| b.is_ascii_graphic())
            {
                admin.token = Some(token.into_inner());
            } else {
                self.push(
                    token.span(),
                    "admin.token",
                    "the token is too short or has spaces".into(),
                    "use 16 or more printable characters without spaces",
                );
            }
        }
        admin.message_metrics = raw.message_metrics.unwrap_or(true);
        admin
    }

    fn health(&mut self, key: &str, raw: RawHealth) -> HealthConfig {
        let path = raw.path.and_then(|p| {
            if p.get_ref().starts_with('/') && !p.get_ref().contains([' ', '\r', '\n']) {
                Some(p.into_inner())
            } else {
                self.push(
                    p.span(),
                    format!("{key}.path"),
                    format!("`{}` is not a path", p.get_ref()),
                    "write a path that starts with `/`, like \"/health\"",
                );
                None
            }
        });
        HealthConfig {
            interval: self.duration(
                raw.interval.as_ref(),
                &format!("{key}.interval"),
                Duration::from_secs(5),
            ),
            timeout: self.duration(
                raw.timeout.as_ref(),
                &format!("{key}.timeout"),
                Duration::from_secs(2),
            ),
            path,
            unhealthy_after: raw
                .unhealthy_after
                .map(|v| self.integer(&v, &format!("{key}.unhealthy_after"), 1, 100, 2))
                .unwrap_or(2) as u32,
            healthy_after: raw
                .healthy_after
                .map(|v| self.integer(&v, &format!("{key}.healthy_after"), 1, 100, 2))
                .unwrap_or(2) as u32,
        }
    }

    fn cluster(&mut self, raw: Option<RawCluster>) -> ClusterConfig {
        let mut cluster = ClusterConfig::default();
        let Some(raw) = raw else { return cluster };
        if let Some(url) = raw.redis {
            let scheme_ok =
                url.get_ref().starts_with("redis://") || url.get_ref().starts_with("rediss://");
            match redis::Client::open(url.get_ref().as_str()) {
                Ok(_) if scheme_ok => cluster.redis = Some(url.into_inner()),
                _ => self.push(
                    url.span(),
                    "cluster.redis",
                    format!("`{}` is not a Redis URL", url.get_ref()),
                    "write redis://[:password@]host:port/db, or rediss:// for TLS",
                ),
            }
        }
        for (value, key, target) in [
            (raw.name, "cluster.name", &mut cluster.name),
            (
                raw.instance_id,
                "cluster.instance_id",
                &mut cluster.instance_id,
            ),
        ] {
            let Some(value) = value else { continue };
            if valid_name(value.get_ref()) && value.get_ref().len() <= 64 {
                *target = value.into_inner();
            } else {
                self.push(
                    value.span(),
                    key,
                    format!("`{}` is not allowed here", value.get_ref()),
                    "use up to 64 letters, digits, `-` and `_`",
                );
            }
        }
        cluster.heartbeat = self.duration(
            raw.heartbeat.as_ref(),
            "cluster.heartbeat",
            defaults::HEARTBEAT,
        );
        if cluster.heartbeat < Duration::from_millis(50) {
            if let Some(h) = &raw.heartbeat {
                self.push(
                    h.span(),
                    "cluster.heartbeat",
                    "a heartbeat under 50ms would load Redis for nothing".into(),
                    "use 50ms or more; 1s suits most fleets",
                );
            }
            cluster.heartbeat = defaults::HEARTBEAT;
        }
        cluster
    }

    fn server(&mut self, raw: RawServer) -> ServerConfig {
        let mut listen = Vec::new();
        if raw.listen.get_ref().is_empty() {
            self.push(
                raw.listen.span(),
                "server.listen",
                "no listen address".into(),
                "add one, like listen = [\"0.0.0.0:8080\"]",
            );
        }
        for (i, addr) in raw.listen.into_inner().into_iter().enumerate() {
            let key = format!("server.listen[{i}]");
            match addr.get_ref().parse::<SocketAddr>() {
                Ok(a) if listen.contains(&a) => self.push(
                    addr.span(),
                    key,
                    format!("{a} is listed twice"),
                    "remove the duplicate",
                ),
                Ok(a) => listen.push(a),
                Err(_) => self.push(
                    addr.span(),
                    key,
                    format!("`{}` is not an IP address with a port", addr.get_ref()),
                    "write an IP address and port, like \"0.0.0.0:8080\" or \"[::]:8080\"",
                ),
            }
        }
        let max_connections = raw
            .max_connections
            .map(|v| {
                self.integer(
                    &v,
                    "server.max_connections",
                    1,
                    u32::MAX as u64,
                    defaults::MAX_CONNECTIONS as u64,
                )
            })
            .unwrap_or(defaults::MAX_CONNECTIONS as u64) as usize;
        let handshake_timeout = self.duration(
            raw.handshake_timeout.as_ref(),
            "server.handshake_timeout",
            defaults::CLIENT_HANDSHAKE_TIMEOUT,
        );
        let max_header_bytes = self.size(
            raw.max_header_bytes.as_ref(),
            "server.max_header_bytes",
            MIN_HEADER_BYTES..=MAX_HEADER_BYTES_LIMIT,
            defaults::MAX_HEADER_BYTES as u64,
        ) as usize;
        ServerConfig {
            listen,
            max_connections,
            handshake_timeout,
            max_header_bytes,
        }
    }

    fn pool(&mut self, key: &str, raw: RawPool) -> PoolConfig {
        let mut backends: Vec<BackendConfig> = Vec::new();
        for (i, backend) in raw.backends.into_iter().enumerate() {
            let backend = backend.into_inner();
            let bkey = format!("{key}.backends[{i}]");
            let weight = match backend.weight {
                None => NonZeroU32::MIN,
                Some(w) => {
                    let n = self.integer(&w, &format!("{bkey}.weight"), 1, 1000, 1);
                    NonZeroU32::new(n as u32).unwrap_or(NonZeroU32::MIN)
                }
            };
            match BackendAddr::parse(backend.addr.get_ref()) {
                Some(addr) if backends.iter().any(|b| b.addr == addr) => self.push(
                    backend.addr.span(),
                    format!("{bkey}.addr"),
                    format!("backend {addr} is listed twice in this pool"),
                    "remove the duplicate, or raise the first one's weight",
                ),
                Some(addr) => backends.push(BackendConfig { addr, weight }),
                None => self.push(
                    backend.addr.span(),
                    format!("{bkey}.addr"),
                    format!("`{}` is not a host:port address", backend.addr.get_ref()),
                    "write host:port, like \"10.0.0.1:9000\", \"[::1]:9000\" or \"chat-1.internal:9000\"",
                ),
            }
        }
        PoolConfig {
            backends,
            connect_timeout: self.duration(
                raw.connect_timeout.as_ref(),
                &format!("{key}.connect_timeout"),
                defaults::CONNECT_TIMEOUT,
            ),
            handshake_timeout: self.duration(
                raw.handshake_timeout.as_ref(),
                &format!("{key}.handshake_timeout"),
                defaults::BACKEND_HANDSHAKE_TIMEOUT,
            ),
            idle_timeout: self.duration(
                raw.idle_timeout.as_ref(),
                &format!("{key}.idle_timeout"),
                defaults::IDLE_TIMEOUT,
            ),
            max_message_size: self.size(
                raw.max_message_size.as_ref(),
                &format!("{key}.max_message_size"),
                1..=u64::from(u32::MAX) * 4,
                defaults::MAX_MESSAGE_SIZE,
            ),
            retries: raw
                .retries
                .map(|r| {
                    self.integer(
                        &r,
                        &format!("{key}.retries"),
                        0,
                        MAX_RETRIES,
                        defaults::RETRIES as u64,
                    )
                })
                .unwrap_or(defaults::RETRIES as u64) as usize,
            health: raw.health.map(|h| self.health(&format!("{key}.health"), h)),
        }
    }

    fn route(
        &mut self,
        index: usize,
        raw: Spanned<RawRoute>,
        pools: &BTreeMap<String, PoolConfig>,
    ) -> Option<RouteConfig> {
        let raw = raw.into_inner();
        let key = format!("route[{index}]");
        let mut ok = true;
        let host = match &raw.host {
            None => HostPattern::Any,
            Some(h) => match parse_host_pattern(h.get_ref()) {
                Some(p) => p,
                None => {
                    ok = false;
                    self.push(
                        h.span(),
                        format!("{key}.host"),
                        format!("`{}` is not a host name or pattern", h.get_ref()),
                        "write a name (\"chat.example.com\"), a wildcard (\"*.example.com\") or \"*\"",
                    );
                    HostPattern::Any
                }
            },
        };
        let path = raw.path.get_ref();
        if !path.starts_with('/') || path.contains(['?', '#', ' ']) {
            ok = false;
            self.push(
                raw.path.span(),
                format!("{key}.path"),
                format!("`{path}` is not a path prefix"),
                "start it with `/` and leave out any query, like path = \"/ws\"",
            );
        }
        let pool = raw.pool.get_ref();
        if !pools.contains_key(pool) {
            ok = false;
            let known: Vec<&str> = pools.keys().map(String::as_str).collect();
            let fix = if known.is_empty() {
                format!("define the pool with a [pool.{pool}] table")
            } else {
                format!("define [pool.{pool}], or name one of: {}", known.join(", "))
            };
            self.push(
                raw.pool.span(),
                format!("{key}.pool"),
                format!("no pool named `{pool}`"),
                &fix,
            );
        }
        let identity = match &raw.identity {
            None => None,
            Some(text) => {
                let parsed = IdentitySource::parse(text.get_ref());
                if parsed.is_none() {
                    ok = false;
                    self.push(
                        text.span(),
                        format!("{key}.identity"),
                        format!("`{}` is not an identity source", text.get_ref()),
                        "write \"query:NAME\", \"header:NAME\" or \"cookie:NAME\"",
                    );
                }
                parsed
            }
        };
        ok.then(|| RouteConfig {
            host,
            path: normalize_prefix(path),
            pool: pool.clone(),
            identity,
        })
    }

    fn integer(
        &mut self,
        value: &Spanned<i64>,
        key: &str,
        min: u64,
        max: u64,
        default: u64,
    ) -> u64 {
        match u64::try_from(*value.get_ref()) {
            Ok(n) if (min..=max).contains(&n) => n,
            _ => {
                self.push(
                    value.span(),
                    key,
                    format!("{} is out of range", value.get_ref()),
                    &format!("use a whole number from {min} to {max}"),
                );
                default
            }
        }
    }

    fn duration(
        &mut self,
        value: Option<&Spanned<String>>,
        key: &str,
        default: Duration,
    ) -> Duration {
        let Some(value) = value else { return default };
        match humantime::parse_duration(value.get_ref()) {
            Ok(d) if !d.is_zero() => d,
            _ => {
                self.push(
                    value.span(),
                    key,
                    format!("`{}` is not a positive duration", value.get_ref()),
                    "write a number with a unit, like \"500ms\", \"10s\" or \"5m\"",
                );
                default
            }
        }
    }

    fn size(
        &mut self,
        value: Option<&Spanned<RawSize>>,
        key: &str,
        range: std::ops::RangeInclusive<u64>,
        default: u64,
    ) -> u64 {
        let Some(value) = value else { return default };
        match value.get_ref().bytes() {
            Some(n) if range.contains(&n) => n,
            _ => {
                self.push(
                    value.span(),
                    key,
                    "not a size in range".into(),
                    &format!(
                        "write a byte count or a size like \"64KiB\" or \"16MiB\", from {} to {} bytes",
                        range.start(),
                        range.end()
                    ),
                );
                default
            }
        }
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn parse_host_pattern(text: &str) -> Option<HostPattern> {
    let text = text.trim().to_ascii_lowercase();
    if text == "*" {
        return Some(HostPattern::Any);
    }
    let (suffix, name) = match text.strip_prefix("*.") {
        Some(rest) => (true, rest.to_string()),
        None => (false, text),
    };
    let valid = !name.is_empty()
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if !valid {
        return None;
    }
    Some(if suffix {
        HostPattern::Suffix(format!(".{name}"))
    } else {
        HostPattern::Exact(name)
    })
}

/// `/ws/` and `/ws` match the same requests; keep one spelling.
fn normalize_prefix(path: &str) -> String {
    let trimmed = path.trim_end_matches('/');
    if trimmed.is_empty() {
        "/".to_string()
    } else {
        trimmed.to_string()
    }
}

/// 1-based line and column (in characters) of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Key(String),
    Index(usize),
}

/// The path serde_ignored reports, without the fields `Spanned` adds.
fn segments(path: &serde_ignored::Path<'_>) -> Vec<Segment> {
    use serde_ignored::Path;
    let mut out = match path {
        Path::Root => return Vec::new(),
        Path::Seq { parent, .. }
        | Path::Map { parent, .. }
        | Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => segments(parent),
    };
    match path {
        Path::Seq { index, .. } => out.push(Segment::Index(*index)),
        Path::Map { key, .. } if !key.starts_with("$__serde_spanned") => {
            out.push(Segment::Key(key.clone()))
        }
        _ => {}
    }
    out
}

fn dotted(path: &[Segment]) -> String {
    let mut out = String::new();
    for segment in path {
        match segment {
            Segment::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Segment::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// The span of the last key of `path` in the untyped document.
fn key_span(table: &DeTable<'_>, path: &[Segment]) -> Option<Range<usize>> {
    let (Segment::Key(first), rest) = path.split_first()? else {
        return None;
    };
    let (key, value) = table.get_key_value(first.as_str())?;
    let mut span = key.span();
    let mut value: &DeValue<'_> = value.get_ref();
    for segment in rest {
        match (segment, value) {
            (Segment::Key(k), DeValue::Table(t)) => {
                let (key, v) = t.get_key_value(k.as_str())?;
                span = key.span();
                value = v.get_ref();
            }
            (Segment::Index(i), DeValue::Array(a)) => {
                let v = a.get(*i)?;
                span = v.span();
                value = v.get_ref();
            }
            _ => return None,
        }
    }
    Some(span)
}

#[cfg(test)]
mod tests {
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

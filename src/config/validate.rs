//! Validation: the raw layer turned into typed config, every problem collected
//! with its position, key and fix. Defaults and ranges come from [`defaults`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::ops::RangeInclusive;
use std::time::Duration;

use toml::Spanned;

use super::defaults::{MAX_DURATION, POSITIVE};
use super::diagnostics::{Report, Segment};
use super::raw::*;
use super::*;

impl Report<'_> {
    pub(super) fn validate(&mut self, raw: RawConfig) -> Config {
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
        let tls = raw.tls.and_then(|t| self.tls(t, &server));
        let cluster = self.cluster(raw.cluster);
        let admin = self.admin(raw.admin, &server);
        let mut nameservers = Vec::new();
        for (i, ns) in raw
            .resolver
            .and_then(|r| r.nameservers)
            .unwrap_or_default()
            .into_iter()
            .enumerate()
        {
            match ns.get_ref().parse::<SocketAddr>() {
                Ok(a) => nameservers.push(a),
                Err(_) => self.push(
                    ns.span(),
                    format!("resolver.nameservers[{i}]"),
                    format!("`{}` is not an IP address with a port", ns.get_ref()),
                    "write an IP address and port, like \"10.96.0.10:53\"",
                ),
            }
        }
        let log = LogConfig {
            access: match raw.log.and_then(|l| l.access) {
                None => AccessLog::Stderr,
                Some(a) => match a.get_ref().trim() {
                    "stderr" => AccessLog::Stderr,
                    "off" => AccessLog::Off,
                    "" => {
                        self.push(
                            a.span(),
                            "log.access",
                            "an empty access log path".into(),
                            "write \"stderr\", \"off\" or a file path like \"/var/log/wsgate/access.log\"",
                        );
                        AccessLog::Stderr
                    }
                    path => AccessLog::File(path.into()),
                },
            },
        };
        Config {
            server,
            routes,
            pools,
            cluster,
            admin,
            nameservers,
            tls,
            log,
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
            if token.get_ref().len() >= defaults::MIN_TOKEN_LEN
                && token.get_ref().bytes().all(|b| b.is_ascii_graphic())
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
        admin.message_metrics = raw.message_metrics.unwrap_or(defaults::MESSAGE_METRICS);
        admin
    }

    /// `[tls]`: every certificate is loaded here, so `wsgate check` and a reload
    /// report an unreadable file, a key that does not match its certificate or an
    /// expired certificate, at the key's position.
    fn tls(&mut self, raw: RawTls, server: &ServerConfig) -> Option<TlsConfig> {
        let mut listen = Vec::new();
        for (i, addr) in raw.listen.iter().enumerate() {
            match addr.get_ref().parse::<SocketAddr>() {
                Ok(a) if server.listen.contains(&a) && a.port() != 0 => self.push(
                    addr.span(),
                    format!("tls.listen[{i}]"),
                    format!("{a} is also a [server] listen address"),
                    "give TLS a port of its own, like \"0.0.0.0:8443\"",
                ),
                Ok(a) => listen.push(a),
                Err(_) => self.push(
                    addr.span(),
                    format!("tls.listen[{i}]"),
                    format!("`{}` is not an IP address with a port", addr.get_ref()),
                    "write an IP address and port, like \"0.0.0.0:8443\"",
                ),
            }
        }
        let min_version = match raw.min_version.as_ref().map(|v| v.get_ref().as_str()) {
            None | Some("1.2") => TlsVersion::V1_2,
            Some("1.3") => TlsVersion::V1_3,
            Some(other) => {
                let span = raw.min_version.as_ref().map(|v| v.span()).unwrap_or(0..0);
                self.push(
                    span,
                    "tls.min_version",
                    format!("`{other}` is not a TLS version wsgate offers"),
                    "write \"1.2\" or \"1.3\"",
                );
                TlsVersion::V1_2
            }
        };
        let mut certs = Vec::new();
        for (i, entry) in raw.cert.into_iter().enumerate() {
            let entry = entry.into_inner();
            let paths = CertPaths {
                cert: self.base.join(entry.cert.get_ref()),
                key: self.base.join(entry.key.get_ref()),
            };
            if let Err(e) = crate::tls::load(&paths.cert, &paths.key) {
                let span = match e {
                    crate::tls::TlsError::NoKey { .. }
                    | crate::tls::TlsError::BadKey { .. }
                    | crate::tls::TlsError::Mismatch { .. } => entry.key.span(),
                    crate::tls::TlsError::Read { ref path, .. } if *path == paths.key => {
                        entry.key.span()
                    }
                    _ => entry.cert.span(),
                };
                self.push(
                    span,
                    format!("tls.cert[{i}]"),
                    crate::Chain(&e).to_string(),
                    "point cert at a PEM chain and key at its PKCS#8, RSA or EC key, both readable, the certificate not expired",
                );
            }
            certs.push(paths);
        }
        if certs.is_empty() && !listen.is_empty() {
            self.push(
                0..0,
                "tls.cert",
                "TLS listeners need a certificate".into(),
                "add [[tls.cert]] with cert = \"chain.pem\" and key = \"key.pem\"",
            );
        }
        Some(TlsConfig {
            listen,
            http2: raw.http2.unwrap_or(true),
            min_version,
            certs,
        })
    }

    fn backend_tls(&mut self, key: &str, raw: RawBackendTls) -> BackendTls {
        let path = |p: &Option<Spanned<String>>| p.as_ref().map(|p| self.base.join(p.get_ref()));
        let tls = BackendTls {
            ca: path(&raw.ca),
            server_name: raw.server_name.as_ref().map(|s| s.get_ref().clone()),
            cert: path(&raw.cert),
            key: path(&raw.key),
        };
        if let Err(e) = crate::tls::client_config(&tls) {
            let span = raw
                .ca
                .as_ref()
                .or(raw.cert.as_ref())
                .map(|s| s.span())
                .unwrap_or(0..0);
            self.push(
                span,
                key.to_string(),
                crate::Chain(&e).to_string(),
                "point ca at a PEM bundle of CAs, and cert/key at a readable client certificate and key",
            );
        }
        tls
    }

    fn sticky(&mut self, key: &str, raw: RawSticky) -> Option<Sticky> {
        match (raw.cookie, raw.key) {
            (Some(cookie), None) => {
                let name = cookie.get_ref();
                let valid = !name.is_empty()
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
                if valid {
                    Some(Sticky::Cookie(cookie.into_inner()))
                } else {
                    self.push(
                        cookie.span(),
                        format!("{key}.cookie"),
                        format!("`{name}` is not a cookie name"),
                        "use letters, digits, `-`, `_` and `.`, like \"wsgate\"",
                    );
                    None
                }
            }
            (None, Some(k)) => {
                let text = k.get_ref().trim();
                let parsed = if text == "path" {
                    Some(StickyKey::Path)
                } else {
                    IdentitySource::parse(text).map(|s| match s {
                        IdentitySource::Query(n) => StickyKey::Query(n),
                        IdentitySource::Header(h) => StickyKey::Header(h),
                        IdentitySource::Cookie(c) => StickyKey::Cookie(c),
                    })
                };
                if parsed.is_none() {
                    self.push(
                        k.span(),
                        format!("{key}.key"),
                        format!("`{text}` is not a sticky key"),
                        "write \"query:NAME\", \"header:NAME\", \"cookie:NAME\" or \"path\"",
                    );
                }
                parsed.map(Sticky::Key)
            }
            (cookie, key_) => {
                let span = cookie
                    .map(|c| c.span())
                    .or(key_.map(|k| k.span()))
                    .unwrap_or(0..0);
                self.push(
                    span,
                    key.to_string(),
                    "sticky needs exactly one of `cookie` and `key`".into(),
                    "write cookie = \"NAME\" or key = \"query:NAME\" (or header:, cookie:, path)",
                );
                None
            }
        }
    }

    fn rebalance(&mut self, key: &str, raw: RawRebalance) -> RebalanceConfig {
        let threshold = match raw.threshold {
            None => defaults::REBALANCE_THRESHOLD,
            Some(t) if t.get_ref().is_finite() && (1.0..=100.0).contains(t.get_ref()) => {
                *t.get_ref()
            }
            Some(t) => {
                self.push(
                    t.span(),
                    format!("{key}.threshold"),
                    format!("{} is out of range", t.get_ref()),
                    "use a number from 1.0 to 100, like 1.2 (20% over the mean)",
                );
                defaults::REBALANCE_THRESHOLD
            }
        };
        RebalanceConfig {
            threshold,
            rate: self.integer(
                raw.rate.as_ref(),
                &format!("{key}.rate"),
                1..=defaults::MAX_REBALANCE_RATE,
                defaults::REBALANCE_RATE.into(),
            ) as u32,
            min_age: self.duration(
                raw.min_age.as_ref(),
                &format!("{key}.min_age"),
                Duration::ZERO..=MAX_DURATION,
                defaults::REBALANCE_MIN_AGE,
            ),
        }
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
        let kind = match (raw.kind, path) {
            (None, None) => CheckKind::Tcp,
            (None, Some(path)) => CheckKind::Http { path },
            (Some(kind), path) => match (kind.get_ref().as_str(), path) {
                ("tcp", None) => CheckKind::Tcp,
                ("http", Some(path)) => CheckKind::Http { path },
                ("websocket", Some(path)) => CheckKind::WebSocket { path },
                ("tcp", Some(_)) => {
                    self.push(
                        kind.span(),
                        format!("{key}.kind"),
                        "a tcp check has no path".into(),
                        "remove `path`, or use kind = \"http\" or \"websocket\"",
                    );
                    CheckKind::Tcp
                }
                (k @ ("http" | "websocket"), None) => {
                    self.push(
                        kind.span(),
                        format!("{key}.kind"),
                        format!("a {k} check needs a path"),
                        "add path = \"/health\" (the path the check requests)",
                    );
                    CheckKind::Tcp
                }
                (other, _) => {
                    self.push(
                        kind.span(),
                        format!("{key}.kind"),
                        format!("`{other}` is not a check kind"),
                        "write \"tcp\", \"http\" or \"websocket\"",
                    );
                    CheckKind::Tcp
                }
            },
        };
        HealthConfig {
            kind,
            interval: self.duration(
                raw.interval.as_ref(),
                &format!("{key}.interval"),
                POSITIVE..=MAX_DURATION,
                defaults::HEALTH_INTERVAL,
            ),
            timeout: self.duration(
                raw.timeout.as_ref(),
                &format!("{key}.timeout"),
                POSITIVE..=MAX_DURATION,
                defaults::HEALTH_TIMEOUT,
            ),
            unhealthy_after: self.integer(
                raw.unhealthy_after.as_ref(),
                &format!("{key}.unhealthy_after"),
                1..=defaults::MAX_STREAK,
                defaults::UNHEALTHY_AFTER.into(),
            ) as u32,
            healthy_after: self.integer(
                raw.healthy_after.as_ref(),
                &format!("{key}.healthy_after"),
                1..=defaults::MAX_STREAK,
                defaults::HEALTHY_AFTER.into(),
            ) as u32,
        }
    }

    fn cluster(&mut self, raw: Option<RawCluster>) -> ClusterConfig {
        let mut cluster = ClusterConfig::default();
        let Some(raw) = raw else { return cluster };
        let mut instance_id = String::new();
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
            (raw.instance_id, "cluster.instance_id", &mut instance_id),
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
        cluster.instance_id = (!instance_id.is_empty()).then_some(instance_id);
        cluster.heartbeat = self.duration(
            raw.heartbeat.as_ref(),
            "cluster.heartbeat",
            POSITIVE..=MAX_DURATION,
            defaults::HEARTBEAT,
        );
        if cluster.heartbeat < defaults::MIN_HEARTBEAT {
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
        let max_connections = self.integer(
            raw.max_connections.as_ref(),
            "server.max_connections",
            1..=u64::from(u32::MAX),
            defaults::MAX_CONNECTIONS as u64,
        ) as usize;
        let backlog = self.integer(
            raw.backlog.as_ref(),
            "server.backlog",
            1..=65535,
            u64::from(defaults::BACKLOG),
        ) as u32;
        let handshake_timeout = self.duration(
            raw.handshake_timeout.as_ref(),
            "server.handshake_timeout",
            POSITIVE..=MAX_DURATION,
            defaults::CLIENT_HANDSHAKE_TIMEOUT,
        );
        let max_header_bytes = self.size(
            raw.max_header_bytes.as_ref(),
            "server.max_header_bytes",
            defaults::MIN_HEADER_BYTES..=defaults::MAX_HEADER_BYTES_LIMIT,
            defaults::MAX_HEADER_BYTES as u64,
        ) as usize;
        let mut trusted_proxies = Vec::new();
        for (i, net) in raw.trusted_proxies.iter().flatten().enumerate() {
            let text = net.get_ref().trim();
            let parsed = text
                .parse::<ipnet::IpNet>()
                .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from));
            match parsed {
                Ok(n) => trusted_proxies.push(n.trunc()),
                Err(_) => self.push(
                    net.span(),
                    format!("server.trusted_proxies[{i}]"),
                    format!("`{text}` is not an address or a network"),
                    "write an address (\"10.0.0.5\") or a network in CIDR form (\"10.0.0.0/8\", \"fd00::/8\")",
                ),
            }
        }
        let proxy_protocol = match &raw.proxy_protocol {
            Some(on) if *on.get_ref() && raw.trusted_proxies.as_ref().is_none_or(Vec::is_empty) => {
                self.push(
                    on.span(),
                    "server.proxy_protocol",
                    "proxy_protocol is on but no peer is trusted to send it".into(),
                    "list your load balancers in trusted_proxies = [\"10.0.0.0/8\"], or turn proxy_protocol off",
                );
                false
            }
            Some(on) => *on.get_ref(),
            None => false,
        };
        ServerConfig {
            listen,
            max_connections,
            backlog,
            handshake_timeout,
            max_header_bytes,
            watch_config: raw.watch_config.unwrap_or(defaults::WATCH_CONFIG),
            strict_frames: raw.strict_frames.unwrap_or(defaults::STRICT_FRAMES),
            pin_workers: raw.pin_workers.unwrap_or(defaults::PIN_WORKERS),
            yield_when_busy: raw.yield_when_busy.unwrap_or(defaults::YIELD_WHEN_BUSY),
            max_connections_per_ip: raw.max_connections_per_ip.as_ref().map(|n| {
                self.integer(
                    Some(n),
                    "server.max_connections_per_ip",
                    1..=u64::from(u32::MAX),
                    1,
                ) as u32
            }),
            max_upgrades_per_ip: raw.max_upgrades_per_ip.as_ref().map(|n| {
                self.integer(
                    Some(n),
                    "server.max_upgrades_per_ip",
                    1..=defaults::MAX_UPGRADE_RATE,
                    1,
                ) as u32
            }),
            trusted_proxies,
            proxy_protocol,
            shutdown_delay: self.duration(
                raw.shutdown_delay.as_ref(),
                "server.shutdown_delay",
                Duration::ZERO..=MAX_DURATION,
                defaults::SHUTDOWN_DELAY,
            ),
            shutdown_spread: self.duration(
                raw.shutdown_spread.as_ref(),
                "server.shutdown_spread",
                Duration::ZERO..=MAX_DURATION,
                defaults::SHUTDOWN_SPREAD,
            ),
            shutdown_timeout: self.duration(
                raw.shutdown_timeout.as_ref(),
                "server.shutdown_timeout",
                POSITIVE..=MAX_DURATION,
                defaults::SHUTDOWN_TIMEOUT,
            ),
        }
    }

    fn pool(&mut self, key: &str, raw: RawPool) -> PoolConfig {
        let mut backends: Vec<BackendConfig> = Vec::new();
        let mut dns_entries: Vec<DnsBackend> = Vec::new();
        for (i, backend) in raw.backends.into_iter().enumerate() {
            let backend = backend.into_inner();
            let bkey = format!("{key}.backends[{i}]");
            let weight = self.integer(
                backend.weight.as_ref(),
                &format!("{bkey}.weight"),
                1..=defaults::MAX_WEIGHT,
                defaults::WEIGHT.into(),
            );
            let weight = NonZeroU32::new(weight as u32).unwrap_or(NonZeroU32::MIN);
            let max_connections = backend.max_connections.as_ref().map(|m| {
                self.integer(
                    Some(m),
                    &format!("{bkey}.max_connections"),
                    1..=u64::from(u32::MAX),
                    1,
                )
            });
            let (addr, dns) = match (backend.addr, backend.dns) {
                (Some(addr), None) => (addr, false),
                (None, Some(name)) => (name, true),
                (both, _) => {
                    let span = both.map(|a| a.span()).unwrap_or(0..0);
                    self.push(
                        span,
                        bkey.clone(),
                        "a backend needs `addr` or `dns`, not both".into(),
                        "write { addr = \"10.0.0.1:9000\" } or { dns = \"chat.svc.cluster.local:9000\" }",
                    );
                    continue;
                }
            };
            if dns {
                match BackendAddr::parse(addr.get_ref()) {
                    Some(BackendAddr::Name { host, port }) => dns_entries.push(DnsBackend {
                        host,
                        port,
                        weight,
                        max_connections,
                    }),
                    _ => self.push(
                        addr.span(),
                        format!("{bkey}.dns"),
                        format!("`{}` is not a name:port", addr.get_ref()),
                        "write a DNS name and port, like \"chat.default.svc.cluster.local:9000\"",
                    ),
                }
                continue;
            }
            match BackendAddr::parse(addr.get_ref()) {
                Some(parsed) if backends.iter().any(|b| b.addr == parsed) => self.push(
                    addr.span(),
                    format!("{bkey}.addr"),
                    format!("backend {parsed} is listed twice in this pool"),
                    "remove the duplicate, or raise the first one's weight",
                ),
                Some(parsed) => backends.push(BackendConfig {
                    addr: parsed,
                    weight,
                    drain: backend.drain.unwrap_or(false),
                    max_connections,
                }),
                None => self.push(
                    addr.span(),
                    format!("{bkey}.addr"),
                    format!("`{}` is not a host:port address", addr.get_ref()),
                    "write host:port, like \"10.0.0.1:9000\", \"[::1]:9000\" or \"chat-1.internal:9000\"",
                ),
            }
        }
        PoolConfig {
            backends,
            connect_timeout: self.duration(
                raw.connect_timeout.as_ref(),
                &format!("{key}.connect_timeout"),
                POSITIVE..=MAX_DURATION,
                defaults::CONNECT_TIMEOUT,
            ),
            handshake_timeout: self.duration(
                raw.handshake_timeout.as_ref(),
                &format!("{key}.handshake_timeout"),
                POSITIVE..=MAX_DURATION,
                defaults::BACKEND_HANDSHAKE_TIMEOUT,
            ),
            idle_timeout: self.duration(
                raw.idle_timeout.as_ref(),
                &format!("{key}.idle_timeout"),
                POSITIVE..=MAX_DURATION,
                defaults::IDLE_TIMEOUT,
            ),
            max_message_size: self.size(
                raw.max_message_size.as_ref(),
                &format!("{key}.max_message_size"),
                1..=defaults::MAX_MESSAGE_SIZE_LIMIT,
                defaults::MAX_MESSAGE_SIZE,
            ),
            retries: self.integer(
                raw.retries.as_ref(),
                &format!("{key}.retries"),
                0..=defaults::MAX_RETRIES,
                defaults::RETRIES as u64,
            ) as usize,
            drain_timeout: self.duration(
                raw.drain_timeout.as_ref(),
                &format!("{key}.drain_timeout"),
                Duration::ZERO..=MAX_DURATION,
                defaults::DRAIN_TIMEOUT,
            ),
            drain_spread: self.duration(
                raw.drain_spread.as_ref(),
                &format!("{key}.drain_spread"),
                Duration::ZERO..=MAX_DURATION,
                defaults::DRAIN_SPREAD,
            ),
            close_timeout: self.duration(
                raw.close_timeout.as_ref(),
                &format!("{key}.close_timeout"),
                POSITIVE..=MAX_DURATION,
                defaults::CLOSE_TIMEOUT,
            ),
            max_fails: self.integer(
                raw.max_fails.as_ref(),
                &format!("{key}.max_fails"),
                1..=defaults::MAX_MAX_FAILS,
                defaults::MAX_FAILS.into(),
            ) as u32,
            max_upgrade_rate: raw.max_upgrade_rate.as_ref().map(|r| {
                self.integer(
                    Some(r),
                    &format!("{key}.max_upgrade_rate"),
                    1..=defaults::MAX_UPGRADE_RATE,
                    1,
                ) as u32
            }),
            slow_start: raw.slow_start.as_ref().map(|d| {
                self.duration(
                    Some(d),
                    &format!("{key}.slow_start"),
                    POSITIVE..=MAX_DURATION,
                    defaults::FAIL_TIMEOUT,
                )
            }),
            fail_timeout: self.duration(
                raw.fail_timeout.as_ref(),
                &format!("{key}.fail_timeout"),
                POSITIVE..=MAX_DURATION,
                defaults::FAIL_TIMEOUT,
            ),
            health: raw.health.map(|h| self.health(&format!("{key}.health"), h)),
            rebalance: raw
                .rebalance
                .map(|r| self.rebalance(&format!("{key}.rebalance"), r)),
            dns: dns_entries,
            request_timeout: self.duration(
                raw.request_timeout.as_ref(),
                &format!("{key}.request_timeout"),
                POSITIVE..=MAX_DURATION,
                defaults::REQUEST_TIMEOUT,
            ),
            sticky: raw
                .sticky
                .and_then(|s| self.sticky(&format!("{key}.sticky"), s)),
            tls: raw.tls.map(|t| self.backend_tls(&format!("{key}.tls"), t)),
            proxy_protocol: match raw.proxy_protocol.as_ref() {
                None => None,
                Some(p) => match p.get_ref().as_str() {
                    "v1" => Some(ProxyVersion::V1),
                    "v2" => Some(ProxyVersion::V2),
                    other => {
                        self.push(
                            p.span(),
                            format!("{key}.proxy_protocol"),
                            format!("`{other}` is not a PROXY protocol version"),
                            "write \"v1\" (text) or \"v2\" (binary), as the backends expect",
                        );
                        None
                    }
                },
            },
            dns_refresh: self.duration(
                raw.dns_refresh.as_ref(),
                &format!("{key}.dns_refresh"),
                defaults::MIN_DNS_REFRESH..=MAX_DURATION,
                defaults::DNS_REFRESH,
            ),
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
        let http_proxy = match raw.http.as_ref().map(|h| h.get_ref().as_str()) {
            None | Some("reject") => false,
            Some("proxy") if pools.get(pool).is_some_and(|p| p.proxy_protocol.is_some()) => {
                ok = false;
                let span = raw.http.as_ref().map(|h| h.span()).unwrap_or(0..0);
                self.push(
                    span,
                    format!("{key}.http"),
                    format!("pool `{pool}` sends the PROXY protocol, which proxied HTTP requests (on shared keep-alive connections) cannot carry"),
                    "route plain HTTP to a pool without proxy_protocol, or leave http = \"reject\"",
                );
                false
            }
            Some("proxy") => true,
            Some(other) => {
                ok = false;
                let span = raw.http.as_ref().map(|h| h.span()).unwrap_or(0..0);
                self.push(
                    span,
                    format!("{key}.http"),
                    format!("`{other}` is not an HTTP mode"),
                    "write \"proxy\" (plain HTTP goes to the pool too) or \"reject\" (426)",
                );
                false
            }
        };
        let origins = raw.origins.as_ref().map(|list| {
            let mut origins = Vec::new();
            for (i, origin) in list.iter().enumerate() {
                match normalize_origin(origin.get_ref()) {
                    Some(o) => origins.push(o),
                    None => {
                        ok = false;
                        self.push(
                            origin.span(),
                            format!("{key}.origins[{i}]"),
                            format!("`{}` is not an origin", origin.get_ref()),
                            "write a scheme and host, with a port if not the default, like \"https://app.example.com\"",
                        );
                    }
                }
            }
            origins
        });
        ok.then(|| RouteConfig {
            host,
            path: normalize_prefix(path),
            pool: pool.clone(),
            identity,
            http_proxy,
            origins,
        })
    }

    fn integer(
        &mut self,
        value: Option<&Spanned<i64>>,
        key: &str,
        range: RangeInclusive<u64>,
        default: u64,
    ) -> u64 {
        let Some(value) = value else { return default };
        match u64::try_from(*value.get_ref()) {
            Ok(n) if range.contains(&n) => n,
            _ => {
                self.push(
                    value.span(),
                    key,
                    format!("{} is out of range", value.get_ref()),
                    &format!(
                        "use a whole number from {} to {}",
                        range.start(),
                        range.end()
                    ),
                );
                default
            }
        }
    }

    fn duration(
        &mut self,
        value: Option<&Spanned<String>>,
        key: &str,
        range: RangeInclusive<Duration>,
        default: Duration,
    ) -> Duration {
        let Some(value) = value else { return default };
        match humantime::parse_duration(value.get_ref()) {
            Ok(d) if range.contains(&d) => d,
            _ => {
                let what = if range.start().is_zero() {
                    "a duration up to a year"
                } else {
                    "a positive duration up to a year"
                };
                self.push(
                    value.span(),
                    key,
                    format!("`{}` is not {what}", value.get_ref()),
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
        range: RangeInclusive<u64>,
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

pub(super) fn valid_name(name: &str) -> bool {
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

/// An origin as browsers send it: `scheme://host[:port]`, lower-cased, the
/// scheme's default port left out. `None` when `text` is not one.
pub fn normalize_origin(text: &str) -> Option<String> {
    let uri: http::Uri = text.trim().parse().ok()?;
    let scheme = uri.scheme_str()?.to_ascii_lowercase();
    let authority = uri.authority()?;
    let path_ok = matches!(
        uri.path_and_query().map(|p| p.as_str()),
        None | Some("/") | Some("")
    );
    if !path_ok || authority.as_str().contains('@') {
        return None;
    }
    let host = authority.host().to_ascii_lowercase();
    let default = match scheme.as_str() {
        "https" | "wss" => Some(443),
        "http" | "ws" => Some(80),
        _ => None,
    };
    Some(match authority.port_u16() {
        Some(port) if Some(port) != default => format!("{scheme}://{host}:{port}"),
        _ => format!("{scheme}://{host}"),
    })
}

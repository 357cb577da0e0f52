//! The raw layer: serde structs that mirror `proxy.toml` key for key, with the
//! position of every value kept for errors. Nothing here is validated.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

#[derive(Deserialize)]
pub(super) struct RawConfig {
    pub(super) server: RawServer,
    #[serde(default)]
    pub(super) route: Vec<Spanned<RawRoute>>,
    #[serde(default)]
    pub(super) pool: BTreeMap<String, RawPool>,
    pub(super) cluster: Option<RawCluster>,
    pub(super) admin: Option<RawAdmin>,
    pub(super) resolver: Option<RawResolver>,
    pub(super) tls: Option<RawTls>,
    pub(super) log: Option<RawLog>,
}

#[derive(Deserialize)]
pub(super) struct RawLog {
    pub(super) access: Option<Spanned<String>>,
}

#[derive(Deserialize)]
pub(super) struct RawTls {
    #[serde(default)]
    pub(super) listen: Vec<Spanned<String>>,
    pub(super) http2: Option<bool>,
    pub(super) min_version: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) cert: Vec<Spanned<RawCert>>,
}

#[derive(Deserialize)]
pub(super) struct RawCert {
    pub(super) cert: Spanned<String>,
    pub(super) key: Spanned<String>,
}

#[derive(Deserialize)]
pub(super) struct RawBackendTls {
    pub(super) ca: Option<Spanned<String>>,
    pub(super) server_name: Option<Spanned<String>>,
    pub(super) cert: Option<Spanned<String>>,
    pub(super) key: Option<Spanned<String>>,
}

#[derive(Deserialize)]
pub(super) struct RawResolver {
    pub(super) nameservers: Option<Vec<Spanned<String>>>,
}

#[derive(Deserialize)]
pub(super) struct RawAdmin {
    pub(super) listen: Option<Spanned<String>>,
    pub(super) token: Option<Spanned<String>>,
    pub(super) message_metrics: Option<bool>,
}

#[derive(Deserialize)]
pub(super) struct RawHealth {
    pub(super) interval: Option<Spanned<String>>,
    pub(super) timeout: Option<Spanned<String>>,
    pub(super) kind: Option<Spanned<String>>,
    pub(super) path: Option<Spanned<String>>,
    pub(super) unhealthy_after: Option<Spanned<i64>>,
    pub(super) healthy_after: Option<Spanned<i64>>,
}
#[derive(Deserialize)]
pub(super) struct RawCluster {
    pub(super) redis: Option<Spanned<String>>,
    pub(super) name: Option<Spanned<String>>,
    pub(super) heartbeat: Option<Spanned<String>>,
    pub(super) instance_id: Option<Spanned<String>>,
}

#[derive(Deserialize)]
pub(super) struct RawServer {
    pub(super) listen: Spanned<Vec<Spanned<String>>>,
    pub(super) max_connections: Option<Spanned<i64>>,
    pub(super) backlog: Option<Spanned<i64>>,
    pub(super) handshake_timeout: Option<Spanned<String>>,
    pub(super) max_header_bytes: Option<Spanned<RawSize>>,
    pub(super) watch_config: Option<bool>,
    pub(super) strict_frames: Option<bool>,
    pub(super) pin_workers: Option<bool>,
    pub(super) yield_when_busy: Option<bool>,
    pub(super) max_connections_per_ip: Option<Spanned<i64>>,
    pub(super) max_upgrades_per_ip: Option<Spanned<i64>>,
    pub(super) trusted_proxies: Option<Vec<Spanned<String>>>,
    pub(super) proxy_protocol: Option<Spanned<bool>>,
    pub(super) shutdown_delay: Option<Spanned<String>>,
    pub(super) shutdown_spread: Option<Spanned<String>>,
    pub(super) shutdown_timeout: Option<Spanned<String>>,
}

#[derive(Deserialize)]
pub(super) struct RawRoute {
    pub(super) host: Option<Spanned<String>>,
    pub(super) path: Spanned<String>,
    pub(super) pool: Spanned<String>,
    pub(super) identity: Option<Spanned<String>>,
    pub(super) http: Option<Spanned<String>>,
    pub(super) origins: Option<Vec<Spanned<String>>>,
}

#[derive(Deserialize)]
pub(super) struct RawPool {
    #[serde(default)]
    pub(super) backends: Vec<Spanned<RawBackend>>,
    pub(super) connect_timeout: Option<Spanned<String>>,
    pub(super) handshake_timeout: Option<Spanned<String>>,
    pub(super) idle_timeout: Option<Spanned<String>>,
    pub(super) max_message_size: Option<Spanned<RawSize>>,
    pub(super) retries: Option<Spanned<i64>>,
    pub(super) drain_timeout: Option<Spanned<String>>,
    pub(super) drain_spread: Option<Spanned<String>>,
    pub(super) close_timeout: Option<Spanned<String>>,
    pub(super) max_fails: Option<Spanned<i64>>,
    pub(super) fail_timeout: Option<Spanned<String>>,
    pub(super) max_upgrade_rate: Option<Spanned<i64>>,
    pub(super) slow_start: Option<Spanned<String>>,
    pub(super) dns_refresh: Option<Spanned<String>>,
    pub(super) health: Option<RawHealth>,
    pub(super) rebalance: Option<RawRebalance>,
    pub(super) request_timeout: Option<Spanned<String>>,
    pub(super) sticky: Option<RawSticky>,
    pub(super) tls: Option<RawBackendTls>,
    pub(super) proxy_protocol: Option<Spanned<String>>,
}

#[derive(Deserialize)]
pub(super) struct RawSticky {
    pub(super) cookie: Option<Spanned<String>>,
    pub(super) key: Option<Spanned<String>>,
}

#[derive(Deserialize)]
pub(super) struct RawRebalance {
    pub(super) threshold: Option<Spanned<f64>>,
    pub(super) rate: Option<Spanned<i64>>,
    pub(super) min_age: Option<Spanned<String>>,
}

#[derive(Deserialize)]
pub(super) struct RawBackend {
    pub(super) addr: Option<Spanned<String>>,
    pub(super) dns: Option<Spanned<String>>,
    pub(super) weight: Option<Spanned<i64>>,
    pub(super) drain: Option<bool>,
    pub(super) max_connections: Option<Spanned<i64>>,
}

/// A size: a byte count, or a string with a unit (`"64KiB"`, `"16MiB"`).
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum RawSize {
    Bytes(i64),
    Text(String),
}

impl RawSize {
    pub(super) fn bytes(&self) -> Option<u64> {
        match self {
            RawSize::Bytes(n) => u64::try_from(*n).ok(),
            RawSize::Text(text) => parse_size(text),
        }
    }
}

pub(super) fn parse_size(text: &str) -> Option<u64> {
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

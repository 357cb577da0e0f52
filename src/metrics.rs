//! Metric names, their descriptions, and the Prometheus recorder.
//!
//! Label values come from the configuration (pool names, backend addresses) or
//! from fixed sets (results, directions, close code classes), never from what a
//! client sends, so the number of series is bounded by the config.

use std::sync::OnceLock;

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;

/// A gauge not set within this long before a render is left out of it.
const GAUGE_IDLE: std::time::Duration = std::time::Duration::from_millis(1);

pub const CONNECTIONS_ACTIVE: &str = "wsgate_connections_active";
pub const CLUSTER_CONNECTIONS: &str = "wsgate_cluster_connections";
pub const UPGRADES: &str = "wsgate_upgrades_total";
pub const UPGRADE_DURATION: &str = "wsgate_upgrade_duration_seconds";
pub const CONNECTION_DURATION: &str = "wsgate_connection_duration_seconds";
pub const MESSAGES: &str = "wsgate_messages_total";
pub const BYTES: &str = "wsgate_bytes_total";
pub const CLOSES: &str = "wsgate_closes_total";
pub const BACKEND_FAILURES: &str = "wsgate_backend_failures_total";
pub const DNS_FAILURES: &str = "wsgate_dns_failures_total";
pub const HTTP_REQUESTS: &str = "wsgate_http_requests_total";
pub const STICKY: &str = "wsgate_sticky_total";
pub const WEBSOCKETS: &str = "wsgate_websockets_total";
pub const TLS_EXPIRY: &str = "wsgate_tls_cert_expiry_seconds";
pub const BACKEND_UP: &str = "wsgate_backend_up";
pub const REDIS_UP: &str = "wsgate_redis_up";
pub const CONFIG_RELOADS: &str = "wsgate_config_reloads_total";
pub const INSTANCES: &str = "wsgate_instances";
pub const DESCRIPTORS_EXHAUSTED: &str = "wsgate_descriptors_exhausted_total";
pub const PROXY_HEADER_ERRORS: &str = "wsgate_proxy_header_errors_total";
pub const ACCESS_LOG_DROPPED: &str = "wsgate_access_log_dropped_total";

/// `direction` label values.
pub const CLIENT_TO_BACKEND: &str = "client_to_backend";
pub const BACKEND_TO_CLIENT: &str = "backend_to_client";

const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const LIFETIME_BUCKETS: &[f64] = &[0.1, 1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0];

/// The process-wide recorder: installed on first use, shared by every gateway in
/// the process (one wsgate per process is the normal case).
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        // Every gauge is set by the scrape that renders it (see `admin`): one no
        // scrape sets any more (a backend that finished draining) vanishes at once.
        let recorder = PrometheusBuilder::new()
            .idle_timeout(MetricKindMask::GAUGE, Some(GAUGE_IDLE))
            .set_buckets_for_metric(Matcher::Full(UPGRADE_DURATION.into()), SECONDS_BUCKETS)
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full(CONNECTION_DURATION.into()),
                    LIFETIME_BUCKETS,
                )
            })
            .map(|b| b.build_recorder())
            .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("another metrics recorder is installed: /metrics will be empty");
        }
        describe();
        zero();
        handle
    })
}

/// How often the histograms' samples are folded into their buckets between
/// scrapes.
const UPKEEP: std::time::Duration = std::time::Duration::from_secs(5);

/// Folds the samples every histogram has recorded into its buckets every few
/// seconds, until `stop`. The recorder keeps each sample (8 bytes: one per
/// upgrade, one per ended tunnel) until a scrape or this folds it in, so with
/// nobody scraping `/metrics` they would pile up without bound.
pub async fn upkeep(stop: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(UPKEEP);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => handle().run_upkeep(),
        }
    }
}

/// Counters of rare conditions exist from the start at 0, so that dashboards and
/// alerts see a series (and `rate` works) before the first occurrence.
fn zero() {
    for at in ["accept", "connect", "check"] {
        metrics::counter!(DESCRIPTORS_EXHAUSTED, "at" => at).increment(0);
    }
    metrics::counter!(PROXY_HEADER_ERRORS).increment(0);
    metrics::counter!(ACCESS_LOG_DROPPED).increment(0);
    for result in ["ok", "error"] {
        metrics::counter!(CONFIG_RELOADS, "result" => result).increment(0);
    }
}

fn describe() {
    describe_gauge!(
        CONNECTIONS_ACTIVE,
        "Proxied connections this instance holds, handshakes in flight included."
    );
    describe_gauge!(
        CLUSTER_CONNECTIONS,
        "Connections all live instances hold, as this instance last read them."
    );
    describe_counter!(UPGRADES, "Upgrade requests by outcome.");
    describe_counter!(
        ACCESS_LOG_DROPPED,
        "Access-log lines dropped because the writer could not keep up."
    );
    describe_counter!(
        PROXY_HEADER_ERRORS,
        "Connections from trusted proxies closed for a missing or malformed PROXY protocol header."
    );
    describe_counter!(
        DESCRIPTORS_EXHAUSTED,
        "Accepts, backend connects and health checks that failed because wsgate was out of file descriptors."
    );
    describe_histogram!(
        UPGRADE_DURATION,
        Unit::Seconds,
        "From the upgrade request to the 101 sent back."
    );
    describe_histogram!(
        CONNECTION_DURATION,
        Unit::Seconds,
        "Lifetime of proxied connections."
    );
    describe_counter!(MESSAGES, "WebSocket data messages relayed, by direction.");
    describe_counter!(
        BYTES,
        "Bytes relayed after the upgrade (frames included), by direction."
    );
    describe_counter!(
        CLOSES,
        "Ended tunnels by first close code, who started the close, and why it ended."
    );
    describe_counter!(
        BACKEND_FAILURES,
        "Attempts on a backend that failed before it answered (each then tried on the next backend, within retries)."
    );
    describe_counter!(
        DNS_FAILURES,
        "Failed resolutions of DNS backend names (the last known addresses are kept)."
    );
    describe_counter!(
        HTTP_REQUESTS,
        "Plain HTTP requests proxied on routes with http = \"proxy\", by status class."
    );
    describe_counter!(
        STICKY,
        "Sticky placements: hit (back to its backend), miss (it could not take it), new."
    );
    describe_counter!(
        WEBSOCKETS,
        "WebSockets opened, by protocol: h1 (HTTP/1.1 upgrade) or h2 (RFC 8441 extended CONNECT)."
    );
    describe_gauge!(
        TLS_EXPIRY,
        "Seconds until each served certificate expires (by its first name)."
    );
    describe_gauge!(
        BACKEND_UP,
        "1 while a backend is healthy, 0 while it is ejected."
    );
    describe_gauge!(
        REDIS_UP,
        "1 while Redis is reachable (only with [cluster] redis)."
    );
    describe_counter!(CONFIG_RELOADS, "Configuration reloads by result.");
    describe_gauge!(
        INSTANCES,
        "Live wsgate instances in the cluster, this one included."
    );
}

/// A pool's metric handles, looked up once when the snapshot is built (a handle
/// is a lookup in the recorder's map; the upgrade path should not pay for one).
#[derive(Debug)]
pub struct PoolMetrics {
    pub upgrade: metrics::Histogram,
    pub connection: metrics::Histogram,
    /// `wsgate_upgrades_total{result="ok"}` of each backend, in the pool's order.
    pub upgrades_ok: Vec<metrics::Counter>,
    /// Messages client to backend, backend to client, bytes the same: shared by
    /// the pool's tunnels.
    pub traffic: std::sync::Arc<[metrics::Counter; 4]>,
    /// `wsgate_websockets_total` for `h1` and `h2`.
    pub websockets: [metrics::Counter; 2],
    /// `wsgate_closes_total` of the pool's tunnels.
    pub closes: Closes,
}

impl PoolMetrics {
    pub fn new(pool: &crate::balancer::Pool) -> PoolMetrics {
        PoolMetrics {
            upgrade: metrics::histogram!(UPGRADE_DURATION, "pool" => pool.name.clone()),
            connection: metrics::histogram!(CONNECTION_DURATION, "pool" => pool.name.clone()),
            upgrades_ok: pool
                .backends
                .iter()
                .map(|b| upgrade_counter(&pool.name, &b.addr.to_string(), "ok"))
                .collect(),
            websockets: ["h1", "h2"].map(|protocol| {
                metrics::counter!(WEBSOCKETS, "pool" => pool.name.clone(), "protocol" => protocol)
            }),
            traffic: {
                let counter = |name: &'static str, direction: &'static str| metrics::counter!(name, "pool" => pool.name.clone(), "direction" => direction);
                std::sync::Arc::new([
                    counter(MESSAGES, CLIENT_TO_BACKEND),
                    counter(MESSAGES, BACKEND_TO_CLIENT),
                    counter(BYTES, CLIENT_TO_BACKEND),
                    counter(BYTES, BACKEND_TO_CLIENT),
                ])
            },
            closes: Closes {
                pool: pool.name.clone(),
                seen: arc_swap::ArcSwap::default(),
            },
        }
    }
}

/// The labels of one `wsgate_closes_total` series besides the pool's: initiator,
/// close code, reason.
pub type CloseLabels = (&'static str, &'static str, &'static str);

/// `wsgate_closes_total` of one pool: each label set's counter looked up in the
/// registry once (which builds a key, with the pool's name copied, and hashes it),
/// then kept here, so a tunnel's end costs a scan of a few entries and an add.
/// Bounded: the label values are a fixed set.
#[derive(Debug)]
pub struct Closes {
    pool: String,
    seen: arc_swap::ArcSwap<Vec<(CloseLabels, metrics::Counter)>>,
}

impl Closes {
    pub fn increment(&self, labels: CloseLabels) {
        if let Some((_, counter)) = self.seen.load().iter().find(|(l, _)| *l == labels) {
            counter.increment(1);
            return;
        }
        let (initiator, code, reason) = labels;
        let counter = metrics::counter!(
            CLOSES,
            "pool" => self.pool.clone(),
            "code" => code,
            "initiator" => initiator,
            "reason" => reason,
        );
        counter.increment(1);
        self.seen.rcu(|seen| {
            let mut more = Vec::clone(seen);
            if !more.iter().any(|(l, _)| *l == labels) {
                more.push((labels, counter.clone()));
            }
            more
        });
    }
}

/// `wsgate_upgrades_total` for one outcome.
/// The samples of metric `name` in a Prometheus text rendering: each series'
/// labels and value. (For wsgate's own rendering: label values have no quotes.)
pub fn samples(text: &str, name: &str) -> Vec<(Vec<(String, String)>, f64)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (labels, value) = match rest.strip_prefix('{') {
            Some(rest) => match rest.split_once("} ") {
                Some((labels, value)) => (labels, value),
                None => continue,
            },
            None => match rest.strip_prefix(' ') {
                Some(value) => ("", value),
                None => continue,
            },
        };
        let Ok(value) = value.trim().parse::<f64>() else {
            continue;
        };
        let labels = labels
            .split("\",")
            .filter_map(|pair| {
                let (k, v) = pair.split_once("=\"")?;
                Some((k.to_string(), v.trim_end_matches('"').to_string()))
            })
            .collect();
        out.push((labels, value));
    }
    out
}

pub fn upgrade_counter(pool: &str, backend: &str, result: &'static str) -> metrics::Counter {
    metrics::counter!(
        UPGRADES,
        "pool" => pool.to_string(),
        "backend" => backend.to_string(),
        "result" => result,
    )
}

/// The `code` label of a close code: standard codes as themselves, application
/// ranges as a range, anything else as `invalid`.
pub fn close_code_label(code: Option<u16>) -> &'static str {
    const STANDARD: [&str; 16] = [
        "1000", "1001", "1002", "1003", "1004", "1005", "1006", "1007", "1008", "1009", "1010",
        "1011", "1012", "1013", "1014", "1015",
    ];
    match code {
        None => "none",
        Some(c @ 1000..=1015) => STANDARD[usize::from(c - 1000)],
        Some(3000..=3999) => "3000-3999",
        Some(4000..=4999) => "4000-4999",
        Some(_) => "invalid",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_code_labels_are_bounded() {
        assert_eq!(close_code_label(Some(1000)), "1000");
        assert_eq!(close_code_label(Some(1015)), "1015");
        assert_eq!(close_code_label(Some(4321)), "4000-4999");
        assert_eq!(close_code_label(Some(65535)), "invalid");
        assert_eq!(close_code_label(None), "none");
    }

    #[test]
    fn a_close_series_is_looked_up_once_and_counts_every_close() {
        let handle = handle();
        let closes = Closes {
            pool: "closes-unit".into(),
            seen: arc_swap::ArcSwap::default(),
        };
        let clean = ("client", "1000", "closed");
        for _ in 0..3 {
            closes.increment(clean);
        }
        closes.increment(("wsgate", "1001", "idle"));
        assert_eq!(closes.seen.load().len(), 2);
        let series: Vec<_> = samples(&handle.render(), CLOSES)
            .into_iter()
            .filter(|(labels, _)| {
                labels
                    .iter()
                    .any(|(k, v)| k == "pool" && v == "closes-unit")
            })
            .map(|(labels, value)| {
                (
                    labels.into_iter().map(|(_, v)| v).collect::<Vec<_>>(),
                    value,
                )
            })
            .collect();
        assert_eq!(series.len(), 2, "{series:?}");
        for (labels, value) in series {
            let want = if labels.contains(&"idle".to_string()) {
                1.0
            } else {
                3.0
            };
            assert_eq!(value, want, "{labels:?}");
        }
    }

    #[test]
    fn samples_are_read_back() {
        let text = "# TYPE wsgate_upgrades_total counter\nwsgate_upgrades_total{pool=\"p\",backend=\"127.0.0.1:1\",result=\"ok\"} 3\nwsgate_upgrades_total_other 1\nwsgate_instances 2\n";
        let got = samples(text, UPGRADES);
        assert_eq!(
            got,
            vec![(
                vec![
                    ("pool".to_string(), "p".to_string()),
                    ("backend".to_string(), "127.0.0.1:1".to_string()),
                    ("result".to_string(), "ok".to_string()),
                ],
                3.0
            )]
        );
        assert_eq!(samples(text, INSTANCES), vec![(vec![], 2.0)]);
    }
}

//! Every default and every limit of `proxy.toml`, in one place: what a key is when
//! the file leaves it out, and the range it may take when the file sets it.

use std::time::Duration;

// [server]
pub const MAX_CONNECTIONS: usize = 50_000;
pub const CLIENT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// hyper will not read request heads into a buffer smaller than this.
pub const MIN_HEADER_BYTES: u64 = 8192;
pub const MAX_HEADER_BYTES_LIMIT: u64 = 1024 * 1024;
pub const WATCH_CONFIG: bool = true;
pub const PIN_WORKERS: bool = false;
pub const YIELD_WHEN_BUSY: bool = true;
/// RFC 6455 checks on every frame, both ways.
pub const STRICT_FRAMES: bool = true;
pub const SHUTDOWN_DELAY: Duration = Duration::ZERO;
pub const SHUTDOWN_SPREAD: Duration = Duration::from_secs(10);
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

// [pool.NAME]
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
pub const BACKEND_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
pub const MAX_MESSAGE_SIZE: u64 = 16 * 1024 * 1024;
pub const MAX_MESSAGE_SIZE_LIMIT: u64 = u32::MAX as u64 * 4;
pub const RETRIES: usize = 2;
pub const MAX_RETRIES: u64 = 16;
pub const WEIGHT: u32 = 1;
pub const MAX_WEIGHT: u64 = 1000;
pub const MAX_UPGRADE_RATE: u64 = 10_000_000;
/// A pool's upgrade budget may be spent this far ahead: rate × this at once.
pub const UPGRADE_BURST: std::time::Duration = std::time::Duration::from_millis(100);
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(300);
pub const DRAIN_SPREAD: Duration = Duration::from_secs(30);
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
pub const MAX_FAILS: u32 = 3;
pub const MAX_MAX_FAILS: u64 = 1000;
pub const FAIL_TIMEOUT: Duration = Duration::from_secs(10);

pub const DNS_REFRESH: Duration = Duration::from_secs(5);
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// DNS is asked again at most this often, however short the records' TTL.
pub const MIN_DNS_REFRESH: Duration = Duration::from_millis(100);

// [pool.NAME.rebalance]
pub const REBALANCE_THRESHOLD: f64 = 1.2;
pub const REBALANCE_RATE: u32 = 5;
pub const MAX_REBALANCE_RATE: u64 = 100_000;
pub const REBALANCE_MIN_AGE: Duration = Duration::from_secs(60);

// [pool.NAME.health]
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(5);
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
pub const UNHEALTHY_AFTER: u32 = 2;
pub const HEALTHY_AFTER: u32 = 2;
pub const MAX_STREAK: u64 = 100;

/// Any duration a key may take at the most (a year): keeps arithmetic on
/// instants far from overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);
/// The shortest duration of keys that must be positive.
pub const POSITIVE: Duration = Duration::from_millis(1);

// [cluster]
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// A heartbeat under this would load Redis for nothing.
pub const MIN_HEARTBEAT: Duration = Duration::from_millis(50);
pub const CLUSTER_NAME: &str = "wsgate";

// [admin]
pub const MESSAGE_METRICS: bool = true;
/// Shortest bearer token accepted.
pub const MIN_TOKEN_LEN: usize = 16;

/// Connections the kernel queues per listener before wsgate accepts them.
pub const BACKLOG: u32 = 4096;

//! Who a client is, as far as wsgate trusts it, and what one client may take.
//!
//! - Trust: only peers in `[server] trusted_proxies` may say who the client is,
//!   by the PROXY protocol (v1 or v2, `[server] proxy_protocol`) or by an
//!   X-Forwarded-For that wsgate then appends to; anyone else's X-Forwarded-For is
//!   replaced.
//! - Limits per client address (`max_connections_per_ip`, `max_upgrades_per_ip`),
//!   IPv6 addresses grouped by /64, in a table of bounded size.
//! - The PROXY protocol towards backends (a pool's `proxy_protocol`).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::config::{ProxyVersion, ServerConfig};

/// Who a connection comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// The client: the source a trusted proxy gave by the PROXY protocol, else the
    /// TCP peer. Limits, logs and X-Forwarded-For use it.
    pub client: SocketAddr,
    /// The client address is itself a trusted proxy: the X-Forwarded-For it sends
    /// is kept and appended to.
    pub trusted: bool,
}

impl Peer {
    /// A peer as it connected, trusted or not by `config`.
    pub fn direct(addr: SocketAddr, config: &ServerConfig) -> Peer {
        Peer {
            client: addr,
            trusted: is_trusted(addr.ip(), config),
        }
    }
}

pub fn is_trusted(ip: IpAddr, config: &ServerConfig) -> bool {
    let ip = canonical(ip);
    config.trusted_proxies.iter().any(|net| net.contains(&ip))
}

/// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) as the IPv4 address they are.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Why a PROXY protocol header was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("no PROXY protocol header within the handshake timeout")]
    Timeout,
    #[error("the connection closed before its PROXY protocol header was complete")]
    Closed,
    #[error("not a PROXY protocol header: {0}")]
    Invalid(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The longest header read: v1 is at most 107 bytes; a v2 header with its TLVs
/// may be longer, but more than this from a load balancer is refused.
const MAX_PROXY_HEADER: usize = 536;

/// Reads the PROXY protocol header (v1 or v2) a trusted proxy sends first, and
/// nothing after it; returns the client it names (`None` for `UNKNOWN`/`LOCAL`:
/// the proxy's own connection, a health check).
pub async fn read_proxy_header(
    stream: &mut TcpStream,
    deadline: Instant,
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    use ppp::{HeaderResult, PartialResult};
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; MAX_PROXY_HEADER];
    loop {
        let peeked = tokio::time::timeout_at(deadline, stream.peek(&mut buf))
            .await
            .map_err(|_| ProxyHeaderError::Timeout)??;
        if peeked == 0 {
            return Err(ProxyHeaderError::Closed);
        }
        let parsed = HeaderResult::parse(&buf[..peeked]);
        if parsed.is_incomplete() {
            if peeked == buf.len() {
                return Err(ProxyHeaderError::Invalid("too long".into()));
            }
            // A header split across segments (rare: proxies send it whole).
            tokio::time::sleep(Duration::from_millis(5)).await;
            if Instant::now() >= deadline {
                return Err(ProxyHeaderError::Timeout);
            }
            continue;
        }
        let (len, client) = match parsed {
            HeaderResult::V1(Ok(h)) => (h.header.len(), v1_source(&h.addresses)),
            HeaderResult::V2(Ok(h)) => (h.len(), v2_source(&h)),
            HeaderResult::V1(Err(e)) => return Err(ProxyHeaderError::Invalid(e.to_string())),
            HeaderResult::V2(Err(e)) => return Err(ProxyHeaderError::Invalid(e.to_string())),
        };
        // Consume exactly the header: what follows is the client's HTTP.
        let mut header = vec![0u8; len];
        stream.read_exact(&mut header).await?;
        return Ok(client);
    }
}

fn v1_source(addresses: &ppp::v1::Addresses) -> Option<SocketAddr> {
    match addresses {
        ppp::v1::Addresses::Tcp4(a) => {
            Some(SocketAddr::new(a.source_address.into(), a.source_port))
        }
        ppp::v1::Addresses::Tcp6(a) => {
            Some(SocketAddr::new(a.source_address.into(), a.source_port))
        }
        ppp::v1::Addresses::Unknown => None,
    }
}

fn v2_source(header: &ppp::v2::Header<'_>) -> Option<SocketAddr> {
    if header.command == ppp::v2::Command::Local {
        return None;
    }
    match header.addresses {
        ppp::v2::Addresses::IPv4(a) => {
            Some(SocketAddr::new(a.source_address.into(), a.source_port))
        }
        ppp::v2::Addresses::IPv6(a) => {
            Some(SocketAddr::new(a.source_address.into(), a.source_port))
        }
        _ => None,
    }
}

/// The PROXY protocol header wsgate sends a backend first: the client's address
/// and the address it connected to; `None` addresses (a health check) send v1
/// `UNKNOWN` or a v2 `LOCAL` header.
pub fn proxy_header(version: ProxyVersion, addresses: Option<(SocketAddr, SocketAddr)>) -> Vec<u8> {
    let addresses = addresses.map(|(s, d)| (canonical_addr(s), canonical_addr(d)));
    match version {
        ProxyVersion::V1 => match addresses {
            Some((s, d)) if s.is_ipv4() == d.is_ipv4() => {
                let family = if s.is_ipv4() { "TCP4" } else { "TCP6" };
                format!(
                    "PROXY {family} {} {} {} {}\r\n",
                    s.ip(),
                    d.ip(),
                    s.port(),
                    d.port()
                )
                .into_bytes()
            }
            _ => b"PROXY UNKNOWN\r\n".to_vec(),
        },
        ProxyVersion::V2 => {
            use ppp::v2::{Builder, Command, Protocol, Version};
            let built = match addresses {
                Some((s, d)) if s.is_ipv4() == d.is_ipv4() => {
                    Builder::with_addresses(Version::Two | Command::Proxy, Protocol::Stream, (s, d))
                        .build()
                }
                _ => Builder::with_addresses(
                    Version::Two | Command::Local,
                    Protocol::Unspecified,
                    ppp::v2::Addresses::Unspecified,
                )
                .build(),
            };
            // Building into a Vec cannot fail; the fallback is the v2 LOCAL header.
            built.unwrap_or_else(|_| {
                let mut local = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
                local.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
                local
            })
        }
    }
}

fn canonical_addr(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(canonical(addr.ip()), addr.port())
}

/// The X-Forwarded-For a backend is told: the chain a trusted client sent with the
/// client appended; from anyone else, the client alone.
pub fn forwarded_for(earlier: Option<&str>, peer: &Peer) -> String {
    use std::fmt::Write;
    // Room for the longest address: an IPv4 address is written a part at a time.
    let mut client = String::with_capacity(45);
    let _ = write!(client, "{}", canonical(peer.client.ip()));
    match earlier {
        Some(chain) if peer.trusted && !chain.trim().is_empty() => format!("{chain}, {client}"),
        _ => client,
    }
}

/// Where a client's counts are kept: its IPv4 address, or its IPv6 /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpKey(u128);

impl IpKey {
    pub fn of(ip: IpAddr) -> IpKey {
        match canonical(ip) {
            IpAddr::V4(v4) => IpKey(u128::from(u32::from(v4)) | (1 << 127)),
            IpAddr::V6(v6) => IpKey(u128::from(v6) & !((1u128 << 64) - 1)),
        }
    }
}

/// Addresses tracked at once, over all shards. An entry is a few dozen bytes, so
/// the table never holds more than a few tens of MB however many addresses come.
pub const MAX_TRACKED: usize = 1 << 20;
const SHARDS: usize = 16;

/// One address's open connections and its upgrade allowance (a token bucket).
#[derive(Debug, Clone, Copy)]
struct Entry {
    connections: u32,
    tokens: f64,
    refilled: Instant,
}

struct Shard {
    entries: HashMap<IpKey, Entry>,
    /// No sweep before this: a full shard of live entries is not rescanned on
    /// every new address.
    next_sweep: Instant,
}

/// Per-address counts for `max_connections_per_ip` and `max_upgrades_per_ip`.
pub struct PerIp {
    shards: Box<[Mutex<Shard>]>,
}

/// Why a client was refused under its address's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverLimit {
    Connections,
    /// With the seconds until it may upgrade again.
    Upgrades {
        retry_after: u64,
    },
    /// The table is full of addresses seen within the last second.
    Table,
}

/// One connection's unit of its address's count; given back on drop.
pub struct IpSlot {
    table: Arc<PerIp>,
    key: IpKey,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        self.table.release(self.key);
    }
}

impl Default for PerIp {
    fn default() -> PerIp {
        let now = Instant::now();
        PerIp {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        entries: HashMap::new(),
                        next_sweep: now,
                    })
                })
                .collect(),
        }
    }
}

impl PerIp {
    fn shard(&self, key: IpKey) -> std::sync::MutexGuard<'_, Shard> {
        let h = (key.0 ^ (key.0 >> 64)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let i = (h >> 60) as usize % SHARDS;
        // A poisoned shard still holds consistent counts: take it over.
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Entries tracked now (for tests and the bound).
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).entries.len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes a connection slot for `ip` when it has fewer than `max` open.
    pub fn connect(self: &Arc<Self>, ip: IpAddr, max: u32) -> Result<IpSlot, OverLimit> {
        let key = IpKey::of(ip);
        let now = Instant::now();
        let mut shard = self.shard(key);
        let entry = entry(&mut shard, key, now, None)?;
        if entry.connections >= max {
            return Err(OverLimit::Connections);
        }
        entry.connections += 1;
        Ok(IpSlot {
            table: self.clone(),
            key,
        })
    }

    /// Spends one upgrade of `ip`'s allowance of `rate` per second (a burst of
    /// `rate` at most).
    pub fn upgrade(&self, ip: IpAddr, rate: u32) -> Result<(), OverLimit> {
        let key = IpKey::of(ip);
        let now = Instant::now();
        let rate = f64::from(rate);
        let mut shard = self.shard(key);
        let entry = entry(&mut shard, key, now, Some(rate))?;
        let elapsed = now.saturating_duration_since(entry.refilled).as_secs_f64();
        entry.tokens = (entry.tokens + elapsed * rate).min(rate);
        entry.refilled = now;
        if entry.tokens >= 1.0 {
            entry.tokens -= 1.0;
            return Ok(());
        }
        let retry_after = ((1.0 - entry.tokens) / rate).ceil().max(1.0) as u64;
        Err(OverLimit::Upgrades { retry_after })
    }

    fn release(&self, key: IpKey) {
        let mut shard = self.shard(key);
        if let Some(entry) = shard.entries.get_mut(&key) {
            entry.connections = entry.connections.saturating_sub(1);
            // Nothing left to remember once its allowance is whole again.
            if entry.connections == 0 && entry.refilled + FORGET_AFTER <= Instant::now() {
                shard.entries.remove(&key);
            }
        }
    }
}

/// An address with no connection and no upgrade for this long is forgotten: its
/// allowance (at most one second's worth) is whole again by then.
const FORGET_AFTER: Duration = Duration::from_secs(1);

/// The entry for `key`, made if needed; at the bound, stale entries are swept
/// first, and an address that finds no room is refused.
fn entry(
    shard: &mut Shard,
    key: IpKey,
    now: Instant,
    rate: Option<f64>,
) -> Result<&mut Entry, OverLimit> {
    let Shard {
        entries,
        next_sweep,
    } = shard;
    if !entries.contains_key(&key) && entries.len() >= MAX_TRACKED / SHARDS {
        if now < *next_sweep {
            return Err(OverLimit::Table);
        }
        entries.retain(|_, e| e.connections > 0 || e.refilled + FORGET_AFTER > now);
        *next_sweep = now + Duration::from_millis(100);
        if entries.len() >= MAX_TRACKED / SHARDS {
            return Err(OverLimit::Table);
        }
    }
    Ok(entries.entry(key).or_insert(Entry {
        connections: 0,
        tokens: rate.unwrap_or(0.0),
        refilled: if rate.is_some() {
            now
        } else {
            now - FORGET_AFTER
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn ipv6_clients_share_their_64() {
        assert_eq!(
            IpKey::of(ip("2001:db8:1:2::1")),
            IpKey::of(ip("2001:db8:1:2:ffff::9"))
        );
        assert_ne!(
            IpKey::of(ip("2001:db8:1:2::1")),
            IpKey::of(ip("2001:db8:1:3::1"))
        );
        assert_eq!(IpKey::of(ip("::ffff:10.0.0.1")), IpKey::of(ip("10.0.0.1")));
        assert_ne!(IpKey::of(ip("10.0.0.1")), IpKey::of(ip("10.0.0.2")));
    }

    #[tokio::test(start_paused = true)]
    async fn connections_per_address_are_counted_and_given_back() {
        let table = Arc::new(PerIp::default());
        let a = table.connect(ip("127.0.0.2"), 2).expect("first");
        let _b = table.connect(ip("127.0.0.2"), 2).expect("second");
        assert_eq!(
            table.connect(ip("127.0.0.2"), 2).err(),
            Some(OverLimit::Connections)
        );
        let _other = table.connect(ip("127.0.0.3"), 2).expect("another address");
        drop(a);
        let _c = table
            .connect(ip("127.0.0.2"), 2)
            .expect("a slot was given back");
        drop((_b, _c, _other));
        assert!(
            table.is_empty(),
            "entries with nothing to remember are removed"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn upgrades_per_second_refill() {
        let table = PerIp::default();
        for _ in 0..3 {
            table.upgrade(ip("127.0.0.2"), 3).expect("within the burst");
        }
        assert_eq!(
            table.upgrade(ip("127.0.0.2"), 3),
            Err(OverLimit::Upgrades { retry_after: 1 })
        );
        table.upgrade(ip("127.0.0.3"), 3).expect("another address");
        tokio::time::advance(Duration::from_millis(340)).await;
        table
            .upgrade(ip("127.0.0.2"), 3)
            .expect("a third of a second refills one");
        assert!(table.upgrade(ip("127.0.0.2"), 3).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn the_table_is_bounded_and_forgets() {
        let table = PerIp::default();
        let mut refused = 0;
        for i in 0..(MAX_TRACKED as u32 + 50_000) {
            let addr = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            if table.upgrade(addr, 5) == Err(OverLimit::Table) {
                refused += 1;
            }
        }
        assert!(table.len() <= MAX_TRACKED, "{} tracked", table.len());
        assert!(refused >= 50_000, "{refused} refused at the bound");
        // A second later every entry is stale: new addresses get room again.
        tokio::time::advance(Duration::from_secs(2)).await;
        table
            .upgrade(ip("192.168.0.1"), 5)
            .expect("room after stale entries are swept");
    }

    #[test]
    fn proxy_headers_out_parse_back() {
        use ppp::HeaderResult;
        let s: SocketAddr = "127.0.0.7:5555".parse().expect("addr");
        let d: SocketAddr = "127.0.0.1:8080".parse().expect("addr");
        let v1 = proxy_header(ProxyVersion::V1, Some((s, d)));
        assert_eq!(v1, b"PROXY TCP4 127.0.0.7 127.0.0.1 5555 8080\r\n");
        let v2 = proxy_header(ProxyVersion::V2, Some((s, d)));
        match HeaderResult::parse(&v2) {
            HeaderResult::V2(Ok(h)) => assert_eq!(v2_source(&h), Some(s)),
            other => panic!("{other:?}"),
        }
        let local = proxy_header(ProxyVersion::V2, None);
        match HeaderResult::parse(&local) {
            HeaderResult::V2(Ok(h)) => assert_eq!(v2_source(&h), None),
            other => panic!("{other:?}"),
        }
        assert_eq!(proxy_header(ProxyVersion::V1, None), b"PROXY UNKNOWN\r\n");
    }

    #[test]
    fn forwarded_for_is_replaced_unless_trusted() {
        let client: SocketAddr = "127.0.0.9:1".parse().expect("addr");
        let untrusted = Peer {
            client,
            trusted: false,
        };
        assert_eq!(forwarded_for(Some("6.6.6.6"), &untrusted), "127.0.0.9");
        let trusted = Peer {
            client,
            trusted: true,
        };
        assert_eq!(
            forwarded_for(Some("203.0.113.5"), &trusted),
            "203.0.113.5, 127.0.0.9"
        );
        assert_eq!(forwarded_for(None, &trusted), "127.0.0.9");
    }
}

//! Scale-out that balances itself: retries the client never sees, admission
//! control, slow start, rebalancing, bursts across instances, backends from DNS.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// How a broken backend treats each connection.
#[derive(Clone, Copy, Debug)]
enum Broken {
    /// Accepts, then closes without a word.
    AcceptThenClose,
    /// Accepts, then resets.
    Reset,
    /// Answers garbage to the upgrade.
    Garbage,
    /// Reads the upgrade and never answers.
    Silent,
}

async fn broken_backend(how: Broken) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                match how {
                    Broken::AcceptThenClose => {}
                    Broken::Reset => {
                        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                    }
                    Broken::Garbage => {
                        let _ = read_head(&mut stream).await;
                        let _ = stream.write_all(b"\x00\x01garbage, not HTTP\r\n\r\n").await;
                    }
                    Broken::Silent => {
                        let mut sink = Vec::new();
                        let _ =
                            timeout(Duration::from_secs(30), stream.read_to_end(&mut sink)).await;
                    }
                }
            });
        }
    });
    addr
}

/// The value of one series in a /metrics text (0 when absent).
fn series_value(metrics: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn failures_before_an_answer_are_retried_on_the_next_backend() {
    let _turn = TURNS.read().await;
    for how in [
        Broken::AcceptThenClose,
        Broken::Reset,
        Broken::Garbage,
        Broken::Silent,
    ] {
        let bad = broken_backend(how).await;
        let good = EchoBackend::start().await;
        // The bad one is never ejected here, so every client may try it first.
        let proxy = Proxy::start(&format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\n{}{}",
            route("/ws", "p"),
            pool(
                "p",
                &[(bad, 1), (good.addr, 1)],
                "max_fails = 1000\nhandshake_timeout = \"300ms\"\nretries = 1"
            )
        ))
        .await;
        let mut clients = Vec::new();
        for _ in 0..8 {
            let mut ws = connect(&proxy.url("/ws")).await;
            ws.send(Message::text("hi")).await.expect("send");
            assert_eq!(next(&mut ws).await, Message::text("hi"), "{how:?}");
            clients.push(ws);
        }
        assert_eq!(good.open(), 8, "{how:?}: every 101 came from the good one");
        let (_, metrics) = http_get(proxy.admin.unwrap(), "/metrics", "").await;
        let failures = series_value(
            &metrics,
            "wsgate_backend_failures_total",
            &[("pool", "p"), ("backend", &bad.to_string())],
        );
        // After the first client (which may have picked the good one), the empty
        // bad backend is least loaded: every later client tried it first.
        assert!(
            failures >= 7.0,
            "{how:?}: {failures} failures counted\n{metrics}"
        );
        assert_eq!(
            series_value(
                &metrics,
                "wsgate_upgrades_total",
                &[
                    ("pool", "p"),
                    ("backend", &good.addr.to_string()),
                    ("result", "ok")
                ]
            ),
            8.0,
            "{how:?}"
        );
    }
}

/// Offers `total` upgrades at a steady pace over `over`, taking turns among
/// `proxies`; returns (accepted, refused with a Retry-After of 1 to 5 s).
async fn flood(proxies: &[SocketAddr], total: usize, over: Duration) -> (usize, usize) {
    let mut tick = tokio::time::interval(over / total as u32);
    let mut attempts = Vec::new();
    for i in 0..total {
        tick.tick().await;
        let addr = proxies[i % proxies.len()];
        attempts.push(tokio::spawn(async move {
            let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
            tcp.write_all(upgrade_request("/ws", "").as_bytes())
                .await
                .expect("write");
            read_head(&mut tcp).await
        }));
    }
    let (mut accepted, mut refused) = (0, 0);
    for attempt in attempts {
        let head = attempt.await.expect("attempt");
        if head.starts_with("HTTP/1.1 101") {
            accepted += 1;
        } else {
            assert!(head.starts_with("HTTP/1.1 503"), "{head}");
            let after: u64 = head
                .lines()
                .find_map(|l| l.strip_prefix("retry-after: "))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("no Retry-After: {head}"));
            assert!((1..=5).contains(&after), "{head}");
            refused += 1;
        }
    }
    (accepted, refused)
}

fn rate_limited(backends: &[&EchoBackend], extra: &str) -> String {
    let list: Vec<_> = backends.iter().map(|b| (b.addr, 1)).collect();
    format!(
        "{}{}",
        route("/ws", "p"),
        pool("p", &list, &format!("max_upgrade_rate = 200\n{extra}"))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_upgrade_rate_admits_its_rate_and_refuses_the_rest() {
    let _turn = TURNS.read().await;
    let b = EchoBackend::start().await;
    let proxy = Proxy::start(&rate_limited(&[&b], "")).await;
    let (accepted, refused) = flood(&[proxy.addr], 1000, Duration::from_secs(2)).await;
    assert_eq!(accepted + refused, 1000);
    eprintln!("admission: {accepted} of 1000 accepted");
    assert!((340..=460).contains(&accepted), "{accepted} accepted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_upgrade_rate_holds_for_the_whole_cluster() {
    let _turn = TURNS.read().await;
    let redis = RedisServer::start().await;
    let b = EchoBackend::start().await;
    let a = Proxy::start(&format!(
        "{}{}",
        rate_limited(&[&b], ""),
        cluster(&redis.url(), "a", "100ms")
    ))
    .await;
    let other = Proxy::start(&format!(
        "{}{}",
        rate_limited(&[&b], ""),
        cluster(&redis.url(), "b", "100ms")
    ))
    .await;
    wait_for(
        "both instances to see each other",
        Duration::from_secs(5),
        || a.gateway.cluster().instances() == 2 && other.gateway.cluster().instances() == 2,
    )
    .await;
    let (accepted, refused) = flood(&[a.addr, other.addr], 1000, Duration::from_secs(2)).await;
    assert_eq!(accepted + refused, 1000);
    eprintln!("admission: {accepted} of 1000 accepted");
    assert!((340..=460).contains(&accepted), "{accepted} accepted");
}

#[tokio::test]
async fn a_full_backend_is_not_picked() {
    let _turn = TURNS.read().await;
    let b = [EchoBackend::start().await, EchoBackend::start().await];
    let proxy = Proxy::start(&format!(
        "{}[pool.p]\nbackends = [{{ addr = \"{}\", max_connections = 5 }}, {{ addr = \"{}\", max_connections = 3, weight = 3 }}]\n",
        route("/ws", "p"),
        b[0].addr,
        b[1].addr
    ))
    .await;
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(connect(&proxy.url("/ws")).await);
        let counts = proxy.counts("p");
        assert!(counts[0] <= 5 && counts[1] <= 3, "{counts:?}");
    }
    assert_eq!(proxy.counts("p"), vec![5, 3]);
    let refused = raw_request(proxy.addr, upgrade_request("/ws", "").as_bytes()).await;
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert_eq!((b[0].open(), b[1].open()), (5, 3));
}

#[tokio::test]
async fn slow_start_ramps_a_new_backends_share() {
    let _turn = TURNS.read().await;
    let b = [
        EchoBackend::start().await,
        EchoBackend::start().await,
        EchoBackend::start().await,
    ];
    let config = |n: usize| {
        let list: Vec<_> = b[..n].iter().map(|b| (b.addr, 1)).collect();
        format!(
            "{}{}",
            route("/ws", "p"),
            pool("p", &list, "slow_start = \"10s\"")
        )
    };
    let proxy = Proxy::start(&config(2)).await;
    let mut held = Vec::new();
    for _ in 0..200 {
        held.push(connect(&proxy.url("/ws")).await);
    }
    assert_eq!(proxy.counts("p"), vec![100, 100]);
    let text = format!("[server]\nlisten = [\"127.0.0.1:0\"]\n{}", config(3));
    let added = Instant::now();
    proxy
        .gateway
        .reload(&wsgate::Config::parse(&text, "reload.toml").expect("valid"))
        .expect("reload");
    // 100 new connections at a steady 10 per second.
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut landed = Vec::new();
    for _ in 0..100 {
        tick.tick().await;
        let at = added.elapsed().as_secs_f64();
        let before = proxy.counts("p")[2];
        held.push(connect(&proxy.url("/ws")).await);
        landed.push((at, proxy.counts("p")[2] > before));
    }
    // Each second's share on the newcomer follows max(0.1, t / 10).
    let mut shares = Vec::new();
    for (second, batch) in landed.chunks(10).enumerate() {
        let expected: f64 = batch
            .iter()
            .map(|(t, _)| (t / 10.0).clamp(0.1, 1.0))
            .sum::<f64>()
            / batch.len() as f64;
        let actual = batch.iter().filter(|(_, on_new)| *on_new).count() as f64 / batch.len() as f64;
        shares.push((second, expected, actual));
        assert!(
            (actual - expected).abs() <= 0.101,
            "second {second}: {actual} against {expected}: {shares:?}"
        );
    }
    assert!(shares[0].2 <= 0.2, "not everything at first: {shares:?}");
}

/// A client that reconnects whenever it is closed with 1012, until `stop`;
/// records when each close came and anything but a 1012.
fn reconnecting(
    url: String,
    closes: Arc<Mutex<Vec<Instant>>>,
    wrong: Arc<Mutex<Vec<String>>>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let mut ws = connect(&url).await;
            let got = tokio::select! {
                _ = stop.cancelled() => return,
                got = ws.next() => got,
            };
            match got {
                Some(Ok(Message::Close(Some(frame)))) if u16::from(frame.code) == 1012 => {
                    closes.lock().unwrap().push(Instant::now());
                }
                other => {
                    wrong.lock().unwrap().push(format!("{other:?}"));
                    return;
                }
            }
        }
    })
}

fn per_second(at: &[Instant]) -> BTreeMap<u64, u32> {
    let mut at = at.to_vec();
    at.sort();
    let mut out = BTreeMap::new();
    if let Some(first) = at.first().copied() {
        for t in at {
            *out.entry((t - first).as_secs()).or_default() += 1;
        }
    }
    out
}

const REBALANCE: &str = "[pool.p.rebalance]\nrate = 20\nmin_age = \"0s\"\n";

fn scaled(b: &[EchoBackend], n: usize, extra: &str) -> String {
    let list: Vec<_> = b[..n].iter().map(|b| (b.addr, 1)).collect();
    format!(
        "{}{}{REBALANCE}{extra}",
        route("/ws", "p"),
        pool("p", &list, "")
    )
}

async fn three() -> Vec<EchoBackend> {
    vec![
        EchoBackend::start().await,
        EchoBackend::start().await,
        EchoBackend::start().await,
    ]
}

/// Waits until the backends' open connections are each 100 ± 10%.
async fn until_balanced(b: &[EchoBackend]) {
    wait_for(
        "each backend to hold 100 ± 10%",
        Duration::from_secs(30),
        || {
            b.iter().all(|b| b.open().abs_diff(100) <= 10)
                && b.iter().map(|b| b.open()).sum::<usize>() == 300
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalance_moves_tunnels_to_new_backends_at_its_rate() {
    let _turn = TURNS.read().await;
    let b = three().await;
    let proxy = Proxy::start(&scaled(&b, 1, "")).await;
    let (closes, wrong, stop) = (Arc::default(), Arc::default(), CancellationToken::new());
    let mut clients = Vec::new();
    for _ in 0..300 {
        clients.push(reconnecting(
            proxy.url("/ws"),
            Arc::clone(&closes),
            Arc::clone(&wrong),
            stop.clone(),
        ));
    }
    wait_for(
        "300 tunnels on the one backend",
        Duration::from_secs(10),
        || b[0].open() == 300,
    )
    .await;
    // Scale-out: two empty backends join.
    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\n{}",
        scaled(&b, 3, "")
    );
    proxy
        .gateway
        .reload(&wsgate::Config::parse(&text, "reload.toml").expect("valid"))
        .expect("reload");
    until_balanced(&b).await;
    stop.cancel();
    for c in clients {
        c.await.expect("client");
    }
    assert!(
        wrong.lock().unwrap().is_empty(),
        "{:?}",
        wrong.lock().unwrap()
    );
    let seconds = per_second(&closes.lock().unwrap());
    eprintln!("rebalance closes per second: {seconds:?}");
    assert!(seconds.values().all(|n| *n <= 21), "{seconds:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalance_holds_its_rate_across_two_instances() {
    let _turn = TURNS.read().await;
    let redis = RedisServer::start().await;
    let b = three().await;
    let with = |id: &str, n: usize| scaled(&b, n, &cluster(&redis.url(), id, "100ms"));
    let a = Proxy::start(&with("a", 1)).await;
    let other = Proxy::start(&with("b", 1)).await;
    let (closes, wrong, stop) = (Arc::default(), Arc::default(), CancellationToken::new());
    let mut clients = Vec::new();
    for i in 0..300 {
        let url = if i % 2 == 0 {
            a.url("/ws")
        } else {
            other.url("/ws")
        };
        clients.push(reconnecting(
            url,
            Arc::clone(&closes),
            Arc::clone(&wrong),
            stop.clone(),
        ));
    }
    wait_for(
        "300 tunnels on the one backend",
        Duration::from_secs(10),
        || b[0].open() == 300,
    )
    .await;
    for (proxy, id) in [(&a, "a"), (&other, "b")] {
        let text = format!("[server]\nlisten = [\"127.0.0.1:0\"]\n{}", with(id, 3));
        proxy
            .gateway
            .reload(&wsgate::Config::parse(&text, "reload.toml").expect("valid"))
            .expect("reload");
    }
    until_balanced(&b).await;
    stop.cancel();
    for c in clients {
        c.await.expect("client");
    }
    assert!(
        wrong.lock().unwrap().is_empty(),
        "{:?}",
        wrong.lock().unwrap()
    );
    let seconds = per_second(&closes.lock().unwrap());
    eprintln!("rebalance closes per second, two instances: {seconds:?}");
    assert!(seconds.values().all(|n| *n <= 22), "{seconds:?}");
}

/// `INFO commandstats` calls, summed over every command.
async fn redis_commands(redis: &RedisServer) -> u64 {
    let mut conn = redis.conn().await;
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .expect("INFO");
    info.lines()
        .filter_map(|l| {
            l.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// Where a wsgate process's admin listener is, from its log.
async fn admin_address(proxy: &ProxyProcess) -> SocketAddr {
    proxy
        .wait_logged("admin listening", 1, Duration::from_secs(10))
        .await;
    let log = proxy.log.lock().expect("log").clone();
    log.iter()
        .filter(|line| line.contains("admin listening"))
        .find_map(|line| {
            line.split("addr=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .expect("the admin listener's address in the log")
}

/// How many live instances (itself included) an instance lists in `/stats`.
async fn instances_seen(admin: SocketAddr) -> usize {
    let (_, json) = http_get(admin, "/stats", "").await;
    let json: serde_json::Value = serde_json::from_str(&json).unwrap_or_default();
    json["instances"].as_array().map_or(0, Vec::len)
}

/// This instance's view of the pool through its admin API: (connections,
/// cluster connections) per backend.
async fn backends_seen(admin: SocketAddr) -> Vec<(u64, u64)> {
    let (_, json) = http_get(admin, "/backends", "").await;
    let json: serde_json::Value = serde_json::from_str(&json).unwrap_or_default();
    json["pools"][0]["backends"]
        .as_array()
        .map(|b| {
            b.iter()
                .map(|b| {
                    (
                        b["connections"].as_u64().unwrap_or(0),
                        b["cluster_connections"].as_u64().unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Two backends holding 90 each and an empty one; 120 upgrades arrive at
/// `instances` wsgate processes at once. Every backend must end within ±8% of 100.
async fn burst_through(instances: usize) -> Vec<usize> {
    let redis = RedisServer::start().await;
    let b = three().await;
    // Every listener on port 0, the admin's read from the log: ports chosen
    // beforehand and released could be taken by another instance's port-0 proxy
    // listener before their own instance bound them (a run here saw an instance
    // exit at start). A reload keeps an admin listener whose address is unchanged.
    let config = |id: usize, n: usize| {
        let list: Vec<_> = b[..n].iter().map(|b| (b.addr, 1)).collect();
        format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\nwatch_config = false\n[admin]\nlisten = \"127.0.0.1:0\"\n{}{}{}",
            route("/ws", "p"),
            pool("p", &list, ""),
            cluster(&redis.url(), &format!("i{id}"), "200ms")
        )
    };
    let mut proxies = Vec::new();
    let mut admins = Vec::new();
    for id in 0..instances {
        let proxy = ProxyProcess::start_file(&config(id, 2)).await;
        admins.push(admin_address(&proxy).await);
        proxies.push(proxy);
    }
    let mut held = Vec::new();
    for _ in 0..180 {
        held.push(connect(&proxies[0].url("/ws")).await);
    }
    assert_eq!((b[0].open(), b[1].open()), (90, 90));
    for (id, p) in proxies.iter().enumerate() {
        std::fs::write(&p.path, config(id, 3)).expect("config");
        p.signal("HUP");
    }
    for admin in &admins {
        let deadline = Instant::now() + Duration::from_secs(10);
        // Every instance knows the others (a heartbeat has listed them), so the
        // burst meets a cluster, not instances that each think they are alone.
        while instances_seen(*admin).await != instances {
            assert!(Instant::now() < deadline, "every instance sees {instances}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        while backends_seen(*admin)
            .await
            .iter()
            .map(|(_, c)| *c)
            .collect::<Vec<_>>()
            != vec![90, 90, 0]
        {
            assert!(Instant::now() < deadline, "every instance sees 90/90/0");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let before = redis_commands(&redis).await;
    // The burst: 120 upgrades at once, shared by the instances.
    let started = Instant::now();
    let urls: Vec<String> = proxies.iter().map(|p| p.url("/ws")).collect();
    let burst: Vec<_> = (0..120)
        .map(|i| {
            let url = urls[i % urls.len()].clone();
            tokio::spawn(async move { connect(&url).await })
        })
        .collect();
    for ws in burst {
        held.push(ws.await.expect("client"));
    }
    let took = started.elapsed();
    let counts: Vec<usize> = b.iter().map(|b| b.open()).collect();
    let commands = redis_commands(&redis).await - before;
    eprintln!(
        "burst through {instances} instances in {took:?}: {counts:?}; {:.2} Redis commands per upgrade",
        commands as f64 / 120.0
    );
    counts
}

/// The burst tests run alone (a write turn), the others of this file together (read
/// turns). A burst starts up to three wsgate processes, a Redis and three backends
/// and counts where 120 upgrades land within ~50 ms; beside the other scale tests
/// on two cores, full-suite runs here ended bursts 105/105/90 and 91/93/116, while
/// run without the rest of the file the pair passed eight times in a row beside two
/// CPU hogs.
static TURNS: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// Five bursts: at least three within ±8% of ideal on every backend, none beyond
/// ±15% (without the live counts all end 90/90/120). A burst lands beyond ±8% now
/// and then (1 in 30 here; a CI run once saw two of three, 106/105/89 and
/// 104/105/91, when the test asked two of three): each pick is assumed mirrored by
/// the other instances until they acknowledge, and an instance the scheduler holds
/// back acknowledges late. Three of five asks the same of each burst and fails on
/// such a draw far less often.
async fn bursts_through(instances: usize) {
    let _alone = TURNS.write().await;
    let mut runs = Vec::new();
    for _ in 0..5 {
        runs.push(burst_through(instances).await);
    }
    let within = |counts: &Vec<usize>, d: usize| counts.iter().all(|n| n.abs_diff(100) <= d);
    assert!(
        runs.iter().filter(|c| within(c, 8)).count() >= 3,
        "{runs:?}"
    );
    assert!(runs.iter().all(|c| within(c, 15)), "{runs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_through_two_instances_is_balanced() {
    bursts_through(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_through_three_instances_is_balanced() {
    bursts_through(3).await;
}

/// Four echo backends on 127.0.0.1-4, one port for all (DNS gives addresses only).
async fn backends_on_one_port() -> (u16, Vec<EchoBackend>) {
    for _ in 0..20 {
        let port = free_addr().await.port();
        let mut found = Vec::new();
        for i in 1..=4u8 {
            let addr = SocketAddr::from(([127, 0, 0, i], port));
            match TcpListener::bind(addr).await {
                Ok(l) => {
                    drop(l);
                    found.push(EchoBackend::start_at(addr).await);
                }
                Err(_) => break,
            }
        }
        if found.len() == 4 {
            return (port, found);
        }
    }
    panic!("no port free on 127.0.0.1-4");
}

/// The addresses of pool p's backends that are not draining, per /backends.
async fn serving(admin: SocketAddr) -> Vec<String> {
    let (_, json) = http_get(admin, "/backends", "").await;
    let json: serde_json::Value = serde_json::from_str(&json).unwrap_or_default();
    let mut out: Vec<String> = json["pools"][0]["backends"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|b| b["draining"] == false)
        .filter_map(|b| b["addr"].as_str().map(str::to_string))
        .collect();
    out.sort();
    out
}

async fn wait_serving(admin: SocketAddr, expected: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = serving(admin).await;
        if now == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "serving {now:?}, expected {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_follow_dns() {
    let _turn = TURNS.read().await;
    use std::net::Ipv4Addr;
    let (port, b) = backends_on_one_port().await;
    let ip = |i: u8| Ipv4Addr::new(127, 0, 0, i);
    let name = |i: u8| format!("127.0.0.{i}:{port}");
    let dns = DnsServer::start(&[ip(1), ip(2)]).await;
    let proxy = Proxy::start(&format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[resolver]\nnameservers = [\"{}\"]\n{}\
         [pool.p]\nbackends = [{{ dns = \"chat.test:{port}\" }}]\ndns_refresh = \"200ms\"\n\
         slow_start = \"5s\"\ndrain_timeout = \"0s\"\ndrain_spread = \"1s\"\n",
        dns.addr,
        route("/ws", "p"),
    ))
    .await;
    let admin = proxy.admin.unwrap();
    wait_serving(admin, &[name(1), name(2)]).await;
    let mut first = Vec::new();
    for _ in 0..20 {
        first.push(connect(&proxy.url("/ws")).await);
    }
    assert_eq!((b[0].open(), b[1].open()), (10, 10));

    // A third address: it gets connections, ramped (slow start), not all of them.
    dns.set(&[ip(1), ip(2), ip(3)]);
    wait_serving(admin, &[name(1), name(2), name(3)]).await;
    let mut second = Vec::new();
    for _ in 0..10 {
        second.push(connect(&proxy.url("/ws")).await);
    }
    assert!(
        (1..=5).contains(&b[2].open()),
        "newcomer took {} of 10",
        b[2].open()
    );

    // Two others: the vanished addresses drain, their clients get 1012, spread.
    let staying = b[2].open();
    dns.set(&[ip(3), ip(4)]);
    wait_serving(admin, &[name(3), name(4)]).await;
    let mut closes = Vec::new();
    for mut ws in first.into_iter().chain(second) {
        closes.push(tokio::spawn(async move {
            let got = timeout(Duration::from_secs(4), ws.next()).await;
            match got {
                Ok(Some(Ok(Message::Close(Some(f))))) => Some((u16::from(f.code), Instant::now())),
                // On a backend that stays: still open.
                Err(_) => None,
                other => panic!("{other:?}"),
            }
        }));
    }
    let mut at = Vec::new();
    for close in closes {
        if let Some((code, when)) = close.await.expect("client") {
            assert_eq!(code, 1012);
            at.push(when);
        }
    }
    at.sort();
    let drained = 20 + 10 - staying;
    assert_eq!(
        at.len(),
        drained,
        "every client of a vanished address got 1012"
    );
    assert!(
        *at.last().unwrap() - at[0] >= Duration::from_millis(500),
        "spread, not all at once"
    );

    // An outage keeps the last known set.
    dns.outage();
    let failures = || async {
        let (_, metrics) = http_get(admin, "/metrics", "").await;
        series_value(&metrics, "wsgate_dns_failures_total", &[("pool", "p")])
    };
    wait_for_async("a failed resolution", || async { failures().await >= 1.0 }).await;
    assert_eq!(serving(admin).await, vec![name(3), name(4)]);
    let mut ws = connect(&proxy.url("/ws")).await;
    ws.send(Message::text("still")).await.expect("send");
    assert_eq!(next(&mut ws).await, Message::text("still"));
}

/// Polls an async condition every 50 ms for up to 15 s.
async fn wait_for_async<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(15);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

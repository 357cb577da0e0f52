//! Changing things without a storm: a reload that applies every section while
//! tunnels carry traffic, backends that leave and come back with their counts,
//! drains and shutdowns that spread their closes, the close deadline, and health
//! that recovers.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// A client that sends a numbered message every 50 ms and checks each echo until
/// told to stop; then closes cleanly. Its result is how many it exchanged, or
/// what went wrong.
struct Talker {
    /// This client's echoes so far.
    echoed: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<Result<u64, String>>,
}

fn talk(mut ws: Ws, echoes: Arc<AtomicU64>, stop: CancellationToken) -> Talker {
    let echoed = Arc::new(AtomicU64::new(0));
    let mine = echoed.clone();
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        let mut n = 0u64;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            n += 1;
            let text = n.to_string();
            ws.send(Message::text(text.clone()))
                .await
                .map_err(|e| format!("send {n}: {e}"))?;
            match timeout(Duration::from_secs(5), ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) if t.as_str() == text => {
                    echoes.fetch_add(1, Ordering::Relaxed);
                    mine.fetch_add(1, Ordering::Relaxed);
                }
                other => return Err(format!("message {n} not echoed: {other:?}")),
            }
        }
        ws.close(None).await.map_err(|e| format!("close: {e}"))?;
        Ok(n)
    });
    Talker { echoed, task }
}

async fn wait_echoes(echoes: &AtomicU64, at_least: u64) {
    wait_for("echoes", Duration::from_secs(20), || {
        echoes.load(Ordering::Relaxed) >= at_least
    })
    .await;
}

async fn refused(addr: SocketAddr) -> bool {
    TcpStream::connect(addr).await.is_err()
}

fn every_section(
    listen: &[SocketAddr],
    admin: SocketAddr,
    watch: bool,
    cluster: &str,
    routes: &str,
    pools: &str,
) -> String {
    let listen: Vec<String> = listen.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "[server]\nlisten = [{}]\nwatch_config = {watch}\n{}\n[admin]\nlisten = \"{admin}\"\n\
         [cluster]\nname = \"{cluster}\"\n{routes}{pools}",
        listen.join(", "),
        if cluster == "one" {
            "handshake_timeout = \"10s\""
        } else {
            "handshake_timeout = \"5s\""
        },
    )
}

/// 200 tunnels carry traffic through two listeners while a reload changes every
/// section; by SIGHUP or, with `watch`, by editing the file.
async fn reload_everything(watch: bool) {
    let b: Vec<EchoBackend> = vec![
        EchoBackend::start().await,
        EchoBackend::start().await,
        EchoBackend::start().await,
    ];
    let [l1, l2, l3, a1, a2] = free_addrs(5).await[..] else {
        unreachable!("five addresses")
    };
    let before = every_section(
        &[l1, l2],
        a1,
        watch,
        "one",
        &route("/ws", "chat"),
        &pool(
            "chat",
            &[(b[0].addr, 1), (b[1].addr, 1)],
            "idle_timeout = \"60s\"",
        ),
    );
    let after = every_section(
        &[l1, l3],
        a2,
        watch,
        "two",
        &format!("{}{}", route("/ws", "room"), route("/new", "room")),
        &pool(
            "room",
            &[(b[0].addr, 1), (b[2].addr, 1)],
            "idle_timeout = \"120s\"",
        ),
    );
    let proxy = ProxyProcess::start_file(&before).await;
    proxy
        .wait_logged("proxy listening", 2, Duration::from_secs(5))
        .await;
    proxy
        .wait_logged("admin listening", 1, Duration::from_secs(5))
        .await;

    let echoes = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let mut talkers = Vec::new();
    for i in 0..200 {
        let via = if i % 2 == 0 { l1 } else { l2 };
        let ws = connect(&format!("ws://{via}/ws")).await;
        talkers.push(talk(ws, echoes.clone(), stop.clone()));
    }
    wait_echoes(&echoes, 400).await;

    std::fs::write(&proxy.path, &after).expect("write the new config");
    if !watch {
        proxy.signal("HUP");
    }
    proxy
        .wait_logged("configuration reloaded", 1, Duration::from_secs(10))
        .await;
    let line = proxy
        .log
        .lock()
        .unwrap()
        .iter()
        .find(|l| l.contains("configuration reloaded"))
        .cloned()
        .unwrap_or_default();
    for part in [
        format!("listeners +{l3} -{l2}"),
        format!("admin.listen {a1} -> {a2}"),
        "server.handshake_timeout 10s -> 5s".to_string(),
        "routes 1 -> 2".to_string(),
        "pools +1 -1".to_string(),
        "draining 2".to_string(),
    ] {
        assert!(line.contains(&part), "`{part}` missing from: {line}");
    }
    assert_eq!(proxy.logged("cluster.name changed"), 1, "restart-only key");

    // The new listener accepts, with the new routes; the removed one refuses.
    for path in ["/ws", "/new"] {
        let mut ws = connect(&format!("ws://{l3}{path}")).await;
        ws.send(Message::text("new")).await.expect("send");
        assert_eq!(next(&mut ws).await, Message::text("new"));
    }
    wait_for_async("the removed listener to refuse", || refused(l2)).await;
    // The admin API moved.
    assert_eq!(http_get(a2, "/healthz", "").await.0, 200);
    wait_for_async("the old admin address to refuse", || refused(a1)).await;
    let (_, backends) = http_get(a2, "/backends", "").await;
    let json: serde_json::Value = serde_json::from_str(&backends).expect("json");
    let chat = json["pools"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "chat"))
        .expect("the renamed pool is kept while its tunnels last");
    let held: u64 = chat["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .map(|b| {
            assert_eq!(b["draining"], true);
            b["connections"].as_u64().unwrap_or(0)
        })
        .sum();
    assert_eq!(held, 200);

    if !watch {
        // An invalid file changes nothing and says where each error is.
        std::fs::write(
            &proxy.path,
            format!("{after}\n[pool.room.health]\ninterval = \"soon\"\n"),
        )
        .expect("write");
        proxy.signal("HUP");
        proxy
            .wait_logged("reload refused", 1, Duration::from_secs(10))
            .await;
        let config_file = proxy.path.display().to_string();
        assert!(
            proxy.logged(&format!("{config_file}:")) >= 1,
            "file:line:col of the error"
        );
        assert_eq!(http_get(a2, "/healthz", "").await.0, 200);
    }

    // Traffic goes on through every tunnel: nothing was dropped, nothing lost
    // (each talker checks every echo, in order).
    let at_reload: Vec<u64> = talkers
        .iter()
        .map(|t| t.echoed.load(Ordering::Relaxed))
        .collect();
    wait_for(
        "every tunnel to carry traffic after the reload",
        Duration::from_secs(20),
        || {
            talkers
                .iter()
                .zip(&at_reload)
                .all(|(t, before)| t.echoed.load(Ordering::Relaxed) >= before + 2)
        },
    )
    .await;
    stop.cancel();
    for talker in talkers {
        talker
            .task
            .await
            .expect("talker")
            .expect("no tunnel dropped");
    }
}

/// Polls an async condition every 20 ms for up to 5 s.
async fn wait_for_async<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(5);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_every_section_without_dropping_a_tunnel() {
    reload_everything(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_file_applies_every_section_without_dropping_a_tunnel() {
    reload_everything(true).await;
}

/// Opens `n` clients, each with a path of its own (`/ws?c=i`) so the backend that
/// holds it can be found.
async fn open_tagged(
    proxy_url: impl Fn(&str) -> String,
    ids: std::ops::Range<usize>,
) -> Vec<(usize, Ws)> {
    let mut out = Vec::new();
    for i in ids {
        out.push((i, connect(&proxy_url(&format!("/ws?c={i}"))).await));
    }
    out
}

/// Closes (cleanly) the clients on `backend`; returns the others.
async fn close_those_on(backend: &EchoBackend, clients: Vec<(usize, Ws)>) -> Vec<(usize, Ws)> {
    let (on, others): (Vec<_>, Vec<_>) = clients
        .into_iter()
        .partition(|(i, _)| backend.has_target(&format!("/ws?c={i}")));
    for (_, mut ws) in on {
        ws.close(None).await.expect("close");
        close_code(&mut ws, Duration::from_secs(5)).await;
    }
    others
}

fn two_backends(b: &[EchoBackend], which: &[usize]) -> String {
    let list: Vec<_> = which.iter().map(|i| (b[*i].addr, 1)).collect();
    format!("{}{}", route("/ws", "p"), pool("p", &list, ""))
}

fn reload(proxy: &Proxy, config: &str) {
    let text = format!("[server]\nlisten = [\"127.0.0.1:0\"]\n{config}");
    let config = wsgate::Config::parse(&text, "reload.toml").expect("valid");
    proxy.gateway.reload(&config).expect("reload");
}

#[tokio::test]
async fn a_backend_removed_and_readded_keeps_its_count() {
    let b = [EchoBackend::start().await, EchoBackend::start().await];
    let admin = "[admin]\nlisten = \"127.0.0.1:0\"\n";
    let proxy = Proxy::start(&format!("{admin}{}", two_backends(&b, &[0, 1]))).await;
    let clients = open_tagged(|p| proxy.url(p), 0..40).await;
    assert_eq!(proxy.counts("p"), vec![20, 20]);
    let _kept = close_those_on(&b[0], clients).await;
    proxy.wait_counts("p", &[0, 20]).await;

    reload(&proxy, &format!("{admin}{}", two_backends(&b, &[0])));
    // Removed, it stays with its 20 tunnels, draining, in /backends and the gauges.
    assert_eq!(proxy.counts("p"), vec![0, 20]);
    let (_, json) = http_get(proxy.admin.unwrap(), "/backends", "").await;
    let json: serde_json::Value = serde_json::from_str(&json).expect("json");
    let leaving = &json["pools"][0]["backends"][1];
    assert_eq!(leaving["addr"], b[1].addr.to_string());
    assert_eq!(leaving["draining"], true);
    assert_eq!(leaving["connections"], 20);
    let (_, metrics) = http_get(proxy.admin.unwrap(), "/metrics", "").await;
    let series = format!(
        "wsgate_connections_active{{pool=\"p\",backend=\"{}\"}} 20",
        b[1].addr
    );
    assert!(metrics.contains(&series), "{metrics}");

    reload(&proxy, &format!("{admin}{}", two_backends(&b, &[0, 1])));
    assert_eq!(
        proxy.counts("p"),
        vec![0, 20],
        "re-added with its live count"
    );
    // The next 30 are balanced as if it had 20: 25 to the empty one, 5 to it.
    let _more = open_tagged(|p| proxy.url(p), 100..130).await;
    assert_eq!(proxy.counts("p"), vec![25, 25]);
}

#[tokio::test]
async fn another_instance_still_counts_a_removed_backends_tunnels() {
    let redis = RedisServer::start().await;
    let b = [EchoBackend::start().await, EchoBackend::start().await];
    let a_cluster = cluster(&redis.url(), "a", "100ms");
    let a = Proxy::start(&format!("{}{a_cluster}", two_backends(&b, &[0, 1]))).await;
    let other = Proxy::start(&format!(
        "{}{}",
        two_backends(&b, &[0, 1]),
        cluster(&redis.url(), "b", "100ms")
    ))
    .await;
    let clients = open_tagged(|p| a.url(p), 0..40).await;
    let _kept = close_those_on(&b[0], clients).await;
    a.wait_counts("p", &[0, 20]).await;
    other
        .wait_remote("p", &[0, 20], Duration::from_secs(5))
        .await;

    reload(&a, &format!("{}{a_cluster}", two_backends(&b, &[0])));
    // Ten heartbeats later the other instance still sees the 20.
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        assert_eq!(other.remote("p"), vec![0, 20]);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `POST` to the admin API; the status.
async fn post(admin: SocketAddr, path: &str) -> u16 {
    http_request(admin, "POST", path, "").await.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_through_the_api_spreads_its_1012s() {
    let b = [EchoBackend::start().await, EchoBackend::start().await];
    let proxy = Proxy::start(&format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n{}{}",
        route("/ws", "p"),
        pool(
            "p",
            &[(b[0].addr, 1), (b[1].addr, 1)],
            "drain_timeout = \"1s\"\ndrain_spread = \"5s\""
        ),
    ))
    .await;
    let admin = proxy.admin.unwrap();
    let clients = open_tagged(|p| proxy.url(p), 0..200).await;
    assert_eq!(proxy.counts("p"), vec![100, 100]);
    let (drained, mut kept): (Vec<_>, Vec<_>) = clients
        .into_iter()
        .partition(|(i, _)| b[0].has_target(&format!("/ws?c={i}")));
    assert_eq!(drained.len(), 100);

    let started = Instant::now();
    let path = format!("/pools/p/backends/{}/drain", b[0].addr);
    assert_eq!(post(admin, &path).await, 200);
    let closes: Vec<_> = drained
        .into_iter()
        .map(|(_, mut ws)| {
            tokio::spawn(async move {
                let code = close_code(&mut ws, Duration::from_secs(20)).await;
                (code, Instant::now())
            })
        })
        .collect();
    // No new connection goes to it.
    let mut fresh = connect(&proxy.url("/ws?c=fresh")).await;
    assert!(b[1].has_target("/ws?c=fresh"));
    fresh.close(None).await.expect("close");
    close_code(&mut fresh, Duration::from_secs(5)).await;
    drop(fresh);

    // Midway, /backends shows it draining with a falling count.
    tokio::time::sleep_until(started + Duration::from_millis(3500)).await;
    let (_, json) = http_get(admin, "/backends", "").await;
    let json: serde_json::Value = serde_json::from_str(&json).expect("json");
    let draining = &json["pools"][0]["backends"][0];
    assert_eq!(draining["draining"], true);
    let left = draining["connections"].as_u64().expect("count");
    assert!(0 < left && left < 100, "{left}");

    let mut at = Vec::new();
    for close in closes {
        let (code, when) = close.await.expect("client");
        assert_eq!(code, 1012);
        at.push(when);
    }
    at.sort();
    let first = at[0];
    assert!(
        first >= started + Duration::from_millis(900),
        "closed before drain_timeout: {:?}",
        first - started
    );
    let mut per_second = BTreeMap::<u64, u32>::new();
    for t in &at {
        *per_second.entry((*t - first).as_secs()).or_default() += 1;
    }
    assert!(per_second.values().all(|n| *n <= 22), "{per_second:?}");
    assert!(per_second.len() >= 5, "spread over 5 s: {per_second:?}");

    // The other backend's tunnels are untouched.
    for (_, ws) in kept.iter_mut() {
        ws.send(Message::text("still")).await.expect("send");
        assert_eq!(next(ws).await, Message::text("still"));
    }
    proxy.wait_counts("p", &[0, 100]).await;
    // At 0 its gauge series is gone, not frozen.
    let series = format!("backend=\"{}\"", b[0].addr);
    wait_for_async("the drained backend's series to vanish", || async {
        let (_, metrics) = http_get(admin, "/metrics", "").await;
        !metrics
            .lines()
            .any(|l| l.starts_with("wsgate_connections_active") && l.contains(&series))
    })
    .await;
    // Ready again: it takes connections.
    let ready = format!("/pools/p/backends/{}/ready", b[0].addr);
    assert_eq!(post(admin, &ready).await, 200);
    let _back = connect(&proxy.url("/ws?c=back")).await;
    assert!(b[0].has_target("/ws?c=back"));
    assert_eq!(post(admin, "/pools/p/backends/10.9.9.9:1/drain").await, 404);
    assert_eq!(http_get(admin, &path, "").await.0, 405);
}

fn shutdown_config(server: &str, b: &[EchoBackend], pool_extra: &str) -> String {
    let list: Vec<_> = b.iter().map(|b| (b.addr, 1)).collect();
    format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\n{server}\n{}{}",
        route("/ws", "p"),
        pool("p", &list, pool_extra)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_spreads_1001_over_the_window_and_exits_after_the_last() {
    let b = [EchoBackend::start().await, EchoBackend::start().await];
    let mut proxy =
        ProxyProcess::start_file(&shutdown_config("shutdown_spread = \"3s\"", &b, "")).await;
    let mut clients = Vec::new();
    for _ in 0..500 {
        clients.push(connect(&proxy.url("/ws")).await);
    }
    let closes: Vec<_> = clients
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move {
                let code = close_code(&mut ws, Duration::from_secs(20)).await;
                // Dropped at once: the client's FIN ends its tunnel.
                (code, Instant::now())
            })
        })
        .collect();
    let signalled = Instant::now();
    proxy.signal("TERM");
    let mut at = Vec::new();
    for close in closes {
        let (code, when) = close.await.expect("client");
        assert_eq!(code, 1001);
        at.push(when);
    }
    let status = proxy
        .wait_exit(Duration::from_secs(15))
        .await
        .expect("exits");
    let exited = Instant::now();
    assert!(status.success(), "{status}");
    at.sort();
    let last = *at.last().expect("closes");
    assert!(
        exited - last < Duration::from_secs(1),
        "{:?}",
        exited - last
    );
    let mut per_second = BTreeMap::<u64, u32>::new();
    for t in &at {
        *per_second.entry((*t - signalled).as_secs()).or_default() += 1;
    }
    assert!(per_second.values().all(|n| *n <= 200), "{per_second:?}");
}

#[tokio::test]
async fn sigterm_with_nothing_open_exits_at_once() {
    let b = [EchoBackend::start().await];
    let mut proxy = ProxyProcess::start_file(&shutdown_config("", &b, "")).await;
    let signalled = Instant::now();
    proxy.signal("TERM");
    proxy
        .wait_exit(Duration::from_secs(5))
        .await
        .expect("exits");
    assert!(
        signalled.elapsed() < Duration::from_secs(1),
        "{:?}",
        signalled.elapsed()
    );
}

#[tokio::test]
async fn sigterm_exits_at_shutdown_timeout_when_a_client_never_answers() {
    let b = [EchoBackend::start().await];
    let mut proxy = ProxyProcess::start_file(&shutdown_config(
        "shutdown_spread = \"0s\"\nshutdown_timeout = \"2s\"",
        &b,
        "close_timeout = \"30s\"",
    ))
    .await;
    // Upgraded, then never reads or answers.
    let mut silent = TcpStream::connect(proxy.addr).await.expect("connect");
    silent
        .write_all(upgrade_request("/ws", "").as_bytes())
        .await
        .expect("write");
    assert!(read_head(&mut silent).await.starts_with("HTTP/1.1 101"));
    let signalled = Instant::now();
    proxy.signal("TERM");
    proxy
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("exits");
    let took = signalled.elapsed();
    assert!(
        took >= Duration::from_millis(1800) && took < Duration::from_secs(5),
        "{took:?}"
    );
}

#[tokio::test]
async fn after_a_close_frame_the_other_side_has_close_timeout() {
    let mut backend = RawBackend::start("").await;
    let proxy = Proxy::start(&format!(
        "{}{}",
        route("/ws", "p"),
        pool("p", &[(backend.addr, 1)], "close_timeout = \"1s\"")
    ))
    .await;
    let mut ws = connect(&proxy.url("/ws")).await;
    // The backend takes the connection and never answers anything.
    let (mut held, _) = backend.next().await;
    proxy.wait_counts("p", &[1]).await;
    ws.send(Message::Close(None)).await.expect("close");
    let closed = Instant::now();
    wait_for("the count to be released", Duration::from_secs(3), || {
        proxy.counts("p") == vec![0]
    })
    .await;
    assert!(closed.elapsed() >= Duration::from_millis(900));
    // Both sockets were closed: each end reads EOF.
    let ended = timeout(Duration::from_secs(2), async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the client's socket stayed open");
    let mut sink = Vec::new();
    let read = timeout(Duration::from_secs(2), held.read_to_end(&mut sink)).await;
    assert!(
        matches!(read, Ok(Ok(_))),
        "the backend's socket stayed open"
    );
}

#[tokio::test]
async fn without_checks_failed_attempts_eject_a_backend_for_fail_timeout() {
    let dead = dead_addr().await;
    let good = EchoBackend::start().await;
    let proxy = ProxyProcess::start(&format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n{}{}",
        route("/ws", "p"),
        pool(
            "p",
            &[(dead, 1), (good.addr, 1)],
            "max_fails = 2\nfail_timeout = \"1s\""
        )
    ))
    .await;
    // Every upgrade succeeds: the refusals are retried on the good backend.
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(connect(&proxy.url("/ws")).await);
    }
    proxy
        .wait_logged(
            "backend ejected: failed attempts",
            1,
            Duration::from_secs(5),
        )
        .await;
    // Back on its port: after fail_timeout it is tried again and re-admitted.
    let _revived = EchoBackend::start_at(dead).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while proxy.logged("backend healthy again") == 0 {
        assert!(Instant::now() < deadline, "never re-admitted");
        held.push(connect(&proxy.url("/ws")).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for _ in 0..5 {
        held.push(connect(&proxy.url("/ws")).await);
    }
    assert_eq!(proxy.logged("backend ejected: failed attempts"), 1);
    assert_eq!(proxy.logged("backend healthy again"), 1);
}

/// A backend that answers every upgrade with a 101 whose Accept is wrong.
async fn wrong_accept_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = read_head(&mut stream).await;
                let _ = stream
                    .write_all(
                        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                          Connection: Upgrade\r\nSec-WebSocket-Accept: d3Jvbmc=\r\n\r\n",
                    )
                    .await;
                let mut sink = Vec::new();
                let _ = stream.read_to_end(&mut sink).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn the_websocket_check_verifies_the_upgrade() {
    let good = EchoBackend::start().await;
    let liar = wrong_accept_backend().await;
    let proxy = ProxyProcess::start(&format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n{}{}\
         [pool.p.health]\nkind = \"websocket\"\npath = \"/ws\"\ninterval = \"100ms\"\n\
         unhealthy_after = 2\nhealthy_after = 1\n",
        route("/ws", "p"),
        pool("p", &[(good.addr, 1), (liar, 1)], ""),
    ))
    .await;
    proxy
        .wait_logged("backend ejected: unhealthy", 1, Duration::from_secs(5))
        .await;
    let log = proxy.log.lock().unwrap().join("\n");
    assert!(
        log.lines()
            .filter(|l| l.contains("backend ejected"))
            .all(|l| l.contains(&liar.to_string())),
        "{log}"
    );
    // Many more checks: the good one passes each (an upgrade, then close 1000),
    // and the flip was logged once.
    let checks_before = good.accepted();
    wait_for("ten more checks", Duration::from_secs(5), || {
        good.accepted() >= checks_before + 10
    })
    .await;
    assert_eq!(proxy.logged("backend ejected"), 1);
    for _ in 0..6 {
        let mut ws = connect(&proxy.url("/ws")).await;
        ws.send(Message::text("x")).await.expect("send");
        assert_eq!(next(&mut ws).await, Message::text("x"));
    }
}

#[tokio::test]
async fn a_reload_that_cannot_bind_changes_nothing() {
    let b = [EchoBackend::start().await, EchoBackend::start().await];
    let proxy = Proxy::start(&two_backends(&b, &[0])).await;
    let taken = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:0\", \"{}\"]\n{}",
        taken.local_addr().expect("addr"),
        two_backends(&b, &[0, 1])
    );
    let config = wsgate::Config::parse(&text, "reload.toml").expect("valid");
    let refused = proxy.gateway.reload(&config);
    assert!(
        matches!(refused, Err(wsgate::ReloadError::Bind { .. })),
        "{refused:?}"
    );
    // The pool still has its one backend.
    assert_eq!(proxy.counts("p"), vec![0]);
    let mut ws = connect(&proxy.url("/ws")).await;
    ws.send(Message::text("x")).await.expect("send");
    assert_eq!(next(&mut ws).await, Message::text("x"));
}

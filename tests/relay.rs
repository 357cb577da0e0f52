//! The reference relay backend behind wsgate: every message reaches every member
//! of the room exactly once and in per-sender order, over Redis and in memory; a
//! client that never reads is closed without slowing anyone; Redis restarts.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use wsgate::backend::broker::{self, MemoryHub};
use wsgate::backend::{Options, RelayBackend};

struct Relays {
    backends: Vec<RelayBackend>,
    addrs: Vec<std::net::SocketAddr>,
    proxy: Proxy,
    _stop: tokio_util::sync::DropGuard,
}

async fn relays(redis: Option<&str>, options: impl Fn(usize) -> Options) -> Relays {
    let stop = CancellationToken::new();
    let hub = MemoryHub::default();
    let mut backends = Vec::new();
    let mut addrs = Vec::new();
    for i in 0..3 {
        let (broker, deliveries) = broker::open(redis, &hub).await.expect("broker");
        let backend = RelayBackend::new(options(i), broker, deliveries);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        addrs.push((listener.local_addr().expect("addr"), 1));
        tokio::spawn(backend.clone().serve(listener, stop.clone()));
        backends.push(backend);
    }
    let config = format!(
        "[[route]]\npath = \"/rooms\"\npool = \"relay\"\nidentity = \"query:user\"\n{}",
        pool("relay", &addrs, "")
    );
    Relays {
        backends,
        addrs: addrs.iter().map(|(a, _)| *a).collect(),
        proxy: Proxy::start(&config).await,
        _stop: stop.drop_guard(),
    }
}

fn options(i: usize) -> Options {
    Options::new(&format!("b{i}"))
}

/// Reads JSON messages until one of `kind` arrives.
async fn expect_kind(ws: &mut Ws, kind: &str) -> serde_json::Value {
    for _ in 0..1000 {
        if let Message::Text(t) = next(ws).await {
            let v: serde_json::Value = serde_json::from_str(&t).expect("json");
            if v["type"] == kind {
                return v;
            }
        }
    }
    panic!("no {kind} message among 1000");
}

async fn join(relays: &Relays, room: &str, user: &str) -> (Ws, String) {
    let mut ws = connect(&relays.proxy.url(&format!("/rooms/{room}?user={user}"))).await;
    let welcome = expect_kind(&mut ws, "welcome").await;
    assert_eq!(welcome["user"], user);
    (ws, welcome["backend"].as_str().unwrap_or("").to_string())
}

/// 30 clients, 100 numbered messages each: every client gets all 3,000 once,
/// each sender's in order.
async fn everyone_gets_everything_once_in_order(relays: Relays) {
    let mut clients = Vec::new();
    for c in 0..30 {
        clients.push(join(&relays, "all", &format!("c{c}")).await);
    }
    let mut per_backend: HashMap<String, usize> = HashMap::new();
    for (_, b) in &clients {
        *per_backend.entry(b.clone()).or_default() += 1;
    }
    assert_eq!(per_backend.len(), 3, "{per_backend:?}");
    assert!(per_backend.values().all(|n| *n == 10), "{per_backend:?}");

    let mut tasks = Vec::new();
    for (c, (ws, _)) in clients.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let (mut sink, mut stream) = ws.split();
            let send = tokio::spawn(async move {
                for i in 0..100 {
                    sink.send(Message::text(format!("{c}:{i}")))
                        .await
                        .expect("send");
                }
                sink
            });
            let mut next_from: HashMap<String, u64> = HashMap::new();
            let mut received = 0;
            let deadline = Instant::now() + Duration::from_secs(60);
            while received < 3000 {
                let left = deadline.saturating_duration_since(Instant::now());
                let m = timeout(left, stream.next())
                    .await
                    .expect("all 3000 in time")
                    .expect("open")
                    .expect("ok");
                let Message::Text(t) = m else { continue };
                let v: serde_json::Value = serde_json::from_str(&t).expect("json");
                if v["type"] != "message" {
                    continue;
                }
                let from = v["from"].as_str().expect("from").to_string();
                let seq = v["seq"].as_u64().expect("seq");
                let expected = next_from.entry(from.clone()).or_insert(1);
                assert_eq!(
                    seq, *expected,
                    "client c{c}: {from}'s messages out of order or repeated"
                );
                let sender: usize = from[1..].parse().expect("sender number");
                assert_eq!(v["text"], format!("{sender}:{}", seq - 1));
                *expected += 1;
                received += 1;
            }
            assert_eq!(next_from.len(), 30);
            assert!(next_from.values().all(|n| *n == 101));
            drop(send.await.expect("sender"));
        }));
    }
    for t in tasks {
        t.await.expect("client");
    }
}

#[tokio::test]
async fn thirty_clients_over_three_backends_through_redis() {
    let redis = RedisServer::start().await;
    everyone_gets_everything_once_in_order(relays(Some(&redis.url()), options).await).await;
}

#[tokio::test]
async fn thirty_clients_over_three_backends_in_memory() {
    everyone_gets_everything_once_in_order(relays(None, options).await).await;
}

#[tokio::test]
async fn whoami_and_no_echo() {
    let relays = relays(None, |i| Options {
        echo: false,
        ..options(i)
    })
    .await;
    let (mut ada, backend) = join(&relays, "r", "ada").await;
    let (mut bob, _) = join(&relays, "r", "bob").await;
    ada.send(Message::text(r#"{"type":"whoami"}"#))
        .await
        .expect("send");
    let me = expect_kind(&mut ada, "whoami").await;
    assert_eq!(me["backend"], backend);
    ada.send(Message::text("hi bob")).await.expect("send");
    let got = expect_kind(&mut bob, "message").await;
    assert_eq!(got["text"], "hi bob");
    bob.send(Message::text("hi ada")).await.expect("send");
    // Ada's next message is Bob's: her own was not echoed to her.
    let got = expect_kind(&mut ada, "message").await;
    assert_eq!(got["text"], "hi ada");
    assert_eq!(got["from"], "bob");
}

#[tokio::test]
async fn a_client_that_never_reads_is_closed_with_1008_and_slows_nobody() {
    let relays = relays(None, |i| Options {
        queue: 32,
        ..options(i)
    })
    .await;
    let (mut slow, _) = join(&relays, "big", "slow").await;
    let mut readers = Vec::new();
    for r in 0..3 {
        readers.push(join(&relays, "big", &format!("r{r}")).await.0);
    }
    let (mut talker, _) = join(&relays, "big", "talker").await;
    // 64 KiB messages until the slow client's buffers and queue are full.
    let body = "x".repeat(64 * 1024);
    let mut sent = 0;
    let started = Instant::now();
    while relays
        .backends
        .iter()
        .map(|b| {
            b.stats()
                .slow_closed
                .load(std::sync::atomic::Ordering::Relaxed)
        })
        .sum::<u64>()
        == 0
    {
        assert!(
            sent < 2000 && started.elapsed() < Duration::from_secs(60),
            "the slow client was never closed"
        );
        talker
            .send(Message::text(format!("{sent} {body}")))
            .await
            .expect("send");
        sent += 1;
        // The readers keep up: each gets every message promptly.
        for ws in readers.iter_mut() {
            let m = expect_kind(ws, "message").await;
            assert!(
                m["text"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with(&format!("{sent_minus} ", sent_minus = sent - 1))
            );
        }
        let _ = expect_kind(&mut talker, "message").await;
    }
    // And after it: 20 more, on time.
    for i in 0..20 {
        talker
            .send(Message::text(format!("after {i}")))
            .await
            .expect("send");
        for ws in readers.iter_mut() {
            let m = timeout(Duration::from_secs(2), expect_kind(ws, "message"))
                .await
                .expect("on time");
            assert_eq!(m["text"], format!("after {i}"));
        }
    }
    // The slow client, reading at last, finds the close frame behind what was queued.
    assert_eq!(close_code(&mut slow, Duration::from_secs(30)).await, 1008);
}

#[tokio::test]
async fn backends_resubscribe_after_a_redis_restart() {
    let mut redis = RedisServer::start().await;
    let relays = relays(Some(&redis.url()), options).await;
    let (mut a, backend_a) = join(&relays, "r", "a").await;
    let (mut b, backend_b) = join(&relays, "r", "b").await;
    assert_ne!(backend_a, backend_b);
    a.send(Message::text("before")).await.expect("send");
    assert_eq!(expect_kind(&mut b, "message").await["text"], "before");

    // GET /health follows Redis: 200, then 503 while it is gone, then 200 again.
    let health = |expected: u16| {
        let addrs = relays.addrs.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let mut all = true;
                for addr in &addrs {
                    all &= http_get(*addr, "/health", "").await.0 == expected;
                }
                if all {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "GET /health never answered {expected} everywhere"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    health(200).await;
    redis.kill().await;
    health(503).await;
    redis.restart().await;
    health(200).await;
    // Messages sent while the backends reconnect may be lost; delivery resumes.
    let mut delivered = false;
    for i in 0..100 {
        a.send(Message::text(format!("probe {i}")))
            .await
            .expect("send");
        let Ok(m) = timeout(Duration::from_millis(200), expect_kind(&mut b, "message")).await
        else {
            continue;
        };
        if m["text"].as_str().is_some_and(|t| t.starts_with("probe")) {
            delivered = true;
            break;
        }
    }
    assert!(delivered, "delivery never resumed after the restart");
}

#[tokio::test]
async fn the_room_is_the_last_path_segment_whatever_the_route() {
    let relays = relays(None, options).await;
    // The proxy routes /rooms; the backend reads the room from the last segment.
    let (mut a, _) = join(&relays, "lobby", "a").await;
    let listener_addr = relays.proxy.addr;
    for path in ["/rooms/x/lobby", "/rooms/v1/lobby/"] {
        let mut ws = connect(&format!("ws://{listener_addr}{path}?user=b")).await;
        let welcome = expect_kind(&mut ws, "welcome").await;
        assert_eq!(welcome["room"], "lobby", "{path}");
        ws.send(Message::text(format!("from {path}")))
            .await
            .expect("send");
        assert_eq!(
            expect_kind(&mut a, "message").await["text"],
            format!("from {path}")
        );
    }
}

#[tokio::test]
async fn the_backends_tasks_end_when_it_is_dropped() {
    let hub = MemoryHub::default();
    let (broker, deliveries) = broker::open(None, &hub).await.expect("broker");
    let backend = RelayBackend::new(Options::new("b"), broker, deliveries);
    let tasks = backend.tasks();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stop = CancellationToken::new();
    let serving = tokio::spawn(backend.clone().serve(listener, stop.clone()));
    // A member joins (the room is subscribed), talks and leaves (unsubscribed).
    let mut ws = connect(&format!("ws://{addr}/rooms/lobby?user=ada")).await;
    let welcome = next(&mut ws).await.into_text().expect("text");
    assert!(welcome.contains("welcome"), "{welcome}");
    ws.send(Message::text("hello")).await.expect("send");
    ws.close(None).await.expect("close");
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), serving)
        .await
        .expect("serve ends")
        .expect("serve task");
    assert!(!tasks.is_empty(), "the tasks run while the backend lives");
    drop(backend);
    tokio::time::timeout(Duration::from_secs(5), tasks.wait())
        .await
        .expect("every background task ends once the backend is dropped");
}

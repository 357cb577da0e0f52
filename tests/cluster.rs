//! Several instances balancing as one through a real redis-server: shared counts,
//! a killed instance's share vanishing on its own, a Redis outage, presence.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

async fn three_backends() -> Vec<EchoBackend> {
    vec![
        EchoBackend::start().await,
        EchoBackend::start().await,
        EchoBackend::start().await,
    ]
}

fn routes_and_pool(backends: &[EchoBackend]) -> String {
    let list: Vec<_> = backends.iter().map(|b| (b.addr, 1)).collect();
    format!(
        "[[route]]\npath = \"/ws\"\npool = \"p\"\nidentity = \"query:user\"\n{}",
        pool("p", &list, "")
    )
}

async fn open(url: impl Fn(usize) -> String, ids: std::ops::Range<usize>) -> Vec<(usize, Ws)> {
    let mut out = Vec::new();
    for i in ids {
        out.push((i, connect(&url(i)).await));
    }
    out
}

/// Closes, cleanly, the clients that are not on `backend`; returns the others.
async fn keep_only_on(backend: &EchoBackend, clients: Vec<(usize, Ws)>) -> Vec<(usize, Ws)> {
    let (kept, closing): (Vec<_>, Vec<_>) = clients
        .into_iter()
        .partition(|(i, _)| backend.has_target(&format!("/ws?user=u{i}")));
    for (_, mut ws) in closing {
        ws.close(None).await.expect("close");
        close_code(&mut ws, Duration::from_secs(5)).await;
    }
    kept
}

#[tokio::test]
async fn two_instances_balance_as_one_and_a_third_sees_the_same_totals() {
    let redis = RedisServer::start().await;
    let backends = three_backends().await;
    let base = routes_and_pool(&backends);
    let a = Proxy::start(&format!("{base}{}", cluster(&redis.url(), "a", "200ms"))).await;
    let b = Proxy::start(&format!("{base}{}", cluster(&redis.url(), "b", "200ms"))).await;

    let through_a = open(|i| a.url(&format!("/ws?user=u{i}")), 0..150).await;
    assert_eq!(a.counts("p"), vec![50, 50, 50]);
    let _kept_a = keep_only_on(&backends[0], through_a).await;
    a.wait_counts("p", &[50, 0, 0]).await;
    b.wait_remote("p", &[50, 0, 0], Duration::from_secs(5))
        .await;

    let _through_b = open(|i| b.url(&format!("/ws?user=u{i}")), 1000..1100).await;
    assert_eq!(
        b.counts("p"),
        vec![0, 50, 50],
        "B must fill the backends A left empty"
    );
    let cluster_wide: Vec<u64> = b
        .counts("p")
        .iter()
        .zip(b.remote("p"))
        .map(|(l, r)| l + r)
        .collect();
    assert!(
        cluster_wide.iter().all(|n| n.abs_diff(50) <= 2),
        "{cluster_wide:?}"
    );

    // A third instance joining later sees the same totals.
    let c = Proxy::start(&format!("{base}{}", cluster(&redis.url(), "c", "200ms"))).await;
    c.wait_remote("p", &[50, 50, 50], Duration::from_secs(5))
        .await;
    assert_eq!(c.gateway.cluster().instances(), 3);

    // The contrast: an instance without the cluster spreads its own 100 evenly,
    // blind to the 50 already on backend 0.
    let alone = Proxy::start(&base).await;
    let _through_alone = open(|i| alone.url(&format!("/ws?user=x{i}")), 0..100).await;
    let spread = alone.counts("p");
    assert!(spread.iter().all(|n| n.abs_diff(33) <= 1), "{spread:?}");
}

#[tokio::test]
async fn a_killed_instance_share_vanishes_within_three_heartbeats() {
    let redis = RedisServer::start().await;
    let backends = three_backends().await;
    let base = routes_and_pool(&backends);
    let mut a =
        ProxyProcess::start(&format!("{base}{}", cluster(&redis.url(), "a", "300ms"))).await;
    let b = Proxy::start(&format!("{base}{}", cluster(&redis.url(), "b", "300ms"))).await;

    // A holds 10 on backend 0 and none elsewhere; B fills the other two.
    let through_a = open(|i| a.url(&format!("/ws?user=u{i}")), 0..30).await;
    let kept_a = keep_only_on(&backends[0], through_a).await;
    assert_eq!(kept_a.len(), 10);
    b.wait_remote("p", &[10, 0, 0], Duration::from_secs(5))
        .await;
    let _through_b = open(|i| b.url(&format!("/ws?user=u{i}")), 100..120).await;
    assert_eq!(b.counts("p"), vec![0, 10, 10]);
    // Present while A lives (polled: on a loaded machine a stall of three
    // heartbeats expires them, and A writes them all again on its next step).
    wait_keys_of_a(&redis, Duration::from_secs(5)).await;

    a.kill9().await;
    let killed = Instant::now();
    let mut gone_after = None;
    for _ in 0..200 {
        let mut any = false;
        for key in A_KEYS {
            any |= redis.exists(key).await;
        }
        if !any {
            gone_after = Some(killed.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let gone_after = gone_after.expect("A's keys never expired");
    assert!(
        gone_after <= Duration::from_millis(900 + 150),
        "gone after {gone_after:?}"
    );

    // B stops counting A's share and sends new connections where A's were.
    b.wait_remote("p", &[0, 0, 0], Duration::from_secs(2)).await;
    let _more = open(|i| b.url(&format!("/ws?user=u{i}")), 200..210).await;
    assert_eq!(b.counts("p"), vec![10, 10, 10]);
    assert_eq!(
        b.gateway.cluster().lookup("u0").await.expect("lookup"),
        vec![]
    );
}

/// Instance A's keys in cluster `t`.
const A_KEYS: [&str; 3] = [
    "t:instance:a:conns",
    "t:instance:a:presence",
    "t:instance:a:alive",
];

/// Waits until all three of instance A's keys exist.
async fn wait_keys_of_a(redis: &RedisServer, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let mut missing = Vec::new();
        for key in A_KEYS {
            if !redis.exists(key).await {
                missing.push(key);
            }
        }
        if missing.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{missing:?} still missing after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A's presence hash: user → its entries' JSON.
async fn presence_of_a(redis: &RedisServer) -> HashMap<String, String> {
    let mut conn = redis.conn().await;
    redis::cmd("HGETALL")
        .arg("t:instance:a:presence")
        .query_async(&mut conn)
        .await
        .expect("HGETALL")
}

#[tokio::test]
async fn keys_that_expired_while_the_instance_lived_are_all_written_again() {
    let redis = RedisServer::start().await;
    let backends = three_backends().await;
    let base = routes_and_pool(&backends);
    let a = Proxy::start(&format!("{base}{}", cluster(&redis.url(), "a", "300ms"))).await;
    let b = Proxy::start(&format!("{base}{}", cluster(&redis.url(), "b", "300ms"))).await;
    let _through_a = open(|i| a.url(&format!("/ws?user=u{i}")), 0..6).await;
    assert_eq!(a.counts("p"), vec![2, 2, 2]);
    b.wait_remote("p", &[2, 2, 2], Duration::from_secs(5)).await;
    wait_keys_of_a(&redis, Duration::from_secs(5)).await;
    assert_eq!(presence_of_a(&redis).await.len(), 6);

    // What three heartbeats without a write do (A stalled), while nothing
    // changes on A afterwards: no count, no join or leave to write.
    let mut conn = redis.conn().await;
    let _: () = redis::cmd("DEL")
        .arg(&A_KEYS[..])
        .query_async(&mut conn)
        .await
        .expect("DEL");

    // A writes everything again at its next heartbeat; B counts A's share again
    // and finds its users.
    wait_keys_of_a(&redis, Duration::from_secs(5)).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while presence_of_a(&redis).await.len() < 6 {
        assert!(
            Instant::now() < deadline,
            "A's presence never came back whole"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    b.wait_remote("p", &[2, 2, 2], Duration::from_secs(5)).await;
    let found = b.gateway.cluster().lookup("u3").await.expect("lookup");
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].instance, "a");
}

#[tokio::test]
async fn a_redis_outage_drops_nothing_and_state_returns_with_redis() {
    let mut redis = RedisServer::start().await;
    let backends = three_backends().await;
    let base = routes_and_pool(&backends);
    let heartbeat = Duration::from_millis(500);
    let a = Proxy::start(&format!("{base}{}", cluster(&redis.url(), "a", "500ms"))).await;
    let mut clients = open(|i| a.url(&format!("/ws?user=u{i}")), 0..100).await;
    wait_for("A to publish", Duration::from_secs(5), || {
        a.gateway.cluster().is_up()
    })
    .await;

    redis.kill().await;
    // Every connection keeps working, and new ones are balanced on local counts.
    for (i, ws) in clients.iter_mut() {
        ws.send(Message::text(format!("m{i}"))).await.expect("send");
        assert_eq!(next(ws).await, Message::text(format!("m{i}")));
    }
    let more = open(|i| a.url(&format!("/ws?user=u{i}")), 100..130).await;
    let counts = a.counts("p");
    assert_eq!(counts.iter().sum::<u64>(), 130);
    assert!(counts.iter().all(|n| n.abs_diff(43) <= 1), "{counts:?}");
    wait_for("A to notice the outage", Duration::from_secs(5), || {
        !a.gateway.cluster().is_up()
    })
    .await;

    redis.restart().await;
    let restarted = Instant::now();
    let mut conn = redis.conn().await;
    let mut back_after = None;
    for _ in 0..300 {
        let conns: std::collections::HashMap<String, u64> = redis::cmd("HGETALL")
            .arg("t:instance:a:conns")
            .query_async(&mut conn)
            .await
            .expect("HGETALL");
        let users: u64 = redis::cmd("HLEN")
            .arg("t:instance:a:presence")
            .query_async(&mut conn)
            .await
            .expect("HLEN");
        if conns.values().sum::<u64>() == 130 && users == 130 {
            back_after = Some(restarted.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let back_after = back_after.expect("counts and presence never came back");
    assert!(back_after <= heartbeat * 2, "back after {back_after:?}");
    drop(more);
}

#[tokio::test]
async fn presence_is_found_from_another_instance_with_join_and_leave_events() {
    let redis = RedisServer::start().await;
    let backends = three_backends().await;
    let base = routes_and_pool(&backends);
    let a = Proxy::start(&format!("{base}{}", cluster(&redis.url(), "a", "200ms"))).await;
    let b = Proxy::start(&format!("{base}{}", cluster(&redis.url(), "b", "200ms"))).await;

    let client = redis::Client::open(redis.url()).expect("client");
    let mut pubsub = client.get_async_pubsub().await.expect("pubsub");
    pubsub.subscribe("t:presence").await.expect("subscribe");
    let mut events = pubsub.into_on_message();
    let mut next_event = async || -> serde_json::Value {
        let msg = tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .expect("an event in time")
            .expect("channel open");
        serde_json::from_str(&msg.get_payload::<String>().expect("text")).expect("json")
    };

    let mut ada = connect(&a.url("/ws?user=ada")).await;
    let join = next_event().await;
    assert_eq!(join["type"], "join");
    assert_eq!(join["user"], "ada");
    assert_eq!(join["instance"], "a");

    let mut found = Vec::new();
    for _ in 0..100 {
        found = b.gateway.cluster().lookup("ada").await.expect("lookup");
        if !found.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].instance, "a");
    assert_eq!(found[0].pool, "p");
    let on = backends
        .iter()
        .position(|be| be.has_target("/ws?user=ada"))
        .expect("on a backend");
    assert_eq!(found[0].backend, backends[on].addr.to_string());
    assert_eq!(join["backend"], found[0].backend);

    ada.close(None).await.expect("close");
    close_code(&mut ada, Duration::from_secs(5)).await;
    drop(ada);
    let leave = next_event().await;
    assert_eq!(leave["type"], "leave");
    assert_eq!(leave["user"], "ada");
    assert_eq!(leave["conn"], join["conn"]);

    // Two connections of one user are two entries, on whichever instances.
    let _bob1 = connect(&a.url("/ws?user=bob")).await;
    let _bob2 = connect(&b.url("/ws?user=bob")).await;
    let mut entries = Vec::new();
    for _ in 0..100 {
        entries = a.gateway.cluster().lookup("bob").await.expect("lookup");
        if entries.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut instances: Vec<_> = entries.iter().map(|e| e.instance.as_str()).collect();
    instances.sort();
    assert_eq!(instances, vec!["a", "b"]);
    assert!(
        b.gateway
            .cluster()
            .lookup("ada")
            .await
            .expect("lookup")
            .is_empty()
    );
}

#[tokio::test]
async fn redis_down_at_start_or_stalled_never_stalls_upgrades() {
    let mut redis = RedisServer::start().await;
    redis.kill().await;
    let backends = three_backends().await;
    let base = routes_and_pool(&backends);
    let a = Proxy::start(&format!("{base}{}", cluster(&redis.url(), "a", "300ms"))).await;

    // Down at start: upgrades work on local counts.
    let _first = open(|i| a.url(&format!("/ws?user=u{i}")), 0..30).await;
    assert_eq!(a.counts("p"), vec![10, 10, 10]);
    assert!(!a.gateway.cluster().is_up());

    // Redis appears: the state is published.
    redis.restart().await;
    wait_for("A to reach redis", Duration::from_secs(3), || {
        a.gateway.cluster().is_up()
    })
    .await;
    let mut conn = redis.conn().await;
    let mut published = 0u64;
    for _ in 0..100 {
        let counts: std::collections::HashMap<String, u64> = redis::cmd("HGETALL")
            .arg("t:instance:a:conns")
            .query_async(&mut conn)
            .await
            .expect("HGETALL");
        published = counts.values().sum();
        if published == 30 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(published, 30);

    // Redis stalls (accepts, never answers): each upgrade still completes at once.
    redis.pause(true);
    let started = Instant::now();
    let _second = open(|i| a.url(&format!("/ws?user=u{i}")), 100..130).await;
    let took = started.elapsed();
    redis.pause(false);
    assert_eq!(a.counts("p"), vec![20, 20, 20]);
    assert!(
        took < Duration::from_secs(2),
        "30 upgrades took {took:?} with Redis stalled"
    );
}

/// `INFO commandstats` as command → calls.
async fn command_calls(redis: &RedisServer) -> std::collections::HashMap<String, u64> {
    let mut conn = redis.conn().await;
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .expect("INFO");
    info.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("cmdstat_")?;
            let (name, stats) = rest.split_once(':')?;
            let calls = stats.strip_prefix("calls=")?.split(',').next()?;
            Some((name.to_string(), calls.parse().ok()?))
        })
        .collect()
}

/// The instance's heartbeat time in Redis (ms), as the others see it.
async fn heartbeat_at(redis: &RedisServer, instance: &str) -> f64 {
    let mut conn = redis.conn().await;
    redis::cmd("ZSCORE")
        .arg("t:instances")
        .arg(instance)
        .query_async::<Option<f64>>(&mut conn)
        .await
        .expect("ZSCORE")
        .unwrap_or(0.0)
}

#[tokio::test]
async fn an_idle_instance_sends_heartbeats_only() {
    let redis = RedisServer::start().await;
    let backends = three_backends().await;
    let a = Proxy::start(&format!(
        "{}{}",
        routes_and_pool(&backends),
        cluster(&redis.url(), "a", "100ms")
    ))
    .await;
    // Connections with presence: a full republish would rewrite their hash.
    let _clients = open(|i| a.url(&format!("/ws?user=u{i}")), 0..6).await;
    let mut conn = redis.conn().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let users: u64 = redis::cmd("HLEN")
            .arg("t:instance:a:presence")
            .query_async(&mut conn)
            .await
            .expect("HLEN");
        if users == 6 {
            break;
        }
        assert!(Instant::now() < deadline, "presence never published");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let before = command_calls(&redis).await;
    let from = heartbeat_at(&redis, "a").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while heartbeat_at(&redis, "a").await < from + 500.0 {
        assert!(Instant::now() < deadline, "no heartbeats");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let after = command_calls(&redis).await;
    let delta =
        |name: &str| after.get(name).copied().unwrap_or(0) - before.get(name).copied().unwrap_or(0);
    for rewrite in ["del", "hset", "hdel", "hmset", "publish"] {
        assert_eq!(
            delta(rewrite),
            0,
            "an idle instance sent {rewrite}: {after:?}"
        );
    }
    // About five heartbeats passed (100 ms each); each is one pipeline of a few
    // refreshes plus one read of the others. The test's own ZSCORE/INFO/HLEN calls
    // are left out.
    let ours = ["zscore", "info", "hlen"];
    let sent: u64 = after
        .keys()
        .filter(|k| !ours.contains(&k.as_str()))
        .map(|k| delta(k))
        .sum();
    let heartbeats = delta("zadd").max(1);
    assert!(
        sent / heartbeats <= 12,
        "{sent} commands for {heartbeats} heartbeats: {after:?}"
    );
}

/// An instance rewrites its counts hash every quarter heartbeat but announces a
/// change at once, so the hash can be older than what was announced: the
/// others' heartbeat reads of it must not put the announced change back. Here
/// instance `a` is written by hand (its hash at version 10 says 3 on backend 0,
/// its announcement from version 12 says 0) and never rewrites its hash.
#[tokio::test]
async fn a_hash_older_than_an_announcement_does_not_undo_it() {
    let redis = RedisServer::start().await;
    let backends = three_backends().await;
    let b = Proxy::start(&format!(
        "{}{}",
        routes_and_pool(&backends),
        cluster(&redis.url(), "b", "100ms")
    ))
    .await;
    let field = format!("p/{}", backends[0].addr);
    let mut conn = redis.conn().await;
    let now_ms = wsgate::presence::now_ms();
    let () = redis::pipe()
        .zadd("t:instances", "a", now_ms)
        .ignore()
        .hset("t:instance:a:conns", &field, 3)
        .ignore()
        .set("t:instance:a:alive", 10)
        .ignore()
        .query_async(&mut conn)
        .await
        .expect("instance a");
    b.wait_remote("p", &[3, 0, 0], Duration::from_secs(5)).await;

    let announce = format!(r#"{{"i":"a","t":{now_ms},"v":12,"c":[["{field}",0]]}}"#);
    let () = redis::cmd("PUBLISH")
        .arg("t:counts")
        .arg(&announce)
        .query_async(&mut conn)
        .await
        .expect("announce");
    b.wait_remote("p", &[0, 0, 0], Duration::from_secs(5)).await;
    // Ten heartbeats, each reading the hash that still says 3.
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        assert_eq!(b.remote("p"), vec![0, 0, 0]);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Rewritten at a newer version, the hash counts again.
    let () = redis::pipe()
        .hset("t:instance:a:conns", &field, 2)
        .ignore()
        .set("t:instance:a:alive", 13)
        .ignore()
        .query_async(&mut conn)
        .await
        .expect("instance a rewrites its hash");
    b.wait_remote("p", &[2, 0, 0], Duration::from_secs(5)).await;
}

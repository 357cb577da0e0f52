//! Least-connections over real backends: equal and weighted spreads, refilling
//! an emptied backend, and skipping a dead one without the client noticing.

mod common;

use std::time::Duration;

use common::*;
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

async fn open_many(proxy: &Proxy, ids: std::ops::Range<usize>) -> Vec<(usize, Ws)> {
    let mut clients = Vec::with_capacity(ids.len());
    for i in ids {
        clients.push((i, connect(&proxy.url(&format!("/ws?c={i}"))).await));
    }
    clients
}

fn within(actual: &[u64], expected: &[u64], slack: u64) -> bool {
    actual.len() == expected.len()
        && actual
            .iter()
            .zip(expected)
            .all(|(a, e)| a.abs_diff(*e) <= slack)
}

async fn backends(n: usize) -> Vec<EchoBackend> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(EchoBackend::start().await);
    }
    out
}

#[tokio::test]
async fn three_equal_backends_share_300_connections_and_an_emptied_one_refills() {
    let backends = backends(3).await;
    let list: Vec<_> = backends.iter().map(|b| (b.addr, 1)).collect();
    let proxy = Proxy::start(&format!("{}{}", route("/ws", "p"), pool("p", &list, ""))).await;

    let clients = open_many(&proxy, 0..300).await;
    let counts = proxy.counts("p");
    assert!(
        within(&counts, &[100, 100, 100], 1),
        "proxy counts {counts:?}"
    );
    wait_for("backends to see 300", Duration::from_secs(5), || {
        backends.iter().map(|b| b.open()).sum::<usize>() == 300
    })
    .await;
    let seen: Vec<usize> = backends.iter().map(|b| b.open()).collect();
    assert!(
        seen.iter().all(|n| n.abs_diff(100) <= 1),
        "backends saw {seen:?}"
    );

    // Close, cleanly, every client that landed on backend 0.
    let (on_first, mut rest): (Vec<_>, Vec<_>) = clients
        .into_iter()
        .partition(|(i, _)| backends[0].has_target(&format!("/ws?c={i}")));
    assert_eq!(on_first.len() as u64, counts[0]);
    for (_, mut ws) in on_first {
        ws.close(None).await.expect("close");
        close_code(&mut ws, Duration::from_secs(5)).await;
    }
    proxy.wait_counts("p", &[0, counts[1], counts[2]]).await;

    // The next 100 all go to the emptied backend.
    let refill = open_many(&proxy, 1000..1100).await;
    for (i, _) in &refill {
        let target = format!("/ws?c={i}");
        wait_for(
            "the backend to register the client",
            Duration::from_secs(5),
            || backends[0].has_target(&target),
        )
        .await;
    }
    assert_eq!(proxy.counts("p"), vec![100, counts[1], counts[2]]);

    // Every connection still works.
    rest.extend(refill);
    for (i, ws) in rest.iter_mut().step_by(10) {
        ws.send(Message::text(format!("still here {i}")))
            .await
            .expect("send");
        assert_eq!(next(ws).await, Message::text(format!("still here {i}")));
    }
}

#[tokio::test]
async fn weights_one_two_three_get_50_100_150() {
    let backends = backends(3).await;
    let list: Vec<_> = backends
        .iter()
        .zip([1, 2, 3])
        .map(|(b, w)| (b.addr, w))
        .collect();
    let proxy = Proxy::start(&format!("{}{}", route("/ws", "p"), pool("p", &list, ""))).await;
    let _clients = open_many(&proxy, 0..300).await;
    let counts = proxy.counts("p");
    assert!(
        within(&counts, &[50, 100, 150], 2),
        "proxy counts {counts:?}"
    );
    wait_for(
        "backends to see 50/100/150 ± 2",
        Duration::from_secs(5),
        || {
            let seen: Vec<u64> = backends.iter().map(|b| b.open() as u64).collect();
            within(&seen, &[50, 100, 150], 2) && seen.iter().sum::<u64>() == 300
        },
    )
    .await;
}

#[tokio::test]
async fn a_dead_backend_is_skipped_without_the_client_noticing() {
    let live = EchoBackend::start().await;
    let dead = dead_addr().await;
    let proxy = Proxy::start(&format!(
        "{}{}",
        route("/ws", "p"),
        pool("p", &[(dead, 1), (live.addr, 1)], "")
    ))
    .await;
    // The dead backend never gains a connection, so it stays the least loaded and
    // is tried first for nearly every client; each must still get in.
    let mut clients = open_many(&proxy, 0..20).await;
    for (i, ws) in clients.iter_mut() {
        ws.send(Message::text(format!("{i}"))).await.expect("send");
        assert_eq!(next(ws).await, Message::text(format!("{i}")));
    }
    assert_eq!(live.open(), 20);
    assert_eq!(proxy.counts("p"), vec![0, 20]);
}

//! Running out of file descriptors: wsgate keeps every connection it has, refuses
//! or queues the rest without crashing, and serves again once descriptors free up.

mod common;

use std::time::Duration;

use common::*;
use futures_util::SinkExt;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;

/// Every held connection still echoes.
async fn all_still_echo(held: &mut [Ws]) {
    for (i, ws) in held.iter_mut().enumerate() {
        ws.send(Message::text(format!("still {i}")))
            .await
            .expect("send");
        assert_eq!(next(ws).await, Message::text(format!("still {i}")));
    }
}

/// An upgrade once wsgate has descriptors again: 50 tries of up to 2 s each.
async fn connect_again(proxy: &ProxyProcess, what: &str) -> Ws {
    for _ in 0..50 {
        if let Some(ws) = try_connect(proxy).await {
            return ws;
        }
    }
    panic!("{what}");
}

/// One upgrade through the proxy, given up after 2 s.
async fn try_connect(proxy: &ProxyProcess) -> Option<Ws> {
    let attempt = timeout(Duration::from_secs(2), async {
        let tcp = tokio::net::TcpStream::connect(proxy.addr).await.ok()?;
        tokio_tungstenite::client_async(proxy.url("/ws"), tcp)
            .await
            .ok()
    })
    .await;
    attempt.ok().flatten().map(|(ws, _)| ws)
}

#[tokio::test]
async fn the_fd_limit_is_handled_and_existing_connections_are_unaffected() {
    let backend = EchoBackend::start().await;
    let config = format!(
        "{}{}",
        route("/ws", "p"),
        pool("p", &[(backend.addr, 1)], "")
    );
    // 64 descriptors: a few for the runtime and listener, two per proxied connection.
    let proxy = ProxyProcess::start_limited(&config, Some(64)).await;

    // Ask for more connections than it can hold, one at a time, each bounded.
    let mut held = Vec::new();
    let mut failed = 0;
    for _ in 0..60 {
        match try_connect(&proxy).await {
            Some(ws) => held.push(ws),
            None => failed += 1,
        }
        if failed >= 3 {
            break;
        }
    }
    assert!(
        held.len() >= 15,
        "only {} connections before the limit",
        held.len()
    );
    assert!(
        failed >= 1,
        "the limit was never reached ({} held)",
        held.len()
    );

    // Every connection made before the limit still works.
    all_still_echo(&mut held).await;

    // Free descriptors: wsgate serves new connections again.
    let before = held.len();
    for mut ws in held.drain(..before / 2) {
        ws.close(None).await.expect("close");
        close_code(&mut ws, Duration::from_secs(5)).await;
    }
    let mut ws = connect_again(&proxy, "wsgate never recovered from the fd limit").await;
    ws.send(Message::text("after")).await.expect("send");
    assert_eq!(next(&mut ws).await, Message::text("after"));
}

/// One flooding client: an upgrade request, the status of the answer if one came
/// within 5 s, then the connection dropped.
async fn flood_one(addr: std::net::SocketAddr) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let attempt = timeout(Duration::from_secs(5), async {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
        tcp.write_all(upgrade_request("/ws", "").as_bytes())
            .await
            .ok()?;
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match tcp.read(&mut buf).await {
                Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
                _ => return None,
            }
        }
        let head = String::from_utf8_lossy(&head).to_string();
        head.split_whitespace().nth(1)?.parse::<u16>().ok()
    })
    .await;
    attempt.ok().flatten()
}

#[tokio::test]
async fn out_of_descriptors_is_a_503_and_never_a_backend_failure() {
    let backend = EchoBackend::start().await;
    // Checks every 100 ms; once ejected a backend would need 100 passes (10 s) to
    // come back, so an ejection during the flood shows after it.
    let health = "[pool.p.health]\ninterval = \"100ms\"\ntimeout = \"500ms\"\nkind = \"tcp\"\nunhealthy_after = 1\nhealthy_after = 100\n";
    let config = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n{}{}{health}",
        route("/ws", "p"),
        pool("p", &[(backend.addr, 1)], "")
    );
    let proxy = ProxyProcess::start_limited(&config, Some(64)).await;
    let admin = proxy.listening("admin").await;

    // Twenty clients in normal service first: 40 of the 64 descriptors.
    let mut steady = Vec::new();
    for _ in 0..20 {
        steady.push(
            try_connect(&proxy)
                .await
                .expect("an upgrade before the flood"),
        );
    }
    // The flood: waves of 60 upgrades at once for a second (ten health-check
    // intervals), each client leaving once answered.
    let mut answers = Vec::new();
    let flood_until = tokio::time::Instant::now() + Duration::from_secs(1);
    for _ in 0..20 {
        answers
            .extend(futures_util::future::join_all((0..60).map(|_| flood_one(proxy.addr))).await);
        if tokio::time::Instant::now() >= flood_until {
            break;
        }
    }
    let count = |s: u16| answers.iter().filter(|st| **st == Some(s)).count();
    let (ok, refused) = (count(101), count(503));
    let unanswered = answers.iter().filter(|s| s.is_none()).count();
    let other: Vec<_> = answers
        .iter()
        .filter_map(|s| s.filter(|s| *s != 101 && *s != 503))
        .collect();
    assert!(refused >= 1, "no 503 at the limit ({ok} upgraded)");
    assert!(
        other.is_empty(),
        "answers other than 101 and 503: {other:?}"
    );
    assert!(
        unanswered * 20 <= answers.len(),
        "{unanswered} of {} got no answer ({ok} upgraded, {refused} refused)",
        answers.len()
    );

    // The flood is gone: the steady clients never noticed, service is normal, the
    // backend was never ejected nor blamed.
    all_still_echo(&mut steady).await;
    let mut ws = connect_again(&proxy, "no upgrade after the flood").await;
    ws.send(Message::text("after")).await.expect("send");
    assert_eq!(next(&mut ws).await, Message::text("after"));
    let (_, backends) = http_get(admin, "/backends", "").await;
    assert!(backends.contains("\"healthy\":true"), "{backends}");
    let (_, metrics) = http_get(admin, "/metrics", "").await;
    assert!(
        !metrics.contains("wsgate_backend_failures_total{"),
        "a backend was blamed:\n{metrics}"
    );
    assert!(
        metrics.contains("wsgate_upgrades_total{pool=\"p\",result=\"out_of_descriptors\"}")
            || metrics.contains("wsgate_descriptors_exhausted_total{at=\"accept\"}"),
        "{metrics}"
    );
    assert_eq!(
        proxy.logged("out of file descriptors"),
        1,
        "the condition is logged once"
    );
}

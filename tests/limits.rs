//! Running out of file descriptors: wsgate keeps every connection it has, refuses
//! or queues the rest without crashing, and serves again once descriptors free up.

mod common;

use std::time::Duration;

use common::*;
use futures_util::SinkExt;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;

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
    for (i, ws) in held.iter_mut().enumerate() {
        ws.send(Message::text(format!("still {i}")))
            .await
            .expect("send");
        assert_eq!(next(ws).await, Message::text(format!("still {i}")));
    }

    // Free descriptors: wsgate serves new connections again.
    let before = held.len();
    for mut ws in held.drain(..before / 2) {
        ws.close(None).await.expect("close");
        close_code(&mut ws, Duration::from_secs(5)).await;
    }
    let mut again = None;
    for _ in 0..50 {
        if let Some(ws) = try_connect(&proxy).await {
            again = Some(ws);
            break;
        }
    }
    let mut ws = again.expect("wsgate never recovered from the fd limit");
    ws.send(Message::text("after")).await.expect("send");
    assert_eq!(next(&mut ws).await, Message::text("after"));
}

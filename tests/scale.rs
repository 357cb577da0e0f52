//! Scale-out that balances itself: retries the client never sees, admission
//! control, slow start, rebalancing, bursts across instances, backends from DNS.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;

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

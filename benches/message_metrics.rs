//! Echo throughput through wsgate with message metrics on and off, in the same run,
//! alternating rounds: counting messages must cost next to nothing (per-connection
//! tallies, added to the shared counters at most once a second). Target: within 3%.
//!
//! `cargo bench --bench message_metrics` prints the figures; under `cargo test`
//! it runs a short smoke round only.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

/// `clients` connections each doing `per_client` 64-byte echoes, 8 in flight.
async fn echo_rate(proxy: &Proxy, clients: usize, per_client: usize) -> f64 {
    let mut sockets = Vec::new();
    for _ in 0..clients {
        sockets.push(connect(&proxy.url("/ws")).await);
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for ws in sockets {
        tasks.push(tokio::spawn(async move {
            let (mut sink, mut stream) = ws.split();
            let payload = Message::binary(vec![7u8; 64]);
            let window = 8.min(per_client);
            for _ in 0..window {
                sink.send(payload.clone()).await.expect("send");
            }
            let mut sent = window;
            for _ in 0..per_client {
                let m = tokio::time::timeout(Duration::from_secs(10), stream.next()).await;
                assert!(matches!(m, Ok(Some(Ok(Message::Binary(_))))), "echo");
                if sent < per_client {
                    sink.send(payload.clone()).await.expect("send");
                    sent += 1;
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("client");
    }
    (clients * per_client) as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (rounds, per_client) = if full { (7, 20_000) } else { (1, 50) };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let backend = EchoBackend::start().await;
        let base = format!("{}{}", route("/ws", "p"), pool("p", &[(backend.addr, 1)], ""));
        let on = Proxy::start(&base).await;
        let off = Proxy::start(&format!("[admin]\nmessage_metrics = false\n{base}")).await;
        let (mut with, mut without) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            with.push(echo_rate(&on, 16, per_client).await);
            without.push(echo_rate(&off, 16, per_client).await);
        }
        with.sort_by(f64::total_cmp);
        without.sort_by(f64::total_cmp);
        let (a, b) = (with[rounds / 2], without[rounds / 2]);
        println!("64 B echoes/s over 16 connections, 8 in flight each, median of {rounds} alternating rounds:");
        println!("  message metrics on   {a:>10.0}");
        println!("  message metrics off  {b:>10.0}");
        println!("  on / off             {:>10.3}  (target >= 0.97: {})", a / b, if a / b >= 0.97 { "met" } else { "NOT met" });
    });
}

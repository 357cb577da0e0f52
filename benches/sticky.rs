//! Upgrade rate through wsgate with cookie stickiness and with key hashing against
//! plain least-connections, same backends, same run, alternating rounds. Target:
//! each ≥ 0.95 of plain.
//!
//! `cargo bench --bench sticky` prints the figures; under `cargo test` it runs a
//! short smoke round only.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;

/// `total` upgrades (open, then close cleanly) over `workers` concurrent clients;
/// each worker keeps its own cookie, as a browser would.
async fn upgrades(proxy: &Proxy, total: usize, workers: usize) -> f64 {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..workers {
        let url = proxy.url("/ws");
        tasks.push(tokio::spawn(async move {
            let mut cookie: Option<String> = None;
            for i in 0..total / workers {
                let url = format!("{url}?room=r{w}-{}", i % 8);
                let headers: Vec<(&str, &str)> = cookie
                    .as_deref()
                    .map(|c| ("cookie", c))
                    .into_iter()
                    .collect();
                let (mut ws, response) = connect_with(&url, &headers).await;
                if let Some(set) = response
                    .headers()
                    .get("set-cookie")
                    .and_then(|v| v.to_str().ok())
                {
                    cookie = Some(set.split(';').next().unwrap_or("").to_string());
                }
                ws.close(None).await.expect("close");
                close_code(&mut ws, Duration::from_secs(5)).await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("worker");
    }
    (total / workers * workers) as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (rounds, per_round) = if full { (5, 4000) } else { (1, 64) };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let backends = [
            EchoBackend::start().await,
            EchoBackend::start().await,
            EchoBackend::start().await,
        ];
        let list: Vec<_> = backends.iter().map(|b| (b.addr, 1)).collect();
        let config =
            |sticky: &str| format!("{}{}{sticky}", route("/ws", "p"), pool("p", &list, ""));
        let plain = Proxy::start(&config("")).await;
        let cookie = Proxy::start(&config("[pool.p.sticky]\ncookie = \"wsgate\"\n")).await;
        let key = Proxy::start(&config("[pool.p.sticky]\nkey = \"query:room\"\n")).await;
        let mut rates = [Vec::new(), Vec::new(), Vec::new()];
        for _ in 0..rounds {
            for (i, proxy) in [&plain, &cookie, &key].into_iter().enumerate() {
                rates[i].push(upgrades(proxy, per_round, 16).await);
            }
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let [mut p, mut c, mut k] = rates;
        let (p, c, k) = (median(&mut p), median(&mut c), median(&mut k));
        println!(
            "upgrades/s, median of {rounds} alternating rounds of {per_round} at concurrency 16:"
        );
        println!("  least-connections   {p:>10.0}");
        for (what, rate) in [("cookie stickiness ", c), ("key hashing       ", k)] {
            println!(
                "  {what}  {rate:>10.0}  ratio {:.3} (target >= 0.95: {})",
                rate / p,
                if rate / p >= 0.95 { "met" } else { "NOT met" }
            );
        }
    });
}

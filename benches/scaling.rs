//! Upgrade rate through one wsgate instance with rebalance, admission control and
//! a DNS backend configured (but idle: nothing over threshold, the rate far above
//! the load, DNS answering the same addresses) against a plain pool of the same
//! backends, in the same run, alternating rounds. The features must cost the
//! upgrade path nothing measurable: target ≥ 0.97.
//!
//! `cargo bench --bench scaling` prints the figures; under `cargo test` it runs a
//! short smoke round only.

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::Ipv4Addr;
use std::time::Duration;

use common::*;

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (rounds, per_round) = if full { (5, 4000) } else { (1, 64) };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        // Three backends on one port of 127.0.0.1-3, so DNS can name them.
        let (port, backends) = loop {
            let port = free_addr().await.port();
            let mut found = Vec::new();
            for i in 1..=3u8 {
                let addr = std::net::SocketAddr::from(([127, 0, 0, i], port));
                if tokio::net::TcpListener::bind(addr).await.is_ok() {
                    found.push(EchoBackend::start_at(addr).await);
                }
            }
            if found.len() == 3 {
                break (port, found);
            }
        };
        let dns = DnsServer::start(&[Ipv4Addr::new(127, 0, 0, 3)]).await;
        let plain = Proxy::start(&format!(
            "{}{}",
            route("/ws", "p"),
            pool("p", &[(backends[0].addr, 1), (backends[1].addr, 1), (backends[2].addr, 1)], "")
        ))
        .await;
        let featured = Proxy::start(&format!(
            "[resolver]\nnameservers = [\"{}\"]\n{}[pool.p]\n\
             backends = [{{ addr = \"{}\" }}, {{ addr = \"{}\" }}, {{ dns = \"b3.test:{port}\" }}]\n\
             max_upgrade_rate = 1000000\ndns_refresh = \"1s\"\n\
             [pool.p.rebalance]\nthreshold = 1.5\nrate = 5\n",
            dns.addr,
            route("/ws", "p"),
            backends[0].addr,
            backends[1].addr,
        ))
        .await;
        // Wait for the DNS backend to join, so both pools have three.
        wait_for("the DNS backend", Duration::from_secs(10), || {
            featured.counts("p").len() == 3
        })
        .await;
        let (mut plain_rates, mut featured_rates) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            let (p, f) = (plain.url("/ws"), featured.url("/ws"));
            plain_rates.push(upgrade_rate(move |_, _| p.clone(), per_round, 16).await);
            featured_rates.push(upgrade_rate(move |_, _| f.clone(), per_round, 16).await);
        }
        plain_rates.sort_by(f64::total_cmp);
        featured_rates.sort_by(f64::total_cmp);
        let (p, f) = (plain_rates[rounds / 2], featured_rates[rounds / 2]);
        println!("upgrades/s, median of {rounds} alternating rounds of {per_round} at concurrency 16:");
        println!("  plain pool                                  {p:>10.0}");
        println!("  rebalance + admission + DNS backend (idle)  {f:>10.0}");
        println!(
            "  featured / plain                            {:>10.3}  (target >= 0.97: {})",
            f / p,
            if f / p >= 0.97 { "met" } else { "NOT met" }
        );
    });
}

//! Upgrade rate through one wsgate instance with state in memory and with state in
//! Redis, in the same run, alternating rounds. Nothing on the upgrade path waits
//! for Redis, so the Redis variant must stay within 10% of the local one.
//!
//! `cargo bench --bench cluster_upgrades` prints the figures; under `cargo test`
//! it runs a short smoke round only.

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;

fn config(backends: &[EchoBackend], cluster_toml: &str) -> String {
    let list: Vec<_> = backends.iter().map(|b| (b.addr, 1)).collect();
    format!(
        "[[route]]\npath = \"/ws\"\npool = \"p\"\nidentity = \"query:user\"\n{}{cluster_toml}",
        pool("p", &list, "")
    )
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (rounds, per_round) = if full { (5, 4000) } else { (1, 64) };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let redis = RedisServer::start().await;
        let backends = vec![
            EchoBackend::start().await,
            EchoBackend::start().await,
            EchoBackend::start().await,
        ];
        let local = Proxy::start(&config(&backends, "")).await;
        let shared = Proxy::start(&config(&backends, &cluster(&redis.url(), "bench", "1s"))).await;
        let (mut local_rates, mut redis_rates) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            let (l, r) = (local.url("/ws"), shared.url("/ws"));
            local_rates
                .push(upgrade_rate(move |w, i| format!("{l}?user=w{w}-{i}"), per_round, 16).await);
            redis_rates
                .push(upgrade_rate(move |w, i| format!("{r}?user=w{w}-{i}"), per_round, 16).await);
        }
        local_rates.sort_by(f64::total_cmp);
        redis_rates.sort_by(f64::total_cmp);
        let (l, r) = (local_rates[rounds / 2], redis_rates[rounds / 2]);
        println!(
            "upgrades/s, median of {rounds} alternating rounds of {per_round} at concurrency 16:"
        );
        println!("  state in memory  {l:>10.0}");
        println!("  state in Redis   {r:>10.0}");
        println!(
            "  Redis / memory   {:>10.3}  (target >= 0.90: {})",
            r / l,
            if r / l >= 0.9 { "met" } else { "NOT met" }
        );
        assert!(
            shared.gateway.cluster().is_up(),
            "the Redis variant must really use Redis"
        );
    });
}

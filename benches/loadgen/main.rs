//! wsgate's WebSocket load generator and comparison. `benches/compare.sh` runs it:
//! it starts echo backends, then in turn no proxy at all, a bare TCP relay (the
//! floor), wsgate, HAProxy and NGINX in front of them on loopback, runs the same
//! scenarios against each, reading each proxy's CPU time and RSS from /proc, and
//! prints one table with the targets' ratios.
//!
//! Modes: `cargo bench --bench loadgen` (the comparison), `echo-server N` and
//! `bare-relay LISTEN BACKEND...` (child processes of the comparison). Under
//! `cargo test` it runs every scenario briefly against the bare relay and wsgate.

mod bare_relay;
mod scenarios;
mod targets;

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use scenarios::percentile;
use targets::{Target, cpu_seconds, cpus, idle_seconds, rss_bytes};

/// How big each scenario is.
#[derive(Clone, Copy)]
struct Sizes {
    latency_messages: usize,
    window: Duration,
    idle: [usize; 3],
    throughput_conns: usize,
    /// Waves of connections opened and closed before "RSS after load", and how
    /// long after the last close the RSS is read.
    waves: (usize, usize),
    settle: Duration,
}

const FULL: Sizes = Sizes {
    latency_messages: 30_000,
    window: Duration::from_secs(3),
    // The last: as many as a proxy's 20,000 open files allow at two per connection.
    idle: [1_000, 5_000, 9_900],
    throughput_conns: 200,
    waves: (8, 5_000),
    settle: Duration::from_secs(10),
};

const SMOKE: Sizes = Sizes {
    latency_messages: 200,
    window: Duration::from_millis(300),
    idle: [20, 40, 60],
    throughput_conns: 20,
    waves: (2, 20),
    settle: Duration::from_millis(300),
};

/// What one target measured.
#[derive(Default, Clone)]
struct Figures {
    name: String,
    p50: f64,
    p99: f64,
    p999: f64,
    small_rate: f64,
    small_cpu_us: Option<f64>,
    /// CPU per 64 B message with one message in flight per connection.
    single_cpu_us: Option<f64>,
    big_mb_s: f64,
    big_cpu_us: Option<f64>,
    upgrades_rate: f64,
    upgrade_cpu_us: Option<f64>,
    /// Upgrades in each round, in order (the rounds' spread beside the median).
    upgrade_rounds: Vec<u64>,
    /// What the upgrade rounds cost the machine, and how many upgrades they made.
    upgrade_spent: Option<(Spent, u64)>,
    /// (connections held, RSS in bytes) at each idle level.
    idle: Vec<(usize, u64)>,
    /// Bytes per idle connection, from the slope between the first and last level.
    rss_per_conn: Option<f64>,
    /// RSS right after the process started, before any scenario.
    fresh_rss: Option<u64>,
    /// Bytes per idle connection: (RSS at the last level − fresh RSS) ÷ connections.
    rss_per_conn_fresh: Option<f64>,
    /// After `waves` of connections opened and closed: the peak RSS while they
    /// were open, and the RSS 10 s after the last one closed.
    after_load: Option<(u64, u64)>,
}

/// Rounds of each scenario: targets take turns within a round, so slow phases of a
/// noisy machine fall on all of them alike; rates are medians over rounds, CPU
/// figures the total CPU over the total count.
const ROUNDS: usize = 3;

/// Rounds of the upgrades scenario: its ratios sit near 1, where three rounds of a
/// few seconds move ±5% between runs here; twice the rounds halve what one slow
/// phase of the machine can do to them.
const UPGRADE_ROUNDS: usize = 6;

/// What one target's turns cost, summed over the rounds: the target's own CPU
/// seconds (none for `direct`), and where the rest of the machine's time went
/// meanwhile: the echo servers' CPU, this load generator's, the CPUs' idle time,
/// and the wall-clock time of the turns.
#[derive(Default, Clone, Copy)]
struct Spent {
    proxy: Option<f64>,
    echo: f64,
    loadgen: f64,
    idle: f64,
    wall: f64,
}

/// Runs `scenario` on every target, round after round; returns per target the
/// counts per round and what the turns cost (the echo servers' process: `echo`).
async fn rounds<F, Fut>(targets: &[Target], echo: u32, scenario: F) -> Vec<(Vec<u64>, Spent)>
where
    F: Fn(Vec<SocketAddr>) -> Fut,
    Fut: std::future::Future<Output = u64>,
{
    rounds_of(ROUNDS, targets, echo, scenario).await
}

/// [`rounds`], `n` of them.
async fn rounds_of<F, Fut>(
    n: usize,
    targets: &[Target],
    echo: u32,
    scenario: F,
) -> Vec<(Vec<u64>, Spent)>
where
    F: Fn(Vec<SocketAddr>) -> Fut,
    Fut: std::future::Future<Output = u64>,
{
    let mut out: Vec<(Vec<u64>, Spent)> = targets
        .iter()
        .map(|t| {
            let proxy = t.pid().map(|_| 0.0);
            (
                Vec::new(),
                Spent {
                    proxy,
                    ..Spent::default()
                },
            )
        })
        .collect();
    let me = std::process::id();
    for _ in 0..n {
        for (i, target) in targets.iter().enumerate() {
            let proxy = target.pid().map(cpu_seconds);
            let (echo_cpu, own, idle) = (cpu_seconds(echo), cpu_seconds(me), idle_seconds());
            let started = std::time::Instant::now();
            let n = scenario(target.addrs.clone()).await;
            let spent = &mut out[i].1;
            spent.wall += started.elapsed().as_secs_f64();
            spent.echo += cpu_seconds(echo) - echo_cpu;
            spent.loadgen += cpu_seconds(me) - own;
            spent.idle += idle_seconds() - idle;
            if let (Some(total), Some(b), Some(a)) =
                (spent.proxy.as_mut(), proxy, target.pid().map(cpu_seconds))
            {
                *total += a - b;
            }
            out[i].0.push(n);
        }
    }
    out
}

fn median(mut v: Vec<u64>) -> f64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0) as f64
}

fn per_unit_us(cpu: Option<f64>, counts: &[u64]) -> Option<f64> {
    cpu.map(|c| c * 1e6 / counts.iter().sum::<u64>().max(1) as f64)
}

async fn measure(targets: &[Target], echo: u32, sizes: Sizes) -> Vec<Figures> {
    let mut all: Vec<Figures> = targets
        .iter()
        .map(|t| Figures {
            name: t.name.to_string(),
            ..Figures::default()
        })
        .collect();
    let window = sizes.window;
    for (f, target) in all.iter_mut().zip(targets) {
        f.fresh_rss = target.pid().map(rss_bytes);
    }

    eprintln!("latency ...");
    let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); targets.len()];
    for _ in 0..ROUNDS {
        for (i, target) in targets.iter().enumerate() {
            samples[i].extend(
                scenarios::latency(&target.addrs, 50, sizes.latency_messages / ROUNDS).await,
            );
        }
    }
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    for (f, mut lat) in all.iter_mut().zip(samples) {
        lat.sort();
        (f.p50, f.p99, f.p999) = (
            us(percentile(&lat, 0.5)),
            us(percentile(&lat, 0.99)),
            us(percentile(&lat, 0.999)),
        );
    }

    eprintln!("64 B throughput ...");
    let conns = sizes.throughput_conns;
    let small = rounds(targets, echo, |a| async move {
        scenarios::throughput(&a, conns, 8, 64, window).await
    })
    .await;
    for (f, (counts, Spent { proxy: cpu, .. })) in all.iter_mut().zip(small) {
        f.small_cpu_us = per_unit_us(cpu, &counts);
        f.small_rate = median(counts) / window.as_secs_f64();
    }

    eprintln!("64 B throughput, one in flight ...");
    let single = rounds(targets, echo, |a| async move {
        scenarios::throughput(&a, conns, 1, 64, window).await
    })
    .await;
    for (f, (counts, Spent { proxy: cpu, .. })) in all.iter_mut().zip(single) {
        f.single_cpu_us = per_unit_us(cpu, &counts);
    }

    eprintln!("16 KiB throughput ...");
    let big = rounds(targets, echo, |a| async move {
        scenarios::throughput(&a, 50, 2, 16 * 1024, window).await
    })
    .await;
    for (f, (counts, Spent { proxy: cpu, .. })) in all.iter_mut().zip(big) {
        f.big_cpu_us = per_unit_us(cpu, &counts);
        f.big_mb_s = median(counts) * 16384.0 / window.as_secs_f64() / 1e6;
    }

    eprintln!("upgrades ...");
    let ups = rounds_of(UPGRADE_ROUNDS, targets, echo, |a| async move {
        scenarios::upgrades(&a, 32, window).await
    })
    .await;
    for (f, (counts, spent)) in all.iter_mut().zip(ups) {
        f.upgrade_cpu_us = per_unit_us(spent.proxy, &counts);
        f.upgrade_spent = Some((spent, counts.iter().sum()));
        f.upgrade_rounds = counts.clone();
        f.upgrades_rate = median(counts) / window.as_secs_f64();
    }

    for (f, target) in all.iter_mut().zip(targets) {
        let Some(pid) = target.pid() else { continue };
        eprintln!("idle connections through {} ...", target.name);
        for level in sizes.idle {
            let mut held = scenarios::open_many(&target.addrs, level).await;
            // Let the proxy finish its side of every handshake before reading.
            tokio::time::sleep(Duration::from_millis(500)).await;
            f.idle.push((held.len(), rss_bytes(pid)));
            // Everything still answers while held.
            if let Some(ws) = held.first_mut() {
                ws.send(tokio_tungstenite::tungstenite::Message::text("ping"))
                    .await
                    .expect("probe");
                let echo = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
                assert!(
                    matches!(echo, Ok(Some(Ok(_)))),
                    "{}: a held connection stopped answering",
                    target.name
                );
            }
            drop(held);
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        if let (Some(first), Some(last)) = (f.idle.first(), f.idle.last())
            && last.0 > first.0
        {
            f.rss_per_conn = Some((last.1 as f64 - first.1 as f64) / (last.0 - first.0) as f64);
        }
        if let (Some(fresh), Some(last)) = (f.fresh_rss, f.idle.last())
            && last.0 > 0
        {
            f.rss_per_conn_fresh = Some((last.1 as f64 - fresh as f64) / last.0 as f64);
        }
    }

    // Memory after load: waves of connections opened and closed; what is held
    // 10 s after the last one closed.
    let (waves, per_wave) = sizes.waves;
    for (f, target) in all.iter_mut().zip(targets) {
        let Some(pid) = target.pid() else { continue };
        eprintln!("{waves} waves of {per_wave} through {} ...", target.name);
        let mut peak = 0;
        for _ in 0..waves {
            let held = scenarios::open_many(&target.addrs, per_wave).await;
            peak = peak.max(rss_bytes(pid));
            drop(held);
        }
        tokio::time::sleep(sizes.settle).await;
        f.after_load = Some((peak, rss_bytes(pid)));
    }
    all
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".to_string(), |v| format!("{v:.digits$}"))
}

fn table(all: &[Figures]) -> String {
    let mut rows: Vec<(String, Vec<String>)> = vec![
        (
            "64 B latency p50 (µs)".into(),
            all.iter().map(|f| format!("{:.0}", f.p50)).collect(),
        ),
        (
            "64 B latency p99 (µs)".into(),
            all.iter().map(|f| format!("{:.0}", f.p99)).collect(),
        ),
        (
            "64 B latency p99.9 (µs)".into(),
            all.iter().map(|f| format!("{:.0}", f.p999)).collect(),
        ),
        (
            "64 B msgs/s (200 conns × 8)".into(),
            all.iter().map(|f| format!("{:.0}", f.small_rate)).collect(),
        ),
        (
            "CPU µs per 64 B msg".into(),
            all.iter().map(|f| opt(f.small_cpu_us, 2)).collect(),
        ),
        (
            "CPU µs per 64 B msg, 1 in flight".into(),
            all.iter().map(|f| opt(f.single_cpu_us, 2)).collect(),
        ),
        (
            "16 KiB MB/s (50 × 2)".into(),
            all.iter().map(|f| format!("{:.0}", f.big_mb_s)).collect(),
        ),
        (
            "CPU µs per 16 KiB msg".into(),
            all.iter().map(|f| opt(f.big_cpu_us, 2)).collect(),
        ),
        (
            "upgrades/s (32 at once)".into(),
            all.iter()
                .map(|f| format!("{:.0}", f.upgrades_rate))
                .collect(),
        ),
        (
            "CPU µs per upgrade".into(),
            all.iter().map(|f| opt(f.upgrade_cpu_us, 1)).collect(),
        ),
    ];
    let levels = all.iter().map(|f| f.idle.len()).max().unwrap_or(0);
    for i in 0..levels {
        rows.push((
            format!("RSS MiB, idle level {}", i + 1),
            all.iter()
                .map(|f| {
                    f.idle.get(i).map_or("-".into(), |(n, rss)| {
                        format!("{:.1} @{n}", *rss as f64 / 1048576.0)
                    })
                })
                .collect(),
        ));
    }
    let mib = |b: u64| format!("{:.1}", b as f64 / 1048576.0);
    rows.push((
        "RSS MiB, fresh process".into(),
        all.iter()
            .map(|f| f.fresh_rss.map_or("-".into(), mib))
            .collect(),
    ));
    rows.push((
        "RSS bytes per idle conn (slope)".into(),
        all.iter().map(|f| opt(f.rss_per_conn, 0)).collect(),
    ));
    rows.push((
        "RSS bytes per idle conn (from fresh)".into(),
        all.iter().map(|f| opt(f.rss_per_conn_fresh, 0)).collect(),
    ));
    rows.push((
        "RSS MiB after load: peak → 10 s after".into(),
        all.iter()
            .map(|f| {
                f.after_load.map_or("-".into(), |(peak, after)| {
                    format!("{} → {}", mib(peak), mib(after))
                })
            })
            .collect(),
    ));
    rows.push((
        "projected RSS at 1M conns (GiB)".into(),
        all.iter()
            .map(|f| match (f.rss_per_conn, f.idle.first()) {
                (Some(per), Some((n, rss))) => format!(
                    "{:.2}",
                    (*rss as f64 + per * (1e6 - *n as f64)) / 1073741824.0
                ),
                _ => "-".into(),
            })
            .collect(),
    ));
    let mut out = format!(
        "| scenario | {} |\n|---|{}\n",
        all.iter()
            .map(|f| f.name.as_str())
            .collect::<Vec<_>>()
            .join(" | "),
        "---|".repeat(all.len())
    );
    for (name, cells) in rows {
        out.push_str(&format!("| {name} | {} |\n", cells.join(" | ")));
    }
    out
}

/// The targets' ratios, met or not.
fn verdicts(all: &[Figures]) -> String {
    let get = |name: &str| all.iter().find(|f| f.name == name);
    let Some(w) = get("wsgate") else {
        return String::new();
    };
    // Each round's pair of upgrade rates, taken a few seconds apart: how far one
    // round moves the ratio on this machine, and the pairs' geometric mean with
    // its standard error, beside the ratio of the medians above.
    let rounds_line = get("haproxy").and_then(|h| {
        let pairs: Vec<f64> = w
            .upgrade_rounds
            .iter()
            .zip(&h.upgrade_rounds)
            .filter(|&(&w, &h)| w > 0 && h > 0)
            .map(|(&w, &h)| w as f64 / h as f64)
            .collect();
        if pairs.len() < 2 {
            return None;
        }
        let n = pairs.len() as f64;
        let logs: Vec<f64> = pairs.iter().map(|r| r.ln()).collect();
        let mean = logs.iter().sum::<f64>() / n;
        let var = logs.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / (n - 1.0);
        let se = (var / n).sqrt();
        Some(format!(
            "- upgrades/s round by round, wsgate / haproxy: {} (geometric mean {:.3}, {:.3}–{:.3} within one standard error)\n",
            pairs
                .iter()
                .map(|r| format!("{r:.3}"))
                .collect::<Vec<_>>()
                .join(", "),
            mean.exp(),
            (mean - se).exp(),
            (mean + se).exp(),
        ))
    });
    let mut out = String::new();
    let mut line = |what: String, value: Option<f64>, limit: f64, lower_is_better: bool| {
        let verdict = match value {
            Some(v) if (lower_is_better && v <= limit) || (!lower_is_better && v >= limit) => "met",
            Some(_) => "NOT met",
            None => "n/a",
        };
        out.push_str(&format!(
            "- {what}: {} (target {} {}): {verdict}\n",
            opt(value, 3),
            if lower_is_better { "≤" } else { "≥" },
            // 0.9 as 0.9, a limit in MiB to three places.
            format!("{limit:.3}")
                .trim_end_matches('0')
                .trim_end_matches('.')
        ));
    };
    let ratio = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a / b);
    if let Some(h) = get("haproxy") {
        line(
            "CPU per 64 B msg, 8 in flight, wsgate / haproxy".into(),
            ratio(w.small_cpu_us, h.small_cpu_us),
            0.9,
            true,
        );
        line(
            "CPU per 64 B msg, 1 in flight, wsgate / haproxy".into(),
            ratio(w.single_cpu_us, h.single_cpu_us),
            0.9,
            true,
        );
        line(
            "CPU per 16 KiB msg, wsgate / haproxy".into(),
            ratio(w.big_cpu_us, h.big_cpu_us),
            0.65,
            true,
        );
        line(
            "RSS per idle conn (slope), wsgate / haproxy".into(),
            ratio(w.rss_per_conn, h.rss_per_conn),
            0.5,
            true,
        );
        line(
            "RSS per idle conn (from fresh), wsgate / haproxy".into(),
            ratio(w.rss_per_conn_fresh, h.rss_per_conn_fresh),
            0.5,
            true,
        );
        line(
            "upgrades/s, wsgate / haproxy".into(),
            Some(w.upgrades_rate / h.upgrades_rate),
            1.0,
            false,
        );
        line(
            "CPU per upgrade, wsgate / haproxy".into(),
            ratio(w.upgrade_cpu_us, h.upgrade_cpu_us),
            1.0,
            true,
        );
        if let Some(d) = get("direct") {
            let added = |f: &Figures| f.p99 - d.p99;
            // No ratio when HAProxy's p99 is not above direct's: the tails of that
            // run moved by more than a proxy adds.
            line(
                format!(
                    "added p99 over direct, wsgate {:.0} µs vs haproxy {:.0} µs (ratio)",
                    added(w),
                    added(h)
                ),
                (added(h) >= 1.0).then(|| added(w) / added(h)),
                1.0,
                true,
            );
        }
    }
    if let (Some(fresh), Some((_, after))) = (w.fresh_rss, w.after_load) {
        let limit = 2.0 * fresh as f64 + 10.0 * 1048576.0;
        line(
            format!(
                "wsgate RSS 10 s after load, MiB (target 2 × fresh {:.1} + 10)",
                fresh as f64 / 1048576.0
            ),
            Some(after as f64 / 1048576.0),
            limit / 1048576.0,
            true,
        );
    }
    if let Some(b) = get("bare relay") {
        line(
            "CPU per 64 B msg, wsgate / bare relay".into(),
            ratio(w.small_cpu_us, b.small_cpu_us),
            1.15,
            true,
        );
    }
    out.extend(rounds_line);
    out.extend(get("haproxy").and_then(|h| machine_line(w, h)));
    out
}

/// Where the machine's time went in the upgrade rounds, per upgrade: each
/// process's CPU and the CPUs' idle share, through wsgate and through HAProxy.
/// The machine is the limit in that scenario (the load generator and the echo
/// servers share its cores with the proxy), so the rate's ratio is the ratio of
/// the three processes' CPU per upgrade (inverted) times the ratio of the time
/// the CPUs were busy; the line says which of the two moved it.
fn machine_line(w: &Figures, h: &Figures) -> Option<String> {
    let per = |f: &Figures| {
        let (s, n) = f.upgrade_spent?;
        let n = n.max(1) as f64;
        let us = |secs: f64| secs * 1e6 / n;
        let proxy = us(s.proxy?);
        let idle = s.idle / (s.wall * cpus() as f64);
        Some((proxy, us(s.echo), us(s.loadgen), idle))
    };
    let (wp, we, wl, wi) = per(w)?;
    let (hp, he, hl, hi) = per(h)?;
    let (wt, ht) = (wp + we + wl, hp + he + hl);
    Some(format!(
        "- upgrades, the machine's time per upgrade: through wsgate {wp:.1} + echo servers {we:.1} + load generator {wl:.1} = {wt:.1} CPU µs, CPUs {:.1}% idle; through haproxy {hp:.1} + {he:.1} + {hl:.1} = {ht:.1} µs, {:.1}% idle. The rate's ratio is the CPU of all three, haproxy's / wsgate's, {:.3} × the CPUs' busy time, wsgate's / haproxy's, {:.3}\n",
        wi * 100.0,
        hi * 100.0,
        ht / wt,
        (1.0 - wi) / (1.0 - hi),
    ))
}

fn echo_server(count: usize) {
    let runtime = runtime();
    runtime.block_on(async move {
        let mut listeners = Vec::new();
        for _ in 0..count {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            println!("{}", l.local_addr().expect("addr"));
            listeners.push(l);
        }
        let mut tasks = Vec::new();
        for listener in listeners {
            tasks.push(tokio::spawn(async move {
                while let Ok((tcp, _)) = listener.accept().await {
                    tokio::spawn(async move {
                        let _ = tcp.set_nodelay(true);
                        let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                            return;
                        };
                        while let Some(Ok(m)) = ws.next().await {
                            if (m.is_text() || m.is_binary()) && ws.send(m).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
}

fn bare(listen: SocketAddr, backends: Vec<SocketAddr>) {
    let runtime = runtime();
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen).await.expect("bind");
        bare_relay::run(listener, backends).await;
    });
}

/// Measures every target in turn (`with_others`: HAProxy and NGINX too, where
/// installed) with the echo servers behind it; `only`: just these targets (by
/// name), as `compare.sh --only wsgate`.
fn compare(sizes: Sizes, wsgate_binary: &str, with_others: bool, only: &[String]) -> Vec<Figures> {
    let (echo, backends) = targets::echo_servers();
    let runtime = runtime();
    type Start<'a> = Box<dyn Fn() -> Option<Target> + 'a>;
    let starts: Vec<(&str, Start)> = vec![
        ("direct", Box::new(|| Some(targets::direct(&backends)))),
        (
            "bare relay",
            Box::new(|| Some(targets::bare_relay(&backends))),
        ),
        (
            "wsgate",
            Box::new(|| Some(targets::wsgate(wsgate_binary, &backends))),
        ),
        (
            "haproxy",
            Box::new(|| {
                if with_others {
                    targets::haproxy(&backends)
                } else {
                    None
                }
            }),
        ),
        (
            "nginx",
            Box::new(|| {
                if with_others {
                    targets::nginx(&backends)
                } else {
                    None
                }
            }),
        ),
    ];
    let mut running = Vec::new();
    for (name, start) in starts {
        if !only.is_empty() && !only.iter().any(|o| o == name) {
            continue;
        }
        match start() {
            Some(target) => running.push(target),
            None => eprintln!("{name}: not installed, skipped"),
        }
    }
    runtime.block_on(measure(&running, echo.pid, sizes))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("echo-server") => {
            echo_server(args.get(1).and_then(|n| n.parse().ok()).unwrap_or(3));
        }
        // One scenario against a running proxy, for profiling it:
        // `cargo bench --bench loadgen -- upgrades 127.0.0.1:8080 10`
        // (`throughput ADDR SECONDS 16384` for the 16 KiB row's shape).
        Some(scenario @ ("upgrades" | "throughput" | "latency")) => {
            let addr: SocketAddr = args
                .get(1)
                .and_then(|a| a.parse().ok())
                .expect("target address");
            let seconds: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(10);
            let window = Duration::from_secs(seconds);
            let runtime = runtime();
            let report = runtime.block_on(async {
                match scenario {
                    "upgrades" => format!(
                        "{:.0} upgrades/s",
                        scenarios::upgrades(&[addr], 32, window).await as f64
                            / window.as_secs_f64()
                    ),
                    // A size after the seconds: the 16 KiB row's shape (50
                    // connections, 2 in flight) instead of the 64 B one's.
                    "throughput" => {
                        let size: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(64);
                        let (conns, in_flight) = if size > 64 { (50, 2) } else { (200, 8) };
                        format!(
                            "{:.0} msgs/s",
                            scenarios::throughput(&[addr], conns, in_flight, size, window).await
                                as f64
                                / window.as_secs_f64()
                        )
                    }
                    _ => format!(
                        "p99 {:?}",
                        percentile(&scenarios::latency(&[addr], 50, 20_000).await, 0.99)
                    ),
                }
            });
            println!("{report}");
        }
        // Idle connections held against a running proxy, for its RSS:
        // `cargo bench --bench loadgen -- idle 127.0.0.1:8080 5000 PID`.
        Some("idle") => {
            let addr: SocketAddr = args
                .get(1)
                .and_then(|a| a.parse().ok())
                .expect("target address");
            let n: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1000);
            let pid: u32 = args
                .get(3)
                .and_then(|s| s.parse().ok())
                .expect("the proxy's pid");
            let rss = || {
                std::fs::read_to_string(format!("/proc/{pid}/status"))
                    .ok()
                    .and_then(|s| {
                        s.lines()
                            .find(|l| l.starts_with("VmRSS:"))
                            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                    })
                    .unwrap_or(0)
                    * 1024
            };
            let runtime = runtime();
            runtime.block_on(async {
                let warm = scenarios::open_many(&[addr], 100).await;
                tokio::time::sleep(Duration::from_millis(500)).await;
                let before = rss();
                let held = scenarios::open_many(&[addr], n).await;
                tokio::time::sleep(Duration::from_secs(1)).await;
                let after = rss();
                println!(
                    "{} idle connections: {} bytes each",
                    held.len(),
                    (after.saturating_sub(before)) / held.len().max(1) as u64
                );
                drop((warm, held));
            });
        }
        Some("bare-relay") => {
            let listen = args[1].parse().expect("listen address");
            let backends = args[2..]
                .iter()
                .map(|a| a.parse().expect("backend address"))
                .collect();
            bare(listen, backends);
        }
        _ if args.iter().any(|a| a == "--bench") => {
            let only: Vec<String> = args
                .windows(2)
                .filter(|w| w[0] == "--only")
                .map(|w| w[1].replace('-', " "))
                .collect();
            // WSGATE_BINARY: measure another build (an allocator, a baseline).
            let binary = std::env::var("WSGATE_BINARY")
                .unwrap_or_else(|_| env!("CARGO_BIN_EXE_wsgate").to_string());
            let all = compare(FULL, &binary, true, &only);
            println!("{}", table(&all));
            println!("{}", verdicts(&all));
        }
        _ => {
            // Under `cargo test`: every scenario, small, against the floor and wsgate.
            let all = compare(SMOKE, env!("CARGO_BIN_EXE_wsgate"), false, &[]);
            println!("{}", table(&all));
            for f in &all {
                assert!(
                    f.small_rate > 0.0 && f.big_mb_s > 0.0 && f.upgrades_rate > 0.0,
                    "{}",
                    f.name
                );
                if f.name != "direct" {
                    assert!(
                        f.after_load.is_some() && f.fresh_rss.is_some(),
                        "{}",
                        f.name
                    );
                    assert_eq!(
                        f.idle.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
                        SMOKE.idle.to_vec(),
                        "{}",
                        f.name
                    );
                }
            }
            assert_eq!(all.len(), 3);
            // The machine's time in the upgrade rounds was read: every process did
            // work, and wsgate against itself reads as even.
            let w = all
                .iter()
                .find(|f| f.name == "wsgate")
                .expect("wsgate measured");
            let (spent, count) = w.upgrade_spent.expect("upgrade rounds' cost");
            assert!(
                count > 0 && spent.wall > 0.0 && spent.echo > 0.0 && spent.loadgen > 0.0,
                "upgrade rounds' cost: {count} upgrades, {:.3} s, echo {:.3} s, load generator {:.3} s",
                spent.wall,
                spent.echo,
                spent.loadgen
            );
            let even = machine_line(w, w).expect("the machine's line");
            assert!(even.contains("1.000 × the CPUs' busy time"), "{even}");
            assert!(even.ends_with("1.000\n"), "{even}");
        }
    }
}

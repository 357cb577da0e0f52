//! Soak: many connections through a wsgate child process, in waves, with messages
//! both ways, closes from both ends (clean and abrupt) and a backend restart in
//! the middle. At the end nothing may be left: active connections 0, open
//! descriptors back to where they started (± 5), every backend connection closed.
//!
//! `cargo bench --bench soak`: 20,000 connections in 4 waves of 5,000 (the
//! descriptor limit here is 20,000 per process: a wave costs wsgate 10,000 and
//! this process 10,000). Under `cargo test` (CI): 4 waves of 250. Prints the
//! figures; fails if anything leaked.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;

/// How a client's connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// The client sends close and waits for the answer.
    ClientClose,
    /// The backend closes (asked to by a message); the client answers.
    BackendClose,
    /// The client vanishes: TCP closed without a close frame.
    ClientDrop,
    /// Its backend was restarted under it: the client gets 1011 from wsgate.
    BackendGone,
}

#[derive(Default, Debug)]
struct Tally {
    opened: usize,
    failed_upgrades: usize,
    messages: usize,
    endings: [usize; 4],
    unexpected: usize,
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// `wsgate_connections_active`, summed over its series.
async fn active(admin: std::net::SocketAddr) -> Option<u64> {
    let (status, metrics) = http_get(admin, "/metrics", "").await;
    (status == 200).then(|| {
        metrics
            .lines()
            .filter(|l| l.starts_with("wsgate_connections_active"))
            .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    })
}

/// Opens one client, exchanges `messages` echoes; `None` if the upgrade failed.
async fn open_one(url: String, messages: usize) -> Option<(Ws, usize)> {
    let attempt = tokio::time::timeout(Duration::from_secs(10), async {
        let addr = url
            .trim_start_matches("ws://")
            .split('/')
            .next()?
            .to_string();
        let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
        let (mut ws, _) = tokio_tungstenite::client_async(url, tcp).await.ok()?;
        for i in 0..messages {
            let text = format!("m{i}");
            ws.send(Message::text(text.clone())).await.ok()?;
            match ws.next().await {
                Some(Ok(Message::Text(t))) if t.as_str() == text => {}
                _ => return None,
            }
        }
        Some(ws)
    })
    .await;
    attempt.ok().flatten().map(|ws| (ws, messages * 2))
}

/// Ends one client the chosen way; true when it ended as expected.
async fn end_one(mut ws: Ws, ending: Ending) -> bool {
    let result = tokio::time::timeout(Duration::from_secs(10), async {
        match ending {
            Ending::ClientClose => ws.close(None).await.is_ok() && drained(&mut ws).await,
            Ending::BackendClose => {
                if ws.send(Message::text(CLOSE_PLEASE)).await.is_err() {
                    return false;
                }
                // The backend's close arrives; tungstenite answers it.
                drained(&mut ws).await
            }
            Ending::ClientDrop => {
                drop(ws);
                true
            }
            Ending::BackendGone => {
                // wsgate tells the client the backend is gone (1011).
                matches!(
                    ws.next().await,
                    Some(Ok(Message::Close(Some(f)))) if u16::from(f.code) == 1011
                ) && drained(&mut ws).await
            }
        }
    })
    .await;
    result.unwrap_or(false)
}

/// Reads until the stream ends (the close handshake completes).
async fn drained(ws: &mut Ws) -> bool {
    for _ in 0..1000 {
        match ws.next().await {
            None => return true,
            Some(Err(_)) => return true,
            Some(Ok(_)) => {}
        }
    }
    false
}

async fn soak(waves: usize, per_wave: usize, messages: usize) -> Tally {
    let backend_a = EchoBackend::start().await;
    let mut backend_b = EchoBackend::start().await;
    let config = format!(
        "max_connections = 20000\n[admin]\nlisten = \"127.0.0.1:0\"\nmessage_metrics = false\n{}{}",
        route("/ws", "p"),
        pool("p", &[(backend_a.addr, 1), (backend_b.addr, 1)], "")
    );
    let proxy = ProxyProcess::start(&config).await;
    let admin = proxy.listening("admin").await;
    let pid = proxy.pid().expect("pid");
    let (fds_before, rss_before) = (open_fds(pid), rss_kib(pid));
    let url = proxy.url("/ws");
    let mut tally = Tally::default();
    let started = Instant::now();
    let mut rng = fastrand::Rng::with_seed(6455);
    for wave in 0..waves {
        // Open the wave, 200 upgrades at a time.
        let mut clients: Vec<Ws> = Vec::with_capacity(per_wave);
        let mut opening = JoinSet::new();
        for i in 0..per_wave {
            opening.spawn(open_one(url.clone(), messages));
            if opening.len() >= 200 || i + 1 == per_wave {
                while let Some(done) = opening.join_next().await {
                    match done.ok().flatten() {
                        Some((ws, n)) => {
                            tally.opened += 1;
                            tally.messages += n;
                            clients.push(ws);
                        }
                        None => tally.failed_upgrades += 1,
                    }
                }
            }
        }
        let peak_fds = open_fds(pid);
        // In the second wave, one backend restarts under its tunnels.
        let restarted = wave == 1;
        if restarted {
            let addr = backend_b.addr;
            drop(backend_b);
            backend_b = EchoBackend::start_at(addr).await;
        }
        // End the wave: after the restart, the clients that were on the
        // restarted backend have wsgate's 1011 waiting (a probe finds out which);
        // every other client ends in a random way.
        let mut ends = JoinSet::new();
        for mut ws in clients {
            let chosen = match rng.u8(..10) {
                0..=3 => Ending::ClientClose,
                4..=6 => Ending::BackendClose,
                _ => Ending::ClientDrop,
            };
            ends.spawn(async move {
                if !restarted {
                    return (chosen, end_one(ws, chosen).await, 0);
                }
                let probe = ws.send(Message::text("probe")).await;
                let answer = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
                match (probe, answer) {
                    (Ok(()), Ok(Some(Ok(Message::Text(_))))) => {
                        (chosen, end_one(ws, chosen).await, 2)
                    }
                    (_, Ok(Some(Ok(Message::Close(Some(f)))))) if u16::from(f.code) == 1011 => {
                        (Ending::BackendGone, drained(&mut ws).await, 0)
                    }
                    _ => (chosen, false, 0),
                }
            });
        }
        while let Some(done) = ends.join_next().await {
            match done {
                Ok((how, true, messages)) => {
                    tally.endings[how as usize] += 1;
                    tally.messages += messages;
                }
                _ => tally.unexpected += 1,
            }
        }
        eprintln!(
            "wave {}: {} open at the peak, wsgate holding {} descriptors, RSS {} KiB",
            wave + 1,
            per_wave,
            peak_fds,
            rss_kib(pid)
        );
    }
    // Nothing may be left: poll, bounded, for the gauge and the descriptors.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut left, mut fds_after) = (active(admin).await, open_fds(pid));
    while Instant::now() < deadline
        && (left != Some(0)
            || fds_after.abs_diff(fds_before) > 5
            || backend_a.open() + backend_b.open() > 0)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = active(admin).await;
        fds_after = open_fds(pid);
    }
    let backends_open = backend_a.open() + backend_b.open();
    println!(
        "soak: {} connections opened in {waves} waves of {per_wave} ({} failed upgrades), {} messages, in {:.1} s",
        tally.opened,
        tally.failed_upgrades,
        tally.messages,
        started.elapsed().as_secs_f64()
    );
    println!(
        "soak: ended by client close {}, backend close {}, client vanished {}, backend restart {}; unexpected {}",
        tally.endings[0], tally.endings[1], tally.endings[2], tally.endings[3], tally.unexpected
    );
    println!(
        "soak: active connections after {:?}, backend connections open {backends_open}, descriptors {fds_before} -> {fds_after}, RSS {rss_before} -> {} KiB",
        left,
        rss_kib(pid)
    );
    assert_eq!(left, Some(0), "wsgate_connections_active after the soak");
    assert_eq!(backends_open, 0, "backend connections left open");
    assert!(
        fds_after.abs_diff(fds_before) <= 5,
        "descriptors {fds_before} -> {fds_after}"
    );
    assert_eq!(tally.failed_upgrades, 0, "failed upgrades");
    assert_eq!(
        tally.unexpected, 0,
        "connections that did not end as expected"
    );
    assert!(tally.endings[3] > 0, "the restart ended some tunnels");
    tally
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (waves, per_wave) = if full { (4, 5_000) } else { (4, 250) };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(soak(waves, per_wave, 2));
}

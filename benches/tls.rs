//! wsgate against HAProxy, both terminating TLS with the same ECDSA P-256
//! certificate in front of the same echo backends, in one run: CPU per full wss
//! handshake + upgrade, CPU per 16 KiB message over wss (three interleaved
//! rounds of each), RSS per idle wss connection, each as a ratio to HAProxy.
//! Targets: ≤ 1.0, ≤ 0.8, ≤ 0.6. `WSGATE_BINARY` measures another build.
//!
//! `./benches/compare.sh` runs it after the plain comparison (`cargo bench --bench
//! tls`); under `cargo test` it runs a short smoke round against wsgate only.

#[path = "loadgen/targets.rs"]
#[allow(dead_code)]
mod targets;

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

type Wss = tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>;

/// A TLS-terminating proxy under test.
struct Proxy {
    name: &'static str,
    addr: SocketAddr,
    pid: u32,
    _process: targets::Process,
}

fn wsgate(binary: &str, dir: &std::path::Path, backends: &[SocketAddr]) -> Proxy {
    let (plain, tls) = (targets::free_port(), targets::free_port());
    let list: Vec<String> = backends
        .iter()
        .map(|b| format!("{{ addr = \"{b}\" }}"))
        .collect();
    let config = format!(
        "[server]\nlisten = [\"127.0.0.1:{plain}\"]\nmax_connections = 20000\n\
         [tls]\nlisten = [\"127.0.0.1:{tls}\"]\nhttp2 = false\n\
         [[tls.cert]]\ncert = \"{dir}/cert.pem\"\nkey = \"{dir}/key.pem\"\n\
         [admin]\nmessage_metrics = false\n[log]\naccess = \"off\"\n\
         [[route]]\npath = \"/\"\npool = \"p\"\n[pool.p]\nbackends = [{}]\n",
        list.join(", "),
        dir = dir.display()
    );
    let path = dir.join("wsgate.toml");
    std::fs::write(&path, config).expect("config");
    let process = targets::spawn(
        Command::new(binary)
            .args(["run", "--config"])
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let addr: SocketAddr = format!("127.0.0.1:{tls}").parse().expect("addr");
    targets::wait_listening(addr, "wsgate");
    Proxy {
        name: "wsgate",
        addr,
        pid: process.pid,
        _process: process,
    }
}

fn haproxy(dir: &std::path::Path, backends: &[SocketAddr]) -> Option<Proxy> {
    Command::new("haproxy").arg("-v").output().ok()?;
    let port = targets::free_port();
    let tls = format!(" ssl crt {}/haproxy.pem alpn http/1.1", dir.display());
    let config = targets::haproxy_config(port, &tls, backends);
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, config).expect("config");
    let process = targets::spawn(
        Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    targets::wait_listening(addr, "haproxy");
    Some(Proxy {
        name: "haproxy",
        addr,
        pid: process.pid,
        _process: process,
    })
}

async fn wss(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> Wss {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    let name = ServerName::try_from("bench.test").expect("name");
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .expect("TLS");
    let (ws, _) = tokio_tungstenite::client_async("wss://bench.test/ws", tls)
        .await
        .expect("upgrade");
    ws
}

/// Full handshakes (TCP, TLS, upgrade, close) by 16 workers for `window`.
async fn handshakes(addr: SocketAddr, config: Arc<rustls::ClientConfig>, window: Duration) -> u64 {
    let end = Instant::now() + window;
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let config = config.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < end {
                let mut ws = wss(addr, config.clone()).await;
                let _ = ws.close(None).await;
                while let Some(Ok(_)) = ws.next().await {}
                n += 1;
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("worker");
    }
    total
}

/// 16 KiB echoes over 50 connections, 2 in flight each, for `window`.
async fn big_messages(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    window: Duration,
) -> u64 {
    let end = Instant::now() + window;
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let mut ws = wss(addr, config.clone()).await;
        tasks.push(tokio::spawn(async move {
            let payload = Message::binary(vec![7u8; 16 * 1024]);
            let mut n = 0u64;
            for _ in 0..2 {
                ws.send(payload.clone()).await.expect("send");
            }
            while Instant::now() < end {
                match ws.next().await {
                    Some(Ok(Message::Binary(_))) => {
                        n += 1;
                        ws.send(payload.clone()).await.expect("send");
                    }
                    _ => break,
                }
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("worker");
    }
    total
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (window, rounds, idle) = if full {
        (Duration::from_secs(5), 3, 3000)
    } else {
        (Duration::from_millis(300), 1, 50)
    };
    let dir = std::env::temp_dir().join(format!("wsgate-bench-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    // One ECDSA P-256 certificate for both.
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["bench.test".to_string()])
        .expect("params")
        .self_signed(&key)
        .expect("cert");
    std::fs::write(dir.join("cert.pem"), cert.pem()).expect("write");
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).expect("write");
    std::fs::write(
        dir.join("haproxy.pem"),
        format!("{}{}", cert.pem(), key.serialize_pem()),
    )
    .expect("write");
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(cert.der().to_vec()))
        .expect("root");
    let mut client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    client.alpn_protocols = vec![b"http/1.1".to_vec()];
    let client = Arc::new(client);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let backends = [
            common::EchoBackend::start().await,
            common::EchoBackend::start().await,
            common::EchoBackend::start().await,
        ];
        let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
        // WSGATE_BINARY: measure another build (a baseline), as the loadgen does.
        let binary = std::env::var("WSGATE_BINARY")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_wsgate").to_string());
        let mut proxies = vec![wsgate(&binary, &dir, &addrs)];
        if full && let Some(h) = haproxy(&dir, &addrs) {
            proxies.push(h);
        }
        // Interleaved rounds (every proxy's turn in each), so that a slow phase
        // of the machine falls on all of them: one round each moved these
        // ratios by ±0.15 between runs.
        let mut sums = vec![[0.0f64; 4]; proxies.len()];
        for _ in 0..rounds {
            for (p, sum) in proxies.iter().zip(&mut sums) {
                let cpu = || targets::cpu_seconds(p.pid);
                let c0 = cpu();
                sum[0] += handshakes(p.addr, client.clone(), window).await as f64;
                sum[1] += cpu() - c0;
            }
            for (p, sum) in proxies.iter().zip(&mut sums) {
                let cpu = || targets::cpu_seconds(p.pid);
                let c0 = cpu();
                sum[2] += big_messages(p.addr, client.clone(), window).await as f64;
                sum[3] += cpu() - c0;
            }
        }
        let mut rows = Vec::new();
        for (p, sum) in proxies.iter().zip(&sums) {
            let (n, m) = (sum[0].max(1.0) as u64, sum[2].max(1.0) as u64);
            let per_handshake = sum[1] / n as f64 * 1e6;
            let per_message = sum[3] / m as f64 * 1e6;
            let before = targets::rss_bytes(p.pid);
            let mut held = Vec::new();
            for _ in 0..idle {
                held.push(wss(p.addr, client.clone()).await);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            let per_idle = targets::rss_bytes(p.pid).saturating_sub(before) as f64 / idle as f64;
            drop(held);
            rows.push((p.name, n, per_handshake, m, per_message, per_idle));
        }
        println!("TLS (ECDSA P-256, TLS 1.3, HTTP/1.1), {rounds} interleaved rounds of {window:?}, {idle} idle connections:");
        println!("| proxy | wss handshakes | CPU µs per handshake+upgrade | 16 KiB msgs | CPU µs per 16 KiB msg | RSS bytes per idle wss conn |");
        println!("|---|---|---|---|---|---|");
        for (name, n, h, m, per, idle) in &rows {
            println!("| {name} | {n} | {h:.1} | {m} | {per:.2} | {idle:.0} |");
        }
        if let [w, h] = &rows[..] {
            for (what, ours, theirs, target) in [
                ("CPU per wss handshake + upgrade", w.2, h.2, 1.0),
                ("CPU per 16 KiB msg over wss", w.4, h.4, 0.8),
                ("RSS per idle wss conn", w.5, h.5, 0.6),
            ] {
                let ratio = ours / theirs;
                println!(
                    "- {what}, wsgate / haproxy: {ratio:.3} (target ≤ {target}): {}",
                    if ratio <= target { "met" } else { "NOT met" }
                );
            }
        }
    });
    let _ = std::fs::remove_dir_all(&dir);
}

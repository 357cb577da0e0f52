//! The scenarios, each run against one target: WebSocket clients of our own
//! (tokio-tungstenite), bounded in count and time.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::timeout;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

pub type Ws = WebSocketStream<TcpStream>;

/// Opens a WebSocket to `addr`, from `source` when given (to spread clients over
/// several loopback addresses and so over more ephemeral ports).
pub async fn open(addr: SocketAddr, source: Option<IpAddr>) -> Result<Ws, String> {
    let socket = TcpSocket::new_v4().map_err(|e| e.to_string())?;
    if let Some(ip) = source {
        socket
            .bind(SocketAddr::new(ip, 0))
            .map_err(|e| e.to_string())?;
    }
    let tcp = timeout(Duration::from_secs(10), socket.connect(addr))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let url = format!("ws://{addr}/ws");
    let (ws, _) = timeout(
        Duration::from_secs(10),
        tokio_tungstenite::client_async(url, tcp),
    )
    .await
    .map_err(|_| "handshake timed out".to_string())?
    .map_err(|e| e.to_string())?;
    Ok(ws)
}

/// The i-th client's destination and source.
fn slot(addrs: &[SocketAddr], i: usize) -> (SocketAddr, Option<IpAddr>) {
    let source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (i % 8) as u8));
    (addrs[i % addrs.len()], Some(source))
}

pub async fn open_many(addrs: &[SocketAddr], n: usize) -> Vec<Ws> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let (addr, source) = slot(addrs, i);
        match open(addr, source).await {
            Ok(ws) => out.push(ws),
            Err(e) => {
                eprintln!("  connection {i} of {n} failed: {e}");
                break;
            }
        }
    }
    out
}

/// Round trips of 64-byte messages, one at a time, round robin over `conns`
/// connections; returns the sorted latencies.
pub async fn latency(addrs: &[SocketAddr], conns: usize, messages: usize) -> Vec<Duration> {
    let mut sockets = open_many(addrs, conns).await;
    assert_eq!(
        sockets.len(),
        conns,
        "could not open the latency connections"
    );
    let payload = Message::binary(vec![1u8; 64]);
    let mut out = Vec::with_capacity(messages);
    for i in 0..messages {
        let ws = &mut sockets[i % conns];
        let started = Instant::now();
        ws.send(payload.clone()).await.expect("send");
        let echo = timeout(Duration::from_secs(10), ws.next()).await;
        assert!(matches!(echo, Ok(Some(Ok(Message::Binary(_))))), "echo");
        out.push(started.elapsed());
    }
    out.sort();
    out
}

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// Echoes of `size`-byte messages over `conns` connections with `inflight` each,
/// for `window`; returns the echoes received within the window.
pub async fn throughput(
    addrs: &[SocketAddr],
    conns: usize,
    inflight: usize,
    size: usize,
    window: Duration,
) -> u64 {
    let sockets = open_many(addrs, conns).await;
    assert_eq!(
        sockets.len(),
        conns,
        "could not open the throughput connections"
    );
    let deadline = Instant::now() + window;
    let mut tasks = Vec::new();
    for ws in sockets {
        tasks.push(tokio::spawn(async move {
            let (mut sink, mut stream) = ws.split();
            let payload = Message::binary(vec![7u8; size]);
            for _ in 0..inflight {
                sink.send(payload.clone()).await.expect("send");
            }
            let mut received = 0u64;
            let mut outstanding = inflight;
            while outstanding > 0 {
                match timeout(Duration::from_secs(10), stream.next()).await {
                    Ok(Some(Ok(Message::Binary(_)))) => {}
                    other => panic!("echo lost: {other:?}"),
                }
                outstanding -= 1;
                if Instant::now() < deadline {
                    received += 1;
                    sink.send(payload.clone()).await.expect("send");
                    outstanding += 1;
                }
            }
            received
        }));
    }
    sum(tasks).await
}

/// Upgrades (open, then close cleanly) by `concurrency` workers for `window`.
pub async fn upgrades(addrs: &[SocketAddr], concurrency: usize, window: Duration) -> u64 {
    let deadline = Instant::now() + window;
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let addrs = addrs.to_vec();
        tasks.push(tokio::spawn(async move {
            let mut done = 0u64;
            let mut i = w;
            while Instant::now() < deadline {
                let (addr, source) = slot(&addrs, i);
                i += concurrency;
                let mut ws = open(addr, source).await.expect("upgrade");
                ws.close(None).await.expect("close");
                while let Ok(Some(Ok(m))) = timeout(Duration::from_secs(5), ws.next()).await {
                    if m.is_close() {
                        break;
                    }
                }
                done += 1;
            }
            done
        }));
    }
    sum(tasks).await
}

/// Waits for every task and adds up what they counted.
async fn sum(tasks: Vec<tokio::task::JoinHandle<u64>>) -> u64 {
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("load task");
    }
    total
}

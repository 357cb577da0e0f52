//! The access log of a wsgate process: a scripted session (a clean close, a
//! backend killed, an oversize message, a refused upgrade) gives exactly the
//! expected JSON lines with the right fields; SIGUSR1 reopens the file.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

async fn wait_lines(path: &Path, n: usize) -> Vec<Value> {
    wait_for(
        &format!("{n} access-log lines in {}", path.display()),
        Duration::from_secs(10),
        || lines(path).len() >= n,
    )
    .await;
    lines(path)
}

/// A client connected from the address it reports.
async fn client(proxy: &ProxyProcess, path: &str) -> (Ws, String) {
    let tcp = tokio::net::TcpStream::connect(proxy.addr)
        .await
        .expect("connect");
    let local = tcp.local_addr().expect("addr").to_string();
    let (ws, _) = tokio_tungstenite::client_async(proxy.url(path), tcp)
        .await
        .expect("upgrade");
    (ws, local)
}

fn field<'v>(line: &'v Value, key: &str) -> &'v Value {
    &line[key]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_json_line_per_tunnel_and_refusal_reopened_on_sigusr1() {
    let backend = EchoBackend::start().await;
    let small = EchoBackend::start().await;
    let dir = std::env::temp_dir().join(format!("wsgate-access-{}", fastrand::u64(..)));
    std::fs::create_dir_all(&dir).expect("dir");
    let log = dir.join("access.log");
    let proxy = ProxyProcess::start(&format!(
        "[log]\naccess = \"{}\"\n[[route]]\npath = \"/ws\"\npool = \"p\"\nidentity = \"query:user\"\n{}{}{}",
        log.display(),
        pool("p", &[(backend.addr, 1)], ""),
        route("/small", "small"),
        pool("small", &[(small.addr, 1)], "max_message_size = 100\n"),
    ))
    .await;

    // 1. A clean close by the client after two echoes.
    let (mut ws, from) = client(&proxy, "/ws?user=ada").await;
    for i in 0..2 {
        ws.send(Message::text(format!("m{i}"))).await.expect("send");
        assert_eq!(next(&mut ws).await, Message::text(format!("m{i}")));
    }
    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "done".into(),
    }))
    .await
    .expect("close");
    while ws.next().await.is_some() {}
    drop(ws);
    let got = wait_lines(&log, 1).await;
    let line = &got[0];
    assert_eq!(field(line, "message"), "tunnel", "{line}");
    assert_eq!(field(line, "event"), "tunnel");
    assert!(field(line, "conn").is_u64(), "{line}");
    assert!(field(line, "timestamp").is_string(), "{line}");
    assert_eq!(field(line, "client"), from.as_str());
    assert_eq!(field(line, "route"), "/ws");
    assert_eq!(field(line, "pool"), "p");
    assert_eq!(field(line, "backend"), backend.addr.to_string().as_str());
    assert_eq!(field(line, "user"), "ada");
    assert_eq!(field(line, "protocol"), "h1");
    assert_eq!(field(line, "scheme"), "ws");
    assert!(
        field(line, "duration_ms").as_f64().is_some_and(|d| d > 0.0),
        "{line}"
    );
    assert_eq!(field(line, "messages_in"), 2);
    assert_eq!(field(line, "messages_out"), 2);
    assert!(
        field(line, "bytes_in").as_u64().is_some_and(|b| b > 0),
        "{line}"
    );
    assert!(
        field(line, "bytes_out").as_u64().is_some_and(|b| b > 0),
        "{line}"
    );
    assert_eq!(field(line, "close_code"), 1000);
    assert_eq!(field(line, "closed_by"), "client");
    assert_eq!(field(line, "reason"), "closed");

    // 2. The backend dies without a close frame: the client gets 1011.
    let (mut ws, _) = client(&proxy, "/ws").await;
    wait_for("the backend's side", Duration::from_secs(5), || {
        backend.open() == 1
    })
    .await;
    backend.kill_all(Kill::Reset);
    assert_eq!(close_code(&mut ws, Duration::from_secs(5)).await, 1011);
    drop(ws);
    let got = wait_lines(&log, 2).await;
    let line = &got[1];
    assert_eq!(field(line, "reason"), "backend_gone", "{line}");
    assert_eq!(field(line, "closed_by"), "backend");
    assert!(
        field(line, "close_code").is_null(),
        "no close frame: {line}"
    );
    assert!(field(line, "user").is_null(), "no identity: {line}");

    // 3. A message over the pool's limit: 1009 from wsgate.
    let (mut ws, _) = client(&proxy, "/small").await;
    ws.send(Message::binary(vec![0u8; 200]))
        .await
        .expect("send");
    assert_eq!(close_code(&mut ws, Duration::from_secs(5)).await, 1009);
    drop(ws);
    let got = wait_lines(&log, 3).await;
    let line = &got[2];
    assert_eq!(field(line, "reason"), "too_big", "{line}");
    assert_eq!(field(line, "closed_by"), "wsgate");
    assert_eq!(field(line, "close_code"), 1009);
    assert_eq!(field(line, "route"), "/small");

    // 4. A refused upgrade: no route.
    let head = raw_request(proxy.addr, upgrade_request("/nowhere", "").as_bytes()).await;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    let got = wait_lines(&log, 4).await;
    let line = &got[3];
    assert_eq!(field(line, "event"), "refused", "{line}");
    assert_eq!(field(line, "status"), 404);
    assert_eq!(field(line, "reason"), "no_route");
    assert!(
        field(line, "client")
            .as_str()
            .is_some_and(|c| c.starts_with("127.0.0.1:"))
    );
    // Exactly those four.
    assert_eq!(got.len(), 4, "{got:?}");

    // logrotate: the file moves, SIGUSR1, the next line starts a new file.
    let rotated = dir.join("access.log.1");
    std::fs::rename(&log, &rotated).expect("rotate");
    proxy.signal("USR1");
    proxy
        .wait_logged("reopening the access log", 1, Duration::from_secs(5))
        .await;
    let head = raw_request(proxy.addr, upgrade_request("/elsewhere", "").as_bytes()).await;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    let fresh = wait_lines(&log, 1).await;
    assert_eq!(fresh.len(), 1);
    assert_eq!(field(&fresh[0], "status"), 404);
    assert_eq!(lines(&rotated).len(), 4, "the rotated file keeps its lines");
    // Access lines never go to the human log.
    assert_eq!(proxy.logged("\"event\":\"tunnel\""), 0);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A writer that cannot keep up (a FIFO nobody reads) never blocks the code that
/// logs: lines past the queue's bound are dropped and counted.
#[test]
fn a_stuck_writer_drops_and_counts_lines_instead_of_blocking() {
    use tracing_subscriber::layer::SubscriberExt;
    let dir = std::env::temp_dir().join(format!("wsgate-access-fifo-{}", fastrand::u64(..)));
    std::fs::create_dir_all(&dir).expect("dir");
    let fifo = dir.join("access.fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo");
    assert!(made.success());
    // A reader that never reads: the pipe fills, then the writer thread blocks.
    let _reader = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(0o4000) // O_NONBLOCK: opening does not wait for a writer
            .open(&fifo)
            .expect("open the fifo for reading")
    };
    wsgate::access::configure(&wsgate::config::AccessLog::File(fifo.clone()));
    let (layer, _guard) = wsgate::access::layer();
    let subscriber = tracing_subscriber::registry().with(layer);
    let lines = wsgate::access::QUEUE_LINES + 50_000;
    tracing::subscriber::with_default(subscriber, || {
        for i in 0..lines {
            tracing::info!(target: "wsgate::access", event = "tunnel", conn = i, "tunnel");
        }
    });
    let dropped = wsgate::access::dropped();
    assert!(dropped >= 40_000, "{dropped} of {lines} lines dropped");
    std::mem::forget(_guard); // its flush would wait on the stuck writer
    let _ = std::fs::remove_dir_all(&dir);
}

//! Socket.IO out of the box: Socket.IO 4 clients with default transports (HTTP
//! long-polling, then the upgrade to WebSocket) through wsgate to three Socket.IO
//! servers that broadcast to each other through the Redis adapter. The Node.js
//! packages are in `tests/socketio` (`./scripts/test` runs `npm ci` there).

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use tokio::io::AsyncBufReadExt;
use tokio::time::timeout;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/socketio")
}

fn ready() {
    assert!(
        dir().join("node_modules/socket.io").exists(),
        "tests/socketio/node_modules is missing: ./scripts/test installs Node.js and runs npm ci there"
    );
}

/// A Socket.IO server on `port`, waited for until it listens.
async fn server(port: u16, redis: &str, name: &str) -> tokio::process::Child {
    let mut child = tokio::process::Command::new("node")
        .arg("server.js")
        .arg(port.to_string())
        .arg(redis)
        .arg(name)
        .current_dir(dir())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node (./scripts/test installs it)");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    timeout(Duration::from_secs(15), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.starts_with("ready") {
                return;
            }
        }
        panic!("the Socket.IO server {name} exited");
    })
    .await
    .expect("the Socket.IO server listens within 15 s");
    child
}

/// Runs 30 clients against `url`; their report.
async fn clients(url: &str) -> serde_json::Value {
    let output = timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("node")
            .arg("clients.js")
            .arg(url)
            .arg("30")
            .arg("lobby")
            .current_dir(dir())
            .output(),
    )
    .await
    .expect("the clients finish within 60 s")
    .expect("node");
    let text = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(text.lines().last().unwrap_or("")).unwrap_or_else(|e| {
        panic!(
            "no report ({e}): {text}\n{}",
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_io_clients_work_through_wsgate_with_sticky_cookies() {
    ready();
    let redis = RedisServer::start().await;
    let mut servers = Vec::new();
    let mut addrs = Vec::new();
    for (i, addr) in free_addrs(3).await.into_iter().enumerate() {
        servers.push(server(addr.port(), &redis.url(), &format!("io{i}")).await);
        addrs.push((addr, 1));
    }
    let route = "[[route]]\npath = \"/\"\npool = \"io\"\nhttp = \"proxy\"\n";
    let sticky = Proxy::start(&format!(
        "{route}{}[pool.io.sticky]\ncookie = \"wsgate\"\n",
        pool("io", &addrs, "")
    ))
    .await;
    let report = clients(&format!("http://{}", sticky.addr)).await;
    eprintln!("with sticky cookies: {report}");
    assert_eq!(report["connected"], 30, "{report}");
    assert_eq!(
        report["upgraded"], 30,
        "every session upgraded to WebSocket: {report}"
    );
    let servers_used = report["servers"].as_object().map_or(0, |s| s.len());
    assert_eq!(
        servers_used, 3,
        "the sessions spread over the 3 servers: {report}"
    );
    assert_eq!(
        report["received"], 30,
        "the broadcast reached all 30: {report}"
    );
    assert!(
        report["errors"].as_array().is_some_and(|e| e.is_empty()),
        "{report}"
    );

    // Without stickiness, what a user sees: polling requests of one session land
    // on servers that do not know it, and sessions fail.
    let loose = Proxy::start(&format!("{route}{}", pool("io", &addrs, ""))).await;
    let report = clients(&format!("http://{}", loose.addr)).await;
    eprintln!("without stickiness: {report}");
    let failed = report["errors"].as_array().map_or(0, |e| e.len());
    assert!(failed > 0, "without stickiness sessions break: {report}");
}

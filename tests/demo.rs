//! `wsgate demo`: the command prints where to go, the page is served, and in a real
//! browser (headless Chromium) two tabs land on different backends and talk.

mod common;

use std::time::Duration;

use common::*;
use futures_util::SinkExt;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use wsgate::backend::demo::{DemoOptions, start};

async fn http_get_raw(addr: std::net::SocketAddr, path: &str) -> String {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.expect("write");
    let mut body = Vec::new();
    timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read_to_end(&mut tcp, &mut body),
    )
    .await
    .expect("answer in time")
    .expect("read");
    String::from_utf8_lossy(&body).into_owned()
}

#[tokio::test]
async fn the_demo_command_prints_its_urls_and_serves_the_page() {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .args(["demo", "--port", "0", "--admin-port", "0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("run wsgate demo");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let (url, admin) = timeout(Duration::from_secs(10), async {
        let mut page = None;
        loop {
            let line = lines
                .next_line()
                .await
                .expect("read")
                .expect("demo exited early");
            let Some(rest) = line.split("http://").nth(1) else {
                continue;
            };
            let host = rest.split('/').next().unwrap_or("").to_string();
            if line.contains("chat page") {
                page = Some(host);
            } else if line.contains("admin") {
                return (page.expect("the page comes first"), host);
            }
        }
    })
    .await
    .expect("the demo prints its URLs");
    let addr: std::net::SocketAddr = url.parse().expect("host:port");
    let admin: std::net::SocketAddr = admin.parse().expect("host:port");
    let (status, backends) = common::http_get(admin, "/backends", "").await;
    assert_eq!(status, 200);
    let backends: Value = serde_json::from_str(&backends).expect("json");
    assert_eq!(
        backends["pools"][0]["backends"].as_array().map(Vec::len),
        Some(3)
    );
    let page = http_get_raw(addr, "/").await;
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(page.contains("text/html"), "{page}");
    assert!(page.contains("<title>wsgate demo</title>"));

    // The WebSocket URL it prints works, and whoami names a backend.
    let mut ws = connect(&format!("ws://{addr}/rooms/lobby?user=cli")).await;
    ws.send(Message::text(r#"{"type":"whoami"}"#))
        .await
        .expect("send");
    let mut backend = None;
    for _ in 0..10 {
        if let Message::Text(t) = next(&mut ws).await {
            let v: Value = serde_json::from_str(&t).expect("json");
            if v["type"] == "whoami" {
                backend = v["backend"].as_str().map(str::to_string);
                break;
            }
        }
    }
    assert!(backend.is_some_and(|b| b.starts_with("backend-")));
}

#[path = "common/browser.rs"]
mod browser;
use browser::Browser;

#[tokio::test]
async fn two_browser_tabs_on_different_backends_talk_through_the_relay() {
    let stop = CancellationToken::new();
    let _stop_on_exit = stop.clone().drop_guard();
    let demo = start(
        &DemoOptions {
            port: 0,
            admin_port: 0,
            redis: None,
            backends: 3,
            tls_port: None,
        },
        stop,
    )
    .await
    .expect("demo");
    let mut browser = Browser::launch().await;

    let landed = "(() => { const b = document.getElementById('backend').textContent; return b.startsWith('backend-') ? b : ''; })()";
    let alice = browser
        .open(&format!("http://{}/?user=alice", demo.proxy))
        .await;
    let alice_backend = browser.wait(&alice, landed, "alice's tab to land").await;
    let bob = browser
        .open(&format!("http://{}/?user=bob", demo.proxy))
        .await;
    let bob_backend = browser.wait(&bob, landed, "bob's tab to land").await;
    assert_ne!(
        alice_backend, bob_backend,
        "the two tabs must land on different backends"
    );

    let members = "(() => { const t = document.getElementById('members').innerText; return t.includes('alice') && t.includes('bob'); })()";
    browser
        .wait(&alice, members, "alice to see both members")
        .await;
    browser.wait(&bob, members, "bob to see both members").await;

    browser
        .eval(&alice, "document.getElementById('input').value = 'hello from alice'; document.getElementById('send').click(); true")
        .await;
    let arrived = "document.getElementById('messages').innerText.includes('hello from alice')";
    browser
        .wait(&bob, arrived, "bob's tab to show alice's message")
        .await;
    browser
        .wait(&alice, arrived, "alice's tab to show her own message")
        .await;

    browser
        .call(Some(&bob), "Page.bringToFront", json!({}))
        .await;
    browser.screenshot(&bob, "demo-two-tabs.png").await;

    // Drain alice's backend through the admin API: after the demo's 1 s
    // drain_timeout her tab is closed with 1012, reconnects by itself, lands on
    // another backend and says it moved.
    let (_, addr) = demo
        .backends
        .iter()
        .find(|(b, _)| b.id() == alice_backend.as_str().unwrap_or(""))
        .expect("alice's backend");
    let (status, _) = http_request(
        demo.admin,
        "POST",
        &format!("/pools/demo/backends/{addr}/drain"),
        "",
    )
    .await;
    assert_eq!(status, 200);
    let moved = format!(
        "(() => {{ const s = document.getElementById('status').textContent; const b = document.getElementById('backend').textContent; return s.includes('moved from {0}') && b !== '{0}' ? b : ''; }})()",
        alice_backend.as_str().unwrap_or("")
    );
    browser
        .wait(
            &alice,
            &moved,
            "alice's tab to reconnect elsewhere after 1012",
        )
        .await;
}

#[tokio::test]
async fn the_page_over_https_opens_its_websocket_over_http2() {
    let stop = CancellationToken::new();
    let _stop_on_exit = stop.clone().drop_guard();
    let demo = start(
        &DemoOptions {
            port: 0,
            admin_port: 0,
            redis: None,
            backends: 3,
            tls_port: Some(0),
        },
        stop,
    )
    .await
    .expect("demo");
    let https = demo.tls.expect("an https listener");
    assert!(
        demo.banner().contains(&format!("https://{https}/")),
        "{}",
        demo.banner()
    );
    let mut browser = Browser::launch().await;
    let carol = browser.open(&format!("https://{https}/?user=carol")).await;
    let landed = "(() => { const b = document.getElementById('backend').textContent; return b.startsWith('backend-') ? b : ''; })()";
    browser
        .wait(&carol, landed, "carol's tab to land over wss")
        .await;
    browser
        .eval(&carol, "document.getElementById('input').value = 'over h2'; document.getElementById('send').click(); true")
        .await;
    let arrived = "document.getElementById('messages').innerText.includes('over h2')";
    browser.wait(&carol, arrived, "the message to cross").await;
    let metrics = http_get_raw(demo.admin, "/metrics").await;
    let h2 = metrics
        .lines()
        .find(|l| l.starts_with("wsgate_websockets_total") && l.contains("protocol=\"h2\""));
    assert!(
        h2.is_some_and(|l| !l.ends_with(" 0")),
        "the browser's WebSocket went over HTTP/2 (RFC 8441): {metrics}"
    );
}

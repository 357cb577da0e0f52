//! Requests wsgate answers itself: wrong route, plain HTTP, broken handshakes,
//! oversized or slow headers, no backend to send to. None reaches a backend.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};

async fn setup() -> (EchoBackend, Proxy) {
    let backend = EchoBackend::start().await;
    let dead = dead_addr().await;
    let config = format!(
        "{}{}{}{}{}{}",
        route("/ws", "live"),
        route("/dead", "dead"),
        route("/empty", "empty"),
        pool("live", &[(backend.addr, 1)], ""),
        pool("dead", &[(dead, 1)], "retries = 3"),
        "[pool.empty]\nbackends = []\n",
    );
    let config = config.replace("[server]", "");
    let proxy = Proxy::start(&format!(
        "handshake_timeout = \"400ms\"\nmax_header_bytes = 8192\n{config}"
    ))
    .await;
    (backend, proxy)
}

fn status(head: &str) -> &str {
    head.split(' ').nth(1).unwrap_or("")
}

#[tokio::test]
async fn each_bad_request_gets_its_status_and_no_backend_sees_it() {
    let (backend, proxy) = setup().await;
    let addr = proxy.addr;

    let plain = raw_request(addr, b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(status(&plain), "426", "{plain}");
    assert!(
        plain.to_ascii_lowercase().contains("upgrade: websocket"),
        "{plain}"
    );

    let no_route = raw_request(addr, upgrade_request("/nowhere", "").as_bytes()).await;
    assert_eq!(status(&no_route), "404", "{no_route}");

    let bad_key = upgrade_request("/ws", "").replace("dGhlIHNhbXBsZSBub25jZQ==", "not-a-key");
    let head = raw_request(addr, bad_key.as_bytes()).await;
    assert_eq!(status(&head), "400", "{head}");

    let post = upgrade_request("/ws", "").replace("GET ", "POST ");
    let head = raw_request(addr, post.as_bytes()).await;
    assert_eq!(status(&head), "400", "{head}");

    let no_conn = upgrade_request("/ws", "").replace("Connection: Upgrade\r\n", "");
    let head = raw_request(addr, no_conn.as_bytes()).await;
    assert_eq!(status(&head), "400", "{head}");

    let old = upgrade_request("/ws", "").replace("Version: 13", "Version: 8");
    let head = raw_request(addr, old.as_bytes()).await;
    assert_eq!(status(&head), "426", "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-version: 13"),
        "{head}"
    );

    let huge = upgrade_request("/ws", &format!("X-Big: {}\r\n", "a".repeat(20_000)));
    let head = raw_request(addr, huge.as_bytes()).await;
    assert_eq!(status(&head), "431", "{head}");

    let dead = raw_request(addr, upgrade_request("/dead", "").as_bytes()).await;
    assert_eq!(status(&dead), "502", "{dead}");

    let empty = raw_request(addr, upgrade_request("/empty", "").as_bytes()).await;
    assert_eq!(status(&empty), "503", "{empty}");

    assert_eq!(
        backend.accepted(),
        0,
        "a rejected request reached the backend"
    );

    // The proxy still serves good requests after all that.
    let _ws = connect(&proxy.url("/ws")).await;
    assert_eq!(backend.accepted(), 1);
}

#[tokio::test]
async fn a_client_sending_headers_too_slowly_is_closed_at_the_handshake_timeout() {
    let (backend, proxy) = setup().await;
    let mut tcp = TcpStream::connect(proxy.addr).await.expect("connect");
    let started = Instant::now();
    tcp.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    // One header line every 100 ms: never finishes within the 400 ms timeout.
    let mut closed_after = None;
    for i in 0..50 {
        let line = format!("X-Drip-{i}: 1\r\n");
        if tcp.write_all(line.as_bytes()).await.is_err() {
            closed_after = Some(started.elapsed());
            break;
        }
        let mut buf = [0u8; 512];
        match timeout(Duration::from_millis(100), tcp.read(&mut buf)).await {
            Err(_) => continue,
            Ok(Ok(n)) => {
                // hyper may answer 408 before closing; either way the connection ends.
                if n > 0 {
                    let text = String::from_utf8_lossy(&buf[..n]);
                    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
                }
                closed_after = Some(started.elapsed());
                break;
            }
            Ok(Err(_)) => {
                closed_after = Some(started.elapsed());
                break;
            }
        }
    }
    let closed_after = closed_after.expect("the slow client was never closed");
    assert!(
        closed_after >= Duration::from_millis(350) && closed_after < Duration::from_secs(3),
        "closed after {closed_after:?}"
    );
    assert_eq!(backend.accepted(), 0);
}

/// A backend that answers every connection with `answer` and closes.
async fn fixed_answer_backend(answer: &'static [u8]) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let _ = read_head(&mut tcp).await;
            let _ = tcp.write_all(answer).await;
        }
    });
    addr
}

#[tokio::test]
async fn a_backend_refusal_goes_back_as_it_was_and_garbage_is_502() {
    let refusing = fixed_answer_backend(
        b"HTTP/1.1 403 Forbidden\r\nContent-Length: 14\r\nX-Reason: banned\r\n\r\nnot for you ok",
    )
    .await;
    let garbage = fixed_answer_backend(b"SSH-2.0-OpenSSH_9.2\r\n\r\n").await;
    let config = format!(
        "{}{}{}{}",
        route("/refuse", "refusing"),
        route("/garbage", "garbage"),
        pool("refusing", &[(refusing, 1)], ""),
        pool("garbage", &[(garbage, 1)], ""),
    );
    let proxy = Proxy::start(&config).await;

    let mut tcp = TcpStream::connect(proxy.addr).await.expect("connect");
    tcp.write_all(upgrade_request("/refuse", "").as_bytes())
        .await
        .expect("write");
    let mut answer = Vec::new();
    timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 1024];
        while !answer.ends_with(b"not for you ok") {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("answer in time");
    let answer = String::from_utf8_lossy(&answer).to_ascii_lowercase();
    assert!(answer.starts_with("http/1.1 403 forbidden"), "{answer}");
    assert!(answer.contains("x-reason: banned"), "{answer}");
    assert!(answer.ends_with("\r\n\r\nnot for you ok"), "{answer}");

    let head = raw_request(proxy.addr, upgrade_request("/garbage", "").as_bytes()).await;
    assert_eq!(status(&head), "502", "{head}");
    proxy.wait_counts("refusing", &[0]).await;
    proxy.wait_counts("garbage", &[0]).await;
}

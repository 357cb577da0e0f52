//! Messages of every kind cross the proxy unchanged, and the handshake's
//! negotiation (subprotocols, extensions, headers) passes through.

mod common;

use std::time::Duration;

use common::*;
use futures_util::SinkExt;
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

async fn echo_proxy() -> (EchoBackend, Proxy) {
    let backend = EchoBackend::start().await;
    let config = format!(
        "{}{}",
        route("/ws", "p"),
        pool("p", &[(backend.addr, 1)], "")
    );
    let proxy = Proxy::start(&config).await;
    (backend, proxy)
}

#[tokio::test]
async fn every_kind_of_message_echoes_unchanged() {
    let (_backend, proxy) = echo_proxy().await;
    let mut ws = connect(&proxy.url("/ws")).await;

    let big: Vec<u8> = (0..1024 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    let messages = [
        Message::text("hello through wsgate"),
        Message::binary(vec![0u8, 1, 2, 255]),
        Message::text(""),
        Message::binary(Vec::new()),
        Message::binary(big.clone()),
        Message::text("é日本語🙂"),
    ];
    for m in &messages {
        ws.send(m.clone()).await.expect("send");
        assert_eq!(&next(&mut ws).await, m);
    }

    ws.send(Message::Ping(b"are you there".to_vec().into()))
        .await
        .expect("ping");
    assert_eq!(
        next(&mut ws).await,
        Message::Pong(b"are you there".to_vec().into())
    );

    // A text message in three fragments arrives as one message.
    for (payload, opcode, fin) in [
        ("frag", OpCode::Data(Data::Text), false),
        ("ment", OpCode::Data(Data::Continue), false),
        ("ed", OpCode::Data(Data::Continue), true),
    ] {
        let frame = Frame::message(payload.as_bytes().to_vec(), opcode, fin);
        ws.send(Message::Frame(frame)).await.expect("fragment");
    }
    assert_eq!(next(&mut ws).await, Message::text("fragmented"));

    ws.close(None).await.expect("close");
    assert_eq!(close_code(&mut ws, Duration::from_secs(5)).await, 1005);
    drop(ws);
    proxy.wait_counts("p", &[0]).await;
}

#[tokio::test]
async fn subprotocol_query_and_headers_reach_the_backend() {
    let (backend, proxy) = echo_proxy().await;
    let (mut ws, response) = connect_with(
        &proxy.url("/ws/room?user=ada&x=1"),
        &[
            ("sec-websocket-protocol", "chat.v1, chat.v2"),
            ("cookie", "session=abc"),
            ("x-custom", "kept"),
        ],
    )
    .await;
    assert_eq!(response.status(), 101);
    assert_eq!(response.headers()["sec-websocket-protocol"], "chat.v2");
    assert!(backend.has_target("/ws/room?user=ada&x=1"));
    let seen = backend
        .last_request
        .lock()
        .unwrap()
        .clone()
        .expect("request seen");
    assert_eq!(seen["cookie"], "session=abc");
    assert_eq!(seen["x-custom"], "kept");
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(seen["x-forwarded-host"], proxy.addr.to_string());
    ws.send(Message::text("hi")).await.expect("send");
    assert_eq!(next(&mut ws).await, Message::text("hi"));
}

/// permessage-deflate is between client and backend: its negotiation passes
/// through and compressed frames (RSV1 set) cross byte for byte, fragments as sent.
#[tokio::test]
async fn compressed_and_fragmented_frames_cross_byte_for_byte() {
    let mut backend = RawBackend::start(
        "Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover\r\n",
    )
    .await;
    let config = format!("{}{}", route("/", "p"), pool("p", &[(backend.addr, 1)], ""));
    let proxy = Proxy::start(&config).await;

    let mut client = tokio::net::TcpStream::connect(proxy.addr)
        .await
        .expect("connect");
    let request = upgrade_request(
        "/deflate",
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n",
    );
    client.write_all(request.as_bytes()).await.expect("request");
    let (mut server, head) = backend.next().await;
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-extensions: permessage-deflate; client_max_window_bits"),
        "{head}"
    );
    let response = read_head(&mut client).await;
    assert!(response.starts_with("HTTP/1.1 101"), "{response}");
    assert!(
        response
            .to_ascii_lowercase()
            .contains("sec-websocket-extensions: permessage-deflate; server_no_context_takeover"),
        "{response}"
    );

    // Client to backend: a compressed text message in two fragments (RSV1 on the
    // first), a ping between them, then a large compressed binary frame.
    let key = Some([0x11, 0x22, 0x33, 0x44]);
    let mut upstream = Vec::new();
    upstream.extend(frame(0x40 | 0x01, &[0xf2, 0x48, 0xcd], key));
    upstream.extend(frame(0x89, b"p", key));
    upstream.extend(frame(0x80, &[0xc9, 0xc9, 0x07, 0x00], key));
    upstream.extend(frame(0xc2, &vec![0x5a; 70_000], key));
    client.write_all(&upstream).await.expect("write");
    assert_eq!(read_exact(&mut server, upstream.len()).await, upstream);

    let downstream = [
        frame(0xc1, &[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00], None),
        frame(0x8a, b"p", None),
    ]
    .concat();
    server.write_all(&downstream).await.expect("write");
    assert_eq!(read_exact(&mut client, downstream.len()).await, downstream);

    // A clean close both ways ends the tunnel and its count.
    let close = frame(0x88, &[0x03, 0xe8], key);
    client.write_all(&close).await.expect("close");
    assert_eq!(read_exact(&mut server, close.len()).await, close);
    server
        .write_all(&frame(0x88, &[0x03, 0xe8], None))
        .await
        .expect("close reply");
    drop(server);
    assert_eq!(
        read_exact(&mut client, 4).await,
        frame(0x88, &[0x03, 0xe8], None)
    );
    drop(client);
    proxy.wait_counts("p", &[0]).await;
}

/// A client that sends its first frame in the same write as its upgrade request:
/// the bytes read past the request head reach the backend, in order.
#[tokio::test]
async fn a_frame_sent_with_the_upgrade_request_is_not_lost() {
    let mut backend = RawBackend::start("").await;
    let config = format!("{}{}", route("/", "p"), pool("p", &[(backend.addr, 1)], ""));
    let proxy = Proxy::start(&config).await;
    let key = Some([9, 8, 7, 6]);
    let first = frame(0x81, b"sent with the request", key);
    let second = frame(0x82, &[1, 2, 3], key);
    let mut client = tokio::net::TcpStream::connect(proxy.addr)
        .await
        .expect("connect");
    let mut bytes = upgrade_request("/early", "").into_bytes();
    bytes.extend_from_slice(&first);
    client.write_all(&bytes).await.expect("write");
    let (mut server, _) = backend.next().await;
    let response = read_head(&mut client).await;
    assert!(response.starts_with("HTTP/1.1 101"), "{response}");
    client.write_all(&second).await.expect("write");
    let expected = [first, second].concat();
    assert_eq!(read_exact(&mut server, expected.len()).await, expected);
}

/// One connection: a refused upgrade, a plain request and an upgrade, pipelined
/// in one write with a frame behind them. Each gets its answer in order, and the
/// frame reaches the backend: the connection goes from wsgate's own upgrade path
/// to hyper and to a tunnel without losing a byte.
#[tokio::test]
async fn requests_pipelined_on_one_connection_are_answered_in_order() {
    let mut backend = RawBackend::start("").await;
    let config = format!(
        "{}{}",
        route("/ws", "p"),
        pool("p", &[(backend.addr, 1)], "")
    );
    let proxy = Proxy::start(&config).await;
    let key = Some([1, 2, 3, 4]);
    let first = frame(0x81, b"behind three requests", key);
    let mut bytes = upgrade_request("/nowhere", "").into_bytes();
    bytes.extend_from_slice(b"GET /plain HTTP/1.1\r\nHost: test.local\r\n\r\n");
    bytes.extend_from_slice(upgrade_request("/ws", "").as_bytes());
    bytes.extend_from_slice(&first);
    let mut client = tokio::net::TcpStream::connect(proxy.addr)
        .await
        .expect("connect");
    client.write_all(&bytes).await.expect("write");
    let (mut server, _) = backend.next().await;
    // Everything up to the end of the 101's head, in at most 5 s.
    let mut seen = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !seen
        .split_once("HTTP/1.1 101")
        .is_some_and(|(_, after)| after.contains("\r\n\r\n"))
    {
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout_at(
            deadline,
            tokio::io::AsyncReadExt::read(&mut client, &mut buf),
        )
        .await
        .expect("all three answers in time")
        .expect("read");
        assert!(n > 0, "closed after {seen:?}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let statuses: Vec<&str> = seen
        .match_indices("HTTP/1.1 ")
        .map(|(i, _)| &seen[i + 9..i + 12])
        .collect();
    assert_eq!(statuses, ["404", "404", "101"], "{seen}");
    let second = frame(0x82, &[7, 7], key);
    client.write_all(&second).await.expect("write");
    let expected = [first, second].concat();
    assert_eq!(read_exact(&mut server, expected.len()).await, expected);
}

/// A refused upgrade whose request says `Connection: close` ends the connection
/// once the answer is written; the same refusal without it leaves the connection
/// open for the next request.
#[tokio::test]
async fn a_refused_upgrade_closes_the_connection_only_when_asked() {
    let backend = RawBackend::start("").await;
    let config = format!(
        "{}{}",
        route("/ws", "p"),
        pool("p", &[(backend.addr, 1)], "")
    );
    let proxy = Proxy::start(&config).await;
    for (connection, closed) in [("Upgrade, close", true), ("Upgrade", false)] {
        let request = upgrade_request("/nowhere", "")
            .replace("Connection: Upgrade", &format!("Connection: {connection}"));
        let mut client = tokio::net::TcpStream::connect(proxy.addr)
            .await
            .expect("connect");
        client.write_all(request.as_bytes()).await.expect("write");
        let head = read_head(&mut client).await;
        assert!(head.starts_with("HTTP/1.1 404"), "{head}");
        // What is left: the body, then EOF if the connection was closed (waited
        // for generously; an open one is given a short while to show no EOF).
        let wait = Duration::from_millis(if closed { 5_000 } else { 300 });
        let mut rest = Vec::new();
        let read = tokio::time::timeout(
            wait,
            tokio::io::AsyncReadExt::read_to_end(&mut client, &mut rest),
        )
        .await;
        assert_eq!(read.is_ok(), closed, "{connection}: {read:?}");
    }
}

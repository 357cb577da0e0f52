//! How tunnels end: a backend that dies, clients and backends that reset,
//! messages over the limit, idle tunnels, shutdown. Counts never leak.

mod common;

use std::time::Duration;

use common::*;
use futures_util::SinkExt;
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;

async fn setup(extra: &str) -> (Vec<EchoBackend>, Proxy) {
    let backends = vec![EchoBackend::start().await, EchoBackend::start().await];
    let list: Vec<_> = backends.iter().map(|b| (b.addr, 1)).collect();
    let proxy = Proxy::start(&format!("{}{}", route("/ws", "p"), pool("p", &list, extra))).await;
    (backends, proxy)
}

async fn open(proxy: &Proxy, n: usize) -> Vec<Ws> {
    let mut out = Vec::new();
    for _ in 0..n {
        let mut ws = connect(&proxy.url("/ws")).await;
        ws.send(Message::text("up")).await.expect("send");
        assert_eq!(next(&mut ws).await, Message::text("up"));
        out.push(ws);
    }
    out
}

#[tokio::test]
async fn a_killed_backend_gives_its_clients_1011_within_a_second() {
    for how in [Kill::Drop, Kill::Reset] {
        let (backends, proxy) = setup("").await;
        let mut clients = open(&proxy, 10).await;
        assert_eq!(proxy.counts("p"), vec![5, 5]);
        backends[0].kill_all(how);
        let mut codes = Vec::new();
        for ws in clients.iter_mut() {
            // Clients on the surviving backend still echo; the others get 1011.
            if ws.send(Message::text("again")).await.is_ok() {
                match tokio::time::timeout(
                    Duration::from_secs(1),
                    futures_util::StreamExt::next(ws),
                )
                .await
                {
                    Ok(Some(Ok(Message::Text(t)))) => assert_eq!(t.as_str(), "again"),
                    Ok(Some(Ok(Message::Close(Some(f))))) => codes.push(u16::from(f.code)),
                    other => panic!("{how:?}: neither echo nor close within 1 s: {other:?}"),
                }
            }
        }
        assert_eq!(codes, vec![1011; 5], "{how:?}");
        drop(clients);
        proxy.wait_counts("p", &[0, 0]).await;
    }
}

#[tokio::test]
async fn counts_return_to_zero_however_connections_end() {
    let (backends, proxy) = setup("").await;

    // Clean closes from the client.
    let clients = open(&proxy, 20).await;
    for mut ws in clients {
        ws.close(None).await.expect("close");
        close_code(&mut ws, Duration::from_secs(5)).await;
    }
    proxy.wait_counts("p", &[0, 0]).await;

    // Client resets: the socket dies with RST, no close frame.
    let clients = open(&proxy, 20).await;
    for ws in clients {
        let tcp = ws.into_inner();
        socket2::SockRef::from(&tcp)
            .set_linger(Some(Duration::ZERO))
            .expect("linger");
        drop(tcp);
    }
    proxy.wait_counts("p", &[0, 0]).await;
    wait_for("backends to see the resets", Duration::from_secs(5), || {
        backends.iter().all(|b| b.open() == 0)
    })
    .await;

    // Backend resets.
    let mut clients = open(&proxy, 20).await;
    backends[0].kill_all(Kill::Reset);
    backends[1].kill_all(Kill::Reset);
    for ws in clients.iter_mut() {
        assert_eq!(close_code(ws, Duration::from_secs(2)).await, 1011);
    }
    proxy.wait_counts("p", &[0, 0]).await;
    drop(clients);

    // And the pool still works afterwards.
    let _again = open(&proxy, 4).await;
    assert_eq!(proxy.counts("p"), vec![2, 2]);
}

#[tokio::test]
async fn a_message_over_the_limit_closes_with_1009() {
    let (backends, proxy) = setup("max_message_size = \"1KiB\"").await;
    let mut ws = connect(&proxy.url("/ws")).await;
    ws.send(Message::binary(vec![1u8; 1024]))
        .await
        .expect("send");
    assert_eq!(next(&mut ws).await, Message::binary(vec![1u8; 1024]));
    ws.send(Message::binary(vec![1u8; 1025]))
        .await
        .expect("send");
    assert_eq!(close_code(&mut ws, Duration::from_secs(2)).await, 1009);
    drop(ws);
    proxy.wait_counts("p", &[0, 0]).await;
    wait_for("the backend to be closed", Duration::from_secs(5), || {
        backends.iter().all(|b| b.open() == 0)
    })
    .await;
}

#[tokio::test]
async fn a_backend_message_over_the_limit_closes_the_client_with_1009() {
    let mut backend = RawBackend::start("").await;
    let proxy = Proxy::start(&format!(
        "{}{}",
        route("/", "p"),
        pool("p", &[(backend.addr, 1)], "max_message_size = 100")
    ))
    .await;
    let mut ws = connect(&proxy.url("/big")).await;
    let (mut server, _) = backend.next().await;
    // Fragments of 60 bytes: the second takes the message to 120.
    server
        .write_all(&frame(0x01, &[b'a'; 60], None))
        .await
        .expect("write");
    server
        .write_all(&frame(0x80, &[b'a'; 60], None))
        .await
        .expect("write");
    assert_eq!(close_code(&mut ws, Duration::from_secs(2)).await, 1009);
    // The backend is told too, with a masked close frame.
    let close = read_exact(&mut server, 8).await;
    assert_eq!(close[0], 0x88);
    assert_eq!(close[1], 0x82);
    let code = u16::from_be_bytes([close[6] ^ close[2], close[7] ^ close[3]]);
    assert_eq!(code, 1009);
}

#[tokio::test]
async fn an_idle_tunnel_is_closed_with_1001() {
    let (_backends, proxy) = setup("idle_timeout = \"600ms\"").await;
    let mut busy = connect(&proxy.url("/ws")).await;
    let mut idle = connect(&proxy.url("/ws")).await;
    // Traffic on one tunnel keeps it open; the other closes.
    for _ in 0..8 {
        busy.send(Message::text("tick")).await.expect("send");
        assert_eq!(next(&mut busy).await, Message::text("tick"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(close_code(&mut idle, Duration::from_secs(2)).await, 1001);
    busy.send(Message::text("tock")).await.expect("send");
    assert_eq!(next(&mut busy).await, Message::text("tock"));
}

#[tokio::test]
async fn shutdown_closes_every_tunnel_with_1001_and_returns() {
    let backends = [EchoBackend::start().await, EchoBackend::start().await];
    let list: Vec<_> = backends.iter().map(|b| (b.addr, 1)).collect();
    // Keys before the first table go to [server]: no spread, all close at once.
    let proxy = Proxy::start(&format!(
        "shutdown_spread = \"0s\"\n{}{}",
        route("/ws", "p"),
        pool("p", &list, "")
    ))
    .await;
    let mut clients = open(&proxy, 6).await;
    let stopping = tokio::spawn(proxy.stop());
    for ws in clients.iter_mut() {
        assert_eq!(close_code(ws, Duration::from_secs(2)).await, 1001);
    }
    drop(clients);
    tokio::time::timeout(Duration::from_secs(5), stopping)
        .await
        .expect("stopped in time")
        .expect("stop task");
}

/// Close frames with code 1000: the client's (masked) and the backend's.
fn close_frames() -> (Vec<u8>, Vec<u8>) {
    let code = 1000u16.to_be_bytes();
    (
        frame(0x88, &code, Some([1, 2, 3, 4])),
        frame(0x88, &code, None),
    )
}

/// A proxy in front of one raw backend (its close timeout far away) and one
/// tunnel through it: the backend, the proxy, the client's end, the backend's end.
async fn raw_tunnel() -> (
    RawBackend,
    Proxy,
    tokio::net::TcpStream,
    tokio::net::TcpStream,
) {
    let mut backend = RawBackend::start("").await;
    let proxy = Proxy::start(&format!(
        "{}{}",
        route("/ws", "p"),
        pool("p", &[(backend.addr, 1)], "close_timeout = \"60s\"")
    ))
    .await;
    let client = raw_upgrade(proxy.addr, "/ws").await;
    let (held, _) = backend.next().await;
    (backend, proxy, client, held)
}

/// The close frame that answers the other side's ends the closing handshake:
/// nothing may follow it (RFC 6455 §7.1.1), so its receiver gets FIN with it,
/// without waiting for the sender to close its TCP connection first. Both ways,
/// with a `close_timeout` far beyond the wait allowed here.
#[tokio::test]
async fn the_close_frame_that_ends_the_handshake_comes_with_fin() {
    use tokio::io::AsyncReadExt;
    let (client_close, backend_close) = close_frames();
    for client_first in [true, false] {
        let (_backend, proxy, mut client, mut held) = raw_tunnel().await;
        // Who sends the first close frame, and who answers it (and then keeps its
        // connection open): the answerer's peer must see EOF at once.
        let (first, first_close, answerer, answer) = if client_first {
            (&mut client, &client_close, &mut held, &backend_close)
        } else {
            (&mut held, &backend_close, &mut client, &client_close)
        };
        first.write_all(first_close).await.expect("first close");
        assert_eq!(&read_exact(answerer, first_close.len()).await, first_close);
        answerer.write_all(answer).await.expect("answer");
        assert_eq!(&read_exact(first, answer.len()).await, answer);
        let mut rest = [0u8; 16];
        let eof = tokio::time::timeout(Duration::from_secs(5), first.read(&mut rest)).await;
        assert!(
            matches!(eof, Ok(Ok(0))),
            "client first: {client_first}: no FIN after the answering close frame: {eof:?}"
        );
        // The answerer closes in turn; the tunnel ends and its count goes back.
        drop(client);
        drop(held);
        proxy.wait_counts("p", &[0]).await;
    }
}

/// Once the closing handshake is over and the backend has closed, the tunnel ends
/// (its count goes back) without waiting for the client's own FIN: the client's
/// close frame was the last thing it may send. The client still sees a clean FIN,
/// not a reset, and a close timeout far away plays no part.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_ends_when_the_backend_closes_after_the_handshake() {
    use tokio::io::AsyncReadExt;
    let (client_close, backend_close) = close_frames();
    for client_first in [true, false] {
        let (_backend, proxy, mut client, mut held) = raw_tunnel().await;
        proxy.wait_counts("p", &[1]).await;
        if client_first {
            client.write_all(&client_close).await.expect("client close");
            assert_eq!(
                &read_exact(&mut held, client_close.len()).await,
                &client_close
            );
            held.write_all(&backend_close)
                .await
                .expect("backend answer");
        } else {
            held.write_all(&backend_close).await.expect("backend close");
            assert_eq!(
                &read_exact(&mut client, backend_close.len()).await,
                &backend_close
            );
            client
                .write_all(&client_close)
                .await
                .expect("client answer");
            assert_eq!(
                &read_exact(&mut held, client_close.len()).await,
                &client_close
            );
        }
        // The backend closes, as a server does after the handshake; the client
        // keeps its connection open.
        drop(held);
        proxy.wait_counts("p", &[0]).await;
        if client_first {
            assert_eq!(
                &read_exact(&mut client, backend_close.len()).await,
                &backend_close
            );
        }
        let mut rest = [0u8; 16];
        let eof = tokio::time::timeout(Duration::from_secs(5), client.read(&mut rest)).await;
        assert!(
            matches!(eof, Ok(Ok(0))),
            "client first: {client_first}: not a clean FIN: {eof:?}"
        );
    }
}

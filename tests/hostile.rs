//! Hostile and broken input. Backends that answer a 101 a client must refuse:
//! each is a failed handshake (502, `backend_bad_answer`, the next candidate
//! tried), and an unrelated client's tunnel keeps echoing throughout.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use futures_util::SinkExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

/// A backend that answers every upgrade with `answer`, `{accept}` replaced by the
/// right Sec-WebSocket-Accept for the request's key; counts what it accepted.
struct ScriptedBackend {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    /// The request heads received, in order.
    heads: Arc<std::sync::Mutex<Vec<String>>>,
}

impl ScriptedBackend {
    async fn start(answer: &'static str) -> ScriptedBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let heads = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (count, seen) = (accepted.clone(), heads.clone());
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let seen = seen.clone();
                tokio::spawn(async move {
                    let head = read_head(&mut stream).await;
                    if let Ok(mut heads) = seen.lock() {
                        heads.push(head.clone());
                    }
                    let answer = answer.replace("{accept}", &accept_for(&head));
                    let _ = stream.write_all(answer.as_bytes()).await;
                    // Hold the connection until wsgate closes it.
                    let mut sink = [0u8; 256];
                    while let Ok(n) = tokio::io::AsyncReadExt::read(&mut stream, &mut sink).await {
                        if n == 0 {
                            break;
                        }
                    }
                });
            }
        });
        ScriptedBackend {
            addr,
            accepted,
            heads,
        }
    }
}

const UPGRADE: &str = "Upgrade: websocket\r\nConnection: Upgrade\r\n";

/// A 101 a client accepts.
const RIGHT_101: &str = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n";

/// A 101 with the given headers after the status line.
fn answer(headers: &str) -> String {
    format!("HTTP/1.1 101 Switching Protocols\r\n{headers}\r\n")
}

/// (name, the backend's answer, the client's extra request headers, whether a
/// client must accept it)
fn cases() -> Vec<(&'static str, String, &'static str, bool)> {
    let ok = "Sec-WebSocket-Accept: {accept}\r\n";
    vec![
        (
            "a right answer",
            answer(&format!("{UPGRADE}{ok}")),
            "",
            true,
        ),
        ("no Accept", answer(UPGRADE), "", false),
        (
            "a wrong Accept",
            answer(&format!(
                "{UPGRADE}Sec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n"
            )),
            "",
            false,
        ),
        (
            "two Accepts",
            answer(&format!("{UPGRADE}{ok}{ok}")),
            "",
            false,
        ),
        (
            "Upgrade: h2c",
            answer(&format!("Upgrade: h2c\r\nConnection: Upgrade\r\n{ok}")),
            "",
            false,
        ),
        (
            "no Upgrade",
            answer(&format!("Connection: Upgrade\r\n{ok}")),
            "",
            false,
        ),
        (
            "no Connection: upgrade",
            answer(&format!(
                "Upgrade: websocket\r\nConnection: keep-alive\r\n{ok}"
            )),
            "",
            false,
        ),
        (
            "a subprotocol nobody offered",
            answer(&format!("{UPGRADE}{ok}Sec-WebSocket-Protocol: chat\r\n")),
            "",
            false,
        ),
        (
            "a subprotocol other than the offered ones",
            answer(&format!("{UPGRADE}{ok}Sec-WebSocket-Protocol: mqtt\r\n")),
            "Sec-WebSocket-Protocol: chat, json\r\n",
            false,
        ),
        (
            "two subprotocols",
            answer(&format!(
                "{UPGRADE}{ok}Sec-WebSocket-Protocol: chat, json\r\n"
            )),
            "Sec-WebSocket-Protocol: chat, json\r\n",
            false,
        ),
        (
            "an offered subprotocol",
            answer(&format!("{UPGRADE}{ok}Sec-WebSocket-Protocol: json\r\n")),
            "Sec-WebSocket-Protocol: chat, json\r\n",
            true,
        ),
        (
            "an extension nobody offered",
            answer(&format!(
                "{UPGRADE}{ok}Sec-WebSocket-Extensions: permessage-deflate\r\n"
            )),
            "",
            false,
        ),
        (
            "an offered extension with parameters",
            answer(&format!(
                "{UPGRADE}{ok}Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover\r\n"
            )),
            "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n",
            true,
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_101_a_client_must_refuse_is_a_failed_handshake() {
    let bystander_backend = EchoBackend::start().await;
    let mut config = format!(
        "{}{}",
        route("/bystander", "by"),
        pool("by", &[(bystander_backend.addr, 1)], "")
    );
    let cases = cases();
    let mut backends = Vec::new();
    for (i, (_, answer, _, _)) in cases.iter().enumerate() {
        let alone = ScriptedBackend::start(Box::leak(answer.clone().into_boxed_str())).await;
        config.push_str(&route(&format!("/alone{i}"), &format!("alone{i}")));
        config.push_str(&pool(
            &format!("alone{i}"),
            &[(alone.addr, 1)],
            "retries = 0\n",
        ));
        backends.push(alone);
    }
    let proxy = Proxy::start(&format!("[admin]\nlisten = \"127.0.0.1:0\"\n{config}")).await;
    let mut bystander = connect(&proxy.url("/bystander")).await;

    for (i, (name, _, extra, acceptable)) in cases.iter().enumerate() {
        let head = raw_request(
            proxy.addr,
            upgrade_request(&format!("/alone{i}"), extra).as_bytes(),
        )
        .await;
        let status = head.lines().next().unwrap_or_default();
        let expected = if *acceptable { "101" } else { "502" };
        assert!(
            status.contains(expected),
            "{name}: expected {expected}, got {head}"
        );
        assert_eq!(
            backends[i].accepted.load(Ordering::SeqCst),
            1,
            "{name}: the backend was reached once"
        );
        bystander
            .send(Message::text(name.to_string()))
            .await
            .expect("bystander send");
        assert_eq!(next(&mut bystander).await, Message::text(name.to_string()));
    }
    let (_, metrics) = http_get(proxy.admin.expect("admin"), "/metrics", "").await;
    for (i, (name, _, _, acceptable)) in cases.iter().enumerate() {
        let counted = metrics.lines().any(|l| {
            l.starts_with("wsgate_backend_failures_total")
                && l.contains("reason=\"backend_bad_answer\"")
                && l.contains(&format!("backend=\"{}\"", backends[i].addr))
        });
        assert_eq!(
            counted, !acceptable,
            "{name}: counted as a failure\n{metrics}"
        );
    }
}

/// A bad 101 is that backend's failure before anything reached the client: the
/// next candidate answers instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_bad_101_the_next_backend_is_tried() {
    let bad = ScriptedBackend::start(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    )
    .await;
    let good = EchoBackend::start().await;
    let proxy = Proxy::start(&format!(
        "{}{}",
        route("/", "p"),
        pool("p", &[(bad.addr, 1), (good.addr, 1)], "retries = 1\n")
    ))
    .await;
    let mut clients = Vec::new();
    for i in 0..6 {
        let mut ws = connect(&proxy.url("/")).await;
        ws.send(Message::text(format!("c{i}"))).await.expect("send");
        assert_eq!(next(&mut ws).await, Message::text(format!("c{i}")));
        clients.push(ws);
    }
    assert!(
        bad.accepted.load(Ordering::SeqCst) >= 1,
        "the bad backend was tried"
    );
    assert_eq!(good.accepted(), 6, "every client ended on the good backend");
}

/// Requests a proxy must not guess about: 400 before any backend is reached, and
/// `Connection` cannot strip `Host` or the WebSocket headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_upgrade_requests_are_refused() {
    let backend = ScriptedBackend::start(RIGHT_101).await;
    let bystander_backend = EchoBackend::start().await;
    let proxy = Proxy::start(&format!(
        "{}{}{}{}",
        route("/bystander", "by"),
        pool("by", &[(bystander_backend.addr, 1)], ""),
        route("/", "p"),
        pool("p", &[(backend.addr, 1)], "")
    ))
    .await;
    let mut bystander = connect(&proxy.url("/bystander")).await;
    let key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    let version = "Sec-WebSocket-Version: 13\r\n";
    let ws = "Upgrade: websocket\r\nConnection: Upgrade\r\n";
    let host = "Host: test.local\r\n";
    // (name, request, expected status, a header the backend must have seen)
    let cases: Vec<(&str, String, &str, Option<&str>)> = vec![
        (
            "two Host headers",
            format!("GET /ws HTTP/1.1\r\n{host}Host: other.example\r\n{ws}{key}{version}\r\n"),
            "400",
            None,
        ),
        (
            "two keys",
            format!(
                "GET /ws HTTP/1.1\r\n{host}{ws}{key}Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\n{version}\r\n"
            ),
            "400",
            None,
        ),
        (
            "two versions",
            format!("GET /ws HTTP/1.1\r\n{host}{ws}{key}{version}{version}\r\n"),
            "400",
            None,
        ),
        (
            "a Content-Length body",
            format!("GET /ws HTTP/1.1\r\n{host}{ws}{key}{version}Content-Length: 5\r\n\r\nhello"),
            "400",
            None,
        ),
        (
            "a chunked body",
            format!(
                "GET /ws HTTP/1.1\r\n{host}{ws}{key}{version}Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            ),
            "400",
            None,
        ),
        (
            "Content-Length and Transfer-Encoding",
            format!(
                "GET /ws HTTP/1.1\r\n{host}{ws}{key}{version}Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            ),
            "400",
            None,
        ),
        (
            "an absolute target for another host",
            format!("GET http://other.example/ws HTTP/1.1\r\n{host}{ws}{key}{version}\r\n"),
            "400",
            None,
        ),
        (
            "an absolute target for another port",
            format!(
                "GET http://test.local:81/ws HTTP/1.1\r\nHost: test.local:80\r\n{ws}{key}{version}\r\n"
            ),
            "400",
            None,
        ),
        (
            "an absolute target for the same host",
            format!("GET http://TEST.local/ws HTTP/1.1\r\n{host}{ws}{key}{version}\r\n"),
            "101",
            Some("host: test.local"),
        ),
        (
            "Content-Length: 0",
            format!("GET /ws HTTP/1.1\r\n{host}{ws}{key}{version}Content-Length: 0\r\n\r\n"),
            "101",
            Some("host: test.local"),
        ),
        (
            "Connection naming Host",
            format!(
                "GET /ws HTTP/1.1\r\n{host}Upgrade: websocket\r\nConnection: Upgrade, Host\r\n{key}{version}\r\n"
            ),
            "101",
            Some("host: test.local"),
        ),
        (
            "Connection naming the key and version",
            format!(
                "GET /ws HTTP/1.1\r\n{host}Upgrade: websocket\r\nConnection: Upgrade, Sec-WebSocket-Key, Sec-WebSocket-Version\r\n{key}{version}\r\n"
            ),
            "101",
            Some("sec-websocket-key: dghlihnhbxbszsbub25jzq=="),
        ),
    ];
    for (name, request, expected, seen) in &cases {
        let before = backend.accepted.load(Ordering::SeqCst);
        let head = raw_request(proxy.addr, request.as_bytes()).await;
        let status = head.lines().next().unwrap_or_default();
        assert!(
            status.contains(expected),
            "{name}: expected {expected}, got {head}"
        );
        let reached = backend.accepted.load(Ordering::SeqCst) > before;
        assert_eq!(
            reached,
            *expected == "101",
            "{name}: whether a backend was reached"
        );
        if let Some(header) = seen {
            let last = backend
                .heads
                .lock()
                .ok()
                .and_then(|h| h.last().cloned())
                .unwrap_or_default()
                .to_ascii_lowercase();
            assert!(last.contains(header), "{name}: the backend got {last}");
        }
        bystander
            .send(Message::text(name.to_string()))
            .await
            .expect("bystander send");
        assert_eq!(next(&mut bystander).await, Message::text(name.to_string()));
    }
}

/// Which way a bad frame travels.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Dir {
    FromClient,
    FromBackend,
}

/// A close frame's payload: the code and a reason.
fn close_body(code: u16, reason: &[u8]) -> Vec<u8> {
    let mut body = code.to_be_bytes().to_vec();
    body.extend_from_slice(reason);
    body
}

type FrameCase = (&'static str, Dir, Vec<u8>, Vec<u8>, u16, &'static str);

/// Frame sequences that break RFC 6455 or the pool's size limit, either way:
/// (name, direction, the valid frames before it, the bad frame, the close code
/// both ends get, the pool). What comes before is forwarded; nothing of the bad
/// frame is.
fn frame_cases() -> Vec<FrameCase> {
    use Dir::*;
    let key = Some([9, 8, 7, 6]);
    let c = |first: u8, payload: &[u8]| frame(first, payload, key);
    let s = |first: u8, payload: &[u8]| frame(first, payload, None);
    let start = c(0x01, b"part");
    vec![
        (
            "an unmasked client frame",
            FromClient,
            vec![],
            s(0x81, b"hi"),
            1002,
            "/",
        ),
        (
            "reserved data opcode 3",
            FromClient,
            vec![],
            c(0x83, b"x"),
            1002,
            "/",
        ),
        (
            "reserved control opcode 0xB",
            FromClient,
            vec![],
            c(0x8b, b"x"),
            1002,
            "/",
        ),
        (
            "RSV1 without an extension",
            FromClient,
            vec![],
            c(0xc1, b"x"),
            1002,
            "/",
        ),
        (
            "RSV3 without an extension",
            FromClient,
            vec![],
            c(0x91, b"x"),
            1002,
            "/",
        ),
        (
            "a continuation with nothing to continue",
            FromClient,
            vec![],
            c(0x80, b"x"),
            1002,
            "/",
        ),
        (
            "a new message inside a fragmented one",
            FromClient,
            start.clone(),
            c(0x81, b"x"),
            1002,
            "/",
        ),
        (
            "a close with a 1-byte body",
            FromClient,
            vec![],
            c(0x88, &[3]),
            1002,
            "/",
        ),
        (
            "close code 999",
            FromClient,
            vec![],
            c(0x88, &close_body(999, b"")),
            1002,
            "/",
        ),
        (
            "close code 1005",
            FromClient,
            vec![],
            c(0x88, &close_body(1005, b"")),
            1002,
            "/",
        ),
        (
            "close code 1006",
            FromClient,
            vec![],
            c(0x88, &close_body(1006, b"")),
            1002,
            "/",
        ),
        (
            "close code 1015",
            FromClient,
            vec![],
            c(0x88, &close_body(1015, b"")),
            1002,
            "/",
        ),
        (
            "close code 5000",
            FromClient,
            vec![],
            c(0x88, &close_body(5000, b"")),
            1002,
            "/",
        ),
        (
            "a close reason that is not UTF-8",
            FromClient,
            vec![],
            c(0x88, &close_body(1000, &[0xff, 0xfe])),
            1007,
            "/",
        ),
        (
            "a 126-byte ping",
            FromClient,
            vec![],
            c(0x89, &[0u8; 126]),
            1002,
            "/",
        ),
        (
            "a 2 MiB ping",
            FromClient,
            vec![],
            c(0x89, &vec![0u8; 2 << 20]),
            1002,
            "/",
        ),
        (
            "a fragmented ping",
            FromClient,
            vec![],
            c(0x09, b"part"),
            1002,
            "/",
        ),
        (
            "a ping over max_message_size",
            FromClient,
            vec![],
            c(0x89, &[0u8; 120]),
            1009,
            "/small",
        ),
        (
            "a reserved-opcode frame over max_message_size",
            FromClient,
            vec![],
            c(0x83, &[0u8; 300]),
            1002,
            "/small",
        ),
        (
            "a message over max_message_size",
            FromClient,
            vec![],
            c(0x82, &[0u8; 200]),
            1009,
            "/small",
        ),
        (
            "a fragment taking the message over",
            FromClient,
            c(0x02, &[0u8; 60]),
            c(0x80, &[0u8; 60]),
            1009,
            "/small",
        ),
        (
            "a masked backend frame",
            FromBackend,
            vec![],
            c(0x81, b"hi"),
            1002,
            "/",
        ),
        (
            "a reserved opcode from the backend",
            FromBackend,
            vec![],
            s(0x84, b"x"),
            1002,
            "/",
        ),
        (
            "RSV2 from the backend",
            FromBackend,
            vec![],
            s(0xa1, b"x"),
            1002,
            "/",
        ),
        (
            "close code 1005 from the backend",
            FromBackend,
            vec![],
            s(0x88, &close_body(1005, b"")),
            1002,
            "/",
        ),
        (
            "a bad close reason from the backend",
            FromBackend,
            vec![],
            s(0x88, &close_body(1001, &[0xc3, 0x28])),
            1007,
            "/",
        ),
        (
            "a 126-byte pong from the backend",
            FromBackend,
            vec![],
            s(0x8a, &[0u8; 126]),
            1002,
            "/",
        ),
    ]
}

/// Each bad frame ends its tunnel with the case's close code to both ends, the
/// frames before it delivered and not a byte of it; a bystander keeps echoing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_that_break_the_protocol_close_both_ends_before_a_byte_goes_on() {
    let bystander_backend = EchoBackend::start().await;
    let mut backend = RawBackend::start("").await;
    let mut small = RawBackend::start("").await;
    let proxy = Proxy::start(&format!(
        "{}{}{}{}{}{}",
        route("/bystander", "by"),
        pool("by", &[(bystander_backend.addr, 1)], ""),
        route("/small", "small"),
        pool("small", &[(small.addr, 1)], "max_message_size = 100\n"),
        route("/", "p"),
        pool("p", &[(backend.addr, 1)], "max_message_size = \"1MiB\"\n")
    ))
    .await;
    let mut bystander = connect(&proxy.url("/bystander")).await;
    let cases = frame_cases();
    assert!(cases.len() >= 25);
    for (name, dir, before, bad, code, path) in cases {
        let mut client = tokio::net::TcpStream::connect(proxy.addr)
            .await
            .expect("connect");
        client
            .write_all(upgrade_request(path, "").as_bytes())
            .await
            .expect("write");
        let target = if path == "/small" {
            &mut small
        } else {
            &mut backend
        };
        let (mut server, _) = target.next().await;
        let response = read_head(&mut client).await;
        assert!(response.starts_with("HTTP/1.1 101"), "{name}: {response}");
        let code_bytes = code.to_be_bytes();
        match dir {
            Dir::FromClient => {
                // The bad frame may be cut short by the close: ignore write errors.
                let _ = client.write_all(&[before.clone(), bad].concat()).await;
                // The backend gets what came before, then wsgate's close: nothing
                // of the bad frame.
                assert_eq!(
                    read_exact(&mut server, before.len()).await,
                    before,
                    "{name}"
                );
                let close = read_exact(&mut server, 8).await;
                assert_eq!(close[..2], [0x88, 0x82], "{name}: a masked 2-byte close");
                let got = [close[6] ^ close[2], close[7] ^ close[3]];
                assert_eq!(got, code_bytes, "{name}: the backend's close code");
                let head = read_exact(&mut client, 4).await;
                assert_eq!(
                    head,
                    [0x88, 0x02, code_bytes[0], code_bytes[1]],
                    "{name}: client close"
                );
            }
            Dir::FromBackend => {
                let _ = server.write_all(&bad).await;
                let head = read_exact(&mut client, 4).await;
                assert_eq!(
                    head,
                    [0x88, 0x02, code_bytes[0], code_bytes[1]],
                    "{name}: client close"
                );
                let close = read_exact(&mut server, 8).await;
                assert_eq!(close[..2], [0x88, 0x82], "{name}: a masked 2-byte close");
                let got = [close[6] ^ close[2], close[7] ^ close[3]];
                assert_eq!(got, code_bytes, "{name}: the backend's close code");
            }
        }
        bystander
            .send(Message::text(name.to_string()))
            .await
            .expect("bystander send");
        assert_eq!(next(&mut bystander).await, Message::text(name.to_string()));
    }
}

/// With `strict_frames = false` frames pass as they come (an unmasked client
/// frame, a reserved opcode), but a control frame over 125 bytes still never does.
#[tokio::test]
async fn without_strict_frames_only_oversized_control_frames_are_stopped() {
    let mut backend = RawBackend::start("").await;
    let proxy = Proxy::start(&format!(
        "strict_frames = false\n{}{}",
        route("/", "p"),
        pool("p", &[(backend.addr, 1)], "")
    ))
    .await;
    let mut client = raw_upgrade(proxy.addr, "/").await;
    let (mut server, _) = backend.next().await;
    let lax = [
        frame(0x81, b"bare", None),
        frame(0x83, b"x", Some([1, 2, 3, 4])),
    ]
    .concat();
    client.write_all(&lax).await.expect("write");
    assert_eq!(read_exact(&mut server, lax.len()).await, lax);
    let _ = client
        .write_all(&frame(0x89, &[0u8; 126], Some([1, 2, 3, 4])))
        .await;
    let close = read_exact(&mut server, 8).await;
    assert_eq!(close[..2], [0x88, 0x82]);
    assert_eq!([close[6] ^ close[2], close[7] ^ close[3]], [0x03, 0xea]);
}

/// The accept queue a listener was given, as the kernel reports it (`ss`: a
/// listening socket's Send-Q is its backlog).
fn listen_backlog(addr: SocketAddr) -> u32 {
    let out = std::process::Command::new("ss")
        .args(["-ltnH", &format!("sport = :{}", addr.port())])
        .output()
        .expect("ss (iproute2) runs");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .nth(2)
        .and_then(|q| q.parse().ok())
        .unwrap_or_else(|| panic!("no listening socket in: {text}"))
}

/// `[server] backlog` is the listeners' accept queue: 4096 by default (as far as
/// `net.core.somaxconn` allows), the configured value otherwise.
#[tokio::test]
async fn listeners_get_the_configured_backlog() {
    let backend = EchoBackend::start().await;
    let routes = format!("{}{}", route("/", "p"), pool("p", &[(backend.addr, 1)], ""));
    let configured = Proxy::start(&format!("backlog = 77\n{routes}")).await;
    assert_eq!(listen_backlog(configured.addr), 77);
    let default = Proxy::start(&routes).await;
    let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(4096);
    assert_eq!(listen_backlog(default.addr), 4096.min(somaxconn));
    // A reload that changes it says it waits for the next start, and the running
    // listener keeps its queue.
    let text = format!("[server]\nlisten = [\"127.0.0.1:0\"]\nbacklog = 99\n{routes}");
    let config = wsgate::Config::parse(&text, "reload.toml").expect("valid");
    let summary = default.gateway.reload(&config).expect("reload");
    assert!(
        summary.contains("server.backlog (at the next start)"),
        "{summary}"
    );
    assert_eq!(listen_backlog(default.addr), 4096.min(somaxconn));
}

/// The soft and hard open-files limits of a process, from /proc.
fn open_files_limits(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = text
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files");
    let numbers: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (numbers[0], numbers[1])
}

/// At start wsgate raises its soft descriptor limit to the hard one, and warns
/// with the numbers when `max_connections` cannot fit.
#[tokio::test]
async fn the_descriptor_limit_is_raised_and_a_misfit_warned_about() {
    let backend = EchoBackend::start().await;
    let routes = format!("{}{}", route("/", "p"), pool("p", &[(backend.addr, 1)], ""));
    let (_, hard) = open_files_limits(std::process::id());
    let fits = (hard.saturating_sub(64) / 2).clamp(1, 1000);
    let raised =
        ProxyProcess::start_soft_limited(&format!("max_connections = {fits}\n{routes}"), 128).await;
    let pid = raised.pid().expect("pid");
    assert_eq!(open_files_limits(pid), (hard, hard), "soft raised to hard");
    assert_eq!(raised.logged("open-files limit cannot hold"), 0);
    // More connections than the hard limit can hold: a warning naming the numbers.
    let too_many = hard; // needs 2 × hard + 64 descriptors
    let warned =
        ProxyProcess::start_soft_limited(&format!("max_connections = {too_many}\n{routes}"), 128)
            .await;
    warned
        .wait_logged(
            "open-files limit cannot hold",
            1,
            std::time::Duration::from_secs(5),
        )
        .await;
    assert_eq!(warned.logged(&format!("limit={hard}")), 1);
    assert_eq!(warned.logged(&format!("needed={}", too_many * 2 + 64)), 1);
}

/// The path is normalised once, before routing: routing and the backend see the
/// same path, and `..` cannot climb out of a route's prefix.
#[tokio::test]
async fn routing_and_the_backend_see_the_same_normal_path() {
    let backend = ScriptedBackend::start(RIGHT_101).await;
    let proxy = Proxy::start(&format!(
        "{}{}",
        route("/public", "p"),
        pool("p", &[(backend.addr, 1)], "")
    ))
    .await;
    for (target, status, seen) in [
        (
            "/x/../public//room?r=a/../b",
            "101",
            Some("GET /public/room?r=a/../b "),
        ),
        ("/public/%2e%2e/private", "404", None),
        ("/public/../private", "404", None),
        ("/public/./a/%2E%2E/b", "101", Some("GET /public/b ")),
    ] {
        let before = backend.accepted.load(Ordering::SeqCst);
        let head = raw_request(proxy.addr, upgrade_request(target, "").as_bytes()).await;
        assert!(
            head.lines().next().unwrap_or_default().contains(status),
            "{target}: expected {status}, got {head}"
        );
        let reached = backend.accepted.load(Ordering::SeqCst) > before;
        assert_eq!(reached, seen.is_some(), "{target}");
        if let Some(line) = seen {
            let last = backend
                .heads
                .lock()
                .ok()
                .and_then(|h| h.last().cloned())
                .unwrap_or_default();
            assert!(last.starts_with(line), "{target}: the backend got {last}");
        }
    }
}

/// Proxied plain HTTP (`http = "proxy"`) is normalised the same way.
#[tokio::test]
async fn proxied_http_sees_the_same_normal_path() {
    let backend = HttpBackend::start("b").await;
    let proxy = Proxy::start(&format!(
        "[[route]]\npath = \"/public\"\npool = \"p\"\nhttp = \"proxy\"\n{}",
        pool("p", &[(backend.addr, 1)], "")
    ))
    .await;
    for (target, status, path) in [
        ("/x/../public//a", "200", Some("/public/a")),
        ("/public/%2e%2e/private", "404", None),
        ("/public/./b/%2E%2E/c", "200", Some("/public/c")),
    ] {
        let before = backend.requests.load(Ordering::SeqCst);
        let head = raw_request(
            proxy.addr,
            format!("GET {target} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes(),
        )
        .await;
        assert!(
            head.lines().next().unwrap_or_default().contains(status),
            "{target}: expected {status}, got {head}"
        );
        assert_eq!(
            backend.requests.load(Ordering::SeqCst) > before,
            path.is_some(),
            "{target}"
        );
        if let Some(path) = path {
            assert!(
                head.contains(&format!("x-path: {path}\r\n")),
                "{target}: {head}"
            );
        }
    }
}

/// Slowloris: 500 connections trickling a request head a byte at a time do not
/// slow a normal upgrade down, and each is closed at the handshake timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_delay_nobody_and_are_closed_at_the_handshake_timeout() {
    use std::time::{Duration, Instant};
    use tokio::io::AsyncReadExt;
    const SLOW: usize = 500;
    let backend = EchoBackend::start().await;
    let proxy = Proxy::start(&format!(
        "handshake_timeout = \"2s\"\n{}{}",
        route("/ws", "p"),
        pool("p", &[(backend.addr, 1)], "")
    ))
    .await;
    let url = proxy.url("/ws");
    let upgrade_time = || async {
        let started = Instant::now();
        let mut ws = connect(&url).await;
        let took = started.elapsed();
        ws.close(None).await.expect("close");
        took
    };
    let mut baseline = Vec::new();
    for _ in 0..10 {
        baseline.push(upgrade_time().await);
    }

    // Each slow client: a request line, then a header a byte every 100 ms; it
    // reports how long after opening wsgate closed it.
    let mut slow = tokio::task::JoinSet::new();
    for _ in 0..SLOW {
        let addr = proxy.addr;
        slow.spawn(async move {
            let opened = Instant::now();
            let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
            tcp.write_all(b"GET /ws HTTP/1.1\r\nHost: test\r\nX-Slow: ")
                .await
                .expect("write");
            let mut buf = [0u8; 512];
            let deadline = opened + Duration::from_secs(10);
            loop {
                tokio::select! {
                    read = tcp.read(&mut buf) => match read {
                        Ok(n) if n > 0 => continue,
                        _ => return Some(opened.elapsed()),
                    },
                    () = tokio::time::sleep(Duration::from_millis(100)) => {
                        if Instant::now() > deadline {
                            return None;
                        }
                        if tcp.write_all(b"a").await.is_err() {
                            return Some(opened.elapsed());
                        }
                    }
                }
            }
        });
    }
    // While they trickle, normal clients upgrade as fast as before.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut during = Vec::new();
    for _ in 0..10 {
        during.push(upgrade_time().await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (base, busy) = (median(&mut baseline), median(&mut during));
    eprintln!(
        "upgrade median: {base:?} alone, {busy:?} with {SLOW} slow clients (slowest {:?})",
        during.last()
    );
    assert!(
        busy <= base + Duration::from_millis(100),
        "slow clients delayed upgrades: {base:?} -> {busy:?}"
    );
    assert!(
        during.iter().all(|d| *d < Duration::from_secs(1)),
        "{during:?}"
    );

    let mut closed = Vec::new();
    while let Some(result) = slow.join_next().await {
        closed.push(result.expect("slow client task"));
    }
    let open: Vec<_> = closed.iter().filter(|c| c.is_none()).collect();
    assert!(
        open.is_empty(),
        "{} slow clients still open after 10 s",
        open.len()
    );
    for took in closed.into_iter().flatten() {
        assert!(
            took >= Duration::from_millis(1900) && took < Duration::from_secs(6),
            "a slow client closed after {took:?}, handshake_timeout is 2 s"
        );
    }
}

//! Who the client is and what one client may take: limits per address (several
//! 127.0.0.x sources), the Origin allowlist, the PROXY protocol in and out, and
//! X-Forwarded-For trusted only from trusted proxies.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::time::timeout;

/// A connection to `to` from the loopback address `from`.
async fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    let ip: IpAddr = from.parse().expect("ip");
    socket.bind(SocketAddr::new(ip, 0)).expect("bind source");
    socket.connect(to).await.expect("connect")
}

/// An upgrade from `from` with `extra` headers (and `prefix` bytes before it);
/// the status, and the connection to keep it open.
async fn upgrade_from(
    from: &str,
    to: SocketAddr,
    prefix: &[u8],
    extra: &str,
) -> (u16, String, TcpStream) {
    let mut tcp = connect_from(from, to).await;
    let mut request = prefix.to_vec();
    request.extend_from_slice(upgrade_request("/ws", extra).as_bytes());
    tcp.write_all(&request).await.expect("write");
    let head = read_head(&mut tcp).await;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head, tcp)
}

fn header<'h>(head: &'h str, name: &str) -> Option<&'h str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

#[tokio::test]
async fn connections_per_address_are_limited_each_address_on_its_own() {
    let backend = EchoBackend::start().await;
    let proxy = Proxy::start(&format!(
        "max_connections_per_ip = 2\n{}{}",
        route("/ws", "p"),
        pool("p", &[(backend.addr, 1)], "")
    ))
    .await;
    let (s1, _, first) = upgrade_from("127.0.0.2", proxy.addr, b"", "").await;
    let (s2, _, _second) = upgrade_from("127.0.0.2", proxy.addr, b"", "").await;
    assert_eq!((s1, s2), (101, 101));
    let (s3, head, _) = upgrade_from("127.0.0.2", proxy.addr, b"", "").await;
    assert_eq!(s3, 429, "{head}");
    // Other addresses have their own count.
    let (s4, _, _other) = upgrade_from("127.0.0.3", proxy.addr, b"", "").await;
    let (s5, _, _other2) = upgrade_from("127.0.0.3", proxy.addr, b"", "").await;
    assert_eq!((s4, s5), (101, 101));
    assert_eq!(proxy.counts("p"), vec![4]);
    // A closed connection gives its slot back.
    drop(first);
    wait_for("the first slot back", Duration::from_secs(5), || {
        proxy.counts("p") == vec![3]
    })
    .await;
    let (s6, head, _again) = upgrade_from("127.0.0.2", proxy.addr, b"", "").await;
    assert_eq!(s6, 101, "{head}");
}

#[tokio::test]
async fn upgrades_per_second_per_address_are_limited_with_retry_after() {
    let backend = EchoBackend::start().await;
    let proxy = Proxy::start(&format!(
        "max_upgrades_per_ip = 3\n{}{}",
        route("/ws", "p"),
        pool("p", &[(backend.addr, 1)], "")
    ))
    .await;
    // Upgrades until the first 429 (20 at most). The burst is three; a token comes
    // back every third of a second, so however slow the machine, no more than
    // 3 + 3 × (seconds elapsed) + 1 pass before it.
    let started = std::time::Instant::now();
    let mut held = Vec::new();
    let mut statuses = Vec::new();
    for _ in 0..20 {
        let (status, head, tcp) = upgrade_from("127.0.0.4", proxy.addr, b"", "").await;
        statuses.push(status);
        held.push(tcp);
        if status == 429 {
            assert_eq!(header(&head, "retry-after"), Some("1"), "{head}");
            break;
        }
        assert_eq!(status, 101, "{head}");
    }
    let passed = statuses.iter().filter(|s| **s == 101).count();
    let allowed = 3 + (3.0 * started.elapsed().as_secs_f64()).ceil() as usize + 1;
    assert!(statuses.contains(&429), "{statuses:?}");
    assert!(
        (3..=allowed).contains(&passed),
        "{passed} passed, at most {allowed} may: {statuses:?}"
    );
    let (other, _, _) = upgrade_from("127.0.0.5", proxy.addr, b"", "").await;
    assert_eq!(other, 101, "another address is not limited");
    // After a second the allowance is back.
    let mut again = 0;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        again = upgrade_from("127.0.0.4", proxy.addr, b"", "").await.0;
        if again == 101 {
            break;
        }
    }
    assert_eq!(again, 101);
}

#[tokio::test]
async fn only_listed_origins_may_open_websockets() {
    let mut backend = RawBackend::start("").await;
    let proxy = Proxy::start(&format!(
        "[[route]]\npath = \"/ws\"\npool = \"p\"\norigins = [\"https://App.Example.com\", \"http://localhost:8080\"]\n{}",
        pool("p", &[(backend.addr, 1)], "")
    ))
    .await;
    for (origin, want) in [
        ("Origin: https://app.example.com\r\n", 101),
        ("Origin: http://localhost:8080\r\n", 101),
        ("Origin: https://evil.example.com\r\n", 403),
        ("Origin: http://app.example.com\r\n", 403),
        ("Origin: null\r\n", 403),
        // Not from a browser page: no origin to check.
        ("", 101),
    ] {
        let (status, head, _tcp) = upgrade_from("127.0.0.1", proxy.addr, b"", origin).await;
        assert_eq!(status, want, "{origin:?}: {head}");
        if want == 101 {
            let (_, seen) = backend.next().await;
            assert!(seen.starts_with("GET /ws"), "{seen}");
        }
    }
    // Refused origins never reached the backend.
    assert!(
        timeout(Duration::from_millis(200), backend.connections.recv())
            .await
            .is_err()
    );
}

/// A PROXY protocol v2 header for a TCP4 client.
fn proxy_v2(client: SocketAddr, to: SocketAddr) -> Vec<u8> {
    let (SocketAddr::V4(c), SocketAddr::V4(t)) = (client, to) else {
        panic!("ipv4 only")
    };
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0, 12]);
    h.extend_from_slice(&c.ip().octets());
    h.extend_from_slice(&t.ip().octets());
    h.extend_from_slice(&c.port().to_be_bytes());
    h.extend_from_slice(&t.port().to_be_bytes());
    h
}

#[tokio::test]
async fn proxy_protocol_from_trusted_proxies_names_the_client() {
    let mut backend = RawBackend::start("").await;
    let proxy = Proxy::start(&format!(
        "trusted_proxies = [\"127.0.0.1/32\", \"10.0.0.0/8\"]\nproxy_protocol = true\nmax_connections_per_ip = 1\n{}{}",
        route("/ws", "p"),
        pool("p", &[(backend.addr, 1)], "")
    ))
    .await;
    // v1 from the trusted proxy: the backend is told the client's address, and
    // the client's own X-Forwarded-For is not believed.
    let v1 = format!(
        "PROXY TCP4 203.0.113.7 127.0.0.1 5555 {}\r\n",
        proxy.addr.port()
    );
    let (status, head, _a) = upgrade_from(
        "127.0.0.1",
        proxy.addr,
        v1.as_bytes(),
        "X-Forwarded-For: 6.6.6.6\r\n",
    )
    .await;
    assert_eq!(status, 101, "{head}");
    let (_, seen) = backend.next().await;
    assert_eq!(
        header(&seen, "x-forwarded-for"),
        Some("203.0.113.7"),
        "{seen}"
    );

    // v2 names another client; limits count per named client: the same
    // client again is over max_connections_per_ip = 1.
    let client: SocketAddr = "198.51.100.9:4000".parse().expect("addr");
    let v2 = proxy_v2(client, proxy.addr);
    let (status, head, _b) = upgrade_from("127.0.0.1", proxy.addr, &v2, "").await;
    assert_eq!(status, 101, "{head}");
    let (_, seen) = backend.next().await;
    assert_eq!(
        header(&seen, "x-forwarded-for"),
        Some("198.51.100.9"),
        "{seen}"
    );
    let (status, head, _c) = upgrade_from("127.0.0.1", proxy.addr, &v2, "").await;
    assert_eq!(status, 429, "{head}");

    // A trusted proxy that forgets the header is cut off; from an untrusted
    // address the header is not read at all (and is no HTTP).
    let mut tcp = connect_from("127.0.0.1", proxy.addr).await;
    tcp.write_all(upgrade_request("/ws", "").as_bytes())
        .await
        .expect("write");
    let mut rest = Vec::new();
    let read = timeout(Duration::from_secs(5), tcp.read_to_end(&mut rest)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "closed without an answer: {:?}",
        String::from_utf8_lossy(&rest)
    );
    let (status, head, _d) = upgrade_from("127.0.0.6", proxy.addr, v1.as_bytes(), "").await;
    assert_eq!(status, 400, "{head}");
}

#[tokio::test]
async fn forwarded_for_from_an_untrusted_client_is_replaced_and_a_trusted_one_kept() {
    let mut backend = RawBackend::start("").await;
    let proxy = Proxy::start(&format!(
        "trusted_proxies = [\"127.0.0.8\"]\n{}{}",
        route("/ws", "p"),
        pool("p", &[(backend.addr, 1)], "")
    ))
    .await;
    let spoof = "X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-For: 7.7.7.7\r\n";
    let (status, _, _a) = upgrade_from("127.0.0.7", proxy.addr, b"", spoof).await;
    assert_eq!(status, 101);
    let (_, seen) = backend.next().await;
    let xff: Vec<&str> = seen
        .lines()
        .filter(|l| l.to_ascii_lowercase().starts_with("x-forwarded-for"))
        .collect();
    assert_eq!(xff, vec!["x-forwarded-for: 127.0.0.7"], "{seen}");
    let (status, _, _b) = upgrade_from("127.0.0.8", proxy.addr, b"", spoof).await;
    assert_eq!(status, 101);
    let (_, seen) = backend.next().await;
    assert_eq!(
        header(&seen, "x-forwarded-for"),
        Some("6.6.6.6, 7.7.7.7, 127.0.0.8"),
        "{seen}"
    );
}

/// A backend behind the PROXY protocol: reads the header (v1 line or v2 block),
/// then answers the upgrade; hands over what it read.
async fn proxied_backend() -> (SocketAddr, tokio::sync::mpsc::Receiver<(Vec<u8>, String)>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let mut first = [0u8; 16];
            if tcp.read_exact(&mut first).await.is_err() {
                continue;
            }
            let mut header = first.to_vec();
            if first.starts_with(b"\r\n\r\n\0\r\nQUIT\n") {
                let len = u16::from_be_bytes([first[14], first[15]]) as usize;
                let mut rest = vec![0u8; len];
                if tcp.read_exact(&mut rest).await.is_err() {
                    continue;
                }
                header.extend(rest);
            } else {
                let mut byte = [0u8; 1];
                while !header.ends_with(b"\r\n") && header.len() < 108 {
                    if tcp.read_exact(&mut byte).await.is_err() {
                        break;
                    }
                    header.push(byte[0]);
                }
            }
            let head = read_head(&mut tcp).await;
            let answer = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
                accept_for(&head)
            );
            let _ = tcp.write_all(answer.as_bytes()).await;
            if tx.send((header, head)).await.is_err() {
                return;
            }
            tokio::spawn(async move {
                let mut sink = [0u8; 1024];
                while matches!(tcp.read(&mut sink).await, Ok(n) if n > 0) {}
            });
        }
    });
    (addr, rx)
}

#[tokio::test]
async fn pools_send_the_proxy_protocol_to_their_backends() {
    let (v1_addr, mut v1_seen) = proxied_backend().await;
    let (v2_addr, mut v2_seen) = proxied_backend().await;
    let proxy = Proxy::start(&format!(
        "{}{}{}{}",
        route("/one", "one"),
        route("/two", "two"),
        pool("one", &[(v1_addr, 1)], "proxy_protocol = \"v1\"\n"),
        pool("two", &[(v2_addr, 1)], "proxy_protocol = \"v2\"\n"),
    ))
    .await;
    let mut tcp = connect_from("127.0.0.9", proxy.addr).await;
    tcp.write_all(upgrade_request("/one", "").as_bytes())
        .await
        .expect("write");
    assert!(read_head(&mut tcp).await.starts_with("HTTP/1.1 101"));
    let (header, head) = timeout(Duration::from_secs(5), v1_seen.recv())
        .await
        .expect("in time")
        .expect("seen");
    let line = String::from_utf8_lossy(&header).to_string();
    let local = tcp.peer_addr().expect("addr");
    let port = tcp.local_addr().expect("addr").port();
    assert_eq!(
        line,
        format!(
            "PROXY TCP4 127.0.0.9 {} {port} {}\r\n",
            local.ip(),
            local.port()
        )
    );
    assert!(head.starts_with("GET /one"), "{head}");

    let mut tcp = connect_from("127.0.0.10", proxy.addr).await;
    tcp.write_all(upgrade_request("/two", "").as_bytes())
        .await
        .expect("write");
    assert!(read_head(&mut tcp).await.starts_with("HTTP/1.1 101"));
    let (header, _) = timeout(Duration::from_secs(5), v2_seen.recv())
        .await
        .expect("in time")
        .expect("seen");
    let client = tcp.local_addr().expect("addr");
    assert_eq!(header, proxy_v2(client, proxy.addr));
}

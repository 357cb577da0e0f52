//! Existing backends as they are: plain HTTP on WebSocket routes, cookie and key
//! stickiness, and room affinity in front of the relay backend.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures_util::SinkExt;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = http_body_util::combinators::BoxBody<Bytes, BoxError>;

fn http_client() -> Client<HttpConnector, Body> {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

fn empty() -> Body {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed()
}

/// A request through the proxy: status, `x-backend`, `set-cookie`, body.
async fn request(
    client: &Client<HttpConnector, Body>,
    method: &str,
    url: &str,
    cookie: Option<&str>,
) -> (u16, String, Option<String>, Bytes) {
    let mut builder = hyper::Request::builder().method(method).uri(url);
    if let Some(cookie) = cookie {
        builder = builder.header("cookie", cookie);
    }
    let response = timeout(
        Duration::from_secs(10),
        client.request(builder.body(empty()).expect("request")),
    )
    .await
    .expect("answer in time")
    .expect("answer");
    let status = response.status().as_u16();
    let header = |n: &str| {
        response
            .headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let (backend, cookie) = (
        header("x-backend").unwrap_or_default(),
        header("set-cookie"),
    );
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, backend, cookie, body)
}

fn proxied(backends: &[&HttpBackend], extra: &str) -> String {
    let list: Vec<_> = backends.iter().map(|b| (b.addr, 1)).collect();
    format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[[route]]\npath = \"/\"\npool = \"p\"\nhttp = \"proxy\"\n{}",
        pool("p", &list, extra)
    )
}

#[tokio::test]
async fn plain_http_is_proxied_with_keep_alive() {
    let b = HttpBackend::start("one").await;
    let proxy = Proxy::start(&proxied(&[&b], "")).await;
    let client = http_client();
    let url = |p: &str| format!("http://{}{p}", proxy.addr);
    for _ in 0..20 {
        let (status, backend, _, body) = request(&client, "GET", &url("/hello"), None).await;
        assert_eq!(
            (status, backend.as_str(), &body[..]),
            (200, "one", &b"one"[..])
        );
    }
    // Twenty requests, one client connection: the backend connection was reused.
    assert_eq!(b.requests.load(std::sync::atomic::Ordering::SeqCst), 20);
    assert!(b.accepted.load(std::sync::atomic::Ordering::SeqCst) <= 2);
    // An upgrade on the same route still works.
    let mut ws = connect(&proxy.url("/ws")).await;
    ws.send(Message::text("up")).await.expect("send");
    assert_eq!(next(&mut ws).await, Message::text("up"));
}

#[tokio::test]
async fn a_5_mib_body_streams_both_ways() {
    let b = HttpBackend::start("one").await;
    let proxy = Proxy::start(&proxied(&[&b], "")).await;
    let client = http_client();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
    let body = BodyExt::boxed(StreamBody::new(tokio_stream_from(rx)));
    let request = hyper::Request::post(format!("http://{}/echo", proxy.addr))
        .body(body)
        .expect("request");
    let chunk = Bytes::from(vec![7u8; 1024 * 1024]);
    let (head_seen_tx, head_seen) = tokio::sync::oneshot::channel::<()>();
    let sender = tokio::spawn(async move {
        for _ in 0..4 {
            tx.send(Ok(Frame::data(chunk.clone()))).await.expect("send");
        }
        // The backend's answer began before the request ended: streamed, not
        // buffered whole on the way.
        timeout(Duration::from_secs(10), head_seen)
            .await
            .expect("the response head arrives while the request is still streaming")
            .expect("signal");
        tx.send(Ok(Frame::data(chunk))).await.expect("send");
    });
    let response = timeout(Duration::from_secs(10), client.request(request))
        .await
        .expect("head in time")
        .expect("response");
    assert_eq!(response.status(), 200);
    let _ = head_seen_tx.send(());
    let body = timeout(Duration::from_secs(20), response.into_body().collect())
        .await
        .expect("body in time")
        .expect("body")
        .to_bytes();
    sender.await.expect("sender");
    assert_eq!(body.len(), 5 * 1024 * 1024);
    assert!(body.iter().all(|b| *b == 7));
}

/// An mpsc receiver as a stream (no extra crate for one adapter).
fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + Sync {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::test]
async fn a_long_poll_is_held_30_seconds() {
    let b = HttpBackend::start("one").await;
    let proxy = Proxy::start(&proxied(&[&b], "")).await;
    let started = Instant::now();
    let client = http_client();
    let response = timeout(
        Duration::from_secs(45),
        client.request(
            hyper::Request::get(format!("http://{}/hold?ms=30000", proxy.addr))
                .body(empty())
                .expect("request"),
        ),
    )
    .await
    .expect("answered within 45 s")
    .expect("response");
    assert_eq!(response.status(), 200);
    assert!(started.elapsed() >= Duration::from_secs(29));
}

/// A backend that resets every connection once it has read the request head.
async fn resetting_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = read_head(&mut stream).await;
                let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                let _ = stream.flush().await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_reset_before_the_head_is_retried_for_get_and_502_for_post() {
    let reset = resetting_backend().await;
    let good = HttpBackend::start("good").await;
    let proxy = Proxy::start(&format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[[route]]\npath = \"/only\"\npool = \"bad\"\nhttp = \"proxy\"\n\
         [[route]]\npath = \"/\"\npool = \"p\"\nhttp = \"proxy\"\n{}{}",
        pool("p", &[(reset, 1), (good.addr, 1)], "max_fails = 1000"),
        pool("bad", &[(reset, 1)], ""),
    ))
    .await;
    let client = http_client();
    for _ in 0..20 {
        let (status, backend, _, _) = request(
            &client,
            "GET",
            &format!("http://{}/hello", proxy.addr),
            None,
        )
        .await;
        assert_eq!((status, backend.as_str()), (200, "good"));
    }
    let (_, metrics) = http_get(proxy.admin.unwrap(), "/metrics", "").await;
    let tried = metrics.lines().any(|l| {
        l.starts_with("wsgate_backend_failures_total")
            && l.contains(&reset.to_string())
            && !l.ends_with(" 0")
    });
    assert!(
        tried,
        "the resetting backend was tried and failed: {metrics}"
    );
    // A POST is not sent twice: the reset is the client's 502.
    let (status, ..) = request(
        &client,
        "POST",
        &format!("http://{}/only/x", proxy.addr),
        None,
    )
    .await;
    assert_eq!(status, 502);
}

/// The `name=value` of a Set-Cookie.
fn cookie_pair(set_cookie: &str) -> String {
    set_cookie
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sticky_cookie_keeps_each_client_on_one_backend() {
    let b = [
        HttpBackend::start("b0").await,
        HttpBackend::start("b1").await,
        HttpBackend::start("b2").await,
    ];
    let proxy = Proxy::start(&proxied(
        &[&b[0], &b[1], &b[2]],
        "[pool.p.sticky]\ncookie = \"wsgate\"",
    ))
    .await;
    let client = http_client();
    let url = format!("http://{}/hello", proxy.addr);
    let mut held = Vec::new();
    let mut per_backend = std::collections::HashMap::<String, usize>::new();
    let mut pinned = Vec::new();
    for _ in 0..50 {
        let (status, first, set, _) = request(&client, "GET", &url, None).await;
        assert_eq!(status, 200);
        let set = set.expect("the first response sets the cookie");
        assert!(
            set.contains("HttpOnly") && set.contains("SameSite=Lax"),
            "{set}"
        );
        assert!(!set.contains("127.0.0.1"), "an opaque token: {set}");
        let jar = cookie_pair(&set);
        for _ in 0..4 {
            let (_, backend, again, _) = request(&client, "GET", &url, Some(&jar)).await;
            assert_eq!(backend, first);
            assert!(again.is_none(), "the cookie is set once");
        }
        let (ws, response) = connect_with(&proxy.url("/ws"), &[("cookie", &jar)]).await;
        assert_eq!(
            response
                .headers()
                .get("x-backend")
                .and_then(|v| v.to_str().ok()),
            Some(first.as_str()),
            "the upgrade follows the cookie"
        );
        held.push(ws);
        *per_backend.entry(first.clone()).or_default() += 1;
        pinned.push((first, jar));
    }
    // Spread by least-connections (their WebSockets stay open): 50 over 3.
    assert!(
        per_backend.values().all(|n| n.abs_diff(17) <= 2),
        "{per_backend:?}"
    );
    // Draining a backend re-pins its clients elsewhere with a new cookie.
    let drained = b[0].addr;
    let path = format!("/pools/p/backends/{drained}/drain");
    assert_eq!(
        http_request(proxy.admin.unwrap(), "POST", &path, "")
            .await
            .0,
        200
    );
    let (on_drained, jar) = pinned
        .iter()
        .find(|(backend, _)| backend == "b0")
        .expect("a client on b0");
    let (_, moved, set, _) = request(&client, "GET", &url, Some(jar)).await;
    assert_ne!(&moved, on_drained);
    let set = set.expect("a new cookie");
    assert_ne!(&cookie_pair(&set), jar);
    let (_, again, _, _) = request(&client, "GET", &url, Some(&cookie_pair(&set))).await;
    assert_eq!(again, moved);
}

/// 60 clients in 6 rooms through relay backends over Redis: returns, per room, the
/// backends its members landed on and how many backends subscribe its channel.
async fn rooms(sticky: &str) -> Vec<(usize, u64)> {
    use wsgate::backend::broker::{self, MemoryHub};
    use wsgate::backend::{Options, RelayBackend};
    let redis = RedisServer::start().await;
    let stop = tokio_util::sync::CancellationToken::new();
    let mut addrs = Vec::new();
    for i in 0..3 {
        let (broker, deliveries) = broker::open(Some(&redis.url()), &MemoryHub::default())
            .await
            .expect("broker");
        let backend = RelayBackend::new(Options::new(&format!("r{i}")), broker, deliveries);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        addrs.push((listener.local_addr().expect("addr"), 1));
        tokio::spawn(backend.serve(listener, stop.clone()));
    }
    let proxy = Proxy::start(&format!(
        "[[route]]\npath = \"/rooms\"\npool = \"relay\"\n{}{sticky}",
        pool("relay", &addrs, "")
    ))
    .await;
    let mut held = Vec::new();
    let mut out = Vec::new();
    let mut landed: Vec<std::collections::HashSet<String>> = vec![Default::default(); 6];
    for i in 0..60 {
        let room = i % 6;
        let mut ws = connect(&proxy.url(&format!("/rooms/room-{room}?user=u{i}"))).await;
        let welcome = next(&mut ws).await.into_text().expect("text");
        let v: serde_json::Value = serde_json::from_str(&welcome).expect("json");
        landed[room].insert(v["backend"].as_str().unwrap_or("").to_string());
        held.push(ws);
    }
    let mut conn = redis.conn().await;
    for (room, backends) in landed.iter().enumerate() {
        let channel = format!("relay:room:room-{room}");
        let deadline = Instant::now() + Duration::from_secs(5);
        let subscribers = loop {
            let (_, n): (String, u64) = redis::cmd("PUBSUB")
                .arg("NUMSUB")
                .arg(&channel)
                .query_async(&mut conn)
                .await
                .expect("NUMSUB");
            if n as usize == backends.len() || Instant::now() > deadline {
                break n;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        out.push((backends.len(), subscribers));
    }
    stop.cancel();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_affinity_puts_each_room_on_one_backend() {
    let with = rooms("[pool.relay.sticky]\nkey = \"path\"\n").await;
    assert!(with.iter().all(|r| *r == (1, 1)), "with affinity: {with:?}");
    // Without it, least-connections spreads each room's members: every backend
    // they landed on subscribes (two or three per room here).
    let without = rooms("").await;
    assert!(
        without
            .iter()
            .all(|(on, subs)| *on >= 2 && *subs == *on as u64),
        "without: {without:?}"
    );
}

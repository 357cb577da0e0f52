//! The admin listener: readiness that follows backend health and draining,
//! `/backends` and `/presence` that match the state, a bearer token, and nothing of
//! it on the public listener.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

async fn wait_ready(proxy: &Proxy, status: u16) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if proxy.ready().await == status {
            return;
        }
        assert!(Instant::now() < deadline, "/readyz never answered {status}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn readyz_follows_the_health_of_every_routed_pool() {
    let backend = EchoBackend::start().await;
    let addr = backend.addr;
    let health = "[pool.p.health]\ninterval = \"100ms\"\ntimeout = \"200ms\"\nunhealthy_after = 2\nhealthy_after = 2\n";
    let proxy = Proxy::start(&format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n{}{}{health}",
        route("/ws", "p"),
        pool("p", &[(addr, 1)], ""),
    ))
    .await;
    wait_ready(&proxy, 200).await;

    drop(backend);
    wait_ready(&proxy, 503).await;
    let (_, backends) = http_get(proxy.admin.unwrap(), "/backends", "").await;
    let json: serde_json::Value = serde_json::from_str(&backends).expect("json");
    assert_eq!(json["pools"][0]["backends"][0]["healthy"], false);
    let (_, metrics) = http_get(proxy.admin.unwrap(), "/metrics", "").await;
    assert!(
        metrics.contains(&format!(
            "wsgate_backend_up{{pool=\"p\",backend=\"{addr}\"}} 0"
        )),
        "{metrics}"
    );

    let _back = EchoBackend::start_at(addr).await;
    wait_ready(&proxy, 200).await;
    let _ws = connect(&proxy.url("/ws")).await;
}

#[tokio::test]
async fn readyz_is_503_while_draining() {
    let backend = EchoBackend::start().await;
    let proxy = Proxy::start(&format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n{}{}",
        route("/ws", "p"),
        pool("p", &[(backend.addr, 1)], ""),
    ))
    .await;
    let admin = proxy.admin.unwrap();
    assert_eq!(proxy.ready().await, 200);
    // A client that never answers the close keeps the drain going for a while.
    let mut tcp = tokio::net::TcpStream::connect(proxy.addr)
        .await
        .expect("connect");
    tcp.write_all(upgrade_request("/ws", "").as_bytes())
        .await
        .expect("write");
    assert!(read_head(&mut tcp).await.starts_with("HTTP/1.1 101"));
    proxy.wait_counts("p", &[1]).await;
    let stopping = tokio::spawn(proxy.stop());
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut saw = 0;
    while Instant::now() < deadline {
        saw = http_get(admin, "/readyz", "").await.0;
        if saw == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(saw, 503);
    drop(tcp);
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("stops")
        .expect("task");
}

#[tokio::test]
async fn backends_and_presence_match_the_state() {
    let b0 = EchoBackend::start().await;
    let b1 = EchoBackend::start().await;
    let proxy = Proxy::start(&format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[[route]]\npath = \"/ws\"\npool = \"p\"\nidentity = \"query:user\"\n{}",
        pool("p", &[(b0.addr, 1), (b1.addr, 3)], ""),
    ))
    .await;
    let admin = proxy.admin.unwrap();
    let mut events = proxy.gateway.cluster().subscribe();
    let _ada1 = connect(&proxy.url("/ws?user=ada")).await;
    let _ada2 = connect(&proxy.url("/ws?user=ada")).await;
    let _bob = connect(&proxy.url("/ws?user=bob")).await;

    // Without Redis, join events reach in-process subscribers.
    let mut joined = Vec::new();
    for _ in 0..3 {
        let event = tokio::time::timeout(Duration::from_secs(5), events.recv())
            .await
            .expect("an event in time")
            .expect("event");
        assert_eq!(event.kind, wsgate::presence::EventKind::Join);
        joined.push(event.entry.user);
    }
    joined.sort();
    assert_eq!(joined, vec!["ada", "ada", "bob"]);

    let (status, body) = http_get(admin, "/backends", "").await;
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_str(&body).expect("json");
    let backends = &json["pools"][0]["backends"];
    assert_eq!(json["pools"][0]["name"], "p");
    let counts = proxy.counts("p");
    for (i, (b, weight)) in [(&b0, 1), (&b1, 3)].into_iter().enumerate() {
        assert_eq!(backends[i]["addr"], b.addr.to_string());
        assert_eq!(backends[i]["weight"], weight);
        assert_eq!(backends[i]["healthy"], true);
        assert_eq!(backends[i]["draining"], false);
        assert_eq!(backends[i]["connections"], counts[i]);
        assert_eq!(backends[i]["cluster_connections"], counts[i]);
    }
    assert_eq!(counts.iter().sum::<u64>(), 3);

    // The presence table is published by the cluster task: poll until it shows.
    let mut totals = serde_json::Value::Null;
    for _ in 0..100 {
        let (_, body) = http_get(admin, "/presence", "").await;
        totals = serde_json::from_str(&body).expect("json");
        if totals["connections"] == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(totals["users"], 2, "{totals}");
    assert_eq!(totals["connections"], 3, "{totals}");
    let (_, body) = http_get(admin, "/presence/ada", "").await;
    let ada: serde_json::Value = serde_json::from_str(&body).expect("json");
    let conns = ada["connections"].as_array().expect("array");
    assert_eq!(conns.len(), 2);
    for c in conns {
        let backend = c["backend"].as_str().expect("backend");
        assert!([b0.addr.to_string(), b1.addr.to_string()].contains(&backend.to_string()));
        assert_eq!(c["pool"], "p");
    }
    let (_, body) = http_get(admin, "/presence/nobody", "").await;
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).expect("json")["connections"],
        serde_json::json!([])
    );
}

#[tokio::test]
async fn the_token_is_required_and_admin_is_not_on_the_public_listener() {
    let backend = EchoBackend::start().await;
    let token = "s3cret-token-of-enough-length";
    let proxy = Proxy::start(&format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{token}\"\n{}{}",
        route("/", "p"),
        pool("p", &[(backend.addr, 1)], ""),
    ))
    .await;
    let admin = proxy.admin.unwrap();
    for path in ["/metrics", "/healthz", "/readyz", "/backends", "/presence"] {
        assert_eq!(
            http_get(admin, path, "").await.0,
            401,
            "{path} without a token"
        );
        assert_eq!(
            http_get(admin, path, "Authorization: Bearer wrong\r\n")
                .await
                .0,
            401,
            "{path}"
        );
        let right = format!("Authorization: Bearer {token}\r\n");
        assert_eq!(
            http_get(admin, path, &right).await.0,
            200,
            "{path} with the token"
        );
        // On the public listener these are just paths of the WebSocket route.
        let (status, body) = http_get(proxy.addr, path, &right).await;
        assert_eq!(status, 426, "{path} on the public listener");
        assert!(!body.contains("wsgate_"), "{body}");
    }
    assert_eq!(backend.accepted(), 0);
}

/// `[pool.p.health]` with an HTTP check the echo backend fails (it answers a plain
/// GET with 400), flipping after one result each way.
const FAILING_HTTP_CHECK: &str = "[pool.p.health]\ninterval = \"100ms\"\ntimeout = \"500ms\"\npath = \"/health\"\nunhealthy_after = 1\nhealthy_after = 1\n";

async fn healthy(proxy: &Proxy) -> bool {
    let (_, backends) = http_get(proxy.admin.unwrap(), "/backends", "").await;
    let json: serde_json::Value = serde_json::from_str(&backends).expect("json");
    json["pools"][0]["backends"][0]["healthy"] == true
}

#[tokio::test]
async fn a_reload_that_removes_health_checks_readmits_the_backend() {
    let backend = EchoBackend::start().await;
    let base = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n{}{}",
        route("/ws", "p"),
        pool("p", &[(backend.addr, 1)], ""),
    );
    let proxy = Proxy::start(&format!("{base}{FAILING_HTTP_CHECK}")).await;
    wait_ready(&proxy, 503).await;
    assert!(!healthy(&proxy).await);

    let text = format!("[server]\nlisten = [\"127.0.0.1:0\"]\n{base}");
    let config = wsgate::Config::parse(&text, "reload.toml").expect("valid");
    proxy.gateway.reload(&config).expect("reload");
    wait_ready(&proxy, 200).await;
    assert!(healthy(&proxy).await);
}

#[tokio::test]
async fn tcp_connects_do_not_readmit_a_backend_that_fails_its_http_check() {
    let backend = EchoBackend::start().await;
    let proxy = Proxy::start(&format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n{}{}{FAILING_HTTP_CHECK}",
        route("/ws", "p"),
        pool("p", &[(backend.addr, 1)], ""),
    ))
    .await;
    wait_ready(&proxy, 503).await;
    // The pool's only backend is ejected, so upgrades still try it (fail open):
    // each one is a successful TCP connect to it.
    let mut clients = Vec::new();
    for _ in 0..10 {
        clients.push(connect(&proxy.url("/ws")).await);
        assert!(
            !healthy(&proxy).await,
            "a TCP connect re-admitted the backend"
        );
        assert_eq!(proxy.ready().await, 503);
    }
    assert_eq!(backend.open(), 10);
}

//! `/metrics` after a scripted session: the exact value of every series, and the
//! whole output accepted by `promtool check metrics`. One test only: the metrics
//! recorder is process-wide, so nothing else may run in this binary.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// `name{k="v",...} value` lines → (name, sorted labels) → value.
fn parse(text: &str) -> BTreeMap<(String, BTreeMap<String, String>), f64> {
    let mut out = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let (series, value) = line.rsplit_once(' ').expect("value");
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let mut map = BTreeMap::new();
        for pair in labels.split("\",").filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once("=\"").expect("label");
            map.insert(k.to_string(), v.trim_end_matches('"').to_string());
        }
        out.insert((name.to_string(), map), value.parse().expect("number"));
    }
    out
}

fn series(name: &str, labels: &[(&str, &str)]) -> (String, BTreeMap<String, String>) {
    (
        name.to_string(),
        labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

#[tokio::test]
async fn every_series_has_its_exact_value_after_a_scripted_session() {
    let redis = RedisServer::start().await;
    let b0 = EchoBackend::start().await;
    let b1 = EchoBackend::start().await;
    let dead = dead_addr().await;
    let config = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n{}{}{}{}{}{}{}",
        route("/ws", "p"),
        route("/dead", "dead"),
        route("/empty", "empty"),
        pool("p", &[(b0.addr, 1), (b1.addr, 1)], ""),
        pool("dead", &[(dead, 1)], "retries = 0"),
        "[pool.empty]\n",
        cluster(&redis.url(), "m", "200ms"),
    );
    let proxy = Proxy::start(&config).await;
    let admin = proxy.admin.expect("admin listener");
    let (b0s, b1s, deads) = (b0.addr.to_string(), b1.addr.to_string(), dead.to_string());

    // Four upgrades that succeed, one of each failure.
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(connect(&proxy.url("/ws")).await);
    }
    assert_eq!(
        raw_request(proxy.addr, b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .split(' ')
            .nth(1),
        Some("426")
    );
    assert_eq!(
        raw_request(proxy.addr, upgrade_request("/nowhere", "").as_bytes())
            .await
            .split(' ')
            .nth(1),
        Some("404")
    );
    assert_eq!(
        raw_request(proxy.addr, upgrade_request("/dead", "").as_bytes())
            .await
            .split(' ')
            .nth(1),
        Some("502")
    );
    assert_eq!(
        raw_request(proxy.addr, upgrade_request("/empty", "").as_bytes())
            .await
            .split(' ')
            .nth(1),
        Some("503")
    );

    // Client 0: three messages each way, then a 1000 close. Client 1: one message
    // each way, then 4001. Clients 2 and 3 stay open and quiet.
    for text in ["hello", "hello", "hello"] {
        clients[0].send(Message::text(text)).await.expect("send");
        assert_eq!(next(&mut clients[0]).await, Message::text(text));
    }
    clients[1].send(Message::text("hello")).await.expect("send");
    assert_eq!(next(&mut clients[1]).await, Message::text("hello"));
    for (i, code) in [(0usize, CloseCode::Normal), (1, CloseCode::from(4001))] {
        clients[i]
            .close(Some(CloseFrame {
                code,
                reason: "".into(),
            }))
            .await
            .expect("close");
        close_code(&mut clients[i], Duration::from_secs(5)).await;
    }
    drop(clients.drain(..2));
    wait_for(
        "the two closed tunnels to end",
        Duration::from_secs(5),
        || b0.open() + b1.open() == 2 && proxy.counts("p").iter().sum::<u64>() == 2,
    )
    .await;
    let (open0, open1) = (b0.open() as f64, b1.open() as f64);

    // One reload that works, one that does not.
    let good = wsgate::Config::parse(
        &format!("[server]\nlisten = [\"127.0.0.1:0\"]\n{config}"),
        "reload.toml",
    )
    .expect("config");
    proxy.gateway.reload(&good).expect("reload");
    assert!(
        proxy
            .gateway
            .reload_from(std::path::Path::new("/nonexistent/proxy.toml"))
            .is_err()
    );
    wait_for("the cluster to be up", Duration::from_secs(5), || {
        proxy.gateway.cluster().is_up()
    })
    .await;

    let (status, text) = http_get(admin, "/metrics", "").await;
    assert_eq!(status, 200);
    let got = parse(&text);
    let value = |name: &str, labels: &[(&str, &str)]| got.get(&series(name, labels)).copied();

    let upgrades = "wsgate_upgrades_total";
    // Each backend had two of the four (least connections, sequential opens).
    assert_eq!(
        value(
            upgrades,
            &[("pool", "p"), ("backend", &b0s), ("result", "ok")]
        ),
        Some(2.0)
    );
    assert_eq!(
        value(
            upgrades,
            &[("pool", "p"), ("backend", &b1s), ("result", "ok")]
        ),
        Some(2.0)
    );
    assert_eq!(
        value(
            upgrades,
            &[("pool", "p"), ("backend", ""), ("result", "bad_request")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            upgrades,
            &[("pool", ""), ("backend", ""), ("result", "no_route")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            upgrades,
            &[
                ("pool", "dead"),
                ("backend", &deads),
                ("result", "backend_refused")
            ]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            upgrades,
            &[("pool", "empty"), ("backend", ""), ("result", "no_backend")]
        ),
        Some(1.0)
    );

    for (backend, open) in [(&b0s, open0), (&b1s, open1)] {
        let labels = [("pool", "p"), ("backend", backend.as_str())];
        assert_eq!(value("wsgate_connections_active", &labels), Some(open));
        assert_eq!(value("wsgate_cluster_connections", &labels), Some(open));
        assert_eq!(value("wsgate_backend_up", &labels), Some(1.0));
    }
    assert_eq!(
        value(
            "wsgate_backend_up",
            &[("pool", "dead"), ("backend", &deads)]
        ),
        Some(1.0)
    );

    // Bytes: a masked client frame of "hello" is 2 + 4 + 5 = 11 bytes, the server's
    // 2 + 5 = 7; a close with a code is 8 bytes masked, 4 unmasked.
    let up = [("pool", "p"), ("direction", "client_to_backend")];
    let down = [("pool", "p"), ("direction", "backend_to_client")];
    assert_eq!(value("wsgate_messages_total", &up), Some(4.0));
    assert_eq!(value("wsgate_messages_total", &down), Some(4.0));
    assert_eq!(
        value("wsgate_bytes_total", &up),
        Some(4.0 * 11.0 + 2.0 * 8.0)
    );
    assert_eq!(
        value("wsgate_bytes_total", &down),
        Some(4.0 * 7.0 + 2.0 * 4.0)
    );

    let closes = "wsgate_closes_total";
    assert_eq!(
        value(
            closes,
            &[
                ("pool", "p"),
                ("code", "1000"),
                ("initiator", "client"),
                ("reason", "closed")
            ]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            closes,
            &[
                ("pool", "p"),
                ("code", "4000-4999"),
                ("initiator", "client"),
                ("reason", "closed")
            ]
        ),
        Some(1.0)
    );

    assert_eq!(
        value("wsgate_upgrade_duration_seconds_count", &[("pool", "p")]),
        Some(4.0)
    );
    assert_eq!(
        value("wsgate_connection_duration_seconds_count", &[("pool", "p")]),
        Some(2.0)
    );
    assert_eq!(
        value("wsgate_config_reloads_total", &[("result", "ok")]),
        Some(1.0)
    );
    assert_eq!(
        value("wsgate_config_reloads_total", &[("result", "error")]),
        Some(1.0)
    );
    assert_eq!(value("wsgate_redis_up", &[]), Some(1.0));
    assert_eq!(value("wsgate_instances", &[]), Some(1.0));

    // Label values come from the config only.
    for (_, labels) in got.keys() {
        if let Some(b) = labels.get("backend") {
            assert!(
                ["", b0s.as_str(), b1s.as_str(), deads.as_str()].contains(&b.as_str()),
                "{b}"
            );
        }
    }

    // And promtool accepts the whole output.
    let mut promtool = tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is not installed; ./scripts/test installs Debian's prometheus package");
    let mut stdin = promtool.stdin.take().expect("stdin");
    tokio::io::AsyncWriteExt::write_all(&mut stdin, text.as_bytes())
        .await
        .expect("write");
    drop(stdin);
    let out = promtool.wait_with_output().await.expect("promtool");
    assert!(
        out.status.success(),
        "promtool: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

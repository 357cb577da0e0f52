//! The admin listener's stats page in headless Chromium: a wsgate with three
//! backends and known connections; the page shows each backend's counts, follows
//! a connection closing, and keeps a screenshot under target/.

mod common;

#[path = "common/browser.rs"]
mod browser;

use browser::Browser;
use common::*;
use serde_json::{Value, json};

/// The page's counts, `addr → (here, cluster)`, as a JSON string (empty until
/// the table is drawn).
const DOM_COUNTS: &str = "(() => { const rows = [...document.querySelectorAll('tr[data-backend]')]; if (!rows.length) return ''; return JSON.stringify(Object.fromEntries(rows.map(r => [r.dataset.backend, [Number(r.querySelector('.conns').textContent), Number(r.querySelector('.cluster').textContent)]]))); })()";

/// The same counts from `/backends`, the truth.
async fn api_counts(admin: std::net::SocketAddr, token: &str) -> Value {
    let (status, body) = http_get(
        admin,
        "/backends",
        &format!("Authorization: Bearer {token}\r\n"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("json");
    let mut out = serde_json::Map::new();
    for b in v["pools"][0]["backends"].as_array().expect("backends") {
        out.insert(
            b["addr"].as_str().expect("addr").to_string(),
            json!([b["connections"], b["cluster_connections"]]),
        );
    }
    Value::Object(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stats_page_shows_live_counts_per_backend() {
    let backends = [
        EchoBackend::start().await,
        EchoBackend::start().await,
        EchoBackend::start().await,
    ];
    let token = "stats-page-token-0123";
    let proxy = Proxy::start(&format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{token}\"\n{}{}",
        route("/ws", "p"),
        pool(
            "p",
            &[
                (backends[0].addr, 1),
                (backends[1].addr, 1),
                (backends[2].addr, 2)
            ],
            ""
        )
    ))
    .await;
    let admin = proxy.admin.expect("admin");
    // Without the token the page is refused like every admin path.
    let (status, _) = http_get(admin, "/", "").await;
    assert_eq!(status, 401);

    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(connect(&proxy.url("/ws")).await);
    }
    let mut browser = Browser::launch().await;
    let page = browser
        .open(&format!("http://{admin}/?token={token}"))
        .await;
    let want = api_counts(admin, token).await;
    let total: u64 = want
        .as_object()
        .expect("object")
        .values()
        .map(|v| v[0].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(total, 8);
    page_shows(
        &mut browser,
        &page,
        &want,
        "the page to show /backends' counts",
    )
    .await;
    // Health, weight, the cluster and Redis are on the page too.
    let text = browser.eval(&page, "document.body.innerText").await;
    let text = text.as_str().unwrap_or_default();
    assert!(text.contains("healthy"), "{text}");
    assert!(text.contains("not used"), "Redis status: {text}");
    assert!(
        text.contains("1 instances") || text.contains("Cluster: 1"),
        "{text}"
    );
    let weight = browser
        .eval(
            &page,
            &format!(
                "document.querySelector('tr[data-backend=\"{}\"] .weight').textContent",
                backends[2].addr
            ),
        )
        .await;
    assert_eq!(weight, json!("2"));

    browser.screenshot(&page, "stats-page.png").await;

    // One connection closes: the page follows within its refresh.
    let mut gone = clients.pop().expect("a client");
    futures_util::SinkExt::close(&mut gone)
        .await
        .expect("close");
    drop(gone);
    wait_for(
        "the server side to count the close",
        std::time::Duration::from_secs(5),
        || proxy.counts("p").iter().sum::<u64>() == 7,
    )
    .await;
    let want = api_counts(admin, token).await;
    page_shows(&mut browser, &page, &want, "the page to follow the close").await;
}

/// Polls the page until its counts are `want` (15 s at most).
async fn page_shows(browser: &mut Browser, page: &str, want: &Value, what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let shown = browser.eval(page, DOM_COUNTS).await;
        let shown = serde_json::from_str::<Value>(shown.as_str().unwrap_or("")).ok();
        if shown.as_ref() == Some(want) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}: the page shows {shown:?}, /backends says {want}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

//! The files in contrib/: the Grafana dashboard queries only metrics wsgate
//! exports, the systemd unit verifies, the Kubernetes manifests parse with the
//! expected kinds and probe real admin paths, and the Dockerfile is multi-stage
//! and runs as a non-root user. And a wsgate with nothing to do sleeps.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use common::*;
use yaml_rust2::{Yaml, YamlLoader};

/// Times a thread of the process went to sleep (voluntary context switches),
/// summed over its threads; None where /proc cannot say.
fn sleeps(pid: u32) -> Option<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let status = std::fs::read_to_string(task.ok()?.path().join("status")).ok()?;
        let line = status
            .lines()
            .find(|l| l.starts_with("voluntary_ctxt_switches:"))?;
        total += line.split_whitespace().nth(1)?.parse::<u64>().ok()?;
    }
    Some(total)
}

/// An idle wsgate (no traffic, no drain, no rebalancing, no health checks, no DNS
/// names) is not woken by timers of its own beyond a few a second: each wake-up
/// costs a server full of idle proxies CPU, and a laptop battery. Every wake-up
/// ends in a sleep, so the process's voluntary context switches count them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_wsgate_sleeps() {
    let backend = dead_addr().await;
    let proxy = ProxyProcess::start(&format!(
        "{}{}",
        route("/", "p"),
        pool("p", &[(backend, 1)], "")
    ))
    .await;
    let pid = proxy.pid().expect("running");
    let before = sleeps(pid).expect("/proc/PID/task/*/status");
    // The measurement window (nothing is awaited: the point is that nothing happens).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let woken = sleeps(pid).expect("/proc/PID/task/*/status") - before;
    eprintln!("idle: {woken} wake-ups in 2 s");
    // A 20 ms tick alone would be 100 in this window.
    assert!(woken <= 50, "an idle wsgate woke {woken} times in 2 s");
    drop(proxy);
}

fn contrib(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("contrib")
        .join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

/// Every `wsgate_*` name in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("wsgate_") {
        let start = i + at;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        names.push(expr[start..end].to_string());
        i = end;
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_queries_only_metrics_wsgate_exports() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&contrib("grafana/wsgate.json")).expect("the dashboard is JSON");
    let mut queried = BTreeSet::new();
    let panels = dashboard["panels"].as_array().expect("panels");
    for panel in panels {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("expr");
            queried.extend(metric_names(expr));
        }
    }
    for var in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        queried.extend(metric_names(var["query"].as_str().unwrap_or("")));
    }
    for topic in [
        "wsgate_connections_active",
        "wsgate_upgrades_total",
        "wsgate_closes_total",
        "wsgate_messages_total",
        "wsgate_bytes_total",
        "wsgate_cluster_connections",
        "wsgate_redis_up",
        "wsgate_instances",
    ] {
        assert!(queried.contains(topic), "the dashboard shows {topic}");
    }

    // A session that makes every series exist: Redis, upgrades, a refusal, a
    // backend failure, messages, closes.
    let redis = RedisServer::start().await;
    let backend = EchoBackend::start().await;
    let dead = dead_addr().await;
    let proxy = Proxy::start(&format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[cluster]\nredis = \"{}\"\nheartbeat = \"200ms\"\n{}{}{}{}",
        redis.url(),
        route("/ws", "p"),
        pool("p", &[(backend.addr, 1)], ""),
        route("/dead", "d"),
        pool("d", &[(dead, 1)], "retries = 0\n"),
    ))
    .await;
    let admin = proxy.admin.expect("admin");
    let mut ws = connect(&proxy.url("/ws")).await;
    futures_util::SinkExt::send(&mut ws, tokio_tungstenite::tungstenite::Message::text("hi"))
        .await
        .expect("send");
    next(&mut ws).await;
    futures_util::SinkExt::close(&mut ws).await.expect("close");
    drop(ws);
    let head = raw_request(proxy.addr, upgrade_request("/dead", "").as_bytes()).await;
    assert!(head.starts_with("HTTP/1.1 502"), "{head}");
    let _kept = connect(&proxy.url("/ws")).await;
    let mut missing = queried.clone();
    for _ in 0..100 {
        let (_, metrics) = http_get(admin, "/metrics", "").await;
        missing.retain(|name| {
            !metrics
                .lines()
                .any(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        });
        if missing.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(missing.is_empty(), "queried but not exported: {missing:?}");
}

#[test]
fn the_systemd_unit_verifies_and_covers_the_shutdown_window() {
    let unit = contrib("systemd/wsgate.service");
    let value = |key: &str| {
        unit.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("{key}= in the unit"))
            .to_string()
    };
    assert_eq!(value("ExecReload"), "/bin/kill -HUP $MAINPID");
    assert_eq!(value("KillSignal"), "SIGTERM");
    let stop: u64 = value("TimeoutStopSec")
        .trim_end_matches('s')
        .parse()
        .expect("seconds");
    let defaults = wsgate::Config::parse("[server]\nlisten = [\"127.0.0.1:1\"]\n", "defaults.toml")
        .expect("valid");
    assert!(
        stop > defaults.server.shutdown_timeout.as_secs(),
        "TimeoutStopSec={stop} must cover shutdown_timeout"
    );
    let files: u64 = value("LimitNOFILE").parse().expect("a number");
    assert!(files >= 2 * defaults.server.max_connections as u64 + 64);
    assert!(value("ExecStart").contains("wsgate run --config"));

    // systemd-analyze, where it exists, with the binary path pointed at this build.
    let Ok(probe) = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
    else {
        eprintln!("systemd-analyze is not installed: verify skipped");
        return;
    };
    assert!(probe.status.success());
    let dir = std::env::temp_dir().join(format!("wsgate-unit-{}", fastrand::u64(..)));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("wsgate.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/wsgate", env!("CARGO_BIN_EXE_wsgate")),
    )
    .expect("write");
    let out = std::process::Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .expect("systemd-analyze");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Complaints about this file (not about the host's other units) fail it.
    let about_ours: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("wsgate.service"))
        .collect();
    assert!(about_ours.is_empty(), "systemd-analyze verify:\n{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn docs() -> Vec<Yaml> {
    YamlLoader::load_from_str(&contrib("kubernetes/wsgate.yaml")).expect("the manifests are YAML")
}

fn find<'d>(docs: &'d [Yaml], kind: &str, name: &str) -> &'d Yaml {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("a {kind} named {name}"))
}

#[tokio::test]
async fn the_kubernetes_manifests_have_the_expected_kinds_and_real_probes() {
    let docs = docs();
    let kinds: BTreeSet<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    for kind in ["ConfigMap", "Deployment", "Service", "ServiceMonitor"] {
        assert!(kinds.contains(kind), "{kind} in {kinds:?}");
    }
    // The configuration in the ConfigMap is valid.
    let toml = find(&docs, "ConfigMap", "wsgate")["data"]["proxy.toml"]
        .as_str()
        .expect("proxy.toml");
    let config = wsgate::Config::parse(toml, "configmap.toml").unwrap_or_else(|e| panic!("{e}"));
    assert!(
        config.cluster.redis.is_some(),
        "instances share state through Redis"
    );
    let admin_port = config.admin.listen.expect("an admin listener").port();

    let deployment = find(&docs, "Deployment", "wsgate");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let admin_named = container["ports"]
        .as_vec()
        .expect("ports")
        .iter()
        .find(|p| p["name"].as_str() == Some("admin"))
        .expect("an admin port");
    assert_eq!(
        admin_named["containerPort"].as_i64(),
        Some(i64::from(admin_port))
    );
    let readiness = &container["readinessProbe"]["httpGet"];
    let liveness = &container["livenessProbe"]["httpGet"];
    assert_eq!(readiness["port"].as_str(), Some("admin"));
    assert_eq!(liveness["port"].as_str(), Some("admin"));

    // The probes' paths are real admin paths: they answer on a running wsgate.
    let backend = EchoBackend::start().await;
    let proxy = Proxy::start(&format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n{}{}",
        route("/", "p"),
        pool("p", &[(backend.addr, 1)], "")
    ))
    .await;
    for probe in [readiness, liveness] {
        let path = probe["path"].as_str().expect("path");
        let (status, body) = http_get(proxy.admin.expect("admin"), path, "").await;
        assert_eq!(status, 200, "{path}: {body}");
    }
    assert_eq!(readiness["path"].as_str(), Some("/readyz"));

    // Termination: preStop, then wsgate's own shutdown, within the grace period.
    let grace = pod["terminationGracePeriodSeconds"]
        .as_i64()
        .expect("grace period");
    let pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_i64()
        .expect("a preStop sleep");
    assert!(
        grace as u64 > pre_stop as u64 + config.server.shutdown_timeout.as_secs(),
        "terminationGracePeriodSeconds {grace} must cover preStop {pre_stop} s + shutdown_timeout {:?}",
        config.server.shutdown_timeout
    );
    assert!(config.server.shutdown_spread < config.server.shutdown_timeout);
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(
        deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"].as_str(),
        Some("true")
    );

    // Backends behind a headless Service, named in the pool's dns entry.
    let backends = find(&docs, "Service", "chat-backends");
    assert_eq!(backends["spec"]["clusterIP"].as_str(), Some("None"));
    let dns = &config.pools["chat"].dns;
    assert!(
        dns.iter().any(|d| d.host.starts_with("chat-backends.")),
        "{dns:?}"
    );
    // Redis for the shared state, where the config points.
    find(&docs, "Deployment", "wsgate-redis");
    find(&docs, "Service", "wsgate-redis");
    assert!(
        config
            .cluster
            .redis
            .as_deref()
            .is_some_and(|r| r.contains("wsgate-redis:6379"))
    );
    let monitor = find(&docs, "ServiceMonitor", "wsgate");
    assert_eq!(
        monitor["spec"]["endpoints"][0]["path"].as_str(),
        Some("/metrics")
    );
}

#[test]
fn the_dockerfile_is_multi_stage_and_runs_as_non_root() {
    let dockerfile = contrib("docker/Dockerfile");
    let stages = dockerfile
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .count();
    assert!(stages >= 2, "a build stage and a runtime stage");
    let user = dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("USER "))
        .next_back()
        .expect("a USER");
    assert!(
        !user.starts_with("root") && !user.starts_with('0'),
        "USER {user}"
    );
    // Everything it copies from the repository exists.
    for line in dockerfile
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let parts: Vec<&str> = line.split_whitespace().collect();
        for source in &parts[1..parts.len() - 1] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(source);
            assert!(path.exists(), "COPY {source}: not in the repository");
        }
    }
}

/// A `Cpus_allowed_list` ("0-1,4,6-7") as the CPUs it names.
fn cpu_list(text: &str) -> BTreeSet<usize> {
    text.trim()
        .split(',')
        .filter(|part| !part.is_empty())
        .flat_map(|part| {
            let (a, b) = part.split_once('-').unwrap_or((part, part));
            let (a, b): (usize, usize) = (a.parse().expect("cpu"), b.parse().expect("cpu"));
            a..=b
        })
        .collect()
}

/// The CPUs each thread named `tokio-rt-worker` of `pid` may run on.
fn worker_masks(pid: u32) -> Vec<BTreeSet<usize>> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .is_ok_and(|c| c.trim() == "tokio-rt-worker")
        })
        .filter_map(|t| {
            let status = std::fs::read_to_string(t.path().join("status")).ok()?;
            let line = status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))?;
            Some(cpu_list(line))
        })
        .collect()
}

/// `[server] pin_workers = true`: with one worker per CPU the process may use (this
/// machine's case, unless `TOKIO_WORKER_THREADS` says otherwise), each worker
/// thread is kept on a CPU of its own, every allowed CPU taken once; by default
/// (off), or with the counts apart, every worker may run on every allowed CPU.
#[tokio::test]
async fn workers_are_pinned_one_per_cpu() {
    // The child inherits this process's affinity and environment.
    let allowed: BTreeSet<usize> = wsgate::workers::allowed_cpus().into_iter().collect();
    let workers = wsgate::workers::count();
    let expected: Vec<BTreeSet<usize>> = allowed.iter().map(|&c| BTreeSet::from([c])).collect();
    let backend = EchoBackend::start().await;
    let routes = format!("{}{}", route("/", "p"), pool("p", &[(backend.addr, 1)], ""));
    for pin in [Some(true), None] {
        let setting = pin.map_or(String::new(), |p| format!("pin_workers = {p}\n"));
        let proxy = ProxyProcess::start(&format!("{setting}{routes}")).await;
        let pid = proxy.pid().expect("pid");
        // Through the proxy once, so both workers have run and waited.
        let mut ws = connect(&format!("ws://{}/", proxy.addr)).await;
        futures_util::SinkExt::send(&mut ws, tokio_tungstenite::tungstenite::Message::text("hi"))
            .await
            .expect("send");
        assert_eq!(
            next(&mut ws).await,
            tokio_tungstenite::tungstenite::Message::text("hi")
        );
        let pinned = pin.unwrap_or(false) && workers == allowed.len();
        let mut masks = Vec::new();
        wait_for("the workers' CPUs", Duration::from_secs(10), || {
            masks = worker_masks(pid);
            let mut singles: Vec<BTreeSet<usize>> = masks
                .iter()
                .filter(|m| m.len() == 1 && allowed.len() > 1)
                .cloned()
                .collect();
            singles.sort();
            if pinned {
                singles == expected
            } else {
                singles.is_empty() && masks.contains(&allowed)
            }
        })
        .await;
        assert!(!masks.is_empty(), "no worker threads seen");
        drop(ws);
        drop(proxy);
    }
    // A reload that turns it on says it waits for the next start.
    let running = Proxy::start(&routes).await;
    let text = format!("[server]\nlisten = [\"127.0.0.1:0\"]\npin_workers = true\n{routes}");
    let config = wsgate::Config::parse(&text, "reload.toml").expect("valid");
    let summary = running.gateway.reload(&config).expect("reload");
    assert!(
        summary.contains("server.pin_workers (at the next start)"),
        "{summary}"
    );
}

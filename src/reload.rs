//! Reloads: the one log line that says what a reload changed, and the watch that
//! reloads when the config file changes on disk (debounced: an editor's burst of
//! writes is one reload).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::state::PoolChanges;
use crate::{Chain, Gateway};

/// How long the watch waits for writes to stop before reloading.
const DEBOUNCE: Duration = Duration::from_millis(300);

/// What a reload changed, as one line: `listeners +127.0.0.1:8081 -127.0.0.1:8080,
/// admin.listen 127.0.0.1:9090 -> 127.0.0.1:9091, routes changed, pools +1 -1, ...`.
#[derive(Debug, Default)]
pub struct Summary {
    parts: Vec<String>,
}

impl Summary {
    pub fn new(old: &Config, new: &Config, pools: &PoolChanges) -> Summary {
        let mut parts = Vec::new();
        let added: Vec<String> = new
            .server
            .listen
            .iter()
            .filter(|a| !old.server.listen.contains(a))
            .map(|a| format!("+{a}"))
            .collect();
        let removed: Vec<String> = old
            .server
            .listen
            .iter()
            .filter(|a| !new.server.listen.contains(a))
            .map(|a| format!("-{a}"))
            .collect();
        if !added.is_empty() || !removed.is_empty() {
            parts.push(format!("listeners {}", [added, removed].concat().join(" ")));
        }
        let (o, n) = (&old.server, &new.server);
        // One row per key: its name, before, after (Debug prints numbers and
        // booleans as Display does, durations and lists readably).
        macro_rules! rows {
            ($($key:ident),* $(,)?) => {
                [$((stringify!($key), format!("{:?}", o.$key), format!("{:?}", n.$key))),*]
            };
        }
        let server = rows![
            max_connections_per_ip,
            max_upgrades_per_ip,
            trusted_proxies,
            proxy_protocol,
            strict_frames,
            max_connections,
            handshake_timeout,
            max_header_bytes,
            watch_config,
            shutdown_delay,
            shutdown_spread,
            shutdown_timeout,
        ];
        for (key, before, after) in server {
            if before != after {
                parts.push(format!("server.{key} {before} -> {after}"));
            }
        }
        if old.log != new.log {
            parts.push(format!(
                "log.access {:?} -> {:?}",
                old.log.access, new.log.access
            ));
        }
        if old.admin.listen != new.admin.listen {
            let show =
                |a: Option<std::net::SocketAddr>| a.map_or("off".to_string(), |a| a.to_string());
            parts.push(format!(
                "admin.listen {} -> {}",
                show(old.admin.listen),
                show(new.admin.listen)
            ));
        }
        if old.admin.token != new.admin.token {
            parts.push("admin.token changed".into());
        }
        if old.admin.message_metrics != new.admin.message_metrics {
            parts.push(format!(
                "admin.message_metrics {}",
                new.admin.message_metrics
            ));
        }
        if old.routes != new.routes {
            parts.push(format!(
                "routes {} -> {}",
                old.routes.len(),
                new.routes.len()
            ));
        }
        if pools.pools_added + pools.pools_removed > 0 {
            parts.push(format!(
                "pools +{} -{}",
                pools.pools_added, pools.pools_removed
            ));
        }
        if pools.backends_added + pools.backends_removed > 0 {
            parts.push(format!(
                "backends +{} -{}",
                pools.backends_added, pools.backends_removed
            ));
        }
        if pools.draining > 0 {
            parts.push(format!("draining {}", pools.draining));
        }
        let retuned: Vec<&str> = new
            .pools
            .iter()
            .filter(|(name, p)| {
                old.pools.get(*name).is_some_and(|o| {
                    let mut o = o.clone();
                    o.backends.clone_from(&p.backends);
                    o != **p
                })
            })
            .map(|(name, _)| name.as_str())
            .collect();
        if !retuned.is_empty() {
            parts.push(format!("settings of pool {}", retuned.join(", ")));
        }
        if old.cluster.heartbeat != new.cluster.heartbeat {
            parts.push(format!(
                "cluster.heartbeat {:?} -> {:?}",
                old.cluster.heartbeat, new.cluster.heartbeat
            ));
        }
        Summary { parts }
    }

    /// A key that changed but waits for the next start.
    pub fn restart(&mut self, key: &str) {
        self.parts.push(format!("{key} (at the next start)"));
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.parts.is_empty() {
            f.write_str("no changes")
        } else {
            f.write_str(&self.parts.join(", "))
        }
    }
}

/// Reloads `path` into `gateway` and logs the outcome: what changed, or every
/// error (with file:line:col) and that the running configuration is kept.
pub fn apply_file(gateway: &Gateway, path: &Path, trigger: &str) {
    match gateway.reload_from(path) {
        Ok(summary) => {
            tracing::info!(path = %path.display(), trigger, "configuration reloaded: {summary}")
        }
        Err(e) => tracing::error!(
            path = %path.display(),
            trigger,
            "reload refused, keeping the running configuration:\n{}",
            Chain(&e)
        ),
    }
}

/// Watches `path` (through its folder, so an editor that replaces the file is
/// seen too) and reloads when it changes, while `[server] watch_config` is on,
/// until `stop`.
pub fn watch(
    path: PathBuf,
    gateway: Arc<Gateway>,
    stop: CancellationToken,
) -> notify::Result<tokio::task::JoinHandle<()>> {
    let file = path.clone();
    watch_files(vec![path], stop, move || {
        if gateway.state().load().config.server.watch_config {
            apply_file(&gateway, &file, "file change");
        }
    })
}

/// Calls `changed` when any of `paths` changes on disk (watched through their
/// folders, debounced), until `stop`.
pub fn watch_files(
    paths: Vec<PathBuf>,
    stop: CancellationToken,
    changed: impl Fn() + Send + 'static,
) -> notify::Result<tokio::task::JoinHandle<()>> {
    use notify::Watcher;
    let wake = Arc::new(Notify::new());
    let names: Vec<std::ffi::OsString> = paths
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_os_string()))
        .collect();
    let signal = wake.clone();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let ours = event.is_ok_and(|e| {
            e.paths
                .iter()
                .any(|p| p.file_name().is_some_and(|n| names.iter().any(|w| w == n)))
        });
        if ours {
            // A permit, not a queue: any number of events is one wake-up.
            signal.notify_one();
        }
    })?;
    let mut folders: Vec<PathBuf> = paths
        .iter()
        .map(|p| match p.parent() {
            Some(f) if !f.as_os_str().is_empty() => f.to_path_buf(),
            _ => PathBuf::from("."),
        })
        .collect();
    folders.sort();
    folders.dedup();
    for folder in &folders {
        watcher.watch(folder, notify::RecursiveMode::NonRecursive)?;
    }
    Ok(tokio::spawn(async move {
        // The watcher lives as long as this task.
        let _watcher = watcher;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = wake.notified() => {}
            }
            // Let the writes settle: further events within the pause restart it.
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = wake.notified() => continue,
                    _ = tokio::time::sleep(DEBOUNCE) => break,
                }
            }
            changed();
        }
    }))
}

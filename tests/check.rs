//! `wsgate check`: the shipped proxy.toml is valid, and a broken file gets every
//! error with its position and a non-zero exit.

use std::process::Command;

fn check(path: &std::path::Path) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .args(["check", "--config"])
        .arg(path)
        .output()
        .expect("run wsgate check");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_shipped_proxy_toml_is_valid() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy.toml");
    let (ok, stdout, stderr) = check(&path);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("ok (1 routes, 1 pools, 3 backends)"),
        "{stdout}"
    );
}

#[test]
fn every_error_is_reported_with_file_line_and_column() {
    let dir = std::env::temp_dir().join(format!("wsgate-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("broken.toml");
    std::fs::write(
        &path,
        "[server]\nlisten = [\"127.0.0.1:8080\"]\nlisten_port = 8080\n\n\
         [[route]]\npath = \"/ws\"\npool = \"chta\"\n\n\
         [pool.chat]\nbackends = [{ addr = \"10.0.0.1:notaport\" }]\n",
    )
    .expect("write config");
    let (ok, _, stderr) = check(&path);
    std::fs::remove_dir_all(&dir).ok();
    assert!(!ok, "a broken file must fail the check");
    let file = path.display().to_string();
    for expected in [
        format!("{file}:3:1: server.listen_port: unknown key"),
        format!("{file}:7:8: route[0].pool: no pool named `chta`"),
        format!(
            "{file}:10:22: pool.chat.backends[0].addr: `10.0.0.1:notaport` is not a host:port address"
        ),
    ] {
        assert!(
            stderr.contains(&expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }
    assert!(
        stderr.contains("fix: define [pool.chta], or name one of: chat"),
        "{stderr}"
    );
    assert!(stderr.contains("3 errors"), "{stderr}");
}

#[test]
fn a_missing_file_is_a_clear_error() {
    let (ok, _, stderr) = check(std::path::Path::new("/nonexistent/proxy.toml"));
    assert!(!ok);
    assert!(
        stderr.contains("cannot read /nonexistent/proxy.toml"),
        "{stderr}"
    );
}

/// The commented-out `[cluster]` example in proxy.toml, once uncommented, is valid
/// and means what it says.
#[test]
fn the_documented_cluster_table_is_valid_when_uncommented() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy.toml");
    let text = std::fs::read_to_string(&path).expect("proxy.toml");
    let mut in_cluster = false;
    let uncommented: Vec<String> = text
        .lines()
        .map(|line| {
            if line == "# [cluster]" {
                in_cluster = true;
                return "[cluster]".to_string();
            }
            let is_key = line
                .strip_prefix("# ")
                .and_then(|rest| rest.split_once(" = "))
                .is_some_and(|(k, _)| k.chars().all(|c| c.is_ascii_lowercase() || c == '_'));
            if in_cluster && is_key {
                line[2..].to_string()
            } else {
                line.to_string()
            }
        })
        .collect();
    let config = wsgate::Config::parse(&uncommented.join("\n"), "proxy.toml")
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        config.cluster.redis.as_deref(),
        Some("redis://127.0.0.1:6379")
    );
    assert_eq!(config.cluster.name, "wsgate");
    assert_eq!(config.cluster.instance_id.as_deref(), Some("edge-1"));
    assert_eq!(config.cluster.heartbeat, std::time::Duration::from_secs(1));
}

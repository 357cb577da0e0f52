//! The processes a run needs: echo backends, and each proxy under test started on
//! loopback in front of them, with the process id whose CPU and memory we read.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A child process, killed on drop.
pub struct Process {
    child: Child,
    pub pid: u32,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn spawn(command: &mut Command) -> Process {
    let child = command
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
    Process {
        pid: child.id(),
        child,
    }
}

/// A free loopback port (bound and released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Polls a TCP connect until it succeeds, with a deadline.
pub fn wait_listening(addr: SocketAddr, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} is not listening on {addr}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A folder for one target's files, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("wsgate-bench-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The echo backends: one process (this binary, `echo-server` mode), three ports.
pub fn echo_servers() -> (Process, Vec<SocketAddr>) {
    let exe = std::env::current_exe().expect("own path");
    let mut child = Command::new(exe)
        .args(["echo-server", "3"])
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .expect("start echo servers");
    let stdout = child.stdout.take().expect("stdout");
    let mut addrs = Vec::new();
    for line in BufReader::new(stdout).lines().take(3) {
        let line = line.expect("echo server output");
        addrs.push(line.trim().parse().expect("echo server address"));
    }
    let pid = child.id();
    (Process { child, pid }, addrs)
}

/// One proxy under test.
pub struct Target {
    pub name: &'static str,
    /// Where clients connect: one address, or the backends themselves (direct).
    pub addrs: Vec<SocketAddr>,
    pub process: Option<Process>,
    _scratch: Option<Scratch>,
}

impl Target {
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(|p| p.pid)
    }
}

/// A proxy process started on `port`, once it accepts connections.
fn listening(name: &'static str, port: u16, process: Process, scratch: Option<Scratch>) -> Target {
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    wait_listening(addr, name);
    Target {
        name,
        addrs: vec![addr],
        process: Some(process),
        _scratch: scratch,
    }
}

pub fn direct(backends: &[SocketAddr]) -> Target {
    Target {
        name: "direct",
        addrs: backends.to_vec(),
        process: None,
        _scratch: None,
    }
}

pub fn bare_relay(backends: &[SocketAddr]) -> Target {
    let port = free_port();
    let exe = std::env::current_exe().expect("own path");
    let mut command = Command::new(exe);
    command.arg("bare-relay").arg(format!("127.0.0.1:{port}"));
    for b in backends {
        command.arg(b.to_string());
    }
    let process = spawn(&mut command);
    listening("bare relay", port, process, None)
}

pub fn wsgate(binary: &str, backends: &[SocketAddr]) -> Target {
    let scratch = Scratch::new("wsgate");
    let port = free_port();
    let list: Vec<String> = backends
        .iter()
        .map(|b| format!("{{ addr = \"{b}\" }}"))
        .collect();
    // The access log off, as HAProxy's and NGINX's are in their configurations.
    let config = format!(
        "[server]\nlisten = [\"127.0.0.1:{port}\"]\n[log]\naccess = \"off\"\n\
         [[route]]\npath = \"/\"\npool = \"echo\"\n[pool.echo]\nbackends = [{}]\n",
        list.join(", ")
    );
    let path = scratch.0.join("proxy.toml");
    std::fs::write(&path, config).expect("config");
    let process = spawn(
        Command::new(binary)
            .args(["run", "--config"])
            .arg(&path)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    listening("wsgate", port, process, Some(scratch))
}

/// HAProxy's configuration in front of `backends` (`balance leastconn`, a tunnel
/// timeout), listening on `port` with `bind_options` (e.g. TLS) after the address.
/// `maxconn` keeps its descriptors under the 20,000 allowed.
pub fn haproxy_config(port: u16, bind_options: &str, backends: &[SocketAddr]) -> String {
    let servers: Vec<String> = backends
        .iter()
        .enumerate()
        .map(|(i, b)| format!("    server s{i} {b}"))
        .collect();
    format!(
        "global\n    maxconn 9950\n\
         defaults\n    mode http\n    timeout connect 3s\n    timeout client 60s\n    timeout server 60s\n    timeout tunnel 1h\n\
         frontend fe\n    bind 127.0.0.1:{port}{bind_options}\n    default_backend be\n\
         backend be\n    balance leastconn\n{}\n",
        servers.join("\n")
    )
}

pub fn haproxy(backends: &[SocketAddr]) -> Option<Target> {
    Command::new("haproxy").arg("-v").output().ok()?;
    let scratch = Scratch::new("haproxy");
    let port = free_port();
    let config = haproxy_config(port, "", backends);
    let path = scratch.0.join("haproxy.cfg");
    std::fs::write(&path, config).expect("config");
    let process = spawn(
        Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    Some(listening("haproxy", port, process, Some(scratch)))
}

pub fn nginx(backends: &[SocketAddr]) -> Option<Target> {
    Command::new("nginx").arg("-v").output().ok()?;
    let scratch = Scratch::new("nginx");
    let port = free_port();
    let servers: Vec<String> = backends
        .iter()
        .map(|b| format!("        server {b};"))
        .collect();
    let dir = scratch.0.display().to_string();
    let config = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\nworker_rlimit_nofile 20000;\n\
         pid {dir}/nginx.pid;\nerror_log {dir}/error.log warn;\n\
         events {{ worker_connections 20000; }}\n\
         http {{\n    access_log off;\n\
             client_body_temp_path {dir}/body;\n    proxy_temp_path {dir}/proxy;\n\
             fastcgi_temp_path {dir}/fcgi;\n    uwsgi_temp_path {dir}/uwsgi;\n    scgi_temp_path {dir}/scgi;\n\
             upstream be {{\n        least_conn;\n{}\n    }}\n\
             map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}\n\
             server {{\n        listen 127.0.0.1:{port};\n        location / {{\n\
                     proxy_pass http://be;\n            proxy_http_version 1.1;\n\
                     proxy_set_header Upgrade $http_upgrade;\n\
                     proxy_set_header Connection $connection_upgrade;\n\
                     proxy_read_timeout 3600s;\n            proxy_send_timeout 3600s;\n        }}\n    }}\n}}\n",
        servers.join("\n")
    );
    let path = scratch.0.join("nginx.conf");
    std::fs::write(&path, config).expect("config");
    let process = spawn(
        Command::new("nginx")
            .arg("-p")
            .arg(&scratch.0)
            .arg("-c")
            .arg(&path)
            .arg("-e")
            .arg(scratch.0.join("error.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    Some(listening("nginx", port, process, Some(scratch)))
}

/// utime + stime of a process (all its threads), in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after ") ".
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .map(|(_, f)| f.split(' ').collect())
        .unwrap_or_default();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    ticks / clock_ticks()
}

/// Seconds the machine's CPUs have spent idle (idle and waiting on I/O, summed
/// over all of them) since boot, from `/proc/stat`.
pub fn idle_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: f64 = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .map(|l| {
            // cpu user nice system idle iowait ...
            l.split_whitespace()
                .skip(4)
                .take(2)
                .filter_map(|v| v.parse::<f64>().ok())
                .sum()
        })
        .unwrap_or(0.0);
    ticks / clock_ticks()
}

/// The CPUs `/proc/stat` counts (its `cpuN` lines).
pub fn cpus() -> usize {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    stat.lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .count()
        .max(1)
}

fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Resident memory of a process, in bytes.
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

//! Shared test parts: the proxy started in-process on port 0, echo backends that
//! report what they saw and can be told to misbehave, a raw backend for byte-exact
//! checks, and clients. Readiness is always polled with a deadline.

#![allow(dead_code, clippy::result_large_err)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::CancellationToken;
use wsgate::{Config, Gateway, Listeners};

pub type Ws = WebSocketStream<TcpStream>;

/// Polls `check` every 10 ms until it holds or `limit` passes; panics with `what`.
pub async fn wait_for(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    loop {
        if check() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The proxy, served by `wsgate::Gateway` in this process on 127.0.0.1:0.
pub struct Proxy {
    pub addr: SocketAddr,
    /// The admin listener, when the config has `[admin] listen`.
    pub admin: Option<SocketAddr>,
    /// The first TLS listener, when the config has `[tls] listen`.
    pub tls: Option<SocketAddr>,
    pub gateway: Arc<Gateway>,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Proxy {
    /// `/readyz` status on the admin listener.
    pub async fn ready(&self) -> u16 {
        http_get(self.admin.expect("admin listener"), "/readyz", "")
            .await
            .0
    }

    /// Starts a proxy from a config text; its `[server] listen` is replaced by port 0.
    pub async fn start(config: &str) -> Proxy {
        let text = format!("[server]\nlisten = [\"127.0.0.1:0\"]\n{config}");
        let config = Config::parse(&text, "test.toml").unwrap_or_else(|e| panic!("{e}"));
        let listeners = Listeners::bind(&config).await.expect("bind");
        let addr = listeners.server[0].local_addr().expect("addr");
        let admin = listeners
            .admin
            .as_ref()
            .map(|l| l.local_addr().expect("admin addr"));
        let tls = listeners
            .tls
            .first()
            .map(|l| l.local_addr().expect("tls addr"));
        let gateway = Arc::new(Gateway::new(&config).expect("gateway"));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn({
            let gateway = gateway.clone();
            let shutdown = shutdown.clone();
            async move { gateway.run(listeners, shutdown).await }
        });
        wait_for("the gateway to serve", Duration::from_secs(5), || {
            gateway.is_serving()
        })
        .await;
        Proxy {
            addr,
            admin,
            tls,
            gateway,
            shutdown,
            task: Some(task),
        }
    }

    /// This proxy's count for each backend of `pool`, in config order.
    pub fn counts(&self, pool: &str) -> Vec<u64> {
        self.gateway.state().load().pools[pool]
            .backends
            .iter()
            .map(|b| b.active())
            .collect()
    }

    /// The other instances' counts for each backend of `pool`, as last read.
    pub fn remote(&self, pool: &str) -> Vec<u64> {
        self.gateway.state().load().pools[pool]
            .backends
            .iter()
            .map(|b| b.remote())
            .collect()
    }

    pub async fn wait_remote(&self, pool: &str, expected: &[u64], limit: Duration) {
        let what = format!("remote counts of pool {pool} to be {expected:?}");
        wait_for(&what, limit, || self.remote(pool) == expected).await;
    }

    pub async fn wait_counts(&self, pool: &str, expected: &[u64]) {
        let what = format!("counts of pool {pool} to be {expected:?}");
        wait_for(&what, Duration::from_secs(5), || {
            self.counts(pool) == expected
        })
        .await;
    }

    /// Stops the proxy and waits until it has closed everything.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        let task = self.task.take().expect("running");
        timeout(Duration::from_secs(10), task)
            .await
            .expect("proxy stops in time")
            .expect("proxy task");
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// What an echo backend does with its connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kill {
    /// Drop the sockets: FIN, no close frame.
    Drop,
    /// Reset the sockets (SO_LINGER 0): RST, no close frame.
    Reset,
}

/// A tungstenite echo server on 127.0.0.1:0 that counts what reaches it.
pub struct EchoBackend {
    pub addr: SocketAddr,
    /// TCP connections accepted, handshake or not.
    pub accepted: Arc<AtomicUsize>,
    /// WebSocket connections open now.
    pub open: Arc<AtomicUsize>,
    /// Request targets (path?query) of the open connections.
    pub targets: Arc<Mutex<HashSet<String>>>,
    /// Request headers of the last handshake.
    pub last_request: Arc<Mutex<Option<tungstenite::http::HeaderMap>>>,
    kill: Arc<Mutex<(CancellationToken, Kill)>>,
    stop: CancellationToken,
}

/// Sent to an [`EchoBackend`], it closes the connection itself (code 1000).
pub const CLOSE_PLEASE: &str = "close, please";

impl EchoBackend {
    pub async fn start() -> EchoBackend {
        EchoBackend::start_at("127.0.0.1:0".parse().expect("addr")).await
    }

    /// Starts on a given address (to bring a stopped backend back on its port).
    /// A backend just dropped may still hold the port for a moment: binding is
    /// retried for up to 5 s.
    pub async fn start_at(addr: SocketAddr) -> EchoBackend {
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match TcpListener::bind(addr).await {
                Ok(listener) => break listener,
                Err(e)
                    if e.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("bind backend {addr}: {e}"),
            }
        };
        let addr = listener.local_addr().expect("addr");
        let backend = EchoBackend {
            addr,
            accepted: Arc::default(),
            open: Arc::default(),
            targets: Arc::default(),
            last_request: Arc::default(),
            kill: Arc::new(Mutex::new((CancellationToken::new(), Kill::Drop))),
            stop: CancellationToken::new(),
        };
        let accepted = backend.accepted.clone();
        let open = backend.open.clone();
        let targets = backend.targets.clone();
        let last_request = backend.last_request.clone();
        let kill = backend.kill.clone();
        let stop = backend.stop.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = listener.accept() => match r { Ok(s) => s, Err(_) => continue },
                };
                accepted.fetch_add(1, Ordering::SeqCst);
                let killed = kill.lock().unwrap().0.clone();
                let open = open.clone();
                let targets = targets.clone();
                let last_request = last_request.clone();
                let kill = kill.clone();
                tokio::spawn(async move {
                    let mut target = String::new();
                    let callback = |req: &Request, mut resp: Response| {
                        target = req.uri().to_string();
                        *last_request.lock().unwrap() = Some(req.headers().clone());
                        if let Some(offered) = req.headers().get("sec-websocket-protocol") {
                            // Choose the last protocol offered, to show the choice is ours.
                            let last = offered
                                .to_str()
                                .unwrap_or("")
                                .split(',')
                                .next_back()
                                .unwrap_or("")
                                .trim()
                                .to_string();
                            resp.headers_mut().insert(
                                "sec-websocket-protocol",
                                HeaderValue::from_str(&last).unwrap(),
                            );
                        }
                        Ok(resp)
                    };
                    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await
                    else {
                        return;
                    };
                    targets.lock().unwrap().insert(target.clone());
                    open.fetch_add(1, Ordering::SeqCst);
                    loop {
                        tokio::select! {
                            _ = killed.cancelled() => {
                                let how = kill.lock().unwrap().1;
                                if how == Kill::Reset {
                                    let _ = socket2::SockRef::from(ws.get_ref()).set_linger(Some(Duration::ZERO));
                                }
                                break;
                            }
                            msg = ws.next() => match msg {
                                // The backend's own clean close, on request.
                                Some(Ok(Message::Text(t))) if t.as_str() == CLOSE_PLEASE => {
                                    let _ = ws.close(None).await;
                                }
                                Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => {
                                    if ws.send(m).await.is_err() { break; }
                                }
                                Some(Ok(_)) => {}
                                Some(Err(_)) | None => break,
                            }
                        }
                    }
                    targets.lock().unwrap().remove(&target);
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        backend
    }

    /// Ends every open connection abruptly, without a close frame.
    pub fn kill_all(&self, how: Kill) {
        let mut k = self.kill.lock().unwrap();
        k.1 = how;
        k.0.cancel();
        k.0 = CancellationToken::new();
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    pub fn has_target(&self, target: &str) -> bool {
        self.targets.lock().unwrap().contains(target)
    }
}

impl Drop for EchoBackend {
    fn drop(&mut self) {
        self.stop.cancel();
        self.kill.lock().unwrap().0.cancel();
    }
}

/// An address where nothing listens (a port bound and released).
pub async fn dead_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    listener.local_addr().expect("addr")
}

/// `[pool.NAME]` with the given backends and weights, plus extra keys.
pub fn pool(name: &str, backends: &[(SocketAddr, u32)], extra: &str) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|(a, w)| format!("{{ addr = \"{a}\", weight = {w} }}"))
        .collect();
    format!("[pool.{name}]\nbackends = [{}]\n{extra}\n", list.join(", "))
}

pub fn route(path: &str, pool: &str) -> String {
    format!("[[route]]\npath = \"{path}\"\npool = \"{pool}\"\n")
}

/// A WebSocket client connected through the proxy.
pub async fn connect(url: &str) -> Ws {
    let (ws, _) = connect_with(url, &[]).await;
    ws
}

/// Connects with extra request headers; returns the response too.
pub async fn connect_with(
    url: &str,
    headers: &[(&str, &str)],
) -> (Ws, tungstenite::handshake::client::Response) {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = url.into_client_request().expect("request");
    for (k, v) in headers {
        request.headers_mut().insert(
            tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    let host = request.uri().authority().expect("authority").to_string();
    let tcp = TcpStream::connect(&host).await.expect("connect to proxy");
    timeout(
        Duration::from_secs(5),
        tokio_tungstenite::client_async(request, tcp),
    )
    .await
    .expect("handshake in time")
    .unwrap_or_else(|e| panic!("handshake through the proxy failed: {e}"))
}

/// The next data, ping/pong or close message, with a deadline.
pub async fn next(ws: &mut Ws) -> Message {
    timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("a message in time")
        .expect("stream open")
        .expect("no error")
}

/// Waits for the close frame and returns its code.
pub async fn close_code(ws: &mut Ws, limit: Duration) -> u16 {
    let deadline = Instant::now() + limit;
    for _ in 0..1000 {
        let left = deadline.saturating_duration_since(Instant::now());
        match timeout(left, ws.next()).await {
            Err(_) => panic!("no close frame within {limit:?}"),
            Ok(Some(Ok(Message::Close(Some(frame))))) => return frame.code.into(),
            Ok(Some(Ok(Message::Close(None)))) => return 1005,
            Ok(Some(Ok(_))) => continue,
            Ok(other) => panic!("connection ended without a close frame: {other:?}"),
        }
    }
    panic!("no close frame among 1000 messages")
}

/// Sends raw bytes on a fresh connection and reads the HTTP response head until
/// the blank line (or EOF); returns it as text. Bounded by 5 s.
pub async fn raw_request(addr: SocketAddr, request: &[u8]) -> String {
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(request).await.expect("write request");
    read_head(&mut tcp).await
}

/// A GET with optional extra headers; returns (status, body). Bounded by 5 s.
pub async fn http_get(addr: SocketAddr, path: &str, headers: &str) -> (u16, String) {
    http_request(addr, "GET", path, headers).await
}

/// One HTTP/1.1 request without a body; the status and the body of the answer.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &str,
) -> (u16, String) {
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: 0\r\n{headers}\r\n"
    );
    tcp.write_all(request.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    timeout(Duration::from_secs(5), tcp.read_to_end(&mut raw))
        .await
        .expect("answer in time")
        .expect("read");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

pub async fn read_head(tcp: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(5);
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let left = deadline.saturating_duration_since(Instant::now());
        match timeout(left, tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => head.extend_from_slice(&buf[..n]),
            Err(_) => panic!(
                "no response head in 5 s, got {:?}",
                String::from_utf8_lossy(&head)
            ),
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

pub fn upgrade_request(path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: test.local\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

/// A raw client connection upgraded through the proxy at `addr` on `path` (its
/// 101 read): for byte-exact frames.
pub async fn raw_upgrade(addr: SocketAddr, path: &str) -> TcpStream {
    let mut client = TcpStream::connect(addr).await.expect("connect");
    client
        .write_all(upgrade_request(path, "").as_bytes())
        .await
        .expect("request");
    let head = read_head(&mut client).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    client
}

/// The `Sec-WebSocket-Accept` that answers the key in a raw request head.
pub fn accept_for(head: &str) -> String {
    let key = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("sec-websocket-key")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    tungstenite::handshake::derive_accept_key(key.as_bytes())
}

/// A backend that completes the handshake by hand and hands each connection to the
/// test, for byte-exact checks.
pub struct RawBackend {
    pub addr: SocketAddr,
    pub connections: mpsc::Receiver<(TcpStream, String)>,
}

impl RawBackend {
    /// `response_headers` are added to the 101.
    pub async fn start(response_headers: &'static str) -> RawBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let head = read_head(&mut stream).await;
                let accept = accept_for(&head);
                let response = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                     Sec-WebSocket-Accept: {accept}\r\n{response_headers}\r\n"
                );
                if stream.write_all(response.as_bytes()).await.is_err() {
                    continue;
                }
                if tx.send((stream, head)).await.is_err() {
                    return;
                }
            }
        });
        RawBackend {
            addr,
            connections: rx,
        }
    }

    pub async fn next(&mut self) -> (TcpStream, String) {
        timeout(Duration::from_secs(5), self.connections.recv())
            .await
            .expect("a connection in time")
            .expect("backend running")
    }
}

/// Reads exactly `n` bytes with a deadline.
pub async fn read_exact(tcp: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    timeout(Duration::from_secs(5), tcp.read_exact(&mut buf))
        .await
        .expect("bytes in time")
        .expect("read");
    buf
}

/// One WebSocket frame, masked (client to server) when `mask` is given.
#[allow(unused_imports)]
pub use wsgate::frame::encode as frame;

/// A `redis-server` of the test's own on a free loopback port, killed on drop.
pub struct RedisServer {
    pub port: u16,
    child: Option<tokio::process::Child>,
    dir: std::path::PathBuf,
}

impl RedisServer {
    pub async fn start() -> RedisServer {
        let dir = std::env::temp_dir().join(format!(
            "wsgate-redis-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).expect("redis dir");
        // A port freed just now may be taken again before redis binds it: retry.
        for _ in 0..5 {
            let port = dead_addr().await.port();
            let mut server = RedisServer {
                port,
                child: None,
                dir: dir.clone(),
            };
            server.spawn();
            if server.ready(Duration::from_secs(5)).await {
                return server;
            }
        }
        panic!("redis-server did not start; ./scripts/test installs it when missing");
    }

    fn spawn(&mut self) {
        let child = tokio::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run redis-server ({e}); ./scripts/test installs it when missing")
            });
        self.child = Some(child);
    }

    /// Polls PING until it answers or `limit` passes.
    async fn ready(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(_)) = child.try_wait()
            {
                return false;
            }
            if let Ok(mut conn) = self.try_conn().await
                && redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .is_ok()
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    async fn try_conn(&self) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        let client = redis::Client::open(self.url())?;
        client.get_multiplexed_async_connection().await
    }

    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        self.try_conn().await.expect("connect to the test redis")
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL, and wait until it is gone.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.expect("kill redis");
        }
    }

    /// SIGSTOP when `pause`, else SIGCONT: a stopped Redis accepts but never answers.
    pub fn pause(&self, pause: bool) {
        let pid = self.child.as_ref().and_then(|c| c.id()).expect("running");
        let signal = if pause { "-STOP" } else { "-CONT" };
        let status = std::process::Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Starts again on the same port, empty.
    pub async fn restart(&mut self) {
        self.spawn();
        assert!(
            self.ready(Duration::from_secs(5)).await,
            "redis-server did not restart"
        );
    }

    pub async fn exists(&self, key: &str) -> bool {
        let mut conn = self.conn().await;
        redis::cmd("EXISTS")
            .arg(key)
            .query_async::<bool>(&mut conn)
            .await
            .expect("EXISTS")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The `wsgate` binary as a child process, for tests that must signal or kill it.
pub struct ProxyProcess {
    pub addr: SocketAddr,
    /// The config file it was started with (rewrite it to test the file watch).
    pub path: std::path::PathBuf,
    /// Every line it logged so far.
    pub log: Arc<Mutex<Vec<String>>>,
    child: tokio::process::Child,
    dir: std::path::PathBuf,
}

impl ProxyProcess {
    /// Runs `wsgate run` on a config text (its `[server] listen` is port 0) and
    /// waits, by reading its log, until it listens.
    pub async fn start(config: &str) -> ProxyProcess {
        ProxyProcess::start_limited(config, None).await
    }

    /// As `start`, with the open-files limit of the process set to `fd_limit`.
    pub async fn start_limited(config: &str, fd_limit: Option<u32>) -> ProxyProcess {
        let text = format!("[server]\nlisten = [\"127.0.0.1:0\"]\n{config}");
        ProxyProcess::spawn(&text, fd_limit).await
    }

    /// Runs `wsgate run` on exactly this file text; `addr` is the first address it
    /// logs as listening.
    pub async fn start_file(text: &str) -> ProxyProcess {
        ProxyProcess::spawn(text, None).await
    }

    /// As `start`, with only the soft open-files limit lowered to `soft` (the hard
    /// one stays).
    pub async fn start_soft_limited(config: &str, soft: u32) -> ProxyProcess {
        let text = format!("[server]\nlisten = [\"127.0.0.1:0\"]\n{config}");
        ProxyProcess::spawn_with(&text, Some(soft), "-Sn").await
    }

    /// The process id of the running wsgate.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    async fn spawn(text: &str, fd_limit: Option<u32>) -> ProxyProcess {
        ProxyProcess::spawn_with(text, fd_limit, "-n").await
    }

    async fn spawn_with(text: &str, fd_limit: Option<u32>, flag: &str) -> ProxyProcess {
        use tokio::io::AsyncBufReadExt;
        let dir = std::env::temp_dir().join(format!(
            "wsgate-proc-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("proxy.toml");
        std::fs::write(&path, text).expect("config");
        let limit = fd_limit.map_or_else(|| "unlimited".to_string(), |n| n.to_string());
        let mut child = tokio::process::Command::new("bash")
            .arg("-c")
            .arg("[ \"$2\" = unlimited ] || ulimit \"$3\" \"$2\"; exec \"$0\" run --config \"$1\"")
            .arg(env!("CARGO_BIN_EXE_wsgate"))
            .arg(&path)
            .arg(limit)
            .arg(flag)
            .env(
                "RUST_LOG",
                std::env::var("WSGATE_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start wsgate");
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        let log: Arc<Mutex<Vec<String>>> = Arc::default();
        let addr = timeout(Duration::from_secs(10), async {
            loop {
                let line = lines
                    .next_line()
                    .await
                    .expect("read log")
                    .expect("wsgate exited early");
                log.lock().unwrap().push(line.clone());
                if line.contains("proxy listening")
                    && let Some(rest) = line.split("addr=").nth(1)
                {
                    let addr = rest.split_whitespace().next().unwrap_or("");
                    return addr.parse::<SocketAddr>().expect("listen address in log");
                }
            }
        })
        .await
        .expect("wsgate listens within 10 s");
        // Keep reading the log so the child never blocks on a full pipe.
        let keep = log.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                keep.lock().unwrap().push(line);
            }
        });
        ProxyProcess {
            addr,
            path,
            log,
            child,
            dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// `kill -9`.
    pub async fn kill9(&mut self) {
        self.child.kill().await.expect("kill wsgate");
    }

    /// Sends a signal by name (`HUP`, `TERM`, ...).
    pub fn signal(&self, name: &str) {
        let pid = self.child.id().expect("running");
        let status = std::process::Command::new("kill")
            .args([&format!("-{name}"), &pid.to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{name}");
    }

    /// Log lines that contain `pattern`.
    pub fn logged(&self, pattern: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(pattern))
            .count()
    }

    /// Waits until `n` log lines contain `pattern`.
    /// The address the `what` listener (`admin`, `proxy`) logged, waiting up to 10 s.
    pub async fn listening(&self, what: &str) -> SocketAddr {
        let pattern = format!("{what} listening");
        let found = || {
            self.log.lock().unwrap().iter().find_map(|line| {
                let rest = line
                    .contains(&pattern)
                    .then(|| line.split("addr=").nth(1))??;
                rest.split_whitespace().next()?.parse::<SocketAddr>().ok()
            })
        };
        wait_for(&pattern, Duration::from_secs(10), || found().is_some()).await;
        found().expect("listening address")
    }

    pub async fn wait_logged(&self, pattern: &str, n: usize, limit: Duration) {
        let what = format!("{n} log lines with `{pattern}`");
        wait_for(&what, limit, || self.logged(pattern) >= n).await;
    }

    /// Waits for the process to exit; `None` if it is still running at `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        timeout(limit, self.child.wait())
            .await
            .ok()
            .map(|r| r.expect("wait"))
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A loopback address with a port free a moment ago (to name in a config).
pub async fn free_addr() -> SocketAddr {
    dead_addr().await
}

/// `n` distinct loopback addresses, each with a port free a moment ago: every
/// port is held until all are chosen (ports bound and released one by one may
/// come back twice).
pub async fn free_addrs(n: usize) -> Vec<SocketAddr> {
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        held.push(TcpListener::bind("127.0.0.1:0").await.expect("bind"));
    }
    held.iter().map(|l| l.local_addr().expect("addr")).collect()
}

/// `[cluster]` for a test instance.
pub fn cluster(redis: &str, instance: &str, heartbeat: &str) -> String {
    format!(
        "[cluster]\nredis = \"{redis}\"\nname = \"t\"\ninstance_id = \"{instance}\"\nheartbeat = \"{heartbeat}\"\n"
    )
}

/// A DNS server of the test's own on 127.0.0.1 (UDP): answers every A query with
/// the addresses it is given (TTL 1 s), AAAA with none; during an outage it does
/// not answer at all.
pub struct DnsServer {
    pub addr: SocketAddr,
    /// `None`: an outage.
    answers: Arc<Mutex<Option<Vec<std::net::Ipv4Addr>>>>,
    stop: CancellationToken,
}

impl DnsServer {
    pub async fn start(answers: &[std::net::Ipv4Addr]) -> DnsServer {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind dns");
        let addr = socket.local_addr().expect("addr");
        let server = DnsServer {
            addr,
            answers: Arc::new(Mutex::new(Some(answers.to_vec()))),
            stop: CancellationToken::new(),
        };
        let (answers, stop) = (server.answers.clone(), server.stop.clone());
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            loop {
                let (n, from) = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = socket.recv_from(&mut buf) => match r { Ok(r) => r, Err(_) => continue },
                };
                let current = answers.lock().unwrap().clone();
                let Some(ips) = current else { continue };
                if let Some(reply) = dns_reply(&buf[..n], &ips) {
                    let _ = socket.send_to(&reply, from).await;
                }
            }
        });
        server
    }

    pub fn set(&self, answers: &[std::net::Ipv4Addr]) {
        *self.answers.lock().unwrap() = Some(answers.to_vec());
    }

    /// Stops answering.
    pub fn outage(&self) {
        *self.answers.lock().unwrap() = None;
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The answer to one query: its question back, and an A record per address
/// when it asked for A.
fn dns_reply(query: &[u8], ips: &[std::net::Ipv4Addr]) -> Option<Vec<u8>> {
    if query.len() < 12 {
        return None;
    }
    // The question: labels up to the zero length, then type and class.
    let mut end = 12;
    while *query.get(end)? != 0 {
        end += 1 + usize::from(query[end]);
    }
    let qtype = u16::from_be_bytes([*query.get(end + 1)?, *query.get(end + 2)?]);
    end += 5;
    let answers: &[std::net::Ipv4Addr] = if qtype == 1 { ips } else { &[] };
    let mut out = Vec::with_capacity(end + 16 * answers.len());
    out.extend_from_slice(&query[..2]);
    out.extend_from_slice(&[0x81 | (query[2] & 0x01), 0x80]);
    out.extend_from_slice(&[0, 1]);
    out.extend_from_slice(&(answers.len() as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(query.get(12..end)?);
    for ip in answers {
        out.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 1, 0, 4]);
        out.extend_from_slice(&ip.octets());
    }
    Some(out)
}

/// A backend that speaks plain HTTP and WebSocket on one port, like the
/// frameworks' servers: every answer carries `x-backend: NAME`.
/// `GET /hello` → its name; `POST /echo` → the body streamed back; `GET /hold?ms=N`
/// → answers after N ms (a long poll); an upgrade → a WebSocket echo.
pub struct HttpBackend {
    pub addr: SocketAddr,
    pub name: String,
    /// TCP connections accepted.
    pub accepted: Arc<AtomicUsize>,
    /// Requests (HTTP and upgrades) served.
    pub requests: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl HttpBackend {
    pub async fn start(name: &str) -> HttpBackend {
        use http_body_util::BodyExt;
        use hyper::body::Incoming;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let backend = HttpBackend {
            addr: listener.local_addr().expect("addr"),
            name: name.to_string(),
            accepted: Arc::default(),
            requests: Arc::default(),
            stop: CancellationToken::new(),
        };
        let (accepted, requests, stop) = (
            backend.accepted.clone(),
            backend.requests.clone(),
            backend.stop.clone(),
        );
        let name = name.to_string();
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = listener.accept() => match r { Ok(s) => s, Err(_) => continue },
                };
                accepted.fetch_add(1, Ordering::SeqCst);
                let (name, requests) = (name.clone(), requests.clone());
                tokio::spawn(async move {
                    let service =
                        hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                            let name = name.clone();
                            requests.fetch_add(1, Ordering::SeqCst);
                            let path = req.uri().path().to_string();
                            async move {
                                let mut response = if let Some(key) =
                                    req.headers().get("sec-websocket-key").cloned()
                                {
                                    let accept =
                                        tungstenite::handshake::derive_accept_key(key.as_bytes());
                                    let upgrade = hyper::upgrade::on(&mut req);
                                    tokio::spawn(async move {
                                        if let Ok(upgraded) = upgrade.await {
                                            let mut ws = WebSocketStream::from_raw_socket(
                                                hyper_util::rt::TokioIo::new(upgraded),
                                                tungstenite::protocol::Role::Server,
                                                None,
                                            )
                                            .await;
                                            while let Some(Ok(m)) = ws.next().await {
                                                if (m.is_text() || m.is_binary())
                                                    && ws.send(m).await.is_err()
                                                {
                                                    break;
                                                }
                                            }
                                        }
                                    });
                                    hyper::Response::builder()
                                        .status(101)
                                        .header("upgrade", "websocket")
                                        .header("connection", "Upgrade")
                                        .header("sec-websocket-accept", accept)
                                        .body(
                                            http_body_util::Full::new(bytes::Bytes::new())
                                                .map_err(|never| match never {})
                                                .boxed(),
                                        )
                                        .unwrap()
                                } else {
                                    match (req.method().as_str(), req.uri().path()) {
                                        ("POST", "/echo") => {
                                            hyper::Response::new(req.into_body().boxed())
                                        }
                                        ("GET", "/hold") => {
                                            let ms: u64 = req
                                                .uri()
                                                .query()
                                                .and_then(|q| q.strip_prefix("ms="))
                                                .and_then(|v| v.parse().ok())
                                                .unwrap_or(0);
                                            tokio::time::sleep(Duration::from_millis(ms)).await;
                                            hyper::Response::new(
                                                http_body_util::Full::new(bytes::Bytes::from(
                                                    "held",
                                                ))
                                                .map_err(|never| match never {})
                                                .boxed(),
                                            )
                                        }
                                        _ => hyper::Response::new(
                                            http_body_util::Full::new(bytes::Bytes::from(
                                                name.clone(),
                                            ))
                                            .map_err(|never| match never {})
                                            .boxed(),
                                        ),
                                    }
                                };
                                response
                                    .headers_mut()
                                    .insert("x-backend", HeaderValue::from_str(&name).unwrap());
                                if let Ok(path) = HeaderValue::from_str(&path) {
                                    response.headers_mut().insert("x-path", path);
                                }
                                Ok::<_, hyper::Error>(response)
                            }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .with_upgrades()
                        .await;
                });
            }
        });
        backend
    }
}

impl Drop for HttpBackend {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Upgrades per second: `total` upgrades (open, then close cleanly) over
/// `workers` concurrent clients, worker `w`'s `i`-th to `url(w, i)`.
pub async fn upgrade_rate(
    url: impl Fn(usize, usize) -> String + Send + Sync + 'static,
    total: usize,
    workers: usize,
) -> f64 {
    let url = Arc::new(url);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..workers {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..total / workers {
                let mut ws = connect(&url(w, i)).await;
                ws.close(None).await.expect("close");
                close_code(&mut ws, Duration::from_secs(5)).await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("worker");
    }
    (total / workers * workers) as f64 / started.elapsed().as_secs_f64()
}

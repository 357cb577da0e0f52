//! `wsgate demo`: the whole picture in one process. A proxy with a pool of relay
//! backends that talk through one broker (in memory, or Redis), and a chat page at
//! `/` on the proxy to try it in a browser.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::broker::{BrokerError, MemoryHub};
use super::{Options, RelayBackend};
use crate::{Config, Gateway, Listeners};

/// The chat page, embedded: no build step, no files next to the binary.
pub const PAGE: &str = include_str!("page.html");

#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// The proxy's port on 127.0.0.1 (0: any free port).
    pub port: u16,
    /// The admin listener's port on 127.0.0.1 (0: any free port).
    pub admin_port: u16,
    /// Relay through Redis instead of in memory.
    pub redis: Option<String>,
    pub backends: usize,
    /// Also serve the page and WebSockets over https/wss on this port of
    /// 127.0.0.1 (0: any free port), with a self-signed certificate made at start.
    pub tls_port: Option<u16>,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot listen")]
    Listen(#[from] std::io::Error),
    #[error("pub/sub")]
    Broker(#[from] BrokerError),
    #[error("demo configuration")]
    Config(#[from] crate::ConfigError),
    #[error("the gateway")]
    Gateway(#[from] crate::StartError),
    #[error("making the self-signed certificate")]
    Certificate(#[from] rcgen::Error),
}

/// A running demo.
pub struct Demo {
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub backends: Vec<(RelayBackend, SocketAddr)>,
    pub gateway: Arc<Gateway>,
    pub pubsub: String,
    /// The https listener, with `tls_port`.
    pub tls: Option<SocketAddr>,
    pub done: tokio::task::JoinHandle<()>,
}

impl Demo {
    /// What to open and where to connect, for people.
    pub fn banner(&self) -> String {
        let backends: Vec<String> = self
            .backends
            .iter()
            .map(|(b, addr)| format!("{} on {addr}", b.id()))
            .collect();
        format!(
            "wsgate demo is running\n\
             \n  chat page    http://{proxy}/   (open it in two tabs: they land on different backends)\
             \n  WebSocket    ws://{proxy}/rooms/lobby?user=NAME\
             \n               send any text; {{\"type\":\"whoami\"}} tells which backend you are on\
             \n  backends     {}\
             \n  pub/sub      {}\
             \n  admin        http://{admin}/metrics  /backends  /presence  /readyz{tls}\n\
             \nCtrl-C stops it.",
            backends.join(", "),
            self.pubsub,
            proxy = self.proxy,
            admin = self.admin,
            tls = self.tls.map_or(String::new(), |t| format!(
                "\n  https        https://{t}/   (a self-signed certificate: accept the browser's warning; \
                 WebSockets go over HTTP/2 there)"
            )),
        )
    }
}

/// A `[tls]` section with a self-signed certificate for `localhost` and
/// `127.0.0.1`, written to a temporary folder.
fn self_signed_tls(port: u16) -> Result<String, DemoError> {
    let key = rcgen::KeyPair::generate()?;
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let cert = rcgen::CertificateParams::new(names)?.self_signed(&key)?;
    let dir = std::env::temp_dir().join(format!("wsgate-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (c, k) = (dir.join("demo.pem"), dir.join("demo.key"));
    std::fs::write(&c, cert.pem())?;
    std::fs::write(&k, key.serialize_pem())?;
    Ok(format!(
        "[tls]\nlisten = [\"127.0.0.1:{port}\"]\n[[tls.cert]]\ncert = \"{}\"\nkey = \"{}\"\n",
        c.display(),
        k.display()
    ))
}

/// Starts the backends and the proxy; everything stops when `shutdown` is cancelled.
pub async fn start(options: &DemoOptions, shutdown: CancellationToken) -> Result<Demo, DemoError> {
    let hub = MemoryHub::default();
    let mut backends = Vec::new();
    for i in 1..=options.backends.max(1) {
        let (broker, deliveries) = super::broker::open(options.redis.as_deref(), &hub).await?;
        let backend = RelayBackend::new(Options::new(&format!("backend-{i}")), broker, deliveries);
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(backend.clone().serve(listener, shutdown.clone()));
        backends.push((backend, addr));
    }
    let list: Vec<String> = backends
        .iter()
        .map(|(_, a)| format!("{{ addr = \"{a}\" }}"))
        .collect();
    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:{}\"]\nshutdown_spread = \"1s\"\n\
         [admin]\nlisten = \"127.0.0.1:{}\"\n\
         [[route]]\npath = \"/rooms\"\npool = \"demo\"\nidentity = \"query:user\"\n\
         [pool.demo]\nbackends = [{}]\ndrain_timeout = \"1s\"\ndrain_spread = \"2s\"\n",
        options.port,
        options.admin_port,
        list.join(", ")
    );
    let text = match options.tls_port {
        Some(port) => format!("{text}{}", self_signed_tls(port)?),
        None => text,
    };
    let config = Config::parse(&text, "(demo)")?;
    let listeners = Listeners::bind(&config).await?;
    let proxy = listeners.server[0].local_addr()?;
    let tls = match listeners.tls.first() {
        Some(l) => Some(l.local_addr()?),
        None => None,
    };
    let admin = match &listeners.admin {
        Some(l) => l.local_addr()?,
        None => proxy,
    };
    let gateway = Arc::new(Gateway::new(&config)?.with_page(PAGE));
    let done = tokio::spawn({
        let gateway = gateway.clone();
        async move { gateway.run(listeners, shutdown).await }
    });
    Ok(Demo {
        proxy,
        admin,
        backends,
        gateway,
        pubsub: options
            .redis
            .clone()
            .unwrap_or_else(|| "in memory".to_string()),
        tls,
        done,
    })
}

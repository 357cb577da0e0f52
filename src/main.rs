//! The `wsgate` command: parses the CLI, loads `proxy.toml`, binds, installs signal
//! handlers and hands over to the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use wsgate::backend::broker::{self, MemoryHub};
use wsgate::backend::demo::DemoOptions;
use wsgate::backend::{Options, RelayBackend};
use wsgate::{Config, Gateway, Listeners};

#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options: a background thread gives memory no longer used back to
/// the system within about a second, instead of keeping it for the next peak.
#[cfg(feature = "jemalloc")]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static JEMALLOC_CONF: &[u8] = b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

#[cfg(all(feature = "mimalloc", not(feature = "jemalloc")))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "wsgate",
    version,
    about = "A load-balancing reverse proxy made for WebSockets"
)]
struct Cli {
    /// The configuration file.
    #[arg(long, short, global = true, default_value = "proxy.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the default).
    Run,
    /// Validate the configuration and exit: every error with file:line:col.
    Check,
    /// Run the reference relay backend: rooms at /rooms/NAME relayed over pub/sub.
    Backend {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:9001")]
        listen: std::net::SocketAddr,
        /// Relay through Redis (redis://host:port); without it, in memory (this
        /// process only).
        #[arg(long)]
        redis: Option<String>,
        /// This backend's name (default: backend-PORT).
        #[arg(long)]
        id: Option<String>,
        /// Do not send senders their own messages.
        #[arg(long)]
        no_echo: bool,
        /// Messages queued per client before it is closed (1008) as too slow.
        #[arg(long, default_value_t = 4096)]
        queue: usize,
    },
    /// Run the whole picture on one machine: the proxy, 3 relay backends and a chat
    /// page to try in a browser.
    Demo {
        /// Relay through Redis instead of in memory.
        #[arg(long)]
        redis: Option<String>,
        /// The proxy's port on 127.0.0.1.
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// The admin listener's port on 127.0.0.1 (/metrics, /backends, ...).
        #[arg(long, default_value_t = 9090)]
        admin_port: u16,
        /// Also serve https and wss (HTTP/2 included) on 127.0.0.1:8443 with a
        /// self-signed certificate made at start.
        #[arg(long)]
        tls: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Run);
    if let Command::Check = command {
        return check(&cli.config);
    }
    // Two layers: the log for people (RUST_LOG, default info) and the access log
    // (JSON lines, `[log] access`), each seeing only its own events.
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info".into())
        .add_directive(
            format!("{}=off", wsgate::access::TARGET)
                .parse()
                .expect("a valid directive"),
        );
    let (access, _flush_access_log_at_exit) = wsgate::access::layer();
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_filter(filter),
        )
        .with(access)
        .init();
    let result = match command {
        Command::Check => unreachable!("handled above"),
        Command::Run => run(cli.config),
        Command::Backend {
            listen,
            redis,
            id,
            no_echo,
            queue,
        } => {
            let id = id.unwrap_or_else(|| format!("backend-{}", listen.port()));
            let options = Options {
                id,
                echo: !no_echo,
                queue: queue.max(1),
            };
            runtime().and_then(|rt| rt.block_on(backend(listen, redis, options)))
        }
        Command::Demo {
            redis,
            port,
            admin_port,
            tls,
        } => {
            let options = DemoOptions {
                port,
                admin_port,
                redis,
                backends: 3,
                tls_port: tls.then_some(8443),
            };
            // The demo's proxy runs as `wsgate run` does by default.
            use wsgate::config::defaults::{PIN_WORKERS, YIELD_WHEN_BUSY};
            wsgate::workers::runtime(PIN_WORKERS, YIELD_WHEN_BUSY)
                .context("starting the runtime")
                .and_then(|rt| rt.block_on(demo(options)))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wsgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")
}

/// Until the process ends: SIGINT/SIGTERM cancel `shutdown` (a second one exits at
/// once); SIGHUP calls `reload`, when there is one.
async fn signals(shutdown: CancellationToken, reload: Option<Box<dyn Fn() + Send>>) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut hup), Ok(mut usr1)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
        signal(SignalKind::user_defined1()),
    ) else {
        tracing::error!("cannot install signal handlers; stop wsgate with SIGKILL");
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            _ = hup.recv() => {
                match &reload {
                    Some(reload) => reload(),
                    None => tracing::info!("SIGHUP: nothing to reload"),
                }
                continue;
            }
            _ = usr1.recv() => {
                // logrotate moved the access log: the next line opens it anew.
                wsgate::access::reopen();
                tracing::info!("SIGUSR1: reopening the access log");
                continue;
            }
        }
        if shutdown.is_cancelled() {
            tracing::warn!("second signal: exiting now");
            std::process::exit(130);
        }
        tracing::info!("shutting down");
        shutdown.cancel();
    }
}

async fn backend(
    listen: std::net::SocketAddr,
    redis: Option<String>,
    options: Options,
) -> anyhow::Result<()> {
    let (broker, deliveries) = broker::open(redis.as_deref(), &MemoryHub::default())
        .await
        .context("connecting to redis")?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let shutdown = CancellationToken::new();
    tokio::spawn(signals(shutdown.clone(), None));
    RelayBackend::new(options, broker, deliveries)
        .serve(listener, shutdown)
        .await;
    Ok(())
}

async fn demo(options: DemoOptions) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    tokio::spawn(signals(shutdown.clone(), None));
    let demo = wsgate::backend::demo::start(&options, shutdown)
        .await
        .with_context(|| format!("starting the demo on 127.0.0.1:{}", options.port))?;
    println!("{}", demo.banner());
    demo.done.await.context("the demo proxy failed")?;
    Ok(())
}

fn check(path: &Path) -> ExitCode {
    match Config::load(path) {
        Ok(config) => {
            let backends: usize = config.pools.values().map(|p| p.backends.len()).sum();
            println!(
                "{}: ok ({} routes, {} pools, {} backends)",
                path.display(),
                config.routes.len(),
                config.pools.len(),
                backends
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{}", wsgate::Chain(&e));
            let n = e.problems().len();
            if n > 0 {
                eprintln!(
                    "{}: {n} error{}",
                    path.display(),
                    if n == 1 { "" } else { "s" }
                );
            }
            ExitCode::FAILURE
        }
    }
}

/// Descriptors a process needs besides its connections: listeners, Redis, logs,
/// the config watch, health checks in flight.
const SPARE_DESCRIPTORS: u64 = 64;

/// Raises the soft open-files limit to the hard one, and warns, with the numbers,
/// when `max_connections` proxied connections (two descriptors each) cannot fit.
fn raise_descriptor_limit(max_connections: usize) {
    let needed = (max_connections as u64)
        .saturating_mul(2)
        .saturating_add(SPARE_DESCRIPTORS);
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) if limit < needed => tracing::warn!(
            limit,
            needed,
            max_connections,
            "the open-files limit cannot hold max_connections proxied connections (two descriptors each): \
             past {} connections, accepts and connects fail with EMFILE; lower [server] max_connections \
             or raise the hard limit (ulimit -Hn, systemd LimitNOFILE=)",
            limit.saturating_sub(SPARE_DESCRIPTORS) / 2
        ),
        Ok(limit) => tracing::debug!(limit, "open-files limit"),
        Err(e) => tracing::warn!(error = %e, "cannot read or raise the open-files limit"),
    }
}

fn run(path: PathBuf) -> anyhow::Result<()> {
    let config = Config::load(&path)?;
    wsgate::access::configure(&config.log.access);
    let (pin, yield_when_busy) = (config.server.pin_workers, config.server.yield_when_busy);
    wsgate::workers::runtime(pin, yield_when_busy)
        .context("starting the runtime")?
        .block_on(async move {
            raise_descriptor_limit(config.server.max_connections);
            let listeners = Listeners::bind(&config).await?;
            let gateway = std::sync::Arc::new(Gateway::new(&config)?);
            let shutdown = CancellationToken::new();
            let stop_watch = CancellationToken::new();
            match wsgate::reload::watch(path.clone(), gateway.clone(), stop_watch.clone()) {
                Ok(_) => tracing::debug!(path = %path.display(), "watching the config file"),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch the config file: reload with SIGHUP")
                }
            }
            let reloading = gateway.clone();
            let reload = move || wsgate::reload::apply_file(&reloading, &path, "SIGHUP");
            tokio::spawn(signals(shutdown.clone(), Some(Box::new(reload))));
            gateway.run(listeners, shutdown).await;
            stop_watch.cancel();
            tracing::info!("stopped");
            Ok(())
        })
}

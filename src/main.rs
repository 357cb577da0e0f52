//! The `wsgate` command: parses the CLI, loads `proxy.toml`, binds, installs signal
//! handlers and hands over to the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use wsgate::{Config, Gateway, Listeners};

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::Check => check(&cli.config),
        Command::Run => {
            tracing_subscriber::fmt()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "info".into()),
                )
                .init();
            match run(cli.config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("wsgate: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
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
            eprintln!("{e}");
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

fn run(path: PathBuf) -> anyhow::Result<()> {
    let config = Config::load(&path)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async move {
        let listeners = Listeners::bind(&config).await?;
        let gateway = Gateway::new(&config)?;
        let shutdown = CancellationToken::new();
        tokio::spawn(signals(path, gateway.state().clone(), shutdown.clone()));
        gateway.run(listeners, shutdown).await;
        tracing::info!("stopped");
        Ok(())
    })
}

/// SIGINT/SIGTERM: stop accepting and close every tunnel (1001); a second one exits
/// at once. SIGHUP: reload the configuration; an invalid file keeps the old one.
async fn signals(
    path: PathBuf,
    state: std::sync::Arc<wsgate::state::State>,
    shutdown: CancellationToken,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers; stop wsgate with SIGKILL");
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            _ = hup.recv() => {
                match Config::load(&path) {
                    Ok(config) => {
                        state.reload(&config);
                        tracing::info!(path = %path.display(), "configuration reloaded");
                    }
                    Err(e) => tracing::error!("reload refused, keeping the running configuration:\n{e}"),
                }
                continue;
            }
        }
        if shutdown.is_cancelled() {
            tracing::warn!("second signal: exiting now");
            std::process::exit(130);
        }
        tracing::info!("shutting down: closing tunnels with 1001");
        shutdown.cancel();
    }
}

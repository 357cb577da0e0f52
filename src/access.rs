//! The access log: one JSON line per tunnel at its end and one per refused
//! upgrade, as tracing events of target [`TARGET`], written by a layer of their
//! own (`[log] access = "stderr" | "off" | "PATH"`).
//!
//! Writing never blocks the relay: lines go through a bounded queue to a writer
//! thread (tracing-appender's non-blocking writer); at the bound they are dropped
//! and counted (`wsgate_access_log_dropped_total`). A file is reopened on SIGUSR1
//! (for logrotate) and when a reload names another one.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

use crate::config::AccessLog;

/// The target of access-log events.
pub const TARGET: &str = "wsgate::access";

/// Lines queued for the writer thread; past it they are dropped and counted.
pub const QUEUE_LINES: usize = 65_536;

/// Where lines go now: switched by a reload, reopened by SIGUSR1.
struct Sink {
    target: Mutex<Target>,
    reopen: AtomicBool,
    enabled: AtomicBool,
}

enum Target {
    Stderr,
    Off,
    File { path: PathBuf, file: Option<File> },
}

fn sink() -> &'static Sink {
    static SINK: OnceLock<Sink> = OnceLock::new();
    SINK.get_or_init(|| Sink {
        target: Mutex::new(Target::Stderr),
        reopen: AtomicBool::new(false),
        enabled: AtomicBool::new(true),
    })
}

fn open(path: &PathBuf) -> Option<File> {
    match OpenOptions::new().create(true).append(true).open(path) {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot open the access log");
            None
        }
    }
}

/// Points the access log at `access` (at start, and on every reload).
pub fn configure(access: &AccessLog) {
    let sink = sink();
    let mut target = sink.target.lock().unwrap_or_else(|e| e.into_inner());
    let same_file =
        matches!((&*target, access), (Target::File { path, .. }, AccessLog::File(p)) if path == p);
    if !same_file {
        *target = match access {
            AccessLog::Stderr => Target::Stderr,
            AccessLog::Off => Target::Off,
            AccessLog::File(path) => Target::File {
                path: path.clone(),
                file: open(path),
            },
        };
    }
    sink.enabled
        .store(!matches!(access, AccessLog::Off), Ordering::Relaxed);
}

/// Whether access-log events are wanted at all (checked before they are built).
pub fn enabled() -> bool {
    sink().enabled.load(Ordering::Relaxed)
}

/// SIGUSR1: the file is reopened before the next line (logrotate has moved it).
pub fn reopen() {
    sink().reopen.store(true, Ordering::Relaxed);
}

/// The writer the non-blocking worker thread writes whole lines to.
struct SinkWriter;

impl Write for SinkWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let sink = sink();
        let mut target = sink.target.lock().unwrap_or_else(|e| e.into_inner());
        if sink.reopen.swap(false, Ordering::Relaxed)
            && let Target::File { path, file } = &mut *target
        {
            *file = open(path);
        }
        match &mut *target {
            Target::Stderr => io::stderr().write_all(buf)?,
            Target::Off => {}
            // A file that could not be opened loses its lines (warned once per open).
            Target::File { file, .. } => {
                if let Some(f) = file {
                    f.write_all(buf)?;
                }
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Lines dropped at the queue's bound so far.
static DROPPED: OnceLock<tracing_appender::non_blocking::ErrorCounter> = OnceLock::new();

pub fn dropped() -> u64 {
    DROPPED.get().map_or(0, |c| c.dropped_lines() as u64)
}

/// The layer that writes access-log events as JSON lines, and the guard that
/// flushes what is queued when the process ends (keep it alive until then).
pub fn layer<S>() -> (
    impl tracing_subscriber::Layer<S>,
    tracing_appender::non_blocking::WorkerGuard,
)
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use tracing_subscriber::Layer;
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(QUEUE_LINES)
        .lossy(true)
        .thread_name("wsgate-access-log")
        .finish(SinkWriter);
    let _ = DROPPED.set(writer.error_counter());
    let layer = tracing_subscriber::fmt::layer()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(false)
        .with_target(false)
        .with_level(false)
        .with_writer(writer)
        .with_filter(
            tracing_subscriber::filter::filter_fn(|meta| meta.target() == TARGET && enabled())
                // Access lines are info: without the hint the whole subscriber's
                // would be "anything", and every debug and trace call site of
                // wsgate and its dependencies (the `log` records of mio's
                // included) would be asked and refused one by one at run time.
                .with_max_level_hint(tracing::Level::INFO),
        );
    (layer, guard)
}

//! wsgate's own file descriptors. Running out of them (EMFILE, ENFILE) is
//! wsgate's condition, not a backend's: a connect that fails for it answers the
//! client 503 and leaves the backend's health alone, and an accept that fails for it
//! still answers the waiting client 503 through a spare descriptor kept for the
//! purpose. The condition is logged once per episode and counted.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::metrics as m;

/// Linux's "too many open files" for the process (EMFILE) and the system (ENFILE).
const EMFILE: i32 = 24;
const ENFILE: i32 = 23;

/// An episode ends after this long without running out: the warning goes out once
/// per episode, however the descriptors come and go within it.
const EPISODE_QUIET: Duration = Duration::from_secs(10);

/// When descriptors last ran out, in milliseconds since [`epoch`] (plus one; 0 is never).
static LAST_EXHAUSTED: AtomicU64 = AtomicU64::new(0);

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Whether `e` says wsgate itself is out of descriptors.
pub fn exhausted(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(EMFILE | ENFILE))
}

/// Whether any error in `e`'s chain says so (hyper's client wraps the connect error).
pub fn exhausted_in(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(err) = next {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            // An io::Error wrapping another reports the inner one's source, not
            // the inner one: look inside.
            let inner = io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static));
            if exhausted(io) || inner.is_some_and(exhausted_in) {
                return true;
            }
        }
        next = err.source();
    }
    false
}

/// Counts one operation that failed for lack of descriptors (`at`: `accept`,
/// `connect`, `check`), and warns the first time in an episode.
pub fn note(at: &'static str, error: &dyn std::fmt::Display) {
    metrics::counter!(m::DESCRIPTORS_EXHAUSTED, "at" => at).increment(1);
    let now = epoch().elapsed().as_millis() as u64 + 1;
    let last = LAST_EXHAUSTED.swap(now, Ordering::Relaxed);
    if last == 0 || now - last.min(now) >= EPISODE_QUIET.as_millis() as u64 {
        let (soft, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap_or((0, 0));
        tracing::warn!(
            at,
            error = %error,
            soft_limit = soft,
            hard_limit = hard,
            "wsgate is out of file descriptors: clients get 503 and no backend is blamed until some are free (raise `ulimit -n` or lower [server] max_connections)"
        );
    }
}

/// What a client turned away for lack of descriptors reads.
pub const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: 49\r\n\r\nwsgate is out of file descriptors; retry shortly\n";

/// One descriptor kept in reserve, so that an accept that fails with EMFILE can
/// still take the waiting client and tell it 503 instead of leaving it queued.
/// The refused client's socket, half closed, becomes the next spare: the
/// descriptor never goes back to the process, where another task could take it.
pub struct Spare(Option<OwnedFd>);

impl Spare {
    pub fn new() -> Spare {
        Spare(std::fs::File::open("/dev/null").ok().map(OwnedFd::from))
    }

    /// Frees the spare descriptor, accepts one client on `listener` with it and
    /// answers it 503. False when there was no spare to free (the caller backs off).
    /// True too when no client was waiting: that accept cleared the listener's
    /// readiness, so the next one waits for a client rather than spinning.
    pub async fn refuse_one(&mut self, listener: &tokio::net::TcpListener) -> bool {
        let Some(spare) = self.0.take() else {
            *self = Spare::new();
            return false;
        };
        drop(spare);
        let accepted = tokio::select! {
            biased;
            Ok((stream, _)) = listener.accept() => Some(stream),
            () = std::future::ready(()) => None,
        };
        let Some(stream) = accepted else {
            *self = Spare::new();
            return self.0.is_some();
        };
        self.0 = refuse(stream).await;
        if self.0.is_none() {
            *self = Spare::new();
        }
        true
    }
}

impl Default for Spare {
    fn default() -> Spare {
        Spare::new()
    }
}

/// Answers `stream` 503 and shuts its sending side. What it sent is read first
/// (waiting up to 20 ms for its request to arrive), so that closing does not reset
/// the connection under the answer. Returns its descriptor, to be closed later.
async fn refuse(stream: tokio::net::TcpStream) -> Option<OwnedFd> {
    let _ = tokio::time::timeout(Duration::from_millis(20), stream.readable()).await;
    let mut sink = [0u8; 1024];
    for _ in 0..8 {
        match stream.try_read(&mut sink) {
            Ok(n) if n > 0 => continue,
            _ => break,
        }
    }
    let _ = stream.try_write(REFUSAL);
    let std = stream.into_std().ok()?;
    let _ = std.shutdown(std::net::Shutdown::Write);
    Some(OwnedFd::from(std))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knows_its_own_exhaustion() {
        assert!(exhausted(&io::Error::from_raw_os_error(EMFILE)));
        assert!(exhausted(&io::Error::from_raw_os_error(ENFILE)));
        assert!(!exhausted(&io::Error::from(
            io::ErrorKind::ConnectionRefused
        )));
        let wrapped = io::Error::other(io::Error::from_raw_os_error(EMFILE));
        assert!(exhausted_in(&wrapped));
    }

    #[test]
    fn the_refusal_says_what_its_length_says() {
        let text = std::str::from_utf8(REFUSAL).expect("ascii");
        let (head, body) = text.split_once("\r\n\r\n").expect("a head");
        assert!(head.contains(&format!("content-length: {}", body.len())));
    }
}

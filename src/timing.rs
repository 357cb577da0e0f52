//! Time limits on steps that usually finish at once.
//!
//! Most of an upgrade's timed steps (reading a request that has already arrived,
//! a connect to a backend on the same host, writing a small answer to a socket
//! with room) are done at their first poll. [`tokio::time::timeout`] makes its
//! timer before that poll: a clock read and a reference to the runtime taken and
//! given back for nothing. These poll the step first and make the timer only if it
//! has to wait.

use std::future::Future;
use std::pin::pin;
use std::task::Poll;
use std::time::Duration;

use tokio::time::Instant;

/// `step`'s output, or `None` when it has not finished within `limit`, counted
/// from its first wait.
pub async fn within<F: Future>(limit: Duration, step: F) -> Option<F::Output> {
    let mut step = pin!(step);
    if let Some(done) = first_poll(step.as_mut()).await {
        return Some(done);
    }
    tokio::time::timeout(limit, step).await.ok()
}

/// `step`'s output, or `None` when it has not finished by `deadline`. A step
/// ready at once is taken even after the deadline, as `tokio::time::timeout_at`
/// takes it.
pub async fn by<F: Future>(deadline: Instant, step: F) -> Option<F::Output> {
    let mut step = pin!(step);
    if let Some(done) = first_poll(step.as_mut()).await {
        return Some(done);
    }
    tokio::time::timeout_at(deadline, step).await.ok()
}

/// Polls `step` once: its output if it is done.
async fn first_poll<F: Future>(mut step: std::pin::Pin<&mut F>) -> Option<F::Output> {
    std::future::poll_fn(|cx| match step.as_mut().poll(cx) {
        Poll::Ready(done) => Poll::Ready(Some(done)),
        Poll::Pending => Poll::Ready(None),
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_step_done_at_once_needs_no_timer_and_a_slow_one_is_cut() {
        assert_eq!(within(Duration::ZERO, async { 7 }).await, Some(7));
        let past = Instant::now() - Duration::from_secs(1);
        assert_eq!(by(past, async { 8 }).await, Some(8));
        let slow = tokio::time::sleep(Duration::from_secs(10));
        let started = Instant::now();
        assert_eq!(within(Duration::from_secs(2), slow).await, None);
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        let slow = tokio::time::sleep(Duration::from_secs(10));
        assert_eq!(by(started + Duration::from_secs(5), slow).await, None);
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        // A step that waits once and then finishes in time.
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let _ = tx.send(9);
        });
        assert_eq!(within(Duration::from_secs(3), rx).await, Some(Ok(9)));
    }
}

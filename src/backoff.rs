//! Exponential backoff: the pause after a failure doubles up to a ceiling and
//! starts over after a success. Accept loops, Redis reconnects and the relay
//! backend's subscriptions all use it.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Backoff {
        Backoff {
            first,
            max: max.max(first),
            next: first,
        }
    }

    /// The pause to take now; the one after it is twice as long, up to the ceiling.
    pub fn next_pause(&mut self) -> Duration {
        let pause = self.next;
        self.next = (self.next * 2).min(self.max);
        pause
    }

    /// A success: the next failure pauses for the first pause again.
    pub fn reset(&mut self) {
        self.next = self.first;
    }

    /// Pauses, unless `stop` comes first: false then.
    pub async fn pause(&mut self, stop: &CancellationToken) -> bool {
        let pause = self.next_pause();
        tokio::select! {
            _ = stop.cancelled() => false,
            _ = tokio::time::sleep(pause) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_ceiling_and_resets() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(5), ms(30));
        let pauses: Vec<_> = (0..5).map(|_| b.next_pause()).collect();
        assert_eq!(pauses, vec![ms(5), ms(10), ms(20), ms(30), ms(30)]);
        b.reset();
        assert_eq!(b.next_pause(), ms(5));
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_ends_early_on_stop() {
        let stop = CancellationToken::new();
        let mut b = Backoff::new(Duration::from_secs(60), Duration::from_secs(60));
        assert!(b.pause(&stop).await);
        stop.cancel();
        assert!(!b.pause(&stop).await);
    }
}

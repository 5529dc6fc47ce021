//! Exponential backoff, the one way jetmq waits between attempts.
//!
//! Every loop that tries something again (a JetStream call while the cluster elects a
//! leader, a NATS connection, a compare-and-set that lost a race) keeps a [`Backoff`]:
//! it hands out the pause before the next attempt, doubling from `first` up to `max`, and
//! goes back to `first` on [`Backoff::reset`] once an attempt succeeds.
//!
//! ```
//! use std::time::Duration;
//! use jetmq_common::retry::Backoff;
//!
//! let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
//! assert_eq!(backoff.next_pause(), Duration::from_millis(100));
//! assert_eq!(backoff.next_pause(), Duration::from_millis(200));
//! assert_eq!(backoff.next_pause(), Duration::from_millis(350));
//! backoff.reset();
//! assert_eq!(backoff.next_pause(), Duration::from_millis(100));
//! ```

use std::time::Duration;

/// Pauses that double from `first` up to `max`, optionally spread by a random-ish share.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
    /// Up to this share of a pause is added on top, so that many waiters that failed
    /// together do not all come back in the same millisecond.
    spread: f64,
    attempts: u32,
}

impl Backoff {
    /// A backoff whose first pause is `first` and whose pauses never exceed `max`.
    pub fn new(first: Duration, max: Duration) -> Self {
        Backoff {
            first,
            max,
            next: first.min(max),
            spread: 0.0,
            attempts: 0,
        }
    }

    /// Adds up to `share` (0.0–1.0) of each pause on top of it, taken from the clock's
    /// low bits: spread, not secret.
    pub fn with_spread(mut self, share: f64) -> Self {
        self.spread = share.clamp(0.0, 1.0);
        self
    }

    /// The pause to take before the next attempt; doubles the one after it.
    pub fn next_pause(&mut self) -> Duration {
        let base = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        self.attempts = self.attempts.saturating_add(1);
        if self.spread > 0.0 {
            base + base.mul_f64(self.spread * clock_fraction())
        } else {
            base
        }
    }

    /// Sleeps for [`Backoff::next_pause`].
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next_pause()).await;
    }

    /// Starts again from the first pause (call after an attempt succeeded).
    pub fn reset(&mut self) {
        self.next = self.first.min(self.max);
        self.attempts = 0;
    }

    /// How many pauses were handed out since the start or the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }
}

/// A number in [0, 1) from the clock's sub-second nanoseconds.
fn clock_fraction() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    f64::from(nanos % 1000) / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(250), Duration::from_secs(1));
        let pauses: Vec<u128> = (0..5).map(|_| b.next_pause().as_millis()).collect();
        assert_eq!(pauses, [250, 500, 1000, 1000, 1000]);
        assert_eq!(b.attempts(), 5);
        b.reset();
        assert_eq!(b.attempts(), 0);
        assert_eq!(b.next_pause(), Duration::from_millis(250));
    }

    #[test]
    fn a_first_pause_above_the_cap_is_capped() {
        let mut b = Backoff::new(Duration::from_secs(9), Duration::from_secs(2));
        assert_eq!(b.next_pause(), Duration::from_secs(2));
    }

    #[test]
    fn spread_stays_within_its_share() {
        let mut b =
            Backoff::new(Duration::from_millis(100), Duration::from_millis(100)).with_spread(0.5);
        for _ in 0..100 {
            let pause = b.next_pause();
            assert!(pause >= Duration::from_millis(100), "{pause:?}");
            assert!(pause < Duration::from_millis(150), "{pause:?}");
        }
    }
}

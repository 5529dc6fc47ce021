//! Noticing a stream reader that stopped moving while its stream did not.
//!
//! The node's readers are async-nats ordered push consumers. They rebuild themselves after a
//! reconnect or a sequence gap, but that rebuild can end up waiting forever without an error:
//! once, a NATS node killed a second after the cluster formed left a broker's message reader
//! silent for good while every publish was acknowledged (the brokers were ready, subscribers
//! got nothing). From the outside an idle reader and a stuck one look the same, so the watch
//! compares the reader's position with the stream's last sequence: behind and not moving for
//! a few checks means stuck, and the reader is rebuilt from its own position.

use std::time::Duration;

use async_nats::jetstream::consumer::push;
use async_nats::jetstream::stream::Stream;

/// How often a reader compares its position with the stream's.
pub const CHECK_EVERY: Duration = Duration::from_secs(2);

/// How long a reader waits for its consumer when it (re)opens one. The JetStream API's own
/// timeout is 10 s; during an election a request can hang that long for nothing, and a retry
/// after the election answers in milliseconds.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(4);

/// Checks in a row without progress while behind before the first rebuild (4-6 s).
const BASE_PATIENCE: u32 = 2;

/// Upper bound of the patience after rebuilds that did not help (e.g. the stream's last
/// message was deleted by hand and can never be delivered): one rebuild a minute at most.
/// (The patience doubles like a backoff, but counts checks rather than pausing, so it is
/// not a [`jetmq_common::retry::Backoff`].)
const MAX_PATIENCE: u32 = 30;

#[derive(Debug)]
pub struct StallWatch {
    last_position: u64,
    checks_without_progress: u32,
    patience: u32,
}

impl Default for StallWatch {
    fn default() -> Self {
        StallWatch {
            last_position: 0,
            checks_without_progress: 0,
            patience: BASE_PATIENCE,
        }
    }
}

impl StallWatch {
    /// One check: `position` is the last stream sequence the reader delivered, `stream_last`
    /// the stream's last sequence as the server reports it now. True means: rebuild.
    pub fn is_stuck(&mut self, position: u64, stream_last: u64) -> bool {
        let moved = position != self.last_position;
        self.last_position = position;
        if moved || stream_last <= position {
            // Progress, or nothing to read: a later stall starts with the base patience.
            if moved {
                self.patience = BASE_PATIENCE;
            }
            self.checks_without_progress = 0;
            return false;
        }
        self.checks_without_progress += 1;
        if self.checks_without_progress < self.patience {
            return false;
        }
        self.checks_without_progress = 0;
        self.patience = (self.patience * 2).min(MAX_PATIENCE);
        true
    }
}

/// Creates an ordered push consumer and its message stream within [`OPEN_TIMEOUT`].
///
/// The stream it returns must be dropped after its first error, never polled again. An
/// async-nats 0.51 `Ordered` that has yielded an error may hold a future that already
/// completed: when the client's connection-state channel closes (the client shut down, as
/// at SIGTERM) it yields "Connection state watcher dropped" and keeps the finished watcher,
/// and the next poll panics with "`async fn` resumed after completion" (push.rs:619). A
/// reader that treated that error as transient and read on was the panic seen at shutdown.
/// Every reader of this kind therefore rebuilds its consumer after any error.
pub async fn open_ordered(
    stream: &Stream,
    config: push::OrderedConfig,
) -> anyhow::Result<push::Ordered> {
    let open = async {
        let consumer = stream.create_consumer(config).await?;
        anyhow::Ok(consumer.messages().await?)
    };
    tokio::time::timeout(OPEN_TIMEOUT, open)
        .await
        .map_err(|_| anyhow::anyhow!("no consumer within {OPEN_TIMEOUT:?}"))?
}

impl StallWatch {
    /// One check against the server: an error (to rebuild the reader) when the reader at
    /// `position` is stuck. A server that does not answer in time is no evidence against the
    /// reader: the next tick tries again.
    pub async fn check(&mut self, stream: &Stream, position: u64) -> anyhow::Result<()> {
        if let Some(last) = stream_last_sequence(stream).await {
            if self.is_stuck(position, last) {
                anyhow::bail!("reader stuck at {position} while the stream is at {last}");
            }
        }
        Ok(())
    }
}

/// The stream's last sequence (0 when it holds no message at all: nothing to read), or None
/// when the server does not answer within a check period.
async fn stream_last_sequence(stream: &Stream) -> Option<u64> {
    match tokio::time::timeout(CHECK_EVERY, stream.get_info()).await {
        Ok(Ok(info)) if info.state.messages == 0 => Some(0),
        Ok(Ok(info)) => Some(info.state.last_sequence),
        _ => None,
    }
}

/// A ticker for [`StallWatch`] checks that does not burst after a long pause.
pub fn check_interval() -> tokio::time::Interval {
    let mut interval =
        tokio::time::interval_at(tokio::time::Instant::now() + CHECK_EVERY, CHECK_EVERY);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_reader_that_is_caught_up_is_never_stuck() {
        let mut watch = StallWatch::default();
        for _ in 0..100 {
            assert!(!watch.is_stuck(42, 42));
        }
    }

    #[test]
    fn a_reader_that_keeps_moving_is_never_stuck_even_when_behind() {
        let mut watch = StallWatch::default();
        for step in 1..100u64 {
            assert!(!watch.is_stuck(step * 10, step * 10 + 5_000));
        }
    }

    #[test]
    fn behind_and_not_moving_is_stuck_after_the_patience() {
        let mut watch = StallWatch::default();
        assert!(!watch.is_stuck(7, 7));
        assert!(!watch.is_stuck(7, 10), "one check behind is not enough");
        assert!(watch.is_stuck(7, 10));
    }

    #[test]
    fn rebuilds_that_do_not_help_come_less_often_and_progress_resets_that() {
        let mut watch = StallWatch::default();
        assert!(!watch.is_stuck(5, 5));
        let mut rebuilds_at = Vec::new();
        for check in 1..=40 {
            if watch.is_stuck(5, 9) {
                rebuilds_at.push(check);
            }
        }
        assert_eq!(
            rebuilds_at,
            vec![2, 6, 14, 30],
            "patience 2, 4, 8, 16 checks"
        );
        assert!(!watch.is_stuck(9, 12), "progress");
        assert!(!watch.is_stuck(9, 12));
        assert!(watch.is_stuck(9, 12), "back to the base patience");
    }
}

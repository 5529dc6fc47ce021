//! One publisher's order among its messages published one by one (QoS 2, and QoS 1 when
//! not in batches), each waiting for its own JetStream acknowledgement.
//!
//! A connection keeps up to `receive_maximum` such messages in flight. When JetStream has
//! no stream leader (an election after a NATS node died), each of them is answered "no
//! responders" and sent again after a pause. Without coordination the pauses of the
//! messages ran independently, so a message sent after the election could be stored before
//! an earlier one still pausing (issue 19). [`PublishOrder`] makes a message that must go
//! again wait for the outcome of the publisher's previous message, and holds the
//! publisher's new messages back while any of its messages waits to go again.
//!
//! A message can also be lost without an answer (sent to a stream leader that died): its
//! acknowledgement times out after seconds, while the publisher's later messages may reach
//! the new leader and be stored first. So new messages are also held back while the oldest
//! unanswered one has waited longer than [`SUSPECT_AFTER`]: JetStream answers within
//! milliseconds when it works, and a stream leader election takes seconds, so the messages
//! sent between a silent loss and the hold get "no responders" and wait for it (above).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use futures::future::{FutureExt, Shared};
use parking_lot::Mutex;
use tokio::sync::{oneshot, Notify};

type Outcome = Shared<oneshot::Receiver<bool>>;

/// How long the oldest unanswered message may wait before the publisher's next ones are held.
pub const SUSPECT_AFTER: Duration = Duration::from_secs(1);

/// Per publisher (connection); cheap to clone.
#[derive(Clone, Default)]
pub struct PublishOrder {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Messages of this publisher waiting to be sent again.
    retrying: AtomicUsize,
    /// Woken when `retrying` drops to 0.
    calm: Notify,
    /// The outcome of the publisher's latest message (true: stored).
    last: Mutex<Option<Outcome>>,
    /// Messages sent and not settled: (ticket, sent at), oldest first.
    unsettled: Mutex<VecDeque<(u64, Instant)>>,
    next_ticket: AtomicU64,
}

/// The outcome of the message before this one.
#[derive(Clone)]
pub struct Earlier(Option<Outcome>);

impl Earlier {
    /// Waits until the earlier message is settled: true if it was stored (or there was
    /// none), false if it failed.
    pub async fn stored(self) -> bool {
        match self.0 {
            None => true,
            Some(outcome) => outcome.await.unwrap_or(false),
        }
    }
}

/// Reports this message's outcome to the next one.
pub struct Settle {
    outcome: oneshot::Sender<bool>,
    ticket: u64,
    inner: Arc<Inner>,
}

impl Settle {
    pub fn settle(self, stored: bool) {
        self.inner
            .unsettled
            .lock()
            .retain(|(ticket, _)| *ticket != self.ticket);
        self.inner.calm.notify_waiters();
        // Nobody waits if no later message needed to be sent again.
        let _ = self.outcome.send(stored);
    }
}

/// Held while a message waits to be sent again.
pub struct Retrying(Arc<Inner>);

impl Drop for Retrying {
    fn drop(&mut self) {
        if self.0.retrying.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.calm.notify_waiters();
        }
    }
}

impl PublishOrder {
    /// For a message just sent: the outcome of the one before it, and where to report its
    /// own. Call in the order the messages are sent.
    pub fn take_turn(&self) -> (Earlier, Settle) {
        let (tx, rx) = oneshot::channel();
        let earlier = self.inner.last.lock().replace(rx.shared());
        let ticket = self.inner.next_ticket.fetch_add(1, Ordering::Relaxed);
        self.inner
            .unsettled
            .lock()
            .push_back((ticket, Instant::now()));
        let settle = Settle {
            outcome: tx,
            ticket,
            inner: self.inner.clone(),
        };
        (Earlier(earlier), settle)
    }

    /// Marks a message of this publisher as waiting to be sent again, until dropped.
    pub fn retrying(&self) -> Retrying {
        self.inner.retrying.fetch_add(1, Ordering::SeqCst);
        Retrying(self.inner.clone())
    }

    /// Returns once none of this publisher's messages waits to be sent again and none has
    /// waited for its answer longer than [`SUSPECT_AFTER`].
    pub async fn wait_until_no_retry(&self) {
        loop {
            // Registered before the checks: a settle or a retry ending in between wakes it.
            let calm = self.inner.calm.notified();
            let retrying = self.inner.retrying.load(Ordering::SeqCst) > 0;
            let oldest = self
                .inner
                .unsettled
                .lock()
                .front()
                .map(|(_, sent_at)| *sent_at);
            if !retrying && oldest.is_none_or(|at| at + SUSPECT_AFTER > Instant::now()) {
                return;
            }
            calm.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_message_learns_the_outcome_of_the_one_before_it() {
        let order = PublishOrder::default();
        let (first_earlier, first) = order.take_turn();
        let (second_earlier, second) = order.take_turn();
        let (third_earlier, _third) = order.take_turn();
        assert!(first_earlier.stored().await, "nothing before the first");
        first.settle(true);
        assert!(second_earlier.stored().await);
        second.settle(false);
        assert!(!third_earlier.stored().await);
    }

    #[tokio::test]
    async fn new_messages_wait_while_the_oldest_has_no_answer_for_long() {
        let order = PublishOrder::default();
        let (_, first) = order.take_turn();
        order.wait_until_no_retry().await;
        tokio::time::sleep(SUSPECT_AFTER + Duration::from_millis(20)).await;
        let waiting = tokio::spawn({
            let order = order.clone();
            async move { order.wait_until_no_retry().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "held while the first is suspect");
        first.settle(false);
        tokio::time::timeout(std::time::Duration::from_secs(1), waiting)
            .await
            .expect("released")
            .expect("joined");
    }

    #[tokio::test]
    async fn new_messages_wait_while_one_is_retried() {
        let order = PublishOrder::default();
        order.wait_until_no_retry().await;
        let retrying = order.retrying();
        let waiting = tokio::spawn({
            let order = order.clone();
            async move { order.wait_until_no_retry().await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiting.is_finished());
        drop(retrying);
        tokio::time::timeout(std::time::Duration::from_secs(1), waiting)
            .await
            .expect("released")
            .expect("joined");
    }
}

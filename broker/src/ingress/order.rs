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

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use futures::future::{FutureExt, Shared};
use tokio::sync::{oneshot, Notify};

type Outcome = Shared<oneshot::Receiver<bool>>;

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
pub struct Settle(oneshot::Sender<bool>);

impl Settle {
    pub fn settle(self, stored: bool) {
        // Nobody waits if no later message needed to be sent again.
        let _ = self.0.send(stored);
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
        let earlier = self
            .inner
            .last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .replace(rx.shared());
        (Earlier(earlier), Settle(tx))
    }

    /// Marks a message of this publisher as waiting to be sent again, until dropped.
    pub fn retrying(&self) -> Retrying {
        self.inner.retrying.fetch_add(1, Ordering::SeqCst);
        Retrying(self.inner.clone())
    }

    /// Returns once none of this publisher's messages waits to be sent again.
    pub async fn wait_until_no_retry(&self) {
        loop {
            let calm = self.inner.calm.notified();
            if self.inner.retrying.load(Ordering::SeqCst) == 0 {
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

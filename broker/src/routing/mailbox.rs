//! The queue from the router (and shared-subscription groups) to one connection.
//!
//! A bounded multi-producer, single-consumer queue like `tokio::sync::mpsc`, but one that
//! costs nothing while it is empty: tokio's channel allocates a 32-slot block (1.5 KiB for a
//! `Delivery`) plus a 512-byte, cache-line-padded shared state up front, for every
//! connection, which was a fifth of an idle connection's memory. Here the queue is a
//! `VecDeque` that allocates on the first message and gives its memory back once it has been
//! drained after a burst.
//!
//! The same shared state carries the node's orders to the connection ([`Control`]): a
//! separate channel for those cost another ~600 bytes per connection for two possible values.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};

use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::Notify;

use super::Delivery;

/// Capacity above which a drained queue releases its buffer.
const KEEP_CAPACITY: usize = 16;

/// Orders from the node to one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// The node is draining or shutting down.
    Shutdown = 1,
    /// Another connection took the session over. Outranks `Shutdown` when both are pending.
    TakenOver = 2,
}

const NO_CONTROL: u8 = 0;

struct Shared {
    queue: Mutex<VecDeque<Delivery>>,
    capacity: usize,
    notify: Notify,
    receiver_gone: AtomicBool,
    /// The strongest pending [`Control`], or `NO_CONTROL`.
    control: AtomicU8,
    control_notify: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, VecDeque<Delivery>> {
        // A panic while holding this lock cannot leave the queue half-modified (and
        // parking_lot does not poison the lock).
        self.queue.lock()
    }
}

/// The sending side; cheap to clone.
#[derive(Clone)]
pub struct MailboxSender {
    shared: Arc<Shared>,
}

/// The receiving side, owned by the connection.
pub struct MailboxReceiver {
    shared: Arc<Shared>,
}

/// A queue holding at most `capacity` deliveries.
pub fn mailbox(capacity: usize) -> (MailboxSender, MailboxReceiver) {
    let shared = Arc::new(Shared {
        queue: Mutex::new(VecDeque::new()),
        capacity: capacity.max(1),
        notify: Notify::new(),
        receiver_gone: AtomicBool::new(false),
        control: AtomicU8::new(NO_CONTROL),
        control_notify: Notify::new(),
    });
    (
        MailboxSender {
            shared: shared.clone(),
        },
        MailboxReceiver { shared },
    )
}

impl MailboxSender {
    /// Queues without waiting; `Full` when the connection is `capacity` behind.
    pub fn try_send(&self, delivery: Delivery) -> Result<(), TrySendError<Delivery>> {
        if self.shared.receiver_gone.load(Ordering::Acquire) {
            return Err(TrySendError::Closed(delivery));
        }
        {
            let mut queue = self.shared.lock();
            if queue.len() >= self.shared.capacity {
                return Err(TrySendError::Full(delivery));
            }
            queue.push_back(delivery);
        }
        // notify_one keeps a permit when the receiver is not waiting yet: no lost wake-ups.
        self.shared.notify.notify_one();
        Ok(())
    }

    /// Gives the connection an order; false when it is gone already. Orders do not queue:
    /// the strongest one not yet taken is what the connection sees.
    pub fn order(&self, control: Control) -> bool {
        if self.shared.receiver_gone.load(Ordering::Acquire) {
            return false;
        }
        self.shared
            .control
            .fetch_max(control as u8, Ordering::AcqRel);
        // notify_one keeps a permit if the connection is not waiting right now.
        self.shared.control_notify.notify_one();
        true
    }
}

impl MailboxReceiver {
    /// The next delivery. Cancellation safe: a delivery is taken out only when returned.
    pub async fn recv(&self) -> Delivery {
        loop {
            let notified = self.shared.notify.notified();
            if let Some(delivery) = self.try_recv() {
                return delivery;
            }
            notified.await;
        }
    }

    pub fn try_recv(&self) -> Option<Delivery> {
        let mut queue = self.shared.lock();
        let delivery = queue.pop_front();
        if queue.is_empty() && queue.capacity() > KEEP_CAPACITY {
            *queue = VecDeque::new();
        }
        delivery
    }

    pub fn is_empty(&self) -> bool {
        self.shared.lock().is_empty()
    }

    /// The next order from the node. Cancellation safe: an order is taken only when returned.
    pub async fn control(&self) -> Control {
        loop {
            match self.shared.control.swap(NO_CONTROL, Ordering::AcqRel) {
                x if x == Control::TakenOver as u8 => return Control::TakenOver,
                x if x == Control::Shutdown as u8 => return Control::Shutdown,
                _ => self.shared.control_notify.notified().await,
            }
        }
    }
}

impl Drop for MailboxReceiver {
    fn drop(&mut self) {
        self.shared.receiver_gone.store(true, Ordering::Release);
        // Queued deliveries may hold shared-group acks: release them now, not when the
        // last sender goes.
        self.shared.lock().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::message::tests::delivery;
    use std::time::Duration;

    #[test]
    fn bounded_and_fifo() {
        let (tx, rx) = mailbox(2);
        tx.try_send(delivery(1)).expect("room");
        tx.try_send(delivery(2)).expect("room");
        assert!(matches!(
            tx.try_send(delivery(3)),
            Err(TrySendError::Full(_))
        ));
        assert_eq!(rx.try_recv().map(|d| d.msg.seq), Some(1));
        tx.try_send(delivery(3)).expect("room again");
        assert_eq!(rx.try_recv().map(|d| d.msg.seq), Some(2));
        assert_eq!(rx.try_recv().map(|d| d.msg.seq), Some(3));
        assert!(rx.try_recv().is_none());
        assert!(rx.is_empty());
    }

    #[test]
    fn closed_once_the_receiver_is_gone() {
        let (tx, rx) = mailbox(4);
        drop(rx);
        assert!(matches!(
            tx.try_send(delivery(1)),
            Err(TrySendError::Closed(_))
        ));
    }

    #[test]
    fn drained_queue_gives_memory_back() {
        let (tx, rx) = mailbox(256);
        for seq in 0..200 {
            tx.try_send(delivery(seq)).expect("room");
        }
        while rx.try_recv().is_some() {}
        assert_eq!(rx.shared.lock().capacity(), 0);
    }

    #[tokio::test]
    async fn recv_wakes_on_send_and_survives_cancellation() {
        let (tx, rx) = mailbox(4);
        // A recv dropped while waiting must not lose the next delivery.
        let timed_out = tokio::time::timeout(Duration::from_millis(20), rx.recv()).await;
        assert!(timed_out.is_err());
        let sender = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            tx.try_send(delivery(7)).expect("room");
            tx
        });
        let got = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("woken by the send");
        assert_eq!(got.msg.seq, 7);
        drop(sender.await);
    }

    #[tokio::test]
    async fn orders_arrive_once_and_taken_over_outranks_shutdown() {
        let (tx, rx) = mailbox(4);
        // Waiting and cancelled: the order given afterwards is still seen.
        let timed_out = tokio::time::timeout(Duration::from_millis(20), rx.control()).await;
        assert!(timed_out.is_err());
        assert!(tx.order(Control::Shutdown));
        assert!(tx.order(Control::TakenOver));
        let got = tokio::time::timeout(Duration::from_secs(5), rx.control()).await;
        assert_eq!(got.expect("pending order"), Control::TakenOver);
        // Taken once: nothing is pending any more.
        let again = tokio::time::timeout(Duration::from_millis(20), rx.control()).await;
        assert!(again.is_err());
        let waiter = {
            let tx = tx.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                tx.order(Control::Shutdown)
            })
        };
        let got = tokio::time::timeout(Duration::from_secs(5), rx.control()).await;
        assert_eq!(got.expect("woken by the order"), Control::Shutdown);
        assert!(waiter.await.expect("joined"));
        drop(rx);
        assert!(!tx.order(Control::Shutdown), "the connection is gone");
    }
}

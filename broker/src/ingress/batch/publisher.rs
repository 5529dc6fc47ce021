//! The batch publisher's task and its handle: takes messages from the node's connections,
//! lets the [`Book`] decide what goes on the wire, and feeds it the server's answers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{BatchError, BatchFailure, Book, QueuedPublish, CHANNEL_CAPACITY, RECEIVE_AT_ONCE};

/// The node's batch publisher; cheap to clone.
#[derive(Clone)]
pub struct BatchPublisher {
    tx: mpsc::Sender<QueuedPublish>,
    available: Arc<AtomicBool>,
}

impl BatchPublisher {
    /// Subscribes to the node's batch inbox and starts the publishing task. `max_alone`
    /// (`nats.batch_publish_after`): messages published alone, each with its own ack, that
    /// may be in flight before the task switches to batches; `max_bundle`
    /// (`nats.bundle_max_messages`): most messages per bundle.
    pub async fn start(
        client: async_nats::Client,
        shutdown: CancellationToken,
        metrics: Arc<crate::telemetry::Metrics>,
        max_alone: usize,
        max_bundle: usize,
    ) -> Result<BatchPublisher, async_nats::SubscribeError> {
        let inbox = client.new_inbox();
        let replies = client.subscribe(format!("{inbox}.>")).await?;
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let available = Arc::new(AtomicBool::new(true));
        let mut book = Book::new(inbox, max_alone, available.clone(), metrics);
        book.max_bundle = max_bundle.clamp(1, jetmq_common::envelope::MAX_BUNDLE_MESSAGES);
        let server_limit = client.server_info().max_payload;
        if server_limit > 0 {
            book.max_bundle_bytes = book.max_bundle_bytes.min(server_limit / 2);
        }
        tokio::spawn(run(client, replies, rx, book, shutdown));
        Ok(BatchPublisher { tx, available })
    }

    /// False once the server refused batches: publish one by one instead.
    pub fn is_available(&self) -> bool {
        self.available.load(Ordering::Relaxed)
    }

    /// Hands a message to the batch task (waits while its queue is full). The receiver
    /// resolves when the message is stored or has failed.
    pub async fn submit(
        &self,
        subject: Subject,
        body: Bytes,
        headers: Option<HeaderMap>,
        source: u64,
    ) -> oneshot::Receiver<Result<(), BatchError>> {
        let (done, receiver) = oneshot::channel();
        let message = QueuedPublish {
            subject,
            body,
            headers,
            source,
            done,
            // Set when the batch task takes it: one clock read per handful of messages.
            give_up_at: None,
            taken: 0,
        };
        if let Err(mpsc::error::SendError(message)) = self.tx.send(message).await {
            message.complete(Err(BatchError::Unsupported));
        }
        receiver
    }
}

async fn run(
    client: async_nats::Client,
    mut replies: async_nats::Subscriber,
    mut rx: mpsc::Receiver<QueuedPublish>,
    mut book: Book,
    shutdown: CancellationToken,
) {
    let mut received = Vec::with_capacity(RECEIVE_AT_ONCE);
    loop {
        let now = Instant::now();
        while let Some(wire) = book.next_send(now, rx.is_empty()) {
            let sent = match wire.headers {
                None => {
                    client
                        .publish_with_reply(wire.subject, wire.reply, wire.body)
                        .await
                }
                Some(headers) => {
                    client
                        .publish_with_reply_and_headers(
                            wire.subject,
                            wire.reply,
                            headers,
                            wire.body,
                        )
                        .await
                }
            };
            if let Err(err) = sent {
                book.send_failed(wire.batch, wire.seq, err, now);
            }
        }
        let deadline = book.next_deadline();
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            reply = replies.next() => match reply {
                Some(reply) => book.on_reply(&reply, Instant::now()),
                None => break,
            },
            count = rx.recv_many(&mut received, RECEIVE_AT_ONCE), if book.has_room() => {
                if count == 0 {
                    break;
                }
                book.enqueue(received.drain(..), Instant::now());
            }
            _ = sleep_until(deadline) => book.on_timeout(Instant::now()),
        }
    }
    book.abandon("the node is shutting down");
    rx.close();
    while let Ok(message) = rx.try_recv() {
        message.complete(Err(
            BatchFailure::GivenUp("the node is shutting down").into()
        ));
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

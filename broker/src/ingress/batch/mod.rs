//! QoS 1 messages into JetStream as fast-ingest batches (ADR-50, nats-server 2.14+).
//!
//! Why: with one publish acknowledgement per message, the acknowledgements cost NATS and
//! this node about a third of all the CPU a QoS 1 message takes (measured against a
//! stream with an ordered reader: NATS 14.3 -> 11.4 µs, client 8.2 -> 3.7 µs per message).
//! In a batch, the server confirms every `flow` messages at once.
//!
//! One task per node ([`BatchPublisher`]) publishes every QoS 1 message of the node. Under
//! light load it publishes them one by one, each with its own ack; once `nats.batch_publish_after` are
//! waiting for theirs, it switches to batches until the batches in flight are done. It
//! keeps one batch open while messages keep coming, and commits it as soon as it has
//! nothing more to send and no other commit is waiting for its answer (Nagle's rule): a
//! quiet node gets its confirmation within one round trip, a busy one in batches whose
//! size follows the load. A message counts as stored only when an acknowledgement covers
//! it; a batch that fails (gap, leader change, timeout, "no responders") is published again
//! in a new batch, so a message may be stored twice (QoS 1 allows that), never lost.
//!
//! Inside a batch, queued messages of one topic go out together as one stream message, a
//! *bundle* (up to `nats.bundle_max_messages`; [`jetmq_common::envelope::encode_bundle`]).
//! JetStream's work (storing, the node's reader, every ingestor) is per stream message, and
//! a message only waits in the queue while the task is busy, so bundles grow with the load
//! and cost nothing when there is none. A publisher's messages keep their order: one joins
//! a bundle of an earlier message only if none of that publisher's messages in between went
//! elsewhere.
//!
//! The bookkeeping ([`Book`]) is plain data driven by the task, so its rules are unit
//! tested without a server; `tests/python/test_batch_publish.py` runs it against one.
//!
//! How it is used: the server starts one [`BatchPublisher`] per node
//! ([`BatchPublisher::start`]) and hands it to [`super::Ingress`], which
//! [`BatchPublisher::submit`]s each QoS 1 message and awaits the receiver it gets back.
//!
//! The files: `publisher.rs` is the task and its handle, `book.rs` the state machine
//! ([`Book`]), `bundle.rs` how queued messages are bundled, `reply.rs` the reply subjects
//! and the JetStream answers to them.

use std::sync::Arc;
use std::time::Duration;

use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use tokio::sync::oneshot;
use tokio::time::Instant;

mod book;
mod bundle;
mod publisher;
mod reply;
#[cfg(test)]
mod tests;

use book::Book;
pub use publisher::BatchPublisher;
pub use reply::ApiError;

/// Messages the server should confirm at once; it may choose fewer.
const REQUESTED_FLOW: u64 = 200;
/// Unconfirmed flow windows per batch before the batch is committed and a new one opened.
const WINDOWS_PER_BATCH: u64 = 3;
/// Batches in flight at once (the open one and those committed but not yet confirmed).
const MAX_BATCHES: usize = 4;
/// Messages taken from connections but not yet in a batch.
const MAX_QUEUED: usize = 1024;
/// Capacity of the channel from connections: when full, publishers wait (backpressure).
pub const CHANNEL_CAPACITY: usize = 1024;
/// Messages taken from the channel at once.
const RECEIVE_AT_ONCE: usize = 256;
/// Largest bundle body: far below NATS's default payload limit (1 MiB); a server configured
/// with less gets bundles of at most half its limit.
const MAX_BUNDLE_BYTES: usize = 64 * 1024;
/// Queued messages looked at for one bundle: bounds the work per bundle.
const BUNDLE_SCAN: usize = 512;
/// A batch that got no answer for this long is given up and its messages sent again.
const ACK_TIMEOUT: Duration = Duration::from_secs(4);
/// A message not stored within this time fails: its client is disconnected and retries.
const GIVE_UP_AFTER: Duration = Duration::from_secs(10);
/// Pauses after a refusal or "no responders": doubling from the first to the last.
const BACKOFF_FIRST: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Why a message did not get stored through a batch.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum BatchError {
    /// The server or stream does not do batches: publish the message on its own.
    #[error("batch publishing is not available")]
    Unsupported,
    #[error(transparent)]
    Failed(#[from] BatchFailure),
    /// JetStream has no room for the message (stream or store full, message too large): it
    /// was not stored, and sending it again at once would be refused too.
    #[error("{0}")]
    StoreFull(#[source] ApiError),
}

/// Why a message failed ([`BatchError::Failed`]); cloned to every message it concerns.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BatchFailure {
    /// The NATS client did not send it (too large, or the connection is closed).
    #[error("{0}")]
    NotSent(#[source] Arc<async_nats::client::PublishError>),
    /// JetStream refused it.
    #[error("{0}")]
    Refused(#[source] ApiError),
    /// The node gave it up (not stored in time, an earlier message of its publisher
    /// failed, the node is shutting down): no error underneath.
    #[error("{0}")]
    GivenUp(&'static str),
}

/// Equal when they are the same failure: the same send error, refusal or reason.
impl PartialEq for BatchFailure {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (BatchFailure::NotSent(a), BatchFailure::NotSent(b)) => Arc::ptr_eq(a, b),
            (BatchFailure::Refused(a), BatchFailure::Refused(b)) => a == b,
            (BatchFailure::GivenUp(a), BatchFailure::GivenUp(b)) => a == b,
            _ => false,
        }
    }
}

impl Eq for BatchFailure {}

pub type Completion = oneshot::Sender<Result<(), BatchError>>;

/// One message on its way into a batch.
pub struct QueuedPublish {
    pub subject: Subject,
    pub body: Bytes,
    pub headers: Option<HeaderMap>,
    /// Who published it (a hash of the client id): keeps each publisher's order in bundles.
    pub source: u64,
    pub done: Completion,
    /// Set by [`Book::enqueue`].
    pub give_up_at: Option<Instant>,
    /// Set by [`Book::enqueue`]: the order the node took messages in, which is each
    /// publisher's order. Messages put back after a failure go out again in this order.
    pub taken: u64,
}

impl QueuedPublish {
    fn complete(self, result: Result<(), BatchError>) {
        // The connection may be gone; nobody is waiting then.
        let _ = self.done.send(result);
    }
}

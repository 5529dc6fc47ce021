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

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::{HeaderMap, StatusCode, Subject};
use bytes::Bytes;
use futures::StreamExt;
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::order::SUSPECT_AFTER;

/// Messages the server should confirm at once; it may choose fewer.
const REQUESTED_FLOW: u64 = 200;
/// Unconfirmed flow windows per batch before the batch is committed and a new one opened.
const WINDOWS_PER_BATCH: u64 = 3;
/// Batches in flight at once (the open one and those committed but not yet confirmed).
const MAX_BATCHES: usize = 4;
// Messages published one by one (each with its own ack) in flight before the node switches
// to batches: `nats.batch_publish_after`. A batch costs three extra operations (its start
// answer, the commit, the final ack), so it only pays once several messages share one round
// trip; under light load (10k clients at 1 msg/s each: about five in flight) singles are
// faster and cheaper.
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
const BACKOFF_FIRST: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// JetStream API error: the stream does not allow batch publishing.
const ERR_BATCH_DISABLED: u64 = 10205;

/// Why a message did not get stored through a batch.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum BatchError {
    /// The server or stream does not do batches: publish the message on its own.
    #[error("batch publishing is not available")]
    Unsupported,
    #[error("{0}")]
    Failed(String),
    /// JetStream has no room for the message (stream or store full, message too large): it
    /// was not stored, and sending it again at once would be refused too.
    #[error("{0}")]
    StoreFull(String),
}

pub type Completion = oneshot::Sender<Result<(), BatchError>>;

/// One message on its way into a batch.
pub struct Outgoing {
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

impl Outgoing {
    fn complete(self, result: Result<(), BatchError>) {
        // The connection may be gone; nobody is waiting then.
        let _ = self.done.send(result);
    }
}

/// The node's batch publisher; cheap to clone.
#[derive(Clone)]
pub struct BatchPublisher {
    tx: mpsc::Sender<Outgoing>,
    available: Arc<AtomicBool>,
}

impl BatchPublisher {
    /// Subscribes to the node's batch inbox and starts the publishing task.
    pub async fn start(
        client: async_nats::Client,
        shutdown: CancellationToken,
        metrics: Arc<crate::telemetry::Metrics>,
        singles_before_batching: usize,
        max_bundle: usize,
    ) -> Result<BatchPublisher, async_nats::SubscribeError> {
        let inbox = client.new_inbox();
        let replies = client.subscribe(format!("{inbox}.>")).await?;
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let available = Arc::new(AtomicBool::new(true));
        let mut book = Book::new(inbox, available.clone(), metrics);
        book.max_singles = singles_before_batching;
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
        let message = Outgoing {
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
    mut rx: mpsc::Receiver<Outgoing>,
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
                book.send_failed(wire.batch, wire.seq, &err.to_string(), now);
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
        message.complete(Err(BatchError::Failed("the node is shutting down".into())));
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// What the server is asked to do with a message (the `$FI` reply subject's operation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Start = 0,
    Append = 1,
    /// Commit without storing this (empty) message.
    CommitEndOfBatch = 3,
}

/// One message for the wire; `reply` tells the server its batch, sequence and operation.
#[derive(Debug)]
struct Wire {
    batch: u64,
    seq: u64,
    subject: Subject,
    reply: String,
    body: Bytes,
    headers: Option<HeaderMap>,
}

struct Batch {
    number: u64,
    /// Token in the reply subject that names this batch (unique across nodes).
    id: String,
    first_subject: Subject,
    /// Sequence the next message of this batch gets; the first is 1.
    next_seq: u64,
    /// Every message up to this sequence is stored.
    acked: u64,
    /// Messages per acknowledgement, as the server dictates.
    flow: u64,
    unacked: VecDeque<(u64, Outgoing)>,
    committed: bool,
    /// Since the last answer (or the first message): for [`ACK_TIMEOUT`].
    waiting_since: Instant,
}

impl Batch {
    /// As many messages unconfirmed as the server wants at most.
    fn full(&self) -> bool {
        self.next_seq > self.acked + self.flow * WINDOWS_PER_BATCH
    }

    /// Fails the message(s) sent as `seq` (a bundle is several).
    fn fail_seq(&mut self, seq: u64, error: &str) {
        let (failed, kept): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut self.unacked)
            .into_iter()
            .partition(|(s, _)| *s == seq);
        self.unacked = kept;
        for (_, message) in failed {
            message.complete(Err(BatchError::Failed(error.to_owned())));
        }
    }

    /// Completes every message up to `seq`; returns how many.
    fn confirm(&mut self, seq: u64, now: Instant) -> u64 {
        if seq <= self.acked {
            return 0;
        }
        self.acked = seq;
        self.waiting_since = now;
        let mut confirmed = 0;
        while self.unacked.front().is_some_and(|(s, _)| *s <= seq) {
            if let Some((_, message)) = self.unacked.pop_front() {
                message.complete(Ok(()));
                confirmed += 1;
            }
        }
        confirmed
    }
}

/// A message published on its own; its reply subject is `<inbox>._s<id>`.
struct Single {
    id: u64,
    message: Outgoing,
    sent_at: Instant,
}

/// Reply-subject token prefix of singles; batch ids are alphanumeric, so they never match.
const SINGLE_TOKEN: &str = "_s";

/// What to do after a batch was given up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// Lost on the way (gap, timeout): send again at once.
    Resend,
    /// Refused, or no stream leader right now: wait a little before the next batch.
    BackOff,
}

/// What the server answers on a batch's reply subjects.
#[derive(Debug, Deserialize)]
struct Reply {
    #[serde(rename = "type")]
    kind: Option<String>,
    seq: Option<u64>,
    msgs: Option<u64>,
    count: Option<u64>,
    error: Option<ApiError>,
}

#[derive(Debug, Deserialize)]
struct ApiError {
    code: Option<u16>,
    err_code: Option<u64>,
    description: Option<String>,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (error {})",
            self.description.as_deref().unwrap_or("JetStream error"),
            self.err_code.unwrap_or(0)
        )
    }
}

/// The batch publisher's state: the queue, the batches in flight and what to send next.
struct Book {
    inbox: String,
    /// Prefix of this node's batch ids: the inbox's unique token.
    node_tag: String,
    next_number: u64,
    queue: VecDeque<Outgoing>,
    /// Oldest first; only the last one may be open (not committed).
    batches: VecDeque<Batch>,
    /// Messages published on their own, waiting for their acks (oldest first).
    singles: VecDeque<Single>,
    next_single: u64,
    max_singles: usize,
    /// Most messages per bundle; 1: none.
    max_bundle: usize,
    max_bundle_bytes: usize,
    backoff: Duration,
    resume_at: Option<Instant>,
    /// Next [`Outgoing::taken`].
    next_taken: u64,
    available: Arc<AtomicBool>,
    metrics: Arc<crate::telemetry::Metrics>,
}

impl Book {
    fn new(
        inbox: String,
        available: Arc<AtomicBool>,
        metrics: Arc<crate::telemetry::Metrics>,
    ) -> Book {
        let node_tag = inbox.rsplit('.').next().unwrap_or_default().to_owned();
        Book {
            inbox,
            node_tag,
            next_number: 1,
            queue: VecDeque::new(),
            batches: VecDeque::new(),
            singles: VecDeque::new(),
            next_single: 1,
            max_singles: 32,
            max_bundle: 1,
            max_bundle_bytes: MAX_BUNDLE_BYTES,
            backoff: BACKOFF_FIRST,
            resume_at: None,
            next_taken: 1,
            available,
            metrics,
        }
    }

    fn has_room(&self) -> bool {
        self.queue.len() < MAX_QUEUED
    }

    fn enqueue(&mut self, messages: impl Iterator<Item = Outgoing>, now: Instant) {
        if !self.available.load(Ordering::Relaxed) {
            for message in messages {
                message.complete(Err(BatchError::Unsupported));
            }
            return;
        }
        let give_up_at = Some(now + GIVE_UP_AFTER);
        let next_taken = &mut self.next_taken;
        self.queue.extend(messages.map(|mut m| {
            m.give_up_at = m.give_up_at.or(give_up_at);
            m.taken = *next_taken;
            *next_taken += 1;
            m
        }));
    }

    fn open_batch(&self) -> Option<&Batch> {
        self.batches.back().filter(|b| !b.committed)
    }

    /// The body to send for `first`: its own, or a bundle of it and the queued messages
    /// that may go with it (taken out of the queue and returned).
    fn bundle(&mut self, first: &Outgoing, now: Instant) -> (Bytes, Vec<Outgoing>) {
        let companions = self.take_companions(first, now);
        if companions.is_empty() {
            return (first.body.clone(), companions);
        }
        let bodies = std::iter::once(first)
            .chain(&companions)
            .map(|m| &m.body[..]);
        match jetmq_common::envelope::encode_bundle(bodies) {
            Ok(body) => {
                self.metrics.publish_bundles.inc();
                self.metrics
                    .publish_bundled_messages
                    .add(companions.len() as u64 + 1);
                (body, companions)
            }
            Err(err) => {
                // Not within the bounds take_companions keeps; should it happen, the
                // companions go later on their own.
                tracing::warn!(error = %err, "bundle not built");
                for companion in companions.into_iter().rev() {
                    self.queue.push_front(companion);
                }
                (first.body.clone(), Vec::new())
            }
        }
    }

    /// Queued messages that may share a stream message with `first`: same subject, no
    /// headers, and no message of the same publisher skipped before them (its order).
    fn take_companions(&mut self, first: &Outgoing, now: Instant) -> Vec<Outgoing> {
        let mut companions = Vec::new();
        if self.max_bundle <= 1 || first.headers.is_some() || self.queue.is_empty() {
            return companions;
        }
        let mut bytes = 1 + 4 + first.body.len();
        let mut skipped_sources: Vec<u64> = Vec::new();
        let mut rest = VecDeque::with_capacity(self.queue.len());
        let mut scanned = 0;
        while let Some(message) = self.queue.pop_front() {
            scanned += 1;
            let joins = message.subject == first.subject
                && message.headers.is_none()
                && message.give_up_at.is_none_or(|at| at > now)
                && bytes + 4 + message.body.len() <= self.max_bundle_bytes
                && !skipped_sources.contains(&message.source);
            if joins {
                bytes += 4 + message.body.len();
                companions.push(message);
            } else {
                if !skipped_sources.contains(&message.source) {
                    skipped_sources.push(message.source);
                }
                rest.push_back(message);
            }
            if companions.len() + 1 >= self.max_bundle || scanned >= BUNDLE_SCAN {
                break;
            }
        }
        rest.append(&mut self.queue);
        self.queue = rest;
        companions
    }

    /// The next message to put on the wire, if any. `input_idle`: no connection has
    /// anything waiting, so the open batch may be committed.
    fn next_send(&mut self, now: Instant, input_idle: bool) -> Option<Wire> {
        if self.resume_at.is_some_and(|at| now < at) {
            return None;
        }
        self.resume_at = None;
        if self.suspect(now) {
            // Something sent a while ago has no answer: it may have been lost with a stream
            // leader, and what goes out now could reach the next leader and be stored before
            // it. Nothing new goes until it is answered or times out (and then everything
            // goes again in order); an open batch is committed so that the server answers.
            return self.commit_open(now);
        }
        while let Some(message) = self.queue.pop_front() {
            if message.give_up_at.is_some_and(|at| at <= now) {
                self.give_up(message);
                continue;
            }
            if self.batches.is_empty() && self.singles.len() < self.max_singles {
                let id = self.next_single;
                self.next_single += 1;
                let wire = Wire {
                    batch: 0,
                    seq: id,
                    subject: message.subject.clone(),
                    reply: single_reply(&self.inbox, id),
                    body: message.body.clone(),
                    headers: message.headers.clone(),
                };
                self.singles.push_back(Single {
                    id,
                    message,
                    sent_at: now,
                });
                return Some(wire);
            }
            if self.open_batch().is_some_and(Batch::full) {
                self.queue.push_front(message);
                return self.commit_open(now);
            }
            if self.open_batch().is_none() {
                if self.batches.len() >= MAX_BATCHES {
                    self.queue.push_front(message);
                    return None;
                }
                let number = self.next_number;
                self.next_number += 1;
                self.batches.push_back(Batch {
                    number,
                    id: format!("{}{number:x}", self.node_tag),
                    first_subject: message.subject.clone(),
                    next_seq: 1,
                    acked: 0,
                    flow: REQUESTED_FLOW,
                    unacked: VecDeque::new(),
                    committed: false,
                    waiting_since: now,
                });
            }
            let (body, companions) = self.bundle(&message, now);
            let batch = self.batches.back_mut()?;
            let seq = batch.next_seq;
            batch.next_seq += 1;
            let op = if seq == 1 { Op::Start } else { Op::Append };
            let wire = Wire {
                batch: batch.number,
                seq,
                subject: message.subject.clone(),
                reply: reply_subject(&self.inbox, batch, seq, op),
                body,
                headers: message.headers.clone(),
            };
            batch.unacked.push_back((seq, message));
            batch
                .unacked
                .extend(companions.into_iter().map(|companion| (seq, companion)));
            return Some(wire);
        }
        // Nothing queued: commit the open batch once nothing else is coming and no other
        // commit is still waiting for its answer.
        let others_waiting = self.batches.len() > 1;
        if input_idle && !others_waiting && self.open_batch().is_some() {
            return self.commit_open(now);
        }
        None
    }

    /// The oldest single or batch in flight has had no answer for [`SUSPECT_AFTER`].
    /// JetStream answers within milliseconds when it works, and a stream leader election
    /// takes seconds: messages sent between a silent loss and this hold find no leader and
    /// fail, which puts everything back in order ([`Book::requeue_in_flight`]).
    fn suspect(&self, now: Instant) -> bool {
        let single = self
            .singles
            .front()
            .is_some_and(|single| single.sent_at + SUSPECT_AFTER <= now);
        single
            || self.batches.iter().any(|batch| {
                !batch.unacked.is_empty() && batch.waiting_since + SUSPECT_AFTER <= now
            })
    }

    fn commit_open(&mut self, now: Instant) -> Option<Wire> {
        let inbox = &self.inbox;
        let batch = self.batches.back_mut().filter(|b| !b.committed)?;
        batch.committed = true;
        let seq = batch.next_seq;
        batch.next_seq += 1;
        if batch.unacked.is_empty() {
            batch.waiting_since = now;
        }
        Some(Wire {
            batch: batch.number,
            seq,
            subject: batch.first_subject.clone(),
            reply: reply_subject(inbox, batch, seq, Op::CommitEndOfBatch),
            body: Bytes::new(),
            headers: None,
        })
    }

    /// The client refused to send a message (too large, or the connection is closed).
    fn send_failed(&mut self, batch: u64, seq: u64, error: &str, now: Instant) {
        tracing::warn!(batch, seq, error, "batch publish: message not sent");
        if batch == 0 {
            if let Some(at) = self.singles.iter().position(|single| single.id == seq) {
                if let Some(single) = self.singles.remove(at) {
                    self.fail_with_publisher(single.message, error);
                }
            }
            return;
        }
        let Some(index) = self.batches.iter().position(|b| b.number == batch) else {
            return;
        };
        if let Some(batch) = self.batches.get_mut(index) {
            batch.fail_seq(seq, error);
        }
        self.fail(index, Failure::Resend, now);
    }

    fn on_reply(&mut self, reply: &async_nats::Message, now: Instant) {
        if let Some(id) = self.single_of(reply.subject.as_str()) {
            self.on_single_reply(id, reply, now);
            return;
        }
        let Some(index) = self.batch_of(reply.subject.as_str()) else {
            // A batch already given up or finished: nothing waits for it.
            return;
        };
        if let Some(status) = reply.status {
            if status == StatusCode::NO_RESPONDERS {
                tracing::debug!("batch publish: no stream leader; retrying");
                self.fail(index, Failure::BackOff, now);
            } else {
                tracing::warn!(%status, "batch publish: unexpected status; publishing again");
                self.fail(index, Failure::BackOff, now);
            }
            return;
        }
        let parsed: Reply = match serde_json::from_slice(&reply.payload) {
            Ok(parsed) => parsed,
            Err(err) => {
                tracing::warn!(error = %err, "batch publish: unreadable answer; publishing again");
                self.fail(index, Failure::Resend, now);
                return;
            }
        };
        self.on_answer(index, parsed, now);
    }

    fn on_answer(&mut self, index: usize, reply: Reply, now: Instant) {
        match (reply.kind.as_deref(), reply.error) {
            (Some("ack"), _) => {
                let Some(batch) = self.batches.get_mut(index) else {
                    return;
                };
                if let Some(flow) = reply.msgs.filter(|f| *f > 0) {
                    batch.flow = flow.min(REQUESTED_FLOW);
                }
                batch.waiting_since = now;
                let confirmed = batch.confirm(reply.seq.unwrap_or(0), now);
                self.metrics.publish_batched_messages.add(confirmed);
                self.backoff = BACKOFF_FIRST;
            }
            (Some("gap"), _) => {
                // Gap mode "fail": the server stopped storing this batch; its final answer
                // says how far it got, but the messages are simply sent again.
                tracing::warn!("batch publish: the server missed a message; publishing again");
                self.fail(index, Failure::Resend, now);
            }
            (Some(_), Some(error)) | (None, Some(error)) => {
                if error.err_code == Some(ERR_BATCH_DISABLED) {
                    tracing::warn!(%error, "the message stream does not allow batch publishing; QoS 1 is published one message at a time");
                    self.available.store(false, Ordering::Relaxed);
                    self.abandon_with(BatchError::Unsupported);
                    return;
                }
                if error
                    .err_code
                    .is_some_and(jetmq_common::streams::is_store_full)
                {
                    self.refuse_batch(index, &error.to_string(), now);
                    return;
                }
                if let (Some("err"), Some(seq)) = (reply.kind.as_deref(), reply.seq) {
                    // This message was refused: it alone fails, the rest is sent again.
                    if let Some(batch) = self.batches.get_mut(index) {
                        batch.fail_seq(seq, &error.to_string());
                    }
                }
                tracing::warn!(%error, "batch publish refused; publishing again");
                self.fail(index, Failure::BackOff, now);
            }
            (None, None) => {
                // The final acknowledgement: `count` messages of the batch are stored.
                let Some(mut batch) = self.batches.remove(index) else {
                    return;
                };
                let confirmed = batch.confirm(reply.count.unwrap_or(0), now);
                self.metrics.publish_batched_messages.add(confirmed);
                self.metrics.publish_batches.inc();
                self.backoff = BACKOFF_FIRST;
                if !batch.unacked.is_empty() {
                    self.metrics.publish_batch_failures.inc();
                    self.batches.push_front(batch);
                    self.requeue_in_flight(now);
                }
            }
            (Some(kind), None) => {
                tracing::debug!(kind, "batch publish: unknown answer ignored");
            }
        }
    }

    fn single_of(&self, subject: &str) -> Option<u64> {
        let rest = subject
            .strip_prefix(self.inbox.as_str())?
            .strip_prefix('.')?;
        rest.strip_prefix(SINGLE_TOKEN)?.parse().ok()
    }

    /// A single's publish ack, error or "no responders".
    fn on_single_reply(&mut self, id: u64, reply: &async_nats::Message, now: Instant) {
        let Some(at) = self.singles.iter().position(|single| single.id == id) else {
            return;
        };
        let transient = match reply.status {
            Some(status) if status == StatusCode::NO_RESPONDERS => true,
            Some(_) => false,
            None => match serde_json::from_slice::<Reply>(&reply.payload) {
                Ok(Reply { error: None, .. }) => {
                    if let Some(single) = self.singles.remove(at) {
                        single.message.complete(Ok(()));
                    }
                    self.backoff = BACKOFF_FIRST;
                    return;
                }
                Ok(Reply {
                    error: Some(error), ..
                }) if error
                    .err_code
                    .is_some_and(jetmq_common::streams::is_store_full) =>
                {
                    if let Some(single) = self.singles.remove(at) {
                        single
                            .message
                            .complete(Err(BatchError::StoreFull(error.to_string())));
                    }
                    return;
                }
                Ok(Reply {
                    error: Some(error), ..
                }) if error.code != Some(503) => {
                    tracing::warn!(%error, "QoS 1 message refused by JetStream");
                    if let Some(single) = self.singles.remove(at) {
                        single
                            .message
                            .complete(Err(BatchError::Failed(error.to_string())));
                    }
                    return;
                }
                Ok(_) => true,
                Err(_) => false,
            },
        };
        if transient {
            // No stream leader right now: nothing was stored; send again after a pause.
            self.resume_at = Some(now + self.backoff);
            self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        }
        self.requeue_in_flight(now);
    }

    /// Index of the batch a reply subject belongs to.
    fn batch_of(&self, subject: &str) -> Option<usize> {
        let rest = subject
            .strip_prefix(self.inbox.as_str())?
            .strip_prefix('.')?;
        let id = rest.split('.').next()?;
        self.batches.iter().position(|b| b.id == id)
    }

    fn on_timeout(&mut self, now: Instant) {
        if self
            .singles
            .iter()
            .any(|single| now >= single.sent_at + ACK_TIMEOUT)
        {
            tracing::warn!("QoS 1 publish: no answer from JetStream; publishing again");
            self.requeue_in_flight(now);
        }
        if let Some(index) = self
            .batches
            .iter()
            .position(|b| now >= b.waiting_since + ACK_TIMEOUT)
        {
            tracing::warn!(
                timeout_ms = ACK_TIMEOUT.as_millis() as u64,
                "batch publish: no answer from JetStream; publishing again"
            );
            self.fail(index, Failure::Resend, now);
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let timeouts = self.batches.iter().map(|b| b.waiting_since + ACK_TIMEOUT);
        let singles = self.singles.iter().map(|s| s.sent_at + ACK_TIMEOUT);
        timeouts.chain(singles).chain(self.resume_at).min()
    }

    /// Gives a batch up: what it did not confirm is sent again, first, in a new batch,
    /// together with everything else in flight ([`Book::requeue_in_flight`]).
    fn fail(&mut self, index: usize, failure: Failure, now: Instant) {
        if index >= self.batches.len() {
            return;
        }
        self.metrics.publish_batch_failures.inc();
        if failure == Failure::BackOff {
            self.resume_at = Some(now + self.backoff);
            self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        }
        self.requeue_in_flight(now);
    }

    /// The store is full: every unconfirmed message of the batch fails with
    /// [`BatchError::StoreFull`] (none of them is acknowledged, so none is lost: their
    /// publishers are told), and the next batch waits a little, as after a refusal.
    fn refuse_batch(&mut self, index: usize, error: &str, now: Instant) {
        let Some(batch) = self.batches.remove(index) else {
            return;
        };
        self.metrics.publish_batch_failures.inc();
        self.resume_at = Some(now + self.backoff);
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        for (_, message) in batch.unacked {
            message.complete(Err(BatchError::StoreFull(error.to_owned())));
        }
    }

    /// After a failure (no stream leader, a gap, a timeout, a lost connection): gives up
    /// every single and batch in flight and puts their unconfirmed messages back at the
    /// front of the queue in the order the node took them, to go out again before anything
    /// newer.
    ///
    /// Why all of them and not just the one that failed: a publisher has several messages
    /// in flight, in singles and batches that succeed or fail independently. Putting back
    /// only the failed one let the publisher's later messages, still in flight or sent
    /// meanwhile, be stored before it (issue 19: "46, 45, 44 stored after 47"), and putting
    /// failed messages back one by one at the front reversed them. Messages given up that
    /// JetStream did store are stored twice, which QoS 1 allows.
    fn requeue_in_flight(&mut self, now: Instant) {
        let mut unconfirmed: Vec<Outgoing> = self
            .singles
            .drain(..)
            .map(|single| single.message)
            .chain(
                self.batches
                    .drain(..)
                    .flat_map(|batch| batch.unacked.into_iter().map(|(_, message)| message)),
            )
            .collect();
        unconfirmed.sort_by_key(|message| message.taken);
        let mut expired = Vec::new();
        for message in unconfirmed.into_iter().rev() {
            if message.give_up_at.is_some_and(|at| at <= now) {
                expired.push(message);
            } else {
                self.queue.push_front(message);
            }
        }
        for message in expired.into_iter().rev() {
            self.give_up(message);
        }
    }

    /// A message not stored in time fails, and with it the queued messages of its
    /// publisher: they would otherwise be stored before it once the client sends it again
    /// (its connection is closed without a PUBACK for it).
    fn give_up(&mut self, message: Outgoing) {
        self.fail_with_publisher(message, "not stored in time (JetStream unavailable)");
    }

    fn fail_with_publisher(&mut self, message: Outgoing, error: &str) {
        let source = message.source;
        message.complete(Err(BatchError::Failed(error.to_owned())));
        let (failed, kept): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut self.queue)
            .into_iter()
            .partition(|queued| queued.source == source);
        self.queue = kept;
        for message in failed {
            message.complete(Err(BatchError::Failed(
                "an earlier message of this publisher was not stored in time".into(),
            )));
        }
    }

    fn abandon(&mut self, why: &str) {
        self.abandon_with(BatchError::Failed(why.to_owned()));
    }

    fn abandon_with(&mut self, error: BatchError) {
        for single in self.singles.drain(..) {
            single.message.complete(Err(error.clone()));
        }
        for batch in self.batches.drain(..) {
            for (_, message) in batch.unacked {
                message.complete(Err(error.clone()));
            }
        }
        for message in self.queue.drain(..) {
            message.complete(Err(error.clone()));
        }
    }
}

/// `<inbox>.<batch id>.<flow>.fail.<seq>.<op>.$FI`: the server reads it from the right.
/// Built without `format!`: this runs for every QoS 1 message.
fn reply_subject(inbox: &str, batch: &Batch, seq: u64, op: Op) -> String {
    let mut reply = String::with_capacity(inbox.len() + batch.id.len() + 48);
    reply.push_str(inbox);
    reply.push('.');
    reply.push_str(&batch.id);
    reply.push('.');
    push_decimal(&mut reply, batch.flow);
    reply.push_str(".fail.");
    push_decimal(&mut reply, seq);
    reply.push('.');
    reply.push(char::from(b'0' + op as u8));
    reply.push_str(".$FI");
    reply
}

/// `<inbox>._s<id>`: an ordinary JetStream publish, answered with its own ack.
fn single_reply(inbox: &str, id: u64) -> String {
    let mut reply = String::with_capacity(inbox.len() + 24);
    reply.push_str(inbox);
    reply.push('.');
    reply.push_str(SINGLE_TOKEN);
    push_decimal(&mut reply, id);
    reply
}

fn push_decimal(out: &mut String, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for &d in &digits[at..] {
        out.push(char::from(d));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INBOX: &str = "_INBOX.node";

    /// A book that batches from the first message (the batch rules' tests).
    fn book() -> Book {
        let mut book = book_with_singles();
        book.max_singles = 0;
        book
    }

    fn book_with_singles() -> Book {
        Book::new(
            INBOX.to_owned(),
            Arc::new(AtomicBool::new(true)),
            Arc::new(crate::telemetry::Metrics::default()),
        )
    }

    fn reply(subject: &str, status: Option<u16>, payload: &str) -> async_nats::Message {
        async_nats::Message {
            subject: subject.into(),
            reply: None,
            payload: Bytes::copy_from_slice(payload.as_bytes()),
            headers: None,
            status: status.and_then(|s| StatusCode::from_u16(s).ok()),
            description: None,
            length: 0,
        }
    }

    #[test]
    fn light_load_publishes_singles_and_heavy_load_batches_until_the_batches_are_done() {
        let now = Instant::now();
        let mut book = book_with_singles();
        book.max_singles = 2;
        let mut receivers = enqueue(&mut book, 4, now);
        let wires = drain(&mut book, now, true);
        let replies: Vec<&str> = wires.iter().map(|w| w.reply.as_str()).collect();
        assert_eq!(
            replies,
            [
                "_INBOX.node._s1",
                "_INBOX.node._s2",
                "_INBOX.node.node1.200.fail.1.0.$FI",
                "_INBOX.node.node1.200.fail.2.1.$FI",
                "_INBOX.node.node1.200.fail.3.3.$FI",
            ]
        );
        book.on_reply(
            &reply("_INBOX.node._s1", None, r#"{"stream":"S","seq":1}"#),
            now,
        );
        assert_eq!(state(&mut receivers[0]), Some(Ok(())));
        // While a batch is in flight, new messages join batches even with room for singles.
        let (m, _r) = message(now);
        book.enqueue(std::iter::once(m), now);
        let next = drain(&mut book, now, true);
        assert!(next[0].reply.contains(".node2."), "{next:?}");
        book.on_answer(
            0,
            serde_json::from_str(r#"{"stream":"S","count":2}"#).expect("json"),
            now,
        );
        book.on_answer(
            0,
            serde_json::from_str(r#"{"stream":"S","count":1}"#).expect("json"),
            now,
        );
        assert!(book.batches.is_empty());
        let (m, _r) = message(now);
        book.enqueue(std::iter::once(m), now);
        assert_eq!(drain(&mut book, now, true)[0].reply, "_INBOX.node._s3");
    }

    #[test]
    fn a_single_without_a_stream_leader_waits_and_goes_again_and_a_refusal_fails_it() {
        let now = Instant::now();
        let mut book = book_with_singles();
        let (m1, mut r1) = message(now);
        let (m2, mut r2) = message(now);
        book.enqueue([m1, m2].into_iter(), now);
        drain(&mut book, now, true);
        book.on_reply(&reply("_INBOX.node._s1", Some(503), ""), now);
        assert_eq!(state(&mut r1), None);
        assert!(drain(&mut book, now, true).is_empty(), "backing off");
        // The second single was given up with the first: both go again, in their order.
        let again = drain(&mut book, now + BACKOFF_FIRST, true);
        let replies: Vec<&str> = again.iter().map(|w| w.reply.as_str()).collect();
        assert_eq!(replies, ["_INBOX.node._s3", "_INBOX.node._s4"]);
        // A late answer for a single given up is ignored.
        book.on_reply(
            &reply("_INBOX.node._s2", None, r#"{"stream":"S","seq":9}"#),
            now,
        );
        assert_eq!(state(&mut r2), None);
        book.on_reply(
            &reply(
                "_INBOX.node._s4",
                None,
                r#"{"error":{"code":400,"err_code":10054,"description":"maximum payload exceeded"}}"#,
            ),
            now,
        );
        assert!(matches!(
            state(&mut r2),
            Some(Err(BatchError::StoreFull(_)))
        ));
        // Silence: sent again after the timeout.
        book.on_timeout(now + BACKOFF_FIRST + ACK_TIMEOUT);
        assert!(book.singles.is_empty());
        let last = drain(&mut book, now + BACKOFF_FIRST + ACK_TIMEOUT, true);
        assert_eq!(last[0].reply, "_INBOX.node._s5");
        book.on_reply(
            &reply("_INBOX.node._s5", None, r#"{"stream":"S","seq":7}"#),
            now,
        );
        assert_eq!(state(&mut r1), Some(Ok(())));
    }

    /// The bodies a list of wires carries, bundles split.
    fn bodies(wires: &[Wire]) -> Vec<Bytes> {
        wires
            .iter()
            .filter(|w| !w.body.is_empty())
            .flat_map(parts)
            .collect()
    }

    #[test]
    fn singles_that_time_out_go_again_in_their_order_not_reversed() {
        let now = Instant::now();
        let mut book = book_with_singles();
        for body in ["44", "45", "46"] {
            let (m, _r) = from(8, "s.x", body, now);
            book.enqueue(std::iter::once(m), now);
        }
        assert_eq!(drain(&mut book, now, true).len(), 3);
        // The stream leader died: no answers at all.
        book.on_timeout(now + ACK_TIMEOUT);
        let again = drain(&mut book, now + ACK_TIMEOUT, true);
        assert_eq!(bodies(&again), ["44", "45", "46"]);
    }

    #[test]
    fn a_failed_batch_takes_the_later_batches_in_flight_with_it_and_all_go_again_in_order() {
        let now = Instant::now();
        let mut book = book();
        let mut receivers = Vec::new();
        let mut sent = Vec::new();
        // Batch 1 with two messages, committed; then batch 2 with two more.
        for (body, idle) in [("1", false), ("2", true), ("3", false), ("4", true)] {
            let (m, r) = from(8, "s.x", body, now);
            book.enqueue(std::iter::once(m), now);
            receivers.push(r);
            sent.extend(drain(&mut book, now, idle));
        }
        assert_eq!(book.batches.len(), 2, "{sent:?}");
        assert_eq!(bodies(&sent), ["1", "2", "3", "4"]);
        // Batch 1 hears nothing (its stream leader died); batch 2 is still in flight.
        let later = now + ACK_TIMEOUT;
        book.batches[1].waiting_since = later;
        book.on_timeout(later);
        assert!(book.batches.is_empty(), "batch 2 is given up too");
        let again = drain(&mut book, later, true);
        assert_eq!(bodies(&again), ["1", "2", "3", "4"], "not 3, 4 before 1, 2");
        let commit = again.last().expect("commit");
        answer(
            &mut book,
            commit,
            r#"{"stream":"S","seq":9,"count":4}"#,
            later,
        );
        assert!(receivers.iter_mut().all(|r| state(r) == Some(Ok(()))));
    }

    #[test]
    fn batches_that_fail_one_after_the_other_keep_their_order() {
        let now = Instant::now();
        let mut book = book();
        let mut sent = Vec::new();
        for (body, idle) in [("a", true), ("b", true)] {
            let (m, _r) = from(3, "s.x", body, now);
            book.enqueue(std::iter::once(m), now);
            sent.extend(drain(&mut book, now, idle));
        }
        // Singles are off in `book()`: two batches in flight.
        assert_eq!(book.batches.len(), 2);
        // The later batch finds no stream leader first.
        let reply_b = &sent.iter().find(|w| w.body == "b").expect("b").reply;
        book.on_reply(&reply(reply_b, Some(503), ""), now);
        let again = drain(&mut book, now + BACKOFF_FIRST, true);
        assert_eq!(bodies(&again), ["a", "b"]);
    }

    #[test]
    fn nothing_new_goes_while_the_oldest_in_flight_has_no_answer_for_long() {
        let now = Instant::now();
        let mut book = book_with_singles();
        let (first, mut r_first) = from(5, "s.x", "1", now);
        book.enqueue(std::iter::once(first), now);
        let sent = drain(&mut book, now, true);
        let later = now + SUSPECT_AFTER;
        let (second, _r) = from(5, "s.x", "2", later);
        book.enqueue(std::iter::once(second), later);
        assert!(drain(&mut book, later, true).is_empty(), "held back");
        book.on_reply(
            &reply(&sent[0].reply, None, r#"{"stream":"S","seq":1}"#),
            later,
        );
        assert_eq!(state(&mut r_first), Some(Ok(())));
        assert_eq!(bodies(&drain(&mut book, later, true)), ["2"]);
    }

    #[test]
    fn a_suspect_open_batch_is_committed_and_nothing_new_goes() {
        let now = Instant::now();
        let mut book = book();
        let (first, _r1) = from(5, "s.x", "1", now);
        book.enqueue(std::iter::once(first), now);
        assert_eq!(drain(&mut book, now, false).len(), 1, "open, not committed");
        let later = now + SUSPECT_AFTER;
        let (second, _r2) = from(5, "s.x", "2", later);
        book.enqueue(std::iter::once(second), later);
        let wires = drain(&mut book, later, false);
        assert_eq!(wires.len(), 1);
        assert!(
            wires[0].reply.ends_with(".3.$FI"),
            "only the commit: {wires:?}"
        );
    }

    #[test]
    fn a_message_given_up_fails_the_queued_messages_of_its_publisher() {
        let now = Instant::now();
        let mut book = book_with_singles();
        let (first, mut r_first) = from(5, "s.x", "1", now);
        book.enqueue(std::iter::once(first), now);
        drain(&mut book, now, true);
        let later = now + GIVE_UP_AFTER - Duration::from_millis(1);
        let (second, mut r_second) = from(5, "s.x", "2", later);
        let (other, mut r_other) = from(6, "s.x", "x", later);
        book.enqueue([second, other].into_iter(), later);
        // The first one's ack never comes and its time runs out.
        book.on_timeout(now + GIVE_UP_AFTER);
        assert!(matches!(state(&mut r_first), Some(Err(_))));
        assert!(
            matches!(state(&mut r_second), Some(Err(_))),
            "would be stored before the first once the client sends that again"
        );
        assert_eq!(state(&mut r_other), None, "other publishers go on");
        assert_eq!(bodies(&drain(&mut book, now + GIVE_UP_AFTER, true)), ["x"]);
    }

    fn message(now: Instant) -> (Outgoing, oneshot::Receiver<Result<(), BatchError>>) {
        let (done, rx) = oneshot::channel();
        (
            Outgoing {
                subject: Subject::from("jetmq.s.0.t"),
                body: Bytes::from_static(b"x"),
                headers: None,
                source: 1,
                done,
                give_up_at: Some(now + GIVE_UP_AFTER),
                taken: 0,
            },
            rx,
        )
    }

    /// `count` messages into the book, one at a time; their receivers.
    fn enqueue(
        book: &mut Book,
        count: u64,
        now: Instant,
    ) -> Vec<oneshot::Receiver<Result<(), BatchError>>> {
        (0..count)
            .map(|_| {
                let (m, r) = message(now);
                book.enqueue(std::iter::once(m), now);
                r
            })
            .collect()
    }

    fn answer(book: &mut Book, wire: &Wire, json: &str, now: Instant) {
        let index = book.batch_of(&wire.reply).expect("batch of reply");
        book.on_answer(index, serde_json::from_str(json).expect("json"), now);
    }

    fn drain(book: &mut Book, now: Instant, idle: bool) -> Vec<Wire> {
        std::iter::from_fn(|| book.next_send(now, idle)).collect()
    }

    fn state(rx: &mut oneshot::Receiver<Result<(), BatchError>>) -> Option<Result<(), BatchError>> {
        rx.try_recv().ok()
    }

    /// A message of `source` on `subject` with `body`.
    fn from(
        source: u64,
        subject: &str,
        body: &'static str,
        now: Instant,
    ) -> (Outgoing, oneshot::Receiver<Result<(), BatchError>>) {
        let (mut m, r) = message(now);
        m.source = source;
        m.subject = Subject::from(subject);
        m.body = Bytes::from_static(body.as_bytes());
        (m, r)
    }

    fn parts(wire: &Wire) -> Vec<Bytes> {
        jetmq_common::envelope::split_bundle(wire.body.clone()).expect("splits")
    }

    #[test]
    fn queued_messages_of_one_subject_go_as_one_bundle_in_each_publishers_order() {
        let now = Instant::now();
        let mut book = book();
        book.max_bundle = 3;
        let mut receivers = Vec::new();
        // Publisher 1 sends x, y, x; publisher 2 sends x, x, x.
        for (source, subject, body) in [
            (1, "s.x", "1x1"),
            (2, "s.x", "2x1"),
            (1, "s.y", "1y1"),
            (1, "s.x", "1x2"),
            (2, "s.x", "2x2"),
            (2, "s.x", "2x3"),
        ] {
            let (m, r) = from(source, subject, body, now);
            book.enqueue(std::iter::once(m), now);
            receivers.push(r);
        }
        let wires = drain(&mut book, now, false);
        let bodies: Vec<Vec<Bytes>> = wires.iter().map(parts).collect();
        // 1x2 may not join 1x1's bundle: 1y1, sent after 1x1, would then come after it.
        // The bundle stops at three.
        assert_eq!(
            bodies,
            vec![
                vec![Bytes::from("1x1"), Bytes::from("2x1"), Bytes::from("2x2")],
                vec![Bytes::from("1y1")],
                vec![Bytes::from("1x2"), Bytes::from("2x3")],
            ]
        );
        assert_eq!(book.metrics.publish_bundles.get(), 2);
        assert_eq!(book.metrics.publish_bundled_messages.get(), 5);
        // One stream message per bundle: the flow ack of the first two covers four messages.
        book.on_answer(
            0,
            serde_json::from_str(r#"{"type":"ack","seq":2,"msgs":200}"#).expect("json"),
            now,
        );
        let done: Vec<bool> = receivers
            .iter_mut()
            .map(|r| state(r) == Some(Ok(())))
            .collect();
        assert_eq!(done, [true, true, true, false, true, false]);
    }

    #[test]
    fn a_failed_bundle_is_sent_again_in_the_same_order() {
        let now = Instant::now();
        let mut book = book();
        book.max_bundle = 8;
        let mut receivers = Vec::new();
        for body in ["a", "b", "c"] {
            let (m, r) = from(1, "s.x", body, now);
            book.enqueue(std::iter::once(m), now);
            receivers.push(r);
        }
        let first = drain(&mut book, now, false);
        assert_eq!(first.len(), 1);
        answer(
            &mut book,
            &first[0],
            r#"{"type":"gap","last_seq":0,"seq":1}"#,
            now,
        );
        let again = drain(&mut book, now, false);
        assert_eq!(again.len(), 1);
        assert_eq!(
            parts(&again[0]),
            vec![Bytes::from("a"), Bytes::from("b"), Bytes::from("c")]
        );
        assert!(receivers.iter_mut().all(|r| state(r).is_none()));
    }

    #[test]
    fn messages_with_headers_or_too_large_for_a_bundle_go_alone() {
        let now = Instant::now();
        let mut book = book();
        book.max_bundle = 8;
        let (mut traced, _r1) = from(1, "s.x", "t", now);
        traced.headers = Some(HeaderMap::new());
        let (plain, _r2) = from(2, "s.x", "p", now);
        let (mut big, _r3) = from(3, "s.x", "", now);
        big.body = Bytes::from(vec![b'x'; MAX_BUNDLE_BYTES]);
        book.enqueue([traced, plain, big].into_iter(), now);
        let wires = drain(&mut book, now, false);
        assert_eq!(wires.len(), 3);
        assert_eq!(wires[0].body, Bytes::from("t"), "no bundle: it has headers");
        assert_eq!(wires[1].body, Bytes::from("p"), "the next does not fit");
        assert_eq!(wires[2].body.len(), MAX_BUNDLE_BYTES);
    }

    #[test]
    fn decimals() {
        for n in [0, 7, 10, 199, 200, u64::MAX] {
            let mut out = String::new();
            push_decimal(&mut out, n);
            assert_eq!(out, n.to_string());
        }
    }

    #[test]
    fn a_quiet_node_commits_at_once_and_the_final_answer_confirms() {
        let now = Instant::now();
        let mut book = book();
        let (m1, mut r1) = message(now);
        let (m2, mut r2) = message(now);
        book.enqueue([m1, m2].into_iter(), now);
        let wires = drain(&mut book, now, true);
        let replies: Vec<&str> = wires.iter().map(|w| w.reply.as_str()).collect();
        assert_eq!(
            replies,
            [
                "_INBOX.node.node1.200.fail.1.0.$FI",
                "_INBOX.node.node1.200.fail.2.1.$FI",
                "_INBOX.node.node1.200.fail.3.3.$FI",
            ]
        );
        assert!(
            wires[2].body.is_empty(),
            "end-of-batch commit carries no message"
        );
        answer(
            &mut book,
            &wires[0],
            r#"{"type":"ack","seq":0,"msgs":200}"#,
            now,
        );
        assert_eq!(state(&mut r1), None, "start answer confirms nothing");
        answer(
            &mut book,
            &wires[2],
            r#"{"stream":"S","seq":9,"batch":"node1","count":2}"#,
            now,
        );
        assert_eq!(state(&mut r1), Some(Ok(())));
        assert_eq!(state(&mut r2), Some(Ok(())));
        assert!(book.batches.is_empty());
    }

    #[test]
    fn a_busy_node_keeps_the_batch_open_and_flow_acks_confirm() {
        let now = Instant::now();
        let mut book = book();
        let mut receivers = enqueue(&mut book, 5, now);
        // More input is waiting: no commit.
        let wires = drain(&mut book, now, false);
        assert_eq!(wires.len(), 5);
        assert!(wires.iter().all(|w| !w.reply.ends_with(".3.$FI")));
        answer(
            &mut book,
            &wires[0],
            r#"{"type":"ack","seq":3,"msgs":3}"#,
            now,
        );
        let done: Vec<bool> = receivers.iter_mut().map(|r| state(r).is_some()).collect();
        assert_eq!(done, [true, true, true, false, false]);
        // The server lowered the flow: later reply subjects say so.
        let (m, _r) = message(now);
        book.enqueue(std::iter::once(m), now);
        let next = drain(&mut book, now, false);
        assert_eq!(next[0].reply, "_INBOX.node.node1.3.fail.6.1.$FI");
    }

    #[test]
    fn only_one_commit_waits_at_a_time() {
        let now = Instant::now();
        let mut book = book();
        let (m1, _r1) = message(now);
        book.enqueue(std::iter::once(m1), now);
        let first = drain(&mut book, now, true);
        assert_eq!(first.len(), 2, "message and commit");
        let (m2, mut r2) = message(now);
        book.enqueue(std::iter::once(m2), now);
        let second = drain(&mut book, now, true);
        assert_eq!(
            second.len(),
            1,
            "new batch started, its commit waits: {second:?}"
        );
        assert!(second[0].reply.contains(".node2."));
        answer(
            &mut book,
            &first[1],
            r#"{"stream":"S","seq":1,"count":1}"#,
            now,
        );
        let commit = drain(&mut book, now, true);
        assert_eq!(commit.len(), 1);
        assert!(commit[0].reply.ends_with("node2.200.fail.2.3.$FI"));
        answer(
            &mut book,
            &commit[0],
            r#"{"stream":"S","seq":2,"count":1}"#,
            now,
        );
        assert_eq!(state(&mut r2), Some(Ok(())));
    }

    #[test]
    fn a_full_batch_is_committed_and_a_new_one_opened() {
        let now = Instant::now();
        let mut book = book();
        let _receivers = enqueue(&mut book, REQUESTED_FLOW * WINDOWS_PER_BATCH + 1, now);
        let wires = drain(&mut book, now, false);
        let commits: Vec<&Wire> = wires
            .iter()
            .filter(|w| w.reply.ends_with(".3.$FI"))
            .collect();
        assert_eq!(commits.len(), 1);
        assert_eq!(book.batches.len(), 2);
        assert!(wires
            .last()
            .is_some_and(|w| w.reply.contains(".node2.") && w.seq == 1));
    }

    #[test]
    fn a_gap_sends_the_unconfirmed_messages_again_in_order() {
        let now = Instant::now();
        let mut book = book();
        let mut receivers = enqueue(&mut book, 4, now);
        let wires = drain(&mut book, now, false);
        answer(
            &mut book,
            &wires[0],
            r#"{"type":"ack","seq":2,"msgs":2}"#,
            now,
        );
        answer(
            &mut book,
            &wires[3],
            r#"{"type":"gap","last_seq":3,"seq":4}"#,
            now,
        );
        assert!(book.batches.is_empty());
        assert_eq!(book.queue.len(), 2);
        let again = drain(&mut book, now, true);
        assert_eq!(again.len(), 3, "two messages and a commit");
        assert!(again[0].reply.contains(".node2.") && again[0].seq == 1);
        // A late answer for the failed batch is ignored.
        assert!(book.batch_of(&wires[3].reply).is_none());
        answer(
            &mut book,
            &again[2],
            r#"{"stream":"S","seq":6,"count":2}"#,
            now,
        );
        assert!(receivers.iter_mut().all(|r| state(r) == Some(Ok(()))));
    }

    #[test]
    fn no_responders_backs_off_and_silence_times_out() {
        let now = Instant::now();
        let mut book = book();
        let (m, mut r) = message(now);
        book.enqueue(std::iter::once(m), now);
        let wires = drain(&mut book, now, true);
        let index = book.batch_of(&wires[0].reply).expect("batch");
        book.fail(index, Failure::BackOff, now);
        assert!(drain(&mut book, now, true).is_empty(), "backing off");
        let later = now + BACKOFF_FIRST;
        let again = drain(&mut book, later, true);
        assert_eq!(again.len(), 2);
        assert_eq!(book.next_deadline(), Some(later + ACK_TIMEOUT));
        book.on_timeout(later + ACK_TIMEOUT);
        assert!(book.batches.is_empty());
        assert_eq!(book.queue.len(), 1, "sent again after the timeout");
        // Past the message's own limit it fails instead.
        assert!(drain(&mut book, now + GIVE_UP_AFTER, true).is_empty());
        assert!(matches!(state(&mut r), Some(Err(BatchError::Failed(_)))));
    }

    #[test]
    fn a_refused_message_fails_alone_and_a_disabled_stream_turns_batches_off() {
        let now = Instant::now();
        let mut book = book();
        let (m1, mut r1) = message(now);
        let (m2, mut r2) = message(now);
        book.enqueue([m1, m2].into_iter(), now);
        let wires = drain(&mut book, now, false);
        answer(
            &mut book,
            &wires[1],
            r#"{"type":"err","seq":2,"error":{"code":400,"err_code":10999,"description":"bad"}}"#,
            now,
        );
        assert!(matches!(state(&mut r2), Some(Err(BatchError::Failed(_)))));
        assert_eq!(state(&mut r1), None);
        assert_eq!(book.queue.len(), 1, "the other message is sent again");
        assert!(
            drain(&mut book, now, false).is_empty(),
            "after a refusal: backing off"
        );
        let again = drain(&mut book, now + BACKOFF_FIRST, false);
        answer(
            &mut book,
            &again[0],
            r#"{"error":{"code":400,"err_code":10205,"description":"batch publish is disabled"},"stream":"S","seq":0}"#,
            now,
        );
        assert_eq!(state(&mut r1), Some(Err(BatchError::Unsupported)));
        assert!(!book.available.load(Ordering::Relaxed));
        let (m3, mut r3) = message(now);
        book.enqueue(std::iter::once(m3), now);
        assert_eq!(state(&mut r3), Some(Err(BatchError::Unsupported)));
    }

    #[test]
    fn a_full_store_fails_the_whole_batch_and_a_full_single_is_not_retried() {
        let now = Instant::now();
        let mut book = book();
        let (m1, mut r1) = message(now);
        let (m2, mut r2) = message(now);
        let (m3, mut r3) = message(now);
        book.enqueue([m1, m2, m3].into_iter(), now);
        let wires = drain(&mut book, now, false);
        // nats-server 2.15.1, stream at max_bytes with discard "new".
        answer(
            &mut book,
            &wires[1],
            r#"{"type":"err","seq":2,"error":{"code":503,"err_code":10077,"description":"maximum bytes exceeded"}}"#,
            now,
        );
        for r in [&mut r1, &mut r2, &mut r3] {
            assert!(matches!(state(r), Some(Err(BatchError::StoreFull(_)))));
        }
        assert!(book.queue.is_empty(), "nothing is sent again");
        assert!(book.batches.is_empty());

        let mut book = book_with_singles();
        let (m4, mut r4) = message(now);
        book.enqueue(std::iter::once(m4), now);
        drain(&mut book, now, true);
        // A server whose max_file_store is used up: 503 too, but not "no leader".
        book.on_reply(
            &reply(
                "_INBOX.node._s1",
                None,
                r#"{"error":{"code":503,"err_code":10023,"description":"insufficient resources"},"stream":"S","seq":0}"#,
            ),
            now,
        );
        assert!(matches!(
            state(&mut r4),
            Some(Err(BatchError::StoreFull(_)))
        ));
        assert!(book.singles.is_empty() && book.queue.is_empty());
    }
}

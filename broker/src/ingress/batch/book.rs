//! The batch publisher's state machine, free of I/O: the queue, the messages published
//! alone and the batches in flight, and what to send next ([`Book::next_send`]).
//!
//! The task ([`super::publisher`]) drives it: it enqueues what connections hand over, puts
//! on the wire whatever `next_send` returns, and reports answers ([`super::reply`]) and
//! timeouts. Bundles are built in [`super::bundle`].

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use jetmq_common::retry::Backoff;
use tokio::time::Instant;

use super::reply::{alone_reply, reply_subject, ApiError};
use super::{
    BatchError, BatchFailure, QueuedPublish, ACK_TIMEOUT, BACKOFF_FIRST, BACKOFF_MAX,
    GIVE_UP_AFTER, MAX_BATCHES, MAX_BUNDLE_BYTES, MAX_QUEUED, REQUESTED_FLOW, WINDOWS_PER_BATCH,
};
use crate::ingress::order::SUSPECT_AFTER;

/// What the server is asked to do with a message (the `$FI` reply subject's operation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Op {
    Start = 0,
    Append = 1,
    /// Commit without storing this (empty) message.
    CommitEndOfBatch = 3,
}

/// One message for the wire; `reply` tells the server its batch, sequence and operation.
#[derive(Debug)]
pub(super) struct Wire {
    pub(super) batch: u64,
    pub(super) seq: u64,
    pub(super) subject: Subject,
    pub(super) reply: String,
    pub(super) body: Bytes,
    pub(super) headers: Option<HeaderMap>,
}

pub(super) struct Batch {
    pub(super) number: u64,
    /// Token in the reply subject that names this batch (unique across nodes).
    pub(super) id: String,
    pub(super) first_subject: Subject,
    /// Sequence the next message of this batch gets; the first is 1.
    pub(super) next_seq: u64,
    /// Every message up to this sequence is stored.
    pub(super) acked: u64,
    /// Messages per acknowledgement, as the server dictates.
    pub(super) flow: u64,
    pub(super) unacked: VecDeque<(u64, QueuedPublish)>,
    pub(super) committed: bool,
    /// Since the last answer (or the first message): for [`ACK_TIMEOUT`].
    pub(super) waiting_since: Instant,
}

impl Batch {
    /// As many messages unconfirmed as the server wants at most.
    pub(super) fn full(&self) -> bool {
        self.next_seq > self.acked + self.flow * WINDOWS_PER_BATCH
    }

    /// Fails the message(s) sent as `seq` (a bundle is several).
    pub(super) fn fail_seq(&mut self, seq: u64, failure: BatchFailure) {
        let (failed, kept): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut self.unacked)
            .into_iter()
            .partition(|(s, _)| *s == seq);
        self.unacked = kept;
        for (_, message) in failed {
            message.complete(Err(failure.clone().into()));
        }
    }

    /// Completes every message up to `seq`; returns how many.
    pub(super) fn confirm(&mut self, seq: u64, now: Instant) -> u64 {
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
pub(super) struct SentAlone {
    pub(super) id: u64,
    pub(super) message: QueuedPublish,
    pub(super) sent_at: Instant,
}

/// What to do after a batch was given up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Failure {
    /// Lost on the way (gap, timeout): send again at once.
    Resend,
    /// Refused, or no stream leader right now: wait a little before the next batch.
    BackOff,
}

/// The batch publisher's state: the queue, the batches in flight and what to send next.
pub(super) struct Book {
    pub(super) inbox: String,
    /// Prefix of this node's batch ids: the inbox's unique token.
    pub(super) node_tag: String,
    pub(super) next_number: u64,
    pub(super) queue: VecDeque<QueuedPublish>,
    /// Oldest first; only the last one may be open (not committed).
    pub(super) batches: VecDeque<Batch>,
    /// Messages published alone, waiting for their acks (oldest first).
    pub(super) alone: VecDeque<SentAlone>,
    pub(super) next_alone: u64,
    /// Messages published alone (each with its own ack) in flight before the node switches
    /// to batches: `nats.batch_publish_after`. A batch costs three extra operations (its
    /// start answer, the commit, the final ack), so it only pays once several messages share
    /// one round trip; under light load (10k clients at 1 msg/s each: about five in flight)
    /// messages published alone are faster and cheaper.
    pub(super) max_alone: usize,
    /// Most messages per bundle; 1: none.
    pub(super) max_bundle: usize,
    pub(super) max_bundle_bytes: usize,
    /// The pause after a refusal or "no responders" ([`Book::back_off`]).
    pub(super) backoff: Backoff,
    pub(super) resume_at: Option<Instant>,
    /// Next [`QueuedPublish::taken`].
    pub(super) next_taken: u64,
    pub(super) available: Arc<AtomicBool>,
    pub(super) metrics: Arc<crate::telemetry::Metrics>,
}

impl Book {
    /// A book that publishes up to `max_alone` messages alone before it batches, and
    /// bundles nothing until [`Book::max_bundle`] is raised.
    pub(super) fn new(
        inbox: String,
        max_alone: usize,
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
            alone: VecDeque::new(),
            next_alone: 1,
            max_alone,
            max_bundle: 1,
            max_bundle_bytes: MAX_BUNDLE_BYTES,
            backoff: Backoff::new(BACKOFF_FIRST, BACKOFF_MAX),
            resume_at: None,
            next_taken: 1,
            available,
            metrics,
        }
    }

    pub(super) fn has_room(&self) -> bool {
        self.queue.len() < MAX_QUEUED
    }

    pub(super) fn enqueue(&mut self, messages: impl Iterator<Item = QueuedPublish>, now: Instant) {
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

    pub(super) fn open_batch(&self) -> Option<&Batch> {
        self.batches.back().filter(|b| !b.committed)
    }

    /// The next message to put on the wire, if any. `input_idle`: no connection has
    /// anything waiting, so the open batch may be committed.
    ///
    /// In this order: nothing while backing off; only a commit while something in flight
    /// is suspect; else the oldest queued message, alone while no batch is in flight and
    /// there is room among the messages alone, otherwise in a batch; with nothing queued, a
    /// commit of the open batch if the node is idle.
    pub(super) fn next_send(&mut self, now: Instant, input_idle: bool) -> Option<Wire> {
        if self.backing_off(now) {
            return None;
        }
        if self.suspect(now) {
            // Something sent a while ago has no answer: it may have been lost with a stream
            // leader, and what goes out now could reach the next leader and be stored before
            // it. Nothing new goes until it is answered or times out (and then everything
            // goes again in order); an open batch is committed so that the server answers.
            return self.commit_open(now);
        }
        let Some(message) = self.next_queued(now) else {
            return self.commit_if_idle(input_idle, now);
        };
        if self.batches.is_empty() && self.alone.len() < self.max_alone {
            return Some(self.send_alone(message, now));
        }
        self.send_in_batch(message, now)
    }

    /// True until the pause after a failure is over.
    fn backing_off(&mut self, now: Instant) -> bool {
        if self.resume_at.is_some_and(|at| now < at) {
            return true;
        }
        self.resume_at = None;
        false
    }

    /// The oldest queued message still in time; those whose time ran out are given up.
    fn next_queued(&mut self, now: Instant) -> Option<QueuedPublish> {
        while let Some(message) = self.queue.pop_front() {
            if message.give_up_at.is_some_and(|at| at <= now) {
                self.give_up(message);
                continue;
            }
            return Some(message);
        }
        None
    }

    /// Publishes `message` alone, with its own ack.
    fn send_alone(&mut self, message: QueuedPublish, now: Instant) -> Wire {
        let id = self.next_alone;
        self.next_alone += 1;
        let wire = Wire {
            batch: 0,
            seq: id,
            subject: message.subject.clone(),
            reply: alone_reply(&self.inbox, id),
            body: message.body.clone(),
            headers: message.headers.clone(),
        };
        self.alone.push_back(SentAlone {
            id,
            message,
            sent_at: now,
        });
        wire
    }

    /// Appends `message` (bundled with what may go with it) to the open batch, opening one
    /// if there is none. A full open batch is committed first, and with [`MAX_BATCHES`] in
    /// flight nothing goes: `message` is put back.
    fn send_in_batch(&mut self, message: QueuedPublish, now: Instant) -> Option<Wire> {
        if self.open_batch().is_some_and(Batch::full) {
            self.queue.push_front(message);
            return self.commit_open(now);
        }
        if self.open_batch().is_none() {
            if self.batches.len() >= MAX_BATCHES {
                self.queue.push_front(message);
                return None;
            }
            self.open_new_batch(&message.subject, now);
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
        Some(wire)
    }

    fn open_new_batch(&mut self, first_subject: &Subject, now: Instant) {
        let number = self.next_number;
        self.next_number += 1;
        self.batches.push_back(Batch {
            number,
            id: format!("{}{number:x}", self.node_tag),
            first_subject: first_subject.clone(),
            next_seq: 1,
            acked: 0,
            flow: REQUESTED_FLOW,
            unacked: VecDeque::new(),
            committed: false,
            waiting_since: now,
        });
    }

    /// Nothing queued: commits the open batch once nothing else is coming and no other
    /// commit is still waiting for its answer.
    fn commit_if_idle(&mut self, input_idle: bool, now: Instant) -> Option<Wire> {
        let others_waiting = self.batches.len() > 1;
        if input_idle && !others_waiting {
            return self.commit_open(now);
        }
        None
    }

    /// The oldest message published alone or batch in flight has had no answer for
    /// [`SUSPECT_AFTER`]. JetStream answers within milliseconds when it works, and a stream
    /// leader election takes seconds: messages sent between a silent loss and this hold find
    /// no leader and fail, which puts everything back in order ([`Book::requeue_in_flight`]).
    pub(super) fn suspect(&self, now: Instant) -> bool {
        let alone = self
            .alone
            .front()
            .is_some_and(|sent| sent.sent_at + SUSPECT_AFTER <= now);
        alone
            || self.batches.iter().any(|batch| {
                !batch.unacked.is_empty() && batch.waiting_since + SUSPECT_AFTER <= now
            })
    }

    pub(super) fn commit_open(&mut self, now: Instant) -> Option<Wire> {
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
    pub(super) fn send_failed(
        &mut self,
        batch: u64,
        seq: u64,
        error: async_nats::client::PublishError,
        now: Instant,
    ) {
        let text = error.to_string();
        tracing::warn!(
            batch,
            seq,
            error = text.as_str(),
            "batch publish: message not sent"
        );
        let failure = BatchFailure::NotSent(Arc::new(error));
        if batch == 0 {
            if let Some(at) = self.alone.iter().position(|sent| sent.id == seq) {
                if let Some(sent) = self.alone.remove(at) {
                    self.fail_with_publisher(sent.message, failure);
                }
            }
            return;
        }
        let Some(index) = self.batches.iter().position(|b| b.number == batch) else {
            return;
        };
        if let Some(batch) = self.batches.get_mut(index) {
            batch.fail_seq(seq, failure);
        }
        self.fail(index, Failure::Resend, now);
    }

    pub(super) fn on_timeout(&mut self, now: Instant) {
        if self
            .alone
            .iter()
            .any(|sent| now >= sent.sent_at + ACK_TIMEOUT)
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

    pub(super) fn next_deadline(&self) -> Option<Instant> {
        let timeouts = self.batches.iter().map(|b| b.waiting_since + ACK_TIMEOUT);
        let alone = self.alone.iter().map(|s| s.sent_at + ACK_TIMEOUT);
        timeouts.chain(alone).chain(self.resume_at).min()
    }

    /// Gives a batch up: what it did not confirm is sent again, first, in a new batch,
    /// together with everything else in flight ([`Book::requeue_in_flight`]).
    pub(super) fn fail(&mut self, index: usize, failure: Failure, now: Instant) {
        if index >= self.batches.len() {
            return;
        }
        self.metrics.publish_batch_failures.inc();
        if failure == Failure::BackOff {
            self.back_off(now);
        }
        self.requeue_in_flight(now);
    }

    /// Sends nothing for the next pause of [`Book::backoff`] (each one twice the last, up to
    /// [`BACKOFF_MAX`], until an answer confirms something).
    pub(super) fn back_off(&mut self, now: Instant) {
        self.resume_at = Some(now + self.backoff.next_pause());
    }

    /// The store is full: every unconfirmed message of the batch fails with
    /// [`BatchError::StoreFull`] (none of them is acknowledged, so none is lost: their
    /// publishers are told), and the next batch waits a little, as after a refusal.
    pub(super) fn refuse_batch(&mut self, index: usize, error: &ApiError, now: Instant) {
        let Some(batch) = self.batches.remove(index) else {
            return;
        };
        self.metrics.publish_batch_failures.inc();
        self.back_off(now);
        for (_, message) in batch.unacked {
            message.complete(Err(BatchError::StoreFull(error.clone())));
        }
    }

    /// After a failure (no stream leader, a gap, a timeout, a lost connection): gives up
    /// every message published alone and batch in flight and puts their unconfirmed
    /// messages back at the front of the queue in the order the node took them, to go out
    /// again before anything newer.
    ///
    /// Why all of them and not just the one that failed: a publisher has several messages
    /// in flight, alone and in batches, that succeed or fail independently. Putting back
    /// only the failed one let the publisher's later messages, still in flight or sent
    /// meanwhile, be stored before it (issue 19: "46, 45, 44 stored after 47"), and putting
    /// failed messages back one by one at the front reversed them. Messages given up that
    /// JetStream did store are stored twice, which QoS 1 allows.
    pub(super) fn requeue_in_flight(&mut self, now: Instant) {
        let mut unconfirmed: Vec<QueuedPublish> = self
            .alone
            .drain(..)
            .map(|sent| sent.message)
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
    pub(super) fn give_up(&mut self, message: QueuedPublish) {
        self.fail_with_publisher(
            message,
            BatchFailure::GivenUp("not stored in time (JetStream unavailable)"),
        );
    }

    pub(super) fn fail_with_publisher(&mut self, message: QueuedPublish, failure: BatchFailure) {
        let source = message.source;
        message.complete(Err(failure.into()));
        let (failed, kept): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut self.queue)
            .into_iter()
            .partition(|queued| queued.source == source);
        self.queue = kept;
        for message in failed {
            message.complete(Err(BatchFailure::GivenUp(
                "an earlier message of this publisher was not stored in time",
            )
            .into()));
        }
    }

    pub(super) fn abandon(&mut self, why: &'static str) {
        self.abandon_with(BatchFailure::GivenUp(why).into());
    }

    pub(super) fn abandon_with(&mut self, error: BatchError) {
        for sent in self.alone.drain(..) {
            sent.message.complete(Err(error.clone()));
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

//! The reply subjects of what the batch publisher sends, and the JetStream answers that
//! come back on them: publish acks of messages sent alone, and a batch's flow acks, gaps,
//! errors and final acknowledgement.

use std::sync::atomic::Ordering;

use async_nats::StatusCode;
use serde::Deserialize;
use tokio::time::Instant;

use super::book::{Batch, Failure, Op};
use super::{BatchError, BatchFailure, Book, REQUESTED_FLOW};

/// JetStream API error: the stream does not allow batch publishing.
const ERR_BATCH_DISABLED: u64 = 10205;

/// Reply-subject token prefix of messages published alone; batch ids are alphanumeric, so
/// they never match.
const ALONE_TOKEN: &str = "_s";

/// What the server answers on a batch's reply subjects.
#[derive(Debug, Deserialize)]
pub(super) struct Reply {
    #[serde(rename = "type")]
    kind: Option<String>,
    seq: Option<u64>,
    msgs: Option<u64>,
    count: Option<u64>,
    error: Option<ApiError>,
}

/// An error JetStream answered with (the `error` of its JSON answer).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ApiError {
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

impl std::error::Error for ApiError {}

impl Book {
    pub(super) fn on_reply(&mut self, reply: &async_nats::Message, now: Instant) {
        if let Some(id) = self.alone_of(reply.subject.as_str()) {
            self.on_alone_reply(id, reply, now);
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

    pub(super) fn on_answer(&mut self, index: usize, reply: Reply, now: Instant) {
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
                self.backoff.reset();
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
                    self.refuse_batch(index, &error, now);
                    return;
                }
                if let (Some("err"), Some(seq)) = (reply.kind.as_deref(), reply.seq) {
                    // This message was refused: it alone fails, the rest is sent again.
                    if let Some(batch) = self.batches.get_mut(index) {
                        batch.fail_seq(seq, BatchFailure::Refused(error.clone()));
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
                self.backoff.reset();
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

    fn alone_of(&self, subject: &str) -> Option<u64> {
        let rest = subject
            .strip_prefix(self.inbox.as_str())?
            .strip_prefix('.')?;
        rest.strip_prefix(ALONE_TOKEN)?.parse().ok()
    }

    /// A message published alone: its publish ack, error or "no responders".
    fn on_alone_reply(&mut self, id: u64, reply: &async_nats::Message, now: Instant) {
        let Some(at) = self.alone.iter().position(|sent| sent.id == id) else {
            return;
        };
        let transient = match reply.status {
            Some(status) if status == StatusCode::NO_RESPONDERS => true,
            Some(_) => false,
            None => match serde_json::from_slice::<Reply>(&reply.payload) {
                Ok(Reply { error: None, .. }) => {
                    if let Some(sent) = self.alone.remove(at) {
                        sent.message.complete(Ok(()));
                    }
                    self.backoff.reset();
                    return;
                }
                Ok(Reply {
                    error: Some(error), ..
                }) if error
                    .err_code
                    .is_some_and(jetmq_common::streams::is_store_full) =>
                {
                    if let Some(sent) = self.alone.remove(at) {
                        sent.message.complete(Err(BatchError::StoreFull(error)));
                    }
                    return;
                }
                Ok(Reply {
                    error: Some(error), ..
                }) if error.code != Some(503) => {
                    tracing::warn!(%error, "QoS 1 message refused by JetStream");
                    if let Some(sent) = self.alone.remove(at) {
                        sent.message
                            .complete(Err(BatchFailure::Refused(error).into()));
                    }
                    return;
                }
                Ok(_) => true,
                Err(_) => false,
            },
        };
        if transient {
            // No stream leader right now: nothing was stored; send again after a pause.
            self.back_off(now);
        }
        self.requeue_in_flight(now);
    }

    /// Index of the batch a reply subject belongs to.
    pub(super) fn batch_of(&self, subject: &str) -> Option<usize> {
        let rest = subject
            .strip_prefix(self.inbox.as_str())?
            .strip_prefix('.')?;
        let id = rest.split('.').next()?;
        self.batches.iter().position(|b| b.id == id)
    }
}

/// `<inbox>.<batch id>.<flow>.fail.<seq>.<op>.$FI`: the server reads it from the right.
/// Built without `format!`: this runs for every QoS 1 message.
pub(super) fn reply_subject(inbox: &str, batch: &Batch, seq: u64, op: Op) -> String {
    let mut reply = String::with_capacity(inbox.len() + batch.id.len() + 48);
    reply.push_str(inbox);
    reply.push('.');
    reply.push_str(&batch.id);
    reply.push('.');
    reply.push_str(itoa::Buffer::new().format(batch.flow));
    reply.push_str(".fail.");
    reply.push_str(itoa::Buffer::new().format(seq));
    reply.push('.');
    reply.push(char::from(b'0' + op as u8));
    reply.push_str(".$FI");
    reply
}

/// `<inbox>._s<id>`: an ordinary JetStream publish, answered with its own ack.
pub(super) fn alone_reply(inbox: &str, id: u64) -> String {
    let mut reply = String::with_capacity(inbox.len() + 24);
    reply.push_str(inbox);
    reply.push('.');
    reply.push_str(ALONE_TOKEN);
    reply.push_str(itoa::Buffer::new().format(id));
    reply
}

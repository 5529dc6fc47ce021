//! Bundles: queued messages of one subject that go out together as one stream message
//! ([`jetmq_common::envelope::encode_bundle`]), keeping each publisher's order.

use std::collections::VecDeque;

use bytes::Bytes;
use tokio::time::Instant;

use super::{Book, QueuedPublish, BUNDLE_SCAN};

impl Book {
    /// The body to send for `first`: its own, or a bundle of it and the queued messages
    /// that may go with it (taken out of the queue and returned).
    pub(super) fn bundle(
        &mut self,
        first: &QueuedPublish,
        now: Instant,
    ) -> (Bytes, Vec<QueuedPublish>) {
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
    fn take_companions(&mut self, first: &QueuedPublish, now: Instant) -> Vec<QueuedPublish> {
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
}

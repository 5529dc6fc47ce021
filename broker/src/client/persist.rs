//! Writing the session record back: batched, one write in flight, compare-and-set.
//!
//! A write waits out a session store that does not answer (a bucket leader election) for
//! up to `session.store_outage_grace_ms`, retrying in place (see [`crate::session`]'s
//! store); the connection meanwhile goes on serving its client, and what needs the write
//! queues behind it, bounded by [`MAX_WAITING_FOR_PERSIST`]. Only a store gone for longer
//! than that closes the connection.
//!
//! Actions that must not happen before the record is durable (SUBACK, PUBREL, PUBCOMP, the
//! JetStream publish of a QoS 2 message) wait in `waiting_for_persist` and run when the
//! write that covers them has been acknowledged.

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use jetmq_codec::Packet;
use jetmq_common::envelope::Envelope;

use super::{Client, Exit};
use crate::session::StoreError;

pub(super) type PersistFuture = Pin<Box<dyn Future<Output = Result<u64, StoreError>> + Send>>;

/// How far (in stream sequences) an idle session's stored cursor may trail.
const IDLE_CURSOR_SLACK: u64 = 100_000;

/// Consecutive failed writes after which the connection gives up.
const MAX_PERSIST_FAILURES: u32 = 5;

/// Actions waiting for the next write (SUBACKs, PUBCOMPs, QoS 2 publishes) above which the
/// connection stops reading its socket until a write lands: while the store is away, a
/// client that keeps subscribing must not grow the queue without bound.
pub(super) const MAX_WAITING_FOR_PERSIST: usize = 1024;

pub(super) enum AfterPersist {
    Send(Packet),
    /// Retained messages for a new subscription: they follow its SUBACK.
    Deliver(Vec<crate::routing::Delivery>),
    PublishQos2 {
        topic: String,
        envelope: Box<Envelope>,
        payload: Bytes,
        packet_id: u16,
        msg_id: String,
    },
}

impl<R: tokio::io::AsyncRead + Unpin, W: tokio::io::AsyncWrite + Unpin> Client<R, W> {
    pub(super) fn after_persist(&mut self, action: AfterPersist) {
        self.waiting_for_persist.push(action);
    }

    /// Starts a write if something waits for one, or (`periodic`) if the position moved.
    pub(super) fn maybe_start_persist(&mut self, periodic: bool) {
        if self.persist.is_some() {
            return;
        }
        let cursor = self.delivery.durable_cursor();
        // Only a session that outlives its connection is ever resumed from its stored
        // position; one with expiry 0 ends with its connection (also when its node dies),
        // so its position is written only when something waits for a write anyway.
        let resumable = self.record.expiry_secs > 0;
        // A quiet session's cursor follows the stream too, but writing it every second for
        // every idle client would be a KV write per client per second for nothing. It is
        // written when it covers messages this session actually got, or once it is far
        // behind (so a replay after a crash stays short), and always at disconnect.
        let moved = resumable
            && cursor != self.persisted_cursor
            && (self.delivery.delivered_since_persist
                || cursor - self.persisted_cursor.min(cursor) > IDLE_CURSOR_SLACK);
        let needed = !self.waiting_for_persist.is_empty()
            || (periodic
                && (moved || self.record_dirty || (resumable && self.delivery.released_changed)));
        if !needed {
            return;
        }
        // A write for the cursor alone can wait: the position every idle session follows is
        // the node's, so thousands of them cross the slack in the same tick, and each write
        // in flight holds a copy of its record and a KV request (10,000 connections: tens
        // of MB at once, more the slower JetStream answers). Such writes take a permit from a
        // node-wide pool; without one this tick is skipped and the next one tries again.
        // Anything that must become durable (a SUBACK, a release, a delivery) never waits.
        let cursor_only = self.waiting_for_persist.is_empty()
            && !self.record_dirty
            && !self.delivery.released_changed
            && !self.delivery.delivered_since_persist;
        let permit = if cursor_only {
            match self.context.idle_cursor_writes.clone().try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => return,
            }
        } else {
            None
        };
        self.record.cursor = cursor;
        self.record.released = self.delivery.released_in_order();
        self.record_dirty = false;
        self.delivery.released_changed = false;
        self.delivery.delivered_since_persist = false;
        self.riding_on_persist = std::mem::take(&mut self.waiting_for_persist);
        let store = self.context.sessions.clone();
        let record = self.record.clone();
        let revision = self.revision;
        self.persist = Some(Box::pin(async move {
            let deadline = store.outage_deadline();
            let result = store.save_until(&record, revision, deadline).await;
            drop(permit);
            result
        }));
    }

    pub(super) async fn persist_finished(
        &mut self,
        result: Result<u64, StoreError>,
    ) -> Result<(), Exit> {
        match result {
            Ok(revision) => {
                self.revision = revision;
                self.persisted_cursor = self.record.cursor;
                self.persist_failures = 0;
                for action in std::mem::take(&mut self.riding_on_persist) {
                    self.run_after_persist(action).await?;
                }
                Ok(())
            }
            Err(StoreError::Conflict) => self.revision_conflict().await,
            Err(err @ StoreError::Unavailable(_)) => {
                // The write already waited the whole grace: the store is gone for good, as
                // far as this connection can tell. The client reconnects, and its claim
                // waits for the store in turn.
                tracing::warn!(client_id = %self.client_id, error = %err, grace_ms = self.context.config.session.store_outage_grace_ms, "session store unavailable for longer than the grace; disconnecting");
                self.write_again();
                self.send_disconnect(jetmq_codec::ReasonCode::SERVER_BUSY);
                Err(Exit::Abnormal)
            }
            Err(err) => {
                self.persist_failures += 1;
                tracing::warn!(client_id = %self.client_id, error = %err, failures = self.persist_failures, "session write failed");
                self.write_again();
                if self.persist_failures >= MAX_PERSIST_FAILURES {
                    self.send_disconnect(jetmq_codec::ReasonCode::SERVER_BUSY);
                    return Err(Exit::Abnormal);
                }
                tokio::time::sleep(std::time::Duration::from_millis(
                    100 << self.persist_failures.min(4),
                ))
                .await;
                Ok(())
            }
        }
    }

    /// The write failed: what rode on it waits for the next one (first, in order), and the
    /// record is written again even if nothing else changes.
    fn write_again(&mut self) {
        let mut retry = std::mem::take(&mut self.riding_on_persist);
        retry.append(&mut self.waiting_for_persist);
        self.waiting_for_persist = retry;
        self.record_dirty = true;
    }

    /// The stored revision is not the one this connection last wrote. Normally another
    /// connection claimed the session; but only a claim changes the owner, so a record
    /// that still names this connection was written by this connection itself (a write
    /// whose acknowledgement was lost and that landed anyway, or a stale read). Then the
    /// connection keeps the session and writes its state again on the newer revision.
    async fn revision_conflict(&mut self) -> Result<(), Exit> {
        let sessions = &self.context.sessions;
        let stored = sessions
            .load_until(&self.client_id, sessions.outage_deadline())
            .await;
        match stored {
            Ok((Some(stored), revision))
                if stored.owner.is_some()
                    && stored.owner == self.record.owner
                    && self.persist_failures < MAX_PERSIST_FAILURES =>
            {
                self.persist_failures += 1;
                tracing::info!(client_id = %self.client_id, expected = self.revision, stored = revision, "session record moved on under this connection's own write; writing it again");
                self.revision = revision;
                self.write_again();
                Ok(())
            }
            Ok((stored, revision)) => {
                let owner = stored.and_then(|r| r.owner);
                tracing::info!(
                    client_id = %self.client_id,
                    expected = self.revision,
                    stored = revision,
                    owner_node = owner.as_ref().map(|o| o.node.as_str()).unwrap_or("none"),
                    owner_connection = owner.as_ref().map(|o| o.connection).unwrap_or(0),
                    "session record changed elsewhere: taken over"
                );
                self.send_disconnect(jetmq_codec::ReasonCode::SESSION_TAKEN_OVER);
                Err(Exit::TakenOver)
            }
            Err(err) => {
                // Cannot tell: the safe side is to give the session up, as before.
                tracing::info!(client_id = %self.client_id, error = %err, "session record changed elsewhere and cannot be read: giving it up");
                self.send_disconnect(jetmq_codec::ReasonCode::SESSION_TAKEN_OVER);
                Err(Exit::TakenOver)
            }
        }
    }

    async fn run_after_persist(&mut self, action: AfterPersist) -> Result<(), Exit> {
        match action {
            AfterPersist::Send(packet) => {
                let _ = self.writer.queue(&packet);
                Ok(())
            }
            AfterPersist::Deliver(deliveries) => {
                for delivery in deliveries {
                    if self.delivery.push_extra(delivery)
                        == crate::session::delivery::Accept::Dropped
                    {
                        self.context.metrics.dropped_queue_full.inc();
                    }
                }
                Ok(())
            }
            AfterPersist::PublishQos2 {
                topic,
                envelope,
                payload,
                packet_id,
                msg_id,
            } => {
                self.store_inbound(topic, *envelope, payload, packet_id, Some(&msg_id))
                    .await
            }
        }
    }
}

//! The end of a connection's session: the final session write, at a hand-over or at close,
//! and the connection's will, published (through [`crate::will`]) or scheduled.

use super::Client;
use crate::session::{now_ms, StoreError, StoredWill};
use crate::will::{publish_will, will_timer};

impl<R: tokio::io::AsyncRead + Unpin, W: tokio::io::AsyncWrite + Unpin> Client<R, W> {
    pub(super) async fn publish_own_will(&mut self) {
        if let Some(will) = self.record.will.take() {
            self.send_will(&will).await;
        }
    }

    /// Publishes `will` as this connection's.
    pub(super) async fn send_will(&mut self, will: &StoredWill) {
        publish_will(
            &self.context,
            &self.client_id,
            self.username.as_deref(),
            will,
        )
        .await;
    }

    /// Another connection takes the session: write where this one got to, so the next
    /// owner neither repeats acknowledged messages nor forgets released QoS 2 ones. A
    /// conflict means the new owner claimed first (it stopped waiting): nothing to add.
    /// Returns true in that case: the new owner did not hear from this connection, and has
    /// published its will itself if one was due.
    pub(super) async fn hand_over_session(&mut self) -> bool {
        if let Some(pending) = self.persist.take() {
            match pending.await {
                Ok(revision) => self.revision = revision,
                Err(StoreError::Conflict) => return true,
                // Landed or not, nobody knows (the node may have hung with it in flight):
                // the final write below finds out.
                Err(_) => {}
            }
        }
        let own = self.record.owner.take();
        self.record.will_due_ms = None;
        self.record.disconnected_at_ms = Some(now_ms());
        self.record.cursor = self.delivery.durable_cursor();
        self.record.released = self.delivery.released_in_order();
        self.record.sent_upto = Some(self.delivery.sent_upto());
        let sessions = &self.context.sessions;
        let mut revision = self.revision;
        // Twice at most: the second time on the revision of this connection's own write.
        for _ in 0..2 {
            match sessions
                .save_until(&self.record, revision, sessions.outage_deadline())
                .await
            {
                Ok(_) => return false,
                Err(StoreError::Conflict) => {
                    // Only a claim changes the owner: a record that still names this
                    // connection holds a write of its own whose answer was lost.
                    match sessions
                        .load_until(&self.client_id, sessions.outage_deadline())
                        .await
                    {
                        Ok((Some(stored), stored_revision))
                            if own.is_some() && stored.owner == own =>
                        {
                            revision = stored_revision
                        }
                        _ => return true,
                    }
                }
                Err(err) => {
                    tracing::warn!(client_id = %self.client_id, error = %err, "session write failed at hand-over");
                    return false;
                }
            }
        }
        true
    }

    /// The connection is gone: publish or schedule the will, then either delete the session
    /// (no expiry) or leave it for a later connection, marked as disconnected.
    /// `min_will_delay` (seconds, drain only) postpones the will of a persistent session so
    /// a client that resumes it elsewhere in time cancels it.
    ///
    /// The record is written first and a will due now goes out after: a write that fails
    /// its compare-and-set proves that another connection claimed the session meanwhile,
    /// and that one (or the janitor) has already published the will if it was due, because
    /// this node did not answer its hand-over (it hung, or stalled). Any other failure
    /// leaves this node as the only one that can publish it, so it does.
    pub(super) async fn end_session(&mut self, min_will_delay: u32) {
        if let Some(pending) = self.persist.take() {
            match pending.await {
                Ok(revision) => self.revision = revision,
                Err(StoreError::Conflict) => return,
                Err(err) => {
                    tracing::warn!(client_id = %self.client_id, error = %err, "session write failed at close")
                }
            }
        }
        let store = self.context.sessions.clone();
        let now = now_ms();
        if self.record.expiry_secs == 0 {
            // The session ends with the connection, and a pending will goes out with it.
            // (Boxed, here and below: only the step in progress takes memory. At a mass
            // disconnect every closing connection waits here at once.)
            let result = Box::pin(store.delete_until(
                &self.client_id,
                self.revision,
                store.outage_deadline(),
            ))
            .await;
            match &result {
                Ok(()) | Err(StoreError::Conflict) => {}
                Err(err) => {
                    tracing::warn!(client_id = %self.client_id, error = %err, "cannot delete ended session")
                }
            }
            if !matches!(result, Err(StoreError::Conflict)) {
                Box::pin(self.publish_own_will()).await;
            }
            return;
        }
        let mut due = None;
        let mut will_now = None;
        match self
            .record
            .will
            .as_ref()
            .map(|w| w.delay_secs.max(min_will_delay))
        {
            Some(0) => will_now = self.record.will.take(),
            Some(delay) => {
                let delay_ms = u64::from(delay.min(self.record.expiry_secs)) * 1000;
                due = Some(now + delay_ms);
            }
            None => {}
        }
        self.record.will_due_ms = due;
        self.record.owner = None;
        self.record.disconnected_at_ms = Some(now);
        self.record.cursor = self.delivery.durable_cursor();
        self.record.released = self.delivery.released_in_order();
        self.record.sent_upto = Some(self.delivery.sent_upto());
        let result =
            Box::pin(store.save_until(&self.record, self.revision, store.outage_deadline())).await;
        match &result {
            Ok(_) => {
                if let Some(due) = due {
                    tokio::spawn(will_timer(
                        self.context.clone(),
                        self.client_id.to_string(),
                        due,
                    ));
                }
            }
            Err(StoreError::Conflict) => {}
            Err(err) => {
                tracing::warn!(client_id = %self.client_id, error = %err, "cannot save session at close")
            }
        }
        if let Some(will) = will_now.filter(|_| !matches!(result, Err(StoreError::Conflict))) {
            Box::pin(self.send_will(&will)).await;
        }
    }
}

//! Wills and the end of a session.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use jetmq_common::envelope::{Envelope, MessageProperties};

use super::Client;
use crate::auth::{Action, Principal};
use crate::server::Node;
use crate::session::{now_ms, StoreError, StoredWill};

/// Publishes a will and waits until it is stored.
pub(crate) async fn publish_will(
    node: &Node,
    client_id: &str,
    username: Option<&str>,
    will: &StoredWill,
) {
    let who = Principal {
        username,
        client_id,
    };
    if crate::sys_topics::is_reserved(&will.topic)
        || !node.config.acl.allowed(who, Action::Publish, &will.topic)
    {
        tracing::info!(client_id, topic = %will.topic, "will denied by ACL; not published");
        return;
    }
    let p = &will.properties;
    let envelope = Envelope {
        qos: will.qos.min(2),
        retain: will.retain,
        client_id: client_id.to_owned(),
        timestamp_ms: now_ms(),
        properties: MessageProperties {
            payload_format_indicator: p.payload_format_indicator,
            message_expiry_interval: p.message_expiry_interval,
            content_type: p.content_type.clone(),
            response_topic: p.response_topic.clone(),
            correlation_data: p.correlation_data.clone().map(Bytes::from),
            user_properties: p.user_properties.clone(),
        },
    };
    let payload = Bytes::from(will.payload.clone());
    let stored = match node
        .ingress
        .publish(&will.topic, &envelope, payload, None)
        .await
    {
        Ok(ack) => tokio::time::timeout(Duration::from_secs(10), ack)
            .await
            .map_err(|_| "timed out".to_owned())
            .and_then(|r| r.map_err(|e| e.to_string())),
        Err(err) => Err(err.to_string()),
    };
    match stored {
        Ok(()) => {
            node.metrics.wills_published.inc();
            tracing::info!(client_id, topic = %will.topic, "will published");
        }
        Err(err) => {
            tracing::warn!(client_id, topic = %will.topic, error = %err, "will could not be published")
        }
    }
}

/// Publishes a delayed will when it falls due, unless the session was resumed meanwhile.
async fn will_timer(node: Arc<Node>, client_id: String, due_ms: u64) {
    let wait = due_ms.saturating_sub(now_ms());
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
        _ = node.shutdown.cancelled() => return,
    }
    let store = &node.cluster.sessions;
    let Ok((Some(mut record), revision)) = store.load(&client_id).await else {
        return;
    };
    if record.owner.is_some() || record.will_due_ms != Some(due_ms) {
        return;
    }
    let Some(will) = record.will.take() else {
        return;
    };
    record.will_due_ms = None;
    // Written before the will goes out, so that a resume or a janitor acting at the same
    // moment makes this write fail and the will is published at most once.
    let result = if record.is_expired(now_ms()) {
        store.delete(&client_id, revision).await
    } else {
        store.save(&record, revision).await.map(|_| ())
    };
    match result {
        Ok(()) => publish_will(&node, &client_id, record.username.as_deref(), &will).await,
        Err(err) => {
            tracing::debug!(client_id, error = %err, "session record changed before the delayed will was due; not published")
        }
    }
}

impl<R: tokio::io::AsyncRead + Unpin, W: tokio::io::AsyncWrite + Unpin> Client<R, W> {
    pub(super) async fn publish_own_will(&mut self) {
        if let Some(will) = self.record.will.take() {
            self.send_will(&will).await;
        }
    }

    /// Publishes `will` as this connection's.
    pub(super) async fn send_will(&mut self, will: &StoredWill) {
        publish_will(&self.node, &self.client_id, self.username.as_deref(), will).await;
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
                Err(_) => return false,
            }
        }
        self.record.owner = None;
        self.record.will_due_ms = None;
        self.record.disconnected_at_ms = Some(now_ms());
        self.record.cursor = self.delivery.durable_cursor();
        self.record.released = self.delivery.released_in_order();
        self.record.sent_upto = Some(self.delivery.sent_upto());
        let sessions = &self.node.cluster.sessions;
        match sessions
            .save_until(&self.record, self.revision, sessions.outage_deadline())
            .await
        {
            Ok(_) => false,
            Err(StoreError::Conflict) => true,
            Err(err) => {
                tracing::warn!(client_id = %self.client_id, error = %err, "session write failed at hand-over");
                false
            }
        }
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
        let store = self.node.cluster.sessions.clone();
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
                        self.node.clone(),
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

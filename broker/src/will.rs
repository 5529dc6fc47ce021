//! Publishing wills: the one way a will reaches JetStream, whoever sends it.
//!
//! A will goes out from three places: the connection that ends (`client`), a delayed will's
//! timer on the node where its connection ended ([`will_timer`]), and the janitor for the
//! clients of a node that died (`janitor`). All of them write the session record first and
//! publish only if that write landed, so a will is published at most once; this module
//! does the publishing itself (ACL check, envelope, waiting for the store).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use jetmq_common::envelope::{Envelope, MessageProperties};

use crate::auth::{Action, Principal};
use crate::node::ConnContext;
use crate::session::{now_ms, StoredWill};

/// Publishes `will` of `client_id`, judged by the ACL as `username`'s, and waits until it
/// is stored (at most 10 s). Failures are logged, not returned: nobody could retry them.
pub async fn publish_will(
    context: &ConnContext,
    client_id: &str,
    username: Option<&str>,
    will: &StoredWill,
) {
    let who = Principal {
        username,
        client_id,
    };
    if crate::sys_topics::is_reserved(&will.topic)
        || !context
            .config
            .acl
            .allowed(who, Action::Publish, &will.topic)
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
    let stored = match context
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
            context.metrics.wills_published.inc();
            tracing::info!(client_id, topic = %will.topic, "will published");
        }
        Err(err) => {
            tracing::warn!(client_id, topic = %will.topic, error = %err, "will could not be published")
        }
    }
}

/// Publishes a delayed will when it falls due at `due_ms` (the record's `will_due_ms`),
/// unless the session was resumed or settled meanwhile. Spawned by a connection that ended
/// with a delayed will; gives up at the node's hard stop, leaving the will to the janitor.
pub async fn will_timer(context: Arc<ConnContext>, client_id: String, due_ms: u64) {
    let wait = due_ms.saturating_sub(now_ms());
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
        _ = context.shutdown.cancelled() => return,
    }
    let store = &context.sessions;
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
        Ok(()) => publish_will(&context, &client_id, record.username.as_deref(), &will).await,
        Err(err) => {
            tracing::debug!(client_id, error = %err, "session record changed before the delayed will was due; not published")
        }
    }
}

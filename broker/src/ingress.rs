//! Where a message enters JetStream: every PUBLISH and every will goes through here.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use async_nats::jetstream;
use bytes::Bytes;
use jetmq_common::envelope::Envelope;
use jetmq_common::subject;

use crate::retained::RetainedCache;
use crate::routing::StoredMessage;

pub type AckFuture = Pin<Box<dyn Future<Output = Result<(), PublishError>> + Send>>;

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("message could not be stored: {0}")]
    Store(String),
    #[error("message envelope: {0}")]
    Envelope(#[from] jetmq_common::envelope::EnvelopeError),
}

/// Publishes messages for one node.
#[derive(Clone)]
pub struct Ingress {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub retained: Arc<RetainedCache>,
}

impl Ingress {
    /// Sends a message on its way. For QoS 0 the returned future resolves at once; for
    /// QoS 1/2 it resolves when JetStream has stored the message (and, if retained, the
    /// retained copy). `msg_id` lets JetStream drop a retransmitted duplicate.
    pub async fn publish(
        &self,
        topic: &str,
        envelope: &Envelope,
        payload: Bytes,
        msg_id: Option<&str>,
    ) -> Result<AckFuture, PublishError> {
        let body = envelope.encode(&payload)?;
        let retained_body = envelope.retain.then(|| body.clone());
        let store = |e: &dyn std::fmt::Display| PublishError::Store(e.to_string());
        let main: AckFuture = if envelope.qos == 0 {
            self.client
                .publish(subject::publish_subject(topic), body)
                .await
                .map_err(|e| store(&e))?;
            Box::pin(async { Ok(()) })
        } else {
            let mut publish = jetstream::message::PublishMessage::build().payload(body);
            if let Some(id) = msg_id {
                publish = publish.message_id(id);
            }
            let ack = self
                .js
                .send_publish(subject::publish_subject(topic), publish)
                .await
                .map_err(|e| store(&e))?;
            Box::pin(async move { ack.await.map(|_| ()).map_err(|e| store(&e)) })
        };
        let Some(retained_body) = retained_body else {
            return Ok(main);
        };
        // Mirror locally right away so this node answers the next SUBSCRIBE correctly even
        // before the retained stream echoes the message back.
        self.retained.apply(Arc::new(StoredMessage {
            seq: 0,
            topic: topic.to_owned(),
            envelope: envelope.clone(),
            payload,
        }));
        let retained_ack = self
            .js
            .publish(subject::retained_subject(topic), retained_body)
            .await
            .map_err(|e| store(&e))?;
        Ok(Box::pin(async move {
            main.await?;
            retained_ack.await.map(|_| ()).map_err(|e| store(&e))
        }))
    }
}

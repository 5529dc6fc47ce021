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
use crate::telemetry::PublishTrace;

pub type AckFuture = Pin<Box<dyn Future<Output = Result<(), PublishError>> + Send>>;

/// Retries of a publish that found no stream leader: 50 ms, 100 ms, ... about 8 s in all.
const NO_RESPONDERS_RETRIES: u32 = 17;

async fn send_on(
    js: &jetstream::Context,
    subject: &str,
    body: Bytes,
    msg_id: Option<&str>,
    headers: Option<&async_nats::HeaderMap>,
) -> Result<jetstream::context::PublishAckFuture, PublishError> {
    let mut publish = jetstream::message::PublishMessage::build().payload(body);
    if let Some(id) = msg_id {
        publish = publish.message_id(id);
    }
    if let Some(headers) = headers {
        publish = publish.headers(headers.clone());
    }
    js.send_publish(subject.to_owned(), publish)
        .await
        .map_err(|e| PublishError::Store(e.to_string()))
}

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
    async fn send(
        &self,
        subject: &str,
        body: Bytes,
        msg_id: Option<&str>,
        headers: Option<&async_nats::HeaderMap>,
    ) -> Result<jetstream::context::PublishAckFuture, PublishError> {
        send_on(&self.js, subject, body, msg_id, headers).await
    }

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
        let subject = subject::publish_subject(topic);
        // Tracing off: one atomic load. On and sampled: a span until JetStream's ack, and
        // its traceparent in the NATS headers for the ingestor.
        let trace = PublishTrace::start(topic, &subject, envelope);
        let headers = trace.as_ref().map(|t| &t.headers);
        let main: AckFuture = if envelope.qos == 0 {
            let sent = match headers {
                None => self.client.publish(subject, body).await,
                Some(h) => {
                    self.client
                        .publish_with_headers(subject, h.clone(), body)
                        .await
                }
            };
            let sent = sent.map_err(|e| PublishError::Store(e.to_string()));
            if let Some(t) = trace {
                t.end(sent.as_ref().err().map(|e| e as _));
            }
            sent?;
            Box::pin(async { Ok(()) })
        } else {
            let msg_id = msg_id.map(str::to_owned);
            let first = self
                .send(&subject, body.clone(), msg_id.as_deref(), headers)
                .await?;
            let js = self.js.clone();
            let headers = headers.cloned();
            let stored = async move {
                let mut ack = first;
                let mut attempt = 0u32;
                loop {
                    match ack.await {
                        Ok(_) => return Ok(()),
                        // "No responders": no stream leader right now (a NATS node just
                        // died, or the stream is being created). Nothing was stored, so
                        // sending again cannot duplicate.
                        Err(err)
                            if err.kind()
                                == jetstream::context::PublishErrorKind::StreamNotFound
                                && attempt < NO_RESPONDERS_RETRIES =>
                        {
                            attempt += 1;
                            tokio::time::sleep(std::time::Duration::from_millis(
                                50 * u64::from(attempt),
                            ))
                            .await;
                            ack = send_on(
                                &js,
                                &subject,
                                body.clone(),
                                msg_id.as_deref(),
                                headers.as_ref(),
                            )
                            .await?;
                        }
                        Err(err) => return Err(PublishError::Store(err.to_string())),
                    }
                }
            };
            match trace {
                None => Box::pin(stored),
                Some(t) => Box::pin(async move {
                    let result = stored.await;
                    t.end(result.as_ref().err().map(|e| e as _));
                    result
                }),
            }
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
            .map_err(|e| PublishError::Store(e.to_string()))?;
        Ok(Box::pin(async move {
            main.await?;
            retained_ack
                .await
                .map(|_| ())
                .map_err(|e| PublishError::Store(e.to_string()))
        }))
    }
}

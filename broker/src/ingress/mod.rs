//! Where a message enters JetStream: every PUBLISH and every will goes through here.
//!
//! QoS 0 is a plain NATS publish (no acknowledgement). QoS 1 goes through the node's
//! [`batch::BatchPublisher`] when the stream allows batches; QoS 2 (which needs JetStream's
//! de-duplication by `Nats-Msg-Id`), retained copies and wills are published one by one and
//! each acknowledged. Everything here calls a message published on its own, with its own
//! acknowledgement, a message published *alone* (`nats.max_publishes_alone`,
//! `nats.batch_publish_after`).
//!
//! How it is used: the server builds one [`Ingress`] per node; a connection calls
//! [`Ingress::publish_in_order`] with its [`PublishOrder`] (a will: [`Ingress::publish`])
//! and acknowledges the PUBLISH once the returned [`AckFuture`] resolves. A
//! [`PublishError`] tells it whether to answer "quota exceeded"
//! ([`PublishError::is_store_full`]) or disconnect so that the client sends it again.

pub mod batch;
mod order;

pub use order::PublishOrder;

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
/// The pauses grow linearly (50 ms more each time), not by doubling, so this loop does not
/// use [`jetmq_common::retry::Backoff`].
const NO_RESPONDERS_RETRIES: u32 = 17;

/// Tells publishers apart for the batch task's bundles (equal hashes only make bundles
/// smaller: messages of both publishers then keep their order together).
static PUBLISHER_HASHER: std::hash::BuildHasherDefault<std::collections::hash_map::DefaultHasher> =
    std::hash::BuildHasherDefault::new();

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
        .map_err(PublishError::Store)
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// JetStream did not take the message, or did not acknowledge it.
    #[error("message could not be stored: {0}")]
    Store(#[source] jetstream::context::PublishError),
    /// NATS did not take a QoS 0 message (the connection is closed).
    #[error("message could not be stored: {0}")]
    Send(#[source] async_nats::client::PublishError),
    /// The node did not send the message, or gave up waiting for it: no error underneath.
    #[error("message could not be stored: {0}")]
    NotStored(&'static str),
    #[error("message could not be stored: {0}")]
    Batch(#[from] batch::BatchError),
    #[error("message envelope: {0}")]
    Envelope(#[from] jetmq_common::envelope::EnvelopeError),
    /// JetStream refused the message for lack of room (see
    /// [`jetmq_common::streams::is_store_full`]).
    #[error("message store full: {0}")]
    StoreFull(#[source] jetstream::context::PublishError),
}

impl PublishError {
    /// The message was refused because the store has no room for it: the publisher is told
    /// (MQTT 5: reason 0x97, quota exceeded) rather than disconnected to send it again.
    pub fn is_store_full(&self) -> bool {
        matches!(
            self,
            PublishError::StoreFull(_) | PublishError::Batch(batch::BatchError::StoreFull(_))
        )
    }

    /// From a JetStream publish acknowledgement that did not come.
    fn from_ack(err: jetstream::context::PublishError) -> PublishError {
        let code = std::error::Error::source(&err)
            .and_then(|source| source.downcast_ref::<jetstream::Error>())
            .map(|api| api.error_code().0);
        match code {
            Some(code) if jetmq_common::streams::is_store_full(code) => {
                PublishError::StoreFull(err)
            }
            _ => PublishError::Store(err),
        }
    }
}

/// Publishes messages for one node.
#[derive(Clone)]
pub struct Ingress {
    pub client: async_nats::Client,
    /// Shared: a Context clone copies a whole client (several Arcs and a channel sender),
    /// which showed up per message in profiles.
    pub js: Arc<jetstream::Context>,
    pub retained: Arc<RetainedCache>,
    /// QoS 1 in batches; `None` when configured off or the stream does not allow them.
    pub batches: Option<batch::BatchPublisher>,
    /// Slots for messages published one by one and waiting for their acks
    /// (`nats.max_publishes_alone`).
    pub alone: Arc<tokio::sync::Semaphore>,
    pub metrics: Arc<crate::telemetry::Metrics>,
}

/// How long a message waits for a slot among those published one by one before its
/// publish fails (as one that JetStream did not confirm in time would).
const ALONE_SLOT_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// A message published one by one holds one of these until its ack arrived.
struct AloneSlot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    metrics: Arc<crate::telemetry::Metrics>,
}

impl Drop for AloneSlot {
    fn drop(&mut self) {
        self.metrics.publishes_alone_in_flight.dec();
    }
}

impl Ingress {
    /// Waits (bounded) for a slot among the messages published one by one.
    async fn alone_slot(&self) -> Result<AloneSlot, PublishError> {
        let permit = match self.alone.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                self.metrics.publishes_alone_waits.inc();
                tokio::time::timeout(ALONE_SLOT_WAIT, self.alone.clone().acquire_owned())
                    .await
                    .map_err(|_| {
                        PublishError::NotStored(
                            "JetStream has not acknowledged earlier messages for 10 s",
                        )
                    })?
                    .map_err(|_| PublishError::NotStored("node is shutting down"))?
            }
        };
        self.metrics.publishes_alone_in_flight.inc();
        Ok(AloneSlot {
            _permit: permit,
            metrics: self.metrics.clone(),
        })
    }

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
        self.publish_in_order(topic, envelope, payload, msg_id, None)
            .await
    }

    /// [`Ingress::publish`] for a publisher whose messages published one by one (QoS 2, QoS
    /// 1 outside batches) must be stored in the order they come: `order` is that
    /// publisher's ([`PublishOrder`]).
    pub async fn publish_in_order(
        &self,
        topic: &str,
        envelope: &Envelope,
        payload: Bytes,
        msg_id: Option<&str>,
        order: Option<&PublishOrder>,
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
            let sent = sent.map_err(PublishError::Send);
            if let Some(t) = trace {
                t.end(sent.as_ref().err().map(|e| e as _));
            }
            sent?;
            Box::pin(async { Ok(()) })
        } else {
            let batches = self
                .batches
                .as_ref()
                .filter(|b| envelope.qos == 1 && msg_id.is_none() && b.is_available());
            let stored: AckFuture = match batches {
                Some(batches) => {
                    let subject = async_nats::Subject::from(subject);
                    let source = {
                        use std::hash::BuildHasher;
                        PUBLISHER_HASHER.hash_one(envelope.client_id.as_str())
                    };
                    let confirmed = batches
                        .submit(subject.clone(), body.clone(), headers.cloned(), source)
                        .await;
                    let js = self.js.clone();
                    let headers = headers.cloned();
                    Box::pin(async move {
                        match confirmed.await {
                            Ok(Ok(())) => Ok(()),
                            Ok(Err(batch::BatchError::Unsupported)) => {
                                // The stream stopped allowing batches: this one goes alone.
                                let subject = subject.to_string();
                                let first =
                                    send_on(&js, &subject, body.clone(), None, headers.as_ref())
                                        .await?;
                                stored_alone(first, js, subject, body, None, headers, None).await
                            }
                            Ok(Err(err)) => Err(err.into()),
                            Err(_) => Err(PublishError::NotStored("batch publisher stopped")),
                        }
                    })
                }
                None => {
                    let slot = self.alone_slot().await?;
                    // Not while an earlier message of this publisher waits to be sent
                    // again: this one would be stored before it.
                    if let Some(order) = order {
                        order.wait_until_no_retry().await;
                    }
                    let msg_id = msg_id.map(str::to_owned);
                    let first = self
                        .send(&subject, body.clone(), msg_id.as_deref(), headers)
                        .await?;
                    let (in_order, settle) = match order {
                        Some(order) => {
                            let (earlier, settle) = order.take_turn();
                            (Some((order.clone(), earlier)), Some(settle))
                        }
                        None => (None, None),
                    };
                    let stored = stored_alone(
                        first,
                        self.js.clone(),
                        subject,
                        body,
                        msg_id,
                        headers.cloned(),
                        in_order,
                    );
                    // The slot is freed when the ack arrives, whoever waits for it: a
                    // connection that is itself waiting for a slot must not hold up the
                    // release of the slots its earlier messages took.
                    let (done, result) = tokio::sync::oneshot::channel();
                    tokio::spawn(async move {
                        let stored = stored.await;
                        if let Some(settle) = settle {
                            settle.settle(stored.is_ok());
                        }
                        let _ = done.send(stored);
                        drop(slot);
                    });
                    Box::pin(async move {
                        result
                            .await
                            .unwrap_or(Err(PublishError::NotStored("publish task ended")))
                    })
                }
            };
            match trace {
                None => stored,
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
            .map_err(PublishError::Store)?;
        Ok(Box::pin(async move {
            main.await?;
            retained_ack
                .await
                .map(|_| ())
                .map_err(PublishError::from_ack)
        }))
    }
}

/// Waits for one message's publish acknowledgement, sending it again while JetStream has
/// no stream leader ("no responders": nothing was stored, so this cannot duplicate).
///
/// With `order` (the publisher's [`PublishOrder`] and the outcome of its previous message):
/// while this one waits to go again, the publisher sends nothing new, and it goes again
/// only once the previous message is stored, so the publisher's messages are stored in
/// order. If the previous one failed (its client is being disconnected and will send both
/// again), this one fails too rather than be stored before it.
async fn stored_alone(
    first: jetstream::context::PublishAckFuture,
    js: Arc<jetstream::Context>,
    subject: String,
    body: Bytes,
    msg_id: Option<String>,
    headers: Option<async_nats::HeaderMap>,
    order: Option<(PublishOrder, order::Earlier)>,
) -> Result<(), PublishError> {
    let mut ack = first;
    let mut attempt = 0u32;
    let mut retrying = None;
    loop {
        match ack.await {
            Ok(_) => return Ok(()),
            Err(err)
                if err.kind() == jetstream::context::PublishErrorKind::StreamNotFound
                    && attempt < NO_RESPONDERS_RETRIES =>
            {
                if retrying.is_none() {
                    if let Some((order, earlier)) = &order {
                        retrying = Some(order.retrying());
                        if !earlier.clone().stored().await {
                            return Err(PublishError::NotStored(
                                "an earlier message of this publisher was not stored",
                            ));
                        }
                    }
                }
                attempt += 1;
                tokio::time::sleep(std::time::Duration::from_millis(50 * u64::from(attempt))).await;
                ack = send_on(
                    &js,
                    &subject,
                    body.clone(),
                    msg_id.as_deref(),
                    headers.as_ref(),
                )
                .await?;
            }
            Err(err) => return Err(PublishError::from_ack(err)),
        }
    }
}

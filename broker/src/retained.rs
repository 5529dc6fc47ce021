//! Retained messages: stored in the `JETMQ_RETAINED` stream (one message per topic), and
//! mirrored in memory on every node so a SUBSCRIBE is answered without a round trip.

use parking_lot::RwLock;
use std::collections::HashMap;
use std::sync::Arc;

use futures::StreamExt;
use jetmq_common::envelope::Envelope;
use jetmq_common::subject;
use tokio_util::sync::CancellationToken;

use crate::routing::stall::{self, StallWatch};
use crate::routing::{MessageRef, StoredMessage};
use crate::topic;

#[derive(Default)]
pub struct RetainedCache {
    by_topic: RwLock<HashMap<String, MessageRef>>,
}

impl RetainedCache {
    /// Records the retained message of a topic; an empty payload deletes it.
    pub fn apply(&self, msg: MessageRef) {
        let mut map = self.by_topic.write();
        if msg.payload.is_empty() {
            map.remove(&msg.topic);
        } else {
            map.insert(msg.topic.clone(), msg);
        }
    }

    /// Retained messages whose topic matches `filter` (without `$share/`).
    pub fn matching(&self, filter: &str) -> Vec<MessageRef> {
        let map = self.by_topic.read();
        if !filter.contains(['+', '#']) {
            return map.get(filter).cloned().into_iter().collect();
        }
        map.values()
            .filter(|m| topic::matches(filter, &m.topic))
            .cloned()
            .collect()
    }

    pub fn len(&self) -> usize {
        self.by_topic.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Mirrors the retained stream into `cache`: first the last message of every topic, then
/// every change. Resolves `loaded` once the initial state is in.
pub async fn run_retained_reader(
    cache: Arc<RetainedCache>,
    mut stream: async_nats::jetstream::stream::Stream,
    client: async_nats::Client,
    loaded: tokio::sync::oneshot::Sender<()>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut loaded = Some(loaded);
    let mut watch = StallWatch::default();
    // Survives NATS trouble like the message reader: re-reading the last message per topic
    // is idempotent for the cache.
    loop {
        match read_retained(
            &cache,
            &mut stream,
            &client,
            &mut loaded,
            &mut watch,
            &shutdown,
        )
        .await
        {
            Ok(()) => return Ok(()),
            Err(err) => {
                tracing::warn!(error = %err, "retained reader restarting");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
                }
            }
        }
    }
}

async fn read_retained(
    cache: &RetainedCache,
    stream: &mut async_nats::jetstream::stream::Stream,
    client: &async_nats::Client,
    loaded: &mut Option<tokio::sync::oneshot::Sender<()>>,
    watch: &mut StallWatch,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    use async_nats::jetstream::consumer::{push, DeliverPolicy};
    let initial = stream.get_info().await?.state.messages;
    if initial == 0 {
        if let Some(tx) = loaded.take() {
            let _ = tx.send(());
        }
    }
    let mut messages = stall::open_ordered(
        stream,
        push::OrderedConfig {
            deliver_subject: client.new_inbox(),
            filter_subject: format!("{}.>", subject::RETAINED_PREFIX),
            deliver_policy: DeliverPolicy::LastPerSubject,
            ..Default::default()
        },
    )
    .await?;
    let mut checks = stall::check_interval();
    // Deletes are stored messages too (empty payload), so the stream's last message is
    // always one this reader gets.
    let mut position = 0;
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = checks.tick() => {
                watch.check(stream, position).await?;
                continue;
            }
            next = messages.next() => next,
        };
        let Some(message) = next else {
            anyhow::bail!("retained reader ended");
        };
        // An error ends this consumer: it must not be polled again (see
        // [`stall::open_ordered`]). Re-reading the last message per topic is idempotent.
        let message = message.map_err(|err| anyhow::anyhow!("retained reader: {err}"))?;
        let (pending, seq) = message
            .info()
            .map(|i| (i.pending, i.stream_sequence))
            .unwrap_or((0, position));
        position = position.max(seq);
        match decode_retained(message.subject.as_str(), message.payload.clone()) {
            Ok(msg) => cache.apply(Arc::new(msg)),
            Err(err) => {
                tracing::warn!(subject = %message.subject, error = %err, "skipping undecodable retained message")
            }
        }
        if pending == 0 {
            if let Some(tx) = loaded.take() {
                let _ = tx.send(());
            }
        }
    }
}

fn decode_retained(subject_name: &str, body: bytes::Bytes) -> anyhow::Result<StoredMessage> {
    let topic = subject::parse_retained_subject(subject_name)?;
    let (envelope, payload) = Envelope::decode(body)?;
    Ok(StoredMessage {
        seq: 0,
        topic,
        envelope,
        payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn msg(topic: &str, payload: &'static [u8]) -> MessageRef {
        Arc::new(StoredMessage {
            seq: 0,
            topic: topic.into(),
            envelope: Envelope::default(),
            payload: Bytes::from_static(payload),
        })
    }

    #[test]
    fn empty_payload_deletes() {
        let cache = RetainedCache::default();
        cache.apply(msg("a/b", b"1"));
        cache.apply(msg("a/c", b"2"));
        assert_eq!(cache.matching("a/+").len(), 2);
        assert_eq!(cache.matching("a/b").len(), 1);
        cache.apply(msg("a/b", b""));
        assert_eq!(cache.matching("a/#").len(), 1);
        assert!(cache.matching("#").iter().all(|m| m.topic == "a/c"));
    }
}

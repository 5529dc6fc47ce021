//! Catching a session up: the messages between its own position and the router's.

use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::stream::Stream;
use futures::StreamExt;

use super::{decode_stream_messages, position, MessageRef, Router};
use crate::topic;

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("cannot create replay consumer: {0}")]
    Consumer(String),
    #[error("replay fetch failed: {0}")]
    Fetch(String),
}

/// Up to `limit` messages with `after < position <= upto` whose topic matches one of
/// `filters` (MQTT filters without `$share/`), oldest first, and the position up to which
/// the range has been looked at (`upto` unless `limit` cut it short).
pub async fn replay_range(
    router: &Router,
    stream: &Stream,
    filters: &[String],
    after: u64,
    upto: u64,
    limit: usize,
) -> Result<(Vec<MessageRef>, u64), ReplayError> {
    if upto <= after || filters.is_empty() {
        return Ok((Vec::new(), upto.max(after)));
    }
    let wanted = |msg: &MessageRef| filters.iter().any(|f| topic::matches(f, &msg.topic));
    if let Some(found) = router.ring_matching(filters, after, upto, limit) {
        return Ok(found);
    }
    from_jetstream(stream, filters, after, upto, limit, wanted).await
}

/// Empty answers in a row after which a JetStream replay gives up (and is retried later).
/// The pause before the next fetch grows linearly (20 ms more each time), not by doubling.
const MAX_EMPTY_FETCHES: u32 = 10;

async fn from_jetstream(
    stream: &Stream,
    filters: &[String],
    after: u64,
    upto: u64,
    limit: usize,
    wanted: impl Fn(&MessageRef) -> bool,
) -> Result<(Vec<MessageRef>, u64), ReplayError> {
    let prefix = jetmq_common::subject::SHARE_PREFIX;
    let mut subjects: Vec<String> = filters
        .iter()
        .flat_map(|f| jetmq_common::subject::filter_to_subjects(f))
        .map(|tokens| format!("{prefix}.*.{tokens}"))
        .collect();
    subjects.sort();
    subjects.dedup();
    let config = |filter_subjects: Vec<String>| pull::Config {
        deliver_policy: DeliverPolicy::ByStartSequence {
            start_sequence: position::first_stream_seq_after(after),
        },
        ack_policy: AckPolicy::None,
        filter_subjects,
        inactive_threshold: Duration::from_secs(30),
        memory_storage: true,
        ..Default::default()
    };
    // NATS refuses overlapping filter subjects on one consumer; then read everything and
    // let the MQTT match below do the filtering.
    let mut consumer = match stream.create_consumer(config(subjects)).await {
        Ok(consumer) => consumer,
        Err(_) => stream
            .create_consumer(config(vec![format!("{prefix}.>")]))
            .await
            .map_err(|e| ReplayError::Consumer(e.to_string()))?,
    };
    let mut out = Vec::new();
    let mut empty_fetches = 0u32;
    let reached = 'fetching: loop {
        let mut batch = consumer
            .fetch()
            .max_messages(256)
            .messages()
            .await
            .map_err(|e| ReplayError::Fetch(e.to_string()))?;
        let mut got_any = false;
        while let Some(message) = batch.next().await {
            let message = message.map_err(|e| ReplayError::Fetch(e.to_string()))?;
            got_any = true;
            let Ok(info) = message.info() else { continue };
            let seq = info.stream_sequence;
            if position::of(seq, 0) > upto {
                break 'fetching upto;
            }
            let pending = info.pending;
            let msgs = decode_stream_messages(
                Some(seq),
                message.subject.as_str(),
                message.payload.clone(),
            )
            .unwrap_or_default();
            // A bundle the session is in the middle of: only what follows its position.
            for msg in msgs.into_iter().filter(|m| m.seq > after && m.seq <= upto) {
                if wanted(&msg) {
                    if out.len() == limit {
                        break 'fetching msg.seq - 1;
                    }
                    out.push(msg);
                }
            }
            if pending == 0 {
                break 'fetching upto;
            }
        }
        if !got_any {
            // An empty fetch is not proof that nothing is left: a loaded server can answer
            // before the new consumer has found its first message. Only the consumer's own
            // count says the range is done; otherwise ask again, and in the end fail so the
            // session retries, rather than skip messages.
            let pending = consumer
                .info()
                .await
                .map(|info| info.num_pending)
                .map_err(|e| ReplayError::Fetch(e.to_string()))?;
            if pending == 0 {
                break upto;
            }
            empty_fetches += 1;
            if empty_fetches >= MAX_EMPTY_FETCHES {
                return Err(ReplayError::Fetch(format!(
                    "{pending} messages pending but {empty_fetches} fetches came back empty"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20 * u64::from(empty_fetches))).await;
        }
    };
    let name = consumer.cached_info().name.clone();
    if let Err(err) = stream.delete_consumer(&name).await {
        tracing::debug!(consumer = %name, error = %err, "replay consumer left to expire");
    }
    Ok((out, reached.max(after)))
}

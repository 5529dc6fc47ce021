//! Dead letters: records Kafka refuses for good (or stored messages that cannot be read)
//! go to `routing.dead_letter_topic` with the reason in their headers, off the ordered path.
//! Without a dead-letter topic, or when even that produce fails, the message is terminated
//! in JetStream.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use jetmq_common::retry::Backoff;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::FutureProducer;

use super::produce::{enqueue, Outcome, Shared};
use crate::kafka::{
    is_too_large, Record, HEADER_DLQ_REASON, HEADER_DLQ_TOPIC, HEADER_DLQ_TRUNCATED,
};
use crate::metrics::Stats;

/// How often, and how far apart, a dead letter waits for room in librdkafka's queue.
const QUEUE_FULL_ATTEMPTS: u32 = 100;
const QUEUE_FULL_PAUSE: Duration = Duration::from_millis(100);

/// Produces one record and waits for Kafka's answer (used for dead letters, off the ordered
/// path). A full local queue is retried for a bounded time.
async fn produce_and_wait(producer: &FutureProducer, record: &Record) -> Result<(), KafkaError> {
    let mut room = Backoff::new(QUEUE_FULL_PAUSE, QUEUE_FULL_PAUSE);
    let future = loop {
        match enqueue(producer, record) {
            Ok(f) => break f,
            Err(KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull))
                if room.attempts() < QUEUE_FULL_ATTEMPTS =>
            {
                room.wait().await;
            }
            Err(e) => return Err(e),
        }
    };
    match future.await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => Err(e),
        Err(_) => Err(KafkaError::Canceled),
    }
}

pub(super) async fn dead_letter(
    shared: Arc<Shared>,
    mut record: Record,
    reason: String,
) -> Outcome {
    if shared.dead_letter_topic.is_empty() {
        return Outcome::Terminated(format!("{reason} (no dead-letter topic configured)"));
    }
    let target = std::mem::replace(&mut record.topic, shared.dead_letter_topic.clone());
    record
        .headers
        .push((HEADER_DLQ_REASON.to_owned(), Bytes::from(reason.clone())));
    record
        .headers
        .push((HEADER_DLQ_TOPIC.to_owned(), Bytes::from(target)));
    match produce_and_wait(&shared.producer, &record).await {
        Ok(()) => return Outcome::DeadLettered(reason),
        Err(e) if is_too_large(&e) => {
            Stats::inc(&shared.stats.failed);
            // Keep the metadata; the payload stays in JetStream under `jetmq.seq`.
            let size = record.value.len();
            record.value = Bytes::new();
            record.headers.push((
                HEADER_DLQ_TRUNCATED.to_owned(),
                Bytes::from(size.to_string()),
            ));
        }
        Err(e) => {
            Stats::inc(&shared.stats.failed);
            return Outcome::Terminated(format!("{reason}; dead-letter produce failed: {e}"));
        }
    }
    match produce_and_wait(&shared.producer, &record).await {
        Ok(()) => Outcome::DeadLettered(format!("{reason} (payload left out of the dead letter)")),
        Err(e) => {
            Stats::inc(&shared.stats.failed);
            Outcome::Terminated(format!("{reason}; dead-letter produce failed: {e}"))
        }
    }
}

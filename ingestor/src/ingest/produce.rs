//! Producing one record: hand it to librdkafka, wait for Kafka's confirmation, retry what
//! Kafka did not take (with backoff, for as long as it takes) and dead-letter what it
//! refuses for good.

use std::sync::Arc;
use std::time::{Duration, Instant};

use jetmq_common::retry::Backoff;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use tracing::{debug, warn};

use super::dead_letter::dead_letter;
use crate::kafka::{is_permanent, Record};
use crate::metrics::Stats;

/// What became of one message.
#[derive(Debug)]
pub(super) enum Outcome {
    Produced,
    DeadLettered(String),
    /// Neither the target topic nor the dead-letter topic took it: terminate in JetStream.
    Terminated(String),
    /// The producer is unusable (fatal idempotence error): stop, let a restart recover.
    Fatal(String),
}

/// State shared with the in-flight futures.
pub(super) struct Shared {
    pub(super) producer: FutureProducer,
    pub(super) dead_letter_topic: String,
    pub(super) stats: Arc<Stats>,
}

/// The producer cannot go on (a fatal idempotence error): only a restart recovers.
pub(super) fn is_fatal(err: &KafkaError) -> bool {
    matches!(err, KafkaError::MessageProduction(RDKafkaErrorCode::Fatal))
}

/// Hands `record` to librdkafka; the future resolves with Kafka's answer.
pub(super) fn enqueue(
    producer: &FutureProducer,
    record: &Record,
) -> Result<DeliveryFuture, KafkaError> {
    let mut fr = FutureRecord::<[u8], [u8]>::to(&record.topic)
        .payload(record.value.as_ref())
        .headers(record.owned_headers());
    if let Some(key) = &record.key {
        fr = fr.key(key.as_ref());
    }
    if let Some(ts) = record.timestamp_ms {
        fr = fr.timestamp(ts);
    }
    producer.send_result(fr).map_err(|(e, _)| e)
}

/// The pauses before retrying a record Kafka did not take: 0.5 s doubling up to 30 s.
pub(super) fn retry_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(500), Duration::from_secs(30))
}

/// Waits for Kafka's answer about `record`. Errors librdkafka does not retry itself (a broker
/// failing requests, say) are retried here with backoff for as long as it takes: the message
/// stays in flight (with progress acks) and is acked only once Kafka has it. Records Kafka
/// refuses for good go to the dead-letter topic.
pub(super) async fn await_delivery(
    shared: Arc<Shared>,
    first: Result<DeliveryFuture, KafkaError>,
    record: Record,
    seq: u64,
) -> Outcome {
    let mut current = first;
    let mut backoff = retry_backoff();
    // Per attempt: the latency of a confirmation, not of our retry back-off.
    let mut enqueued = Instant::now();
    loop {
        let err = match current {
            Ok(future) => match future.await {
                Ok(Ok(_)) => {
                    shared.stats.produce_latency.observe(enqueued.elapsed());
                    return Outcome::Produced;
                }
                Ok(Err((e, _))) => e,
                Err(_) => KafkaError::Canceled,
            },
            Err(e) => e,
        };
        Stats::inc(&shared.stats.failed);
        if is_fatal(&err) {
            return Outcome::Fatal(err.to_string());
        }
        if is_permanent(&err) {
            let reason = format!("Kafka refused the record for topic {}: {err}", record.topic);
            return dead_letter(shared, record, reason).await;
        }
        let delay = backoff.next_pause();
        let attempt = backoff.attempts();
        if attempt == 1 || attempt.is_multiple_of(10) {
            warn!(seq, attempt, error = %err, ?delay, "Kafka did not take the record, retrying");
        } else {
            debug!(seq, attempt, error = %err, ?delay, "Kafka did not take the record, retrying");
        }
        tokio::time::sleep(delay).await;
        enqueued = Instant::now();
        current = enqueue(&shared.producer, &record);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kafka::HEADER_SEQ;
    use bytes::Bytes;
    use std::sync::atomic::Ordering;

    #[test]
    fn retry_backoff_grows_and_is_capped() {
        let mut backoff = retry_backoff();
        let pauses: Vec<Duration> = (0..1000).map(|_| backoff.next_pause()).collect();
        assert_eq!(pauses[0], Duration::from_millis(500));
        assert_eq!(pauses[1], Duration::from_secs(1));
        assert_eq!(pauses[3], Duration::from_secs(4));
        assert_eq!(pauses[6], Duration::from_secs(30));
        assert_eq!(pauses[999], Duration::from_secs(30));
    }

    /// Producer paths against librdkafka's mock cluster.
    mod mock {
        use super::*;
        use rdkafka::mocking::MockCluster;
        use rdkafka::ClientConfig;

        fn shared(bootstrap: &str, dead_letter_topic: &str) -> Arc<Shared> {
            let producer: FutureProducer = ClientConfig::new()
                .set("bootstrap.servers", bootstrap)
                .set("enable.idempotence", "true")
                .set("message.max.bytes", "10000")
                .set("batch.size", "5000")
                .create()
                .expect("producer");
            Arc::new(Shared {
                producer,
                dead_letter_topic: dead_letter_topic.to_owned(),
                stats: Stats::new(),
            })
        }

        fn record(topic: &str, size: usize) -> Record {
            Record {
                topic: topic.to_owned(),
                key: Some(Bytes::from_static(b"a/b")),
                value: Bytes::from(vec![7u8; size]),
                headers: vec![(HEADER_SEQ.to_owned(), Bytes::from_static(b"1"))],
                timestamp_ms: Some(1),
            }
        }

        async fn deliver(shared: &Arc<Shared>, record: Record) -> Outcome {
            let first = enqueue(&shared.producer, &record);
            tokio::time::timeout(
                Duration::from_secs(20),
                await_delivery(shared.clone(), first, record, 1),
            )
            .await
            .expect("outcome in time")
        }

        #[tokio::test]
        async fn produced_dead_lettered_or_terminated() {
            let cluster = MockCluster::new(1).expect("mock cluster");
            cluster.create_topic("mqtt", 1, 1).expect("topic");
            cluster.create_topic("dlq", 1, 1).expect("topic");
            let with_dlq = shared(&cluster.bootstrap_servers(), "dlq");

            let outcome = deliver(&with_dlq, record("mqtt", 100)).await;
            assert!(matches!(outcome, Outcome::Produced), "{outcome:?}");

            // Too large for the client: dead-lettered without its payload.
            let outcome = deliver(&with_dlq, record("mqtt", 20_000)).await;
            match outcome {
                Outcome::DeadLettered(reason) => {
                    assert!(reason.contains("payload left out"), "{reason}")
                }
                other => panic!("expected a dead letter, got {other:?}"),
            }
            assert_eq!(with_dlq.stats.failed.load(Ordering::Relaxed), 2);

            // No dead-letter topic: terminated, not retried.
            let without = shared(&cluster.bootstrap_servers(), "");
            let outcome = deliver(&without, record("mqtt", 20_000)).await;
            assert!(matches!(outcome, Outcome::Terminated(_)), "{outcome:?}");
        }

        #[tokio::test]
        async fn transient_broker_errors_are_retried_until_they_pass() {
            use rdkafka::types::RDKafkaRespErr;
            let cluster = MockCluster::new(1).expect("mock cluster");
            cluster.create_topic("mqtt", 1, 1).expect("topic");
            // The next two produce requests fail with an error librdkafka hands back.
            cluster.request_errors(
                rdkafka::types::RDKafkaApiKey::Produce,
                &[
                    RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN,
                    RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN,
                ],
            );
            let s = shared(&cluster.bootstrap_servers(), "");
            let outcome = deliver(&s, record("mqtt", 10)).await;
            assert!(matches!(outcome, Outcome::Produced), "{outcome:?}");
            // librdkafka hands UNKNOWN back to us; the ingestor's own retry got it through.
            assert!(s.stats.failed.load(Ordering::Relaxed) >= 1);
        }
    }
}

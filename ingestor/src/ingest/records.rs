//! From stored message to Kafka record: one record per MQTT message (a bundle holds
//! several), its key, headers and target topic, and its trace context; a dead letter for
//! what cannot be read.

use bytes::Bytes;
use jetmq_common::envelope::{split_bundle, Envelope};
use jetmq_common::otel;
use jetmq_common::subject::parse_stream_subject;
use opentelemetry::KeyValue;

use crate::config::Config;
use crate::kafka::{
    record_headers, record_key, Record, HEADER_DLQ_SUBJECT, HEADER_PART, HEADER_SEQ, HEADER_SHARE,
};
use crate::routing::TopicMap;

pub(super) type Prepared = Result<Record, Box<(Record, String)>>;

/// The Kafka records of a stored message: one, or one per MQTT message of a bundle (each
/// with its place in the bundle in `jetmq.part`); a dead letter for what cannot be read.
pub(super) fn prepare_stored(
    config: &Config,
    topics: &TopicMap,
    subject: &str,
    body: Bytes,
    seq: u64,
) -> Vec<Prepared> {
    match split_bundle(body.clone()) {
        Ok(parts) if parts.len() > 1 => parts
            .into_iter()
            .enumerate()
            .map(|(index, part)| {
                let mut prepared = prepare(config, topics, subject, part, seq);
                let header = (HEADER_PART.to_owned(), Bytes::from(index.to_string()));
                match &mut prepared {
                    Ok(record) => record.headers.push(header),
                    Err(poison) => poison.0.headers.push(header),
                }
                prepared
            })
            .collect(),
        Ok(_) => vec![prepare(config, topics, subject, body, seq)],
        Err(e) => vec![Err(poison(
            subject,
            body,
            seq,
            format!("unreadable bundle: {e}"),
        ))],
    }
}

/// A stored message that cannot be read, as a dead letter.
pub(super) fn poison(
    subject: &str,
    body: Bytes,
    seq: u64,
    reason: String,
) -> Box<(Record, String)> {
    let record = Record {
        topic: String::new(),
        key: None,
        value: body,
        headers: vec![
            (HEADER_SEQ.to_owned(), Bytes::from(seq.to_string())),
            (
                HEADER_DLQ_SUBJECT.to_owned(),
                Bytes::copy_from_slice(subject.as_bytes()),
            ),
        ],
        timestamp_ms: None,
    };
    Box::new((record, reason))
}

/// Turns one stored MQTT message into its Kafka record, or into a dead letter if it cannot
/// be read.
pub(super) fn prepare(
    config: &Config,
    topics: &TopicMap,
    subject: &str,
    body: Bytes,
    seq: u64,
) -> Prepared {
    let poison = |reason: String| poison(subject, body.clone(), seq, reason);
    let (share, mqtt_topic) = parse_stream_subject(subject)
        .map_err(|e| poison(format!("unreadable subject {subject:?}: {e}")))?;
    let (envelope, payload) =
        Envelope::decode(body.clone()).map_err(|e| poison(format!("unreadable envelope: {e}")))?;
    let mut headers = record_headers(&config.ingest, &mqtt_topic, &envelope, seq);
    headers.push((HEADER_SHARE.to_owned(), Bytes::from(share.to_string())));
    Ok(Record {
        topic: topics.kafka_topic(&mqtt_topic).to_owned(),
        key: record_key(config.routing.key_mode, &mqtt_topic, &envelope),
        headers,
        value: payload,
        timestamp_ms: i64::try_from(envelope.timestamp_ms)
            .ok()
            .filter(|ts| *ts > 0),
    })
}

/// With tracing on: a child span of the broker's (from the NATS `traceparent`) around the
/// Kafka produce, whose own `traceparent` goes on the record. With tracing off: the broker's
/// `traceparent` is passed on as it is, so downstream consumers can still join the trace.
pub(super) fn trace_produce(
    nats_traceparent: Option<&[u8]>,
    record: &mut Record,
    seq: u64,
) -> Option<otel::Span> {
    let Some(tracing) = otel::global() else {
        if let Some(tp) = nats_traceparent {
            record
                .headers
                .push((otel::TRACEPARENT.to_owned(), Bytes::copy_from_slice(tp)));
        }
        return None;
    };
    let span = tracing.child_of(
        nats_traceparent,
        "kafka produce",
        otel::SpanKind::Producer,
        vec![
            KeyValue::new("messaging.system", "kafka"),
            KeyValue::new("messaging.destination.name", record.topic.clone()),
            KeyValue::new("messaging.operation.type", "send"),
            KeyValue::new("jetmq.seq", i64::try_from(seq).unwrap_or(i64::MAX)),
        ],
    );
    let traceparent = otel::traceparent(&span)?;
    record
        .headers
        .push((otel::TRACEPARENT.to_owned(), Bytes::from(traceparent)));
    Some(span)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jetmq_common::envelope::MessageProperties;
    use jetmq_common::subject::encode_topic;

    fn body(env: &Envelope, payload: &[u8]) -> Bytes {
        env.encode(payload).expect("encodes")
    }

    #[test]
    fn prepare_builds_the_record() {
        let config = Config::default();
        let topics = TopicMap::new(&config.routing);
        let env = Envelope {
            qos: 1,
            retain: false,
            client_id: "c1".into(),
            timestamp_ms: 1234,
            properties: MessageProperties::default(),
        };
        let subject = format!("jetmq.s.0.{}", encode_topic("a/b.c"));
        let record = prepare(&config, &topics, &subject, body(&env, b"xyz"), 9).expect("record");
        assert_eq!(record.topic, "mqtt");
        assert_eq!(record.key.as_deref(), Some(&b"a/b.c"[..]));
        assert_eq!(&record.value[..], b"xyz");
        assert_eq!(record.timestamp_ms, Some(1234));
        assert_eq!(
            record.header("mqtt.topic").map(|v| v.as_ref()),
            Some(&b"a/b.c"[..])
        );
        assert_eq!(
            record.header(HEADER_SEQ).map(|v| v.as_ref()),
            Some(&b"9"[..])
        );
    }

    #[test]
    fn a_bundle_becomes_one_record_per_message_with_its_part() {
        let config = Config::default();
        let topics = TopicMap::new(&config.routing);
        let env = Envelope {
            qos: 1,
            client_id: "c1".into(),
            timestamp_ms: 1234,
            ..Envelope::default()
        };
        let subject = format!("jetmq.s.0.{}", encode_topic("a/b"));
        let bodies = [body(&env, b"one"), body(&env, b"two")];
        let bundle =
            jetmq_common::envelope::encode_bundle(bodies.iter().map(|b| &b[..])).expect("bundles");
        let records: Vec<Record> = prepare_stored(&config, &topics, &subject, bundle, 9)
            .into_iter()
            .map(|r| r.expect("record"))
            .collect();
        let values: Vec<&[u8]> = records.iter().map(|r| &r.value[..]).collect();
        assert_eq!(values, [&b"one"[..], &b"two"[..]]);
        for (index, record) in records.iter().enumerate() {
            assert_eq!(
                record.header(HEADER_SEQ).map(|v| v.as_ref()),
                Some(&b"9"[..])
            );
            let part = index.to_string();
            assert_eq!(
                record.header(HEADER_PART).map(|v| v.as_ref()),
                Some(part.as_bytes())
            );
            assert_eq!(record.key.as_deref(), Some(&b"a/b"[..]));
        }
        // A message stored on its own has no part.
        let single = prepare_stored(&config, &topics, &subject, bodies[0].clone(), 10);
        assert_eq!(single.len(), 1);
        let single = single.into_iter().next().expect("one").expect("record");
        assert!(single.header(HEADER_PART).is_none());
        // A bundle that cannot be read is one dead letter, whole.
        let broken = Bytes::from_static(&[2, 0, 0, 0, 9]);
        let dead = prepare_stored(&config, &topics, &subject, broken.clone(), 11);
        assert_eq!(dead.len(), 1);
        let Err(poison) = dead.into_iter().next().expect("one") else {
            panic!("a broken bundle must be a dead letter");
        };
        assert_eq!(poison.0.value, broken);
        assert!(poison.1.contains("bundle"), "{}", poison.1);
    }

    #[test]
    fn unreadable_messages_become_dead_letters() {
        let config = Config::default();
        let topics = TopicMap::new(&config.routing);
        let (record, reason) = *prepare(
            &config,
            &topics,
            "jetmq.s.0.a",
            Bytes::from_static(b"junk"),
            5,
        )
        .expect_err("poison");
        assert!(reason.contains("envelope"), "{reason}");
        assert_eq!(&record.value[..], b"junk");
        let (_, reason) = *prepare(
            &config,
            &topics,
            "other.subject",
            Bytes::from_static(b""),
            6,
        )
        .expect_err("poison");
        assert!(reason.contains("subject"), "{reason}");
    }
}

//! The Kafka side: producer settings, record key and headers, error classification.

use bytes::Bytes;
use jetmq_common::envelope::Envelope;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};

use crate::config::{IngestConfig, KafkaConfig, KeyMode};

/// Header with the JetStream stream sequence of the message: unique per message, the same on
/// a redelivery, so consumers can drop duplicates.
pub const HEADER_SEQ: &str = "jetmq.seq";
/// Place of the record's MQTT message in a bundle (several stored as one stream message);
/// absent for a message stored on its own. With `jetmq.seq` unique per MQTT message.
pub const HEADER_PART: &str = "jetmq.part";
/// Header with the share (NATS mapping partition) the message came through.
pub const HEADER_SHARE: &str = "jetmq.share";
/// Dead-letter headers.
pub const HEADER_DLQ_REASON: &str = "jetmq.dlq.reason";
pub const HEADER_DLQ_TOPIC: &str = "jetmq.dlq.topic";
pub const HEADER_DLQ_SUBJECT: &str = "jetmq.dlq.subject";
pub const HEADER_DLQ_TRUNCATED: &str = "jetmq.dlq.truncated";

/// librdkafka settings of the producer.
pub fn client_config(kafka: &KafkaConfig, ingest: &IngestConfig) -> ClientConfig {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", kafka.bootstrap_servers.join(","))
        .set("client.id", "jetmq-ingestor")
        .set("linger.ms", kafka.linger_ms.to_string())
        .set("batch.size", kafka.batch_size.to_string())
        .set("batch.num.messages", kafka.batch_num_messages.to_string())
        .set(
            "max.in.flight.requests.per.connection",
            kafka.max_in_flight_requests.to_string(),
        )
        .set("message.timeout.ms", kafka.message_timeout_ms.to_string())
        // The in-flight window bounds what is queued; keep librdkafka's queue above it so an
        // enqueue never fails for lack of room.
        .set(
            "queue.buffering.max.messages",
            (ingest.max_in_flight.saturating_mul(2).max(100_000)).to_string(),
        )
        .set("compression.type", "none");
    if kafka.idempotence {
        cfg.set("enable.idempotence", "true").set("acks", "all");
    } else {
        cfg.set("enable.idempotence", "false").set("acks", "all");
    }
    for (key, value) in &kafka.client {
        cfg.set(key, value);
    }
    cfg
}

/// A record ready to produce (owned, so it can be re-sent to the dead-letter topic).
#[derive(Debug, Clone)]
pub struct Record {
    pub topic: String,
    pub key: Option<Bytes>,
    pub value: Bytes,
    pub headers: Vec<(String, Bytes)>,
    pub timestamp_ms: Option<i64>,
}

impl Record {
    pub fn owned_headers(&self) -> OwnedHeaders {
        let mut h = OwnedHeaders::new_with_capacity(self.headers.len());
        for (key, value) in &self.headers {
            h = h.insert(Header {
                key: key.as_str(),
                value: Some(value.as_ref()),
            });
        }
        h
    }

    pub fn header(&self, key: &str) -> Option<&Bytes> {
        self.headers.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
}

/// The Kafka key of a message in `mode`.
pub fn record_key(mode: KeyMode, mqtt_topic: &str, envelope: &Envelope) -> Option<Bytes> {
    match mode {
        KeyMode::Topic => Some(Bytes::copy_from_slice(mqtt_topic.as_bytes())),
        KeyMode::ClientId => Some(Bytes::copy_from_slice(envelope.client_id.as_bytes())),
        KeyMode::None => None,
    }
}

/// The headers carrying the MQTT metadata of a message.
pub fn record_headers(
    ingest: &IngestConfig,
    mqtt_topic: &str,
    envelope: &Envelope,
    stream_seq: u64,
) -> Vec<(String, Bytes)> {
    let p = &ingest.header_prefix;
    let s = |v: String| Bytes::from(v.into_bytes());
    let mut h = vec![
        (format!("{p}topic"), s(mqtt_topic.to_owned())),
        (format!("{p}qos"), s(envelope.qos.to_string())),
        (format!("{p}retain"), s(envelope.retain.to_string())),
        (format!("{p}client_id"), s(envelope.client_id.clone())),
        (
            format!("{p}timestamp_ms"),
            s(envelope.timestamp_ms.to_string()),
        ),
        (HEADER_SEQ.to_owned(), s(stream_seq.to_string())),
    ];
    let props = &envelope.properties;
    if let Some(v) = props.payload_format_indicator {
        h.push((format!("{p}payload_format"), s(v.to_string())));
    }
    if let Some(v) = props.message_expiry_interval {
        h.push((format!("{p}message_expiry"), s(v.to_string())));
    }
    if let Some(v) = &props.content_type {
        h.push((format!("{p}content_type"), s(v.clone())));
    }
    if let Some(v) = &props.response_topic {
        h.push((format!("{p}response_topic"), s(v.clone())));
    }
    if let Some(v) = &props.correlation_data {
        h.push((format!("{p}correlation_data"), v.clone()));
    }
    for (key, value) in &props.user_properties {
        h.push((
            format!("{}{key}", ingest.user_property_prefix),
            s(value.clone()),
        ));
    }
    h
}

/// Whether Kafka refused a record for good: retrying the same record cannot succeed.
pub fn is_permanent(err: &KafkaError) -> bool {
    let code = match err {
        KafkaError::MessageProduction(code) => *code,
        _ => return false,
    };
    use RDKafkaErrorCode as C;
    matches!(
        code,
        C::MessageSizeTooLarge
            | C::InvalidMessageSize
            | C::InvalidMessage
            | C::InvalidRecord
            | C::MessageBatchTooLarge
            | C::UnknownTopic
            | C::UnknownTopicOrPartition
            | C::UnknownPartition
            | C::InvalidTopic
            | C::TopicAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::PolicyViolation
            | C::InvalidRequiredAcks
            | C::InvalidArgument
            | C::BadMessage
            | C::InvalidTimestamp
            | C::UnsupportedForMessageFormat
            | C::UnsupportedVersion
    )
}

/// Whether `err` says the record is too large (the dead-letter copy is then sent without its
/// value).
pub fn is_too_large(err: &KafkaError) -> bool {
    matches!(
        err,
        KafkaError::MessageProduction(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::MessageBatchTooLarge
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use jetmq_common::envelope::MessageProperties;

    fn envelope() -> Envelope {
        Envelope {
            qos: 2,
            retain: true,
            client_id: "dev-7".into(),
            timestamp_ms: 1_700_000_000_123,
            properties: MessageProperties {
                payload_format_indicator: Some(1),
                message_expiry_interval: Some(60),
                content_type: Some("application/json".into()),
                response_topic: Some("replies/dev-7".into()),
                correlation_data: Some(Bytes::from_static(&[0, 1, 2, 255])),
                user_properties: vec![
                    ("unit".into(), "celsius".into()),
                    ("multi".into(), "line\nvalue".into()),
                ],
            },
        }
    }

    #[test]
    fn keys_follow_the_mode() {
        let env = envelope();
        assert_eq!(
            record_key(KeyMode::Topic, "a/b", &env),
            Some(Bytes::from_static(b"a/b"))
        );
        assert_eq!(
            record_key(KeyMode::ClientId, "a/b", &env),
            Some(Bytes::from_static(b"dev-7"))
        );
        assert_eq!(record_key(KeyMode::None, "a/b", &env), None);
    }

    #[test]
    fn headers_carry_everything() {
        let h = record_headers(&IngestConfig::default(), "a/b", &envelope(), 42);
        let get = |k: &str| {
            h.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| panic!("header {k} missing in {h:?}"))
        };
        assert_eq!(get("mqtt.topic"), "a/b");
        assert_eq!(get("mqtt.qos"), "2");
        assert_eq!(get("mqtt.retain"), "true");
        assert_eq!(get("mqtt.client_id"), "dev-7");
        assert_eq!(get("mqtt.timestamp_ms"), "1700000000123");
        assert_eq!(get("mqtt.payload_format"), "1");
        assert_eq!(get("mqtt.message_expiry"), "60");
        assert_eq!(get("mqtt.content_type"), "application/json");
        assert_eq!(get("mqtt.response_topic"), "replies/dev-7");
        assert_eq!(
            get("mqtt.correlation_data"),
            Bytes::from_static(&[0, 1, 2, 255])
        );
        assert_eq!(get("mqtt.user.unit"), "celsius");
        assert_eq!(get("mqtt.user.multi"), "line\nvalue");
        assert_eq!(get(HEADER_SEQ), "42");

        let minimal = Envelope {
            qos: 0,
            ..Default::default()
        };
        let h = record_headers(&IngestConfig::default(), "t", &minimal, 1);
        assert_eq!(h.len(), 6, "{h:?}");
    }

    #[test]
    fn prefixes_are_configurable() {
        let ingest = IngestConfig {
            header_prefix: "x-".into(),
            user_property_prefix: "u-".into(),
            ..Default::default()
        };
        let h = record_headers(&ingest, "t", &envelope(), 1);
        assert!(h.iter().any(|(k, _)| k == "x-topic"));
        assert!(h.iter().any(|(k, _)| k == "u-unit"));
    }

    #[test]
    fn producer_settings() {
        let mut kafka = KafkaConfig::default();
        kafka
            .client
            .insert("security.protocol".into(), "SASL_SSL".into());
        kafka.client.insert("linger.ms".into(), "99".into());
        let cfg = client_config(&kafka, &IngestConfig::default());
        assert_eq!(cfg.get("enable.idempotence"), Some("true"));
        assert_eq!(cfg.get("acks"), Some("all"));
        assert_eq!(cfg.get("message.timeout.ms"), Some("0"));
        assert_eq!(cfg.get("max.in.flight.requests.per.connection"), Some("1"));
        assert_eq!(cfg.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(cfg.get("linger.ms"), Some("99"), "passthrough wins");
        assert_eq!(cfg.get("bootstrap.servers"), Some("127.0.0.1:9092"));
    }

    #[test]
    fn error_classes() {
        assert!(is_permanent(&KafkaError::MessageProduction(
            RDKafkaErrorCode::MessageSizeTooLarge
        )));
        assert!(!is_permanent(&KafkaError::MessageProduction(
            RDKafkaErrorCode::MessageTimedOut
        )));
        assert!(!is_permanent(&KafkaError::MessageProduction(
            RDKafkaErrorCode::QueueFull
        )));
        assert!(is_too_large(&KafkaError::MessageProduction(
            RDKafkaErrorCode::MessageSizeTooLarge
        )));
    }
}

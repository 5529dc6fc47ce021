//! Where a session lives: one record per client id in the `JETMQ_SESSIONS` KV bucket.
//!
//! Every write is a compare-and-set on the record's revision. A connection that loses a
//! write learns that another connection took the session over, and stops; two nodes can
//! never both believe they own a client id.

pub mod delivery;
mod store;

use serde::{Deserialize, Serialize};

pub(crate) use store::{is_in_flight, InFlightWait};
pub use store::{OutagePolicy, SessionStore, StoreError};

use jetmq_codec::QoS;

/// Who holds a session right now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub node: String,
    /// Unique per connection on that node.
    pub connection: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSubscription {
    /// As the client sent it, `$share/...` included.
    pub filter: String,
    pub qos: u8,
    #[serde(default)]
    pub no_local: bool,
    #[serde(default)]
    pub retain_as_published: bool,
    #[serde(default)]
    pub subscription_id: Option<u32>,
}

impl StoredSubscription {
    pub fn qos(&self) -> QoS {
        QoS::from_u8(self.qos).unwrap_or(QoS::AtMostOnce)
    }

    /// (group, filter) of a shared subscription (`$share/<group>/<filter>`); None for others.
    pub fn shared(&self) -> Option<(&str, &str)> {
        if !self.filter.starts_with("$share/") {
            return None;
        }
        let parsed = crate::topic::parse_filter(&self.filter, usize::MAX, usize::MAX).ok()?;
        Some((parsed.share_group?, parsed.filter))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredWill {
    pub topic: String,
    #[serde(with = "base64_bytes")]
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
    pub delay_secs: u32,
    #[serde(default)]
    pub properties: StoredProperties,
}

/// MQTT 5 message properties kept with a will.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct StoredProperties {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_format_indicator: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_expiry_interval: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_topic: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "base64_opt")]
    pub correlation_data: Option<Vec<u8>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub user_properties: Vec<(String, String)>,
}

/// A QoS 2 PUBLISH received from the client and not yet released by its PUBREL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboundQos2 {
    pub packet_id: u16,
    /// JetStream de-duplication id: a retransmission after a crash is stored once.
    pub msg_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub client_id: String,
    pub owner: Option<Owner>,
    /// Seconds the session outlives its connection (0: it ends with it).
    pub expiry_secs: u32,
    /// Set while no connection holds the session.
    #[serde(default)]
    pub disconnected_at_ms: Option<u64>,
    pub subscriptions: Vec<StoredSubscription>,
    /// Every QoS 1/2 message with a position ([`crate::routing::position`]) up to here is
    /// done for this session, apart from those in `released`.
    pub cursor: u64,
    /// Positions of QoS 2 messages whose PUBREC arrived: on resume they get a PUBREL, never
    /// the PUBLISH again.
    #[serde(default)]
    pub released: Vec<u64>,
    /// Written when a connection ends in order (DISCONNECT, a lost socket, a hand-over):
    /// nothing above this position was sent to the client, so on resume those
    /// messages go out as first deliveries (DUP 0). None while a connection holds the
    /// session, and so after a node died: then anything above the cursor may have been sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_upto: Option<u64>,
    #[serde(default)]
    pub inbound_qos2: Vec<InboundQos2>,
    #[serde(default)]
    pub will: Option<StoredWill>,
    /// When the will is due, if the connection ended without DISCONNECT.
    #[serde(default)]
    pub will_due_ms: Option<u64>,
    #[serde(default)]
    pub protocol_v5: bool,
    /// For authorizing the will when a node other than the client's publishes it.
    #[serde(default)]
    pub username: Option<String>,
    /// True when `cursor`, `released` and `sent_upto` count positions. Builds before
    /// bundles counted stream sequences; [`SessionRecord::from_json`] converts such records.
    #[serde(default)]
    pub positions: bool,
}

impl SessionRecord {
    pub fn new(client_id: &str, cursor: u64) -> SessionRecord {
        SessionRecord {
            client_id: client_id.to_owned(),
            owner: None,
            expiry_secs: 0,
            disconnected_at_ms: None,
            subscriptions: Vec::new(),
            cursor,
            released: Vec::new(),
            sent_upto: None,
            inbound_qos2: Vec::new(),
            will: None,
            will_due_ms: None,
            protocol_v5: false,
            username: None,
            positions: true,
        }
    }

    /// Reads a stored record, converting one that counted stream sequences.
    pub fn from_json(json: &[u8]) -> serde_json::Result<SessionRecord> {
        use crate::routing::position;
        let mut record: SessionRecord = serde_json::from_slice(json)?;
        if !record.positions {
            // Each old sequence was one stream message holding one MQTT message.
            record.cursor = position::end_of(record.cursor);
            record.sent_upto = record.sent_upto.map(position::end_of);
            for released in &mut record.released {
                *released = position::of(*released, 0);
            }
            record.positions = true;
        }
        Ok(record)
    }

    /// A disconnected session whose expiry has passed is gone.
    pub fn is_expired(&self, now_ms: u64) -> bool {
        match self.disconnected_at_ms {
            Some(at) => now_ms >= at.saturating_add(u64::from(self.expiry_secs) * 1000),
            None => false,
        }
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

mod base64_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::hex_encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        super::hex_decode(&text).ok_or_else(|| serde::de::Error::custom("invalid hex"))
    }
}

mod base64_opt {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match bytes {
            Some(b) => s.serialize_some(&super::hex_encode(b)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        let text = Option::<String>::deserialize(d)?;
        text.map(|t| super::hex_decode(&t).ok_or_else(|| serde::de::Error::custom("invalid hex")))
            .transpose()
    }
}

pub(crate) fn hex_encode(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

pub(crate) fn hex_decode(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips_through_json() {
        let mut record = SessionRecord::new("dev/1 é", 42);
        record.will = Some(StoredWill {
            topic: "t".into(),
            payload: vec![0, 255, 7],
            qos: 1,
            retain: true,
            delay_secs: 5,
            properties: StoredProperties {
                correlation_data: Some(vec![1, 2]),
                ..Default::default()
            },
        });
        record.released = vec![7, 9];
        let json = serde_json::to_vec(&record).expect("serializes");
        let back = SessionRecord::from_json(&json).expect("parses");
        assert_eq!(back, record);
    }

    #[test]
    fn records_that_counted_stream_sequences_are_converted_to_positions() {
        use crate::routing::position;
        let old = br#"{"client_id":"c","owner":null,"expiry_secs":60,"subscriptions":[],
            "cursor":41,"released":[43],"sent_upto":44}"#;
        let record = SessionRecord::from_json(old).expect("parses");
        assert!(record.positions);
        assert_eq!(record.cursor, position::end_of(41));
        assert_eq!(record.released, vec![position::of(43, 0)]);
        assert_eq!(record.sent_upto, Some(position::end_of(44)));
        let current = serde_json::to_vec(&record).expect("serializes");
        assert_eq!(SessionRecord::from_json(&current).expect("parses"), record);
    }

    #[test]
    fn expiry_counts_from_disconnect() {
        let mut record = SessionRecord::new("c", 0);
        record.expiry_secs = 10;
        assert!(!record.is_expired(1_000_000));
        record.disconnected_at_ms = Some(1_000);
        assert!(!record.is_expired(10_999));
        assert!(record.is_expired(11_000));
    }

    #[test]
    fn hex_rejects_garbage() {
        assert_eq!(hex_decode("0aff"), Some(vec![10, 255]));
        assert_eq!(hex_decode("0"), None);
        assert_eq!(hex_decode("zz"), None);
    }
}

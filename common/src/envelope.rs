//! The body of every message jetmq stores in JetStream: MQTT metadata, then the payload.
//!
//! Binary rather than NATS headers so that any MQTT user property (which may hold any
//! UTF-8, newlines included) survives unchanged and the broker's hot path parses no text.
//!
//! ```text
//! u8   version (1)
//! u8   flags: bits 0-1 QoS, bit 2 retain, bit 3 properties present
//! u64  publish time, milliseconds since the Unix epoch (big endian)
//! u16  publisher client id length, then its UTF-8 bytes
//! [u32 properties length, then properties]   if flag bit 3
//! ...  payload, untouched, to the end
//! ```
//!
//! Under load the broker stores several QoS 1 messages of one topic as one stream message,
//! a *bundle* (see [`encode_bundle`]): JetStream's cost is per stored message, not per
//! byte, so a bundle of ten costs NATS about a tenth per MQTT message.
//!
//! ```text
//! u8   version (2)
//! then, once per message, in publish order:
//! u32  length of the message's body (big endian), then the body: a version 1 envelope
//! ```
//! [`split_bundle`] turns either version into the bodies of its MQTT messages.
//!
//! Properties reuse the MQTT 5 identifiers: 0x01 payload format (u8), 0x02 message expiry
//! (u32), 0x03 content type (str), 0x08 response topic (str), 0x09 correlation data (bin),
//! 0x26 user property (str, str); str and bin are u16 length + bytes.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use thiserror::Error;

const VERSION: u8 = 1;
const BUNDLE_VERSION: u8 = 2;

/// Most MQTT messages in one bundle: the broker numbers them with 8 bits, and keeps the
/// highest number for "the end of this stream message".
pub const MAX_BUNDLE_MESSAGES: usize = 255;
const FLAG_RETAIN: u8 = 0b0100;
const FLAG_PROPERTIES: u8 = 0b1000;

const PROP_PAYLOAD_FORMAT: u8 = 0x01;
const PROP_MESSAGE_EXPIRY: u8 = 0x02;
const PROP_CONTENT_TYPE: u8 = 0x03;
const PROP_RESPONSE_TOPIC: u8 = 0x08;
const PROP_CORRELATION_DATA: u8 = 0x09;
const PROP_USER_PROPERTY: u8 = 0x26;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum EnvelopeError {
    #[error("envelope is truncated")]
    Truncated,
    #[error("unknown envelope version {0}")]
    UnknownVersion(u8),
    #[error("envelope QoS {0} is invalid")]
    BadQos(u8),
    #[error("unknown envelope property {0:#04x}")]
    UnknownProperty(u8),
    #[error("envelope string is not UTF-8")]
    NotUtf8,
    #[error("envelope field of {0} bytes is too long")]
    TooLong(usize),
    #[error("bundle holds no message")]
    EmptyBundle,
    #[error("bundle of more than {MAX_BUNDLE_MESSAGES} messages")]
    BundleTooLarge,
}

/// MQTT 5 properties that travel with a message end to end.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MessageProperties {
    pub payload_format_indicator: Option<u8>,
    /// Seconds, as the publisher set it; remaining lifetime = this minus time since `timestamp_ms`.
    pub message_expiry_interval: Option<u32>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub user_properties: Vec<(String, String)>,
}

impl MessageProperties {
    pub fn is_empty(&self) -> bool {
        self.payload_format_indicator.is_none()
            && self.message_expiry_interval.is_none()
            && self.content_type.is_none()
            && self.response_topic.is_none()
            && self.correlation_data.is_none()
            && self.user_properties.is_empty()
    }
}

/// Metadata of one stored message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Envelope {
    pub qos: u8,
    pub retain: bool,
    pub client_id: String,
    pub timestamp_ms: u64,
    pub properties: MessageProperties,
}

fn put_str(buf: &mut BytesMut, value: &[u8]) -> Result<(), EnvelopeError> {
    let len = u16::try_from(value.len()).map_err(|_| EnvelopeError::TooLong(value.len()))?;
    buf.put_u16(len);
    buf.put_slice(value);
    Ok(())
}

fn encode_properties(props: &MessageProperties, buf: &mut BytesMut) -> Result<(), EnvelopeError> {
    if let Some(v) = props.payload_format_indicator {
        buf.put_u8(PROP_PAYLOAD_FORMAT);
        buf.put_u8(v);
    }
    if let Some(v) = props.message_expiry_interval {
        buf.put_u8(PROP_MESSAGE_EXPIRY);
        buf.put_u32(v);
    }
    if let Some(v) = &props.content_type {
        buf.put_u8(PROP_CONTENT_TYPE);
        put_str(buf, v.as_bytes())?;
    }
    if let Some(v) = &props.response_topic {
        buf.put_u8(PROP_RESPONSE_TOPIC);
        put_str(buf, v.as_bytes())?;
    }
    if let Some(v) = &props.correlation_data {
        buf.put_u8(PROP_CORRELATION_DATA);
        put_str(buf, v)?;
    }
    for (key, value) in &props.user_properties {
        buf.put_u8(PROP_USER_PROPERTY);
        put_str(buf, key.as_bytes())?;
        put_str(buf, value.as_bytes())?;
    }
    Ok(())
}

impl Envelope {
    /// Envelope and payload as one message body.
    pub fn encode(&self, payload: &[u8]) -> Result<Bytes, EnvelopeError> {
        let mut buf = BytesMut::with_capacity(16 + self.client_id.len() + payload.len());
        buf.put_u8(VERSION);
        let mut flags = self.qos & 0b11;
        if self.retain {
            flags |= FLAG_RETAIN;
        }
        let has_properties = !self.properties.is_empty();
        if has_properties {
            flags |= FLAG_PROPERTIES;
        }
        buf.put_u8(flags);
        buf.put_u64(self.timestamp_ms);
        put_str(&mut buf, self.client_id.as_bytes())?;
        if has_properties {
            let len_at = buf.len();
            buf.put_u32(0);
            encode_properties(&self.properties, &mut buf)?;
            let len = buf.len() - len_at - 4;
            let len = u32::try_from(len).map_err(|_| EnvelopeError::TooLong(len))?;
            buf[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
        }
        buf.put_slice(payload);
        Ok(buf.freeze())
    }

    /// Splits a message body into its envelope and the untouched payload (zero-copy).
    pub fn decode(mut body: Bytes) -> Result<(Envelope, Bytes), EnvelopeError> {
        need(&body, 12)?;
        let version = body.get_u8();
        if version != VERSION {
            return Err(EnvelopeError::UnknownVersion(version));
        }
        let flags = body.get_u8();
        let qos = flags & 0b11;
        if qos > 2 {
            return Err(EnvelopeError::BadQos(qos));
        }
        let timestamp_ms = body.get_u64();
        let client_id = get_string(&mut body)?;
        let mut properties = MessageProperties::default();
        if flags & FLAG_PROPERTIES != 0 {
            need(&body, 4)?;
            let len = body.get_u32() as usize;
            need(&body, len)?;
            let mut props = body.split_to(len);
            while props.has_remaining() {
                decode_property(&mut props, &mut properties)?;
            }
        }
        let envelope = Envelope {
            qos,
            retain: flags & FLAG_RETAIN != 0,
            client_id,
            timestamp_ms,
            properties,
        };
        Ok((envelope, body))
    }
}

/// One stream message body holding several encoded messages (each from
/// [`Envelope::encode`]), in order. At least two make sense; one is stored as it is.
pub fn encode_bundle<'a>(
    bodies: impl IntoIterator<Item = &'a [u8]>,
) -> Result<Bytes, EnvelopeError> {
    let mut buf = BytesMut::new();
    buf.put_u8(BUNDLE_VERSION);
    let mut count = 0;
    for body in bodies {
        count += 1;
        if count > MAX_BUNDLE_MESSAGES {
            return Err(EnvelopeError::BundleTooLarge);
        }
        let len = u32::try_from(body.len()).map_err(|_| EnvelopeError::TooLong(body.len()))?;
        buf.put_u32(len);
        buf.put_slice(body);
    }
    if count == 0 {
        return Err(EnvelopeError::EmptyBundle);
    }
    Ok(buf.freeze())
}

/// The bodies of the MQTT messages in a stored message: itself for a plain envelope, its
/// parts for a bundle (zero-copy). The parts are decoded with [`Envelope::decode`].
pub fn split_bundle(body: Bytes) -> Result<Vec<Bytes>, EnvelopeError> {
    match body.first() {
        Some(&BUNDLE_VERSION) => {}
        Some(_) => return Ok(vec![body]),
        None => return Err(EnvelopeError::Truncated),
    }
    let mut rest = body.slice(1..);
    let mut parts = Vec::new();
    while rest.has_remaining() {
        need(&rest, 4)?;
        let len = rest.get_u32() as usize;
        need(&rest, len)?;
        if parts.len() == MAX_BUNDLE_MESSAGES {
            return Err(EnvelopeError::BundleTooLarge);
        }
        parts.push(rest.split_to(len));
    }
    if parts.is_empty() {
        return Err(EnvelopeError::EmptyBundle);
    }
    Ok(parts)
}

fn need(buf: &Bytes, len: usize) -> Result<(), EnvelopeError> {
    if buf.remaining() < len {
        Err(EnvelopeError::Truncated)
    } else {
        Ok(())
    }
}

fn get_bytes(buf: &mut Bytes) -> Result<Bytes, EnvelopeError> {
    need(buf, 2)?;
    let len = usize::from(buf.get_u16());
    need(buf, len)?;
    Ok(buf.split_to(len))
}

fn get_string(buf: &mut Bytes) -> Result<String, EnvelopeError> {
    let raw = get_bytes(buf)?;
    String::from_utf8(raw.to_vec()).map_err(|_| EnvelopeError::NotUtf8)
}

fn decode_property(buf: &mut Bytes, props: &mut MessageProperties) -> Result<(), EnvelopeError> {
    need(buf, 1)?;
    match buf.get_u8() {
        PROP_PAYLOAD_FORMAT => {
            need(buf, 1)?;
            props.payload_format_indicator = Some(buf.get_u8());
        }
        PROP_MESSAGE_EXPIRY => {
            need(buf, 4)?;
            props.message_expiry_interval = Some(buf.get_u32());
        }
        PROP_CONTENT_TYPE => props.content_type = Some(get_string(buf)?),
        PROP_RESPONSE_TOPIC => props.response_topic = Some(get_string(buf)?),
        PROP_CORRELATION_DATA => props.correlation_data = Some(get_bytes(buf)?),
        PROP_USER_PROPERTY => {
            let key = get_string(buf)?;
            let value = get_string(buf)?;
            props.user_properties.push((key, value));
        }
        other => return Err(EnvelopeError::UnknownProperty(other)),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn minimal_envelope_round_trips() {
        let env = Envelope {
            qos: 1,
            retain: false,
            client_id: "dev-1".into(),
            timestamp_ms: 1_700_000_000_000,
            properties: MessageProperties::default(),
        };
        let body = env.encode(b"hello").expect("encodes");
        assert_eq!(body.len(), 12 + 5 + 5);
        let (decoded, payload) = Envelope::decode(body).expect("decodes");
        assert_eq!(decoded, env);
        assert_eq!(&payload[..], b"hello");
    }

    #[test]
    fn truncated_and_foreign_bodies_are_errors() {
        assert_eq!(
            Envelope::decode(Bytes::from_static(b"")),
            Err(EnvelopeError::Truncated)
        );
        assert_eq!(
            Envelope::decode(Bytes::from_static(&[9; 20])),
            Err(EnvelopeError::UnknownVersion(9))
        );
        let mut body = BytesMut::from(&[1u8, FLAG_PROPERTIES, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0][..]);
        body.put_u32(100);
        assert_eq!(
            Envelope::decode(body.freeze()),
            Err(EnvelopeError::Truncated)
        );
    }

    #[test]
    fn bundles_split_into_their_messages_and_plain_bodies_into_themselves() {
        let one = Envelope {
            qos: 1,
            client_id: "a".into(),
            ..Envelope::default()
        };
        let bodies: Vec<Bytes> = (0..3)
            .map(|i| one.encode(format!("m{i}").as_bytes()).expect("encodes"))
            .collect();
        let bundle = encode_bundle(bodies.iter().map(|b| &b[..])).expect("bundles");
        let parts = split_bundle(bundle).expect("splits");
        assert_eq!(parts, bodies);
        let (_, payload) = Envelope::decode(parts[2].clone()).expect("decodes");
        assert_eq!(&payload[..], b"m2");
        assert_eq!(split_bundle(bodies[0].clone()), Ok(vec![bodies[0].clone()]));
    }

    #[test]
    fn broken_bundles_are_errors() {
        assert_eq!(encode_bundle([]), Err(EnvelopeError::EmptyBundle));
        let many = vec![&b"x"[..]; MAX_BUNDLE_MESSAGES + 1];
        assert_eq!(encode_bundle(many), Err(EnvelopeError::BundleTooLarge));
        assert_eq!(
            split_bundle(Bytes::from_static(&[BUNDLE_VERSION])),
            Err(EnvelopeError::EmptyBundle)
        );
        assert_eq!(
            split_bundle(Bytes::from_static(&[BUNDLE_VERSION, 0, 0, 0, 9, 1])),
            Err(EnvelopeError::Truncated)
        );
        assert_eq!(
            split_bundle(Bytes::from_static(&[BUNDLE_VERSION, 0, 0])),
            Err(EnvelopeError::Truncated)
        );
        assert_eq!(split_bundle(Bytes::new()), Err(EnvelopeError::Truncated));
    }

    proptest! {
        #[test]
        fn any_stored_body_splits_or_is_refused_without_panicking(
            body in proptest::collection::vec(any::<u8>(), 0..600),
        ) {
            let _ = split_bundle(Bytes::from(body));
        }

        #[test]
        fn bundles_round_trip(
            bodies in proptest::collection::vec(
                proptest::collection::vec(any::<u8>(), 0..40), 1..MAX_BUNDLE_MESSAGES + 1),
        ) {
            let bundle = encode_bundle(bodies.iter().map(|b| &b[..])).expect("bundles");
            let parts = split_bundle(bundle).expect("splits");
            let parts: Vec<Vec<u8>> = parts.iter().map(|p| p.to_vec()).collect();
            prop_assert_eq!(parts, bodies);
        }

        #[test]
        fn envelope_round_trips(
            qos in 0u8..3,
            retain: bool,
            client_id in ".{0,30}",
            timestamp_ms: u64,
            payload_format in proptest::option::of(0u8..2),
            expiry: Option<u32>,
            content_type in proptest::option::of(".{0,10}"),
            response_topic in proptest::option::of(".{0,10}"),
            correlation in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..16)),
            user_properties in proptest::collection::vec((".{0,8}", "(.|\n){0,8}"), 0..4),
            payload in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let env = Envelope {
                qos,
                retain,
                client_id,
                timestamp_ms,
                properties: MessageProperties {
                    payload_format_indicator: payload_format,
                    message_expiry_interval: expiry,
                    content_type,
                    response_topic,
                    correlation_data: correlation.map(Bytes::from),
                    user_properties,
                },
            };
            let body = env.encode(&payload).expect("encodes");
            let (decoded, decoded_payload) = Envelope::decode(body).expect("decodes");
            prop_assert_eq!(decoded, env);
            prop_assert_eq!(&decoded_payload[..], &payload[..]);
        }
    }
}

//! Bytes to [`Packet`]s.
//!
//! [`decode_packet`] first validates the fixed header (packet type, flag bits, remaining
//! length, size limit) from the bytes at hand, before any body is buffered; only then does it
//! wait for the whole frame, split it off the buffer, and parse the body from that frozen slice
//! (so payloads and binary fields are zero-copy [`Bytes`] views of the frame).

use bytes::{Buf, Bytes, BytesMut};

use crate::error::DecodeError;
use crate::packet::{
    Auth, AuthProperties, ConnAck, Connect, ConnectProperties, Disconnect, LastWill, Packet,
    ProtocolVersion, PubResp, Publish, PublishProperties, QoS, ReasonCode, ReasonProperties,
    SubAck, Subscribe, SubscribeFilter, SubscriptionOptions, UnsubAck, Unsubscribe,
};
use crate::properties;
use crate::wire::{parse_varint, Reader};

pub(crate) const CONNECT: u8 = 1;
pub(crate) const CONNACK: u8 = 2;
pub(crate) const PUBLISH: u8 = 3;
pub(crate) const PUBACK: u8 = 4;
pub(crate) const PUBREC: u8 = 5;
pub(crate) const PUBREL: u8 = 6;
pub(crate) const PUBCOMP: u8 = 7;
pub(crate) const SUBSCRIBE: u8 = 8;
pub(crate) const SUBACK: u8 = 9;
pub(crate) const UNSUBSCRIBE: u8 = 10;
pub(crate) const UNSUBACK: u8 = 11;
pub(crate) const PINGREQ: u8 = 12;
pub(crate) const PINGRESP: u8 = 13;
pub(crate) const DISCONNECT: u8 = 14;
pub(crate) const AUTH: u8 = 15;

/// Reason codes MQTT 5 allows on each packet (section 2.4 and the packets' own tables).
pub(crate) const CONNACK_CODES: &[u8] = &[
    0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90, 0x95, 0x97,
    0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F,
];
pub(crate) const PUBACK_CODES: &[u8] = &[0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99];
pub(crate) const PUBREL_CODES: &[u8] = &[0x00, 0x92];
pub(crate) const SUBACK_CODES: &[u8] = &[
    0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2,
];
pub(crate) const UNSUBACK_CODES: &[u8] = &[0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91];
pub(crate) const DISCONNECT_CODES: &[u8] = &[
    0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93, 0x94, 0x95,
    0x96, 0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2,
];
pub(crate) const AUTH_CODES: &[u8] = &[0x00, 0x18, 0x19];

/// Decode one packet from the front of `buf`.
///
/// * `Ok(None)`: more bytes are needed; `buf` is left as it was (capacity may be reserved for
///   the rest of the frame).
/// * `Ok(Some(packet))`: the packet's bytes have been removed from `buf`.
/// * `Err(_)`: the peer broke the protocol; close the connection.
///
/// `version` is the connection's protocol version, `None` before CONNECT: then only CONNECT is
/// accepted (anything else is a Protocol error). A CONNECT is decoded whatever `version` says
/// (it carries its own version); refusing a second CONNECT is up to the caller.
///
/// `max_packet_size` bounds the whole packet (fixed header included). It is checked as soon as
/// the fixed header is readable, before the body is waited for or buffered, so a huge length
/// prefix is rejected after at most five bytes.
pub fn decode_packet(
    buf: &mut BytesMut,
    version: Option<ProtocolVersion>,
    max_packet_size: usize,
) -> Result<Option<Packet>, DecodeError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let packet_type = first >> 4;
    let flags = first & 0x0F;
    check_fixed_header(packet_type, flags, version)?;

    let Some((remaining, len_len)) = parse_varint(buf.get(1..).unwrap_or_default())? else {
        return Ok(None);
    };
    let header_len = 1 + len_len;
    let size = header_len + remaining as usize;
    if size > max_packet_size {
        return Err(DecodeError::TooLarge {
            size,
            max: max_packet_size,
        });
    }
    if buf.len() < size {
        buf.reserve(size - buf.len());
        return Ok(None);
    }

    let mut frame = buf.split_to(size);
    frame.advance(header_len);
    let frame = frame.freeze();
    // `version` is only None for CONNECT here (checked above), which ignores it.
    let v5 = version.is_some_and(ProtocolVersion::is_v5);
    decode_body(packet_type, flags, v5, &frame).map(Some)
}

/// Packet type and fixed-header flag checks, done on the first byte alone.
fn check_fixed_header(
    packet_type: u8,
    flags: u8,
    version: Option<ProtocolVersion>,
) -> Result<(), DecodeError> {
    if packet_type == 0 {
        return Err(DecodeError::Malformed("reserved packet type 0"));
    }
    match version {
        None if packet_type != CONNECT => {
            return Err(DecodeError::Protocol("the first packet must be CONNECT"))
        }
        Some(v) if packet_type == AUTH && !v.is_v5() => {
            return Err(DecodeError::Protocol("AUTH exists only in MQTT 5"))
        }
        _ => {}
    }
    let valid = match packet_type {
        PUBLISH => {
            let qos = (flags >> 1) & 0x03;
            if qos == 3 {
                return Err(DecodeError::Malformed("PUBLISH with QoS 3"));
            }
            if qos == 0 && flags & 0x08 != 0 {
                return Err(DecodeError::Malformed("PUBLISH with DUP set on QoS 0"));
            }
            true
        }
        PUBREL | SUBSCRIBE | UNSUBSCRIBE => flags == 0x02,
        _ => flags == 0,
    };
    if valid {
        Ok(())
    } else {
        Err(DecodeError::Malformed("invalid fixed header flags"))
    }
}

fn decode_body(packet_type: u8, flags: u8, v5: bool, frame: &Bytes) -> Result<Packet, DecodeError> {
    let mut r = Reader::new(frame);
    let packet = match packet_type {
        CONNECT => Packet::Connect(Box::new(decode_connect(&mut r)?)),
        CONNACK => Packet::ConnAck(Box::new(decode_connack(&mut r, v5)?)),
        PUBLISH => Packet::Publish(decode_publish(&mut r, flags, v5)?),
        PUBACK => Packet::PubAck(decode_pub_resp(&mut r, v5, PUBACK_CODES)?),
        PUBREC => Packet::PubRec(decode_pub_resp(&mut r, v5, PUBACK_CODES)?),
        PUBREL => Packet::PubRel(decode_pub_resp(&mut r, v5, PUBREL_CODES)?),
        PUBCOMP => Packet::PubComp(decode_pub_resp(&mut r, v5, PUBREL_CODES)?),
        SUBSCRIBE => Packet::Subscribe(decode_subscribe(&mut r, v5)?),
        SUBACK => Packet::SubAck(decode_suback(&mut r, v5)?),
        UNSUBSCRIBE => Packet::Unsubscribe(decode_unsubscribe(&mut r, v5)?),
        UNSUBACK => Packet::UnsubAck(decode_unsuback(&mut r, v5)?),
        PINGREQ => Packet::PingReq,
        PINGRESP => Packet::PingResp,
        DISCONNECT => Packet::Disconnect(decode_disconnect(&mut r, v5)?),
        AUTH => Packet::Auth(decode_auth(&mut r)?),
        _ => return Err(DecodeError::Malformed("reserved packet type")),
    };
    r.finish()?;
    Ok(packet)
}

#[inline]
fn packet_id(r: &mut Reader<'_>) -> Result<u16, DecodeError> {
    match r.u16()? {
        0 => Err(DecodeError::Protocol("packet identifier 0")),
        id => Ok(id),
    }
}

#[inline]
fn reason(code: u8, allowed: &[u8]) -> Result<ReasonCode, DecodeError> {
    if allowed.contains(&code) {
        Ok(ReasonCode(code))
    } else {
        Err(DecodeError::Protocol(
            "reason code not allowed on this packet",
        ))
    }
}

/// Topic name rules shared by PUBLISH and the will topic: no wildcards. Emptiness is checked
/// by the callers (it depends on the packet and version).
#[inline]
fn check_topic_name(topic: &str) -> Result<(), DecodeError> {
    if topic.bytes().any(|b| b == b'+' || b == b'#') {
        return Err(DecodeError::TopicNameInvalid(
            "topic name contains a wildcard",
        ));
    }
    Ok(())
}

fn decode_connect(r: &mut Reader<'_>) -> Result<Connect, DecodeError> {
    let name = r.raw_binary()?;
    let level = r.u8()?;
    let protocol = match (name, level) {
        (b"MQTT", 4) => ProtocolVersion::V311,
        (b"MQTT", 5) => ProtocolVersion::V5,
        (b"MQIsdp", 3) => ProtocolVersion::V31,
        (b"MQTT" | b"MQIsdp", level) => {
            // Whether the refusal should be an MQTT 5 CONNACK: only if the rest reads as
            // MQTT 5 (with properties) and nothing is left over.
            let mut rest = r.clone();
            let v5_shaped = decode_connect_after_level(&mut rest, ProtocolVersion::V5)
                .is_ok_and(|_| rest.is_empty());
            return Err(DecodeError::UnsupportedProtocol { level, v5_shaped });
        }
        _ => return Err(DecodeError::Protocol("unknown protocol name")),
    };
    decode_connect_after_level(r, protocol)
}

fn decode_connect_after_level(
    r: &mut Reader<'_>,
    protocol: ProtocolVersion,
) -> Result<Connect, DecodeError> {
    let v5 = protocol.is_v5();

    let flags = r.u8()?;
    if flags & 0x01 != 0 {
        return Err(DecodeError::Malformed("CONNECT reserved flag set"));
    }
    let clean_start = flags & 0x02 != 0;
    let will_flag = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0x03;
    let will_retain = flags & 0x20 != 0;
    let password_flag = flags & 0x40 != 0;
    let username_flag = flags & 0x80 != 0;
    if !will_flag && (will_qos != 0 || will_retain) {
        return Err(DecodeError::Malformed(
            "will QoS or will retain set without the will flag",
        ));
    }
    let Some(will_qos) = QoS::from_u8(will_qos) else {
        return Err(DecodeError::Malformed("will QoS 3"));
    };
    if password_flag && !username_flag && !v5 {
        return Err(DecodeError::Malformed(
            "password flag set without the user name flag",
        ));
    }

    let keep_alive = r.u16()?;
    let properties = if v5 {
        properties::decode_connect(r)?
    } else {
        ConnectProperties::default()
    };
    let client_id = r.string()?;
    let will = if will_flag {
        let (properties, delay_interval) = if v5 {
            properties::decode_publish(r, true)?
        } else {
            (PublishProperties::default(), None)
        };
        let topic = r.str()?;
        if topic.is_empty() {
            return Err(DecodeError::TopicNameInvalid("empty will topic"));
        }
        check_topic_name(topic)?;
        let topic = topic.to_owned();
        let payload = r.binary()?;
        Some(LastWill {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
            delay_interval,
            properties,
        })
    } else {
        None
    };
    let username = if username_flag {
        Some(r.string()?)
    } else {
        None
    };
    let password = if password_flag {
        Some(r.binary()?)
    } else {
        None
    };
    Ok(Connect {
        protocol,
        clean_start,
        keep_alive,
        client_id,
        will,
        username,
        password,
        properties,
    })
}

fn decode_connack(r: &mut Reader<'_>, v5: bool) -> Result<ConnAck, DecodeError> {
    let ack_flags = r.u8()?;
    if ack_flags & 0xFE != 0 {
        return Err(DecodeError::Malformed("CONNACK reserved flags set"));
    }
    let session_present = ack_flags & 0x01 != 0;
    let code = r.u8()?;
    let (reason, properties) = if v5 {
        (reason(code, CONNACK_CODES)?, properties::decode_connack(r)?)
    } else {
        let reason = ReasonCode::from_v311_connack(code)
            .ok_or(DecodeError::Protocol("reserved CONNACK return code"))?;
        (reason, Default::default())
    };
    if session_present && reason != ReasonCode::SUCCESS {
        return Err(DecodeError::Protocol(
            "session present set on a refused connection",
        ));
    }
    Ok(ConnAck {
        session_present,
        reason,
        properties,
    })
}

fn decode_publish(r: &mut Reader<'_>, flags: u8, v5: bool) -> Result<Publish, DecodeError> {
    // QoS 3 and DUP on QoS 0 were rejected with the fixed header.
    let qos = match (flags >> 1) & 0x03 {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    };
    let topic = r.str()?;
    check_topic_name(topic)?;
    let packet_id = if qos == QoS::AtMostOnce {
        0
    } else {
        packet_id(r)?
    };
    let properties = if v5 {
        properties::decode_publish(r, false)?.0
    } else {
        PublishProperties::default()
    };
    if topic.is_empty() {
        if !v5 {
            return Err(DecodeError::TopicNameInvalid("empty topic name"));
        }
        if properties.topic_alias.is_none() {
            return Err(DecodeError::Protocol(
                "empty topic name without a topic alias",
            ));
        }
    }
    Ok(Publish {
        dup: flags & 0x08 != 0,
        qos,
        retain: flags & 0x01 != 0,
        topic: topic.to_owned(),
        packet_id,
        properties,
        payload: r.rest(),
    })
}

/// PUBACK, PUBREC, PUBREL, PUBCOMP. MQTT 5 allows dropping the property length (remaining
/// length 3) and also the reason code (remaining length 2, meaning Success).
fn decode_pub_resp(r: &mut Reader<'_>, v5: bool, codes: &[u8]) -> Result<PubResp, DecodeError> {
    let packet_id = packet_id(r)?;
    let mut resp = PubResp::new(packet_id, ReasonCode::SUCCESS);
    if v5 && !r.is_empty() {
        resp.reason = reason(r.u8()?, codes)?;
        if !r.is_empty() {
            resp.properties = properties::decode_reason(r)?;
        }
    }
    Ok(resp)
}

fn decode_subscribe(r: &mut Reader<'_>, v5: bool) -> Result<Subscribe, DecodeError> {
    let packet_id = packet_id(r)?;
    let (subscription_identifier, user_properties) = if v5 {
        properties::decode_subscribe(r)?
    } else {
        (None, Vec::new())
    };
    let mut filters = Vec::new();
    while !r.is_empty() {
        let filter = r.string()?;
        let options = subscription_options(r.u8()?, v5)?;
        if options.no_local && filter.starts_with("$share/") {
            return Err(DecodeError::Protocol(
                "no local set on a shared subscription",
            ));
        }
        filters.push(SubscribeFilter { filter, options });
    }
    if filters.is_empty() {
        return Err(DecodeError::Protocol("SUBSCRIBE without topic filters"));
    }
    Ok(Subscribe {
        packet_id,
        subscription_identifier,
        user_properties,
        filters,
    })
}

fn subscription_options(byte: u8, v5: bool) -> Result<SubscriptionOptions, DecodeError> {
    if !v5 {
        // [MQTT-3.8.3-4]: reserved bits set or QoS 3 make the packet malformed.
        if byte & 0xFC != 0 {
            return Err(DecodeError::Malformed(
                "requested QoS byte has reserved bits set",
            ));
        }
        let qos = QoS::from_u8(byte).ok_or(DecodeError::Malformed("requested QoS 3"))?;
        return Ok(SubscriptionOptions {
            qos,
            ..Default::default()
        });
    }
    if byte & 0xC0 != 0 {
        // [MQTT-3.8.3-5]
        return Err(DecodeError::Malformed(
            "subscription options reserved bits set",
        ));
    }
    let qos =
        QoS::from_u8(byte & 0x03).ok_or(DecodeError::Protocol("subscription maximum QoS 3"))?;
    let retain_handling = (byte >> 4) & 0x03;
    if retain_handling == 3 {
        return Err(DecodeError::Protocol("retain handling 3"));
    }
    Ok(SubscriptionOptions {
        qos,
        no_local: byte & 0x04 != 0,
        retain_as_published: byte & 0x08 != 0,
        retain_handling,
    })
}

fn decode_suback(r: &mut Reader<'_>, v5: bool) -> Result<SubAck, DecodeError> {
    let packet_id = packet_id(r)?;
    let properties = if v5 {
        properties::decode_reason(r)?
    } else {
        ReasonProperties::default()
    };
    let codes: &[u8] = if v5 {
        SUBACK_CODES
    } else {
        &[0x00, 0x01, 0x02, 0x80]
    };
    let mut reasons = Vec::with_capacity(r.remaining());
    while !r.is_empty() {
        reasons.push(reason(r.u8()?, codes)?);
    }
    if reasons.is_empty() {
        return Err(DecodeError::Protocol("SUBACK without return codes"));
    }
    Ok(SubAck {
        packet_id,
        properties,
        reasons,
    })
}

fn decode_unsubscribe(r: &mut Reader<'_>, v5: bool) -> Result<Unsubscribe, DecodeError> {
    let packet_id = packet_id(r)?;
    let user_properties = if v5 {
        properties::decode_unsubscribe(r)?
    } else {
        Vec::new()
    };
    let mut filters = Vec::new();
    while !r.is_empty() {
        filters.push(r.string()?);
    }
    if filters.is_empty() {
        return Err(DecodeError::Protocol("UNSUBSCRIBE without topic filters"));
    }
    Ok(Unsubscribe {
        packet_id,
        user_properties,
        filters,
    })
}

fn decode_unsuback(r: &mut Reader<'_>, v5: bool) -> Result<UnsubAck, DecodeError> {
    let packet_id = packet_id(r)?;
    let mut ack = UnsubAck {
        packet_id,
        ..Default::default()
    };
    if v5 {
        ack.properties = properties::decode_reason(r)?;
        ack.reasons.reserve(r.remaining());
        while !r.is_empty() {
            ack.reasons.push(reason(r.u8()?, UNSUBACK_CODES)?);
        }
        if ack.reasons.is_empty() {
            return Err(DecodeError::Protocol("UNSUBACK without reason codes"));
        }
    }
    Ok(ack)
}

/// MQTT 5 allows remaining length 0 (Success, no properties) and 1 (no property length).
fn decode_disconnect(r: &mut Reader<'_>, v5: bool) -> Result<Disconnect, DecodeError> {
    let mut disconnect = Disconnect::new(ReasonCode::NORMAL_DISCONNECTION);
    if v5 && !r.is_empty() {
        disconnect.reason = reason(r.u8()?, DISCONNECT_CODES)?;
        if !r.is_empty() {
            disconnect.properties = properties::decode_disconnect(r)?;
        }
    }
    Ok(disconnect)
}

/// Same short forms as DISCONNECT.
fn decode_auth(r: &mut Reader<'_>) -> Result<Auth, DecodeError> {
    let mut auth = Auth {
        reason: ReasonCode::SUCCESS,
        properties: AuthProperties::default(),
    };
    if !r.is_empty() {
        auth.reason = reason(r.u8()?, AUTH_CODES)?;
        if !r.is_empty() {
            auth.properties = properties::decode_auth(r)?;
        }
    }
    Ok(auth)
}

/// A [`tokio_util::codec`] decoder/encoder around [`decode_packet`] and
/// [`crate::encode_packet`].
///
/// Decoding a CONNECT, or encoding one, sets `version` to the CONNECT's protocol; until then
/// only CONNECT is decoded, and packets are encoded as 3.1.1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttCodec {
    pub version: Option<ProtocolVersion>,
    pub max_packet_size: usize,
}

impl MqttCodec {
    /// A codec for a fresh connection (server side: waits for CONNECT).
    pub fn new(max_packet_size: usize) -> Self {
        MqttCodec {
            version: None,
            max_packet_size,
        }
    }

    /// A codec whose protocol version is already known.
    pub fn with_version(version: ProtocolVersion, max_packet_size: usize) -> Self {
        MqttCodec {
            version: Some(version),
            max_packet_size,
        }
    }
}

impl tokio_util::codec::Decoder for MqttCodec {
    type Item = Packet;
    type Error = DecodeError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Packet>, DecodeError> {
        let packet = decode_packet(src, self.version, self.max_packet_size)?;
        if let Some(Packet::Connect(connect)) = &packet {
            self.version = Some(connect.protocol);
        }
        Ok(packet)
    }
}

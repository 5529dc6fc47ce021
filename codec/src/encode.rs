//! [`Packet`]s to bytes.
//!
//! The remaining length is computed once, the buffer reserved for the exact frame, and the
//! packet written straight into it. On error nothing is left appended.
//!
//! MQTT 3.1.1 (and 3.1) output drops everything 3.1.1 cannot carry: properties, reason codes
//! on acknowledgements and DISCONNECT, UNSUBACK reason codes. CONNACK and SUBACK reason codes
//! are mapped to 3.1.1 return codes (see [`ReasonCode::to_v311_connack`] and
//! [`ReasonCode::to_v311_suback`]).
//!
//! A few values are normalised instead of refused, because the peer would otherwise have to
//! treat the packet as an error: DUP is not written on QoS 0 PUBLISH, Session Present is not
//! written on a refused CONNACK, and a CONNACK Maximum QoS of 2 is omitted (absent means 2).

use bytes::{BufMut, BytesMut};

use crate::decode::MqttCodec;
use crate::decode::{
    AUTH, CONNACK, CONNECT, DISCONNECT, PINGREQ, PINGRESP, PUBACK, PUBCOMP, PUBLISH, PUBREC,
    PUBREL, SUBACK, SUBSCRIBE, UNSUBACK, UNSUBSCRIBE,
};
use crate::error::EncodeError;
use crate::packet::{
    Auth, ConnAck, Connect, Disconnect, Packet, ProtocolVersion, PubResp, Publish, QoS, ReasonCode,
    SubAck, Subscribe, SubscriptionOptions, UnsubAck, Unsubscribe,
};
use crate::properties::{self, with_prefix};
use crate::wire::{binary_len, put_binary, put_varint, varint_len, MAX_VARINT};

/// Exact number of bytes [`encode_packet`] appends for `packet` (when it succeeds).
///
/// Use it to honour a peer's Maximum Packet Size. For CONNECT the packet's own protocol
/// version is used and `version` is ignored.
pub fn encoded_len(packet: &Packet, version: ProtocolVersion) -> usize {
    let remaining = remaining_len(packet, version.is_v5());
    1 + varint_len(remaining) + remaining
}

/// Appends `packet` to `buf` in the wire format of `version`.
///
/// For CONNECT the packet's own `protocol` is used and `version` is ignored. On error `buf` is
/// left as it was.
pub fn encode_packet(
    packet: &Packet,
    version: ProtocolVersion,
    buf: &mut BytesMut,
) -> Result<(), EncodeError> {
    let v5 = version.is_v5();
    if let Packet::Auth(_) = packet {
        if !v5 {
            return Err(EncodeError::UnsupportedPacket {
                packet: "AUTH",
                version,
            });
        }
    }
    let remaining = remaining_len(packet, v5);
    if remaining > MAX_VARINT as usize {
        return Err(EncodeError::PacketTooLarge {
            size: remaining,
            max: MAX_VARINT as usize,
        });
    }
    let start = buf.len();
    buf.reserve(1 + varint_len(remaining) + remaining);
    let result = write_packet(packet, v5, remaining as u32, buf);
    match result {
        Ok(()) => {
            debug_assert_eq!(
                buf.len() - start,
                1 + varint_len(remaining) + remaining,
                "encoded_len disagrees with the encoder for {packet:?}"
            );
            Ok(())
        }
        Err(e) => {
            buf.truncate(start);
            Err(e)
        }
    }
}

fn remaining_len(packet: &Packet, v5: bool) -> usize {
    match packet {
        Packet::Connect(c) => connect_len(c),
        Packet::ConnAck(c) => {
            2 + if v5 {
                with_prefix(properties::connack_len(&c.properties))
            } else {
                0
            }
        }
        Packet::Publish(p) => publish_len(p, v5),
        Packet::PubAck(r) | Packet::PubRec(r) | Packet::PubRel(r) | Packet::PubComp(r) => {
            pub_resp_len(r, v5)
        }
        Packet::Subscribe(s) => {
            2 + if v5 {
                with_prefix(properties::subscribe_len(
                    s.subscription_identifier,
                    &s.user_properties,
                ))
            } else {
                0
            } + s
                .filters
                .iter()
                .map(|f| binary_len(f.filter.as_bytes()) + 1)
                .sum::<usize>()
        }
        Packet::SubAck(s) => {
            2 + if v5 {
                with_prefix(properties::reason_len(&s.properties))
            } else {
                0
            } + s.reasons.len()
        }
        Packet::Unsubscribe(u) => {
            2 + if v5 {
                with_prefix(properties::unsubscribe_len(&u.user_properties))
            } else {
                0
            } + u
                .filters
                .iter()
                .map(|f| binary_len(f.as_bytes()))
                .sum::<usize>()
        }
        Packet::UnsubAck(u) => {
            2 + if v5 {
                with_prefix(properties::reason_len(&u.properties)) + u.reasons.len()
            } else {
                0
            }
        }
        Packet::PingReq | Packet::PingResp => 0,
        Packet::Disconnect(d) => {
            if !v5 {
                0
            } else if properties::disconnect_is_empty(&d.properties) {
                usize::from(d.reason != ReasonCode::SUCCESS)
            } else {
                1 + with_prefix(properties::disconnect_len(&d.properties))
            }
        }
        Packet::Auth(a) => {
            if !v5 {
                0
            } else if properties::auth_is_empty(&a.properties) {
                usize::from(a.reason != ReasonCode::SUCCESS)
            } else {
                1 + with_prefix(properties::auth_len(&a.properties))
            }
        }
    }
}

fn protocol_name(version: ProtocolVersion) -> &'static [u8] {
    match version {
        ProtocolVersion::V31 => b"MQIsdp",
        ProtocolVersion::V311 | ProtocolVersion::V5 => b"MQTT",
    }
}

fn connect_len(c: &Connect) -> usize {
    let v5 = c.protocol.is_v5();
    let mut len = binary_len(protocol_name(c.protocol)) + 1 + 1 + 2;
    if v5 {
        len += with_prefix(properties::connect_len(&c.properties));
    }
    len += binary_len(c.client_id.as_bytes());
    if let Some(will) = &c.will {
        if v5 {
            len += with_prefix(properties::publish_len(
                &will.properties,
                Some(will.delay_interval),
            ));
        }
        len += binary_len(will.topic.as_bytes()) + binary_len(&will.payload);
    }
    if let Some(username) = &c.username {
        len += binary_len(username.as_bytes());
    }
    if let Some(password) = &c.password {
        len += binary_len(password);
    }
    len
}

#[inline]
fn publish_len(p: &Publish, v5: bool) -> usize {
    binary_len(p.topic.as_bytes())
        + if p.qos == QoS::AtMostOnce { 0 } else { 2 }
        + if v5 {
            with_prefix(properties::publish_len(&p.properties, None))
        } else {
            0
        }
        + p.payload.len()
}

#[inline]
fn pub_resp_len(r: &PubResp, v5: bool) -> usize {
    2 + if !v5 {
        0
    } else if properties::reason_is_empty(&r.properties) {
        usize::from(r.reason != ReasonCode::SUCCESS)
    } else {
        1 + with_prefix(properties::reason_len(&r.properties))
    }
}

fn write_packet(
    packet: &Packet,
    v5: bool,
    remaining: u32,
    buf: &mut BytesMut,
) -> Result<(), EncodeError> {
    match packet {
        Packet::Connect(c) => {
            header(buf, CONNECT, 0, remaining);
            write_connect(buf, c)
        }
        Packet::ConnAck(c) => {
            header(buf, CONNACK, 0, remaining);
            write_connack(buf, c, v5)
        }
        Packet::Publish(p) => {
            let mut flags = (p.qos as u8) << 1 | u8::from(p.retain);
            if p.dup && p.qos != QoS::AtMostOnce {
                flags |= 0x08;
            }
            header(buf, PUBLISH, flags, remaining);
            write_publish(buf, p, v5)
        }
        Packet::PubAck(r) => {
            header(buf, PUBACK, 0, remaining);
            write_pub_resp(buf, r, v5)
        }
        Packet::PubRec(r) => {
            header(buf, PUBREC, 0, remaining);
            write_pub_resp(buf, r, v5)
        }
        Packet::PubRel(r) => {
            header(buf, PUBREL, 0x02, remaining);
            write_pub_resp(buf, r, v5)
        }
        Packet::PubComp(r) => {
            header(buf, PUBCOMP, 0, remaining);
            write_pub_resp(buf, r, v5)
        }
        Packet::Subscribe(s) => {
            header(buf, SUBSCRIBE, 0x02, remaining);
            write_subscribe(buf, s, v5)
        }
        Packet::SubAck(s) => {
            header(buf, SUBACK, 0, remaining);
            write_suback(buf, s, v5)
        }
        Packet::Unsubscribe(u) => {
            header(buf, UNSUBSCRIBE, 0x02, remaining);
            write_unsubscribe(buf, u, v5)
        }
        Packet::UnsubAck(u) => {
            header(buf, UNSUBACK, 0, remaining);
            write_unsuback(buf, u, v5)
        }
        Packet::PingReq => {
            header(buf, PINGREQ, 0, remaining);
            Ok(())
        }
        Packet::PingResp => {
            header(buf, PINGRESP, 0, remaining);
            Ok(())
        }
        Packet::Disconnect(d) => {
            header(buf, DISCONNECT, 0, remaining);
            write_disconnect(buf, d, v5)
        }
        Packet::Auth(a) => {
            header(buf, AUTH, 0, remaining);
            write_auth(buf, a)
        }
    }
}

#[inline]
fn header(buf: &mut BytesMut, packet_type: u8, flags: u8, remaining: u32) {
    buf.put_u8(packet_type << 4 | flags);
    put_varint(buf, remaining);
}

#[inline]
fn put_packet_id(buf: &mut BytesMut, id: u16) -> Result<(), EncodeError> {
    if id == 0 {
        return Err(EncodeError::InvalidValue("packet identifier 0"));
    }
    buf.put_u16(id);
    Ok(())
}

fn write_connect(buf: &mut BytesMut, c: &Connect) -> Result<(), EncodeError> {
    let v5 = c.protocol.is_v5();
    if !v5 && c.password.is_some() && c.username.is_none() {
        return Err(EncodeError::InvalidValue(
            "MQTT 3.1.1 cannot send a password without a user name",
        ));
    }
    put_binary(buf, "protocol name", protocol_name(c.protocol))?;
    buf.put_u8(c.protocol.level());
    let mut flags = 0u8;
    if c.clean_start {
        flags |= 0x02;
    }
    if let Some(will) = &c.will {
        flags |= 0x04 | (will.qos as u8) << 3;
        if will.retain {
            flags |= 0x20;
        }
    }
    if c.password.is_some() {
        flags |= 0x40;
    }
    if c.username.is_some() {
        flags |= 0x80;
    }
    buf.put_u8(flags);
    buf.put_u16(c.keep_alive);
    if v5 {
        properties::put_connect(buf, &c.properties)?;
    }
    put_binary(buf, "client identifier", c.client_id.as_bytes())?;
    if let Some(will) = &c.will {
        if v5 {
            properties::put_publish(buf, &will.properties, Some(will.delay_interval))?;
        }
        put_binary(buf, "will topic", will.topic.as_bytes())?;
        put_binary(buf, "will payload", &will.payload)?;
    }
    if let Some(username) = &c.username {
        put_binary(buf, "user name", username.as_bytes())?;
    }
    if let Some(password) = &c.password {
        put_binary(buf, "password", password)?;
    }
    Ok(())
}

fn write_connack(buf: &mut BytesMut, c: &ConnAck, v5: bool) -> Result<(), EncodeError> {
    buf.put_u8(u8::from(
        c.session_present && c.reason == ReasonCode::SUCCESS,
    ));
    if v5 {
        buf.put_u8(c.reason.0);
        properties::put_connack(buf, &c.properties)
    } else {
        buf.put_u8(c.reason.to_v311_connack());
        Ok(())
    }
}

#[inline]
fn write_publish(buf: &mut BytesMut, p: &Publish, v5: bool) -> Result<(), EncodeError> {
    if p.topic.is_empty() && (!v5 || p.properties.topic_alias.is_none()) {
        return Err(EncodeError::InvalidValue(
            "an empty topic name needs an MQTT 5 topic alias",
        ));
    }
    put_binary(buf, "topic name", p.topic.as_bytes())?;
    if p.qos != QoS::AtMostOnce {
        put_packet_id(buf, p.packet_id)?;
    }
    if v5 {
        properties::put_publish(buf, &p.properties, None)?;
    }
    buf.put_slice(&p.payload);
    Ok(())
}

fn write_pub_resp(buf: &mut BytesMut, r: &PubResp, v5: bool) -> Result<(), EncodeError> {
    put_packet_id(buf, r.packet_id)?;
    if v5 {
        if properties::reason_is_empty(&r.properties) {
            if r.reason != ReasonCode::SUCCESS {
                buf.put_u8(r.reason.0);
            }
        } else {
            buf.put_u8(r.reason.0);
            properties::put_reason(buf, &r.properties)?;
        }
    }
    Ok(())
}

fn subscription_options_byte(o: &SubscriptionOptions, v5: bool) -> Result<u8, EncodeError> {
    if !v5 {
        return Ok(o.qos as u8);
    }
    if o.retain_handling > 2 {
        return Err(EncodeError::InvalidValue(
            "retain handling must be 0, 1 or 2",
        ));
    }
    Ok(o.qos as u8
        | u8::from(o.no_local) << 2
        | u8::from(o.retain_as_published) << 3
        | o.retain_handling << 4)
}

fn write_subscribe(buf: &mut BytesMut, s: &Subscribe, v5: bool) -> Result<(), EncodeError> {
    if s.filters.is_empty() {
        return Err(EncodeError::InvalidValue(
            "SUBSCRIBE needs at least one filter",
        ));
    }
    put_packet_id(buf, s.packet_id)?;
    if v5 {
        properties::put_subscribe(buf, s.subscription_identifier, &s.user_properties)?;
    }
    for f in &s.filters {
        put_binary(buf, "topic filter", f.filter.as_bytes())?;
        buf.put_u8(subscription_options_byte(&f.options, v5)?);
    }
    Ok(())
}

fn write_suback(buf: &mut BytesMut, s: &SubAck, v5: bool) -> Result<(), EncodeError> {
    if s.reasons.is_empty() {
        return Err(EncodeError::InvalidValue(
            "SUBACK needs at least one reason code",
        ));
    }
    put_packet_id(buf, s.packet_id)?;
    if v5 {
        properties::put_reason(buf, &s.properties)?;
        for r in &s.reasons {
            buf.put_u8(r.0);
        }
    } else {
        for &r in &s.reasons {
            buf.put_u8(r.to_v311_suback());
        }
    }
    Ok(())
}

fn write_unsubscribe(buf: &mut BytesMut, u: &Unsubscribe, v5: bool) -> Result<(), EncodeError> {
    if u.filters.is_empty() {
        return Err(EncodeError::InvalidValue(
            "UNSUBSCRIBE needs at least one filter",
        ));
    }
    put_packet_id(buf, u.packet_id)?;
    if v5 {
        properties::put_unsubscribe(buf, &u.user_properties)?;
    }
    for f in &u.filters {
        put_binary(buf, "topic filter", f.as_bytes())?;
    }
    Ok(())
}

fn write_unsuback(buf: &mut BytesMut, u: &UnsubAck, v5: bool) -> Result<(), EncodeError> {
    put_packet_id(buf, u.packet_id)?;
    if v5 {
        if u.reasons.is_empty() {
            return Err(EncodeError::InvalidValue(
                "an MQTT 5 UNSUBACK needs at least one reason code",
            ));
        }
        properties::put_reason(buf, &u.properties)?;
        for r in &u.reasons {
            buf.put_u8(r.0);
        }
    }
    Ok(())
}

fn write_disconnect(buf: &mut BytesMut, d: &Disconnect, v5: bool) -> Result<(), EncodeError> {
    if v5 {
        if properties::disconnect_is_empty(&d.properties) {
            if d.reason != ReasonCode::SUCCESS {
                buf.put_u8(d.reason.0);
            }
        } else {
            buf.put_u8(d.reason.0);
            properties::put_disconnect(buf, &d.properties)?;
        }
    }
    Ok(())
}

fn write_auth(buf: &mut BytesMut, a: &Auth) -> Result<(), EncodeError> {
    if properties::auth_is_empty(&a.properties) {
        if a.reason != ReasonCode::SUCCESS {
            buf.put_u8(a.reason.0);
        }
    } else {
        buf.put_u8(a.reason.0);
        properties::put_auth(buf, &a.properties)?;
    }
    Ok(())
}

impl tokio_util::codec::Encoder<Packet> for MqttCodec {
    type Error = EncodeError;

    fn encode(&mut self, item: Packet, dst: &mut BytesMut) -> Result<(), EncodeError> {
        tokio_util::codec::Encoder::<&Packet>::encode(self, &item, dst)
    }
}

/// Encodes without taking ownership (e.g. a retained message sent to many subscribers).
impl tokio_util::codec::Encoder<&Packet> for MqttCodec {
    type Error = EncodeError;

    fn encode(&mut self, item: &Packet, dst: &mut BytesMut) -> Result<(), EncodeError> {
        if let Packet::Connect(connect) = item {
            self.version = Some(connect.protocol);
        }
        encode_packet(item, self.version.unwrap_or(ProtocolVersion::V311), dst)
    }
}

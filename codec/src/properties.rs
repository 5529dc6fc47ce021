//! MQTT 5 properties: one decoder and one encoder per property set.
//!
//! Rules enforced by the decoders:
//! * an identifier this version does not define: Malformed (its value cannot be skipped);
//! * a defined identifier that is not allowed on the packet: Protocol error;
//! * a property that may appear once appearing twice: Protocol error;
//! * values out of range (0 for receive maximum, maximum packet size, topic alias and
//!   subscription identifier; a flag other than 0/1; maximum QoS other than 0/1): Protocol error;
//! * a property length that runs past the packet, or a value that runs past the property
//!   section: Malformed.

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::{DecodeError, EncodeError};
use crate::packet::{
    AuthProperties, ConnAckProperties, ConnectProperties, DisconnectProperties, PublishProperties,
    QoS, ReasonProperties, UserProperties,
};
use crate::wire::{binary_len, check_len, put_binary, put_varint, varint_len, Reader, MAX_VARINT};

pub const PAYLOAD_FORMAT_INDICATOR: u32 = 0x01;
pub const MESSAGE_EXPIRY_INTERVAL: u32 = 0x02;
pub const CONTENT_TYPE: u32 = 0x03;
pub const RESPONSE_TOPIC: u32 = 0x08;
pub const CORRELATION_DATA: u32 = 0x09;
pub const SUBSCRIPTION_IDENTIFIER: u32 = 0x0B;
pub const SESSION_EXPIRY_INTERVAL: u32 = 0x11;
pub const ASSIGNED_CLIENT_IDENTIFIER: u32 = 0x12;
pub const SERVER_KEEP_ALIVE: u32 = 0x13;
pub const AUTHENTICATION_METHOD: u32 = 0x15;
pub const AUTHENTICATION_DATA: u32 = 0x16;
pub const REQUEST_PROBLEM_INFORMATION: u32 = 0x17;
pub const WILL_DELAY_INTERVAL: u32 = 0x18;
pub const REQUEST_RESPONSE_INFORMATION: u32 = 0x19;
pub const RESPONSE_INFORMATION: u32 = 0x1A;
pub const SERVER_REFERENCE: u32 = 0x1C;
pub const REASON_STRING: u32 = 0x1F;
pub const RECEIVE_MAXIMUM: u32 = 0x21;
pub const TOPIC_ALIAS_MAXIMUM: u32 = 0x22;
pub const TOPIC_ALIAS: u32 = 0x23;
pub const MAXIMUM_QOS: u32 = 0x24;
pub const RETAIN_AVAILABLE: u32 = 0x25;
pub const USER_PROPERTY: u32 = 0x26;
pub const MAXIMUM_PACKET_SIZE: u32 = 0x27;
pub const WILDCARD_SUBSCRIPTION_AVAILABLE: u32 = 0x28;
pub const SUBSCRIPTION_IDENTIFIER_AVAILABLE: u32 = 0x29;
pub const SHARED_SUBSCRIPTION_AVAILABLE: u32 = 0x2A;

fn is_known(id: u32) -> bool {
    matches!(
        id,
        0x01..=0x03
            | 0x08
            | 0x09
            | 0x0B
            | 0x11..=0x13
            | 0x15..=0x1A
            | 0x1C
            | 0x1F
            | 0x21..=0x2A
    )
}

fn not_allowed(id: u32) -> DecodeError {
    if is_known(id) {
        DecodeError::Protocol("property not allowed on this packet")
    } else {
        DecodeError::Malformed("unknown property identifier")
    }
}

/// Tracks which single-occurrence properties were seen.
#[derive(Default)]
struct Seen(u64);

impl Seen {
    #[inline]
    fn once(&mut self, id: u32) -> Result<(), DecodeError> {
        let bit = 1u64.checked_shl(id).unwrap_or(0);
        if self.0 & bit != 0 {
            return Err(DecodeError::Protocol("property included more than once"));
        }
        self.0 |= bit;
        Ok(())
    }
}

/// Reads the property length and returns a reader over exactly the property section.
#[inline]
pub fn section<'a>(r: &mut Reader<'a>) -> Result<Reader<'a>, DecodeError> {
    let len = r.varint()? as usize;
    if len > r.remaining() {
        return Err(DecodeError::Malformed("property length exceeds the packet"));
    }
    r.sub(len)
}

fn flag(r: &mut Reader<'_>, what: &'static str) -> Result<bool, DecodeError> {
    match r.u8()? {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(DecodeError::Protocol(what)),
    }
}

fn nonzero_u16(r: &mut Reader<'_>, what: &'static str) -> Result<u16, DecodeError> {
    match r.u16()? {
        0 => Err(DecodeError::Protocol(what)),
        v => Ok(v),
    }
}

fn nonzero_u32(r: &mut Reader<'_>, what: &'static str) -> Result<u32, DecodeError> {
    match r.u32()? {
        0 => Err(DecodeError::Protocol(what)),
        v => Ok(v),
    }
}

fn subscription_id(r: &mut Reader<'_>) -> Result<u32, DecodeError> {
    match r.varint()? {
        0 => Err(DecodeError::Protocol("subscription identifier 0")),
        v => Ok(v),
    }
}

fn user_property(r: &mut Reader<'_>, into: &mut UserProperties) -> Result<(), DecodeError> {
    let key = r.string()?;
    let value = r.string()?;
    into.push((key, value));
    Ok(())
}

fn response_topic(r: &mut Reader<'_>) -> Result<String, DecodeError> {
    let topic = r.str()?;
    if topic.contains(['+', '#']) {
        return Err(DecodeError::Protocol("response topic contains a wildcard"));
    }
    Ok(topic.to_owned())
}

pub fn decode_connect(r: &mut Reader<'_>) -> Result<ConnectProperties, DecodeError> {
    let mut p = section(r)?;
    let mut props = ConnectProperties::default();
    let mut seen = Seen::default();
    while !p.is_empty() {
        let id = p.varint()?;
        match id {
            USER_PROPERTY => user_property(&mut p, &mut props.user_properties)?,
            SESSION_EXPIRY_INTERVAL => {
                seen.once(id)?;
                props.session_expiry_interval = Some(p.u32()?);
            }
            RECEIVE_MAXIMUM => {
                seen.once(id)?;
                props.receive_maximum = Some(nonzero_u16(&mut p, "receive maximum 0")?);
            }
            MAXIMUM_PACKET_SIZE => {
                seen.once(id)?;
                props.maximum_packet_size = Some(nonzero_u32(&mut p, "maximum packet size 0")?);
            }
            TOPIC_ALIAS_MAXIMUM => {
                seen.once(id)?;
                props.topic_alias_maximum = Some(p.u16()?);
            }
            REQUEST_RESPONSE_INFORMATION => {
                seen.once(id)?;
                props.request_response_information =
                    Some(flag(&mut p, "request response information must be 0 or 1")?);
            }
            REQUEST_PROBLEM_INFORMATION => {
                seen.once(id)?;
                props.request_problem_information =
                    Some(flag(&mut p, "request problem information must be 0 or 1")?);
            }
            AUTHENTICATION_METHOD => {
                seen.once(id)?;
                props.authentication_method = Some(p.string()?);
            }
            AUTHENTICATION_DATA => {
                seen.once(id)?;
                props.authentication_data = Some(p.binary()?);
            }
            _ => return Err(not_allowed(id)),
        }
    }
    if props.authentication_data.is_some() && props.authentication_method.is_none() {
        return Err(DecodeError::Protocol(
            "authentication data without authentication method",
        ));
    }
    Ok(props)
}

/// PUBLISH properties, or will properties when `will` is set (then the will delay interval is
/// returned too, and topic alias / subscription identifier are not allowed).
pub fn decode_publish(
    r: &mut Reader<'_>,
    will: bool,
) -> Result<(PublishProperties, Option<u32>), DecodeError> {
    let mut p = section(r)?;
    let mut props = PublishProperties::default();
    let mut delay = None;
    if p.is_empty() {
        return Ok((props, delay));
    }
    let mut seen = Seen::default();
    while !p.is_empty() {
        let id = p.varint()?;
        match id {
            USER_PROPERTY => user_property(&mut p, &mut props.user_properties)?,
            PAYLOAD_FORMAT_INDICATOR => {
                seen.once(id)?;
                props.payload_format_indicator = Some(match p.u8()? {
                    v @ (0 | 1) => v,
                    _ => {
                        return Err(DecodeError::Protocol(
                            "payload format indicator must be 0 or 1",
                        ))
                    }
                });
            }
            MESSAGE_EXPIRY_INTERVAL => {
                seen.once(id)?;
                props.message_expiry_interval = Some(p.u32()?);
            }
            CONTENT_TYPE => {
                seen.once(id)?;
                props.content_type = Some(p.string()?);
            }
            RESPONSE_TOPIC => {
                seen.once(id)?;
                props.response_topic = Some(response_topic(&mut p)?);
            }
            CORRELATION_DATA => {
                seen.once(id)?;
                props.correlation_data = Some(p.binary()?);
            }
            TOPIC_ALIAS if !will => {
                seen.once(id)?;
                props.topic_alias = Some(nonzero_u16(&mut p, "topic alias 0")?);
            }
            SUBSCRIPTION_IDENTIFIER if !will => {
                props
                    .subscription_identifiers
                    .push(subscription_id(&mut p)?);
            }
            WILL_DELAY_INTERVAL if will => {
                seen.once(id)?;
                delay = Some(p.u32()?);
            }
            _ => return Err(not_allowed(id)),
        }
    }
    Ok((props, delay))
}

pub fn decode_connack(r: &mut Reader<'_>) -> Result<ConnAckProperties, DecodeError> {
    let mut p = section(r)?;
    let mut props = ConnAckProperties::default();
    let mut seen = Seen::default();
    while !p.is_empty() {
        let id = p.varint()?;
        match id {
            USER_PROPERTY => user_property(&mut p, &mut props.user_properties)?,
            SESSION_EXPIRY_INTERVAL => {
                seen.once(id)?;
                props.session_expiry_interval = Some(p.u32()?);
            }
            RECEIVE_MAXIMUM => {
                seen.once(id)?;
                props.receive_maximum = Some(nonzero_u16(&mut p, "receive maximum 0")?);
            }
            MAXIMUM_QOS => {
                seen.once(id)?;
                props.maximum_qos = Some(match p.u8()? {
                    0 => QoS::AtMostOnce,
                    1 => QoS::AtLeastOnce,
                    _ => return Err(DecodeError::Protocol("maximum QoS must be 0 or 1")),
                });
            }
            RETAIN_AVAILABLE => {
                seen.once(id)?;
                props.retain_available = Some(flag(&mut p, "retain available must be 0 or 1")?);
            }
            MAXIMUM_PACKET_SIZE => {
                seen.once(id)?;
                props.maximum_packet_size = Some(nonzero_u32(&mut p, "maximum packet size 0")?);
            }
            ASSIGNED_CLIENT_IDENTIFIER => {
                seen.once(id)?;
                props.assigned_client_identifier = Some(p.string()?);
            }
            TOPIC_ALIAS_MAXIMUM => {
                seen.once(id)?;
                props.topic_alias_maximum = Some(p.u16()?);
            }
            REASON_STRING => {
                seen.once(id)?;
                props.reason_string = Some(p.string()?);
            }
            WILDCARD_SUBSCRIPTION_AVAILABLE => {
                seen.once(id)?;
                props.wildcard_subscription_available = Some(flag(
                    &mut p,
                    "wildcard subscription available must be 0 or 1",
                )?);
            }
            SUBSCRIPTION_IDENTIFIER_AVAILABLE => {
                seen.once(id)?;
                props.subscription_identifiers_available = Some(flag(
                    &mut p,
                    "subscription identifiers available must be 0 or 1",
                )?);
            }
            SHARED_SUBSCRIPTION_AVAILABLE => {
                seen.once(id)?;
                props.shared_subscription_available = Some(flag(
                    &mut p,
                    "shared subscription available must be 0 or 1",
                )?);
            }
            SERVER_KEEP_ALIVE => {
                seen.once(id)?;
                props.server_keep_alive = Some(p.u16()?);
            }
            RESPONSE_INFORMATION => {
                seen.once(id)?;
                props.response_information = Some(p.string()?);
            }
            SERVER_REFERENCE => {
                seen.once(id)?;
                props.server_reference = Some(p.string()?);
            }
            AUTHENTICATION_METHOD => {
                seen.once(id)?;
                props.authentication_method = Some(p.string()?);
            }
            AUTHENTICATION_DATA => {
                seen.once(id)?;
                props.authentication_data = Some(p.binary()?);
            }
            _ => return Err(not_allowed(id)),
        }
    }
    Ok(props)
}

/// Reason string and user properties (PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK, UNSUBACK).
pub fn decode_reason(r: &mut Reader<'_>) -> Result<ReasonProperties, DecodeError> {
    let mut p = section(r)?;
    let mut props = ReasonProperties::default();
    let mut seen = Seen::default();
    while !p.is_empty() {
        let id = p.varint()?;
        match id {
            USER_PROPERTY => user_property(&mut p, &mut props.user_properties)?,
            REASON_STRING => {
                seen.once(id)?;
                props.reason_string = Some(p.string()?);
            }
            _ => return Err(not_allowed(id)),
        }
    }
    Ok(props)
}

pub fn decode_subscribe(r: &mut Reader<'_>) -> Result<(Option<u32>, UserProperties), DecodeError> {
    let mut p = section(r)?;
    let mut subscription_identifier = None;
    let mut user_properties = UserProperties::new();
    let mut seen = Seen::default();
    while !p.is_empty() {
        let id = p.varint()?;
        match id {
            USER_PROPERTY => user_property(&mut p, &mut user_properties)?,
            SUBSCRIPTION_IDENTIFIER => {
                seen.once(id)?;
                subscription_identifier = Some(subscription_id(&mut p)?);
            }
            _ => return Err(not_allowed(id)),
        }
    }
    Ok((subscription_identifier, user_properties))
}

pub fn decode_unsubscribe(r: &mut Reader<'_>) -> Result<UserProperties, DecodeError> {
    let mut p = section(r)?;
    let mut user_properties = UserProperties::new();
    while !p.is_empty() {
        let id = p.varint()?;
        match id {
            USER_PROPERTY => user_property(&mut p, &mut user_properties)?,
            _ => return Err(not_allowed(id)),
        }
    }
    Ok(user_properties)
}

pub fn decode_disconnect(r: &mut Reader<'_>) -> Result<DisconnectProperties, DecodeError> {
    let mut p = section(r)?;
    let mut props = DisconnectProperties::default();
    let mut seen = Seen::default();
    while !p.is_empty() {
        let id = p.varint()?;
        match id {
            USER_PROPERTY => user_property(&mut p, &mut props.user_properties)?,
            SESSION_EXPIRY_INTERVAL => {
                seen.once(id)?;
                props.session_expiry_interval = Some(p.u32()?);
            }
            REASON_STRING => {
                seen.once(id)?;
                props.reason_string = Some(p.string()?);
            }
            SERVER_REFERENCE => {
                seen.once(id)?;
                props.server_reference = Some(p.string()?);
            }
            _ => return Err(not_allowed(id)),
        }
    }
    Ok(props)
}

pub fn decode_auth(r: &mut Reader<'_>) -> Result<AuthProperties, DecodeError> {
    let mut p = section(r)?;
    let mut props = AuthProperties::default();
    let mut seen = Seen::default();
    while !p.is_empty() {
        let id = p.varint()?;
        match id {
            USER_PROPERTY => user_property(&mut p, &mut props.user_properties)?,
            AUTHENTICATION_METHOD => {
                seen.once(id)?;
                props.authentication_method = Some(p.string()?);
            }
            AUTHENTICATION_DATA => {
                seen.once(id)?;
                props.authentication_data = Some(p.binary()?);
            }
            REASON_STRING => {
                seen.once(id)?;
                props.reason_string = Some(p.string()?);
            }
            _ => return Err(not_allowed(id)),
        }
    }
    if props.authentication_data.is_some() && props.authentication_method.is_none() {
        return Err(DecodeError::Protocol(
            "authentication data without authentication method",
        ));
    }
    Ok(props)
}

// ---------------------------------------------------------------------------------------------
// Encoding. `*_len` give the size of the property section without its length prefix; `put_*`
// append the prefix and the section. Length functions never fail; values that cannot be
// encoded are reported by the `put_*` functions.

/// Size of a property section of `len` bytes, length prefix included.
#[inline]
pub fn with_prefix(len: usize) -> usize {
    varint_len(len) + len
}

#[inline]
fn opt_len<T>(value: &Option<T>, len: impl Fn(&T) -> usize) -> usize {
    value.as_ref().map_or(0, len)
}

#[inline]
fn str_len(s: &str) -> usize {
    1 + binary_len(s.as_bytes())
}

#[inline]
fn bytes_len(b: &Bytes) -> usize {
    1 + binary_len(b)
}

fn user_len(user: &UserProperties) -> usize {
    user.iter()
        .map(|(k, v)| 1 + binary_len(k.as_bytes()) + binary_len(v.as_bytes()))
        .sum()
}

fn sub_id_len(id: u32) -> usize {
    1 + varint_len(id as usize)
}

fn put_section_len(buf: &mut BytesMut, len: usize) -> Result<(), EncodeError> {
    if len > MAX_VARINT as usize {
        return Err(EncodeError::PacketTooLarge {
            size: len,
            max: MAX_VARINT as usize,
        });
    }
    put_varint(buf, len as u32);
    Ok(())
}

#[inline]
fn put_u8(buf: &mut BytesMut, id: u32, value: u8) {
    buf.put_u8(id as u8);
    buf.put_u8(value);
}

#[inline]
fn put_u16(buf: &mut BytesMut, id: u32, value: u16) {
    buf.put_u8(id as u8);
    buf.put_u16(value);
}

#[inline]
fn put_u32(buf: &mut BytesMut, id: u32, value: u32) {
    buf.put_u8(id as u8);
    buf.put_u32(value);
}

#[inline]
fn put_bin(
    buf: &mut BytesMut,
    id: u32,
    field: &'static str,
    value: &[u8],
) -> Result<(), EncodeError> {
    check_len(field, value.len())?;
    buf.put_u8(id as u8);
    put_binary(buf, field, value)
}

fn put_user(buf: &mut BytesMut, user: &UserProperties) -> Result<(), EncodeError> {
    for (key, value) in user {
        check_len("user property name", key.len())?;
        check_len("user property value", value.len())?;
        buf.put_u8(USER_PROPERTY as u8);
        put_binary(buf, "user property name", key.as_bytes())?;
        put_binary(buf, "user property value", value.as_bytes())?;
    }
    Ok(())
}

fn put_sub_id(buf: &mut BytesMut, id: u32) -> Result<(), EncodeError> {
    if id == 0 || id > MAX_VARINT {
        return Err(EncodeError::InvalidValue(
            "subscription identifier must be 1..=268435455",
        ));
    }
    buf.put_u8(SUBSCRIPTION_IDENTIFIER as u8);
    put_varint(buf, id);
    Ok(())
}

fn nonzero<T: Default + PartialEq>(value: T, what: &'static str) -> Result<T, EncodeError> {
    if value == T::default() {
        Err(EncodeError::InvalidValue(what))
    } else {
        Ok(value)
    }
}

pub fn connect_len(p: &ConnectProperties) -> usize {
    opt_len(&p.session_expiry_interval, |_| 5)
        + opt_len(&p.receive_maximum, |_| 3)
        + opt_len(&p.maximum_packet_size, |_| 5)
        + opt_len(&p.topic_alias_maximum, |_| 3)
        + opt_len(&p.request_response_information, |_| 2)
        + opt_len(&p.request_problem_information, |_| 2)
        + user_len(&p.user_properties)
        + opt_len(&p.authentication_method, |s| str_len(s))
        + opt_len(&p.authentication_data, bytes_len)
}

pub fn put_connect(buf: &mut BytesMut, p: &ConnectProperties) -> Result<(), EncodeError> {
    put_section_len(buf, connect_len(p))?;
    if let Some(v) = p.session_expiry_interval {
        put_u32(buf, SESSION_EXPIRY_INTERVAL, v);
    }
    if let Some(v) = p.receive_maximum {
        put_u16(buf, RECEIVE_MAXIMUM, nonzero(v, "receive maximum 0")?);
    }
    if let Some(v) = p.maximum_packet_size {
        put_u32(
            buf,
            MAXIMUM_PACKET_SIZE,
            nonzero(v, "maximum packet size 0")?,
        );
    }
    if let Some(v) = p.topic_alias_maximum {
        put_u16(buf, TOPIC_ALIAS_MAXIMUM, v);
    }
    if let Some(v) = p.request_response_information {
        put_u8(buf, REQUEST_RESPONSE_INFORMATION, u8::from(v));
    }
    if let Some(v) = p.request_problem_information {
        put_u8(buf, REQUEST_PROBLEM_INFORMATION, u8::from(v));
    }
    put_user(buf, &p.user_properties)?;
    if let Some(v) = &p.authentication_method {
        put_bin(
            buf,
            AUTHENTICATION_METHOD,
            "authentication method",
            v.as_bytes(),
        )?;
    }
    if let Some(v) = &p.authentication_data {
        put_bin(buf, AUTHENTICATION_DATA, "authentication data", v)?;
    }
    Ok(())
}

/// PUBLISH properties, or will properties (with the delay interval) when `will` is given.
pub fn publish_len(p: &PublishProperties, will: Option<Option<u32>>) -> usize {
    let delay = match will {
        Some(Some(_)) => 5,
        _ => 0,
    };
    delay
        + opt_len(&p.payload_format_indicator, |_| 2)
        + opt_len(&p.message_expiry_interval, |_| 5)
        + opt_len(&p.topic_alias, |_| 3)
        + opt_len(&p.response_topic, |s| str_len(s))
        + opt_len(&p.correlation_data, bytes_len)
        + user_len(&p.user_properties)
        + p.subscription_identifiers
            .iter()
            .map(|&id| sub_id_len(id))
            .sum::<usize>()
        + opt_len(&p.content_type, |s| str_len(s))
}

pub fn put_publish(
    buf: &mut BytesMut,
    p: &PublishProperties,
    will: Option<Option<u32>>,
) -> Result<(), EncodeError> {
    put_section_len(buf, publish_len(p, will))?;
    if let Some(Some(delay)) = will {
        put_u32(buf, WILL_DELAY_INTERVAL, delay);
    }
    if will.is_some() && (p.topic_alias.is_some() || !p.subscription_identifiers.is_empty()) {
        return Err(EncodeError::InvalidValue(
            "will properties cannot carry a topic alias or subscription identifier",
        ));
    }
    if let Some(v) = p.payload_format_indicator {
        if v > 1 {
            return Err(EncodeError::InvalidValue(
                "payload format indicator must be 0 or 1",
            ));
        }
        put_u8(buf, PAYLOAD_FORMAT_INDICATOR, v);
    }
    if let Some(v) = p.message_expiry_interval {
        put_u32(buf, MESSAGE_EXPIRY_INTERVAL, v);
    }
    if let Some(v) = p.topic_alias {
        put_u16(buf, TOPIC_ALIAS, nonzero(v, "topic alias 0")?);
    }
    if let Some(v) = &p.response_topic {
        put_bin(buf, RESPONSE_TOPIC, "response topic", v.as_bytes())?;
    }
    if let Some(v) = &p.correlation_data {
        put_bin(buf, CORRELATION_DATA, "correlation data", v)?;
    }
    put_user(buf, &p.user_properties)?;
    for &id in &p.subscription_identifiers {
        put_sub_id(buf, id)?;
    }
    if let Some(v) = &p.content_type {
        put_bin(buf, CONTENT_TYPE, "content type", v.as_bytes())?;
    }
    Ok(())
}

/// `maximum_qos: Some(ExactlyOnce)` is not sent: an absent Maximum QoS means 2 ([MQTT-3.2.2-9]).
pub fn connack_len(p: &ConnAckProperties) -> usize {
    opt_len(&p.session_expiry_interval, |_| 5)
        + opt_len(&p.receive_maximum, |_| 3)
        + opt_len(
            &p.maximum_qos,
            |&q| if q == QoS::ExactlyOnce { 0 } else { 2 },
        )
        + opt_len(&p.retain_available, |_| 2)
        + opt_len(&p.maximum_packet_size, |_| 5)
        + opt_len(&p.assigned_client_identifier, |s| str_len(s))
        + opt_len(&p.topic_alias_maximum, |_| 3)
        + opt_len(&p.reason_string, |s| str_len(s))
        + user_len(&p.user_properties)
        + opt_len(&p.wildcard_subscription_available, |_| 2)
        + opt_len(&p.subscription_identifiers_available, |_| 2)
        + opt_len(&p.shared_subscription_available, |_| 2)
        + opt_len(&p.server_keep_alive, |_| 3)
        + opt_len(&p.response_information, |s| str_len(s))
        + opt_len(&p.server_reference, |s| str_len(s))
        + opt_len(&p.authentication_method, |s| str_len(s))
        + opt_len(&p.authentication_data, bytes_len)
}

pub fn put_connack(buf: &mut BytesMut, p: &ConnAckProperties) -> Result<(), EncodeError> {
    put_section_len(buf, connack_len(p))?;
    if let Some(v) = p.session_expiry_interval {
        put_u32(buf, SESSION_EXPIRY_INTERVAL, v);
    }
    if let Some(v) = p.receive_maximum {
        put_u16(buf, RECEIVE_MAXIMUM, nonzero(v, "receive maximum 0")?);
    }
    if let Some(v) = p.maximum_qos {
        if v != QoS::ExactlyOnce {
            put_u8(buf, MAXIMUM_QOS, v as u8);
        }
    }
    if let Some(v) = p.retain_available {
        put_u8(buf, RETAIN_AVAILABLE, u8::from(v));
    }
    if let Some(v) = p.maximum_packet_size {
        put_u32(
            buf,
            MAXIMUM_PACKET_SIZE,
            nonzero(v, "maximum packet size 0")?,
        );
    }
    if let Some(v) = &p.assigned_client_identifier {
        put_bin(
            buf,
            ASSIGNED_CLIENT_IDENTIFIER,
            "assigned client identifier",
            v.as_bytes(),
        )?;
    }
    if let Some(v) = p.topic_alias_maximum {
        put_u16(buf, TOPIC_ALIAS_MAXIMUM, v);
    }
    if let Some(v) = &p.reason_string {
        put_bin(buf, REASON_STRING, "reason string", v.as_bytes())?;
    }
    put_user(buf, &p.user_properties)?;
    if let Some(v) = p.wildcard_subscription_available {
        put_u8(buf, WILDCARD_SUBSCRIPTION_AVAILABLE, u8::from(v));
    }
    if let Some(v) = p.subscription_identifiers_available {
        put_u8(buf, SUBSCRIPTION_IDENTIFIER_AVAILABLE, u8::from(v));
    }
    if let Some(v) = p.shared_subscription_available {
        put_u8(buf, SHARED_SUBSCRIPTION_AVAILABLE, u8::from(v));
    }
    if let Some(v) = p.server_keep_alive {
        put_u16(buf, SERVER_KEEP_ALIVE, v);
    }
    if let Some(v) = &p.response_information {
        put_bin(
            buf,
            RESPONSE_INFORMATION,
            "response information",
            v.as_bytes(),
        )?;
    }
    if let Some(v) = &p.server_reference {
        put_bin(buf, SERVER_REFERENCE, "server reference", v.as_bytes())?;
    }
    if let Some(v) = &p.authentication_method {
        put_bin(
            buf,
            AUTHENTICATION_METHOD,
            "authentication method",
            v.as_bytes(),
        )?;
    }
    if let Some(v) = &p.authentication_data {
        put_bin(buf, AUTHENTICATION_DATA, "authentication data", v)?;
    }
    Ok(())
}

pub fn reason_len(p: &ReasonProperties) -> usize {
    opt_len(&p.reason_string, |s| str_len(s)) + user_len(&p.user_properties)
}

pub fn reason_is_empty(p: &ReasonProperties) -> bool {
    p.reason_string.is_none() && p.user_properties.is_empty()
}

pub fn put_reason(buf: &mut BytesMut, p: &ReasonProperties) -> Result<(), EncodeError> {
    put_section_len(buf, reason_len(p))?;
    if let Some(v) = &p.reason_string {
        put_bin(buf, REASON_STRING, "reason string", v.as_bytes())?;
    }
    put_user(buf, &p.user_properties)
}

pub fn subscribe_len(subscription_identifier: Option<u32>, user: &UserProperties) -> usize {
    opt_len(&subscription_identifier, |&id| sub_id_len(id)) + user_len(user)
}

pub fn put_subscribe(
    buf: &mut BytesMut,
    subscription_identifier: Option<u32>,
    user: &UserProperties,
) -> Result<(), EncodeError> {
    put_section_len(buf, subscribe_len(subscription_identifier, user))?;
    if let Some(id) = subscription_identifier {
        put_sub_id(buf, id)?;
    }
    put_user(buf, user)
}

pub fn unsubscribe_len(user: &UserProperties) -> usize {
    user_len(user)
}

pub fn put_unsubscribe(buf: &mut BytesMut, user: &UserProperties) -> Result<(), EncodeError> {
    put_section_len(buf, user_len(user))?;
    put_user(buf, user)
}

pub fn disconnect_len(p: &DisconnectProperties) -> usize {
    opt_len(&p.session_expiry_interval, |_| 5)
        + opt_len(&p.reason_string, |s| str_len(s))
        + user_len(&p.user_properties)
        + opt_len(&p.server_reference, |s| str_len(s))
}

pub fn disconnect_is_empty(p: &DisconnectProperties) -> bool {
    p.session_expiry_interval.is_none()
        && p.reason_string.is_none()
        && p.user_properties.is_empty()
        && p.server_reference.is_none()
}

pub fn put_disconnect(buf: &mut BytesMut, p: &DisconnectProperties) -> Result<(), EncodeError> {
    put_section_len(buf, disconnect_len(p))?;
    if let Some(v) = p.session_expiry_interval {
        put_u32(buf, SESSION_EXPIRY_INTERVAL, v);
    }
    if let Some(v) = &p.reason_string {
        put_bin(buf, REASON_STRING, "reason string", v.as_bytes())?;
    }
    put_user(buf, &p.user_properties)?;
    if let Some(v) = &p.server_reference {
        put_bin(buf, SERVER_REFERENCE, "server reference", v.as_bytes())?;
    }
    Ok(())
}

pub fn auth_len(p: &AuthProperties) -> usize {
    opt_len(&p.authentication_method, |s| str_len(s))
        + opt_len(&p.authentication_data, bytes_len)
        + opt_len(&p.reason_string, |s| str_len(s))
        + user_len(&p.user_properties)
}

pub fn auth_is_empty(p: &AuthProperties) -> bool {
    p.authentication_method.is_none()
        && p.authentication_data.is_none()
        && p.reason_string.is_none()
        && p.user_properties.is_empty()
}

pub fn put_auth(buf: &mut BytesMut, p: &AuthProperties) -> Result<(), EncodeError> {
    put_section_len(buf, auth_len(p))?;
    if let Some(v) = &p.authentication_method {
        put_bin(
            buf,
            AUTHENTICATION_METHOD,
            "authentication method",
            v.as_bytes(),
        )?;
    }
    if let Some(v) = &p.authentication_data {
        put_bin(buf, AUTHENTICATION_DATA, "authentication data", v)?;
    }
    if let Some(v) = &p.reason_string {
        put_bin(buf, REASON_STRING, "reason string", v.as_bytes())?;
    }
    put_user(buf, &p.user_properties)
}

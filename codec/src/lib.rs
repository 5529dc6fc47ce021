//! MQTT 3.1.1 / 5.0 codec: bytes in, [`Packet`]s out, and back.
//!
//! The decoder checks the announced packet length against the size limit before it buffers
//! the body, so an oversized length prefix costs no allocation. After a [`DecodeError`] the
//! connection must be closed: the stream position is no longer trustworthy.
//!
//! # Entry points
//! * [`decode_packet`]: one packet from the front of a `BytesMut` (`Ok(None)` = need more).
//! * [`encode_packet`] / [`encoded_len`]: append a packet in a given version's wire format /
//!   its exact size (to honour a peer's Maximum Packet Size).
//! * [`MqttCodec`]: both, as a `tokio_util` `Decoder` + `Encoder<Packet>` + `Encoder<&Packet>`;
//!   it learns the protocol version from the CONNECT it decodes or encodes.
//!
//! # Versions
//! MQTT 3.1 ("MQIsdp", level 3) and 3.1.1 ("MQTT", level 4) share one wire format here; MQTT 5
//! is level 5. A known protocol name with another level gives
//! [`DecodeError::UnsupportedProtocol`]; an unknown name a Protocol error. For 3.1.1 the encoder
//! writes no properties and maps reason codes to return codes ([`ReasonCode::to_v311_connack`],
//! [`ReasonCode::to_v311_suback`]); for MQTT 5 it uses the short forms of acknowledgements,
//! DISCONNECT and AUTH when the reason is Success and there are no properties, and the decoder
//! accepts every short form the specification allows.
//!
//! # Strictness
//! The decoder is meant for a broker and rejects what the specification forbids. The error
//! kind (and so the MQTT 5 reason code, [`DecodeError::reason_code`]) follows the
//! specification's wording where it names one:
//!
//! Malformed (0x81):
//! * wrong fixed-header flag bits (PUBREL, SUBSCRIBE, UNSUBSCRIBE need 0b0010, the others 0
//!   except PUBLISH), PUBLISH QoS 3, DUP on a QoS 0 PUBLISH, packet type 0;
//! * a variable byte integer (remaining length, property length, property identifier,
//!   subscription identifier) longer than 4 bytes or not in its shortest form;
//! * a field running past the end of the packet or of its property section, bytes left over
//!   after the declared contents, a property length running past the packet;
//! * strings that are not UTF-8 or contain U+0000;
//! * CONNECT: reserved flag bit set, will QoS / will retain without the will flag, will QoS 3,
//!   password without user name on 3.1.1;
//! * CONNACK reserved acknowledge flag bits;
//! * SUBSCRIBE: 3.1.1 requested-QoS byte with bits 2-7 set or QoS 3, MQTT 5 subscription
//!   options bits 6-7 set;
//! * an unknown property identifier (its value cannot be skipped).
//!
//! Protocol error (0x82):
//! * a first packet other than CONNECT, AUTH on 3.1.1, an unknown protocol name;
//! * packet identifier 0 where one is required (PUBLISH QoS > 0, the PUBLISH acknowledgements,
//!   SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK) — the specification treats a violated "MUST"
//!   as a protocol error, as mosquitto does;
//! * SUBSCRIBE / UNSUBSCRIBE without filters, SUBACK / MQTT 5 UNSUBACK without reason codes;
//! * MQTT 5 subscription options with maximum QoS 3 or retain handling 3 (the specification
//!   calls both a Protocol Error, unlike the reserved bits), No Local on a `$share/` filter;
//! * a reason code the packet does not allow, a reserved 3.1.1 CONNACK return code, Session
//!   Present on a refused CONNACK;
//! * properties: a defined property not allowed on the packet (topic alias and subscription
//!   identifier in will properties included), a single-occurrence property repeated, topic
//!   alias / receive maximum / maximum packet size / subscription identifier 0, a flag byte or
//!   payload format indicator other than 0/1, maximum QoS other than 0/1, authentication data
//!   without authentication method (CONNECT, AUTH), a response topic with wildcards;
//! * an empty MQTT 5 PUBLISH topic without a topic alias.
//!
//! Topic name invalid (0x90): a PUBLISH or will topic containing `+` or `#`, an empty will
//! topic, an empty 3.1.1 PUBLISH topic.
//!
//! Too large (0x95): the whole packet exceeds the caller's `max_packet_size`.
//!
//! Left to the broker (the codec does not know the direction or the session): a second
//! CONNECT, a subscription identifier in a client's PUBLISH, topic filter syntax, topic alias
//! ranges, client identifier rules.
//!
//! Decoding never panics on any input; payloads, passwords, correlation and authentication
//! data are zero-copy slices of the received frame.

mod decode;
mod encode;
mod error;
mod packet;
mod properties;
mod wire;

#[cfg(test)]
mod tests;

pub use decode::{decode_packet, MqttCodec};
pub use encode::{encode_packet, encoded_len};
pub use error::{DecodeError, EncodeError};
pub use packet::*;

/// Largest remaining length MQTT can express (a 4-byte variable byte integer).
pub const MAX_REMAINING_LENGTH: usize = wire::MAX_VARINT as usize;

/// Largest possible MQTT packet: fixed header byte, 4 length bytes, [`MAX_REMAINING_LENGTH`].
pub const MAX_PACKET_SIZE: usize = 1 + 4 + MAX_REMAINING_LENGTH;

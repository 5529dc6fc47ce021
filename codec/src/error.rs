//! Decoder and encoder errors.

use crate::packet::{ProtocolVersion, ReasonCode};

/// Why a byte stream could not be decoded into a packet.
///
/// Every variant except [`DecodeError::Io`] means the peer broke the protocol; the connection
/// must be closed (after a DISCONNECT / CONNACK carrying [`DecodeError::reason_code`] for MQTT 5).
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The bytes cannot be parsed (reason code 0x81).
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    /// The packet parses but breaks a rule of the specification (reason code 0x82).
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// The packet is larger than the configured maximum (reason code 0x95).
    /// `size` counts the whole packet, fixed header included.
    #[error("packet of {size} bytes exceeds the maximum of {max}")]
    TooLarge { size: usize, max: usize },
    /// CONNECT names a known protocol ("MQTT" / "MQIsdp") with a level we do not speak.
    /// Answer with CONNACK 0x84 in MQTT 5 form if the rest of the packet reads as MQTT 5
    /// (`v5_shaped`), else with the 3.1.1 return code 1.
    #[error("unsupported protocol level {level}")]
    UnsupportedProtocol { level: u8, v5_shaped: bool },
    /// A PUBLISH (or will) topic is not a valid topic name (reason code 0x90).
    #[error("invalid topic name: {0}")]
    TopicNameInvalid(&'static str),
    /// The underlying transport failed (only produced through [`crate::MqttCodec`]).
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl DecodeError {
    /// The MQTT 5 reason code that describes this error in a CONNACK or DISCONNECT.
    pub fn reason_code(&self) -> ReasonCode {
        match self {
            DecodeError::Malformed(_) => ReasonCode::MALFORMED_PACKET,
            DecodeError::Protocol(_) => ReasonCode::PROTOCOL_ERROR,
            DecodeError::TooLarge { .. } => ReasonCode::PACKET_TOO_LARGE,
            DecodeError::UnsupportedProtocol { .. } => ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
            DecodeError::TopicNameInvalid(_) => ReasonCode::TOPIC_NAME_INVALID,
            DecodeError::Io(_) => ReasonCode::UNSPECIFIED_ERROR,
        }
    }
}

/// Why a packet could not be encoded. Nothing is appended to the buffer when this is returned.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// The remaining length would exceed what MQTT can express (268,435,455 bytes).
    /// `size` is the remaining length the packet would need, `max` the limit.
    #[error("packet remaining length {size} exceeds the maximum of {max}")]
    PacketTooLarge { size: usize, max: usize },
    /// A string or binary field is longer than its 16-bit length prefix allows.
    #[error("{field} is {len} bytes long, at most 65535 are allowed")]
    FieldTooLong { field: &'static str, len: usize },
    /// A field holds a value the wire format cannot carry (or that the peer would reject).
    #[error("invalid value: {0}")]
    InvalidValue(&'static str),
    /// The packet does not exist in the protocol version it is encoded for (AUTH on 3.1.1).
    #[error("{packet} cannot be sent over MQTT {version:?}")]
    UnsupportedPacket {
        packet: &'static str,
        version: ProtocolVersion,
    },
    /// The underlying transport failed (only produced through [`crate::MqttCodec`]).
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}
